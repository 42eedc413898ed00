"""Output statistics of an engine against the reference, thresholds, and one verdict."""

import json

import numpy as np
import pytest

from tasks.compare import compare_outputs, output_stats
from tasks.config import Tolerance
from tasks.verify_result import summary_of

TOL = Tolerance(atol=1e-3, rtol=1e-3, min_cosine=0.999, min_top1_agreement=0.99, max_accuracy_drop=0.01)


def _logits(n=50, classes=4, seed=0):
    return np.random.default_rng(seed).normal(size=(n, classes)).astype(np.float32)


def test_identical_outputs_pass_with_zero_error():
    ref = _logits()
    labels = ref.argmax(1)
    r = compare_outputs({"y": ref}, {"y": ref.copy()}, TOL, "fp32 batch 1", labels=labels)
    assert r.passed and r.failures() == []
    s = r.outputs["y"]
    assert s.max_abs == 0.0 and s.mean_abs == 0.0 and s.max_rel == 0.0
    assert s.min_cosine == pytest.approx(1.0) and s.within_tolerance == 1.0 and s.top1_agreement == 1.0
    assert s.accuracy_drop == 0.0


def test_statistics_are_exact():
    ref = np.array([[1.0, 2.0], [3.0, 4.0]], dtype=np.float32)
    out = np.array([[1.0, 2.5], [3.0, 4.0]], dtype=np.float32)
    s = output_stats("y", ref, out, Tolerance(atol=0.1, rtol=0.0))
    assert s.max_abs == pytest.approx(0.5) and s.mean_abs == pytest.approx(0.125)
    assert s.max_rel == pytest.approx(0.25) and s.mean_rel == pytest.approx(0.0625)
    assert s.within_tolerance == pytest.approx(0.75)
    cos0 = (1 * 1 + 2 * 2.5) / (np.hypot(1, 2) * np.hypot(1, 2.5))
    assert s.min_cosine == pytest.approx(cos0) and s.mean_cosine == pytest.approx((cos0 + 1) / 2)
    assert s.top1_agreement == 1.0


def test_one_bad_sample_cannot_hide_in_an_average():
    ref = _logits(n=1000)
    out = ref.copy()
    out[7] = -out[7]  # one sample flipped
    r = compare_outputs({"y": ref}, {"y": out}, Tolerance(atol=None, rtol=None, min_cosine=0.99), "x")
    s = r.outputs["y"]
    assert s.mean_cosine > 0.99  # the average looks fine ...
    assert s.min_cosine == pytest.approx(-1.0)  # ... the worst sample does not
    assert not r.passed and any("min_cosine" in f for f in r.failures())


def test_every_failing_check_is_collected():
    ref = _logits()
    labels = ref.argmax(1)
    out = ref + np.random.default_rng(1).normal(scale=2.0, size=ref.shape).astype(np.float32)
    r = compare_outputs({"y": ref}, {"y": out}, TOL, "fp16 batch 8", labels=labels)
    failing = {c.metric for c in r.checks if not c.passed}
    assert {"min_cosine", "top1_agreement", "accuracy_drop"} <= failing
    assert any(m.startswith("share within") for m in failing)
    assert all(f.startswith("fp16 batch 8: y.") for f in r.failures())
    assert len(r.failures()) == len(failing)


def test_none_thresholds_skip_elementwise_checks():
    ref = _logits()
    out = ref * 1.5  # same direction and argmax, large elementwise error
    r = compare_outputs({"y": ref}, {"y": out}, Tolerance(atol=None, rtol=None), "int8 batch 1")
    assert r.outputs["y"].within_tolerance is None
    assert not any(c.metric.startswith("share within") for c in r.checks)
    assert r.passed


def test_shape_mismatch_missing_output_and_nan_fail():
    ref = _logits()
    bad = ref.copy()
    bad[0, 0] = np.nan
    r = compare_outputs(
        {"a": ref, "b": ref, "c": ref},
        {"a": ref[:, :2], "c": bad},
        TOL,
        "fp32 batch 1",
    )
    metrics = [c.metric for c in r.checks]
    assert any(m.startswith("shape") for m in metrics)
    assert "present" in metrics and "finite share" in metrics
    assert not r.passed and len(r.failures()) == 3 and r.outputs == {}


