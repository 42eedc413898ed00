"""Where a dataset's arrays come from: the bundled digits, a ``.npz`` file, or a folder of ``.npy`` files.

Arrays are opened without reading them when the format allows it: every ``.npy`` of a folder is
memory-mapped (``numpy.load(mmap_mode="r")``), and so is every member of an **uncompressed** ``.npz``
(``numpy.savez``), whose bytes lie in the zip file as they are. A compressed ``.npz``
(``numpy.savez_compressed``) must be decompressed into memory; one too large for that is refused with
the one-line conversion to a ``.npy`` folder. Readers then take only the rows they use.

A dataset's identity is a digest of its arrays' names, dtypes, shapes and bytes, the same whichever
format holds them. It is computed once and remembered by the files' path, size, mtime, ctime and inode
(see ``content_digest``).
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import struct
import threading
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tasks.errors import DatasetError

#: the array that holds the labels; every other array of a dataset is a model input
LABELS = "y"
#: rows hashed or checked per step: bounds the memory a pass over a large array takes
CHUNK_BYTES = 64 << 20

NPY_FIX = "convert it to a folder of .npy files (memory-mapped, any size): " + (
    "python -c \"import numpy as n, os, sys; p=sys.argv[1]; d=p[:-4]; os.makedirs(d, exist_ok=True); "
    "z=n.load(p); [n.save(os.path.join(d, k + '.npy'), z[k]) for k in z.files]\" DATA.npz"
)


@dataclass
class Source:
    """The arrays of a dataset, opened but (where the format allows) not read.

    Attributes:
        inputs: input name -> array (a read-only memory map for .npy folders and uncompressed .npz).
        labels: the labels ``y``, or None.
        kind: ``digits``, ``npz``, ``npz-compressed`` or ``npy``.
        path: the file or folder (None for the digits).
        resident_bytes: bytes of the arrays held in memory (not mapped).
    """

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None
    kind: str
    path: Path | None = None
    resident_bytes: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def arrays(self) -> dict[str, np.ndarray]:
        """Every array, inputs first, then the labels."""
        return {**self.inputs, **({LABELS: self.labels} if self.labels is not None else {})}

    @property
    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in self.arrays.values())


def available_memory() -> int:
    """Bytes of memory available to new allocations (MemAvailable of /proc/meminfo), or a large number."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 1 << 50


def _gib(n: float) -> str:
    return f"{n / (1 << 30):.2f} GiB"


def _member_memmap(path: Path, zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> np.ndarray:
    """Memory-map one stored (uncompressed) ``.npy`` member of a zip file."""
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)
        if local[:4] != b"PK\x03\x04":
            raise ValueError(f"bad local header for {info.filename}")
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        start = info.header_offset + 30 + name_len + extra_len
        f.seek(start)
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        offset = f.tell()
    if dtype.hasobject:
        raise ValueError(f"array '{info.filename}' holds Python objects")
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")


def open_npz(path: Path) -> Source:
    """Open a ``.npz``: map its members when stored uncompressed, else read them (if memory allows).

    Raises:
        DatasetError: not an archive, damaged, no input array, or compressed and too large for memory.
    """
    fix = (
        "save it with numpy.savez(path, x=inputs, y=labels): one array per input of the model's forward, named "
        "after its parameter (a single input may be called x), N samples first; or use a folder of .npy files"
    )
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise DatasetError(got=f"{path} ({type(exc).__name__}: {exc})", expected="a readable .npz file", because="the file is not a numpy archive or is damaged", fix=fix) from exc
    with zf:
        members = [i for i in zf.infolist() if i.filename.endswith(".npy")]
        names = [i.filename[: -len(".npy")] for i in members]
        if not [n for n in names if n != LABELS]:
            raise DatasetError(got=f"arrays {sorted(names)} in {path}", expected="at least one input array besides the labels 'y' (e.g. 'x')", because="trtflow feeds the model from the arrays other than y", fix=fix)
        compressed = any(i.compress_type != zipfile.ZIP_STORED for i in members)
        size = sum(i.file_size for i in members)
        if compressed and size > 0.5 * available_memory():
            raise DatasetError(
                got=f"a compressed .npz ({path.name}) of {_gib(size)} uncompressed",
                expected=f"a dataset that fits in memory ({_gib(available_memory())} available) or one that can be memory-mapped",
                because="a compressed .npz must be decompressed into memory; an uncompressed .npz (numpy.savez) or a .npy folder is read row by row",
                fix=NPY_FIX,
            )
        arrays: dict[str, np.ndarray] = {}
        try:
            for info, name in zip(members, names):
                if info.compress_type == zipfile.ZIP_STORED:
                    arrays[name] = _member_memmap(path, zf, info)
                else:
                    with zf.open(info) as f:
                        arrays[name] = np.lib.format.read_array(f, allow_pickle=False)
        except (ValueError, OSError, EOFError, struct.error) as exc:
            objects = "Python objects" in str(exc) or "allow_pickle" in str(exc)
            summary = (
                f"{path.name}: {str(exc).split(' holds')[0] if ' holds' in str(exc) else 'an array'} is an object array (dtype=object); save one numeric array each, e.g. numpy.stack(...)"
                if objects else f"{path.name} is damaged ({type(exc).__name__}); write it again with numpy.savez"
            )
            raise DatasetError(got=f"{path} ({type(exc).__name__}: {exc})", expected="arrays of numbers in a readable .npz", because="the archive is damaged or holds Python objects (dtype=object), which trtflow never unpickles (allow_pickle=False)", fix=fix, summary=summary) from exc
    labels = arrays.pop(LABELS, None)
    resident = sum(int(a.nbytes) for a in [*arrays.values(), *([labels] if labels is not None else [])] if not isinstance(a, np.memmap))
    return Source(arrays, labels, "npz-compressed" if compressed else "npz", path, resident)


