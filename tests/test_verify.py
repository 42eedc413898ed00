"""Verification runs what it claims: every batch of the profile fed at its size, every row compared,
the compute share gated, and the verdict (passed or not) kept as an artifact."""

import json

import numpy as np
import pytest

from tasks.compare import compare_outputs
from tasks.compute_share import ComputeShare
from tasks.config import Backend, BatchProfile, DataConfig, Precision, Tolerance, default_tolerances
from tasks.engine import engine_from_variant
from tasks.errors import PrecisionShareError, VerificationError
from tasks.precision import variant_from_onnx
from tasks.verify import (
    BatchRun,
    batch_sizes,
    checks_at_batch,
    describe_runs,
    engine_checks,
    outputs_at_batch,
    summary_of,
    verdict,
    verdict_error,
    verification_of_engine,
)

BATCH = BatchProfile(min=1, opt=8, max=64)
W = np.random.default_rng(3).normal(size=(4, 3)).astype(np.float32)


# --- a tiny data artifact and a runner that records what it is fed (no model, no engine) ----------


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """A data artifact of 4 features and 3 classes whose test split has 15 samples."""
    from tasks.data import splits_from_dataset

    root = tmp_path_factory.mktemp("small-data")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(100, 4)).astype(np.float32)
    np.savez(root / "d.npz", x=x, y=(x @ W).argmax(1))
    data = splits_from_dataset(DataConfig(dataset=root / "d.npz"), root)
    assert data.meta["sizes"]["test"] == 15
    return data


def _test_inputs(data):
    from tasks.data import split_inputs

    return split_inputs(data, "test")["x"]


class Spy:
    """A runner computing logits = x @ W, recording the batch size of every call; ``wrong_from`` breaks the
    rows at and after that position of every call (a batch position the engine computes wrong)."""

    def __init__(self, wrong_from=None):
        self.fed, self.wrong_from = [], wrong_from

    def infer(self, feed):
        x = feed["x"]
        self.fed.append(len(x))
        out = x @ W
        if self.wrong_from is not None:
            out[self.wrong_from:] = -out[self.wrong_from:]
        return {"logits": out}


def test_every_batch_of_the_profile_is_fed_at_its_size_also_above_the_split(small_data):
    spy, n = Spy(), 15
    reference = {"logits": _test_inputs(small_data) @ W}
    batch = BatchProfile(min=4, opt=8, max=32)  # max larger than the test split
    checked = engine_checks(spy, reference, small_data, Precision.fp32, Tolerance(atol=0, rtol=0), batch, None, None)
    # min 4: 4 calls (the last filled from 3 to 4 rows); opt 8: 2 calls; max 32: one call of 32 rows
    assert spy.fed == [4, 4, 4, 4, 8, 8, 32]
    assert [(r.batch, r.runs, r.rows_fed, r.distinct_samples, r.repeated_rows) for r in checked.runs] == [
        (4, 4, 16, n, 1), (8, 2, 16, n, 1), (32, 1, 32, n, 17)]
    assert all(r.passed for r in checked.results)
    assert [r.label for r in checked.results] == [f"fp32 batch {b}{s}" for b in (4, 8, 32) for s in ("", " repeated rows")]
    assert describe_runs([r.to_dict() for r in checked.runs]) == "batch 4 x4 (1 rows repeated), 8 x2 (1 rows repeated), 32 x1 (17 rows repeated)"


def test_a_batch_that_fits_the_split_exactly_repeats_nothing(small_data):
    spy = Spy()
    got, run = outputs_at_batch(spy, small_data, "test", 5)
    assert spy.fed == [5, 5, 5] and run == BatchRun(5, 3, 15) and run.repeated_rows == 0
    assert checks_at_batch({"logits": _test_inputs(small_data) @ W}, got, run, Tolerance(atol=0, rtol=0), "b5")[0].passed
    assert len(checks_at_batch({"logits": _test_inputs(small_data) @ W}, got, run, Tolerance(), "b5")) == 1


def test_filled_rows_cycle_the_split_from_its_first_sample(small_data):
    class Echo:
        def infer(self, feed):
            return {"echo": feed["x"].copy()}

    x = _test_inputs(small_data)
    got, run = outputs_at_batch(Echo(), small_data, "test", 40)  # 15 samples, 25 repeated: 0..14, 0..9
    assert run.rows_fed == 40 and run.runs == 1
    np.testing.assert_array_equal(got["echo"], x[np.arange(40) % 15])
    got, run = outputs_at_batch(Echo(), small_data, "test", 6)  # 6, 6, then 3 + 3 repeated (0, 1, 2)
    np.testing.assert_array_equal(got["echo"], x[np.arange(18) % 15])


