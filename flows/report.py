"""The run report: one JSON file under artifacts/ and the same facts as Prefect artifacts in the UI."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from flows.ui import error_text, in_ui_terms
from tasks.artifacts import ArtifactRef
from tasks.config import PipelineConfig, Precision
from tasks.graph import Branch
from tasks.repair import SUMMARY
from tasks.engine import engine_info
from tasks.errors import StorageError, VerificationError
from tasks.store import Store

REPORT = "report.json"
#: each run's own report: ``reports/run-<UTC time>-<flow run id[:8] or pid>.json`` (report.json copies the latest)
RUN_REPORTS = "reports"
METRICS = ("max_abs", "mean_abs", "max_rel", "min_cosine", "top1_agreement", "accuracy_reference", "accuracy", "accuracy_drop")
#: what a regression is judged by, per precision (reference = PyTorch against the labels)
REGRESSION_METRICS = ("max_relative_rmse", "r2_reference", "r2", "r2_drop", "mae_reference", "mae", "rmse")


def _rel(path: Path, root: Path) -> str:
    # Paths relative to the artifacts folder: no home-directory paths in reports or the UI.
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return Path(path).name


def run_report(
    config: PipelineConfig,
    store: Store,
    backend_reason: str,
    shared: Mapping[str, ArtifactRef],
    outcomes: dict[Precision, dict[str, Any]],
    bundle: ArtifactRef | str | None = None,
    tasks: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Assemble the run report, write it as the run's own file and copy it to ``report.json``.

    Every run writes its own ``reports/run-<time>-<id>.json`` (never shared, so concurrent runs cannot
    mix), then replaces ``report.json`` atomically by a whole copy: it is always the latest complete
    run's report. The report's ``report`` field names the run's own file. Both are side files of the
    store, and, for a store elsewhere (a bucket), files of the local folder too (``--artifacts-dir``).
    Paths in the report are relative to the local folder.

    Args:
        config: the run's config.
        store: the run's store.
        backend_reason: which backend ran and why.
        shared: the shared stages' artifacts by stage name (data, train, export, ...).
        outcomes: per precision (``outcome_of``), either {"engine", "verify"} artifacts or {"failed_stage", "error"}.
        bundle: the ``package`` artifact, or its error, or None when no bundle was asked for.
        tasks: each task run's final state by instance id (what ran, what came from the cache).

    Returns:
        The report as a dict.

    Raises:
        StorageError: a folder stands where a report file goes (named, with the fix).
    """
    root = store.local
    created = dt.datetime.now(dt.timezone.utc)
    own = f"{RUN_REPORTS}/run-{created.strftime('%Y%m%dT%H%M%S')}-{_run_tag()}.json"
    precisions: dict[str, Any] = {}
    for p, out in outcomes.items():
        if "error" in out:
            precisions[p.value] = {"passed": False, "failed_stage": out["failed_stage"], "error": out["error"]}
            if "verify" in out:
                # A failing verdict still says what ran and in which precision.
                verdict = out["verify"]
                precisions[p.value].update({k: verdict.meta.get(k) for k in ("numerics", "samples", "compute", "batches_run", "failures")})
                precisions[p.value]["verification"] = _rel(verdict.path("verification.json"), root)
            if "repair" in out:
                precisions[p.value]["repair"] = repair_summary(out, root)
            continue
        engine, verify = out["engine"], out["verify"]
        info = engine_info(engine)
        engine_file = info.engine_file
        precisions[p.value] = {
            **{k: verify.meta.get(k) for k in ("passed", "backend", "numerics", "samples", *METRICS, "outputs", "checks_run", "checks_skipped")},
            # which precision the compute operators really run in, and how every verified batch was fed
            "compute": verify.meta.get("compute"),
            "batches_run": verify.meta.get("batches_run"),
            **{k: verify.meta.get(k) for k in ("task", *REGRESSION_METRICS) if verify.meta.get("task") == "regression" or k == "task"},
            # every shape verified (batch sizes; with dynamic axes, the profile's min, opt and max shapes)
            "shapes_verified": verify.meta.get("shapes") or [],
            "outputs_not_judged": verify.meta.get("outputs_not_judged") or {},
            # the profile built, verified and timed (lowered from the config's on a CPU backend for large samples)
            "batch": info.batch.model_dump(),
            "shapes": info.shapes,
            "engine": _rel(engine.path(engine_file), root),
            "engine_sha256": engine.files[engine_file],
            "verification": _rel(verify.path("verification.json"), root),
        }
        if lowered := batch_lowered(config.batch.model_dump(), info.batch.model_dump()):
            precisions[p.value]["batch_lowered"] = lowered
        if "profile" in out:
            precisions[p.value]["profile"] = {**out["profile"].meta, "report": _rel(out["profile"].path("profile.json"), root)}
        elif "profile_error" in out:
            precisions[p.value]["profile"] = {"error": out["profile_error"]}
        if "repair" in out:
            precisions[p.value]["repair"] = repair_summary(out, root)
    report = {
        "created": created.isoformat(timespec="seconds"),
        "report": own,
        "passed": all(v["passed"] for v in precisions.values()),
        "backend": backend_reason,
        **shared_facts(shared, root),
        "precisions": precisions,
        # Which stages ran and which came from the store: a PASS from the cache says so here.
        "tasks": dict(tasks or {}),
        "config": config.model_dump(mode="json", exclude={"artifacts_dir", "store"}),
    }
    if bundle is not None:
        report["bundle"] = bundle_summary(bundle)
    if report["config"]["train"].get("weights"):
        report["config"]["train"]["weights"] = Path(report["config"]["train"]["weights"]).name
    if report["config"]["data"].get("dataset"):
        # The file name only: an absolute path would put this machine's folders into the report and UI.
        report["config"]["data"]["dataset"] = Path(report["config"]["data"]["dataset"]).name
    if config.store is not None:
        report["store"] = store.url
    put_report(store, own, report)
    return report


