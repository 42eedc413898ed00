"""Verification runs what it claims: every batch of the profile fed at its size, every row compared,
the compute share gated, and the verdict (passed or not) kept as an artifact."""

import json
from types import SimpleNamespace

import numpy as np
import pytest

from tasks.compare import compare_outputs
from tasks.compute_share import ComputeShare
from tasks.config import Backend, BatchProfile, DataConfig, Precision, Tolerance, default_tolerances
from tasks.engine import engine_from_variant
from tasks.errors import PrecisionShareError, VerificationError
from tasks.precision import variant_from_onnx

#: what reports call fp16 verified through its emulation on a CPU
EMULATED = "fp16 emulated on CPU"
from tasks.verify_result import summary_of
from tasks.verify import (
    BatchRun,
    batch_sizes,
    checks_at_batch,
    describe_runs,
    engine_checks,
    outputs_at_batch,
    reference_outputs,
    verdict,
    verdict_error,
    verification_of_engine,
)

BATCH = BatchProfile(min=1, opt=8, max=64)
W = np.random.default_rng(3).normal(size=(4, 3)).astype(np.float32)
V = np.random.default_rng(4).normal(size=(4, 2)).astype(np.float32)


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


def test_a_failing_batch_says_fail_and_each_pass_gets_labels_and_its_task_output(small_data, caplog):
    from tasks.data import split_labels
    from tasks.progress import Progress

    reference = {"logits": _test_inputs(small_data) @ W}
    y = split_labels(small_data, "test")
    with caplog.at_level("INFO", logger="trtflow.verify"), Progress("verify int8", total=30, unit="sample", logger=__import__("logging").getLogger("trtflow.verify")) as meter:
        checked = engine_checks(Spy(wrong_from=3), reference, small_data, Precision.int8, Tolerance(), BatchProfile(min=4, opt=4, max=8), y, "logits", meter)
    lines = [r.getMessage().split("  ")[0] for r in caplog.records]
    assert lines == ["verify int8: batch 4: 15 samples compared, 1 rows repeated to fill the batch (FAIL)",
                     "verify int8: batch 8: 15 samples compared, 1 rows repeated to fill the batch (FAIL)"]
    first = checked.results[0].outputs["logits"]
    assert first.accuracy is not None and first.top1_agreement is not None
    untask = engine_checks(Spy(), reference, small_data, Precision.fp32, Tolerance(), BatchProfile(min=4, opt=4, max=8), y, None)
    assert all(r.outputs["logits"].top1_agreement is None for r in untask.results)  # no logits output: no task metrics
    assert untask.confusion is None


def test_each_shape_point_is_fed_at_its_lengths_and_pad_values_and_judged_against_its_own_reference(small_data):
    from tasks.config import EngineProfile
    from tasks.shapes import fit_lengths

    profile = EngineProfile(min=1, opt=8, max=16, axes={"x": {1: (2, 4, 6)}}, lengths={"x": {1: 4}}, pad_values={"x": 3.0})
    fed, asked = [], []

    class Ends:  # the first two columns plus the last: the pad value shows at the longest point
        def infer(self, feed):
            fed.append(feed["x"].shape)
            return {"h": feed["x"][:, :2] + feed["x"][:, -1:]}

    def reference_at(point):
        asked.append(point.key())
        x = fit_lengths({"x": _test_inputs(small_data)}, point.lengths, {"x": 3.0})["x"]
        return {"h": x[:, :2] + x[:, -1:]}

    wrong = {"h": np.zeros((15, 2), np.float32)}  # the reference at the dataset's own length is not any point's
    checked = engine_checks(Ends(), wrong, small_data, Precision.fp32, Tolerance(atol=0.0, rtol=0.0), profile, None, None, reference_at=reference_at)
    assert fed == [(1, 2)] * 15 + [(8, 4)] * 2 + [(16, 6)]  # every call at its point's batch and length
    assert asked == [(1, (("x", ((1, 2),)),)), (8, (("x", ((1, 4),)),)), (16, (("x", ((1, 6),)),))]
    assert all(r.passed for r in checked.results), [f for r in checked.results for f in r.failures()]  # padded with 3.0, not 0
    assert [r.label for r in checked.results] == ["fp32 x:1x2", "fp32 x:8x4", "fp32 x:8x4 repeated rows", "fp32 x:16x6", "fp32 x:16x6 repeated rows"]
    # a regression naming no task output: every output is a prediction, judged by relative RMSE
    reference = {"h": _test_inputs(small_data)[:, :2].copy()}

    class Head:
        def infer(self, feed):
            return {"h": feed["x"][:, :2]}

    regression = engine_checks(Head(), reference, small_data, Precision.fp32, Tolerance(), BatchProfile(min=4, opt=4, max=4), None, None, regression=True)
    assert [c.metric for c in regression.results[0].checks] == ["max_relative_rmse"]


def test_repeated_rows_are_judged_as_on_the_split_against_the_splits_spread(small_data):
    rng = np.random.default_rng(2)
    ref = rng.normal(size=(15, 2)).astype(np.float32)
    got = ref[np.arange(17) % 15].copy()
    got[15:] += np.float32(0.05)  # the two repeated rows (samples 0 and 1) a little off
    results = checks_at_batch({"y": ref}, {"y": got}, BatchRun(17, 1, 15), Tolerance(max_relative_rmse=0.2), "b", None, {"y"}, regression=True)
    rows = results[1]
    assert rows.label == "b repeated rows" and [c.metric for c in rows.checks] == ["max_relative_rmse"]  # a wide prediction: not by cosine
    from tasks.compare import relative_rmse

    assert rows.outputs["y"].max_relative_rmse == pytest.approx(relative_rmse(ref[:2], got[15:], spread_of=ref), rel=1e-6)
    assert rows.passed and rows.outputs["y"].max_relative_rmse < relative_rmse(ref[:2], got[15:])  # two rows' own spread would be smaller


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
    err = verdict_error({"precision": "int8", **v}, "reports/verify-int8.json", artifact="the verdict")
    assert isinstance(err, PrecisionShareError) and not err.recoverable
    assert err.report_path == "reports/verify-int8.json" and err.artifact == "the verdict" and err.failures == v["failures"]
    assert err.summary == "PrecisionShareError: int8: 0 of 5 compute operators run in int8 after repair kept 5 in fp32; the model has no int8 benefit; drop int8"


def test_the_share_floor_is_inclusive_and_zero_accepts_everything():
    tol = default_tolerances()[Precision.fp16].model_copy(update={"min_compute_share": 0.25})
    at = verdict(Precision.fp16, tol, _passing(), ComputeShare("onnx graph", {"fp16": 1, "fp32": 3}))
    assert at["passed"] and at["compute"]["share"] == 0.25 and "compute share >= 25%" in at["checks_run"]
    below = verdict(Precision.fp16, tol, _passing(), ComputeShare("onnx graph", {"fp16": 1, "fp32": 4}))
    assert not below["passed"] and below["share_finding"].startswith("fp16: 1 of 5 compute operators run in fp16;")
    assert below["failures"] == ["fp16 compute share: 1 of 5 compute operators in fp16 = 20% (threshold >= 25%)"]
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
    err = verdict_error({"precision": "int8", **failing}, "r.json", artifact="the verdict")
    assert type(err) is VerificationError and err.recoverable and err.report_path == "r.json" and err.artifact == "the verdict"
    both = verdict(Precision.int8, default_tolerances()[Precision.int8], _failing(), ComputeShare("onnx graph", {"fp32": 4}))
    assert not both["repairable"]  # keeping more nodes in fp32 cannot mend a share already too low
    assert both["failures"][0].startswith("int8 compute share: 0 of 4") and len(both["failures"]) > 1  # the news first
    unknown = verdict(Precision.int8, default_tolerances()[Precision.int8], _passing(), None)
    assert unknown["passed"] and unknown["checks_skipped"]["compute share"] == "neither a layer report nor an ONNX graph of the engine"


