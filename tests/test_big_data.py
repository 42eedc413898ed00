"""Datasets bigger than memory: mapped formats, splits as indices, bounded reads, the memory plan.

    pytest tests/test_big_data.py -q

Small data everywhere: what is checked is *how* the data is read (mapped, by rows, digests), the
speed and memory curve is benchmarks/scale.py's job.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import _pipeline_kit as kit
import tasks.data
import tasks.datasource
from tasks.config import BatchProfile, CollapseGate, DataConfig, Precision, TrainConfig
from tasks.data import SPLITS_FILE, source_of, split_inputs, splits_from_dataset
from tasks.datasource import content_digest, open_source
from tasks.errors import ArtifactError, ConfigError, DatasetError


@pytest.fixture(autouse=True)
def _private_digest_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRTFLOW_CACHE_DIR", str(tmp_path / "cache"))
    tasks.datasource._MEMO.clear()


def _arrays(n: int = 200) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    y = np.arange(n) % 4
    x = rng.normal(size=(n, 3, 8, 8)).astype(np.float32)
    x[:, 0, 0, :4] += 3 * np.eye(4, dtype=np.float32)[y]
    return {"x": x, "y": y}


def _write(kind: str, folder: Path, arrays: dict[str, np.ndarray]) -> Path:
    if kind == "npy":
        folder.mkdir(parents=True)
        for k, v in arrays.items():
            np.save(folder / f"{k}.npy", v)
        return folder
    path = folder.with_suffix(".npz")
    (np.savez_compressed if kind == "compressed" else np.savez)(path, **arrays)
    return path


def test_each_format_opens_mapped_where_it_can(tmp_path: Path) -> None:
    arrays = _arrays()
    plain = open_source(_write("npz", tmp_path / "plain", arrays))
    folder = open_source(_write("npy", tmp_path / "folder", arrays))
    packed = open_source(_write("compressed", tmp_path / "packed", arrays))
    assert isinstance(plain.inputs["x"], np.memmap) and plain.kind == "npz" and plain.resident_bytes == 0
    assert isinstance(folder.inputs["x"], np.memmap) and folder.kind == "npy"
    assert not isinstance(packed.inputs["x"], np.memmap) and packed.resident_bytes >= arrays["x"].nbytes
    for src in (plain, folder, packed):
        assert np.array_equal(src.inputs["x"], arrays["x"]) and np.array_equal(src.labels, arrays["y"])


def test_mapped_and_in_memory_paths_give_identical_digests(tmp_path: Path) -> None:
    """The same arrays as a compressed .npz (read into memory), an uncompressed .npz and a .npy folder
    (both mapped): the same split files, the same trained model, byte for byte."""
    arrays = _arrays()
    refs = {}
    for kind in ("compressed", "npz", "npy"):
        data = _write(kind, tmp_path / kind, arrays)
        cfg = kit.tiny_config(tmp_path / "art", data, train=TrainConfig(epochs=1, batch_size=32, collapse_gate=CollapseGate(enabled=False)), precisions=[Precision.fp32])
        d = splits_from_dataset(cfg.data, cfg.artifacts_dir)
        from tasks.train import checkpoint_from_splits

        refs[kind] = (d, checkpoint_from_splits(d, cfg.train, cfg.artifacts_dir))
    digests = {k: (d.digest, t.digest) for k, (d, t) in refs.items()}
    assert len(set(digests.values())) == 1, digests
    assert len({d.key for d, _ in refs.values()}) == 3  # each format its own data artifact (where to read)
    with np.load(refs["npy"][0].path(SPLITS_FILE)) as z:
        assert sorted(z.files) == ["test", "train", "val"] and z["train"].dtype == np.int64  # indices, no samples


def test_the_digest_is_remembered_while_size_mtime_and_inode_stay(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write("npz", tmp_path / "d", _arrays())
    calls = []
    real = tasks.datasource._digest_arrays
    monkeypatch.setattr(tasks.datasource, "_digest_arrays", lambda a: calls.append(1) or real(a))
    first = content_digest(path)
    tasks.datasource._MEMO.clear()  # a new process: only the cache file remains
    assert content_digest(path) == first and len(calls) == 1
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert content_digest(path) == first and len(calls) == 2  # hashed again after a touch


def test_no_stage_reads_more_rows_than_it_needs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = _write("npy", tmp_path / "d", _arrays(400))
    reads: list[tuple[str, str, int]] = []
    real = tasks.data.split_inputs

    def counted(ref: Any, split: str, rows: Any = None) -> dict[str, np.ndarray]:
        out = real(ref, split, rows)
        reads.append((split, "all" if rows is None else "rows", len(next(iter(out.values())))))
        return out

    monkeypatch.setattr(tasks.data, "split_inputs", counted)
    cfg = kit.tiny_config(
        tmp_path / "art", data, train=TrainConfig(epochs=1, batch_size=32, collapse_gate=CollapseGate(enabled=False)), precisions=[Precision.fp32, Precision.int8],
        batch=BatchProfile(min=1, opt=4, max=16), calibration_samples=24,
    )
    refs = kit.run_plain(cfg)
    assert all(refs[f"verify-{p.value}"].meta["passed"] for p in cfg.precisions)
    assert [r for r in reads if r[1] == "all"] == []  # no stage asks for a whole split at once
    assert max(n for _, _, n in reads) <= 256  # the evaluation batch
    assert max(n for s, _, n in reads if s == "train") <= 32  # training mini-batches (and calibration: 24)


def test_a_dataset_changed_after_the_split_is_refused(tmp_path: Path) -> None:
    arrays = _arrays()
    path = _write("npz", tmp_path / "d", arrays)
    ref = splits_from_dataset(DataConfig(dataset=path), tmp_path / "art")
    tasks.data._SOURCES.clear()
    arrays["x"] = arrays["x"] * 2
    np.savez(path, **arrays)
    with pytest.raises(ArtifactError, match="other content than when it was split") as info:
        split_inputs(ref, "test", slice(0, 2))
    assert "run the same command again" in str(info.value)
    assert source_of(splits_from_dataset(DataConfig(dataset=path), tmp_path / "art")) is not None  # a re-run splits it anew


def test_a_compressed_npz_too_large_for_memory_names_the_conversion(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write("compressed", tmp_path / "big", _arrays())
    monkeypatch.setattr(tasks.datasource, "available_memory", lambda: 100_000)
    with pytest.raises(DatasetError, match="compressed .npz") as info:
        splits_from_dataset(DataConfig(dataset=path), tmp_path / "art")
    assert "n.save(os.path.join(d, k + '.npy'), z[k])" in str(info.value)
    assert zipfile.is_zipfile(path)  # nothing touched


def test_the_memory_plan_refuses_before_training_with_a_batch_that_fits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tasks.train import BASELINE_BYTES, memory_plan, prepare_model

    data = splits_from_dataset(DataConfig(dataset=_write("npy", tmp_path / "d", _arrays())), tmp_path / "art")
    cfg = TrainConfig(batch_size=4096)
    prepared = prepare_model(data, cfg)
    plan = memory_plan(data, cfg, prepared, available=64 << 30)
    assert plan["resident_data"] == 200 * 8 and plan["total"] > BASELINE_BYTES  # only the labels: x is mapped
    tight = int((plan["total"] - plan["train_batch"] + plan["train_batch"] / 8) / 0.9)
    with pytest.raises(ConfigError, match="estimated peak") as info:
        memory_plan(data, cfg, prepared, available=tight)
    fits = int(str(info.value).split("--batch-size ")[1].split()[0].rstrip(";,"))
    assert 1 <= fits < 4096
    memory_plan(data, cfg.model_copy(update={"batch_size": fits}), prepared, available=tight)  # that batch fits
