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


def test_micro_batches_add_up_to_the_whole_batchs_gradients(tmp_path: Path) -> None:
    import torch

    from tasks.models import bind
    from tasks.train import backward_batch, prepare_model

    data = splits_from_dataset(DataConfig(dataset=_write("npy", tmp_path / "d", _arrays())), tmp_path / "art")
    prepared = prepare_model(data, TrainConfig())
    bound = bind(prepared.model, prepared.binding).train()
    labels = torch.from_numpy(np.array(tasks.data.split_labels(data, "train")))
    idx = torch.arange(10)
    for weight in (None, torch.tensor([0.5, 1.0, 2.0, 4.0])):
        loss_fn = torch.nn.CrossEntropyLoss(weight=weight)
        grads, results = [], []
        for micro in (None, 3):
            prepared.model.zero_grad()
            results.append(backward_batch(bound, 0, data, idx, labels, loss_fn, micro))
            grads.append([p.grad.clone() for p in prepared.model.parameters() if p.grad is not None])
        (loss_a, right_a), (loss_b, right_b) = results
        assert loss_b == pytest.approx(loss_a, rel=1e-5) and right_a == right_b
        assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-7) for a, b in zip(*grads, strict=True))


def test_the_memory_plan_splits_a_batch_whose_step_exceeds_the_budget(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from tasks.train import memory_plan, micro_batch, prepare_model, train_model

    data = splits_from_dataset(DataConfig(dataset=_write("npy", tmp_path / "d", _arrays())), tmp_path / "art")
    cfg = TrainConfig(batch_size=64, epochs=1, step_memory_mib=1)
    prepared = prepare_model(data, cfg)
    per = 3 * (1 << 20) // 8  # 3/8 MiB a sample: 2 rows fit in 1 MiB
    assert micro_batch(64, per, 1) == 2 and micro_batch(64, per, 0) == 64 and micro_batch(2, per, 1) == 2
    with caplog.at_level("INFO", logger="trtflow.train"):
        plan = memory_plan(data, cfg.model_copy(update={"step_memory_mib": 0}), prepared, available=64 << 30)
        assert plan["micro_batch"] == 64
        tiny = plan["activation_per_sample"] * 3 * 16 >> 20  # room for about 16 rows
        plan = memory_plan(data, cfg.model_copy(update={"step_memory_mib": max(tiny, 1)}), prepared, available=64 << 30)
    assert 1 <= plan["micro_batch"] < 64 and "micro-batches" in caplog.text
    model, history = train_model(data, cfg, prepared, progress=False, micro=plan["micro_batch"])
    assert len(history) == 1 and np.isfinite(history[0]["train_loss"])


def test_engine_batches_are_fitted_to_memory_on_the_cpu_only() -> None:
    from types import SimpleNamespace

    from tasks.config import Backend
    from tasks.engine import batch_for_memory

    def ckpt(per_sample_mib: float) -> Any:
        return SimpleNamespace(digest=str(per_sample_mib), meta={"memory_plan": {"activation_per_sample": int(per_sample_mib * (1 << 20))}})

    profile = BatchProfile()  # 1/32/256, 512 MiB
    assert batch_for_memory(profile, Backend.onnxruntime, ckpt(0.01)) == profile  # small samples: kept
    fitted = batch_for_memory(profile, Backend.onnxruntime, ckpt(27))  # 256x256 images: 18 rows fit
    assert (fitted.min, fitted.opt, fitted.max) == (1, 16, 16)
    assert batch_for_memory(profile, Backend.onnxruntime, ckpt(4000)).max == 1  # never below min
    assert batch_for_memory(BatchProfile(min=4, opt=8, max=64), Backend.onnxruntime, ckpt(1000)).max == 4
    off = profile.model_copy(update={"cpu_memory_mib": 0})
    assert batch_for_memory(off, Backend.onnxruntime, ckpt(27)) == off
    assert batch_for_memory(profile, Backend.tensorrt, ckpt(27)) == profile  # device memory: kept
    assert batch_for_memory(profile, Backend.onnxruntime, SimpleNamespace(digest="old", meta={})) == profile


def test_the_range_check_reads_a_mapped_input_block_by_block(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tasks.data import check_value_range

    arrays = _arrays(64)
    arrays["x"][-1, 0, 0, 0] = 1e9  # in the last row: every block is read
    source = open_source(_write("npy", tmp_path / "d", arrays))
    released: list[int] = []
    real = tasks.datasource.release
    monkeypatch.setattr(tasks.datasource, "release", lambda a: (released.append(len(a)), real(a)))
    with pytest.raises(DatasetError, match="values from"):
        check_value_range(source.inputs["x"], "d", "x")
    assert released  # the mapped pages leave the process after each block (a 2.2 GiB .npz reached 2.8 GiB before)


def test_a_dataset_rewritten_in_place_with_its_mtime_set_back_is_not_cached(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Same size, same inode, mtime restored with os.utime: only the ctime tells, and it does."""
    import logging

    from tasks.stage import was_cached

    arrays = _arrays()
    path = _write("npz", tmp_path / "d", arrays)
    cfg = DataConfig(dataset=path)
    first = splits_from_dataset(cfg, tmp_path / "art")
    before = path.stat()
    at = path.read_bytes().find(arrays["x"].tobytes()[:64])
    assert at > 0
    with open(path, "r+b") as f:  # a NaN written over the first float of x, in place
        f.seek(at)
        f.write(np.array([np.nan], dtype=np.float32).tobytes())
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_ino, after.st_mtime_ns) == (before.st_size, before.st_ino, before.st_mtime_ns)
    assert after.st_ctime_ns != before.st_ctime_ns
    with caplog.at_level(logging.INFO, logger="trtflow"), pytest.raises(DatasetError, match="NaN"):
        splits_from_dataset(cfg, tmp_path / "art")
    assert not was_cached()
    assert "data: d.npz changed" in caplog.messages
    with pytest.raises(ArtifactError, match="other content"):  # nor is the earlier split read against it
        split_inputs(first, "train", slice(0, 2))


def test_the_digest_changes_with_dtype_and_with_shape_for_the_same_bytes(tmp_path: Path) -> None:
    raw = np.arange(48, dtype=np.float32)
    variants = {
        "float32 12x4": raw.reshape(12, 4),
        "int32 12x4": raw.view(np.int32).reshape(12, 4),
        "float32 6x8": raw.reshape(6, 8),
        "float32 24x2": raw.reshape(24, 2),
    }
    # The same labels beside each x: only x's dtype or shape differs, never a byte.
    digests = {k: content_digest(_write("npy", tmp_path / k.replace(" ", "-"), {"x": v, "y": np.zeros(4, np.int64)})) for k, v in variants.items()}
    assert len(set(digests.values())) == len(variants), digests


@pytest.mark.parametrize("fault", ["nan", "huge", "only-the-last-block-differs"])
def test_a_check_over_a_mapped_input_visits_every_block(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fault: str) -> None:
    """Blocks of 1 KiB over a mapped input of 64 rows of 768 bytes: a fault only in the last block is found."""
    monkeypatch.setattr(tasks.datasource, "CHUNK_BYTES", 1024)
    arrays = _arrays(64)
    row = arrays["x"][0].nbytes
    assert len(arrays["x"]) * row > 8 * 1024  # many blocks
    if fault == "only-the-last-block-differs":
        arrays["x"][:] = 0.5
        arrays["x"][-1, 0, 0, 0] = 1.0  # samples that differ, in the last block only: not 'identical'
    else:
        arrays["x"][-1, 2, 7, 7] = np.nan if fault == "nan" else 1e9
    source = open_source(_write("npy", tmp_path / "d", arrays))
    assert isinstance(source.inputs["x"], np.memmap)
    if fault == "only-the-last-block-differs":
        tasks.data.check_dataset(source.inputs, source.labels, "d")
        return
    with pytest.raises(DatasetError, match="NaN or inf values in 1 sample" if fault == "nan" else "values from"):
        tasks.data.check_dataset(source.inputs, source.labels, "d")
