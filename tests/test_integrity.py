"""Artifact integrity: a changed, truncated or deleted file (or manifest) is detected before use and the
stage that made it runs again; a damaged ONNX, engine, checkpoint or split file is never loaded.

    pytest tests/test_integrity.py -q
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import _pipeline_kit as kit
from tasks.artifacts import MANIFEST, ArtifactRef, load_ref, sha256_file
from tasks.errors import ArtifactError, VerificationError


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> kit.Good:
    return kit.good_run(tmp_path_factory)


def _in(root: Path, ref: ArtifactRef) -> ArtifactRef:
    """The same artifact, read from the copy under ``root``."""
    got = load_ref(root, ref.stage, ref.key)
    assert got is not None
    return got


def damage(path: Path, how: str) -> None:
    """Truncate, flip one byte, append one byte, or delete a file."""
    if how == "delete":
        path.unlink()
        return
    data = bytearray(path.read_bytes())
    if how == "truncate":
        data = data[: len(data) // 2]
    elif how == "flip":
        data[len(data) // 2] ^= 0x01
    elif how == "append":
        data += b"\n"
    path.write_bytes(bytes(data))


CASES = [
    ("data", "splits.npz", "truncate"),
    ("train", "model.pt", "flip"),
    ("export", "model.onnx", "delete"),
    ("export", "model.onnx", "flip"),
    ("validate", "validation.json", "append"),
    ("precision-int8", "model.onnx", "truncate"),
    ("build-fp32", "engine.onnx", "flip"),
    ("verify-fp32", "verification.json", "delete"),
]


@pytest.mark.parametrize(("name", "file", "how"), CASES)
def test_damaged_artifact_is_detected_and_its_stage_reruns(good: kit.Good, tmp_path: Path, name: str, file: str, how: str) -> None:
    root = kit.clone(good.root, tmp_path / "artifacts")
    ref = _in(root, good.refs[name])
    damage(ref.path(file), how)

    assert ref.problems() and file in ref.problems()[0]
    with pytest.raises(ArtifactError, match="digest mismatch|missing"):
        ref.verify()

    refs = kit.run_plain(kit.with_root(good.config, root))

    assert kit.digests(refs) == good.digests
    assert all(r.problems() == [] for r in refs.values())
    assert kit.leftovers(root) == []


def _forbid(monkeypatch: pytest.MonkeyPatch, target: Any, name: str) -> list[Any]:
    calls: list[Any] = []
    monkeypatch.setattr(target, name, lambda *a, **k: calls.append(a) or pytest.fail(f"{name} was called on a damaged artifact"))
    return calls


def _load_sites() -> dict[str, tuple[str, str, Callable[[dict[str, ArtifactRef], Path, pytest.MonkeyPatch, kit.Good], Any]]]:
    """Each load site: the artifact it reads, the file to damage, and a call that must refuse it."""
    from tasks.backends.onnxruntime import OnnxRuntimeBuilder
    from tasks.config import Backend, Precision
    from tasks.data import load_splits
    from tasks.engine import engine_from_variant, runner_from_build
    from tasks.precision import variant_from_onnx
    from tasks.inference import module_from_checkpoint
    from tasks.validate import validated_onnx
    from tasks.verify import verification_of_engine

    def checkpoint(r: dict[str, ArtifactRef], root: Path, mp: pytest.MonkeyPatch, g: kit.Good) -> Any:
        import torch

        _forbid(mp, torch, "load")
        return module_from_checkpoint(r["train"])

    def splits(r: dict[str, ArtifactRef], root: Path, mp: pytest.MonkeyPatch, g: kit.Good) -> Any:
        _forbid(mp, np, "load")
        return load_splits(r["data"])

    def runner(r: dict[str, ArtifactRef], root: Path, mp: pytest.MonkeyPatch, g: kit.Good) -> Any:
        _forbid(mp, OnnxRuntimeBuilder, "runner_from_engine")
        return runner_from_build(r["build-fp32"])

    def validate(r: dict[str, ArtifactRef], root: Path, mp: pytest.MonkeyPatch, g: kit.Good) -> Any:
        import tasks.validate

        _forbid(mp, tasks.validate, "check_onnx")
        return validated_onnx(r["export"], r["data"], root, refresh=True)

    def precision(r: dict[str, ArtifactRef], root: Path, mp: pytest.MonkeyPatch, g: kit.Good) -> Any:
        return variant_from_onnx(r["export"], r["data"], Precision.fp16, 8, root, refresh=True)

    def build(r: dict[str, ArtifactRef], root: Path, mp: pytest.MonkeyPatch, g: kit.Good) -> Any:
        _forbid(mp, OnnxRuntimeBuilder, "engine_from_onnx")
        return engine_from_variant(r["precision-fp32"], Backend.onnxruntime, g.config.batch, g.config.engine.model_dump(), root, refresh=True)

    def verify(r: dict[str, ArtifactRef], root: Path, mp: pytest.MonkeyPatch, g: kit.Good) -> Any:
        _forbid(mp, OnnxRuntimeBuilder, "runner_from_engine")
        p = Precision.fp32
        return verification_of_engine(r["build-fp32"], r["train"], r["data"], p, g.config.tolerance(p), g.config.batch, root, refresh=True)

    return {
        "checkpoint": ("train", "model.pt", checkpoint),
        "splits": ("data", "splits.npz", splits),
        "runner": ("build-fp32", "engine.onnx", runner),
        "validate": ("export", "model.onnx", validate),
        "precision": ("export", "model.onnx", precision),
        "build": ("precision-fp32", "model.onnx", build),
        "verify": ("build-fp32", "engine.onnx", verify),
    }


@pytest.mark.parametrize("site", ["checkpoint", "splits", "runner", "validate", "precision", "build", "verify"])
def test_every_load_site_refuses_a_damaged_file_before_reading_it(
    good: kit.Good, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, site: str
) -> None:
    name, file, call = _load_sites()[site]
    root = kit.clone(good.root, tmp_path / "artifacts")
    refs = {k: _in(root, v) for k, v in good.refs.items()}
    damage(refs[name].path(file), "flip")

    with pytest.raises(ArtifactError, match="digest mismatch"):
        call(refs, root, monkeypatch, good)
    assert kit.leftovers(root) == []


# --- the manifest itself ------------------------------------------------------------------------


def _edit_manifest(ref: ArtifactRef, edit: Callable[[dict[str, Any]], None]) -> None:
    path = ref.dir / MANIFEST
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))


@pytest.mark.parametrize(
    "how",
    ["garbled", "digest edited", "file list emptied", "key edited", "stage edited"],
)
def test_a_tampered_manifest_is_not_trusted_and_the_stage_reruns(good: kit.Good, tmp_path: Path, how: str) -> None:
    root = kit.clone(good.root, tmp_path / "artifacts")
    ref = _in(root, good.refs["precision-fp32"])
    if how == "garbled":
        (ref.dir / MANIFEST).write_text('{"stage": "precision", "files": {')
    elif how == "digest edited":
        _edit_manifest(ref, lambda d: d["files"].update({"model.onnx": "0" * 64}))
    elif how == "file list emptied":
        # An empty file list would verify trivially; the stage's own consumer needs model.onnx.
        _edit_manifest(ref, lambda d: d.update(files={}))
    elif how == "key edited":
        _edit_manifest(ref, lambda d: d.update(key="f" * 64))
    else:
        _edit_manifest(ref, lambda d: d.update(stage="build"))

    loaded = load_ref(root, ref.stage, ref.key)
    if how == "file list emptied":
        assert loaded is not None
        with pytest.raises(ArtifactError, match="no such file"):
            loaded.path("model.onnx")
    else:
        assert loaded is None or loaded.problems()

    refs = kit.run_plain(kit.with_root(good.config, root), refresh=("precision",) if how == "file list emptied" else ())
    assert kit.digests(refs) == good.digests


def test_a_manifest_cannot_point_outside_its_folder(good: kit.Good, tmp_path: Path) -> None:
    root = kit.clone(good.root, tmp_path / "artifacts")
    ref = _in(root, good.refs["build-fp32"])
    secret = tmp_path / "elsewhere.onnx"
    secret.write_bytes(b"not yours")
    forged = ref.model_copy(update={"files": {**ref.files, "../../../elsewhere.onnx": sha256_file(secret)}})
    with pytest.raises(ArtifactError, match="no such file"):
        forged.path("../../../elsewhere.onnx")


def test_a_moved_artifacts_folder_never_reads_the_old_place(good: kit.Good, tmp_path: Path) -> None:
    first = kit.clone(good.root, tmp_path / "first")
    moved = tmp_path / "moved"
    first.rename(moved)
    ref = load_ref(moved, "train", good.refs["train"].key)
    assert ref is not None and ref.dir == moved / "train" / good.refs["train"].key[:16]
    assert ref.problems() == []


def _scale_weights(path: Path) -> None:
    """Rewrite an ONNX file with its largest float weight tripled: still a valid model, other outputs."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    floats = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT]
    target = max(floats, key=lambda t: int(np.prod(t.dims)))
    target.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(target) * 3, target.name))
    onnx.save(model, str(path))