def run_error(errors: Sequence[BaseException], report: Path) -> BaseException | None:
    """The error that ends a run whose stages failed (None when none did).

    A full disk alone (it makes other stages fail in confusing ways: truncated files), several failed
    verifications as one (each precision's failures, under the run's report), else the first error.

    Args:
        errors: the run's errors in order (``tasks.graph.Outcome.errors``).
        report: the run's own report file, named by a combined verification error.
    """
    storage = [e for e in errors if isinstance(e, StorageError)]
    if storage:
        return storage[0]
    verification = [e for e in errors if isinstance(e, VerificationError)]
    if len(verification) == len(errors) > 1:
        return VerificationError([f for e in verification for f in e.failures], str(report))
    return errors[0] if errors else None


def put_report(store: Store, own: str, report: Mapping[str, Any]) -> None:
    """Write a run's report as its own file and as ``report.json``, in the store and in the local folder.

    Args:
        store: the run's store.
        own: the run's own report name (``reports/run-….json``).
        report: the report.
    """
    blob = json.dumps(report, indent=2, default=str).encode()
    for name in (own, REPORT):
        store.put(name, blob, keep_local=True)  # this run's report, also where the user runs it


def shared_facts(shared: Mapping[str, ArtifactRef], root: Path) -> dict[str, Any]:
    """The report's ``data`` and ``model`` sections, from the shared stages' artifacts (data, train, export).

    Args:
        shared: the shared stages' artifacts by stage name.
        root: the artifacts folder (paths in the report are relative to it).
    """
    data, checkpoint, onnx = shared["data"], shared["train"], shared["export"]
    facts: dict[str, Any] = {
        "data": {"source": data.meta["source"]["description"] if isinstance(data.meta["source"], dict) else data.meta["source"], "sizes": data.meta["sizes"], "num_classes": data.meta["num_classes"],
                 "inputs": data.meta.get("inputs"), "labels": data.meta.get("has_labels", True), "task": data.meta.get("task", "classification")},
        "model": {
            "factory": checkpoint.meta["config"]["model"],
            "mode": checkpoint.meta.get("mode", "train"),
            "weights": checkpoint.meta["config"].get("weights"),
            "outputs": checkpoint.meta.get("outputs"),
            "logits_output": checkpoint.meta.get("logits_output"),
            "checkpoint": _rel(checkpoint.path("model.pt"), root),
            "val_acc": (checkpoint.meta.get("final") or {}).get("val_acc"),
            "task": checkpoint.meta.get("task", "classification"),
            "untrained_outputs": checkpoint.meta.get("untrained_outputs") or [],
            "onnx": _rel(onnx.path("model.onnx"), root),
            "opset": onnx.meta["opset"],
            "dynamic_axes": onnx.meta.get("dynamic_axes") or {},
        },
    }
    if facts["model"]["task"] == "regression":
        vm = checkpoint.meta.get("validation_metrics") or {}
        facts["model"]["validation"] = {k: vm.get(k) for k in ("r2", "mae", "rmse", "r2_of_train_mean")}
    return facts


