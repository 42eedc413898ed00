import numpy as np
import pytest

from tasks.config import DataConfig
from tasks.data import SPLITS_FILE, check_arrays, load_splits, split_inputs, split_labels, splits_from_dataset
from tasks.datasource import digits_dataset
from tasks.errors import DatasetError


def _npz(tmp_path, **arrays):
    path = tmp_path / "d.npz"
    np.savez(path, **arrays)
    return path


def _good(n=60, classes=3, shape=(3, 8, 8)):
    rng = np.random.default_rng(0)
    return rng.random((n, *shape), dtype=np.float32), np.arange(n) % classes


def test_digits_are_real_images_in_unit_range():
    x, y = digits_dataset()
    assert x.shape == (1797, 3, 32, 32) and x.dtype == np.float32
    assert 0.0 <= x.min() and x.max() <= 1.0
    assert sorted(np.unique(y)) == list(range(10))


def test_split_is_stratified_disjoint_and_seeded(tmp_path):
    ref = splits_from_dataset(DataConfig(), tmp_path)
    s = load_splits(ref)
    n = sum(len(s[f"y_{k}"]) for k in ("train", "val", "test"))
    assert n == 1797
    for k in ("train", "val", "test"):
        assert len(np.unique(s[f"y_{k}"])) == 10  # every class in every split
    assert ref.meta["sizes"]["test"] == pytest.approx(0.15 * 1797, abs=2)
    again = splits_from_dataset(DataConfig(), tmp_path / "other")
    assert again.files[SPLITS_FILE] == ref.files[SPLITS_FILE]
    other_seed = splits_from_dataset(DataConfig(seed=1), tmp_path / "seed1")
    assert other_seed.files[SPLITS_FILE] != ref.files[SPLITS_FILE]


def test_user_npz_is_keyed_by_content(tmp_path):
    x, y = _good()
    path = _npz(tmp_path, x=x, y=y)
    a = splits_from_dataset(DataConfig(dataset=path), tmp_path / "art")
    assert a.meta["num_classes"] == 3 and a.meta["sample_shape"] == [3, 8, 8]
    np.savez(path, x=x * 0.5, y=y)
    b = splits_from_dataset(DataConfig(dataset=path), tmp_path / "art")
    assert a.key != b.key


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"y": np.arange(6) % 2}, "at least one input array"),
        ({"x": np.zeros(6), "y": np.arange(6) % 2}, "rank 2 or more"),
        ({"x": np.zeros((6, 4)), "ids": np.zeros((5, 4), np.int64), "y": np.arange(6) % 2}, "the same number of samples"),
        ({"x": np.zeros((6, 4), dtype=complex), "y": np.arange(6) % 2}, "real numbers"),
        ({"x": np.zeros((6, 3, 8, 8)), "y": np.zeros((6, 1), np.int64)}, "rank 1"),
        ({"x": np.zeros((6, 3, 8, 8)), "y": np.zeros(5, np.int64)}, "as many labels as samples"),
        ({"x": np.zeros((0, 3, 8, 8)), "y": np.zeros(0)}, "empty dataset"),
        ({"x": np.full((6, 3, 8, 8), np.nan), "y": np.arange(6) % 2}, "NaN or inf"),
        ({"x": np.zeros((6, 3, 8, 8)), "y": np.array([0, 1, -1, 0, 1, 0])}, "cannot be negative"),
        ({"x": np.zeros((6, 3, 8, 8)), "y": np.zeros(6, np.int64)}, "single class"),
        ({"x": np.zeros((7, 3, 8, 8)), "y": np.array([0, 0, 0, 1, 1, 1, 2])}, "fewer than 3 samples"),
    ],
)
def test_bad_arrays_are_named(tmp_path, arrays, message):
    path = _npz(tmp_path, **arrays)
    with pytest.raises(DatasetError, match=message) as err:
        splits_from_dataset(DataConfig(dataset=path), tmp_path / "art")
    assert "numpy.savez" in str(err.value)  # the fix is part of the message
    assert not list((tmp_path / "art").glob("data/*/manifest.json"))  # no artifact, nothing half-written
    assert not list((tmp_path / "art").glob("data/.tmp-*"))


def test_missing_and_garbled_files(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        splits_from_dataset(DataConfig(dataset=tmp_path / "nope.npz"), tmp_path)
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"this is not a zip archive")
    with pytest.raises(DatasetError, match="not a numpy archive"):
        splits_from_dataset(DataConfig(dataset=junk), tmp_path)


def test_check_arrays_converts_types():
    x, y = check_arrays(np.random.default_rng(0).random((9, 1, 4, 4)), np.array([0, 1, 2] * 3, dtype=np.int32), "test")
    assert x.dtype == np.float32 and y.dtype == np.int64


def test_inputs_of_any_rank_keep_their_names_and_integer_types(tmp_path):
    rng = np.random.default_rng(0)
    n = 60
    path = _npz(
        tmp_path,
        input_ids=rng.integers(0, 50, (n, 7)),
        attention_mask=np.ones((n, 7), dtype=np.int32),
        feats=rng.random((n, 5, 3)),  # float64 becomes float32
        y=np.arange(n) % 3,
    )
    ref = splits_from_dataset(DataConfig(dataset=path), tmp_path / "art")
    assert [(s["name"], s["dtype"], s["shape"]) for s in ref.meta["inputs"]] == [
        ("input_ids", "int64", [7]), ("attention_mask", "int32", [7]), ("feats", "float32", [5, 3])
    ]
    test = split_inputs(ref, "test")
    assert list(test) == ["input_ids", "attention_mask", "feats"] and test["input_ids"].dtype == np.int64
    rows = split_inputs(ref, "train", slice(0, 2))
    assert all(len(a) == 2 for a in rows.values())
    assert split_labels(ref, "test") is not None and ref.meta["num_classes"] == 3


def test_a_dataset_without_labels_is_split_at_random(tmp_path):
    x = np.random.default_rng(0).random((40, 16), dtype=np.float32)
    ref = splits_from_dataset(DataConfig(dataset=_npz(tmp_path, x=x)), tmp_path / "art")
    assert ref.meta["has_labels"] is False and ref.meta["num_classes"] is None
    assert sum(ref.meta["sizes"].values()) == 40
    assert split_labels(ref, "test") is None
    parts = [np.sort(split_inputs(ref, k)["x"][:, 0]) for k in ("train", "val", "test")]
    assert np.array_equal(np.sort(np.concatenate(parts)), np.sort(x[:, 0]))  # disjoint and complete