def test_checks_run_and_skipped_say_what_was_judged():
    int8 = verdict(Precision.int8, default_tolerances()[Precision.int8], _passing(), None, logits="logits")
    assert int8["checks_run"] == ["cosine per sample", "top-1 agreement", "accuracy drop", "balanced accuracy"]
    assert int8["checks_skipped"]["elementwise"] == "no atol/rtol for int8"
    no_labels = verdict(Precision.fp32, default_tolerances()[Precision.fp32], _passing(), None, logits=None, has_labels=False)
    assert no_labels["checks_run"] == ["elementwise (atol/rtol)", "cosine per sample"]
    assert no_labels["checks_skipped"] == {c: "the dataset has no labels" for c in ("top-1 agreement", "accuracy drop", "balanced accuracy")}
    unlabelled_logits = verdict(Precision.fp32, default_tolerances()[Precision.fp32], _passing(), None, logits=None, has_labels=True)
    assert set(unlabelled_logits["checks_skipped"].values()) == {"no logits output"}
    assert verdict(Precision.fp32, default_tolerances()[Precision.fp32], _passing(), None)["checks_skipped"] == unlabelled_logits["checks_skipped"]  # labels by default
    atol_only = verdict(Precision.fp32, Tolerance(atol=0.1), _passing(), None)
    assert atol_only["checks_run"][0] == "elementwise (atol/rtol)" and "elementwise" not in atol_only["checks_skipped"]


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


def test_the_summary_holds_every_figure_the_report_and_repair_read():
    ref = np.array([[2.0, 0.0], [0.0, 2.0]], dtype=np.float32)
    out = ref * np.float32(1.5)
    results = [compare_outputs({"y": ref}, {"y": out}, Tolerance(atol=0.5, rtol=0.0), "fp32 batch 1")]
    report = {"precision": "fp32", "backend": "onnxruntime", "numerics": "native fp32", "samples": 2, "outputs": ["y"],
              "batches_run": [{"batch": 1}], **verdict(Precision.fp32, Tolerance(atol=0.5, rtol=0.0), results, ComputeShare("onnx graph", {"fp32": 1}), has_labels=False)}
    assert summary_of(report) == {
        "precision": "fp32", "backend": "onnxruntime", "numerics": "native fp32", "finite_share": 1.0,
        "passed": False, "failures": ["fp32 batch 1: y.share within atol=0.5 rtol=0.0 = 0.5 (threshold >= 1)"], "repairable": True,
        "samples": 2, "batches_run": [{"batch": 1}],
        "compute": {"source": "onnx graph", "operators": 1, "by_precision": {"fp32": 1}, "precision": "fp32", "share": 1.0},
        "outputs": ["y"], "checks_run": ["elementwise (atol/rtol)", "cosine per sample"],
        "checks_skipped": {c: "the dataset has no labels" for c in ("top-1 agreement", "accuracy drop", "balanced accuracy")},
        "max_abs": 1.0, "mean_abs": 0.5, "max_rel": 0.5, "min_cosine": pytest.approx(1.0), "top1_agreement": 1.0,
        "accuracy_reference": None, "accuracy": None, "accuracy_drop": None,
        "balanced_accuracy_reference": None, "balanced_accuracy": None,
        # a regression's figures (none: a classification without labels) and what the report says of shapes and heads
        "task": None, "outputs_not_judged": {}, "shapes": [], "max_relative_rmse": pytest.approx(0.5 ** 0.5),
        "r2_reference": None, "r2": None, "r2_drop": None, "mae_reference": None, "mae": None, "rmse": None,
    }
    bare = summary_of({"precision": "int8", "backend": "b", "passed": True, "samples": 0, "batches": []})
    assert bare["failures"] == [] and bare["repairable"] is False and bare["max_abs"] is None


def test_batches_cover_the_profile_without_repeats():
    assert batch_sizes(BatchProfile(min=1, opt=1, max=4)) == [1, 4]
    assert batch_sizes(BatchProfile(min=2, opt=8, max=8)) == [2, 8]
    assert batch_sizes(BatchProfile(min=1, opt=8, max=64)) == [1, 8, 64]


# --- the stage on real ONNX Runtime engines of a one-product model (fast: no training, no exporter) -


def _artifact(root, stage, files, meta):
    """Commit an artifact of ``stage`` holding ``files`` (name -> bytes) and ``meta``, as a stage would."""
    from tasks.artifacts import sha256_json
    from tasks.stage import StageSpec, run_stage

    def make(out):
        for name, blob in files.items():
            (out / name).write_bytes(blob)
        return meta

    return run_stage(StageSpec(stage), {"content": sha256_json([sorted((k, v.hex()) for k, v in files.items()), meta])}, root, False, make)