def outcome_of(branch: Branch) -> dict[str, Any]:
    """One branch as the report reads it: ``engine`` and ``verify`` (and ``repair``, ``profile``,
    ``engine_before_repair``, ``profile_before_repair``), or ``failed_stage`` and ``error`` with the
    failing verdict and the repair when there are."""
    recovery = branch.recovered_by
    if not branch.passed:
        out: dict[str, Any] = {"failed_stage": branch.failed, "error": error_text(branch.error)}
        if branch.verdict is not None:
            out["verify"] = branch.verdict  # the failing verdict: what ran, and in which precision
        if branch.recovery is not None:
            out[recovery] = branch.recovery
        return out
    out = {("engine" if n == "build" else n): r for n, r in branch.refs.items()}
    if branch.recovery is not None:
        out[recovery] = branch.recovery
        out.update({f"{'engine' if n == 'build' else n}_before_{recovery}": r for n, r in branch.replaced.items()})
    out.update(branch.late)
    out.update({f"{n}_before_{recovery}": r for n, r in branch.replaced_late.items()})
    out.update({f"{n}_error": error_text(e) for n, e in branch.late_errors.items()})
    return out


def bundle_summary(bundle: ArtifactRef | str) -> dict[str, Any]:
    """What was shipped and why (paths relative to the artifacts folder), or why no bundle was made."""
    from tasks.package import BUNDLE_DIR

    if isinstance(bundle, str):
        return {"error": in_ui_terms(bundle)}
    m = bundle.meta
    return {
        "path": BUNDLE_DIR, "name": m["name"], "precision": m["precision"], "backend": m["backend"], "platform": m["platform"],
        "policy": m["policy"], "reason": m["reason"], "config": f"{BUNDLE_DIR}/{m['config']}", "model_file": f"{BUNDLE_DIR}/{m['model_file']}",
        "model_sha256": m["model_sha256"], "artifact": f"{bundle.stage}/{bundle.dir.name}",
    }


def bundle_lines(report: dict[str, Any], shown: str | None = None) -> list[str]:
    """The shipped variant and the bundle's place, or why there is no bundle (no lines without one).

    Args:
        report: the run report.
        shown: the bundle folder as the reader should type it (default: relative to the artifacts folder).
    """
    b = report.get("bundle")
    if not b:
        return []
    if "error" in b:
        return [f"bundle: not written: {b['error']}"]
    return [f"shipped: {b['precision']} ({b['reason']})", f"bundle: {shown or b['path']} (Triton model '{b['name']}', {b['platform']})"]


def batch_lowered(configured: dict[str, Any], used: dict[str, Any]) -> str | None:
    """Why the profile that ran differs from the configured one (None when it does not)."""
    keys = ("min", "opt", "max")
    if all(configured[k] == used[k] for k in keys):
        return None
    shown = "/".join(str(configured[k]) for k in keys), "/".join(str(used[k]) for k in keys)
    return (f"profile {shown[0]} lowered to {shown[1]} to fit --cpu-batch-memory-mib {configured.get('cpu_memory_mib')}: "
            f"batches above {used['max']} were neither built nor verified")


def compute_text(r: dict[str, Any]) -> str:
    """e.g. '3/4 int8': compute operators in the engine's precision, of all of them ('n/a': not counted)."""
    c = r.get("compute")
    if not c:
        return "n/a"
    p = c.get("precision") or "fp32"
    return f"{(c.get('by_precision') or {}).get(p, 0)}/{c.get('operators', 0)} {p}"


def batch_lines(precisions: dict[str, Any]) -> list[str]:
    """How every precision's verification ran: the batches and their runs, the rows repeated to fill a
    batch, and a profile lowered for memory. Precisions that ran alike share a line."""
    from tasks.verify import describe_runs

    grouped: dict[str, list[str]] = {}
    for p, r in precisions.items():
        if not r.get("batches_run"):
            continue
        text = f"{describe_runs(r['batches_run'])} on {r['samples']} test samples"
        if r.get("batch_lowered"):
            text += f"; {r['batch_lowered']}"
        grouped.setdefault(text, []).append(p)
    return [f"{', '.join(ps)}: {text}" for text, ps in grouped.items()]


