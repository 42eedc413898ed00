import json

import numpy as np
import pytest

from tasks.config import Backend, BatchProfile, Precision, Tolerance, default_tolerances
from tasks.engine import engine_from_variant
from tasks.errors import VerificationError
from tasks.precision import variant_from_onnx
from tasks.verify import batch_sizes, outputs_in_batches, verification_of_engine

BATCH = BatchProfile(min=1, opt=8, max=64)


@pytest.fixture(scope="module")
def engines(trained, tmp_path_factory):
    root = tmp_path_factory.mktemp("verify")
    out = {}
    for p in Precision:
        variant = variant_from_onnx(trained.onnx, trained.data, p, 64, root)
        out[p] = engine_from_variant(variant, Backend.onnxruntime, BATCH, {"threads": 1}, root)
    return root, out


@pytest.mark.parametrize("precision", list(Precision))
def test_every_precision_verifies_with_default_tolerances(trained, engines, precision):
    root, built = engines
    ref = verification_of_engine(built[precision], trained.checkpoint, trained.data, precision, default_tolerances()[precision], BATCH, root)
    report = json.loads(ref.path("verification.json").read_text())
    assert report["passed"] and report["samples"] == trained.data.meta["sizes"]["test"]
    assert [b["label"] for b in report["batches"]] == [f"{precision.value} batch {b}" for b in (1, 8, 64)]
    for key in ("max_abs", "mean_abs", "max_rel", "min_cosine", "top1_agreement", "accuracy", "accuracy_reference", "accuracy_drop"):
        assert ref.meta[key] is not None


def test_failure_lists_precision_metric_value_threshold_and_keeps_report(trained, engines):
    root, built = engines
    strict = Tolerance(atol=0.0, rtol=0.0, min_cosine=1.0, min_top1_agreement=1.0, max_accuracy_drop=0.0)
    with pytest.raises(VerificationError) as err:
        verification_of_engine(built[Precision.int8], trained.checkpoint, trained.data, Precision.int8, strict, BATCH, root)
    msg = str(err.value)
    assert "int8 batch 1: logits.share within atol=0.0 rtol=0.0" in msg and "threshold >= 1" in msg
    assert len(err.value.failures) >= 3  # one per batch size at least: all collected
    report = json.loads((root / "reports" / "verify-int8.json").read_text())
    assert report["passed"] is False and report["failures"] == err.value.failures
    assert not list((root / "verify").glob("*/verification.json")) or all(
        json.loads(p.read_text())["passed"] for p in (root / "verify").glob("*/verification.json")
    )


def test_batches_cover_the_profile_and_pad_short_tails():
    assert batch_sizes(BatchProfile(min=1, opt=1, max=4)) == [1, 4]

    class Echo:
        def __init__(self):
            self.seen = []

        def infer(self, feed):
            x = feed["input"]
            self.seen.append(len(x))
            return {"out": x.reshape(len(x), -1)[:, :2] * 2}

    x = np.arange(10 * 4, dtype=np.float32).reshape(10, 1, 2, 2)
    runner = Echo()
    out = outputs_in_batches(runner, "input", x, 4, min_batch=3)
    assert runner.seen == [4, 4, 3]  # tail of 2 padded to the minimum batch
    np.testing.assert_array_equal(out["out"], x.reshape(10, -1)[:, :2] * 2)


def test_verification_reports_progress_in_samples_per_batch_size(trained, engines, monkeypatch, caplog):
    from tasks import progress

    root, built = engines
    seen = []
    monkeypatch.setattr(progress, "SINK_INTERVAL_S", 0.0)
    previous = progress.set_sink(lambda stage, fraction, text: seen.append((stage, fraction)))
    try:
        with caplog.at_level("INFO", logger="trtflow.verify"):
            variant = variant_from_onnx(trained.onnx, trained.data, Precision.fp16, 64, root)  # cached: the engine's own
            verification_of_engine(built[Precision.fp16], trained.checkpoint, trained.data, Precision.fp16, default_tolerances()[Precision.fp16], BATCH, root, refresh=True, variant=variant)
    finally:
        progress.set_sink(previous)
    n = trained.data.meta["sizes"]["test"]
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("verify fp16: ")]
    assert [line.split("  ")[0] for line in lines] == [
        f"verify fp16: batch {b}: {n} samples compared (pass)" for b in (1, 8, 64)
    ] + [f"verify fp16: fp16 emulated batch 8: {n} samples compared (pass)"]
    assert all("samples/s" in line for line in lines)
    fractions = [f for stage, f in seen if stage == "verify fp16"]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0 and len(fractions) > 4  # during each pass, not only after