def test_a_wrong_row_among_the_repeated_ones_fails_the_batch(small_data):
    reference = {"logits": _test_inputs(small_data) @ W}
    got, run = outputs_at_batch(Spy(wrong_from=20), small_data, "test", 32)
    results = checks_at_batch(reference, got, run, Tolerance(atol=1e-5, rtol=0), "int8 batch 32", task_outputs={"logits"})
    assert results[0].passed  # the 15 distinct samples are right ...
    assert not results[1].passed and results[1].label == "int8 batch 32 repeated rows"  # ... rows 20..31 are not
    assert any("min_cosine" in f for f in results[1].failures()) and results[1].outputs["logits"].min_cosine == pytest.approx(-1.0)


def test_accuracy_counts_each_distinct_sample_once(small_data):
    x = _test_inputs(small_data)
    logits = x @ W
    labels = logits.argmax(1)
    wrong = logits.copy()
    wrong[0] = -wrong[0]  # sample 0 mispredicted: 14 of 15 right
    got = {"logits": wrong[np.arange(32) % 15]}  # sample 0 appears three times in the filled batch
    results = checks_at_batch({"logits": logits}, got, BatchRun(32, 1, 15), Tolerance(max_accuracy_drop=1.0, min_top1_agreement=0.0, min_cosine=-1.0), "b", labels, {"logits"})
    assert results[0].outputs["logits"].accuracy == pytest.approx(14 / 15)
    # repeated rows: judged row by row (the worst row's cosine), never as a share of samples
    assert results[1].outputs["logits"].accuracy is None and results[1].outputs["logits"].top1_agreement is None
    assert results[1].outputs["logits"].min_cosine == pytest.approx(-1.0)


def test_the_confusion_matrix_is_of_the_opt_batch_distinct_samples(small_data):
    from tasks.data import split_labels

    y = split_labels(small_data, "test")
    reference = {"logits": _test_inputs(small_data) @ W}
    checked = engine_checks(Spy(), reference, small_data, Precision.fp32, Tolerance(), BatchProfile(min=1, opt=32, max=32), y, "logits")
    assert checked.confusion["batch"] == 32 and np.sum(checked.confusion["matrix"]) == 15
    assert checked.confusion["accuracy"] == pytest.approx(float(((_test_inputs(small_data) @ W).argmax(1) == y).mean()))


# --- the verdict: compute share and repairability --------------------------------------------------


def _passing():
    ref = np.eye(3, dtype=np.float32)
    return [compare_outputs({"y": ref}, {"y": ref}, Tolerance(), "int8 batch 1")]


def _failing():
    ref = np.eye(3, dtype=np.float32)
    return [compare_outputs({"y": ref}, {"y": -ref}, Tolerance(), "int8 batch 1")]


def test_an_int8_engine_with_no_int8_operator_fails_naming_what_repair_kept():
    share = ComputeShare("onnx graph", {"fp32": 5})
    v = verdict(Precision.int8, default_tolerances()[Precision.int8], _passing(), share, kept_fp32=5)
    assert not v["passed"] and not v["repairable"]
    assert v["share_finding"] == "int8: 0 of 5 compute operators run in int8 after repair kept 5 in fp32; the model has no int8 benefit"
    assert v["failures"][0] == "int8 compute share: 0 of 5 compute operators in int8 = 0% (threshold >= 10%)"
    assert v["compute"] == {"source": "onnx graph", "operators": 5, "by_precision": {"fp32": 5}, "precision": "int8", "share": 0.0, "floor": 0.1, "passed": False}
    err = verdict_error({"precision": "int8", **v}, "reports/verify-int8.json")
    assert isinstance(err, PrecisionShareError) and not err.recoverable
    assert err.summary == "PrecisionShareError: int8: 0 of 5 compute operators run in int8 after repair kept 5 in fp32; the model has no int8 benefit; drop int8"


def test_the_share_floor_is_inclusive_and_zero_accepts_everything():
    tol = default_tolerances()[Precision.fp16].model_copy(update={"min_compute_share": 0.25})
    at = verdict(Precision.fp16, tol, _passing(), ComputeShare("onnx graph", {"fp16": 1, "fp32": 3}))
    assert at["passed"] and at["compute"]["share"] == 0.25 and "compute share >= 25%" in at["checks_run"]
    below = verdict(Precision.fp16, tol, _passing(), ComputeShare("onnx graph", {"fp16": 1, "fp32": 4}))
    assert not below["passed"] and below["share_finding"].startswith("fp16: 1 of 5 compute operators run in fp16;")
    untyped = verdict(Precision.fp16, tol, _passing(), ComputeShare("tensorrt engine inspector", {"fp16": 1, "unknown": 4}))
    assert untyped["passed"] is False  # an operator the report cannot type is not shown to be fp16
    accept = verdict(Precision.int8, default_tolerances()[Precision.int8].model_copy(update={"min_compute_share": 0.0}), _passing(), ComputeShare("onnx graph", {"fp32": 5}))
    assert accept["passed"] and accept["compute"]["share"] == 0.0


