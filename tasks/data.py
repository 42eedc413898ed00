"""Stage ``data``: load the dataset, check it, and split it (train / validation / test).

Every check runs here, before any training, so a bad dataset fails in seconds with a message naming
the problem and the fix.
"""

from __future__ import annotations

import logging
import threading
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from tasks.artifacts import ArtifactRef, sha256_file
from tasks.config import DataConfig
from tasks.errors import ConfigError, DatasetError
from tasks.stage import StageSpec, run_stage

log = logging.getLogger("trtflow.data")

def _key_inputs(inputs: Mapping[str, Any]) -> Mapping[str, Any]:
    # The user's file enters the key by content, so editing it in place re-runs everything after.
    cfg: DataConfig = inputs["cfg"]
    if cfg.dataset is None:
        return {"cfg": cfg}
    path = Path(cfg.dataset).expanduser()
    return {"cfg": cfg.model_copy(update={"dataset": None}), "source_digest": sha256_file(path) if path.is_file() else "missing"}


SPEC = StageSpec("data", modules=("data.py",), libraries=("numpy", "scikit-learn"), key_inputs=_key_inputs)
SPLITS_FILE = "splits.npz"
SPLITS = ("train", "val", "test")
#: the array that holds the labels; every other array of a dataset is a model input
LABELS = "y"
_NPZ_FIX = (
    "save it with numpy.savez(path, x=inputs, y=labels): one array per input of the model's forward, named "
    "after its parameter (a single input may be called x), N samples first (N×D, N×T×D or N×C×H×W; float, or "
    "integer for ids and masks), and y shaped N (int class labels; optional with --weights)"
)