def _run_tag() -> str:
    """What tells this run's report from a concurrent one's: the flow run's id, else the process and a random part."""
    import os
    import uuid

    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    if ctx is not None and ctx.flow_run is not None:
        return str(ctx.flow_run.id)[:8]
    return f"pid{os.getpid()}-{uuid.uuid4().hex[:6]}"


def repair_summary(outcome: dict[str, Any], root: Path) -> dict[str, Any]:
    """What a repair did: nodes kept in fp32, figures before and after, attempts, and its speed cost.

    Args:
        outcome: one precision's outcome holding the ``repair`` artifact and, when both engines were
            timed, ``profile`` (repaired engine) and ``profile_before_repair`` (the failing one).
        root: the artifacts folder.
    """
    repair = outcome["repair"]
    m = repair.meta
    out: dict[str, Any] = {
        **{k: m.get(k) for k in SUMMARY},
        "report": _rel(repair.path("repair.json"), root),
    }
    before, after = outcome.get("profile_before_repair"), outcome.get("profile")
    if before is not None and after is not None:
        b, a = before.meta.get("samples_per_s"), after.meta.get("samples_per_s")
        out["speed"] = {
            "samples_per_s_before": b,
            "samples_per_s_after": a,
            "throughput_change": (a / b - 1) if a and b else None,
            "latency_p50_ms_before": before.meta["latency_ms"]["p50"],
            "latency_p50_ms_after": after.meta["latency_ms"]["p50"],
        }
    return out


