"""Scale: wall time per stage and peak memory against dataset size (datasets bigger than memory).

Run from the repository root (never part of the test suite; large sizes need disk space and time)::

    python benchmarks/scale.py                                  # 0.25, 1, 4 GiB as .npy folders
    python benchmarks/scale.py --sizes 0.25,1,4,12              # the 12 GiB case too
    python benchmarks/scale.py --sizes 2.2 --samples 3000 --format npz --shape 3,256,256 --epochs 5 --keep --work W
    python benchmarks/scale.py --cli --dataset W/scale-2.2gib.npz --epochs 5   # the same case, end to end
    python benchmarks/scale.py --work /data/scratch --keep       # where the datasets go; keep them
    python benchmarks/scale.py --cli --dataset big.npz          # `trtflow run` as a user runs it, whole tree measured
    python benchmarks/scale.py --cli --dataset big.npz --code ../old-checkout   # the same on another checkout
    python benchmarks/scale.py --cli --sizes 0.25,1,4,12 --shape 4096 --batch-size 256   # the curve, end to end

For each size a synthetic classification dataset (float32 samples of ``--shape``, 10 classes with a
weak class signal) is written in chunks (never whole in memory), then a fresh child process runs every
stage as a plain function (data, train for ``--epochs``, export, validate, fp32/fp16/int8 variants,
ONNX Runtime builds, verification; no Prefect, no profile), timing each. With ``--cli`` the case is
instead the real command, ``trtflow run --dataset D`` (Prefect server, concurrent branches, profile),
measured as a process tree by ``_tree.py``: wall time, the tree's summed RSS and the largest process's
high-water mark. ``--code DIR`` runs another checkout's code on the same data (before/after pairs).
Peak RSS is the child's own
RSS high-water mark (VmHWM of /proc/self/status, read after each stage): the whole pipeline process
from its start. (``getrusage(RUSAGE_CHILDREN)`` would also count the parent's pages at fork time,
i.e. the dataset generator's.) Writes the ``scale``
section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from _common import ROOT, machine, write_section

STAGES = ("data", "train", "export", "validate", "precision", "build", "verify")


def write_dataset(folder: Path, gib: float, shape: tuple[int, ...], fmt: str, classes: int = 10, seed: int = 0, samples: int | None = None) -> tuple[Path, int]:
    """Write ``gib`` GiB of float32 samples (and int64 labels), chunk by chunk; return the path and N
    (``samples``, when given, instead of the count that makes ``gib``)."""
    sample = int(np.prod(shape)) * 4
    n = samples or max(classes * 20, int(gib * (1 << 30) // sample))
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    folder.mkdir(parents=True, exist_ok=True)
    x_path = folder / "x.npy"
    x = np.lib.format.open_memmap(x_path, mode="w+", dtype=np.float32, shape=(n, *shape))
    step = max(1, (256 << 20) // sample)
    signal = rng.standard_normal((classes, *shape), dtype=np.float32)
    if len(shape) == 3 and shape[1] % 8 == 0 and shape[2] % 8 == 0:
        # Images: a coarse 8×8 class pattern per channel, so that the signal survives the CNN's pooling
        # (pixel-level noise as the signal left the default CNN at chance and failed the collapse gate).
        coarse = rng.standard_normal((classes, shape[0], 8, 8), dtype=np.float32)
        signal = coarse.repeat(shape[1] // 8, axis=2).repeat(shape[2] // 8, axis=3)
    for i in range(0, n, step):
        j = min(n, i + step)
        x[i:j] = rng.standard_normal((j - i, *shape), dtype=np.float32) * 0.5 + 0.5 * signal[y[i:j]]
    x.flush()
    del x
    np.save(folder / "y.npy", y)
    if fmt == "npy":
        return folder, n
    path = folder.with_suffix(".npz")
    # np.savez writes a memory-mapped array in buffered chunks: stored (uncompressed) members.
    np.savez(path, x=np.load(x_path, mmap_mode="r"), y=y)
    shutil.rmtree(folder)
    return path, n


def child(dataset: str, root: str, epochs: int, batch_size: int) -> None:
    """Run every stage once, cold, in this process; print per-stage seconds and RSS marks as JSON."""
    from tasks.config import Backend, BatchProfile, DataConfig, Precision, TrainConfig
    from tasks.data import splits_from_dataset
    from tasks.engine import batch_for_memory, engine_from_variant
    from tasks.export import onnx_from_checkpoint
    from tasks.precision import variant_from_onnx
    from tasks.train import checkpoint_from_splits
    from tasks.validate import validated_onnx
    from tasks.verify import verification_of_engine
    from tasks.config import default_tolerances

    def hwm() -> float:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / (1 << 20)  # GiB
        return float("nan")

    out: dict[str, Any] = {"seconds": {}, "hwm_gib": {}}
    art = Path(root)

    def timed(stage: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        r = fn(*args, **kwargs)
        out["seconds"][stage] = out["seconds"].get(stage, 0.0) + time.perf_counter() - t0
        out["hwm_gib"][stage] = hwm()
        return r

    data = timed("data", splits_from_dataset, DataConfig(dataset=Path(dataset)), art)
    ckpt = timed("train", checkpoint_from_splits, data, TrainConfig(epochs=epochs, batch_size=batch_size), art)
    batch = batch_for_memory(BatchProfile(), Backend.onnxruntime, ckpt)  # as the flow does
    onnx = timed("export", onnx_from_checkpoint, ckpt, art)
    timed("validate", validated_onnx, onnx, data, art)
    tol = default_tolerances()
    passed = {}
    for p in (Precision.fp32, Precision.fp16, Precision.int8):
        v = timed("precision", variant_from_onnx, onnx, data, p, 256, art)
        timed("validate", validated_onnx, v, data, art)
        e = timed("build", engine_from_variant, v, Backend.onnxruntime, batch, {"threads": 2, "workspace_mib": 1024, "tf32": True}, art)
        try:
            r = timed("verify", verification_of_engine, e, ckpt, data, p, tol[p], batch, art, False, v)
            passed[p.value] = r.meta["passed"]
        except Exception as exc:  # a failed verification is a result too
            passed[p.value] = f"failed: {type(exc).__name__}"
    out["passed"] = passed
    out["sizes"] = data.meta["sizes"]
    out["memory_plan_gib"] = ckpt.meta.get("memory_plan", {}).get("total", 0) / (1 << 30)
    out["engine_batch"] = batch.model_dump()
    print(json.dumps(out))


def run_case(dataset: Path, epochs: int, batch_size: int) -> dict[str, Any]:
    """Run the child on one dataset; add its wall time and whole-lifetime peak RSS."""
    with tempfile.TemporaryDirectory(prefix="scale-art-") as root:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "TRTFLOW_CACHE_DIR": str(Path(root) / "cache")}
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        t0 = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, __file__, "--child", str(dataset), root, str(epochs), str(batch_size)],
            capture_output=True, text=True, env=env, cwd=ROOT,
        )
        wall = time.perf_counter() - t0
        peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if proc.returncode != 0:
        raise SystemExit(f"child failed on {dataset}:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall_s"] = wall
    # The child's own high-water mark: RUSAGE_CHILDREN also counts the parent's pages at fork time.
    result["peak_rss_gib"] = max(result["hwm_gib"].values())
    result["rusage_children_gib"] = peak_kib / (1 << 20) if peak_kib > before else None
    return result


def run_cli(dataset: Path, epochs: int, batch_size: int, code: Path) -> dict[str, Any]:
    """``trtflow run`` on one dataset with the checkout ``code``, measured as a whole process tree."""
    from _tree import run_measured

    with tempfile.TemporaryDirectory(prefix="scale-cli-") as root:
        env = {
            **os.environ, "PYTHONPATH": str(code), "TRTFLOW_CACHE_DIR": str(Path(root) / "cache"),
            # the server starts while the machine is busy with nothing else, but allow for a slow disk
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
        }
        cmd = [sys.executable, "-m", "flows.cli", "run", "--dataset", str(dataset), "--artifacts-dir", str(Path(root) / "artifacts"),
               "--epochs", str(epochs), "--batch-size", str(batch_size)]
        r = run_measured(cmd, env=env, cwd=code)
        report = Path(root) / "artifacts" / "report.json"
        verified = {}
        if report.is_file():
            for p, o in json.loads(report.read_text()).get("precisions", {}).items():
                verified[p] = o.get("verified", o.get("passed", "?"))
        r["verified"] = verified
    if r["rc"] != 0:
        print(r["tail"], file=sys.stderr)
    return r


def drop_page_cache() -> None:
    """Empty the kernel's page cache (root only), so that the next run reads the dataset from disk."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError as exc:
        raise SystemExit(f"--cold needs root to write /proc/sys/vm/drop_caches ({exc})") from exc


