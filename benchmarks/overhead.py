"""Orchestration overhead: a fully cached re-run of the default pipeline against a bare Prefect flow.

Run from the repository root (never part of the test suite)::

    python benchmarks/overhead.py                 # 5 repeats, both server modes
    python benchmarks/overhead.py --repeats 3 --modes server
    python benchmarks/overhead.py --repeats 3 --modes server,s3   # also the cached run against an S3 store

Three ways of doing the same (cached) work, each in a fresh process as a user would:

- ``pipeline``: ``flows.pipeline.pipeline`` on the default config, every stage already cached;
- ``bare``: a Prefect flow with the same number and shape of tasks (shared stages called, branch
  stages submitted, then waited on), each a no-op;
- ``direct``: the stage functions called in order without Prefect (each finds its artifact).

Both Prefect runs are timed in two modes: Prefect's temporary server (no ``PREFECT_API_URL``: each
process starts its own) and a running ``prefect server start --host 127.0.0.1`` that this script
starts (with its own PREFECT_HOME in a temporary folder) and stops after. Each repeat runs every
variant once, interleaved, and ratios are taken within a repeat. Two figures per run: the process's
wall time (what a user waits for) and the flow call alone (what the pipeline's own code adds).
The child also reports which heavy modules a cached run imported (torch must not be among them).
Target: cached pipeline <= 1.10x the bare flow (``TARGET``). Writes the ``overhead`` section of RESULTS.md.

Mode ``s3`` runs the cached pipeline against an S3 store (``--store s3://…``: moto's S3 server on
127.0.0.1, started here, the real S3 HTTP API) on the running server, with its own local read cache,
and compares it with the local store's cached run of the same repeat.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from _common import ROOT, fmt, machine, spread, write_section

HEAVY = ("torch", "onnx", "onnxruntime", "sklearn", "scipy", "matplotlib", "onnxscript")
#: the ratio the cached pipeline may cost over the bare flow (the issues' target, process wall time)
TARGET = 1.10


def child(kind: str, artifacts: Path) -> None:
    """Run one variant in this process and print a JSON line with its timings."""
    t_start = time.perf_counter()
    from tasks.config import PipelineConfig

    cfg = PipelineConfig(artifacts_dir=artifacts, store=os.environ.get("TRTFLOW_BENCH_STORE") or None)
    if kind == "pipeline":
        from flows.pipeline import pipeline

        t0 = time.perf_counter()
        pipeline(cfg)
    elif kind == "bare":
        from prefect import flow, task
        from prefect.futures import wait

        @task
        def noop(*args: Any) -> None:
            return None

        @flow(name="bare")
        def bare(n_branches: int) -> None:
            for _ in range(4):  # data, train, export, validate
                noop()
            futures = []
            for _ in range(n_branches):  # precision, validate, build, verify
                a = noop.submit()
                b = noop.submit(a)
                c = noop.submit(b)
                futures += [a, b, c, noop.submit(c)]
            wait(futures)
            wait([noop.submit() for _ in range(n_branches)])  # profile

        t0 = time.perf_counter()
        bare(len(cfg.precisions))
    else:
        import flows.pipeline  # noqa: F401 - the graph's import is not part of the calls timed

        t0 = time.perf_counter()
        direct(cfg)
    flow_s = time.perf_counter() - t0
    print("RESULT " + json.dumps({"flow_s": flow_s, "process_s": time.perf_counter() - t_start, "imported": [m for m in HEAVY if m in sys.modules]}))


def direct(cfg: Any) -> None:
    """The pipeline's stage graph run as plain calls, without Prefect (all cached)."""
    from flows.pipeline import GRAPH
    from tasks.graph import run_plain

    run_plain(GRAPH, cfg)