def test_a_model_without_compute_operators_is_no_int8_model():
    v = verdict(Precision.int8, default_tolerances()[Precision.int8], _passing(), ComputeShare("onnx graph", {}))
    assert not v["passed"] and "the model has no compute operator" in v["share_finding"]


def test_fp32_is_never_gated_on_its_share_and_numeric_failures_are_repairable():
    fp32 = verdict(Precision.fp32, default_tolerances()[Precision.fp32], _passing(), ComputeShare("onnx graph", {"int8": 2}))
    assert fp32["passed"] and "floor" not in fp32["compute"]
    failing = verdict(Precision.int8, default_tolerances()[Precision.int8], _failing(), ComputeShare("onnx graph", {"int8": 4}))
    assert not failing["passed"] and failing["repairable"] and failing["share_finding"] is None
    err = verdict_error({"precision": "int8", **failing}, "r.json")
    assert type(err) is VerificationError and err.recoverable
    both = verdict(Precision.int8, default_tolerances()[Precision.int8], _failing(), ComputeShare("onnx graph", {"fp32": 4}))
    assert not both["repairable"]  # keeping more nodes in fp32 cannot mend a share already too low
    unknown = verdict(Precision.int8, default_tolerances()[Precision.int8], _passing(), None)
    assert unknown["passed"] and "compute share" in unknown["checks_skipped"]


def test_checks_run_and_skipped_say_what_was_judged():
    int8 = verdict(Precision.int8, default_tolerances()[Precision.int8], _passing(), None, logits="logits")
    assert int8["checks_run"] == ["cosine per sample", "top-1 agreement", "accuracy drop", "balanced accuracy"]
    assert int8["checks_skipped"]["elementwise"] == "no atol/rtol for int8"
    no_labels = verdict(Precision.fp32, default_tolerances()[Precision.fp32], _passing(), None, logits=None, has_labels=False)
    assert no_labels["checks_run"] == ["elementwise (atol/rtol)", "cosine per sample"]
    assert no_labels["checks_skipped"] == {c: "the dataset has no labels" for c in ("top-1 agreement", "accuracy drop", "balanced accuracy")}
    unlabelled_logits = verdict(Precision.fp32, default_tolerances()[Precision.fp32], _passing(), None, logits=None, has_labels=True)
    assert set(unlabelled_logits["checks_skipped"].values()) == {"no logits output"}


def test_the_summary_keeps_the_worst_value_over_every_batch():
    ref = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    good = compare_outputs({"y": ref}, {"y": ref}, Tolerance(), "b1", labels=np.array([0, 1]))
    bad = compare_outputs({"y": ref}, {"y": ref[::-1].copy()}, Tolerance(), "b8", labels=np.array([0, 1]))
    nan = compare_outputs({"y": ref}, {"y": np.full_like(ref, np.nan)}, Tolerance(), "b9")
    report = {"precision": "fp16", "backend": "onnxruntime", "passed": False, "samples": 2, **verdict(Precision.fp16, Tolerance(), [good, bad, nan], None)}
    s = summary_of(report)
    assert s["max_abs"] == 1.0 and s["min_cosine"] == pytest.approx(0.0) and s["top1_agreement"] == 0.0
    assert s["accuracy"] == 0.0 and s["accuracy_reference"] == 1.0 and s["accuracy_drop"] == 1.0
    assert s["finite_share"] == 0.0 and s["failures"] == report["failures"] and s["repairable"]
    assert s["mean_abs"] == pytest.approx(1.0) and s["max_rel"] > 1e9 and s["balanced_accuracy"] == 0.0


def test_batches_cover_the_profile_without_repeats():
    assert batch_sizes(BatchProfile(min=1, opt=1, max=4)) == [1, 4]
    assert batch_sizes(BatchProfile(min=2, opt=8, max=8)) == [2, 8]
    assert batch_sizes(BatchProfile(min=1, opt=8, max=64)) == [1, 8, 64]


# --- the stage on real engines of the session's tiny trained model ---------------------------------


@pytest.fixture(scope="module")
def engines(trained, tmp_path_factory):
    root = tmp_path_factory.mktemp("verify")
    out = {}
    for p in Precision:
        variant = variant_from_onnx(trained.onnx, trained.data, p, 64, root)
        out[p] = variant, engine_from_variant(variant, Backend.onnxruntime, BATCH, {"threads": 1}, root)
    return root, out