def repair_lines(precisions: dict[str, Any]) -> list[str]:
    """One line per repaired precision: kept nodes, figures before -> after, speed cost."""
    lines = []
    for p, r in precisions.items():
        rep = r.get("repair")
        if not rep:
            continue
        b, a = rep.get("before") or {}, rep.get("after") or {}
        figures = ", ".join(
            f"{label} {_fmt(b.get(k)) or 'n/a'} -> {_fmt(a.get(k)) or 'n/a'}"
            for k, label in (("finite_share", "finite"), ("top1_agreement", "top-1"), ("min_cosine", "min cosine"), ("max_relative_rmse", "rel. RMSE"), ("max_abs", "max abs err"))
            if b.get(k) is not None or a.get(k) is not None or k in ("finite_share", "max_abs")
        )
        if rep["passed"]:
            head = f"{p}: repaired, kept {', '.join(rep['kept_fp32'])} in fp32 ({len(rep['kept_fp32'])} of budget {rep['budget']}, {rep['attempts']} attempt(s))"
        else:
            head = f"{p}: NOT repaired ({rep['stopped']}); tried {', '.join(rep['tried_fp32']) or 'no node'} in fp32"
        speed = rep.get("speed")
        cost = ""
        if speed and speed.get("throughput_change") is not None:
            cost = f"; {speed['samples_per_s_before']:.0f} -> {speed['samples_per_s_after']:.0f} samples/s ({speed['throughput_change']:+.0%})"
        lines.append(f"{head}: {figures}{cost}; {rep['report']}")
    return lines


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def summary_markdown(report: dict[str, Any]) -> str:
    """Render the report as the markdown summary shown in the Prefect UI."""
    verdict = "all precisions verified" if report["passed"] else "**verification FAILED**"
    regression = report["model"].get("task") == "regression"
    judged = (f"validation R² {_fmt((report['model'].get('validation') or {}).get('r2'))}, MAE {_fmt((report['model'].get('validation') or {}).get('mae'))}"
              if regression else f"validation accuracy {_fmt(report['model']['val_acc'])}")
    lines = [
        f"# trtflow run: {verdict}",
        "",
        f"- Backend: {report['backend']}",
        f"- Data: {report['data']['source']}, splits {report['data']['sizes']}" + (" (regression targets)" if regression else ""),
        f"- Model: `{report['model']['factory']}` ({report['model'].get('mode', 'train')}), {judged}; "
        f"ONNX opset {report['model']['opset']} at `{report['model']['onnx']}`"
        + (f", dynamic axes {_axes_text(report['model']['dynamic_axes'])}" if report["model"].get("dynamic_axes") else ""),
        "",
    ]
    if regression:
        lines += ["| precision | passed | compute ops in precision | R² (torch → engine) | MAE (torch → engine) | relative RMSE vs torch | max abs err | engine |", "|---|---|---|---|---|---|---|---|"]
    else:
        lines += ["| precision | passed | compute ops in precision | accuracy (torch → engine) | top-1 agreement | min cosine | max abs err | engine |", "|---|---|---|---|---|---|---|---|"]
    for p, r in report["precisions"].items():
        if "error" in r:
            lines.append(f"| {p} | no: {r['failed_stage']} failed | {compute_text(r)} | | | | | {r['error'][:200]} |")
        elif regression:
            lines.append(f"| {p} | {'yes' if r['passed'] else 'no'} | {compute_text(r)} | {_fmt(r.get('r2_reference'))} → {_fmt(r.get('r2'))} | {_fmt(r.get('mae_reference'))} → {_fmt(r.get('mae'))} | "
                         f"{_fmt(r.get('max_relative_rmse'))} | {_fmt(r['max_abs'])} | `{r['engine']}` |")
        else:
            acc = f"{_fmt(r['accuracy_reference'])} → {_fmt(r['accuracy'])}"
            lines.append(f"| {p} | {'yes' if r['passed'] else 'no'} | {compute_text(r)} | {acc} | {_fmt(r['top1_agreement'])} | {_fmt(r['min_cosine'])} | {_fmt(r['max_abs'])} | `{r['engine']}` |")
    if targets := report.get("targets"):
        # A run over several targets: rows above are <target>/<precision>; each ran on its own pool.
        lines += ["", "**Targets**", "", "| target | pool | run | backend |", "|---|---|---|---|"]
        lines += [f"| {n} | {t['pool']} | {t['state']}{': ' + t['error'][:200] if t.get('error') else ''} | {t.get('backend') or ''} |" for n, t in targets.items()]
    if batches := batch_lines(report["precisions"]):
        lines += ["", "**Verified at**", "", *(f"- {line}" for line in batches)]
    lines += [f"- {line}" for line in judged_lines(report["precisions"])]
    lines += numerics_markdown(report["precisions"])
    if repaired := repair_lines(report["precisions"]):
        lines += ["", "**Precision repair**", "", *(f"- {line}" for line in repaired)]
    lines += speed_markdown(report["precisions"])
    if b := report.get("bundle"):
        if "error" in b:
            lines += ["", "## Bundle", "", f"Not written: {b['error'][:300]}"]
        else:
            lines += ["", "## Bundle", "", f"Shipped **{b['precision']}** ({b['backend']}) as Triton model `{b['name']}` in `{b['path']}/`: {b['reason']}.",
                      "", f"Config `{b['config']}`, engine `{b['model_file']}` (sha256 {b['model_sha256'][:12]}…); check it before deploying: `trtflow check-bundle {b['path']}`."]
    lines += ["", f"Files are relative to the artifacts folder; this run's full report is `{report.get('report', REPORT)}` there (`report.json` is the latest run's)."]
    return "\n".join(lines)


def _axes_text(axes: dict[str, Any]) -> str:
    return ", ".join(f"{n}[{a}]={d}" for n, by_axis in axes.items() for a, d in by_axis.items())


def judged_lines(precisions: dict[str, Any]) -> list[str]:
    """What the run verified at, and what it did not judge: the shapes verified (the same for every
    precision) and each output that no label scored (a second head)."""
    done = next((r for r in precisions.values() if r.get("shapes_verified")), None)
    if done is None:
        return []
    shapes = "; ".join(s.split(" ", 1)[1] for s in (x["label"] if isinstance(x, dict) else x for x in done["shapes_verified"]))
    lines = [f"verified at: {shapes}"]
    lines += [f"not judged: {name}: {why}" for name, why in (done.get("outputs_not_judged") or {}).items()]
    return lines


def numerics_lines(precisions: dict[str, Any]) -> list[str]:
    """One line per precision whose verified numerics are not the engine's own, e.g. fp16 emulated on CPU."""
    return [
        f"{p}: {r['numerics']}" + (f" (this backend computes {p} graphs in fp32; {p} rounding and overflow were emulated)" if "emulated" in r["numerics"] else "")
        for p, r in precisions.items()
        if r.get("numerics") and not r["numerics"].startswith("native")
    ]


