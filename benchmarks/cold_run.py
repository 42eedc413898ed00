"""Cold run breakdown: how long each stage takes from nothing, and where the slowest one spends it.

Run from the repository root (never part of the test suite)::

    python benchmarks/cold_run.py                  # 3 repeats of the default config, stage by stage
    python benchmarks/cold_run.py --repeats 5 --flow   # also time the whole Prefect flow, cold
    python benchmarks/cold_run.py --epochs 1       # a quicker model

Each repeat runs the pipeline's stage functions in order (no Prefect) in a fresh process and a fresh
artifacts folder, timing each call; then one more fresh process profiles the slowest stage (with
pyinstrument when installed, else cProfile) and prints where its time goes. ``--flow`` adds a cold
``trtflow run`` per repeat (temporary Prefect server included), so the orchestration's share shows.
Writes the ``cold-run`` section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import ROOT, fmt, machine, spread, write_section

ORDER = ("data", "train", "export", "validate", "precision", "build", "verify", "profile")


def child(root: Path, epochs: int | None, profile_stage: str | None) -> None:
    """Run every stage once, cold; print per-stage seconds as a JSON line."""
    t_import = time.perf_counter()
    from tasks.backends.registry import choose_backend
    from tasks.config import Backend, PipelineConfig
    from tasks.data import splits_from_dataset
    from tasks.engine import engine_from_variant
    from tasks.export import onnx_from_checkpoint
    from tasks.precision import variant_from_onnx
    from tasks.profile import profile_of_engine
    from tasks.train import checkpoint_from_splits
    from tasks.validate import validated_onnx
    from tasks.verify import verification_of_engine

    imports = time.perf_counter() - t_import
    cfg = PipelineConfig(artifacts_dir=root)
    if epochs:
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"epochs": epochs})})
    times: dict[str, float] = {}
    detail: list[tuple[str, float]] = []
    profiler: Any = None

    def timed(stage: str, label: str, fn: Any, *args: Any) -> Any:
        nonlocal profiler
        if stage == profile_stage and profiler is None:
            profiler = _start_profiler()
        t0 = time.perf_counter()
        out = fn(*args)
        dt = time.perf_counter() - t0
        if stage == profile_stage and profiler is not None:
            _stop_profiler(profiler)
            profiler = None
        times[stage] = times.get(stage, 0.0) + dt
        detail.append((label, dt))
        return out

    builder, _ = choose_backend(cfg.backend)
    data = timed("data", "data", splits_from_dataset, cfg.data, root)
    ckpt = timed("train", "train", checkpoint_from_splits, data, cfg.train, root)
    onnx = timed("export", "export", onnx_from_checkpoint, ckpt, root)
    timed("validate", "validate fp32 export", validated_onnx, onnx, data, root)
    for p in cfg.precisions:
        v = timed("precision", f"precision {p.value}", variant_from_onnx, onnx, data, p, cfg.calibration_samples, root)
        timed("validate", f"validate {p.value}", validated_onnx, v, data, root)
        e = timed("build", f"build {p.value}", engine_from_variant, v, Backend(builder.name), cfg.batch, cfg.engine.model_dump(), root)
        timed("verify", f"verify {p.value}", verification_of_engine, e, ckpt, data, p, cfg.tolerance(p), cfg.batch, root, False, v)
        timed("profile", f"profile {p.value}", profile_of_engine, e, ckpt, data, cfg.batch, cfg.profile, cfg.engine.threads, root)
    print("RESULT " + json.dumps({"stages": times, "detail": detail, "imports": imports}))


def _start_profiler() -> Any:
    try:
        from pyinstrument import Profiler

        p: Any = Profiler(interval=0.001)
        p.start()
        return ("pyinstrument", p)
    except ImportError:
        import cProfile

        c = cProfile.Profile()
        c.enable()
        return ("cProfile", c)


def _stop_profiler(handle: Any) -> None:
    kind, p = handle
    if kind == "pyinstrument":
        p.stop()
        text = p.output_text(unicode=True, color=False, show_all=False, short_mode=False)
        # Show the tree from the stage function down; the wrapper frames above it say nothing.
        lines = text.splitlines()
        start = next((i for i, ln in enumerate(lines) if "timed " in ln or "timed\t" in ln), 0)
        body = "\n".join(lines[start : start + 45])
    else:
        import io
        import pstats

        p.disable()
        buf = io.StringIO()
        pstats.Stats(p, stream=buf).sort_stats("cumulative").print_stats(20)
        body = buf.getvalue()
    print("PROFILE " + json.dumps({"kind": kind, "text": body}))


def run_child(root: Path, epochs: int | None, profile_stage: str | None = None) -> tuple[dict[str, Any], dict[str, Any] | None]:
    args = [sys.executable, __file__, "--child", str(root)]
    if epochs:
        args += ["--epochs", str(epochs)]
    if profile_stage:
        args += ["--profile-stage", profile_stage]
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=1800, env={**os.environ, "PYTHONPATH": str(ROOT)})
    result = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    prof = next((ln for ln in proc.stdout.splitlines() if ln.startswith("PROFILE ")), None)
    if proc.returncode != 0 or result is None:
        raise SystemExit(f"cold run failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(result[7:]), (json.loads(prof[8:]) if prof else None)


def run_flow(root: Path, epochs: int | None) -> float:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_SERVER_ANALYTICS_ENABLED="false", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "flows.cli", "run", "--artifacts-dir", str(root)] + (["--epochs", str(epochs)] if epochs else [])
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"cold flow run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--epochs", type=int, help="training epochs (default: the config's)")
    ap.add_argument("--flow", action="store_true", help="also time a cold Prefect flow run per repeat")
    ap.add_argument("--label", default="", help="a note for the RESULTS.md section title, e.g. 'before fixes'")
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--profile-stage", help=argparse.SUPPRESS)
    ap.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    args = ap.parse_args()
    if args.child:
        child(args.child, args.epochs, args.profile_stage)
        return
    header = machine()
    runs: list[dict[str, Any]] = []
    flows: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            res, _ = run_child(Path(tmp) / f"direct-{rep}", args.epochs)
            runs.append(res)
            if args.flow:
                flows.append(run_flow(Path(tmp) / f"flow-{rep}", args.epochs))
            total = sum(res["stages"].values())
            print(f"repeat {rep + 1}/{args.repeats}: stages {total:.1f}s" + (f", flow {flows[-1]:.1f}s" if flows else ""))
        medians = {s: spread([r["stages"][s] for r in runs])["median"] for s in ORDER}
        slowest = max(medians, key=lambda s: medians[s])
        _, prof = run_child(Path(tmp) / "profiled", args.epochs, profile_stage=slowest)

    totals = spread([sum(r["stages"].values()) for r in runs])
    lines = [
        f"## Cold run (benchmarks/cold_run.py){' — ' + args.label if args.label else ''}",
        "",
        f"Machine: {header}.",
        f"Default config{f' with {args.epochs} epoch(s)' if args.epochs else ''}, 3 precisions, stage functions called in order in a fresh process and "
        f"artifacts folder; {args.repeats} repeats; median (min–max) seconds.",
        "",
        "| stage | seconds | share |",
        "|---|---|---|",
    ]
    for s in ORDER:
        sp = spread([r["stages"][s] for r in runs])
        lines.append(f"| {s} | {fmt(sp)} | {sp['median'] / totals['median']:.0%} |")
    lines.append(f"| **all stages** | {fmt(totals)} | |")
    lines.append(f"| imports (tasks.*, prefect) | {fmt(spread([r['imports'] for r in runs]))} | |")
    if flows:
        lines.append(f"| whole Prefect flow, cold (`trtflow run`, temporary server) | {fmt(spread(flows))} | |")
    per = {}
    for r in runs:
        for label, dt in r["detail"]:
            per.setdefault(label, []).append(dt)
    lines += ["", "Per call (median s): " + ", ".join(f"{k} {spread(v)['median']:.2f}" for k, v in per.items()), ""]
    if prof:
        lines += [f"Where the slowest stage ({slowest}) spends its time ({prof['kind']}, one more cold run):", "", "```", prof["text"].rstrip(), "```"]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        write_section("cold-run" + (f"-{args.label.replace(' ', '-')}" if args.label else ""), text)


if __name__ == "__main__":
    main()
