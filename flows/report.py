"""The run report: one JSON file under artifacts/ and the same facts as Prefect artifacts in the UI."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from tasks.artifacts import ArtifactRef
from tasks.config import PipelineConfig, Precision
from tasks.engine import engine_info
from tasks.profile import speed_markdown, table_columns
from tasks.artifacts import write_json_atomic

REPORT = "report.json"
METRICS = ("max_abs", "mean_abs", "max_rel", "min_cosine", "top1_agreement", "accuracy_reference", "accuracy", "accuracy_drop")


def _rel(path: Path, root: Path) -> str:
    # Paths relative to the artifacts folder: no home-directory paths in reports or the UI.
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return Path(path).name


def run_report(
    config: PipelineConfig,
    root: Path,
    backend_reason: str,
    data: ArtifactRef,
    checkpoint: ArtifactRef,
    onnx: ArtifactRef,
    outcomes: dict[Precision, dict[str, Any]],
) -> dict[str, Any]:
    """Assemble the run report and write it to ``<root>/report.json``.

    Args:
        config: the run's config.
        root: the artifacts folder.
        backend_reason: which backend ran and why.
        data, checkpoint, onnx: the shared upstream artifacts.
        outcomes: per precision, either {"engine", "verify"} artifacts or {"failed_stage", "error"}.

    Returns:
        The report as a dict.
    """
    precisions: dict[str, Any] = {}
    for p, out in outcomes.items():
        if "error" in out:
            precisions[p.value] = {"passed": False, "failed_stage": out["failed_stage"], "error": out["error"]}
            continue
        engine, verify = out["engine"], out["verify"]
        engine_file = engine_info(engine).engine_file
        precisions[p.value] = {
            **{k: verify.meta.get(k) for k in ("passed", "backend", "samples", *METRICS)},
            "engine": _rel(engine.path(engine_file), root),
            "engine_sha256": engine.files[engine_file],
            "verification": _rel(verify.path("verification.json"), root),
        }
        if "profile" in out:
            precisions[p.value]["profile"] = {**out["profile"].meta, "report": _rel(out["profile"].path("profile.json"), root)}
        elif "profile_error" in out:
            precisions[p.value]["profile"] = {"error": out["profile_error"]}
    report = {
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "passed": all(v["passed"] for v in precisions.values()),
        "backend": backend_reason,
        "data": {"source": data.meta["source"], "sizes": data.meta["sizes"], "num_classes": data.meta["num_classes"]},
        "model": {
            "factory": checkpoint.meta["config"]["model"],
            "checkpoint": _rel(checkpoint.path("model.pt"), root),
            "val_acc": checkpoint.meta["final"]["val_acc"],
            "onnx": _rel(onnx.path("model.onnx"), root),
            "opset": onnx.meta["opset"],
        },
        "precisions": precisions,
        "config": config.model_dump(mode="json", exclude={"artifacts_dir"}),
    }
    if report["config"]["data"].get("dataset"):
        # The file name only: an absolute path would put this machine's folders into the report and UI.
        report["config"]["data"]["dataset"] = Path(report["config"]["data"]["dataset"]).name
    write_json_atomic(root / REPORT, report)
    return report


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def summary_markdown(report: dict[str, Any]) -> str:
    """Render the report as the markdown summary shown in the Prefect UI."""
    verdict = "all precisions verified" if report["passed"] else "**verification FAILED**"
    lines = [
        f"# trtflow run: {verdict}",
        "",
        f"- Backend: {report['backend']}",
        f"- Data: {report['data']['source']}, splits {report['data']['sizes']}",
        f"- Model: `{report['model']['factory']}`, validation accuracy {report['model']['val_acc']:.4f}; "
        f"ONNX opset {report['model']['opset']} at `{report['model']['onnx']}`",
        "",
        "| precision | passed | accuracy (torch → engine) | top-1 agreement | min cosine | max abs err | engine |",
        "|---|---|---|---|---|---|---|",
    ]
    for p, r in report["precisions"].items():
        if "error" in r:
            lines.append(f"| {p} | no: {r['failed_stage']} failed | | | | | {r['error'][:200]} |")
        else:
            acc = f"{_fmt(r['accuracy_reference'])} → {_fmt(r['accuracy'])}"
            lines.append(f"| {p} | {'yes' if r['passed'] else 'no'} | {acc} | {_fmt(r['top1_agreement'])} | {_fmt(r['min_cosine'])} | {_fmt(r['max_abs'])} | `{r['engine']}` |")
    lines += speed_markdown(report["precisions"])
    lines += ["", "Files are relative to the artifacts folder; the full report is `report.json` there."]
    return "\n".join(lines)


def _round(v: Any) -> Any:
    # Four significant digits: the UI's table prints every digit of a float (0.0000021457672119140625).
    return float(f"{v:.4g}") if isinstance(v, float) else v


def publish(report: dict[str, Any], root: Path) -> None:
    """Create the Prefect table and markdown artifacts of a run (no-op outside a flow run)."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact
    from prefect.context import FlowRunContext

    if FlowRunContext.get() is None:
        return
    rows = [
        {"precision": p, "passed": r.get("passed"), **({k: _round(r.get(k)) for k in METRICS} if "error" not in r else {"error": r["error"][:300]}), **table_columns(r.get("profile"))}
        for p, r in report["precisions"].items()
    ]
    create_table_artifact(key="trtflow-verification", table=rows, description="Per-precision verification against PyTorch")
    create_markdown_artifact(key="trtflow-summary", markdown=summary_markdown(report), description="What was built and verified")