def numerics_markdown(precisions: dict[str, Any]) -> list[str]:
    """The summary's 'Numerics verified' section (empty when every engine ran its own precision)."""
    lines = numerics_lines(precisions)
    return ["", "**Numerics verified**", "", *(f"- {line}" for line in lines)] if lines else []


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
        {"precision": p, "passed": r.get("passed"), "numerics": r.get("numerics"), "compute ops": compute_text(r), "kept in fp32": ", ".join((r.get("repair") or {}).get("kept_fp32") or []), **({k: _round(r.get(k)) for k in METRICS} if "error" not in r else {"error": r["error"][:300]}), **table_columns(r.get("profile"))}
        for p, r in report["precisions"].items()
    ]
    create_table_artifact(key="trtflow-verification", table=rows, description="Per-precision verification against PyTorch")
    create_markdown_artifact(key="trtflow-summary", markdown=summary_markdown(report), description="What was built and verified")


# --- the speed of each engine (the profile stage's summaries) ---------------------------------------


def table_columns(summary: Mapping[str, Any] | None) -> dict[str, Any]:
    """The speed columns of one precision's row in the Prefect table (empty when not profiled)."""
    if not summary:
        return {}
    if "error" in summary:
        return {"profile": f"failed: {str(summary['error'])[:200]}"}
    return {
        f"p50 ms (b{summary['latency_batch']})": round(summary["latency_ms"]["p50"], 4),
        f"p99 ms (b{summary['latency_batch']})": round(summary["latency_ms"]["p99"], 4),
        f"samples/s (b{summary['throughput_batch']})": round(summary["samples_per_s"] or 0.0, 1),
        "x torch (latency)": _round2(summary["speedup"]["latency_p50"]),
        "x torch (throughput)": _round2(summary["speedup"]["throughput"]),
    }


def _round2(v: float | None) -> float | None:
    return None if v is None else round(v, 2)


def speed_markdown(precisions: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Markdown lines of the speed table of a run report (no lines when nothing was profiled)."""
    rows = [(p, r["profile"]) for p, r in precisions.items() if r.get("profile")]
    if not rows:
        return []
    first = next((s for _, s in rows if "error" not in s), None)
    lines = ["", "## Speed", ""]
    if first is not None:
        lines.append(
            f"Machine: {first['machine']['cpu']} ({first['machine']['cores']} cores); engine threads "
            f"{first['threads']['engine']}, PyTorch threads {first['threads']['torch']} on {first['torch']['device']}; "
            f"timer {first['timer']}."
        )
        lines.append("")
    lines += [
        "| precision | p50 / p90 / p99 ms (batch) | samples/s (batch) | PyTorch p50 ms | PyTorch samples/s | speed-up latency | speed-up throughput |",
        "|---|---|---|---|---|---|---|",
    ]
    for p, s in rows:
        if "error" in s:
            lines.append(f"| {p} | profile failed: {str(s['error'])[:200]} | | | | | |")
            continue
        la, t = s["latency_ms"], s["torch"]
        lines.append(
            f"| {p} | {la['p50']:.3f} / {la['p90']:.3f} / {la['p99']:.3f} ({s['latency_batch']}) | "
            f"{(s['samples_per_s'] or 0):.0f} ({s['throughput_batch']}) | {t['latency_ms']['p50']:.3f} | "
            f"{(t['samples_per_s'] or 0):.0f} | {_fmt_x(s['speedup']['latency_p50'])} | {_fmt_x(s['speedup']['throughput'])} |"
        )
    by_shape = [(p, x) for p, s in rows if "error" not in s for x in s.get("shapes") or [] if x.get("level") in ("min", "opt", "max")]
    if by_shape:
        lines += ["", "Every shape timed (latency above: the min shape; throughput: the max shape):", "",
                  "| precision | shape | p50 ms | samples/s | PyTorch p50 ms | PyTorch samples/s |", "|---|---|---|---|---|---|"]
        for p, x in by_shape:
            lines.append(f"| {p} | {x['shape']} | {x['p50_ms']:.3f} | {(x['samples_per_s'] or 0):.0f} | {(x.get('torch_p50_ms') or 0):.3f} | {(x.get('torch_samples_per_s') or 0):.0f} |")
    return lines


def _fmt_x(v: float | None) -> str:
    return "" if v is None else f"{v:.2f}×"