def open_npy_folder(path: Path) -> Source:
    """Memory-map every ``<name>.npy`` of a folder; ``y.npy`` holds the labels.

    Inputs are ordered by file name (the first one fills the factory's ``in_channels``/``input_shape``).

    Raises:
        DatasetError: no .npy files, or one that cannot be mapped.
    """
    files = sorted(p for p in path.iterdir() if p.suffix == ".npy" and p.is_file())
    fix = "pass --dataset a .npz file, or a folder with one file per array: numpy.save(folder / 'x.npy', x) and numpy.save(folder / 'y.npy', labels)"
    if not [p for p in files if p.stem != LABELS]:
        raise DatasetError(got=f"folder {path} without input .npy files", expected="one <input>.npy per model input, and y.npy for the labels", because="a folder dataset is read from its .npy files", fix=fix)
    arrays: dict[str, np.ndarray] = {}
    for p in files:
        try:
            arrays[p.stem] = np.load(p, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise DatasetError(got=f"{p} ({type(exc).__name__}: {str(exc)[:200]})", expected="a numeric .npy file", because="it cannot be memory-mapped (damaged, or Python objects, which trtflow never unpickles: allow_pickle=False)", fix=fix) from exc
    labels = arrays.pop(LABELS, None)
    if labels is not None:
        labels = np.asarray(labels)  # one int per sample: small, read once
    return Source(arrays, labels, "npy", path, int(labels.nbytes) if labels is not None else 0)


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


def open_source(path: Path | None) -> Source:
    """Open a dataset: None for the bundled digits, a ``.npz`` file, or a folder of ``.npy`` files.

    Raises:
        DatasetError: missing, unreadable, or not one of those formats.
    """
    if path is None:
        x, y = digits_dataset()
        return Source({"x": x}, y, "digits", None, int(x.nbytes + y.nbytes))
    from tasks.paths import file_problem

    path = Path(path).expanduser()
    problem = file_problem(path, folder_ok=True)
    if problem is not None:
        fix = "check --dataset, or omit it to use the bundled digits"
        if "pipe" in problem or "device" in problem or "socket" in problem:
            fix = "write the data to a file first (numpy.savez(path, x=..., y=...)) and pass that file with --dataset"
        elif "loop" in problem or "symbolic link" in problem:
            fix = f"point --dataset at the real file (ls -l {path} shows where the link goes)"
        raise DatasetError(got=f"dataset path {path}", expected="an existing .npz file or a folder of .npy files", because=f"it {problem}", fix=fix,
                           summary=f"dataset path {path} {problem.split(':')[0]}; {fix}")
    if path.is_dir():
        return open_npy_folder(path)
    try:
        with open(path, "rb") as f:
            magic = f.read(6)
    except OSError as exc:
        raise DatasetError(got=f"dataset path {path} ({exc.strerror})", expected="a readable .npz file", because="the file cannot be read", fix="check its permissions") from exc
    if magic.startswith(b"\x93NUMPY"):
        raise DatasetError(got=f"{path}, a single array written by numpy.save (.npy)", expected="a .npz archive, or a folder holding one .npy per input and y.npy", because="trtflow needs the inputs and their labels by name", fix="put it in a folder as x.npy beside y.npy and pass the folder, or save both with numpy.savez")
    if not magic.startswith(b"PK"):
        raise DatasetError(got=f"{path}, which is not a numpy archive (a .npz is a zip file; this one starts with {magic!r})", expected="a .npz file", because="trtflow reads datasets with numpy.load, without unpickling", fix="save it with numpy.savez(path, x=inputs, y=labels)")
    return open_npz(path)


def labels_in(path: Path) -> bool:
    """Whether a dataset holds labels ``y`` (reads only the archive's table of contents or the folder)."""
    path = Path(path).expanduser()
    if path.is_dir():
        return (path / f"{LABELS}.npy").is_file()
    try:
        with zipfile.ZipFile(path) as z:
            return f"{LABELS}.npy" in z.namelist()
    except Exception:
        return True  # unreadable: the data stage names the problem


def release(a: np.ndarray) -> None:
    """Unmap the pages of a memory-mapped array that this process has touched (``MADV_DONTNEED``).

    They stay in the page cache (the next read is as fast), but leave this process's resident set:
    without this, every row ever read from a mapped dataset counts in RSS until the process ends, and
    a pass over 12 GiB shows as 12 GiB resident. A no-op for arrays in memory.
    """
    mm = getattr(a, "_mmap", None)
    advice = getattr(mmap, "MADV_DONTNEED", None)
    if mm is None or advice is None:
        return
    try:
        mm.madvise(advice)
    except (ValueError, OSError):
        pass  # a closed mapping or a platform without madvise: only memory accounting is affected


def iter_chunks(a: np.ndarray, chunk_bytes: int | None = None) -> Any:
    """Yield consecutive row blocks of ``a`` of about ``chunk_bytes`` each (default ``CHUNK_BYTES``; each
    read once; a mapped block's pages are released after use)."""
    chunk_bytes = chunk_bytes or CHUNK_BYTES
    row = max(1, int(a.nbytes // max(len(a), 1)))
    step = max(1, chunk_bytes // row)
    for i in range(0, len(a), step):
        yield a[i : i + step]
        release(a)


def _digest_arrays(arrays: Mapping[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name, a in arrays.items():
        h.update(json.dumps([name, a.dtype.str, list(a.shape)]).encode())
        for block in iter_chunks(a):
            h.update(np.ascontiguousarray(block).data)
    return h.hexdigest()


def identity(path: Path) -> list[Any]:
    """What ``content_digest`` trusts: each file's resolved path, size, mtime (ns), ctime (ns) and inode.

    The ctime (inode change time) is what makes this safe against an in-place rewrite whose mtime was
    set back (``os.utime``): any write or ``utime`` sets it to now, and no user call can set it back.
    """
    files = sorted(p for p in path.iterdir() if p.suffix == ".npy") if path.is_dir() else [path]
    out = []
    for p in files:
        st = p.stat()
        out.append([str(p.resolve()), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino])
    return out


def _cache_file() -> Path:
    from tasks.code_digests import cache_dir

    return cache_dir() / "dataset-digests.json"


_MEMO: dict[str, tuple[Any, str]] = {}
_MEMO_LOCK = threading.Lock()


def content_digest(path: Path | None, source: Source | None = None) -> str:
    """The dataset's digest: SHA-256 over each array's name, dtype, shape and bytes (inputs, then y).

    The same arrays give the same digest in a ``.npz`` or a ``.npy`` folder. Hashing reads every byte
    once (in ``CHUNK_BYTES`` blocks); the result is remembered in ``~/.cache/trtflow/dataset-digests.json``
    (``TRTFLOW_CACHE_DIR`` moves it) under the files' resolved path, size, mtime, ctime and inode, and
    reused while those are unchanged. Any write, copy, replacement or ``os.utime`` changes the ctime,
    which only the kernel sets: the memo trusts the file system's clock, not the user.
    """
    if path is None:
        return _digest_arrays((source or open_source(None)).arrays)
    path = Path(path).expanduser()
    ident = identity(path)
    key = json.dumps(ident[0][0] if not path.is_dir() else str(path.resolve()))
    with _MEMO_LOCK:
        hit = _MEMO.get(key)
        if hit and hit[0] == ident:
            return hit[1]
        cache = _cache_file()
        try:
            stored = json.loads(cache.read_text())
        except (OSError, ValueError):
            stored = {}
        entry = stored.get(key)
        if isinstance(entry, dict) and entry.get("identity") == ident and isinstance(entry.get("digest"), str):
            _MEMO[key] = (ident, entry["digest"])
            return entry["digest"]
    digest = _digest_arrays((source or open_source(path)).arrays)
    with _MEMO_LOCK:
        _MEMO[key] = (ident, digest)
        try:
            stored = json.loads(cache.read_text()) if cache.is_file() else {}
        except (OSError, ValueError):
            stored = {}
        stored[key] = {"identity": ident, "digest": digest}
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(stored))
            os.replace(tmp, cache)
        except OSError:
            pass  # only a cache: the digest is recomputed next time
    return digest