def test_result_serializes():
    ref = _logits()
    r = compare_outputs({"y": ref}, {"y": ref + 1e-5}, TOL, "fp32 batch 1", labels=ref.argmax(1))
    d = json.loads(json.dumps(r.to_dict()))
    assert d["label"] == "fp32 batch 1" and d["passed"] is True
    assert d["outputs"]["y"]["accuracy_drop"] == 0.0
    assert {c["metric"] for c in d["checks"]} >= {"min_cosine", "top1_agreement", "accuracy_drop"}


# --- balanced accuracy (issue 7) -------------------------------------------------------------------


def _one_hot_logits(pred: np.ndarray, classes: int) -> np.ndarray:
    out = np.zeros((len(pred), classes), dtype=np.float32)
    out[np.arange(len(pred)), pred] = 5.0
    return out


def test_balanced_accuracy_beside_accuracy():
    # 80% class 0: a reference that is always right, a candidate that answers 0 for everything.
    y = np.repeat([0, 1, 2], [80, 10, 10])
    ref, out = _one_hot_logits(y, 3), _one_hot_logits(np.zeros_like(y), 3)
    s = output_stats("logits", ref, out, Tolerance(), labels=y)
    assert s.accuracy_reference == 1.0 and s.balanced_accuracy_reference == 1.0
    assert s.accuracy == pytest.approx(0.8)  # looks fine ...
    assert s.balanced_accuracy == pytest.approx(1 / 3)  # ... but is chance


def test_no_labels_no_balanced_accuracy():
    ref = _one_hot_logits(np.array([0, 1]), 2)
    s = output_stats("logits", ref, ref, Tolerance())
    assert s.balanced_accuracy is None and s.balanced_accuracy_reference is None


def test_balanced_accuracy_in_report_and_summary_worst_over_batches():
    y = np.repeat([0, 1], [6, 4])
    ref = _one_hot_logits(y, 2)
    worse = y.copy()
    worse[6] = 0  # one class-1 sample wrong: recall 1.0 and 0.75
    results = [
        compare_outputs({"logits": ref}, {"logits": ref}, Tolerance(), "fp32 batch 1", labels=y),
        compare_outputs({"logits": ref}, {"logits": _one_hot_logits(worse, 2)}, Tolerance(), "fp32 batch 8", labels=y),
    ]
    assert results[1].to_dict()["outputs"]["logits"]["balanced_accuracy"] == pytest.approx(0.875)
    report = {"precision": "fp32", "backend": "onnxruntime", "passed": True, "samples": 10, "batches": [r.to_dict() for r in results]}
    summary = summary_of(report)
    assert summary["balanced_accuracy_reference"] == 1.0
    assert summary["balanced_accuracy"] == pytest.approx(0.875)


def test_an_error_exactly_at_atol_is_within_and_identical_outputs_pass_at_zero():
    ref = np.array([[1.0, 2.0], [3.0, 4.0]], dtype=np.float32)
    exact = compare_outputs({"y": ref}, {"y": ref.copy()}, Tolerance(atol=0.0, rtol=0.0), "b")
    assert exact.passed and exact.outputs["y"].within_tolerance == 1.0
    at = compare_outputs({"y": ref}, {"y": ref + np.float32(0.5)}, Tolerance(atol=0.5, rtol=0.0, min_cosine=0.9), "b")
    assert at.passed and at.outputs["y"].within_tolerance == 1.0  # |error| == atol counts as within
    over = compare_outputs({"y": ref}, {"y": ref + np.float32(0.5001)}, Tolerance(atol=0.5, rtol=0.0, min_cosine=0.9), "b")
    assert not over.passed and over.outputs["y"].within_tolerance == 0.0


def test_an_error_above_atol_passes_within_rtol_of_the_reference_magnitude():
    ref = np.array([[10.0, -20.0]], dtype=np.float32)
    tol = Tolerance(atol=0.1, rtol=0.1, min_cosine=0.9)
    # errors 0.5 and 1.0 exceed atol but not atol + rtol·|ref| (1.1 and 2.1): |ref|, also for negative values
    near = compare_outputs({"y": ref}, {"y": np.array([[10.5, -21.0]], dtype=np.float32)}, tol, "b")
    assert near.passed and near.outputs["y"].within_tolerance == 1.0
    far = compare_outputs({"y": ref}, {"y": np.array([[10.5, -22.2]], dtype=np.float32)}, tol, "b")  # 2.2 > 2.1
    assert not far.passed and far.outputs["y"].within_tolerance == 0.5
    assert "y.share within atol=0.1 rtol=0.1 = 0.5 (threshold >= 1)" in far.failures()[0]


