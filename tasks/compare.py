"""Compare engine outputs with the PyTorch reference: statistics, thresholds, one verdict.

Every output of every batch is checked and every failing check collected before anything is raised,
so one run shows the whole picture (unlike tools that stop at the first mismatch or only warn).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from tasks.config import Tolerance
from tasks.metrics import balanced_accuracy

_EPS = 1e-12


@dataclass
class OutputStats:
    """Error statistics of one output tensor against its reference."""

    name: str
    max_abs: float
    mean_abs: float
    max_rel: float
    mean_rel: float
    # None where the output is judged by max_relative_rmse instead (a cosine of one value is only its sign)
    min_cosine: float | None
    mean_cosine: float | None
    within_tolerance: float | None
    top1_agreement: float | None
    accuracy_reference: float | None = None
    accuracy: float | None = None
    # Mean per-class recall: on skewed test data a collapsed engine can keep plain accuracy high.
    balanced_accuracy_reference: float | None = None
    balanced_accuracy: float | None = None
    # RMS error over the reference's spread, worst column: the per-sample cosine's stand-in on regression
    # outputs and outputs one value wide (where the cosine is only +1, -1 or 0).
    max_relative_rmse: float | None = None
    # Regression against the labels: PyTorch's and the engine's.
    r2_reference: float | None = None
    r2: float | None = None
    mae_reference: float | None = None
    mae: float | None = None
    rmse_reference: float | None = None
    rmse: float | None = None

    @property
    def accuracy_drop(self) -> float | None:
        if self.accuracy is None or self.accuracy_reference is None:
            return None
        return self.accuracy_reference - self.accuracy

    @property
    def r2_drop(self) -> float | None:
        if self.r2 is None or self.r2_reference is None:
            return None
        return self.r2_reference - self.r2


@dataclass
class Check:
    """One threshold applied to one statistic."""

    output: str
    metric: str
    value: float
    threshold: float
    passed: bool
    relation: str  # "<=" or ">="

    def describe(self) -> str:
        return f"{self.output}.{self.metric} = {self.value:.6g} (threshold {self.relation} {self.threshold:.6g})"


@dataclass
class ComparisonResult:
    """Statistics and checks of one candidate against the reference."""

    label: str
    outputs: dict[str, OutputStats] = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def failures(self) -> list[str]:
        """Describe every failing check, prefixed with the label (e.g. 'fp16 batch 256')."""
        return [f"{self.label}: {c.describe()}" for c in self.checks if not c.passed]

    def to_dict(self) -> dict[str, Any]:
        out = {k: {**asdict(v), "accuracy_drop": v.accuracy_drop, "r2_drop": v.r2_drop} for k, v in self.outputs.items()}
        return {"label": self.label, "passed": self.passed, "outputs": out, "checks": [asdict(c) for c in self.checks]}


def output_stats(name: str, ref: np.ndarray, out: np.ndarray, tol: Tolerance, labels: np.ndarray | None = None, task: bool = True) -> OutputStats:
    """Compute the statistics of one output.

    Args:
        name: output name.
        ref: reference values (PyTorch fp32).
        out: candidate values, same shape.
        tol: tolerance (for the share of elements within atol + rtol·|ref|).
        labels: ground-truth class per sample, for accuracy and balanced accuracy (2-D logits only).
        task: compute the task metrics (top-1 agreement, accuracy) when the output is 2-D.

    Returns:
        The statistics; cosine is per sample (row), so one bad sample cannot hide in an average.
    """
    ref64, out64 = ref.astype(np.float64), out.astype(np.float64)
    diff = np.abs(out64 - ref64)
    rel = diff / np.maximum(np.abs(ref64), _EPS)
    a, b = ref64.reshape(len(ref64), -1), out64.reshape(len(out64), -1)
    cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), _EPS)
    within = None
    if tol.atol is not None or tol.rtol is not None:
        within = float(np.mean(diff <= (tol.atol or 0.0) + (tol.rtol or 0.0) * np.abs(ref64)))
    top1 = acc_ref = acc = bal_ref = bal = None
    if ref.ndim == 2 and task:
        top1 = float(np.mean(ref.argmax(1) == out.argmax(1)))
        if labels is not None:
            acc_ref = float(np.mean(ref.argmax(1) == labels))
            acc = float(np.mean(out.argmax(1) == labels))
            # Labels beyond the logits cannot be predicted; count them as classes so recall says so.
            n_cls = max(ref.shape[1], int(labels.max()) + 1)
            bal_ref = balanced_accuracy(labels, ref.argmax(1), n_cls)
            bal = balanced_accuracy(labels, out.argmax(1), n_cls)
    return OutputStats(
        name=name,
        max_abs=float(diff.max()),
        mean_abs=float(diff.mean()),
        max_rel=float(rel.max()),
        mean_rel=float(rel.mean()),
        min_cosine=float(cos.min()),
        mean_cosine=float(cos.mean()),
        within_tolerance=within,
        top1_agreement=top1,
        accuracy_reference=acc_ref,
        accuracy=acc,
        balanced_accuracy_reference=bal_ref,
        balanced_accuracy=bal,
    )


def relative_rmse(ref: np.ndarray, out: np.ndarray, spread_of: np.ndarray | None = None) -> float:
    """The worst column's RMS error over the reference's standard deviation (axis 0: samples).

    Meaningful on outputs of any width, one value per sample included: 0.01 means the engine is off by
    1% of how much the output varies across samples. A column that does not vary is measured against
    its RMS value instead (against 1e-12 if that is 0 too).

    Args:
        spread_of: the values whose spread is the scale (default ``ref``): a few rows compared on their
            own (the rows repeated to fill a batch) are measured against the whole split's spread.
    """
    a = ref.astype(np.float64).reshape(len(ref), -1)
    b = out.astype(np.float64).reshape(len(out), -1)
    rmse = np.sqrt(np.mean((b - a) ** 2, axis=0))
    base = a if spread_of is None else spread_of.astype(np.float64).reshape(len(spread_of), -1)
    spread = np.std(base, axis=0)
    scale = np.where(spread > 0, spread, np.sqrt(np.mean(base**2, axis=0)))
    return float(np.max(rmse / np.maximum(scale, _EPS))) if a.size else 0.0


def narrow(ref: np.ndarray) -> bool:
    """Whether an output holds one value per sample, where a per-sample cosine says only its sign."""
    return int(np.prod(ref.shape[1:])) <= 1


def judged_by_relative_rmse(name: str, ref: np.ndarray, task_outputs: Collection[str] | None, regression: bool) -> bool:
    """Whether an output is judged by ``max_relative_rmse`` instead of the per-sample cosine: a
    regression's task output (every output of a regression without labels), or one value per sample."""
    if narrow(ref):
        return True
    return regression and (task_outputs is None or name in task_outputs or not task_outputs)