@pytest.fixture(scope="module")
def branch(small_data, monkeypatch_module):
    """logits = x @ W and emb = x @ V as ONNX MatMuls, its variants and engines; the reference is the same products."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    import tasks.verify
    import tasks.verify_reference
    from tasks.data import split_inputs

    root = small_data.dir.parents[1]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["logits"], name="fc"), helper.make_node("MatMul", ["x", "v"], ["emb"], name="proj")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3]), helper.make_tensor_value_info("emb", TensorProto.FLOAT, ["N", 2])],
        [numpy_helper.from_array(W, "w"), numpy_helper.from_array(V, "v")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    exported = _artifact(root, "export", {"model.onnx": model.SerializeToString()}, {"inputs": ["x"], "outputs": ["logits", "emb"], "precision": "fp32"})
    checkpoint = _artifact(root, "train", {"model.pt": b"stands for the model"}, {"outputs": ["logits", "emb"], "logits_output": "logits"})
    def products(ckpt, data):
        x = split_inputs(data, "test")["x"]
        return {"logits": x @ W, "emb": x @ V}

    # the stand-in checkpoint has no model: its reference is the products (every other checkpoint's is PyTorch's)
    monkeypatch_module.setattr(tasks.verify, "reference_outputs", lambda ckpt, data: products(ckpt, data) if ckpt.digest == checkpoint.digest else reference_outputs(ckpt, data))
    monkeypatch_module.setattr(tasks.verify_reference, "reference_outputs", tasks.verify.reference_outputs)  # what reference_outputs_at falls back on
    return root, checkpoint, Built(exported, small_data, root)


class Built(dict):
    """Which (precision, or 'int8-kept': its product kept in fp32) -> (variant, engine), made when first asked."""

    def __init__(self, exported, data, root):
        super().__init__()
        self.exported, self.data, self.root = exported, data, root

    def __missing__(self, which):
        precision = which if isinstance(which, Precision) else Precision(which.split("-")[0])
        keep = ["fc", "proj"] if str(which).endswith("-kept") else None
        variant = variant_from_onnx(self.exported, self.data, precision, 64, self.root, keep_fp32=keep)
        self[which] = variant, engine_from_variant(variant, Backend.onnxruntime, BATCH, {"threads": 1}, self.root)
        return self[which]


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def _verify(branch, data, which, tolerance=None, **kw):
    root, checkpoint, built = branch
    variant, engine = built[which]
    precision = which if isinstance(which, Precision) else Precision(which.split("-")[0])
    return verification_of_engine(engine, checkpoint, data, precision, tolerance or default_tolerances()[precision], BATCH, root, variant=variant, **kw)


@pytest.mark.parametrize("precision", list(Precision))
def test_every_precision_passes_and_reports_what_ran(branch, small_data, precision):
    ref = _verify(branch, small_data, precision)
    report = json.loads(ref.path("verification.json").read_text())
    assert report["passed"] and report["samples"] == 15 and report["failures"] == []
    assert report["batches_run"] == [
        {"batch": 1, "runs": 15, "distinct_samples": 15, "rows_fed": 15, "repeated_rows": 0},
        {"batch": 8, "runs": 2, "distinct_samples": 15, "rows_fed": 16, "repeated_rows": 1},
        {"batch": 64, "runs": 1, "distinct_samples": 15, "rows_fed": 64, "repeated_rows": 49},
    ]
    labels = [b["label"] for b in report["batches"]]
    # a second, emulated pass only where the engine is not the emulation itself (bf16's is)
    assert any(label.startswith(f"{precision.value} emulated") for label in labels) is (precision is Precision.fp16)
    assert labels[:5] == [f"{precision.value} batch 1", f"{precision.value} batch 8", f"{precision.value} batch 8 repeated rows", f"{precision.value} batch 64", f"{precision.value} batch 64 repeated rows"]
    assert report["compute"]["by_precision"] == {precision.value: 2} and report["compute"]["share"] == 1.0
    # int8: ONNX Runtime's int8 kernels where they are exact, its Q/DQ nodes in fp32 where they saturate (no VNNI)
    from tasks.backends.onnxruntime import int8_kernels_saturate
    from tasks.verify import INT8_AS_FP32

    assert report["numerics"] == {"fp32": "native fp32", "fp16": EMULATED, "bf16": "bf16 emulated on CPU", "int8": INT8_AS_FP32 if int8_kernels_saturate() else "native int8"}[precision.value]
    assert report["backend"] == "onnxruntime" and report["engine_digest"] == branch[2][precision][1].digest
    assert report["outputs"] == ["logits", "emb"] and report["logits_output"] == "logits" and report["confusion"]["batch"] == 8
    for b in report["batches"]:  # only the logits output is judged by task metrics, and only on distinct samples
        assert b["outputs"]["emb"]["top1_agreement"] is None and b["outputs"]["emb"]["accuracy"] is None
        distinct = "repeated" not in b["label"]
        assert (b["outputs"]["logits"]["top1_agreement"] is not None) is distinct and (b["outputs"]["logits"]["accuracy"] is not None) is distinct
    assert ref.meta == summary_of(report) and ref.meta["passed"]
    assert set(report) == {"precision", "backend", "numerics", "passed", "failures", "repairable", "share_finding", "compute", "checks_run",
                           "checks_skipped", "batches", "samples", "batches_run", "outputs", "logits_output", "tolerance", "emulation",
                           "confusion", "engine_digest", "checkpoint_digest", "task", "outputs_not_judged", "shapes"}
    assert report["task"] == "classification" and report["outputs_not_judged"] == {"emb": report["outputs_not_judged"]["emb"]}
    assert [s["label"] for s in report["shapes"]] == [f"{precision.value} batch {b}" for b in (1, 8, 64)]
    assert report["tolerance"] == default_tolerances()[precision].model_dump() and report["checkpoint_digest"] == branch[1].digest
    assert (report["emulation"] is None) is (precision not in (Precision.fp16, Precision.bf16))  # bf16: the engine is the emulation
    latest = json.loads((branch[0] / "reports" / f"verify-{precision.value}.json").read_text())
    assert latest == report


def test_an_int8_variant_whose_only_product_stays_fp32_fails_and_is_not_repairable(branch, small_data):
    with pytest.raises(PrecisionShareError) as err:
        _verify(branch, small_data, "int8-kept")
    assert err.value.summary == "PrecisionShareError: int8: 0 of 2 compute operators run in int8 after repair kept 2 in fp32; the model has no int8 benefit; drop int8"
    assert not err.value.recoverable and err.value.artifact.meta["repairable"] is False
    report = json.loads(err.value.artifact.path("verification.json").read_text())
    assert report["passed"] is False and report["compute"]["by_precision"] == {"fp32": 2} and report["share_finding"]
    assert json.loads((branch[0] / "reports" / "verify-int8.json").read_text())["passed"] is False
    # the same verdict comes from the store, raised the same way
    from tasks.stage import was_cached

    with pytest.raises(PrecisionShareError) as again:
        _verify(branch, small_data, "int8-kept")
    assert was_cached() and again.value.artifact.digest == err.value.artifact.digest
    assert err.value.report_path == str(branch[0] / "reports" / "verify-int8.json") == again.value.report_path


def test_an_fp16_variant_kept_wholly_in_fp32_says_so_and_fails_its_share(branch, small_data):
    with pytest.raises(PrecisionShareError) as err:
        _verify(branch, small_data, "fp16-kept")
    meta = err.value.artifact.meta
    assert meta["numerics"] == "fp32 (a repair kept every node of the fp16 variant in fp32)" and meta["compute"]["share"] == 0.0


def test_a_failing_verdict_is_kept_as_an_artifact_and_raised_again_from_the_store(branch, small_data, caplog):
    from tasks.stage import was_cached

    strict = Tolerance(atol=0.0, rtol=0.0, min_cosine=1.0, min_top1_agreement=1.0, max_accuracy_drop=0.0)
    with pytest.raises(VerificationError) as err, caplog.at_level("INFO", logger="trtflow.verify"):
        _verify(branch, small_data, Precision.fp16, strict)
    assert "verify fp16: fp16 emulated batch 8: 15 samples compared (FAIL)" in [r.getMessage().split("  ")[0] for r in caplog.records]
    assert err.value.recoverable and type(err.value) is VerificationError
    assert "fp16 batch 1: logits.share within atol=0.0 rtol=0.0" in str(err.value) and "threshold >= 1" in str(err.value)
    assert any(f.startswith("fp16 emulated batch 8: ") for f in err.value.failures)  # every failing check, emulation included
    latest = json.loads((branch[0] / "reports" / "verify-fp16.json").read_text())
    assert latest["passed"] is False and latest["failures"] == err.value.failures and latest["repairable"] is True
    verdict_ref = err.value.artifact
    assert verdict_ref.meta["passed"] is False and verdict_ref.meta["failures"] == err.value.failures
    assert json.loads(verdict_ref.path("verification.json").read_text())["failures"] == err.value.failures
    with pytest.raises(VerificationError) as again:
        _verify(branch, small_data, Precision.fp16, strict)
    assert was_cached() and again.value.artifact.digest == verdict_ref.digest and again.value.failures == err.value.failures
    _verify(branch, small_data, Precision.fp16)  # a passing verification is the latest again
    assert json.loads((branch[0] / "reports" / "verify-fp16.json").read_text())["passed"] is True


def test_a_stage_error_leaves_a_failed_latest_report(branch, small_data, monkeypatch):
    import tasks.engine
    from tasks.errors import InferenceError

    def broken(ref):
        raise InferenceError(got="x", expected="y", because="z", fix="w")

    _verify(branch, small_data, Precision.fp32)
    monkeypatch.setattr(tasks.engine, "runner_from_build", broken)
    _verify(branch, small_data, Precision.fp32)  # found in the store: no runner needed
    with pytest.raises(InferenceError):
        _verify(branch, small_data, Precision.fp32, refresh=True)
    latest = json.loads((branch[0] / "reports" / "verify-fp32.json").read_text())
    assert latest == {"precision": "fp32", "passed": False, "failures": [], "error": "got x, expected y, because z; w"}


def test_the_stage_feeds_the_engine_every_batch_of_its_profile_at_its_size(branch, small_data, monkeypatch):
    from collections import Counter

    import tasks.engine

    real, fed = tasks.engine.runner_from_build, []

    def spying(ref):
        runner = real(ref)
        infer = runner.infer_impl
        runner.infer_impl = lambda feed: (fed.append(len(next(iter(feed.values())))), infer(feed))[1]
        return runner

    monkeypatch.setattr(tasks.engine, "runner_from_build", spying)
    _verify(branch, small_data, Precision.fp32, refresh=True)
    assert Counter(fed) == {1: 15, 8: 2, 64: 1}  # every call at exactly min, opt or max


def test_verification_reports_progress_in_samples_per_batch_size(branch, small_data, monkeypatch, caplog):
    from tasks import progress

    seen = []
    monkeypatch.setattr(progress, "SINK_INTERVAL_S", 0.0)
    previous = progress.set_sink(lambda stage, fraction, text: seen.append((stage, fraction, text)))
    try:
        with caplog.at_level("INFO", logger="trtflow.verify"):
            _verify(branch, small_data, Precision.fp16, refresh=True)
    finally:
        progress.set_sink(previous)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("verify fp16: ")]
    assert [line.split("  ")[0] for line in lines] == [
        "verify fp16: batch 1: 15 samples compared (pass)",
        "verify fp16: batch 8: 15 samples compared, 1 rows repeated to fill the batch (pass)",
        "verify fp16: batch 64: 15 samples compared, 49 rows repeated to fill the batch (pass)",
        "verify fp16: fp16 emulated batch 8: 15 samples compared (pass)",
    ]
    assert all("samples/s" in line for line in lines)
    fractions = [f for stage, f, _ in seen if stage == "verify fp16"]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0 and len(fractions) > 4  # during each pass, not only after
    # four passes of 15 samples: three batch sizes and the emulation
    at = {text.split("  ")[0]: f for stage, f, text in seen if stage == "verify fp16"}
    assert at["verify fp16: batch 64: 15 samples compared, 49 rows repeated to fill the batch (pass)"] == 0.75
    assert any(text.startswith("verify fp16: 15/60 samples") for stage, _, text in seen if stage == "verify fp16")
    passed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("verify: fp16 passed")]
    assert passed == ["verify: fp16 passed on 15 samples at batch 1 x15, 8 x2 (1 rows repeated), 64 x1 (49 rows repeated) "
                      "(outputs ['logits', 'emb']; checks elementwise (atol/rtol), cosine per sample, top-1 agreement, accuracy drop, balanced accuracy, compute share >= 10%)"]


@pytest.fixture(scope="module")
def unlabelled_data(small_data):
    from tasks.data import split_inputs, splits_from_dataset

    root = small_data.dir.parents[1]
    np.savez(root / "x.npz", x=np.random.default_rng(5).normal(size=(100, 4)).astype(np.float32))
    return splits_from_dataset(DataConfig(dataset=root / "x.npz"), root)


def test_without_labels_no_output_is_judged_by_task_metrics(branch, unlabelled_data):
    ref = _verify(branch, unlabelled_data, Precision.fp32)
    report = json.loads(ref.path("verification.json").read_text())
    assert report["passed"] and report["logits_output"] is None and report["confusion"] is None and report["task"] is None
    assert report["checks_skipped"] == {c: "the dataset has no labels" for c in ("top-1 agreement", "accuracy drop", "balanced accuracy")}
    assert all(o["top1_agreement"] is None for b in report["batches"] for o in b["outputs"].values())


def test_the_reference_is_computed_once_per_model_and_data(small_data, monkeypatch, caplog):
    import tasks.inference
    import tasks.verify
    import tasks.verify_reference

    monkeypatch.setattr(tasks.verify_reference, "_REFERENCE", {})  # another test in this process may have filled it
    calls = []
    x = _test_inputs(small_data)
    monkeypatch.setattr(tasks.inference, "module_from_checkpoint", lambda ckpt: ckpt.meta["scale"])

    def predict_split(scale, data, split, progress=None):
        assert data is small_data and split == "test" and progress.total == 15 and progress.unit == "sample"
        calls.append(scale)
        progress.update(15, samples=15)
        return [x * scale, x - scale][: 2 if scale == 2.0 else 1]

    monkeypatch.setattr(tasks.inference, "predict_split", predict_split)
    one = SimpleNamespace(digest="a", meta={"outputs": ["logits", "aux"], "scale": 2.0})
    with caplog.at_level("INFO", logger="trtflow.verify"):
        out = reference_outputs(one, small_data)
    assert [r.getMessage().split("  ")[0] for r in caplog.records] == ["verify reference (PyTorch): PyTorch outputs of the test split"]
    assert list(out) == ["logits", "aux"] and np.array_equal(out["logits"], x * 2.0) and np.array_equal(out["aux"], x - 2.0)
    assert not out["logits"].flags.writeable  # shared between the branches: nobody may change it
    assert reference_outputs(one, small_data) is out and calls == [2.0]
    other = SimpleNamespace(digest="b", meta={"scale": 3.0})  # no names: one output, logits
    assert list(reference_outputs(other, small_data)) == ["logits"] and calls == [2.0, 3.0]
    assert reference_outputs(one, small_data) is not out and calls == [2.0, 3.0, 2.0]  # only the latest is kept
    with pytest.raises(ValueError):  # names that do not fit the outputs are an error, not a silent cut
        reference_outputs(SimpleNamespace(digest="c", meta={"outputs": ["logits", "aux", "extra"], "scale": 2.0}), small_data)


def test_the_reference_at_a_shape_point_is_computed_once_per_model_data_lengths_and_pads(small_data, unlabelled_data, monkeypatch, tmp_path):
    """A variable-length model's reference at each shape point: PyTorch on the split cut or padded to the
    point's lengths, under the training's thread count, kept per (checkpoint, data, user code, lengths,
    pad values) and never shared between two lengths, two pad values or two versions of the model's code."""
    import contextlib

    import tasks.inference
    import tasks.verify
    import tasks.verify_reference
    from tasks.artifacts import ArtifactRef
    from tasks.code_digests import forget
    from tasks.data import split_inputs
    from tasks.shapes import ShapePoint
    from tasks.verify import reference_outputs_at

    monkeypatch.setattr(tasks.verify_reference, "_REFERENCE_AT", {})
    monkeypatch.setattr(tasks.verify_reference, "_REFERENCE", {})
    calls, threads = [], []

    @contextlib.contextmanager
    def torch_threads(n):
        threads.append(n)
        yield

    def predict_split(model, data, split, progress=None, fit=None):
        scale, count = model
        assert split == "test" and progress.total == 15 and progress.unit == "sample"
        calls.append((scale, data.digest, progress.stage))
        fed = split_inputs(data, "test")["x"]
        fed = fed if fit is None else fit({"x": fed})["x"]
        return [fed * scale, fed - scale, fed][:count]

    monkeypatch.setattr(tasks.inference, "module_from_checkpoint", lambda ckpt: (ckpt.meta["scale"], ckpt.meta.get("count", 2)))
    monkeypatch.setattr(tasks.inference, "predict_split", predict_split)
    monkeypatch.setattr(tasks.inference, "torch_threads", torch_threads)
    (tmp_path / "refnet_user.py").write_text("def build():\n    return 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    forget()

    def checkpoint(weights: str, scale: float) -> ArtifactRef:
        meta = {"outputs": ["logits", "aux"], "scale": scale, "config": {"model": "refnet_user:build", "threads": 3}}
        return ArtifactRef(stage="train", key=weights, dir=str(tmp_path / weights), files={"model.pt": weights}, meta=meta)

    one, x = checkpoint("w1", 2.0), _test_inputs(small_data)
    cut, cut_at_8, padded = ShapePoint("min", 1, {"x": {1: 2}}), ShapePoint("opt", 8, {"x": {1: 2}}), ShapePoint("max", 4, {"x": {1: 6}})
    out = reference_outputs_at(one, small_data, cut, {})
    assert list(out) == ["logits", "aux"] and np.array_equal(out["logits"], x[:, :2] * 2.0) and np.array_equal(out["aux"], x[:, :2] - 2.0)
    assert not out["logits"].flags.writeable and not out["aux"].flags.writeable  # shared between the branches
    assert calls == [(2.0, small_data.digest, "verify reference (PyTorch) at x:1x2")] and threads == [3]  # the training's threads
    # the same lengths at another batch is the same reference; the order of the pad values does not matter
    assert reference_outputs_at(one, small_data, cut, {}) is out and reference_outputs_at(one, small_data, cut_at_8, {}) is out and len(calls) == 1
    zero = reference_outputs_at(one, small_data, padded, {"x": 0.0, "mask": 1.0})
    assert np.array_equal(zero["logits"], np.pad(x, ((0, 0), (0, 2))) * 2.0) and len(calls) == 2
    assert reference_outputs_at(one, small_data, padded, {"mask": 1.0, "x": 0.0}) is zero and len(calls) == 2
    ones = reference_outputs_at(one, small_data, padded, {"x": 1.0, "mask": 1.0})  # another pad value: another reference
    assert np.array_equal(ones["logits"][:, 4:], np.full((15, 2), 2.0, np.float32)) and len(calls) == 3
    assert reference_outputs_at(one, small_data, cut, {}) is out and reference_outputs_at(one, small_data, padded, {"x": 0.0, "mask": 1.0}) is zero
    assert len(calls) == 3  # every point of the current model is kept

    other_data = reference_outputs_at(one, unlabelled_data, cut, {})
    assert calls[-1][1] == unlabelled_data.digest and np.array_equal(other_data["logits"], _test_inputs(unlabelled_data)[:, :2] * 2.0)
    assert reference_outputs_at(one, small_data, cut, {}) is not out and len(calls) == 5  # only the latest model and data are kept

    # The same weights through edited model code are another reference, with and without lengths.
    plain = reference_outputs(one, small_data)
    assert reference_outputs(one, small_data) is plain and calls[-1][2] == "verify reference (PyTorch)" and len(calls) == 6
    before = reference_outputs_at(one, small_data, cut, {})
    (tmp_path / "refnet_user.py").write_text("def build():\n    return 2\n")
    forget()
    assert reference_outputs_at(one, small_data, cut, {}) is not before and len(calls) == 7
    assert reference_outputs(one, small_data) is not plain and len(calls) == 8
    # another checkpoint: computed with its own weights; no lengths: the plain reference
    two = reference_outputs_at(checkpoint("w2", 5.0), small_data, cut, {})
    assert np.array_equal(two["logits"], x[:, :2] * 5.0) and len(calls) == 9
    assert reference_outputs_at(one, small_data, ShapePoint("opt", 8), {"x": 1.0}) is reference_outputs(one, small_data)
    # a checkpoint that names no outputs has one, logits; names that do not fit the outputs are an error, not a silent cut
    unnamed = ArtifactRef(stage="train", key="w3", dir=str(tmp_path / "w3"), files={"model.pt": "w3"}, meta={"scale": 1.0, "count": 1})
    assert list(reference_outputs_at(unnamed, small_data, cut, {})) == ["logits"]
    misnamed = ArtifactRef(stage="train", key="w4", dir=str(tmp_path / "w4"), files={"model.pt": "w4"}, meta={"scale": 1.0, "outputs": ["a", "b", "c"]})
    with pytest.raises(ValueError):
        reference_outputs_at(misnamed, small_data, cut, {})
    forget()


R = np.random.default_rng(6).normal(size=(4, 1)).astype(np.float32)


@pytest.fixture(scope="module")
def regression_branch(tmp_path_factory, monkeypatch_module):
    """A regression (y float: pred = x @ R) with a second head emb = x @ V, its fp32 engine, and the products as reference."""
    from onnx import TensorProto, helper, numpy_helper

    import tasks.verify
    import tasks.verify_reference
    from tasks.data import split_inputs, splits_from_dataset

    root = tmp_path_factory.mktemp("regression")
    x = np.random.default_rng(7).normal(size=(100, 4)).astype(np.float32)
    np.savez(root / "r.npz", x=x, y=(x @ R)[:, 0] + np.random.default_rng(8).normal(scale=0.1, size=100).astype(np.float32))
    data = splits_from_dataset(DataConfig(dataset=root / "r.npz"), root)
    assert data.meta["task"] == "regression"
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "r"], ["pred"], name="head"), helper.make_node("MatMul", ["x", "v"], ["emb"], name="proj")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("pred", TensorProto.FLOAT, ["N", 1]), helper.make_tensor_value_info("emb", TensorProto.FLOAT, ["N", 2])],
        [numpy_helper.from_array(R, "r"), numpy_helper.from_array(V, "v")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    exported = _artifact(root, "export", {"model.onnx": model.SerializeToString()}, {"inputs": ["x"], "outputs": ["pred", "emb"], "precision": "fp32"})
    checkpoint = _artifact(root, "train", {"model.pt": b"stands for a regression"},
                           {"outputs": ["pred", "emb"], "logits_output": "pred", "config": {"threads": 2}})
    previous = tasks.verify.reference_outputs

    def products(ckpt, d):
        if ckpt.digest != checkpoint.digest:
            return previous(ckpt, d)
        x = split_inputs(d, "test")["x"]
        return {"pred": x @ R, "emb": x @ V}

    monkeypatch_module.setattr(tasks.verify, "reference_outputs", products)
    monkeypatch_module.setattr(tasks.verify_reference, "reference_outputs", tasks.verify.reference_outputs)  # what reference_outputs_at falls back on
    variant = variant_from_onnx(exported, data, Precision.fp32, 64, root)
    return root, checkpoint, data, engine_from_variant(variant, Backend.onnxruntime, BATCH, {"threads": 1}, root), exported


def test_a_regression_is_judged_by_relative_rmse_and_r2_against_its_targets(regression_branch):
    from tasks.stage import key_ingredients
    from tasks.verify import SPEC

    root, checkpoint, data, engine, _ = regression_branch
    ref = verification_of_engine(engine, checkpoint, data, Precision.fp32, default_tolerances()[Precision.fp32], BATCH, root)
    report = json.loads(ref.path("verification.json").read_text())
    assert report["passed"] and report["task"] == "regression" and report["confusion"] is None and report["logits_output"] == "pred"
    assert report["checks_run"] == ["elementwise (atol/rtol)", "relative RMSE (pred)", "cosine per sample", "R² drop (R², MAE, RMSE against the labels)"]
    assert report["checks_skipped"] == {}
    first = report["batches"][0]
    assert first["label"] == "fp32 batch 1"
    pred, emb = first["outputs"]["pred"], first["outputs"]["emb"]
    # the task output: against the targets (R², MAE, RMSE: the same for PyTorch and the engine), no cosine, no class metrics
    assert pred["min_cosine"] is None and pred["max_relative_rmse"] is not None and pred["top1_agreement"] is None and pred["accuracy"] is None
    assert pred["r2"] == pytest.approx(pred["r2_reference"]) and pred["r2"] > 0.5 and pred["r2_drop"] == pytest.approx(0.0, abs=1e-6)
    assert pred["mae"] == pytest.approx(pred["mae_reference"]) and pred["rmse"] == pytest.approx(pred["rmse_reference"]) and 0 < pred["rmse"] < 1
    assert [c["metric"] for c in first["checks"] if c["output"] == "pred"][1:] == ["max_relative_rmse", "r2_drop"]
    assert [c["metric"] for c in first["checks"] if c["output"] == "emb"][1:] == ["min_cosine"]
    repeated = next(b for b in report["batches"] if b["label"] == "fp32 batch 8 repeated rows")  # judged as on the split, not scored
    assert [c["metric"] for c in repeated["checks"] if c["output"] == "pred"][1:] == ["max_relative_rmse"] and repeated["outputs"]["pred"]["r2"] is None
    # the second head: verified against PyTorch by its cosine, never scored against the targets
    assert emb["min_cosine"] == pytest.approx(1.0) and emb["r2"] is None and emb["top1_agreement"] is None
    assert ref.meta["r2"] == pytest.approx(pred["r2"], abs=1e-6) and ref.meta["task"] == "regression"
    # the reference's thread count (the training's) and the engine's enter the key
    inputs = {"engine": engine, "checkpoint": checkpoint, "data": data, "precision": Precision.fp32, "tolerance": Tolerance(), "batch": BATCH}
    assert key_ingredients(SPEC, inputs)["environment"] == {"engine_threads": "1", "torch_threads": "2"}
    # fp16: the emulation pass is judged as a regression too
    fp16 = variant_from_onnx(regression_branch[4], data, Precision.fp16, 64, root)
    ref16 = verification_of_engine(engine_from_variant(fp16, Backend.onnxruntime, BATCH, {"threads": 1}, root), checkpoint, data, Precision.fp16,
                                   default_tolerances()[Precision.fp16], BATCH, root, variant=fp16)
    emulated = next(b for b in json.loads(ref16.path("verification.json").read_text())["batches"] if b["label"] == "fp16 emulated batch 8")
    assert [c["metric"] for c in emulated["checks"] if c["output"] == "pred"][1:] == ["max_relative_rmse", "r2_drop"]


def test_the_emulation_pass_runs_fitted_batches_with_the_engine_threads_and_no_graph_optimizer(branch, small_data, regression_branch, monkeypatch):
    import tasks.backends.onnxruntime as ort
    from tasks.data import split_labels
    from tasks.verify import emulated_check

    made, fitted = [], []
    real = ort.OnnxRuntimeRunner

    class Recording(real):  # type: ignore[misc, valid-type]
        def __init__(self, path, **kw):
            made.append(kw)
            super().__init__(path, **kw)

    monkeypatch.setattr(ort, "OnnxRuntimeRunner", Recording)
    variant, _ = branch[2][Precision.fp16]
    x, y = _test_inputs(small_data), split_labels(small_data, "test")
    reference, tol = {"logits": x @ W, "emb": x @ V}, default_tolerances()[Precision.fp16]
    results, info = emulated_check(variant, Precision.fp16, reference, small_data, y, 8, tol, 3, {"logits"}, fit=lambda feed: (fitted.append(len(feed["x"])), feed)[1])
    # no optimizer may remove the rounding casts; the engine's thread count; every batch through the fit
    assert made == [{"threads": 3, "optimize": False}] and fitted == [8, 8]
    assert [r.label for r in results] == ["fp16 emulated batch 8", "fp16 emulated batch 8 repeated rows"] and all(r.passed for r in results)
    assert results[0].outputs["logits"].top1_agreement is not None and info["rounded_tensors"] >= 2  # a classification unless told
    with pytest.raises(ValueError, match="got precision int8, expected one with an emulation"):
        emulated_check(variant, Precision.int8, reference, small_data, y, 8, tol, 1)

    # a regression's emulation is judged as a regression, labelled with the shape it ran at
    root, _, data, _, exported = regression_branch
    fp16 = variant_from_onnx(exported, data, Precision.fp16, 64, root)
    xr = _test_inputs(data)
    got, _ = emulated_check(fp16, Precision.fp16, {"pred": xr @ R, "emb": xr @ V}, data, split_labels(data, "test"), 8, tol, 1, {"pred"},
                            shape="x:8x4", regression=True)
    assert got[0].label == "fp16 emulated x:8x4" and [c.metric for c in got[0].checks if c.output == "pred"][1:] == ["max_relative_rmse", "r2_drop"]


K = np.random.default_rng(10).normal(size=(2, 1, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def sequence_model(tmp_path_factory):
    """x of shape N x 1 x L (L dynamic): logits = the sum over L of a Conv (2 channels, kernel 3); its data, export and checkpoint."""
    from onnx import TensorProto, helper, numpy_helper

    from tasks.data import splits_from_dataset

    root = tmp_path_factory.mktemp("sequence")
    x = np.random.default_rng(9).normal(size=(100, 1, 4)).astype(np.float32)
    np.savez(root / "seq.npz", x=x, y=(x.sum((1, 2)) > 0).astype(np.int64))
    data = splits_from_dataset(DataConfig(dataset=root / "seq.npz"), root)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "k"], ["c"], pads=[1, 1], name="conv"), helper.make_node("ReduceSum", ["c", "axes"], ["logits"], keepdims=0)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, "L"])], [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2])],
        [numpy_helper.from_array(K, "k"), numpy_helper.from_array(np.array([2], np.int64), "axes")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    exported = _artifact(root, "export", {"model.onnx": model.SerializeToString()}, {"inputs": ["x"], "outputs": ["logits"], "precision": "fp32"})
    checkpoint = _artifact(root, "train", {"model.pt": b"stands for a sequence model"}, {"outputs": ["logits"], "logits_output": "logits"})
    return root, data, exported, checkpoint


def test_a_variable_length_model_is_verified_at_each_points_lengths_against_the_reference_there(sequence_model, monkeypatch):
    """L dynamic (2, 3, 6; the data's 4, cut or padded with 1.0): every point is run at its length and compared with PyTorch's
    outputs at that length and pad value, the fp16 emulation at the opt point too."""
    import tasks.verify
    from tasks.config import EngineProfile
    from tasks.data import split_inputs
    from tasks.shapes import fit_lengths

    tmp_path, data, exported, checkpoint = sequence_model
    k = K

    def conv_sum(a):  # what the graph computes, in numpy
        padded = np.pad(a[:, 0], ((0, 0), (1, 1)))
        return np.stack([sum(k[o, 0, j] * padded[:, j: j + a.shape[2]] for j in range(3)).sum(1) for o in range(2)], axis=1).astype(np.float32)

    asked = []

    def reference_at(ckpt, d, point, pads):
        asked.append((ckpt.digest, d.digest, point.key(), dict(pads)))
        return {"logits": conv_sum(fit_lengths(split_inputs(d, "test"), point.lengths, pads)["x"])}

    monkeypatch.setattr(tasks.verify, "reference_outputs", lambda ckpt, d: {"logits": conv_sum(split_inputs(d, "test")["x"])})
    monkeypatch.setattr(tasks.verify, "reference_outputs_at", reference_at)
    profile = EngineProfile(min=1, opt=8, max=16, axes={"x": {2: (2, 3, 6)}}, lengths={"x": {2: 4}}, pad_values={"x": 1.0})
    for precision in (Precision.fp32, Precision.fp16):
        variant = variant_from_onnx(exported, data, precision, 64, tmp_path)
        engine = engine_from_variant(variant, Backend.onnxruntime, profile, {"threads": 1}, tmp_path)
        ref = verification_of_engine(engine, checkpoint, data, precision, default_tolerances()[precision], profile, tmp_path, variant=variant)
        report = json.loads(ref.path("verification.json").read_text())
        assert report["passed"], report["failures"]
        labels = [b["label"] for b in report["batches"]]
        assert labels[:5] == [f"{precision.value} x:1x1x2", f"{precision.value} x:8x1x3", f"{precision.value} x:8x1x3 repeated rows",
                              f"{precision.value} x:16x1x6", f"{precision.value} x:16x1x6 repeated rows"]
        points = [(1, (("x", ((2, 2),)),)), (8, (("x", ((2, 3),)),)), (16, (("x", ((2, 6),)),))]
        if precision is Precision.fp16:  # the emulation at the opt point, fitted to its length, against the reference there
            assert labels[5:] == ["fp16 emulated x:8x1x3", "fp16 emulated x:8x1x3 repeated rows"] and report["emulation"]["rounded_tensors"] >= 1
            points.append((8, (("x", ((2, 3),)),)))
        assert asked == [(checkpoint.digest, data.digest, p, {"x": 1.0}) for p in points]
        assert report["shapes"][2] == {"level": "max", "batch": 16, "shapes": {"x": [16, 1, 6]}, "label": f"{precision.value} x:16x1x6"}
        asked.clear()


def test_an_int8_engine_whose_qdq_runs_in_fp32_says_so_in_its_numerics(branch, small_data, monkeypatch, tmp_path):
    """On a CPU whose int8 kernels saturate, ONNX Runtime runs the Q/DQ nodes in fp32: the report says that the
    int8 rounding was verified, not int8 kernels (on either kind of CPU, by standing in for the check)."""
    import tasks.backends.onnxruntime as ort
    from tasks.verify import INT8_AS_FP32

    monkeypatch.setattr(ort, "int8_kernels_saturate", lambda flags=None: True)
    root, checkpoint, built = branch
    variant, _ = built[Precision.int8]
    engine = engine_from_variant(variant, Backend.onnxruntime, BATCH, {"threads": 1}, tmp_path)
    assert engine.meta["graph_optimization"] == ort.QDQ_IN_FP32
    ref = verification_of_engine(engine, checkpoint, small_data, Precision.int8, default_tolerances()[Precision.int8], BATCH, tmp_path, variant=variant)
    assert ref.meta["numerics"] == INT8_AS_FP32 and ref.meta["passed"]


def test_labelled_data_without_a_logits_output_says_why_no_task_metric_ran(branch, small_data, monkeypatch):
    import tasks.verify
    from tasks.data import split_inputs
    from tasks.verify_comparison import TASK_CHECKS

    root, _, built = branch
    variant, engine = built[Precision.fp32]
    checkpoint = _artifact(root, "train", {"model.pt": b"a model naming no logits output"}, {"outputs": ["logits", "emb"]})
    x = split_inputs(small_data, "test")["x"]
    monkeypatch.setattr(tasks.verify, "reference_outputs", lambda ckpt, data: {"logits": x @ W, "emb": x @ V})
    ref = verification_of_engine(engine, checkpoint, small_data, Precision.fp32, default_tolerances()[Precision.fp32], BATCH, root, variant=variant)
    report = json.loads(ref.path("verification.json").read_text())
    assert report["passed"] and report["logits_output"] is None and report["confusion"] is None and report["task"] == "classification"
    assert report["checks_skipped"] == {c: "no logits output" for c in TASK_CHECKS}


def test_a_verification_is_kept_per_variant_and_a_rerun_names_the_input_that_changed(branch, small_data, caplog):
    import logging

    root, checkpoint, built = branch
    variant, engine = built[Precision.fp16]
    kept, _ = built["fp16-kept"]
    # Gates no other test uses: every call below is computed here (another test's verification of the
    # same engine would be a cache hit that leaves no record of this one's inputs to compare with).
    tol = default_tolerances()[Precision.fp16].model_copy(update={"atol": 0.0123})
    assert verification_of_engine(engine, checkpoint, small_data, Precision.fp16, tol, BATCH, root, variant=variant).meta["passed"]
    # the same engine judged through another variant (its share, its emulation) is another verification, not the cached one
    with pytest.raises(PrecisionShareError):
        verification_of_engine(engine, checkpoint, small_data, Precision.fp16, tol, BATCH, root, variant=kept)
    looser = tol.model_copy(update={"atol": 0.0456})
    caplog.clear()  # the calls above may have said why they ran (when another test left the logger at INFO)
    with caplog.at_level(logging.INFO, logger="trtflow"):
        verification_of_engine(engine, checkpoint, small_data, Precision.fp16, looser, BATCH, root, variant=variant)
        verification_of_engine(engine, checkpoint, small_data, Precision.fp16, looser, BatchProfile(min=1, opt=8, max=32), root, variant=variant)
    said = [r.getMessage() for r in caplog.records if r.name == "trtflow.stage"]
    # the variant went back from the kept one: named as the input it is
    assert said[0].startswith("verify-fp16: tolerance changed (atol 0.0123 -> 0.0456); variant changed") and said[1:] == ["verify-fp16: batch changed (max 64 -> 32)"]


def test_the_reference_runs_with_the_trainings_thread_count():
    from tasks.verify import reference_threads

    assert reference_threads(SimpleNamespace(meta={"config": {"threads": 3}, "torch_threads": 2})) == 3
    assert reference_threads(SimpleNamespace(meta={"config": {"threads": None}, "torch_threads": 2})) == 2
    assert reference_threads(SimpleNamespace(meta={"torch_threads": 4})) == 4
    assert reference_threads(SimpleNamespace(meta={})) == 1


# --- the stage on the session's tiny trained model (the default CNN on digits) --------------------


@pytest.mark.parametrize("precision", [Precision.fp32, Precision.fp16])
def test_the_default_model_verifies_with_default_tolerances(trained, tmp_path, precision):
    variant = variant_from_onnx(trained.onnx, trained.data, precision, 64, tmp_path)
    engine = engine_from_variant(variant, Backend.onnxruntime, BATCH, {"threads": 1}, tmp_path)
    ref = verification_of_engine(engine, trained.checkpoint, trained.data, precision, default_tolerances()[precision], BATCH, tmp_path, variant=variant)
    n = trained.data.meta["sizes"]["test"]
    assert ref.meta["passed"] and ref.meta["samples"] == n and all(r["distinct_samples"] == n for r in ref.meta["batches_run"])
    # two Conv and two Gemm, every one in the engine's precision
    assert ref.meta["compute"]["operators"] == 4 and ref.meta["compute"]["share"] == 1.0, ref.meta["compute"]
    for key in ("max_abs", "mean_abs", "max_rel", "min_cosine", "top1_agreement", "accuracy", "accuracy_reference", "accuracy_drop"):
        assert ref.meta[key] is not None


def test_the_share_comes_from_tensorrt_layers_else_from_the_onnx_graph(branch, small_data):
    from tasks.verify import compute_share_of

    root, _, built = branch
    variant, ort_engine = built[Precision.int8]

    def trt_engine(files, **meta):
        return _artifact(root, "build", {"engine.plan": b"a plan", **files}, {**ort_engine.meta, "backend": "tensorrt", "engine_file": "engine.plan", **meta})

    typed = {"Layers": [{"LayerType": "CaskGemm", "Inputs": [{"Format/Datatype": "Int8"}]}, {"LayerType": "CaskConvolution", "Inputs": [{"Format/Datatype": "Half"}]}]}
    share = compute_share_of(trt_engine({"layers.json": json.dumps(typed).encode()}, layers_file="layers.json"), variant)
    assert share.source == "tensorrt engine inspector" and share.by_precision == {"fp16": 1, "int8": 1}
    missing = trt_engine({}, layers_file="layers.json")  # named in the engine info, but not among its files
    assert compute_share_of(missing, variant).source == "onnx graph"
    untyped = trt_engine({"layers.json": b'{"Layers": ["fc"]}'}, layers_file="layers.json")
    fallback = compute_share_of(untyped, variant)
    assert fallback.source == "onnx graph (the engine's layer report types no compute layer)" and fallback.by_precision == {"int8": 2}
    assert compute_share_of(untyped, None) is None  # a plan and no graph: nothing to count from
    plain = compute_share_of(trt_engine({}), variant)  # no layer report at all (e.g. TensorRT-RTX)
    assert plain.source == "onnx graph" and plain.by_precision == {"int8": 2}
    own = compute_share_of(ort_engine, None)  # ONNX Runtime's engine is an ONNX file itself
    assert own.source == "onnx graph" and own.by_precision == {"int8": 2}


def test_the_fp16_emulation_runs_with_the_engine_threads_labels_and_task_output(branch, small_data, monkeypatch):
    import tasks.verify
    import tasks.verify_reference

    real, threads = tasks.verify.emulation_runner, []
    monkeypatch.setattr(tasks.verify, "emulation_runner", lambda path, folder, elem_type, n=None: (threads.append(n), real(path, folder, elem_type, n))[1])
    ref = _verify(branch, small_data, Precision.fp16, refresh=True)
    assert threads == [1]  # the engine was built with one thread
    report = json.loads(ref.path("verification.json").read_text())
    by_label = {b["label"]: b for b in report["batches"]}
    emulated = by_label["fp16 emulated batch 8"]["outputs"]["logits"]
    assert emulated["accuracy"] is not None and emulated["top1_agreement"] is not None  # labels and the logits output
    assert by_label["fp16 emulated batch 8"]["outputs"]["emb"]["top1_agreement"] is None
    assert "fp16 emulated batch 8 repeated rows" in by_label and report["emulation"]["rounded_tensors"] >= 2


def test_fp16_numerics_say_what_was_verified_when_the_emulation_is_missing_or_broken(branch, small_data, monkeypatch, caplog, tmp_path):
    import tasks.verify
    import tasks.verify_reference

    root, checkpoint, built = branch
    variant, engine = built[Precision.fp16]
    tol = default_tolerances()[Precision.fp16]
    # Without the variant there is no emulation, and the count comes from the engine's own graph, in
    # which ONNX Runtime's CPU provider computes the product in fp32: not an fp16 engine.
    with pytest.raises(PrecisionShareError) as plain:
        verification_of_engine(engine, checkpoint, small_data, Precision.fp16, tol, BATCH, root)
    meta = plain.value.artifact.meta
    assert meta["numerics"] == "fp16 weights, computed in fp32 (not emulated)" and meta["compute"]["by_precision"] == {"fp32": 2}
    assert plain.value.summary == "PrecisionShareError: fp16: 0 of 2 compute operators run in fp16; the model has no fp16 benefit; drop fp16"
    assert _verify(branch, small_data, Precision.fp16).meta["numerics"] == EMULATED  # with its variant: another verification

    def broken(*_, **__):
        raise RuntimeError("unsupported op" + " in a node" * 30)

    monkeypatch.setattr(tasks.verify, "emulation_runner", broken)
    with caplog.at_level("WARNING", logger="trtflow.verify"):
        # its own store: this verdict of a broken emulation must not stand in for the real one in other tests
        ref = verification_of_engine(engine, checkpoint, small_data, Precision.fp16, tol, BATCH, tmp_path, variant=variant)
    message = "unsupported op" + " in a node" * 30
    assert ref.meta["numerics"] == f"fp16 weights, computed in fp32 (emulation failed: {message[:200]})"
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        f"verify: the fp16 emulation could not run ({message}); fp16 numerics not verified"]
    assert not any(b["label"].startswith("fp16 emulated") for b in json.loads(ref.path("verification.json").read_text())["batches"])


