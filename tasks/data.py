"""Stage ``data``: load the dataset, check it, and split it (train / validation / test).

Every check runs here, before any training, so a bad dataset fails in seconds with a message naming
the problem and the fix.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from tasks.artifacts import ArtifactRef
from tasks.config import DataConfig
from tasks.datasource import LABELS, Source, content_digest, iter_chunks, open_source, release
from tasks.errors import ArtifactError, ConfigError, DatasetError
from tasks.stage import StageSpec, run_stage
from tasks.store import Store

log = logging.getLogger("trtflow.data")

def _key_inputs(inputs: Mapping[str, Any]) -> Mapping[str, Any]:
    # The user's data enters the key by content (digest remembered by path, size, mtime, ctime and
    # inode, see tasks.datasource.content_digest), so editing it re-runs everything after. Its format
    # and place enter too: the artifact records where to read the rows, and a moved or converted
    # dataset with the same arrays gets the same split files (same digest), so everything downstream
    # stays cached. The file's name lets a re-run say "d.npz changed".
    cfg: DataConfig = inputs["cfg"]
    if cfg.dataset is None:
        return {"cfg": cfg}
    path = Path(cfg.dataset).expanduser()
    rest = cfg.model_copy(update={"dataset": None})
    if not path.exists():
        return {"cfg": rest, "dataset": {"file": path.name, "digest": "missing"}}
    return {
        "cfg": rest,
        "dataset": {"file": path.name, "path": str(path.resolve()), "kind": "npy" if path.is_dir() else "npz", "digest": content_digest(path)},
    }


SPEC = StageSpec("data", __name__, libraries=("numpy", "scikit-learn"), key_inputs=_key_inputs)
#: the split indices (int64 rows of the dataset for train, val, test), not the samples themselves
SPLITS_FILE = "splits.npz"
#: the dataset's content digest and input specs: the split files identify the data they index
SOURCE_FILE = "source.json"
SPLITS = ("train", "val", "test")
_NPZ_FIX = (
    "save it with numpy.savez(path, x=inputs, y=labels): one array per input of the model's forward, named "
    "after its parameter (a single input may be called x), N samples first (N×D, N×T×D or N×C×H×W; float, or "
    "integer for ids and masks), and y shaped N (int class labels) or N / N×K floats (regression targets); "
    "y is optional with --weights"
)


def task_of(y: np.ndarray | None, requested: str = "auto") -> str | None:
    """What the labels hold: ``requested`` unless ``auto``; else float y -> regression, integer (or bool)
    y -> classification; None without labels (and nothing requested)."""
    if requested != "auto":
        return requested
    if y is None:
        return None
    return "regression" if np.issubdtype(y.dtype, np.floating) else "classification"


def check_targets(y: np.ndarray, n: int, source: str) -> np.ndarray:
    """Check regression targets: N or N×K finite numbers that vary; returns them as float32.

    Raises:
        DatasetError: naming the problem and the fix.
    """
    def fail(got: str, expected: str, because: str, fix: str = _NPZ_FIX) -> DatasetError:
        return DatasetError(got=f"{got} in {source}", expected=expected, because=because, fix=fix,
                            summary=f"{got}, expected {expected}; fix y and save it with numpy.savez")

    if y.ndim not in (1, 2):
        raise fail(f"y of shape {y.shape}", "regression targets of shape N or N×K", "each sample has one value, or one row of K values, to predict")
    if len(y) != n:
        raise fail(f"{n} samples and {len(y)} targets", "as many targets as samples", "each sample needs its target")
    if not (np.issubdtype(y.dtype, np.number) or y.dtype == np.bool_) or np.issubdtype(y.dtype, np.complexfloating):
        raise fail(f"targets of dtype {y.dtype}", "real numbers", "the model regresses numbers")
    y = np.asarray(y, dtype=np.float32)
    if bad := int((~np.isfinite(y)).reshape(n, -1).any(axis=1).sum()):
        raise fail(f"NaN or inf in {bad} target(s)", "finite targets only", "one NaN poisons the loss and every weight it reaches")
    flat = y.reshape(n, -1)
    if n > 1 and (constant := [k for k in range(flat.shape[1]) if float(flat[:, k].std()) == 0.0]):
        where = "every target" if flat.shape[1] == 1 else f"target column(s) {constant[:5]}"
        raise fail(f"{where} equal to {float(flat[0, constant[0]]):.4g} for all {n} samples", "targets that vary",
                   "a constant has nothing to learn (R² is undefined)", fix="check how y was built (a constant fill, the wrong column)")
    return y


#: largest |x| the data check accepts: beyond it, float32 training overflows or learns nothing
MAX_ABS_VALUE = 1e6


def _check_ranges(inputs: Mapping[str, np.ndarray], source: str) -> None:
    for name, arr in inputs.items():
        if np.issubdtype(arr.dtype, np.floating):
            check_value_range(arr, source, name)


def check_value_range(x: np.ndarray, source: str, name: str = "x") -> None:
    """Refuse numerically absurd inputs: huge magnitudes, or samples that are all the same.

    Raises:
        DatasetError: |x| above ``MAX_ABS_VALUE``, or every sample identical (no signal to learn).
    """
    # Block by block (of bytes, not rows: one row may be megabytes), each block's mapped pages
    # released after use: a memory-mapped dataset may be larger than memory.
    lo, hi, varies = float("inf"), float("-inf"), False
    first = np.array(x[:1]).reshape(1, -1)
    for block in iter_chunks(x):
        chunk = np.asarray(block).reshape(len(block), -1)
        lo, hi = min(lo, float(chunk.min())), max(hi, float(chunk.max()))
        varies = varies or bool((chunk != first).any())
    if max(abs(lo), abs(hi)) > MAX_ABS_VALUE:
        raise DatasetError(
            got=f"{name} values from {lo:.3g} to {hi:.3g} in {source}",
            expected=f"inputs scaled to a sane range (|x| <= {MAX_ABS_VALUE:g}, typically about 0..1 or mean 0, std 1)",
            because="such magnitudes overflow float32 activations and losses, so training cannot learn",
            fix=f"normalise {name} before saving, e.g. {name} = ({name} - {name}.mean()) / {name}.std()",
            summary=f"{name} holds values up to {max(abs(lo), abs(hi)):.3g} in magnitude; normalise it, e.g. {name} = ({name} - {name}.mean()) / {name}.std()",
        )
    if len(x) > 1 and not varies:
        raise DatasetError(
            got=f"{len(x)} identical samples of '{name}' in {source}",
            expected="samples that differ",
            because="a model cannot tell classes apart from identical inputs",
            fix=f"check how {name} was built (a constant fill, a broken loader, all samples the same)",
            summary=f"every sample of {name} is identical ({hi:.3g}); check how {name} was built",
        )


def input_spec(name: str, arr: np.ndarray) -> dict[str, Any]:
    """JSON description of one input as the model receives it: name, dtype (floats as float32), one sample's shape."""
    dtype = "float32" if np.issubdtype(arr.dtype, np.floating) else str(arr.dtype)
    return {"name": name, "dtype": dtype, "shape": [int(d) for d in arr.shape[1:]]}