def test_thresholds_met_exactly_pass():
    ref = np.eye(4, dtype=np.float32)[np.arange(50) % 4] + 0.1
    labels = ref.argmax(1)
    out = ref.copy()
    out[0] = np.roll(out[0], 1)  # one of 50 samples changes its class: agreement 0.98, accuracy drop 0.02
    tol = Tolerance(atol=None, rtol=None, min_cosine=-1.0, min_top1_agreement=0.98, max_accuracy_drop=0.02)
    r = compare_outputs({"y": ref}, {"y": out}, tol, "int8 batch 1", labels=labels)
    s = r.outputs["y"]
    assert s.top1_agreement == 0.98 and s.accuracy_drop == pytest.approx(0.02)
    assert r.passed, r.failures()
    stricter = compare_outputs({"y": ref}, {"y": out}, tol.model_copy(update={"min_top1_agreement": 0.99, "max_accuracy_drop": 0.019}), "b", labels=labels)
    assert {c.metric for c in stricter.checks if not c.passed} == {"top1_agreement", "accuracy_drop"}


def test_missing_misshapen_and_non_finite_outputs_fail_by_name_and_the_rest_is_still_checked():
    ref = {"a": np.ones((2, 2), np.float32), "b": np.ones((2, 2), np.float32), "c": np.ones((2, 2), np.float32), "d": np.ones((2, 2), np.float32)}
    got = {"b": np.ones((2, 3), np.float32), "c": np.array([[1.0, np.inf], [1.0, 1.0]], np.float32), "d": np.ones((2, 2), np.float32)}
    r = compare_outputs(ref, got, Tolerance(atol=0.0, rtol=0.0), "fp16 batch 2")
    from tasks.compare import Check

    assert r.checks[:3] == [
        Check("a", "present", 0.0, 1.0, False, ">="),
        Check("b", "shape (2, 3) vs (2, 2)", 0.0, 1.0, False, ">="),
        Check("c", "finite share", 0.75, 1.0, False, ">="),
    ]
    assert set(r.outputs) == {"d"} and r.outputs["d"].name == "d"  # after three failures, d is still compared
    assert r.failures()[:3] == [
        "fp16 batch 2: a.present = 0 (threshold >= 1)",
        "fp16 batch 2: b.shape (2, 3) vs (2, 2) = 0 (threshold >= 1)",
        "fp16 batch 2: c.finite share = 0.75 (threshold >= 1)",
    ]


def test_failures_name_each_threshold_and_its_direction():
    ref = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    out = ref[::-1].copy()
    r = compare_outputs({"y": ref}, {"y": out}, TOL, "int8 batch 8", labels=np.array([0, 1]))
    assert r.failures() == [
        "int8 batch 8: y.share within atol=0.001 rtol=0.001 = 0 (threshold >= 1)",
        "int8 batch 8: y.min_cosine = 0 (threshold >= 0.999)",
        "int8 batch 8: y.top1_agreement = 0 (threshold >= 0.99)",
        "int8 batch 8: y.accuracy_drop = 1 (threshold <= 0.01)",
    ]


def test_a_cosine_exactly_at_its_threshold_passes_and_atol_alone_checks_elements():
    ref = np.array([[1.0, 0.0], [0.0, 2.0]], dtype=np.float32)
    r = compare_outputs({"y": ref}, {"y": ref.copy()}, Tolerance(min_cosine=1.0), "b")
    assert r.outputs["y"].min_cosine == 1.0 and r.passed
    only_atol = compare_outputs({"y": ref}, {"y": ref + np.float32(0.25)}, Tolerance(atol=0.1, min_cosine=-1.0), "b")
    assert only_atol.outputs["y"].within_tolerance == 0.0 and not only_atol.passed
    only_rtol = compare_outputs({"y": ref}, {"y": ref * np.float32(1.5)}, Tolerance(rtol=0.5, min_cosine=-1.0), "b")
    assert only_rtol.outputs["y"].within_tolerance == 1.0 and only_rtol.passed


