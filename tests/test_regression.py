"""Regression: float targets are inferred (or forced) as a task, checked, trained with a scaled MSE,
judged by MAE / RMSE / R² with a "learnt nothing" gate, and verified by an error relative to the
outputs' spread instead of a per-sample cosine that is only ±1 on a one-value output.

    pytest tests/test_regression.py -q
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import _pipeline_kit as kit
from tasks.compare import compare_outputs, relative_rmse
from tasks.config import BatchProfile, CollapseGate, DataConfig, Precision, Tolerance, TrainConfig, default_tolerances
from tasks.errors import DatasetError, LearntNothingError, ModelCollapseError
from tasks.metrics import learnt_nothing_findings, regression_metrics

ALL = [Precision.fp32, Precision.fp16, Precision.int8]


def _targets(path: Path, k: int = 0, n: int = 400, offset: float = 0.0) -> Path:
    """x (N×8) and y = tanh(x·w) + noise: N values (k=0) or N×k."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 8)).astype(np.float32)
    y = np.tanh(x @ rng.normal(size=(8, max(k, 1)))) + 0.05 * rng.normal(size=(n, max(k, 1))) + offset
    np.savez(path, x=x, y=(y[:, 0] if k == 0 else y).astype(np.float32))
    return path


class Constant(nn.Module):
    """A regressor that ignores its input: it can learn the mean of y and nothing else."""

    def __init__(self, num_outputs: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(num_outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bias.expand(len(x), -1) + 0 * x[:, :1]


class TwoHeads(nn.Module):
    """A prediction of one value and a second head (features) that the loss never reads."""

    def __init__(self, in_features: int) -> None:
        super().__init__()
        self.body, self.value, self.features = nn.Linear(in_features, 32), nn.Linear(32, 1), nn.Linear(32, 6)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = torch.relu(self.body(x))
        return {"value": self.value(h), "features": self.features(h)}


def _config(root: Path, dataset: Path, precisions: list[Precision] = ALL, **train: Any) -> Any:
    train = {"epochs": 10, "batch_size": 32, "lr": 1e-2, **train}
    return kit.tiny_config(root, dataset, train=TrainConfig(**train), precisions=precisions, batch=BatchProfile(min=1, opt=4, max=16), calibration_samples=256)


# --- data ------------------------------------------------------------------------------------------


def test_float_y_is_regression_split_at_random_and_forced_either_way(tmp_path):
    from tasks.data import split_labels, splits_from_dataset

    data = splits_from_dataset(DataConfig(dataset=_targets(tmp_path / "r.npz", k=2)), tmp_path / "art")
    assert data.meta["task"] == "regression" and data.meta["num_classes"] is None and data.meta["target_shape"] == [2]
    assert len(data.meta["target_stats"]["std"]) == 2 and "class_counts" not in data.meta
    assert split_labels(data, "test").dtype == np.float32 and split_labels(data, "test").shape[1] == 2
    # Integer y forced to regression: cast to float targets. Classes saved as floats, forced back.
    x = np.random.default_rng(0).normal(size=(60, 4)).astype(np.float32)
    np.savez(tmp_path / "i.npz", x=x, y=np.arange(60) % 7)
    assert splits_from_dataset(DataConfig(dataset=tmp_path / "i.npz", task="regression"), tmp_path / "art").meta["task"] == "regression"
    np.savez(tmp_path / "f.npz", x=x, y=(np.arange(60) % 3).astype(np.float32))
    assert splits_from_dataset(DataConfig(dataset=tmp_path / "f.npz"), tmp_path / "art").meta["task"] == "regression"
    assert splits_from_dataset(DataConfig(dataset=tmp_path / "f.npz", task="classification"), tmp_path / "art").meta["num_classes"] == 3


@pytest.mark.parametrize(
    ("y", "task", "message"),
    [
        (np.full(60, 2.5, np.float32), "auto", "every target equal to 2.5"),
        (np.where(np.arange(60) == 3, np.nan, 1.0 * np.arange(60)), "auto", "NaN or inf in 1 target"),
        (np.zeros((60, 2, 2), np.float32), "auto", "shape N or N×K"),
        (np.arange(60) + 0.5, "classification", "--task regression"),
        (np.arange(60)[:, None] % 3, "auto", "--task regression"),
    ],
    ids=["constant", "nan", "rank 3", "fractional classes", "a column of class labels"],
)
def test_bad_targets_are_named(tmp_path, y, task, message):
    from tasks.data import splits_from_dataset

    np.savez(tmp_path / "d.npz", x=np.random.default_rng(0).normal(size=(60, 4)).astype(np.float32), y=y)
    with pytest.raises(DatasetError, match=message) as info:
        splits_from_dataset(DataConfig(dataset=tmp_path / "d.npz", task=task), tmp_path / "art")
    assert len(info.value.summary) <= 150


# --- metrics and comparison -------------------------------------------------------------------------


def test_regression_metrics_are_scikit_learns_and_the_gate_fails_at_r2_zero():
    from sklearn.metrics import r2_score

    rng = np.random.default_rng(0)
    y = rng.normal(size=(200, 2))
    pred = y + 0.1 * rng.normal(size=y.shape)
    good = regression_metrics(y, pred, y)
    assert good["r2"] == pytest.approx(r2_score(y, pred)) and good["per_target"][1]["r2"] == pytest.approx(r2_score(y[:, 1], pred[:, 1]))
    assert good["mae"] < 0.1 and good["r2_of_train_mean"] == pytest.approx(0.0, abs=1e-12)
    assert learnt_nothing_findings(good, CollapseGate()) == []
    mean = regression_metrics(y, np.broadcast_to(y.mean(0), y.shape))
    assert mean["r2"] == pytest.approx(0.0, abs=1e-12) and mean["prediction_std"] == 0.0
    assert "at or below min_r2 0" in learnt_nothing_findings(mean, CollapseGate())[0]
    assert learnt_nothing_findings(mean, CollapseGate(enabled=False)) == []
    assert learnt_nothing_findings(good, CollapseGate(min_r2=0.999))  # the threshold is the gate's


def test_a_one_value_output_is_judged_by_its_error_relative_to_its_spread_not_by_cosine():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(500, 1)).astype(np.float32)
    tol = default_tolerances()[Precision.int8]
    # A tiny error that flips the sign of outputs near 0: the per-sample cosine says -1 (the issue's
    # int8 failure that made repair keep every layer in fp32); relative to the spread it is 0.1%.
    near = ref + np.float32(1e-3)
    r = compare_outputs({"out": ref}, {"out": near}, tol, "int8 batch 1")
    assert r.passed and r.outputs["out"].min_cosine is None
    assert r.outputs["out"].max_relative_rmse == pytest.approx(relative_rmse(ref, near)) and relative_rmse(ref, near) < 2e-3
    # An error of half the spread keeps every sign (cosine +1) and fails.
    off = ref + 0.5 * rng.normal(size=ref.shape).astype(np.float32)
    bad = compare_outputs({"out": ref}, {"out": off}, tol, "int8 batch 1")
    assert not bad.passed and any("max_relative_rmse" in f for f in bad.failures())


def test_regression_outputs_are_scored_against_the_labels():
    rng = np.random.default_rng(1)
    y = rng.normal(size=300).astype(np.float32)
    ref = (y + 0.1 * rng.normal(size=300)).astype(np.float32)[:, None]
    worse = ref + 0.5 * rng.normal(size=ref.shape).astype(np.float32)
    tol = Tolerance(atol=None, rtol=None, max_relative_rmse=10.0, max_r2_drop=0.02)
    r = compare_outputs({"pred": ref}, {"pred": worse}, tol, "int8 batch 1", labels=y, task_outputs={"pred"}, regression=True)
    s = r.outputs["pred"]
    assert s.r2_reference > 0.95 and s.r2_drop > 0.1 and s.top1_agreement is None
    assert [c.metric for c in r.checks if not c.passed] == ["r2_drop"]


# --- training and the gate --------------------------------------------------------------------------


def _train_only(tmp_path: Path, dataset: Path, **train: Any) -> Any:
    from tasks.data import splits_from_dataset
    from tasks.train import checkpoint_from_splits

    cfg = _config(tmp_path / "art", dataset, **train)
    return checkpoint_from_splits(splits_from_dataset(cfg.data, cfg.artifacts_dir), cfg.train, cfg.artifacts_dir)


def test_a_constant_predictor_is_stopped_by_the_gate_with_its_fix(tmp_path):
    with pytest.raises(LearntNothingError) as info:
        _train_only(tmp_path, _targets(tmp_path / "r.npz"), model="test_regression:Constant")
    err = info.value
    assert isinstance(err, ModelCollapseError)  # the same gate as the classifiers' collapse
    assert "predictions are constant; make its output depend on x" in err.summary and len(err.summary) <= 150
    report = json.loads((tmp_path / "art" / "reports" / "train-metrics.json").read_text())
    assert report["passed"] is False and report["validation_metrics"]["r2"] <= 0
    assert not list((tmp_path / "art" / "train").glob("*/manifest.json"))  # nothing stored past the gate
    # Targets far from 0 in units of their spread get the standardising fix instead.
    with pytest.raises(LearntNothingError, match=r"standardise y"):
        _train_only(tmp_path / "far", _targets(tmp_path / "far.npz", offset=500.0), epochs=1, lr=1e-4)


def test_a_regressor_trains_with_regression_metrics_and_names_its_untrained_head(tmp_path):
    train = _train_only(tmp_path, _targets(tmp_path / "r.npz"), model="test_regression:TwoHeads", logits_output=None)
    m = train.meta
    assert m["task"] == "regression" and m["logits_output"] == "value" and m["untrained_outputs"] == ["features"]
    assert m["validation_metrics"]["r2"] > 0.5 and {"mae", "rmse", "per_target"} <= set(m["validation_metrics"])
    assert m["final"]["val_r2"] == pytest.approx(m["validation_metrics"]["r2"])
    assert m["model_kwargs"] == {"in_features": 8}


# --- end to end (plain functions) -------------------------------------------------------------------


def test_a_regressor_of_two_targets_verifies_in_every_precision(tmp_path):
    refs = kit.run_plain(_config(tmp_path / "art", _targets(tmp_path / "r2.npz", k=2), epochs=20))
    assert refs["train"].meta["model_kwargs"] == {"input_shape": [8], "num_outputs": 2}
    for p in ALL:
        v = json.loads(refs[f"verify-{p.value}"].path("verification.json").read_text())
        assert v["passed"] and v["task"] == "regression"
        assert {"relative RMSE (logits)", "R² drop (R², MAE, RMSE against the labels)"} <= set(v["checks_run"])
        assert "top-1 agreement" not in v["checks_run"] and "cosine per sample" not in v["checks_run"]
        for batch in v["batches"]:
            out = batch["outputs"]["logits"]
            assert out["min_cosine"] is None and out["top1_agreement"] is None and out["max_relative_rmse"] is not None
            # Rows repeated to fill a batch are compared with PyTorch, never scored against labels twice.
            assert out["r2"] is None if batch["label"].endswith("repeated rows") else out["r2"] > 0.5
    assert refs["verify-int8"].meta["r2_drop"] <= 0.02


def test_weights_without_labels_use_the_relative_error_when_told_it_is_a_regressor(tmp_path):
    """Converting a regressor with --weights and no y: --task regression judges every output by its
    relative error; without it, a one-value output is judged so anyway."""
    torch.manual_seed(0)
    net = TwoHeads(8)
    torch.save(net.state_dict(), tmp_path / "w.pt")
    x = np.random.default_rng(0).normal(size=(200, 8)).astype(np.float32)
    np.savez(tmp_path / "x.npz", x=x)
    for task, cosine_for in (("regression", []), ("auto", ["features"])):
        cfg = _config(tmp_path / f"art-{task}", tmp_path / "x.npz", precisions=[Precision.fp32], model="test_regression:TwoHeads", weights=tmp_path / "w.pt")
        cfg = cfg.model_copy(update={"data": DataConfig(dataset=tmp_path / "x.npz", task=task)})
        v = json.loads(kit.run_plain(cfg)["verify-fp32"].path("verification.json").read_text())
        checked = {c["output"]: c["metric"] for c in v["batches"][0]["checks"]}
        assert checked["value"] == "max_relative_rmse"
        assert checked["features"] == ("min_cosine" if cosine_for else "max_relative_rmse")


def test_rows_repeated_to_fill_a_batch_are_judged_like_the_split_and_against_its_spread():
    """A batch larger than the test split repeats samples; those few rows must not be measured against
    their own spread (one row has none) nor judged otherwise than the split."""
    from tasks.verify import BatchRun, checks_at_batch

    rng = np.random.default_rng(0)
    ref = {"value": rng.normal(size=(20, 1)).astype(np.float32), "features": rng.normal(size=(20, 6)).astype(np.float32)}
    ref["value"][0] = 1e-4  # the repeated row's value is near 0: against its own magnitude a tiny error is huge
    got = {k: np.concatenate([v, v[:1]]) + np.float32(1e-4) for k, v in ref.items()}
    tol = default_tolerances()[Precision.fp16]
    results = checks_at_batch(ref, got, BatchRun(batch=21, runs=1, distinct_samples=20), tol, "fp16 batch 21", rng.normal(size=20).astype(np.float32), {"value"}, regression=True)
    repeated = results[1]
    assert repeated.label.endswith("repeated rows") and repeated.passed, repeated.failures()
    assert {c.output: c.metric for c in repeated.checks if "share" not in c.metric} == {"value": "max_relative_rmse", "features": "min_cosine"}