def check_dataset(inputs: Mapping[str, np.ndarray], y: np.ndarray | None, source: str, task: str | None = "classification") -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """Check every input and the labels; float inputs become float32 (mapped ones when read), integer ones stay.

    Args:
        task: ``classification`` (y: class labels, returned as int64) or ``regression`` (y: N or N×K
            targets, returned as float32); see ``task_of``.

    Raises:
        DatasetError: naming the first problem and how to fix it.
    """
    def fail(got: str, expected: str, because: str) -> DatasetError:
        return DatasetError(got=f"{got} in {source}", expected=expected, because=because, fix=_NPZ_FIX,
                            summary=f"{got}, expected {expected}; fix x/y and save them with numpy.savez")

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
            # Block by block: a mapped array is never read whole into memory.
            bad = sum(int((~np.isfinite(c)).reshape(len(c), -1).any(axis=1).sum()) for c in iter_chunks(x))
            if bad:
                raise fail(f"NaN or inf values in {bad} sample(s) of '{name}'", "finite values only", "one NaN poisons every weight it reaches")
            # float64 becomes float32 as rows are read (split_inputs); in-memory arrays at once.
            out[name] = x if isinstance(x, np.memmap) else x.astype(np.float32, copy=False)
        else:
            raise fail(f"{name} of dtype {x.dtype}", "real numbers (float), or integers for ids and masks", "inputs are numeric tensors")
    if n == 0:
        raise fail("an empty dataset", "at least a few samples per class", "nothing can be trained on zero samples")
    if y is None:
        _check_ranges(out, source)
        return out, None
    if task == "regression":
        y = check_targets(y, int(n or 0), source)
        _check_ranges(out, source)
        return out, y
    if y.ndim != 1:
        raise fail(f"y of shape {y.shape}", "y of rank 1 (N labels)", "each sample has one class label (for values to predict, pass --task regression)")
    if len(y) != n:
        raise fail(f"{n} samples and {len(y)} labels", "as many labels as samples (images)", "each sample needs its label")
    if not (np.issubdtype(y.dtype, np.integer) or (np.issubdtype(y.dtype, np.floating) and np.all(np.mod(y, 1) == 0))):
        raise fail(f"labels of dtype {y.dtype}", "integer class indices", "labels index the logits (for values to predict, pass --task regression)")
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
    # Last: a label problem is the more specific message for an all-zero placeholder array.
    _check_ranges(out, source)
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