def regression_against_labels(pred: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """R² (mean over targets), MAE and RMSE of predictions against the labels (scikit-learn's metrics).

    A prediction of shape (N, 1) is compared with labels of shape (N,).
    """
    from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score

    y = np.asarray(labels, dtype=np.float64).reshape(len(labels), -1)
    p = np.asarray(pred, dtype=np.float64).reshape(len(pred), -1)
    return {
        "r2": float(r2_score(y, p, multioutput="uniform_average")),
        "mae": float(mean_absolute_error(y, p)),
        "rmse": float(np.sqrt(mean_squared_error(y, p))),
    }


def compare_outputs(
    reference: Mapping[str, np.ndarray],
    candidate: Mapping[str, np.ndarray],
    tol: Tolerance,
    label: str,
    labels: np.ndarray | None = None,
    task_outputs: Collection[str] | None = None,
    regression: bool = False,
    judged_as: Collection[str] | None = None,
    spread_of: Mapping[str, np.ndarray] | None = None,
) -> ComparisonResult:
    """Compare every output of a candidate with the reference under one precision's tolerance.

    Regression outputs (the task outputs of a regression, every output of a regression without
    labels) and outputs one value wide are judged by ``max_relative_rmse`` instead of the per-sample
    cosine; a regression's task output is also scored against the labels (R², MAE, RMSE; R² drop).

    Args:
        reference: output name -> PyTorch values.
        candidate: output name -> engine values.
        tol: the precision's thresholds.
        label: names the comparison in messages (e.g. 'int8 batch 32').
        labels: ground-truth classes, for accuracy.
        task_outputs: the outputs judged by task metrics (top-1 agreement, accuracy); None: every 2-D output.
        regression: the task is regression: task outputs are predictions of the labels, not logits.
        judged_as: the task outputs that choose between the relative RMSE and the cosine, when they are
            not ``task_outputs`` (the rows repeated to fill a batch: judged like the split, no task metrics).
        spread_of: output name -> the values whose spread scales the relative RMSE (default: ``reference``).

    Returns:
        The result with statistics and every check; nothing is raised here.
    """
    result = ComparisonResult(label=label)
    for name, ref in reference.items():
        if name not in candidate:
            result.checks.append(Check(name, "present", 0.0, 1.0, False, ">="))
            continue
        out = candidate[name]
        if out.shape != ref.shape:
            result.checks.append(Check(name, f"shape {out.shape} vs {ref.shape}", 0.0, 1.0, False, ">="))
            continue
        if not np.isfinite(out).all():
            result.checks.append(Check(name, "finite share", float(np.isfinite(out).mean()), 1.0, False, ">="))
            continue
        task = task_outputs is None or name in task_outputs
        s = output_stats(name, ref, out, tol, labels if task and not regression else None, task=task and not regression)
        result.outputs[name] = s
        s.max_relative_rmse = relative_rmse(ref, out, None if spread_of is None else spread_of.get(name))
        by_rmse = judged_by_relative_rmse(name, ref, task_outputs if judged_as is None else judged_as, regression)
        if by_rmse:
            s.min_cosine = s.mean_cosine = None
        if regression and task and labels is not None:
            r, e = regression_against_labels(ref, labels), regression_against_labels(out, labels)
            s.r2_reference, s.mae_reference, s.rmse_reference = r["r2"], r["mae"], r["rmse"]
            s.r2, s.mae, s.rmse = e["r2"], e["mae"], e["rmse"]
        add = result.checks.append
        if s.within_tolerance is not None:
            # allclose semantics: every element within atol + rtol·|ref|.
            add(Check(name, f"share within atol={tol.atol} rtol={tol.rtol}", s.within_tolerance, 1.0, s.within_tolerance >= 1.0, ">="))
        if by_rmse:
            add(Check(name, "max_relative_rmse", s.max_relative_rmse, tol.max_relative_rmse, s.max_relative_rmse <= tol.max_relative_rmse, "<="))
        else:
            assert s.min_cosine is not None
            add(Check(name, "min_cosine", s.min_cosine, tol.min_cosine, s.min_cosine >= tol.min_cosine, ">="))
        if s.r2_drop is not None:
            add(Check(name, "r2_drop", s.r2_drop, tol.max_r2_drop, s.r2_drop <= tol.max_r2_drop + 1e-12, "<="))
        if s.top1_agreement is not None:
            add(Check(name, "top1_agreement", s.top1_agreement, tol.min_top1_agreement, s.top1_agreement >= tol.min_top1_agreement, ">="))
        if s.accuracy_drop is not None:
            add(Check(name, "accuracy_drop", s.accuracy_drop, tol.max_accuracy_drop, s.accuracy_drop <= tol.max_accuracy_drop + 1e-12, "<="))
    return result
