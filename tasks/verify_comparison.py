"""The comparison of ``verify``: engine outputs against the PyTorch reference, judged into a typed verdict.

Pure functions of arrays and tolerances (no engine, no file): how each batch ran (``BatchRun``), the
comparisons of one batch size (``checks_at_batch``), the verdict over all of them (``verdict``: a
``Verdict``), and the error a failing report stands for (``verdict_error``).

    from tasks.verify_comparison import checks_at_batch, verdict
    judged = verdict(precision, tolerance, results, share)   # judged["passed"], judged["failures"], ...
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, TypedDict

import numpy as np

from tasks.artifacts import ArtifactRef
from tasks.compare import ComparisonResult, compare_outputs
from tasks.compute_share import ComputeShare, share_finding
from tasks.config import Precision, Tolerance
from tasks.errors import PrecisionShareError, VerificationError
from tasks.precisions import precision_spec

#: the checks of the task metrics, run when the dataset has labels and the model a logits output
TASK_CHECKS = ("top-1 agreement", "accuracy drop", "balanced accuracy")


@dataclass(frozen=True)
class BatchRun:
    """How the test split went through the engine at one batch size.

    Attributes:
        batch: rows of every engine call.
        runs: engine calls.
        distinct_samples: the split's samples; the rows fed beyond them repeat samples (cycled).
    """

    batch: int
    runs: int
    distinct_samples: int

    @property
    def rows_fed(self) -> int:
        return self.batch * self.runs

    @property
    def repeated_rows(self) -> int:
        return self.rows_fed - self.distinct_samples

    def to_dict(self) -> dict[str, int]:
        return {**asdict(self), "rows_fed": self.rows_fed, "repeated_rows": self.repeated_rows}


def describe_runs(runs: Sequence[Mapping[str, int]]) -> str:
    """e.g. 'batch 1 x150, 32 x5 (10 rows repeated), 256 x1 (106 rows repeated)': what the engine ran."""
    parts = [f"{r['batch']} x{r['runs']}" + (f" ({r['repeated_rows']} rows repeated)" if r["repeated_rows"] else "") for r in runs]
    return "batch " + ", ".join(parts)


def checks_at_batch(
    reference: Mapping[str, np.ndarray],
    got: Mapping[str, np.ndarray],
    run: BatchRun,
    tolerance: Tolerance,
    label: str,
    labels: np.ndarray | None = None,
    task_outputs: set[str] | None = None,
    regression: bool = False,
) -> list[ComparisonResult]:
    """Compare what one batch size produced: the distinct samples, then the rows that repeat them.

    The task metrics (agreement, accuracy: shares of samples) are computed on the distinct samples
    only: a repeated sample must not count twice. The repeated rows must still match their sample's
    reference row by row (cosine of the worst row, every element within atol/rtol, finite), so a batch
    position that computes wrong cannot hide behind the fill.

    Returns:
        One result labelled ``label``, and one labelled ``'<label> repeated rows'`` when rows repeat.
    """
    n = run.distinct_samples
    results = [compare_outputs(reference, {k: v[:n] for k, v in got.items()}, tolerance, label=label, labels=labels, task_outputs=task_outputs, regression=regression)]
    if run.repeated_rows > 0:
        rows = np.arange(n, run.rows_fed) % n
        repeated_ref = {k: v[rows] for k, v in reference.items()}
        # No task metrics here, but every output judged as on the split (relative RMSE or cosine), a
        # relative error measured against the whole split's spread, not that of a few repeated rows.
        results.append(compare_outputs(repeated_ref, {k: v[n:] for k, v in got.items()}, tolerance, label=f"{label} repeated rows",
                                       task_outputs=set(), regression=regression, judged_as=task_outputs, spread_of=reference))
    return results


class Verdict(TypedDict):
    """The verdict part of a verification report (``verdict``), as ``verification.json`` holds it."""

    passed: bool
    failures: list[str]
    repairable: bool
    share_finding: str | None
    compute: dict[str, Any] | None
    checks_run: list[str]
    checks_skipped: dict[str, str]
    batches: list[dict[str, Any]]


def verdict(
    precision: Precision,
    tolerance: Tolerance,
    results: Sequence[ComparisonResult],
    share: ComputeShare | None,
    kept_fp32: int = 0,
    logits: str | None = None,
    has_labels: bool = True,
    regression: bool = False,
) -> Verdict:
    """Judge the comparisons and the compute share of one engine: the verdict part of its report.

    An engine of a reduced precision passes only when at least ``tolerance.min_compute_share`` of its compute
    operators run in that precision; that failure comes first and is not repairable (a repair keeps
    more nodes in fp32). Every other failing check is repairable.

    Args:
        precision: the engine's precision.
        tolerance: its thresholds.
        results: every comparison (each batch size, the repeated rows, the emulation).
        share: its compute operators by precision (None: not known, the check is skipped).
        kept_fp32: nodes a repair kept in fp32 in the variant (named in the finding).
        logits: the output judged by task metrics, or None.
        has_labels: whether the test split has labels.
        regression: the task is a regression.

    Returns:
        passed, failures, repairable, share_finding (the sentence, or None), compute, checks_run,
        checks_skipped, batches (each comparison).
    """
    failures = [f for r in results for f in r.failures()]
    checks_run, skipped = checks_of(precision, tolerance, results, {logits} if logits else set(), regression, has_labels)
    compute = share.to_dict(precision.value) if share is not None else None
    finding = None
    if precision_spec(precision).reduced:
        if share is None:
            skipped["compute share"] = "neither a layer report nor an ONNX graph of the engine"
        else:
            assert compute is not None
            compute["floor"] = tolerance.min_compute_share
            compute["passed"] = share.share(precision.value) >= tolerance.min_compute_share
            checks_run.append(f"compute share >= {tolerance.min_compute_share:.0%}")
            if not compute["passed"]:
                finding = share_finding(share, precision.value, kept_fp32)
                failures.insert(0, f"{precision.value} compute share: {share.count(precision.value)} of {share.total} compute operators "
                                   f"in {precision.value} = {share.share(precision.value):.0%} (threshold >= {tolerance.min_compute_share:.0%})")
    return {
        "passed": not failures,
        "failures": failures,
        "repairable": bool(failures) and finding is None,
        "share_finding": finding,
        "compute": compute,
        "checks_run": checks_run,
        "checks_skipped": skipped,
        "batches": [r.to_dict() for r in results],
    }


def verdict_error(report: Mapping[str, Any], report_path: str, artifact: ArtifactRef | None = None) -> VerificationError:
    """The error a failing verification report stands for (a ``PrecisionShareError`` when the share failed)."""
    if report.get("share_finding"):
        return PrecisionShareError(report["precision"], report["share_finding"], list(report["failures"]), report_path, artifact)
    return VerificationError(list(report["failures"]), report_path, artifact)


def checks_of(
    precision: Precision, tolerance: Tolerance, results: Sequence[ComparisonResult], task_outputs: set[str], regression: bool, labelled: bool
) -> tuple[list[str], dict[str, str]]:
    """Which checks a verification ran, and which it did not (with why), as the report says them.

    The per-output checks are read off the comparisons themselves: the relative RMSE for the outputs
    judged by it (regression outputs, one-value outputs), the cosine when any output was judged by it.
    """
    judged = [(c.output, c.metric) for r in results for c in r.checks]
    run = ["elementwise (atol/rtol)"] if tolerance.atol is not None or tolerance.rtol is not None else []
    skipped: dict[str, str] = {} if run else {"elementwise": f"no atol/rtol for {precision.value}"}
    if relative := list(dict.fromkeys(o for o, m in judged if m == "max_relative_rmse")):
        run.append(f"relative RMSE ({', '.join(relative)})")
    if any(m == "min_cosine" for _, m in judged):
        run.append("cosine per sample")
    if regression:
        if task_outputs:
            run.append("R² drop (R², MAE, RMSE against the labels)")
        else:
            skipped["R² drop"] = "the dataset has no labels"
    elif task_outputs:
        run += list(TASK_CHECKS)
    else:
        skipped.update({c: "no logits output" if labelled else "the dataset has no labels" for c in TASK_CHECKS})
    return run, skipped


def not_judged(checkpoint: ArtifactRef, outputs: list[str], task_output: str | None) -> dict[str, str]:
    """The outputs that are not the task's, each with what was (and was not) done with it.

    Such an output (a second head, an embedding) is verified against PyTorch like every output, but
    no label scores it, and training did not train it when trtflow trained the model (the loss reads
    the task output only).
    """
    if task_output is None:
        return {}
    trained = checkpoint.meta.get("mode", "train") != "load"
    why = (f"not trained (the loss used only '{task_output}') and not scored against labels" if trained
           else "not scored against labels (the weights were loaded as given)")
    return {k: f"{why}: verified against PyTorch only" for k in outputs if k != task_output}