_OPEN_LOCK = threading.Lock()
#: the split indices of the latest data artifact read, and its opened dataset (shared, read-only)
_INDICES: dict[tuple[Any, ...], dict[str, np.ndarray]] = {}
_SOURCES: dict[tuple[Any, ...], Source] = {}


def _indices(ref: ArtifactRef) -> dict[str, np.ndarray]:
    """The split indices of a ``data`` artifact (read-only, shared), read once per unchanged file."""
    path = ref.path(SPLITS_FILE)
    try:
        st = path.stat()
        identity: tuple[Any, ...] | None = (str(path), ref.digest, st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns)
    except OSError:
        identity = None  # verify() below names the problem
    with _OPEN_LOCK:
        arrays = _INDICES.get(identity) if identity else None
        if arrays is None:
            ref.verify()
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
            for v in arrays.values():
                v.flags.writeable = False
            _INDICES.clear()  # keep only the latest dataset's
            if identity:
                _INDICES[identity] = arrays
    return arrays


def source_of(ref: ArtifactRef) -> Source:
    """The dataset a ``data`` artifact indexes, opened once per process (mapped where possible).

    Raises:
        ArtifactError: the dataset moved or its content changed since it was split.
    """
    info = ref.meta.get("source") or {}
    path = Path(info["path"]) if info.get("path") else None
    key = (str(path), info.get("digest"))
    with _OPEN_LOCK:
        src = _SOURCES.get(key)
    if src is not None:
        return src
    rerun = "run the same command again: the data stage splits the dataset as it is now"
    if path is not None and not path.exists():
        raise ArtifactError(got=f"dataset {path} missing", expected="the dataset the data artifact was split from", because="the split stores row indices into the dataset, not a copy of it", fix=f"put the dataset back, or {rerun}")
    src = open_source(path)
    if info.get("digest") and content_digest(path, src) != info["digest"]:
        raise ArtifactError(got=f"dataset {path.name if path else 'digits'} with other content than when it was split", expected=f"content digest {info['digest'][:12]}", because="the split's row indices refer to the dataset as it was", fix=rerun)
    with _OPEN_LOCK:
        _SOURCES.clear()  # one dataset open at a time
        _SOURCES[key] = src
    return src