def digits_dataset() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits (1797 8×8 images, 10 classes), upscaled to 3×32×32 in [0, 1].

    Returns:
        x as float32 (N, 3, 32, 32) and y as int64 (N,).
    """
    from sklearn.datasets import load_digits

    d = load_digits()
    img = (d.images / 16.0).astype(np.float32)  # (N, 8, 8)
    # Bilinear upscaling by 4 (half-pixel centres, edge clamped), in numpy to avoid importing torch.
    src = (np.arange(32) + 0.5) / 4 - 0.5
    lo = np.clip(np.floor(src).astype(int), 0, 7)
    hi = np.clip(lo + 1, 0, 7)
    w = np.clip(src - lo, 0, 1).astype(np.float32)
    rows = img[:, lo, :] * (1 - w)[None, :, None] + img[:, hi, :] * w[None, :, None]
    full = rows[:, :, lo] * (1 - w)[None, None, :] + rows[:, :, hi] * w[None, None, :]
    x = np.repeat(full[:, None], 3, axis=1).astype(np.float32)
    return x, d.target.astype(np.int64)


def arrays_from_npz(path: Path) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """Read the named inputs and the optional labels ``y`` of a user's .npz file, without unpickling.

    Returns:
        Input name -> array (every array but ``y``, in the file's order), and the labels or None.

    Raises:
        DatasetError: missing file, not an npz, no input array.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        because = "it is a folder, not a file" if path.is_dir() else "the file does not exist"
        raise DatasetError(got=f"dataset path {path}", expected="an existing .npz file", because=because, fix="check --dataset, or omit it to use the bundled digits")
    try:
        with open(path, "rb") as f:
            magic = f.read(6)
    except OSError as exc:
        raise DatasetError(got=f"dataset path {path} ({exc.strerror})", expected="a readable .npz file", because="the file cannot be read", fix="check its permissions") from exc
    if magic.startswith(b"\x93NUMPY"):
        raise DatasetError(got=f"{path}, a single array written by numpy.save (.npy)", expected="a .npz archive holding the inputs and the labels y", because="trtflow needs the inputs and their labels by name", fix=_NPZ_FIX)
    if not magic.startswith(b"PK"):
        raise DatasetError(got=f"{path}, which is not a numpy archive (a .npz is a zip file; this one starts with {magic!r})", expected="a .npz file", because="trtflow reads datasets with numpy.load, without unpickling", fix=_NPZ_FIX)
    try:
        with np.load(path, allow_pickle=False) as z:
            names = [k for k in z.files if k != LABELS]
            if not names:
                raise DatasetError(got=f"arrays {sorted(z.files)} in {path}", expected="at least one input array besides the labels 'y' (e.g. 'x')", because="trtflow feeds the model from the arrays other than y", fix=_NPZ_FIX)
            inputs = {k: np.asarray(z[k]) for k in names}
            labels = np.asarray(z[LABELS]) if LABELS in z.files else None
            return inputs, labels
    except DatasetError:
        raise
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise DatasetError(got=f"{path} ({type(exc).__name__}: {exc})", expected="a readable .npz file", because="the file is not a numpy archive or is damaged", fix=_NPZ_FIX) from exc


def labels_in(path: Path) -> bool:
    """Whether a dataset file holds labels ``y`` (reads only the archive's table of contents)."""
    try:
        with np.load(Path(path).expanduser(), allow_pickle=False) as z:
            return LABELS in z.files
    except Exception:
        return True  # unreadable: the data stage names the problem


def input_spec(name: str, arr: np.ndarray) -> dict[str, Any]:
    """JSON description of one input: name, dtype and one sample's shape."""
    return {"name": name, "dtype": str(arr.dtype), "shape": [int(d) for d in arr.shape[1:]]}


def check_dataset(inputs: Mapping[str, np.ndarray], y: np.ndarray | None, source: str) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """Check every input and the labels; float inputs become float32, integer ones stay as they are.

    Raises:
        DatasetError: naming the first problem and how to fix it.
    """
    def fail(got: str, expected: str, because: str) -> DatasetError:
        return DatasetError(got=f"{got} in {source}", expected=expected, because=because, fix=_NPZ_FIX)

    out: dict[str, np.ndarray] = {}
    n = None
    for name, x in inputs.items():
        if not name.isidentifier():
            raise DatasetError(got=f"input array '{name}' in {source}", expected="names that are Python identifiers", because="each input is passed to the forward parameter of the same name", fix="rename it after the parameter of forward it feeds")
        if x.ndim == 1 and y is None:
            raise fail(f"a 1-D array '{name}' and no array named 'y'", "labels in an array named 'y' and inputs of rank 2 or more", "a 1-D array looks like labels; if it holds the class labels, name it 'y'")
        if x.ndim < 2:
            raise fail(f"{name} of shape {x.shape}", f"{name} of rank 2 or more (N×D, N×T×D or N×C×H×W)", "axis 0 counts the samples and each sample is at least a vector; reshape a column of scalars to N×1")
        if n is None:
            n = len(x)
        elif len(x) != n:
            raise fail(f"{len(x)} samples in '{name}' but {n} in '{next(iter(inputs))}'", "the same number of samples in every input", "sample i of every input belongs together")
        if x.dtype == np.bool_:
            out[name] = x
        elif np.issubdtype(x.dtype, np.integer):
            out[name] = x  # ids and masks: never cast, never quantized
        elif np.issubdtype(x.dtype, np.floating):
            x = x.astype(np.float32, copy=False)
            if not np.isfinite(x).all():
                bad = int((~np.isfinite(x)).reshape(len(x), -1).any(axis=1).sum())
                raise fail(f"NaN or inf values in {bad} sample(s) of '{name}'", "finite values only", "one NaN poisons every weight it reaches")
            out[name] = x
        else:
            raise fail(f"{name} of dtype {x.dtype}", "real numbers (float), or integers for ids and masks", "inputs are numeric tensors")
    if n == 0:
        raise fail("an empty dataset", "at least a few samples per class", "nothing can be trained on zero samples")
    if y is None:
        return out, None
    if y.ndim != 1:
        raise fail(f"y of shape {y.shape}", "y of rank 1 (N labels)", "each sample has one class label")
    if len(y) != n:
        raise fail(f"{n} samples and {len(y)} labels", "as many labels as samples (images)", "each sample needs its label")
    if not (np.issubdtype(y.dtype, np.integer) or (np.issubdtype(y.dtype, np.floating) and np.all(np.mod(y, 1) == 0))):
        raise fail(f"labels of dtype {y.dtype}", "integer class indices", "labels index the logits")
    y = y.astype(np.int64)
    if y.min() < 0:
        raise fail(f"label {int(y.min())}", "labels in 0..num_classes-1", "labels index the logits and cannot be negative")
    classes, counts = np.unique(y, return_counts=True)
    if len(classes) >= 2 and len(classes) < int(classes[-1]) + 1:
        missing = sorted(set(range(int(classes[-1]) + 1)) - set(classes.tolist()))
        shown = ", ".join(map(str, missing[:10])) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        raise DatasetError(
            got=f"labels up to {int(classes[-1])} with no sample of class(es) {shown} in {source}",
            expected="labels 0..K-1 with every class present",
            because="the model gets one logit per label value, and a class without samples can be neither trained nor verified",
            fix="renumber the labels, e.g. y = numpy.unique(y, return_inverse=True)[1]",
        )
    if len(classes) < 2:
        raise fail(f"a single class ({int(classes[0])})", "at least two classes", "a classifier with one class learns nothing")
    if counts.min() < 3:
        rare = classes[counts < 3].tolist()
        raise fail(f"classes {rare} with fewer than 3 samples", "at least 3 samples per class", "the split keeps every class in train, validation and test")
    return out, y


def check_arrays(x: np.ndarray, y: np.ndarray, source: str) -> tuple[np.ndarray, np.ndarray]:
    """``check_dataset`` for one input ``x`` with labels ``y``; returns x (float32 if float) and y as int64."""
    inputs, labels = check_dataset({"x": x}, y, source)
    assert labels is not None
    return inputs["x"], labels


def split_indices(y: np.ndarray | None, cfg: DataConfig, n: int | None = None) -> dict[str, np.ndarray]:
    """Train / validation / test indices, fixed by the seed; stratified by the labels when there are any.

    Args:
        y: the labels, or None for a label-free dataset (then ``n`` samples, split at random).
        cfg: fractions and seed.
        n: number of samples when ``y`` is None.
    """
    from sklearn.model_selection import train_test_split

    if y is None:
        idx = np.arange(int(n or 0))
        rest, test = train_test_split(idx, test_size=cfg.test_fraction, random_state=cfg.seed)
        train, val = train_test_split(rest, test_size=cfg.val_fraction / (1 - cfg.test_fraction), random_state=cfg.seed)
        return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}
    idx = np.arange(len(y))
    try:
        rest, test = train_test_split(idx, test_size=cfg.test_fraction, stratify=y, random_state=cfg.seed)
        val_share = cfg.val_fraction / (1 - cfg.test_fraction)
        train, val = train_test_split(rest, test_size=val_share, stratify=y[rest], random_state=cfg.seed)
    except ValueError as exc:
        # scikit-learn refuses a stratified split whose test or validation part is smaller than the
        # number of classes; say so in the dataset's terms.
        k = len(np.unique(y))
        need = int(np.ceil(k / min(cfg.val_fraction, cfg.test_fraction)))
        raise DatasetError(
            got=f"{len(y)} samples in {k} classes ({exc})",
            expected=f"at least about {need} samples, so that validation ({cfg.val_fraction:g}) and test ({cfg.test_fraction:g}) each get a sample of every class",
            because="the splits are stratified: every class must appear in train, validation and test",
            fix="add samples, or raise data.val_fraction / data.test_fraction (in a --config file)",
        ) from exc
    return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}