def test_the_summary_of_a_regression_keeps_its_worst_figures_shapes_and_heads():
    def batch(**figures: float) -> dict:
        return {"outputs": {"y": figures}, "checks": []}

    report = {
        "precision": "fp16", "backend": "onnxruntime", "passed": True, "samples": 4, "task": "regression",
        "outputs_not_judged": {"aux": "verified against PyTorch only"},
        "shapes": [{"label": "fp16 batch 1"}, {"label": "fp16 batch 8 × length 16"}],
        "batches": [
            batch(r2_reference=0.9, r2=0.85, r2_drop=0.05, mae_reference=0.2, mae=0.3, rmse=0.4),
            batch(r2_reference=0.8, r2=0.7, r2_drop=0.1, mae_reference=0.1, mae=0.5, rmse=0.6),
        ],
    }
    s = summary_of(report)
    # the engine's worst over batches (lowest R², highest drop, MAE, RMSE); the reference's best R² and MAE
    assert (s["r2_reference"], s["r2"], s["r2_drop"]) == (0.9, 0.7, 0.1)
    assert (s["mae_reference"], s["mae"], s["rmse"]) == (0.1, 0.5, 0.6)
    assert s["task"] == "regression" and s["outputs_not_judged"] == {"aux": "verified against PyTorch only"}
    assert s["shapes"] == ["fp16 batch 1", "fp16 batch 8 × length 16"]


