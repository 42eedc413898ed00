"""DataConfig.imbalance: a skewed training split, natural validation and test splits (issue 7)."""

import numpy as np
import pytest
from pydantic import ValidationError

from tasks.config import DataConfig
from tasks.data import imbalanced_train, load_splits, split_indices, splits_from_dataset
from tasks.datasource import digits_dataset
from tasks.errors import ConfigError


@pytest.fixture(scope="module")
def digits_y():
    return digits_dataset()[1]


@pytest.mark.parametrize("share", [0.8, 0.9, 0.05])
def test_majority_share_is_met_and_every_class_stays(digits_y, share):
    cfg = DataConfig(imbalance=share)
    train = split_indices(digits_y, cfg)["train"]
    kept = imbalanced_train(train, digits_y, cfg, 10)
    counts = np.bincount(digits_y[kept], minlength=10)
    assert counts[0] / counts.sum() == pytest.approx(share, abs=0.01)
    assert (counts >= 1).all()  # every class stays trainable
    assert set(kept) <= set(train) and np.all(np.diff(kept) > 0)
    assert np.array_equal(kept, imbalanced_train(train, digits_y, cfg, 10))  # seeded


def test_other_majority_class_and_seed(digits_y):
    cfg = DataConfig(imbalance=0.7, majority_class=3)
    train = split_indices(digits_y, cfg)["train"]
    kept = imbalanced_train(train, digits_y, cfg, 10)
    assert np.mean(digits_y[kept] == 3) == pytest.approx(0.7, abs=0.01)
    other = imbalanced_train(train, digits_y, cfg.model_copy(update={"seed": 1}), 10)
    assert not np.array_equal(kept, other)


def test_only_the_training_split_is_skewed(tmp_path):
    natural = splits_from_dataset(DataConfig(), tmp_path)
    skewed = splits_from_dataset(DataConfig(imbalance=0.8), tmp_path)
    assert skewed.key != natural.key
    a, b = load_splits(natural), load_splits(skewed)
    for k in ("x_val", "y_val", "x_test", "y_test"):
        assert np.array_equal(a[k], b[k])
    assert skewed.meta["train_majority_share"] == pytest.approx(0.8, abs=0.01)
    assert skewed.meta["class_counts"]["train"][0] == natural.meta["class_counts"]["train"][0]


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.2, 1.5, float("nan")])
def test_imbalance_must_be_a_share(bad):
    with pytest.raises(ValidationError, match="expected a share strictly between 0 and 1"):
        DataConfig(imbalance=bad)


def test_majority_class_must_exist(digits_y):
    cfg = DataConfig(imbalance=0.8, majority_class=10)
    with pytest.raises(ConfigError, match=r"got majority class 10, expected a label in 0\.\.9"):
        imbalanced_train(split_indices(digits_y, cfg)["train"], digits_y, cfg, 10)