def imbalanced_train(train: np.ndarray, y: np.ndarray, cfg: DataConfig, num_classes: int) -> np.ndarray:
    """Subsample the training indices so that ``cfg.majority_class`` makes up ``cfg.imbalance`` of them.

    The other classes are thinned in proportion to their counts (largest remainder, so the total is
    exact up to the one-sample-per-class floor that keeps every class trainable); if the majority class
    is already above the share, it is thinned instead. Which samples stay is fixed by ``cfg.seed``.

    Args:
        train: training indices into ``y`` (sorted).
        y: every label.
        cfg: ``imbalance`` (None: return ``train`` unchanged), ``majority_class`` and ``seed``.
        num_classes: number of classes of the dataset.

    Returns:
        The kept training indices, sorted.

    Raises:
        ConfigError: ``majority_class`` is not a class of the dataset.
    """
    if cfg.imbalance is None:
        return train
    m, share = cfg.majority_class, cfg.imbalance
    if m >= num_classes:
        raise ConfigError(
            got=f"majority class {m}",
            expected=f"a label in 0..{num_classes - 1}",
            because=f"the dataset has {num_classes} classes and imbalance needs one of them as the majority",
            fix=f"pass --majority-class between 0 and {num_classes - 1}",
        )
    rng = np.random.default_rng(cfg.seed)
    y_tr = y[train]
    counts = np.bincount(y_tr, minlength=num_classes)
    n_major, n_other = int(counts[m]), int(len(train) - counts[m])
    keep = counts.copy()
    if n_major / len(train) < share:
        target = round(n_major * (1 - share) / share)
        others = np.array([c for c in range(num_classes) if c != m and counts[c] > 0])
        quota = counts[others] * target / n_other
        base = np.floor(quota).astype(np.int64)
        # Largest remainder: hand the leftover samples to the classes that lost most to rounding down.
        for i in np.argsort(-(quota - base), kind="stable")[: target - int(base.sum())]:
            base[i] += 1
        keep[others] = np.maximum(base, 1)
    else:
        keep[m] = max(1, round(n_other * share / (1 - share)))
    kept = [
        rng.choice(train[y_tr == c], size=int(keep[c]), replace=False) if keep[c] < counts[c] else train[y_tr == c]
        for c in range(num_classes)
        if counts[c]
    ]
    return np.sort(np.concatenate(kept))


