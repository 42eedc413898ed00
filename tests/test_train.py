"""Train stage: class balancing, validation metrics, and the collapse gate (issue 7).

On an 80%-class-0 version of the bundled digits, a plain run of the default CNN collapses onto class
0 within a few epochs (every validation prediction is 0); class_weight and oversample train a model
that recognises every class. Each training run takes about a second on 2 idle CPU cores.
"""

import json

import numpy as np
import pytest

from tasks.config import CollapseGate, DataConfig, TrainConfig
from tasks.data import load_splits, splits_from_dataset
from tasks.errors import ModelCollapseError, is_retryable
from tasks.stage import stage_key
from tasks.train import METRICS, METRICS_REPORT, SPEC, checkpoint_from_splits, prepare_model, train_model

#: few enough epochs that the unbalanced run has not escaped the majority class yet (it does by ~20)
EPOCHS = 6


@pytest.fixture(scope="module")
def skewed(tmp_path_factory):
    """The digits with class 0 as 80% of the training split (validation keeps its natural 10%)."""
    return splits_from_dataset(DataConfig(imbalance=0.8), tmp_path_factory.mktemp("skewed"))


def _train_dirs(root):
    """Committed artifacts and staging folders of the train stage (lock files aside)."""
    train = root / SPEC.name
    return sorted(p.name for p in train.iterdir() if not p.name.endswith(".lock")) if train.exists() else []


def test_unbalanced_run_collapses_and_the_gate_fails_the_stage(skewed, tmp_path):
    with pytest.raises(ModelCollapseError) as info:
        checkpoint_from_splits(skewed, TrainConfig(epochs=EPOCHS), tmp_path)
    err = info.value
    assert not is_retryable(err)
    msg = str(err)
    assert "class 0 receives 100.0% of the validation predictions but is 10.0% of the validation labels" in msg
    assert "balanced accuracy 0.100 is below chance 0.100" in msg
    assert "class 0 is 80% of the training labels" in msg
    assert "--balance class_weight or --balance oversample" in msg
    # No artifact, not even a staging folder, is left behind ...
    assert _train_dirs(tmp_path) == []
    # ... but the evidence is.
    report = json.loads((tmp_path / "reports" / METRICS_REPORT).read_text())
    assert err.report_path == str(tmp_path / "reports" / METRICS_REPORT)
    assert report["passed"] is False and len(report["findings"]) == 2
    vm = report["validation_metrics"]
    assert vm["balanced_accuracy"] == pytest.approx(0.1)
    assert vm["most_predicted"] == {"class": 0, "predicted_share": 1.0, "true_share": pytest.approx(0.1, abs=0.01)}
    assert vm["train_majority_share"] == pytest.approx(0.8, abs=0.01)
    assert vm["prediction_counts"][0] == vm["samples"]
    assert vm["label_counts"] == np.bincount(load_splits(skewed)["y_val"], minlength=10).tolist()


@pytest.mark.parametrize("balance", ["class_weight", "oversample"])
def test_balanced_run_passes_the_gate_with_far_better_balanced_accuracy(skewed, tmp_path, balance):
    ref = checkpoint_from_splits(skewed, TrainConfig(epochs=EPOCHS, balance=balance), tmp_path)
    vm = ref.meta["validation_metrics"]
    assert vm["balanced_accuracy"] > 0.5  # collapsed: 0.1
    assert vm["most_predicted"]["predicted_share"] < 0.4
    assert all(c["recall"] is not None for c in vm["per_class"])
    assert json.loads(ref.path(METRICS).read_text()) == vm
    report = json.loads((tmp_path / "reports" / METRICS_REPORT).read_text())
    assert report["passed"] is True and report["balance"] == balance


def test_oversampling_is_deterministic_with_the_seed(skewed):
    cfg = TrainConfig(epochs=1, balance="oversample")

    def train(cfg):
        return train_model(skewed, cfg, prepare_model(skewed, cfg), progress=False)

    a, _ = train(cfg)
    b, _ = train(cfg)
    c, _ = train(cfg.model_copy(update={"seed": 1}))
    wa, wb, wc = (list(m.state_dict().values())[-1].numpy() for m in (a, b, c))
    assert np.array_equal(wa, wb) and not np.array_equal(wa, wc)


def test_balance_and_gate_enter_the_train_key(skewed):
    keys = {
        stage_key(SPEC, {"data": skewed, "cfg": cfg})
        for cfg in (
            TrainConfig(),
            TrainConfig(balance="class_weight"),
            TrainConfig(balance="oversample"),
            TrainConfig(collapse_gate=CollapseGate(max_majority_prediction_share=0.7)),
        )
    }
    assert len(keys) == 4


def test_balance_rejects_unknown_modes():
    with pytest.raises(ValueError, match="class_weight"):
        TrainConfig(balance="smote")


def _collapse_metrics(train_counts: list[int], balanced_accuracy: float, top: int = 0, predicted_share: float = 0.9) -> dict:
    k = len(train_counts)
    return {
        "train_label_counts": train_counts,
        "train_majority_share": max(train_counts) / sum(train_counts),
        "balanced_accuracy": balanced_accuracy,
        "num_classes": k,
        "most_predicted": {"class": top, "predicted_share": predicted_share, "true_share": 1 / k},
    }


def test_collapse_on_balanced_labels_is_explained_as_no_signal(tmp_path):
    """Random balanced data (5 classes, 23% the largest): the fix is epochs/lr/data, never re-balancing."""
    from tasks.config import TrainConfig
    from tasks.train import _collapse_error

    for balance in ("none", "class_weight"):
        err = _collapse_error(["balanced accuracy 0.21 is below ..."], _collapse_metrics([115, 95, 95, 90, 95], 0.21), TrainConfig(balance=balance), tmp_path / "m.json")
        assert "learnt no signal" in err.because and "balanced" in err.because
        assert "--balance" not in str(err) and "imbalance" not in str(err)
        assert "--epochs" in err.summary and "--lr" in err.summary and len(err.summary) <= 150


def test_collapse_on_skewed_labels_is_explained_as_imbalance(tmp_path):
    from tasks.config import TrainConfig
    from tasks.train import _collapse_error

    err = _collapse_error(["class 0 receives 97% ..."], _collapse_metrics([800, 50, 50, 50, 50], 0.22), TrainConfig(), tmp_path / "m.json")
    assert "80% of the training labels" in err.because
    assert "--balance class_weight" in err.summary and len(err.summary) <= 150