def input_specs(ref: ArtifactRef) -> list[dict[str, Any]]:
    """The model inputs of a ``data`` artifact: name, dtype and one sample's shape, in dataset order."""
    specs = ref.meta.get("inputs")
    if specs is None:  # an artifact made before named inputs: one float input x
        return [{"name": "x", "dtype": "float32", "shape": list(ref.meta["sample_shape"])}]
    return list(specs)


def sample_bytes(ref: ArtifactRef) -> int:
    """Bytes of one sample over every input of a ``data`` artifact (as the model receives it)."""
    return sum(int(np.prod(s["shape"])) * np.dtype(s["dtype"]).itemsize for s in input_specs(ref))


def split_rows(ref: ArtifactRef, split: str, rows: slice | np.ndarray | None = None) -> np.ndarray:
    """Dataset row numbers of one split (or of the given rows of it)."""
    idx = _indices(ref)[split]
    return idx if rows is None else idx[rows]


def split_inputs(ref: ArtifactRef, split: str, rows: slice | np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The model inputs of one split, by name: only the rows asked for are read.

    Args:
        ref: the ``data`` artifact.
        split: ``train``, ``val`` or ``test``.
        rows: a slice or index array into the split; None for every row (a copy of the whole split:
            prefer batches of rows for large data).

    Returns:
        Input name -> a new array of those rows (float inputs as float32).
    """
    src = source_of(ref)
    idx = split_rows(ref, split, rows)
    out = {}
    for spec in input_specs(ref):
        a = src.inputs[spec["name"]]
        rows_of = a[idx]  # fancy indexing reads only these rows, also from a memory map
        release(a)  # ... and the pages read leave this process's resident set (page cache keeps them)
        out[spec["name"]] = rows_of.astype(np.float32, copy=False) if np.issubdtype(rows_of.dtype, np.floating) else rows_of
    return out


def split_labels(ref: ArtifactRef, split: str) -> np.ndarray | None:
    """The labels of one split (int64 classes; float32 targets for regression), or None without labels."""
    src = source_of(ref)
    if src.labels is None:
        return None
    return np.asarray(src.labels)[_indices(ref)[split]].astype(np.float32 if ref.meta.get("task") == "regression" else np.int64)


def split_size(ref: ArtifactRef, split: str) -> int:
    """Number of samples in one split."""
    return int(ref.meta["sizes"][split])


def split_batches(ref: ArtifactRef, split: str, batch: int) -> Any:
    """Yield (slice, inputs) over one split in order, ``batch`` rows at a time (bounded memory)."""
    n = split_size(ref, split)
    for i in range(0, n, batch):
        sl = slice(i, min(n, i + batch))
        yield sl, split_inputs(ref, split, sl)


def load_splits(ref: ArtifactRef) -> dict[str, np.ndarray]:
    """Every split as arrays ``<input>_<split>`` and ``y_<split>`` (copies of everything: tests and
    small data only; stages read ``split_inputs`` by rows)."""
    out: dict[str, np.ndarray] = {}
    for split in SPLITS:
        for name, a in split_inputs(ref, split).items():
            out[f"{name}_{split}"] = a
        y = split_labels(ref, split)
        if y is not None:
            out[f"{LABELS}_{split}"] = y
    return out


def splits_from_dataset(cfg: DataConfig, store: Store, refresh: bool = False) -> ArtifactRef:
    """Load and check the dataset, split it, and store the splits.

    Args:
        cfg: dataset path (or None for the bundled digits) and split settings.
        store: the artifact store.
        refresh: recompute even if an intact artifact exists.

    Returns:
        The ``data`` artifact: ``splits.npz`` with ``<input>_<split>`` and ``y_<split>`` for train, val,
        test; meta has the inputs (name, dtype, sample shape), sizes and class counts.

    Raises:
        DatasetError: the dataset is missing, garbled or unusable.
    """

    def make(out: Path) -> dict[str, Any]:
        import json

        path = Path(cfg.dataset).expanduser() if cfg.dataset is not None else None
        src = open_source(path)
        if path is None:
            source = "scikit-learn digits (bundled), upscaled to 3x32x32"
        else:
            what = {"npy": "npy folder", "npz": "npz file", "npz-compressed": "compressed npz file"}[src.kind]
            source = f"{what} {path.name}"
        task = task_of(src.labels, cfg.task)
        inputs, y = check_dataset(src.inputs, src.labels, source, task)
        digest = content_digest(path, src)
        n = len(next(iter(inputs.values())))
        regression = task == "regression"
        # Regression targets are split at random (seeded), labels stratified by class.
        parts = split_indices(None if regression else y, cfg, n)
        num_classes = int(y.max()) + 1 if y is not None and not regression else None
        if regression and cfg.imbalance is not None:
            raise ConfigError(got="--imbalance with regression targets", expected="class labels y to skew", because="imbalance thins classes of the training split", fix="drop --imbalance, or pass --task classification for class labels")
        # Only the training split is skewed: validation and test keep the natural distribution, so
        # balanced accuracy there measures what the model learnt about every class.
        if y is not None and num_classes is not None:
            parts["train"] = imbalanced_train(parts["train"], y, cfg, num_classes)
        elif cfg.imbalance is not None and not regression:
            raise ConfigError(got="--imbalance with a dataset without labels", expected="labels y to skew", because="imbalance thins classes of the training split", fix="drop --imbalance, or add labels y to the dataset")
        specs = [input_spec(k, v) for k, v in inputs.items()]
        meta: dict[str, Any] = {
            "config": cfg.model_dump(mode="json"),
            "source": {"kind": src.kind, "path": str(path.resolve()) if path else None, "digest": digest, "bytes": src.nbytes, "resident_bytes": src.resident_bytes},
            "inputs": specs,
            "sample_shape": specs[0]["shape"],
            "has_labels": y is not None,
            "task": task,
            "num_classes": num_classes,
            "sizes": {k: int(len(v)) for k, v in parts.items()},
        }
        meta["source"]["description"] = f"{source} (sha256 {digest})"
        if y is not None and num_classes is not None:
            meta["class_counts"] = {k: np.bincount(y[v], minlength=num_classes).tolist() for k, v in parts.items()}
        if regression and y is not None:
            train_y = y[parts["train"]].reshape(len(parts["train"]), -1)
            meta["target_shape"] = [int(d) for d in y.shape[1:]]
            meta["target_stats"] = {"mean": train_y.mean(0).tolist(), "std": train_y.std(0).tolist()}
        if cfg.imbalance is not None and y is not None:
            meta["train_majority_share"] = float(np.mean(y[parts["train"]] == cfg.majority_class))
        # Row indices, not samples: the data is read from the dataset itself, by rows, when needed.
        np.savez(out / SPLITS_FILE, **{k: v.astype(np.int64) for k, v in parts.items()})
        (out / SOURCE_FILE).write_text(json.dumps({"digest": digest, "inputs": specs, "labels": y is not None, "samples": n}, indent=2))
        if regression and y is not None:
            log.info("data: %s, inputs %s, %s samples, regression targets of shape N%s (%s)", source, {s["name"]: s["shape"] for s in specs}, meta["sizes"],
                     "".join(f"×{d}" for d in meta.get("target_shape", [])),
                     "forced by --task regression" if cfg.task == "regression" else f"inferred from y of dtype {getattr(src.labels, 'dtype', None)}; --task classification if y holds classes")
        else:
            log.info("data: %s, inputs %s, %s samples, %s classes", source, {s["name"]: s["shape"] for s in specs}, meta["sizes"], num_classes if num_classes is not None else "no labels, so no")
        return meta

    return run_stage(SPEC, {"cfg": cfg}, store, refresh, make)