def test_labels_beyond_the_logits_count_as_classes_never_predicted():
    ref = np.eye(3, dtype=np.float32)[[0, 1, 2, 0]]
    s = output_stats("y", ref, ref.copy(), Tolerance(), labels=np.array([0, 1, 2, 3]))
    assert s.balanced_accuracy == pytest.approx(0.75) and s.balanced_accuracy_reference == pytest.approx(0.75)  # class 3: recall 0


def test_regression_figures_against_the_labels_are_r2_mae_and_rmse():
    from tasks.compare import regression_against_labels

    y = np.array([1.0, 2.0, 3.0, 4.0])
    # One error of 1 on four samples: MAE 0.25, RMSE 0.5, R² 1 - 1/5 (the labels' squared spread is 5).
    got = regression_against_labels(np.array([[1.0], [2.0], [3.0], [5.0]], dtype=np.float32), y)
    assert got == {"r2": pytest.approx(0.8), "mae": pytest.approx(0.25), "rmse": pytest.approx(0.5)}
    assert all(type(v) is float for v in got.values())  # JSON-ready
    # Two targets: R² is the mean of each target's (1.0 and 0.8), not one R² over the flattened values.
    two = regression_against_labels(np.stack([y, [1.0, 2.0, 3.0, 5.0]], axis=1), np.stack([y, y], axis=1))
    assert two["r2"] == pytest.approx(0.9) and two["mae"] == pytest.approx(0.125) and two["rmse"] == pytest.approx(0.5 ** 1.5)


def test_relative_rmse_is_the_worst_column_against_its_own_spread():
    from tasks.compare import relative_rmse

    ref = np.array([[0.0, 10.0], [2.0, 10.0], [4.0, 10.0]])
    out = ref + np.array([0.1, 1.0])
    # column 0: RMSE 0.1 over a spread of 1.63; column 1 does not vary: RMSE 1 over its RMS value 10
    assert relative_rmse(ref, out) == pytest.approx(0.1)
    assert relative_rmse(ref.reshape(3, 1, 2), out.reshape(3, 1, 2)) == pytest.approx(0.1)  # any width, per value
    one_bad = ref.copy()
    one_bad[0, 0] += 0.3  # one sample off: RMSE over samples, per column (sqrt(0.09 / 3) / 1.63)
    assert relative_rmse(ref, one_bad) == pytest.approx(np.sqrt(0.03) / np.std(ref[:, 0]))
    # a few rows measured against the whole split's spread (stds 10 and 5)
    spread = np.array([[0.0, 5.0], [20.0, 15.0]])
    assert relative_rmse(ref, out, spread) == pytest.approx(0.2)
    assert relative_rmse(np.zeros((3, 0)), np.zeros((3, 0))) == 0.0  # an output with no values
    got = compare_outputs({"y": ref.astype(np.float32)}, {"y": out.astype(np.float32)}, Tolerance(), "b", spread_of={"y": spread})
    assert got.outputs["y"].max_relative_rmse == pytest.approx(0.2, rel=1e-5)
    assert compare_outputs({"y": ref.astype(np.float32)}, {"y": out.astype(np.float32)}, Tolerance(), "b").outputs["y"].max_relative_rmse == pytest.approx(0.1, rel=1e-5)


def _judged(result) -> dict[str, list[str]]:
    """Output -> the metrics it was checked by, elementwise shares left out."""
    out: dict[str, list[str]] = {}
    for c in result.checks:
        if not c.metric.startswith("share within"):
            out.setdefault(c.output, []).append(c.metric)
    return out