#: the latest splits read (file identity -> arrays); see ``load_splits``
_SPLITS: dict[tuple[Any, ...], dict[str, np.ndarray]] = {}
_SPLITS_LOCK = threading.Lock()


def _cached_splits(ref: ArtifactRef) -> dict[str, np.ndarray]:
    """The arrays of ``splits.npz`` (read-only, shared), read once per process per unchanged file."""
    path = ref.path(SPLITS_FILE)
    try:
        st = path.stat()
        identity: tuple[Any, ...] | None = (str(path), ref.digest, st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns)
    except OSError:
        identity = None  # verify() below names the problem
    with _SPLITS_LOCK:
        arrays = _SPLITS.get(identity) if identity else None
        if arrays is None:
            ref.verify()
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
            for a in arrays.values():
                a.flags.writeable = False
            _SPLITS.clear()  # keep only the latest dataset in memory
            if identity:
                _SPLITS[identity] = arrays
    return arrays


def load_splits(ref: ArtifactRef) -> dict[str, np.ndarray]:
    """Read every split array of a ``data`` artifact (``<input>_<split>`` and ``y_<split>``), as copies.

    A cold run reads the splits in about 15 stage calls; within a process an unchanged file (same
    digest, size, inode, mtime and ctime, which any rewrite changes) is hashed and read once. Prefer
    ``split_inputs`` / ``split_labels``, which copy only the rows asked for.
    """
    return {k: v.copy() for k, v in _cached_splits(ref).items()}


def input_specs(ref: ArtifactRef) -> list[dict[str, Any]]:
    """The model inputs of a ``data`` artifact: name, dtype and one sample's shape, in dataset order."""
    specs = ref.meta.get("inputs")
    if specs is None:  # an artifact made before named inputs: one float input x
        return [{"name": "x", "dtype": "float32", "shape": list(ref.meta["sample_shape"])}]
    return list(specs)


