"""flows/ui.py: confusion matrix, figures as PNG and as data-URI markdown, progress outside a run."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest

from flows.ui import Progress, confusion_matrix, confusion_matrix_png, image_markdown, publish_figures, saved_confusion, training_curve_png

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_confusion_matrix_counts_true_by_predicted() -> None:
    m = confusion_matrix([0, 1, 1, 2, 2, 2], [0, 1, 0, 2, 2, 1], num_classes=3)
    assert m.tolist() == [[1, 0, 0], [1, 1, 0], [0, 1, 2]]
    assert m.sum() == 6 and np.trace(m) == 4
    assert confusion_matrix([], [], num_classes=2).tolist() == [[0, 0], [0, 0]]


def test_confusion_matrix_rejects_bad_labels() -> None:
    with pytest.raises(ValueError, match="same number"):
        confusion_matrix([0, 1], [0], num_classes=2)
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix([0, 2], [0, 1], num_classes=2)


def test_figures_are_pngs_and_embed_as_data_uris(tmp_path: Path) -> None:
    history = [{"epoch": e, "train_loss": 1 / e, "train_acc": 0.5 + e / 10, "val_loss": 1.1 / e, "val_acc": 0.45 + e / 10} for e in (1, 2, 3)]
    curve = training_curve_png(history, tmp_path / "r" / "curve.png")
    cm = confusion_matrix_png({"fp32": np.eye(3, dtype=np.int64) * 5, "int8": np.ones((3, 3), dtype=np.int64)}, tmp_path / "cm.png")
    for png in (curve, cm):
        assert png.read_bytes().startswith(PNG_MAGIC) and png.stat().st_size > 1000
    md = image_markdown(curve, "Training curve", "3 epochs")
    assert md.startswith("## Training curve\n")
    uri = md.split("](data:image/png;base64,", 1)[1].split(")", 1)[0]
    assert base64.b64decode(uri) == curve.read_bytes()
    assert md.rstrip().endswith("3 epochs")


def test_progress_is_a_no_op_outside_a_flow_run() -> None:
    p = Progress(4)
    assert p.id is None
    for stage in ("data", "train", "export", "validate", "extra"):
        p.step(stage)
    assert p.done == 4  # never above the total
    p.expect(12)
    assert p.total == 12


def test_publish_figures_draws_from_saved_verification_without_running_an_engine(trained, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from tasks.backends.base import BaseRunner
    from tasks.config import Backend, BatchProfile, Precision, default_tolerances
    from tasks.engine import engine_from_variant
    from tasks.precision import variant_from_onnx
    from tasks.verify import verification_of_engine

    root = trained.root
    batch = BatchProfile(min=1, opt=8, max=64)
    variant = variant_from_onnx(trained.onnx, trained.data, Precision.fp32, 16, root)
    engine = engine_from_variant(variant, Backend.onnxruntime, batch, trained.config.engine.model_dump(), root)
    verified = verification_of_engine(engine, trained.checkpoint, trained.data, Precision.fp32, default_tolerances()[Precision.fp32], batch, root)
    saved = saved_confusion(verified)
    assert saved is not None
    m, acc = saved
    assert m.sum() == trained.data.meta["sizes"]["test"]
    assert 0 <= acc <= 1 and abs(np.trace(m) / m.sum() - acc) < 1e-9
    assert acc == verified.meta["accuracy"]

    def no_inference(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("the UI layer ran an engine")

    monkeypatch.setattr(BaseRunner, "activate", no_inference)
    (root / "reports" / ".figures.json").unlink(missing_ok=True)
    out = publish_figures(root, {"train": trained.checkpoint}, {"fp32": verified})
    assert out == {"training-curve": "reports/training-curve.png", "confusion-matrix": "reports/confusion-matrix.png"}
    assert (root / out["confusion-matrix"]).read_bytes().startswith(PNG_MAGIC)
    history = json.loads(trained.checkpoint.path("history.json").read_text())
    assert len(history) == trained.config.train.epochs


def test_publish_figures_never_fails_the_run(tmp_path: Path, trained) -> None:  # type: ignore[no-untyped-def]
    class Broken:
        meta: dict[str, object] = {}
        digest = "0" * 64

        def path(self, name: str) -> Path:
            return tmp_path / "missing" / name

    # A missing history and an unreadable verification: logged and skipped, nothing raised.
    assert publish_figures(tmp_path, {"train": Broken()}, {"fp32": Broken()}) == {}


def test_the_bar_never_moves_back_while_branches_report_concurrently(monkeypatch):
    import uuid

    import prefect.artifacts

    from flows import ui

    bar = ui.Progress(10)  # outside a flow run: no artifact yet
    shown: list[float] = []
    monkeypatch.setattr(ui, "_in_flow_run", lambda: True)
    monkeypatch.setattr(prefect.artifacts, "update_progress_artifact", lambda _id, progress, description: shown.append(progress))
    bar.id, bar.done = uuid.uuid4(), 4
    for fraction in (0.5, 0.2, 0.7, 0.1):  # verify-fp16 ahead of verify-int8
        bar.within_stage("verify", fraction, "")
    assert bar.flush(30)
    # Sent in the background, latest first (some may be dropped): never backwards, ending at the furthest.
    assert shown and shown == sorted(shown) and shown[-1] == 47.0 and set(shown) <= {45.0, 47.0}, shown


def test_the_bar_shows_the_planned_total_before_the_first_stage_ends(monkeypatch):
    import uuid

    import prefect.artifacts

    from flows import ui

    bar = ui.Progress()  # made before the scheduler knows the plan's size
    shown: list[str] = []
    monkeypatch.setattr(prefect.artifacts, "update_progress_artifact", lambda _id, progress, description: shown.append(description))
    bar.id = uuid.uuid4()
    bar.expect(19)
    assert bar.flush(30) and shown == ["0/19 stages"]
    bar.expect(19)  # unchanged: nothing sent
    bar.done = 1
    bar.expect(23)  # a stage has ended: the next step shows the new total
    assert bar.flush(30) and shown == ["0/19 stages"] and bar.total == 23


def test_the_ui_shows_the_bundle_as_a_link_with_the_choice_and_its_reason(prefect_harness) -> None:  # type: ignore[no-untyped-def]
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
    from prefect.context import FlowRunContext

    from flows.report import summary_markdown
    from flows.ui import publish_links

    reason = "fastest: fp32 has the highest throughput at batch 64 of the variants that passed (samples/s: fp32 900); not passed: int8"
    report = {
        "model": {"onnx": "export/k/model.onnx", "opset": 20, "checkpoint": "train/k/model.pt", "factory": "f", "val_acc": 0.9},
        "precisions": {"fp32": {"engine": "build/k/engine.onnx", "engine_sha256": "a" * 64, "backend": "onnxruntime"}},
        "bundle": {"path": "bundle", "name": "default_model", "precision": "fp32", "backend": "onnxruntime", "platform": "onnxruntime_onnx", "policy": "fastest",
                   "reason": reason, "config": "bundle/model_repository/default_model/config.pbtxt", "model_file": "bundle/model_repository/default_model/1/model.onnx", "model_sha256": "b" * 64},
    }

    @flow
    def show() -> str:
        publish_links(report)
        ctx = FlowRunContext.get()
        assert ctx is not None and ctx.flow_run is not None
        return str(ctx.flow_run.id)

    run_id = show()
    with get_client(sync_client=True) as client:
        arts = {a.key: a for a in client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])))}
    card = str(arts["trtflow-bundle"].data)
    assert "bundle/bundle.json" in card and "fp32 shipped as Triton model 'default_model'" in card and reason in card
    verified = {"passed": True, "accuracy_reference": 0.9, "accuracy": 0.9, "top1_agreement": 1.0, "min_cosine": 1.0, "max_abs": 0.0, "engine": "build/k/engine.onnx"}
    summary = summary_markdown({**report, "precisions": {"fp32": verified}, "passed": True, "backend": "b", "data": {"source": "s", "sizes": {}}})
    assert "## Bundle" in summary and f"Shipped **fp32** (onnxruntime) as Triton model `default_model` in `bundle/`: {reason}." in summary
    assert "trtflow check-bundle bundle" in summary


def test_a_runs_progress_bar_stops_mirroring_stage_progress_when_it_closes(monkeypatch):
    """A flow run's bar receives stage progress while the run lasts, never afterwards (a later run or
    plain stage call in the same process would otherwise report into a finished run)."""
    import prefect.artifacts

    import flows.ui as ui
    import tasks.progress as progress

    monkeypatch.setattr(ui, "_in_flow_run", lambda: True)
    monkeypatch.setattr(ui, "drop_earlier_attempts", lambda: 0)
    monkeypatch.setattr(prefect.artifacts, "create_progress_artifact", lambda **_: "artifact-id")
    before = progress.set_sink(None)
    try:
        bar = Progress(3)
        assert progress._sink == bar.within_stage
        bar.close()
        assert progress._sink is None
        bar.close()  # twice is harmless
        assert progress._sink is None
    finally:
        progress.set_sink(before)