def test_which_outputs_are_judged_by_relative_rmse_cosine_or_task_metrics():
    rng = np.random.default_rng(1)
    wide, narrow = rng.normal(size=(20, 3)).astype(np.float32), rng.normal(size=(20, 1)).astype(np.float32)
    ref = {"logits": wide, "score": narrow, "emb": wide[:, :2].copy()}
    labels, tol = wide.argmax(1), Tolerance(atol=0.0, rtol=0.0)
    # classification: a one-value output by relative RMSE (a cosine of one value is its sign), the others by cosine;
    # the task metrics on the task output only
    cls = compare_outputs(ref, {k: v.copy() for k, v in ref.items()}, tol, "b", labels=labels, task_outputs={"logits"})
    assert _judged(cls) == {"logits": ["min_cosine", "top1_agreement", "accuracy_drop"], "score": ["max_relative_rmse"], "emb": ["min_cosine"]}
    assert cls.outputs["score"].min_cosine is None and cls.outputs["emb"].accuracy is None and cls.outputs["logits"].accuracy == 1.0
    every = compare_outputs(ref, {k: v.copy() for k, v in ref.items()}, tol, "b", labels=labels)  # no task outputs named: every 2-D one
    assert every.outputs["emb"].top1_agreement == 1.0 and every.outputs["emb"].accuracy is not None
    # regression: the task output by relative RMSE and R² drop against the labels; another head by its cosine, never scored
    y = narrow[:, 0].astype(np.float64) + 0.1
    reg = compare_outputs(ref, {k: v.copy() for k, v in ref.items()}, tol, "b", labels=y, task_outputs={"score"}, regression=True)
    assert _judged(reg) == {"logits": ["min_cosine"], "score": ["max_relative_rmse", "r2_drop"], "emb": ["min_cosine"]}
    assert reg.outputs["score"].r2 is not None and reg.outputs["logits"].r2 is None and reg.outputs["logits"].top1_agreement is None
    wide_task = compare_outputs(ref, {k: v.copy() for k, v in ref.items()}, tol, "b", task_outputs={"emb"}, regression=True)
    assert _judged(wide_task) == {"logits": ["min_cosine"], "score": ["max_relative_rmse"], "emb": ["max_relative_rmse"]}  # a wide prediction too
    # a regression without labels (or naming no task output): every output is a prediction, by relative RMSE
    for task_outputs in (None, set()):
        unlabelled = compare_outputs(ref, {k: v.copy() for k, v in ref.items()}, tol, "b", task_outputs=task_outputs, regression=True)
        assert _judged(unlabelled) == {"logits": ["max_relative_rmse"], "score": ["max_relative_rmse"], "emb": ["max_relative_rmse"]}
        assert all(s.r2 is None and s.top1_agreement is None for s in unlabelled.outputs.values())
    # rows compared without task metrics (task_outputs empty) are judged like the split's outputs (judged_as)
    rows = compare_outputs(ref, {k: v.copy() for k, v in ref.items()}, tol, "b", task_outputs=set(), regression=True, judged_as={"logits"})
    assert _judged(rows) == {"logits": ["max_relative_rmse"], "score": ["max_relative_rmse"], "emb": ["min_cosine"]}
    cls_rows = compare_outputs(ref, {k: v.copy() for k, v in ref.items()}, tol, "b", labels=labels, task_outputs=set(), judged_as={"logits"})
    assert _judged(cls_rows) == {"logits": ["min_cosine"], "score": ["max_relative_rmse"], "emb": ["min_cosine"]}


def test_an_r2_drop_exactly_at_its_threshold_passes_and_above_it_fails():
    y = np.array([1.0, 2.0, 3.0, 4.0])
    ref = y.reshape(4, 1).astype(np.float32)
    out = np.array([[1.0], [2.0], [3.0], [5.0]], dtype=np.float32)  # R² 0.8 against PyTorch's 1.0
    at = compare_outputs({"y": ref}, {"y": out}, Tolerance(max_relative_rmse=10.0, max_r2_drop=0.2), "b", labels=y, regression=True)
    s = at.outputs["y"]
    assert (s.r2_reference, s.r2, s.mae, s.mae_reference, s.rmse, s.rmse_reference) == pytest.approx((1.0, 0.8, 0.25, 0.0, 0.5, 0.0))
    assert s.r2_drop == pytest.approx(0.2) and at.passed, at.failures()
    over = compare_outputs({"y": ref}, {"y": out}, Tolerance(max_relative_rmse=10.0, max_r2_drop=0.19), "b", labels=y, regression=True)
    assert over.failures() == ["b: y.r2_drop = 0.2 (threshold <= 0.19)"]
    rmse = compare_outputs({"y": ref}, {"y": out}, Tolerance(max_relative_rmse=0.1, max_r2_drop=1.0), "b", labels=y, regression=True)
    assert rmse.failures() == [f"b: y.max_relative_rmse = {0.5 / np.std(y):.6g} (threshold <= 0.1)"]
    exact = compare_outputs({"y": ref}, {"y": out}, Tolerance(max_relative_rmse=float(s.max_relative_rmse), max_r2_drop=1.0), "b", labels=y, regression=True)
    assert exact.passed  # a relative RMSE at its threshold passes
