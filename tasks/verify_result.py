"""The result of ``verify``: its report file and the views made of it.

``verification.json`` in the stage's artifact (the whole report), the latest verification of each
precision, a side file of the store (passed or failed: what the CLI and a repair read), and the
report's condensed form, the artifact's meta (``summary_of``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tasks.artifacts import ArtifactRef
from tasks.store import Store, as_store

REPORT = "verification.json"
#: where the latest verification of each precision is kept, passed or not (relative to the artifacts folder)
LATEST = "reports/verify-{precision}.json"


def write_report(folder: Path, report: dict[str, Any]) -> dict[str, Any]:
    """Write the whole report into a verification's folder; returns its summary (the artifact's meta)."""
    (folder / REPORT).write_text(json.dumps(report, indent=2, default=str))
    return summary_of(report)


def write_failure(store: Store, precision: str, error: BaseException) -> None:
    """Make a verification that could not be made the latest of its precision: never an older pass."""
    store.put(LATEST.format(precision=precision), _json({"precision": precision, "passed": False, "failures": [], "error": str(error)}))


def write_latest(verification: ArtifactRef, store: Store) -> dict[str, Any]:
    """Make a ``verify`` artifact the latest verification of its precision (``LATEST``, a side file of the store); returns its report."""
    report = json.loads(verification.path(REPORT).read_text())
    as_store(store).put(LATEST.format(precision=report["precision"]), _json(report))
    return report


def _json(obj: Any) -> bytes:
    return json.dumps(obj, indent=2, default=str).encode()


def summary_of(report: dict[str, Any]) -> dict[str, Any]:
    """Condense a verification report to the worst value of each metric over all batches (the manifest's meta)."""
    stats = [o for b in report["batches"] for o in b["outputs"].values()]

    def worst(key: str, fn: Any) -> float | None:
        vals = [s[key] for s in stats if s.get(key) is not None]
        return fn(vals) if vals else None

    # A non-finite output has no statistics, only its 'finite share' check: keep the worst one visible.
    finite = [c["value"] for b in report["batches"] for c in b["checks"] if c["metric"] == "finite share"]
    return {
        "precision": report["precision"],
        "backend": report["backend"],
        "numerics": report.get("numerics"),
        "finite_share": min(finite, default=1.0),
        "passed": report["passed"],
        "failures": report.get("failures", []),
        "repairable": report.get("repairable", False),
        "samples": report["samples"],
        "batches_run": report.get("batches_run"),
        "compute": report.get("compute"),
        "outputs": report.get("outputs"),
        "checks_run": report.get("checks_run"),
        "checks_skipped": report.get("checks_skipped"),
        "task": report.get("task"),
        "outputs_not_judged": report.get("outputs_not_judged") or {},
        "shapes": [s["label"] for s in report.get("shapes") or []],
        "max_abs": worst("max_abs", max),
        "mean_abs": worst("mean_abs", max),
        "max_rel": worst("max_rel", max),
        "min_cosine": worst("min_cosine", min),
        "top1_agreement": worst("top1_agreement", min),
        "accuracy_reference": worst("accuracy_reference", max),
        "accuracy": worst("accuracy", min),
        "accuracy_drop": worst("accuracy_drop", max),
        "balanced_accuracy_reference": worst("balanced_accuracy_reference", max),
        "balanced_accuracy": worst("balanced_accuracy", min),
        "max_relative_rmse": worst("max_relative_rmse", max),
        "r2_reference": worst("r2_reference", max),
        "r2": worst("r2", min),
        "r2_drop": worst("r2_drop", max),
        "mae_reference": worst("mae_reference", min),
        "mae": worst("mae", max),
        "rmse": worst("rmse", max),
    }