def cli_main(args: argparse.Namespace) -> None:
    """The ``--cli`` cases: one row per dataset (and per checkout)."""
    code = (args.code or ROOT).resolve()
    header = machine()  # before the runs: the load average the runs started under
    rows = []
    shape = tuple(int(d) for d in args.shape.split(","))
    work = args.work or Path(tempfile.mkdtemp(prefix="trtflow-scale-"))
    # Existing datasets, or (without --dataset) one written per --sizes entry, removed after its run.
    sizes = sorted(float(g) for g in args.sizes.split(","))
    cases = (
        ((ds, False) for ds in args.dataset) if args.dataset else
        ((write_dataset(work / f"scale-{gib:g}gib", gib, shape, args.format, samples=args.samples)[0], not args.keep) for gib in sizes)
    )
    for ds, written in cases:
        if args.cold:
            drop_page_cache()
        print(f"{ds}: trtflow run with {code} ...", flush=True)
        r = run_cli(ds.resolve(), args.epochs, args.batch_size, code)
        rev = subprocess.run(["git", "-C", str(code), "log", "-1", "--format=%h"], capture_output=True, text=True).stdout.strip()
        if subprocess.run(["git", "-C", str(code), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True).stdout.strip():
            rev += " + uncommitted changes"
        r.update(dataset=ds.name, bytes=ds.stat().st_size if ds.is_file() else sum(f.stat().st_size for f in ds.iterdir()), code=rev)
        print(json.dumps({k: v for k, v in r.items() if k != "tail"}), flush=True)
        rows.append(r)
        if written:
            shutil.rmtree(ds, ignore_errors=True) if ds.is_dir() else ds.unlink(missing_ok=True)
    lines = [
        "## Scale, end to end (benchmarks/scale.py --cli)",
        "",
        f"Machine: {header}.",
        ("Page cache emptied before each run: the dataset is read from disk. " if args.cold else "")
        + f"`trtflow run --dataset D --epochs {args.epochs} --batch-size {args.batch_size}` with every other setting at its default "
        "(fp32/fp16/int8 on ONNX Runtime, profile on, its own Prefect server). Tree RSS: the summed RSS of the command's "
        "whole process tree, sampled every 0.25 s; process peak: the largest VmHWM among them (what `/usr/bin/time` reports).",
        "",
        "| dataset | GiB | code | exit | wall s | peak tree RSS GiB | largest process peak GiB | verified |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['dataset']} | {r['bytes'] / (1 << 30):.2f} | {r['code']} | {r['rc']} | {r['wall_s']:.0f} | {r['peak_tree_rss_gib']:.2f} | {r['peak_process_gib']:.2f} | "
                     + (", ".join(f"{k} {'yes' if v is True else v}" for k, v in r["verified"].items()) or "-") + " |")
    if len(rows) >= 2 and len({r["code"] for r in rows}) == 1:
        a, b = rows[0], rows[-1]
        ga, gb = a["bytes"] / (1 << 30), b["bytes"] / (1 << 30)
        lines += ["", f"From {ga:.2f} to {gb:.2f} GiB ({gb / ga:.0f}× the data): wall time {b['wall_s'] / a['wall_s']:.1f}×, "
                      f"peak tree RSS {b['peak_tree_rss_gib'] / a['peak_tree_rss_gib']:.2f}× ({a['peak_tree_rss_gib']:.2f} → {b['peak_tree_rss_gib']:.2f} GiB)."]
    write_section(f"scale-cli-{args.section or code.name}", "\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="0.25,1,4", help="dataset sizes in GiB, comma-separated, ascending")
    ap.add_argument("--shape", default="3,64,64", help="one sample's shape (float32)")
    ap.add_argument("--format", choices=["npy", "npz"], default="npy")
    ap.add_argument("--samples", type=int, help="samples per dataset (instead of the count that makes each size)")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--work", type=Path, default=None, help="folder for the datasets (default: a temporary one)")
    ap.add_argument("--keep", action="store_true", help="keep the datasets")
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    ap.add_argument("--from-log", type=Path, help="write the table from the JSON lines an earlier run printed")
    ap.add_argument("--cli", action="store_true", help="run `trtflow run` on --dataset instead of the stage functions")
    ap.add_argument("--dataset", type=Path, action="append", default=[], help="with --cli: an existing dataset (repeatable; default: write one per --sizes)")
    ap.add_argument("--code", type=Path, help="with --cli: the checkout whose code runs (default: this one)")
    ap.add_argument("--section", help="with --cli: the RESULTS.md section's name suffix")
    ap.add_argument("--cold", action="store_true", help="with --cli: empty the page cache before each run (root): the data comes from disk")
    args = ap.parse_args()
    if args.cli:
        cli_main(args)
        return
    if args.child:
        ds, root, epochs, bs = args.child
        child(ds, root, int(epochs), int(bs))
        return
    shape = tuple(int(d) for d in args.shape.split(","))
    rows = []
    header = machine()
    sizes = [] if args.from_log else sorted(float(s) for s in args.sizes.split(","))
    if args.from_log:
        for line in args.from_log.read_text().splitlines():
            if line.startswith("{"):
                r = json.loads(line)
                r["peak_rss_gib"] = max(r["hwm_gib"].values())
                rows.append(r)
        header += " (table rebuilt from the run's log)"
    work = args.work or Path(tempfile.mkdtemp(prefix="trtflow-scale-"))
    for gib in sizes:
        case = work / f"scale-{gib:g}gib"
        t0 = time.perf_counter()
        dataset, n = write_dataset(case, gib, shape, args.format, samples=args.samples)
        gen = time.perf_counter() - t0
        print(f"{gib:g} GiB: {n} samples written in {gen:.0f}s; running the pipeline ...", flush=True)
        r = run_case(dataset, args.epochs, args.batch_size)
        r.update(gib=gib, samples=n, format=args.format)
        rows.append(r)
        print(json.dumps(r), flush=True)
        if not args.keep:
            shutil.rmtree(dataset, ignore_errors=True) if dataset.is_dir() else dataset.unlink(missing_ok=True)
    lines = [
        "## Scale (benchmarks/scale.py)",
        "",
        f"Machine: {header}.",
        f"Synthetic float32 samples of shape {shape} (10 classes), as {args.format}; default model, {args.epochs} epoch(s) at batch "
        f"{args.batch_size}; every stage as a plain function in one fresh process (fp32/fp16/int8 on ONNX Runtime, no profile). "
        "Peak RSS: the pipeline process's high-water mark (VmHWM), every stage included.",
        "",
        "| dataset | samples | wall s | " + " | ".join(f"{s} s" for s in STAGES) + " | peak RSS GiB | memory plan GiB | verified |",
        "|---|---|---|" + "---|" * len(STAGES) + "---|---|---|",
    ]
    for r in rows:
        secs = " | ".join(f"{r['seconds'].get(s, 0):.1f}" for s in STAGES)
        ok = ", ".join(f"{k} {'yes' if v is True else v}" for k, v in r["passed"].items())
        lines.append(f"| {r['gib']:g} GiB | {r['samples']} | {r['wall_s']:.0f} | {secs} | {r['peak_rss_gib']:.2f} | {r['memory_plan_gib']:.2f} | {ok} |")
    if len(rows) >= 2:
        a, b = rows[0], rows[-1]
        lines += [
            "",
            f"From {a['gib']:g} to {b['gib']:g} GiB ({b['gib'] / a['gib']:.0f}× the data): wall time {b['wall_s'] / a['wall_s']:.1f}×, "
            f"peak RSS {b['peak_rss_gib'] / a['peak_rss_gib']:.2f}× ({a['peak_rss_gib']:.2f} → {b['peak_rss_gib']:.2f} GiB).",
        ]
    write_section(f"scale-{args.format}-{args.shape.replace(',', 'x')}", "\n".join(lines))


if __name__ == "__main__":
    main()