def run_child(kind: str, artifacts: Path, env: dict[str, str]) -> dict[str, Any]:
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, __file__, "--child", kind, "--artifacts-dir", str(artifacts)],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    wall = time.perf_counter() - t0
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise SystemExit(f"{kind} run failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return {**json.loads(line[7:]), "wall_s": wall, "cached": proc.stdout.count("Cached(") + proc.stderr.count("Cached(")}


def _folder(artifacts: Path, mode: str) -> Path:
    # The S3 runs keep their own local folder (read cache, reports): the local store's is not theirs to read.
    return artifacts.with_name(artifacts.name + "-s3") if mode == "s3" else artifacts


def start_s3() -> tuple[Any, dict[str, str]]:
    """moto's S3 server on 127.0.0.1 with a fresh bucket; returns it and the variables that point a child at it."""
    import logging
    import uuid

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
    bucket = f"bench-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id="bench", aws_secret_access_key="bench", region_name="us-east-1").create_bucket(Bucket=bucket)
    return server, {**env, "TRTFLOW_BENCH_STORE": f"s3://{bucket}/bench"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(home: Path, env: dict[str, str]) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {**env, "PREFECT_HOME": str(home)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            time.sleep(0.5)
    proc.terminate()
    raise SystemExit("prefect server did not become healthy within 120 s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifacts-dir", type=Path, default=ROOT / "artifacts" / "bench-overhead")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--modes", default="temporary,server", help="comma-separated: temporary, server")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    args = ap.parse_args()
    artifacts = args.artifacts_dir.resolve()
    if args.child:
        child(args.child, artifacts)
        return
    header = machine()
    base_env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    base_env.update(PREFECT_SERVER_ANALYTICS_ENABLED="false", PYTHONPATH=str(ROOT))
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    results: dict[tuple[str, str], list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        server = None
        try:
            envs = {}
            if "temporary" in modes:
                envs["temporary"] = base_env
            if "server" in modes or "s3" in modes:
                server, url = start_server(Path(tmp) / "prefect-home", base_env)
                envs["server"] = {**base_env, "PREFECT_API_URL": url}
            if "s3" in modes:
                moto, s3_env = start_s3()
                envs["s3"] = {**envs["server"], **s3_env}
            # Warm-up: the first run computes every stage into the artifact store (and copies it to the bucket).
            for mode, env in envs.items():
                if mode != "temporary" or "server" not in envs:
                    t0 = time.perf_counter()
                    run_child("pipeline", _folder(artifacts, mode), env)
                    print(f"warm-up run {mode} (fills the cache): {time.perf_counter() - t0:.1f}s")
            for rep in range(args.repeats):
                for mode, env in envs.items():
                    kinds = ("pipeline",) if mode == "s3" else ("pipeline", "bare") if rep % 2 == 0 else ("bare", "pipeline")
                    for kind in kinds:
                        results.setdefault((mode, kind), []).append(run_child(kind, _folder(artifacts, mode), env))
                results.setdefault(("none", "direct"), []).append(run_child("direct", artifacts, base_env))
                print(f"repeat {rep + 1}/{args.repeats}: " + ", ".join(f"{m}/{k} {v[-1]['wall_s']:.2f}s" for (m, k), v in results.items()))
        finally:
            if "s3" in envs:
                moto.stop()
            if server is not None:
                server.terminate()
                try:
                    server.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    server.kill()

    lines = [
        "## Orchestration overhead (benchmarks/overhead.py)",
        "",
        f"Machine: {header}.",
        f"Default config, every stage cached; {args.repeats} repeats, each a fresh process per variant, interleaved; median (min–max) over repeats.",
        "Bare: a Prefect flow with the same 19 tasks (4 called, 3×4 submitted per branch, 3 profile), all no-ops. "
        "Direct: the stage functions without Prefect.",
        "",
        "| mode | variant | process wall s | flow call s | heavy modules imported | Cached states |",
        "|---|---|---|---|---|---|",
    ]
    for (mode, kind), rs in results.items():
        imported = sorted({m for r in rs for m in r["imported"]})
        lines.append(
            f"| {mode} | {kind} | {fmt(spread([r['wall_s'] for r in rs]))} | {fmt(spread([r['flow_s'] for r in rs]))} | "
            f"{', '.join(imported) or 'none'} | {rs[-1]['cached'] if kind == 'pipeline' else ''} |"
        )
    lines += ["", f"Cached pipeline / bare flow, within each repeat (target ≤ {TARGET:g}×):", ""]
    if ("s3", "pipeline") in results:
        p, local = results[("s3", "pipeline")], results[("server", "pipeline")]
        wall = spread([x["wall_s"] / y["wall_s"] for x, y in zip(p, local, strict=True)])
        lines.append(f"- S3 store (moto's S3 server on 127.0.0.1, its own local read cache): cached pipeline {fmt(spread([x['wall_s'] for x in p]))} s "
                     f"against {fmt(spread([x['wall_s'] for x in local]))} s on the local store: {fmt(wall)}× (process wall, within each repeat)")
    for mode in envs:
        p, b = results.get((mode, "pipeline")), results.get((mode, "bare"))
        if not p or not b:
            continue
        wall = spread([x["wall_s"] / y["wall_s"] for x, y in zip(p, b, strict=True)])
        flow_ = spread([x["flow_s"] / y["flow_s"] for x, y in zip(p, b, strict=True)])
        lines.append(f"- {'temporary server' if mode == 'temporary' else 'running server'}: process wall {fmt(wall)}× ({'met' if wall['median'] <= TARGET else 'MISSED'}); flow call alone {fmt(flow_)}×")
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        write_section("overhead", text)


if __name__ == "__main__":
    main()