@pytest.mark.parametrize("precision", list(Precision))
def test_every_precision_verifies_with_default_tolerances(trained, engines, precision):
    root, built = engines
    variant, engine = built[precision]
    ref = verification_of_engine(engine, trained.checkpoint, trained.data, precision, default_tolerances()[precision], BATCH, root, variant=variant)
    report = json.loads(ref.path("verification.json").read_text())
    n = trained.data.meta["sizes"]["test"]
    assert report["passed"] and report["samples"] == n
    assert [b["label"] for b in report["batches"]][:2] == [f"{precision.value} batch 1", f"{precision.value} batch 8"]
    assert [r["batch"] for r in report["batches_run"]] == [1, 8, 64] and all(r["distinct_samples"] == n for r in report["batches_run"])
    # the default model has 4 compute operators (2 Conv, 2 Gemm), every one in the engine's precision
    assert report["compute"]["operators"] == 4 and report["compute"]["share"] == 1.0, report["compute"]
    for key in ("max_abs", "mean_abs", "max_rel", "min_cosine", "top1_agreement", "accuracy", "accuracy_reference", "accuracy_drop"):
        assert ref.meta[key] is not None
    assert ref.meta["compute"] == report["compute"] and ref.meta["batches_run"] == report["batches_run"]


def test_a_failing_verdict_is_kept_as_an_artifact_and_raised_again_from_the_store(trained, engines):
    root, built = engines
    variant, engine = built[Precision.int8]
    strict = Tolerance(atol=0.0, rtol=0.0, min_cosine=1.0, min_top1_agreement=1.0, max_accuracy_drop=0.0)
    with pytest.raises(VerificationError) as err:
        verification_of_engine(engine, trained.checkpoint, trained.data, Precision.int8, strict, BATCH, root, variant=variant)
    msg = str(err.value)
    assert "int8 batch 1: logits.share within atol=0.0 rtol=0.0" in msg and "threshold >= 1" in msg
    assert len(err.value.failures) >= 3 and err.value.recoverable  # one per batch size at least: all collected
    latest = json.loads((root / "reports" / "verify-int8.json").read_text())
    assert latest["passed"] is False and latest["failures"] == err.value.failures
    verdict_ref = err.value.artifact
    assert verdict_ref.meta["passed"] is False and json.loads(verdict_ref.path("verification.json").read_text())["failures"] == err.value.failures

    from tasks.stage import was_cached

    with pytest.raises(VerificationError) as again:
        verification_of_engine(engine, trained.checkpoint, trained.data, Precision.int8, strict, BATCH, root, variant=variant)
    assert was_cached() and again.value.artifact.digest == verdict_ref.digest and again.value.failures == err.value.failures


def test_verification_reports_progress_in_samples_per_batch_size(trained, engines, monkeypatch, caplog):
    from tasks import progress

    root, built = engines
    seen = []
    monkeypatch.setattr(progress, "SINK_INTERVAL_S", 0.0)
    previous = progress.set_sink(lambda stage, fraction, text: seen.append((stage, fraction)))
    variant, engine = built[Precision.fp16]
    try:
        with caplog.at_level("INFO", logger="trtflow.verify"):
            verification_of_engine(engine, trained.checkpoint, trained.data, Precision.fp16, default_tolerances()[Precision.fp16], BATCH, root, refresh=True, variant=variant)
    finally:
        progress.set_sink(previous)
    n = trained.data.meta["sizes"]["test"]
    fill = {b: (-n) % b for b in (1, 8, 64)}
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("verify fp16: ")]
    assert [line.split("  ")[0] for line in lines] == [
        f"verify fp16: batch {b}: {n} samples compared" + (f", {fill[b]} rows repeated to fill the batch" if fill[b] else "") + " (pass)" for b in (1, 8, 64)
    ] + [f"verify fp16: fp16 emulated batch 8: {n} samples compared (pass)"]
    assert all("samples/s" in line for line in lines)
    fractions = [f for stage, f in seen if stage == "verify fp16"]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0 and len(fractions) > 4  # during each pass, not only after
    passed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("verify: fp16 passed")]
    assert passed and f"batch 1 x{n}, 8 x{-(-n // 8)}" in passed[0]


def test_the_stage_feeds_the_engine_every_batch_of_its_profile_at_its_size(trained, engines, monkeypatch):
    from collections import Counter

    import tasks.engine

    root, built = engines
    variant, engine = built[Precision.fp32]
    real, fed = tasks.engine.runner_from_build, []

    def spying(ref):
        runner = real(ref)
        infer = runner.infer_impl
        runner.infer_impl = lambda feed: (fed.append(len(next(iter(feed.values())))), infer(feed))[1]
        return runner

    monkeypatch.setattr(tasks.engine, "runner_from_build", spying)
    verification_of_engine(engine, trained.checkpoint, trained.data, Precision.fp32, default_tolerances()[Precision.fp32], BATCH, root, refresh=True, variant=variant)
    n = trained.data.meta["sizes"]["test"]
    assert Counter(fed) == {1: n, 8: -(-n // 8), 64: -(-n // 64)}  # every call at exactly min, opt or max