def test_outputs_not_judged_say_whether_trtflow_trained_them():
    from tasks.verify import not_judged

    trained, loaded = SimpleNamespace(meta={"mode": "train"}), SimpleNamespace(meta={"mode": "load"})
    assert not_judged(trained, ["logits", "emb"], None) == {}
    assert not_judged(trained, ["logits", "emb"], "logits") == {
        "emb": "not trained (the loss used only 'logits') and not scored against labels: verified against PyTorch only"}
    assert not_judged(SimpleNamespace(meta={}), ["logits", "emb"], "logits") == not_judged(trained, ["logits", "emb"], "logits")
    assert not_judged(loaded, ["logits", "emb"], "logits") == {
        "emb": "not scored against labels (the weights were loaded as given): verified against PyTorch only"}


def test_the_checks_named_are_the_checks_that_ran():
    from tasks.verify_comparison import checks_of

    def results(*pairs: tuple[str, str]) -> list:
        return [SimpleNamespace(checks=[SimpleNamespace(output=o, metric=m) for o, m in pairs])]

    tol = Tolerance(atol=0.1)
    run, skipped = checks_of(Precision.fp16, tol, results(("y", "max_relative_rmse"), ("z", "max_relative_rmse"), ("y", "max_relative_rmse")),
                             {"y"}, regression=True, labelled=True)
    assert run == ["elementwise (atol/rtol)", "relative RMSE (y, z)", "R² drop (R², MAE, RMSE against the labels)"] and skipped == {}
    run, skipped = checks_of(Precision.fp16, tol, results(("y", "max_abs")), set(), regression=True, labelled=False)
    assert run == ["elementwise (atol/rtol)"] and skipped == {"R² drop": "the dataset has no labels"}
    run, _ = checks_of(Precision.fp32, tol, results(("y", "max_abs"), ("y", "min_cosine")), set(), regression=True, labelled=False)
    assert run == ["elementwise (atol/rtol)", "cosine per sample"]