def split_inputs(ref: ArtifactRef, split: str, rows: slice | np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The model inputs of one split, by name: the rows asked for (all by default).

    Args:
        ref: the ``data`` artifact.
        split: ``train``, ``val`` or ``test``.
        rows: a slice or index array into the split; None for every row.

    Returns:
        Input name -> array (read-only when every row is asked for: shared, not copied).
    """
    arrays = _cached_splits(ref)
    out = {}
    for spec in input_specs(ref):
        a = arrays[f"{spec['name']}_{split}"]
        out[spec["name"]] = a if rows is None else a[rows]
    return out


def split_labels(ref: ArtifactRef, split: str) -> np.ndarray | None:
    """The labels of one split (read-only), or None for a dataset without labels."""
    return _cached_splits(ref).get(f"{LABELS}_{split}")


def split_size(ref: ArtifactRef, split: str) -> int:
    """Number of samples in one split."""
    return int(ref.meta["sizes"][split])


def splits_from_dataset(cfg: DataConfig, artifacts_dir: Path, refresh: bool = False) -> ArtifactRef:
    """Load and check the dataset, split it, and store the splits.

    Args:
        cfg: dataset path (or None for the bundled digits) and split settings.
        artifacts_dir: root of the artifact store.
        refresh: recompute even if an intact artifact exists.

    Returns:
        The ``data`` artifact: ``splits.npz`` with ``<input>_<split>`` and ``y_<split>`` for train, val,
        test; meta has the inputs (name, dtype, sample shape), sizes and class counts.

    Raises:
        DatasetError: the dataset is missing, garbled or unusable.
    """

    def make(out: Path) -> dict[str, Any]:
        if cfg.dataset is None:
            x, y = digits_dataset()
            raw: dict[str, np.ndarray] = {"x": x}
            labels: np.ndarray | None = y
            source = "scikit-learn digits (bundled), upscaled to 3x32x32"
        else:
            raw, labels = arrays_from_npz(Path(cfg.dataset))
            source = f"npz file {Path(cfg.dataset).name} (sha256 {_key_inputs({'cfg': cfg})['source_digest']})"
        inputs, y = check_dataset(raw, labels, source)
        n = len(next(iter(inputs.values())))
        parts = split_indices(y, cfg, n)
        num_classes = int(y.max()) + 1 if y is not None else None
        # Only the training split is skewed: validation and test keep the natural distribution, so
        # balanced accuracy there measures what the model learnt about every class.
        if y is not None and num_classes is not None:
            parts["train"] = imbalanced_train(parts["train"], y, cfg, num_classes)
        elif cfg.imbalance is not None:
            raise ConfigError(got="--imbalance with a dataset without labels", expected="labels y to skew", because="imbalance thins classes of the training split", fix="drop --imbalance, or add labels y to the dataset")
        specs = [input_spec(k, v) for k, v in inputs.items()]
        meta: dict[str, Any] = {
            "config": cfg.model_dump(mode="json"),
            "source": source,
            "inputs": specs,
            "sample_shape": specs[0]["shape"],
            "has_labels": y is not None,
            "num_classes": num_classes,
            "sizes": {k: int(len(v)) for k, v in parts.items()},
        }
        if y is not None and num_classes is not None:
            meta["class_counts"] = {k: np.bincount(y[v], minlength=num_classes).tolist() for k, v in parts.items()}
        if cfg.imbalance is not None and y is not None:
            meta["train_majority_share"] = float(np.mean(y[parts["train"]] == cfg.majority_class))
        arrays = {}
        for k, v in parts.items():
            for name, a in inputs.items():
                arrays[f"{name}_{k}"] = a[v]
            if y is not None:
                arrays[f"{LABELS}_{k}"] = y[v]
        np.savez(out / SPLITS_FILE, **arrays)
        log.info("data: %s, inputs %s, %s samples, %s classes", source, {s["name"]: s["shape"] for s in specs}, meta["sizes"], num_classes if num_classes is not None else "no labels, so no")
        return meta

    return run_stage(SPEC, {"cfg": cfg}, artifacts_dir, refresh, make)