@pytest.mark.parametrize(("name", "file"), [("export", "model.onnx"), ("precision-fp32", "model.onnx"), ("build-fp32", "engine.onnx")])
def test_a_consistent_forgery_of_an_onnx_file_fails_verification(good: kit.Good, tmp_path: Path, name: str, file: str) -> None:
    """File and manifest digest both rewritten: the digest cannot tell, but nothing downstream is reused
    (its key includes the new digest) and verification against PyTorch catches the changed outputs."""
    root = kit.clone(good.root, tmp_path / "artifacts")
    ref = _in(root, good.refs[name])
    _scale_weights(ref.path(file))
    _edit_manifest(ref, lambda d: d["files"].update({file: sha256_file(ref.path(file))}))

    cfg = kit.with_root(good.config, root).model_copy(update={"precisions": [kit.Precision.fp32]})
    with pytest.raises(VerificationError, match="fp32"):
        kit.run_plain(cfg)


# --- the Prefect path ---------------------------------------------------------------------------


def test_the_prefect_task_reruns_a_stage_whose_artifact_was_damaged_and_keeps_no_cache_of_its_own(
    prefect_harness: None, good: kit.Good, tmp_path: Path
) -> None:
    from flows.pipeline import TASKS

    root = tmp_path / "artifacts"
    task = TASKS["data"].with_options(retry_delay_seconds=0)
    cfg = good.config.data

    first = task(cfg, root, return_state=True)
    assert first.is_completed() and first.name != "Cached"
    assert task(cfg, root, return_state=True).name == "Cached"

    ref = first.result()
    ref.path("splits.npz").unlink()
    again = task(cfg, root, return_state=True)
    assert again.name != "Cached" and again.result().problems() == []
    # The artifact store is the only cache: Prefect wrote no result records anywhere under it.
    assert not list(root.rglob(".prefect"))
    shutil.rmtree(root)
