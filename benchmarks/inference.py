"""Inference speed: PyTorch eager vs ONNX Runtime fp32 / fp16 / int8 (and TensorRT where present).

Run from the repository root (never part of the test suite)::

    python benchmarks/inference.py                     # batches 1, 64, 256; 2 threads; 5 repeats
    python benchmarks/inference.py --repeats 7 --seconds 0.5
    python benchmarks/inference.py --explore-int8      # also time other int8 graph forms in ORT

The engines are the pipeline's own (plain stage functions, cached under ``artifacts/bench``), run
through the pipeline's runners on real test samples. Each repeat times every candidate at every batch
once, round-robin, so a load change on a shared machine hits all of them alike; ratios are computed
within a repeat and then summarised. Targets (2-core CPU): ORT fp32 >= 3x PyTorch eager throughput at
batch 64, and int8 faster than fp32. Writes the ``inference`` section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from _common import ROOT, fmt, machine, spread, write_section

from tasks.backends.onnxruntime import OnnxRuntimeRunner
from tasks.backends.registry import choose_backend
from tasks.config import Backend, BatchProfile, PipelineConfig, Precision
from tasks.data import load_splits, splits_from_dataset
from tasks.engine import engine_from_variant, runner_from_build
from tasks.export import onnx_from_checkpoint
from tasks.precision import variant_from_onnx
from tasks.inference import module_from_checkpoint
from tasks.train import checkpoint_from_splits


def timed(run: Callable[[int], list[float]], seconds: float, warmup: int = 3) -> float:
    """Median ms of one run, timing for about ``seconds`` (at least 5 runs) after a warm-up."""
    first = run(max(warmup, 1))
    per = max(statistics.median(first), 1e-3)
    return statistics.median(run(max(5, int(seconds * 1e3 / per))))


def torch_runner(model: Any, threads: int) -> Callable[[np.ndarray], Callable[[int], list[float]]]:
    import torch

    torch.set_num_threads(threads)

    def for_batch(x: np.ndarray) -> Callable[[int], list[float]]:
        xt = torch.from_numpy(x)

        def run(n: int) -> list[float]:
            out = []
            with torch.inference_mode():
                for _ in range(n):
                    t0 = time.perf_counter_ns()
                    model(xt)
                    out.append((time.perf_counter_ns() - t0) / 1e6)
            return out

        return run

    return for_batch


class Candidate:
    """One runtime under test. Engines get a fresh session per measurement and release it after:
    an idle ORT (or OpenMP) thread pool keeps spinning for a while and would slow the next candidate."""

    def __init__(self, make_runner: Callable[[], Any] | None = None, torch_model: Any = None, threads: int = 2) -> None:
        self.make_runner, self.torch_model, self.threads = make_runner, torch_model, threads

    def times(self, inputs: dict[int, np.ndarray], seconds: float) -> dict[int, float]:
        if self.torch_model is not None:
            run = torch_runner(self.torch_model, self.threads)
            return {b: timed(run(x), seconds) for b, x in inputs.items()}
        assert self.make_runner is not None
        with self.make_runner() as r:
            name = r.input_specs()[0].name
            return {b: timed(lambda n, x=x: r.time_infer({name: x}, n), seconds) for b, x in inputs.items()}


def explore_int8(fp32_onnx: Path, calib: np.ndarray, out: Path) -> dict[str, Path]:
    """Other int8 forms of the same model, to see what ORT's CPU kernels are fast with.

    The pipeline's int8 is symmetric int8 activations (zero point 0), which TensorRT requires; after a
    ReLU such a tensor cannot drop its Q/DQ pair (ORT removes a ReLU only when the zero point is the
    type's minimum), so ORT runs DQ -> ReLU -> Q in float around every activation.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    class Reader:
        def __init__(self) -> None:
            self.it = iter([{"input": calib[i : i + 32]} for i in range(0, len(calib), 32)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.it, None)

    forms = {
        "int8 asym-s8 act (ORT form)": (QuantType.QInt8, False),
        "int8 asym-u8 act (ORT form)": (QuantType.QUInt8, False),
    }
    paths = {}
    for label, (act, sym) in forms.items():
        dst = out / (label.split()[1] + ".onnx")
        if not dst.exists():
            quantize_static(
                str(fp32_onnx), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                activation_type=act, weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
                extra_options={"ActivationSymmetric": sym, "WeightSymmetric": True, "QuantizeBias": False},
            )
        paths[label] = dst
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifacts-dir", type=Path, default=ROOT / "artifacts" / "bench")
    ap.add_argument("--batches", default="1,64,256")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=0.3, help="timed work per candidate, batch and repeat")
    ap.add_argument("--pause", type=float, default=0.3, help="seconds of idle between candidates (spinning thread pools settle)")
    ap.add_argument("--explore-int8", action="store_true")
    ap.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    root = args.artifacts_dir.resolve()
    cfg = PipelineConfig(artifacts_dir=root, batch=BatchProfile(min=1, opt=64, max=max(batches)))
    header = machine()

    t0 = time.perf_counter()
    data = splits_from_dataset(cfg.data, root)
    ckpt = checkpoint_from_splits(data, cfg.train, root)
    onnx = onnx_from_checkpoint(ckpt, root)
    options = {**cfg.engine.model_dump(), "threads": args.threads}
    backends = [Backend.onnxruntime]
    builder, _ = choose_backend(Backend.auto)
    if builder.name == Backend.tensorrt.value:
        backends.append(Backend.tensorrt)
    engines = {}
    variants = {}
    for p in Precision:
        variants[p] = variant_from_onnx(onnx, data, p, cfg.calibration_samples, root)
        for b in backends:
            engines[f"{b.value} {p.value}"] = engine_from_variant(variants[p], b, cfg.batch, options, root)
    print(f"artifacts ready in {time.perf_counter() - t0:.1f}s ({root})")

    x = load_splits(data)["x_test"]
    inputs = {b: np.ascontiguousarray(np.concatenate([x] * (-(-b // len(x))))[:b]) for b in batches}
    candidates: dict[str, Candidate] = {"pytorch eager": Candidate(torch_model=module_from_checkpoint(ckpt), threads=args.threads)}
    for label, eng in engines.items():
        candidates[label] = Candidate(lambda eng=eng: runner_from_build(eng))
    if args.explore_int8:
        calib = load_splits(data)["x_train"][: cfg.calibration_samples]
        out = root / "explore-int8"
        out.mkdir(parents=True, exist_ok=True)
        for label, path in explore_int8(variants[Precision.fp32].path("model.onnx"), calib, out).items():
            candidates[label] = Candidate(lambda path=path: OnnxRuntimeRunner(path, threads=args.threads, min_batch=1, max_batch=max(batches)))

    ms: dict[tuple[str, int], list[float]] = {}
    for rep in range(args.repeats):
        order = list(candidates) if rep % 2 == 0 else list(reversed(candidates))
        for label in order:
            for b, t in candidates[label].times(inputs, args.seconds).items():
                ms.setdefault((label, b), []).append(t)
            time.sleep(args.pause)
        print(f"repeat {rep + 1}/{args.repeats} done")

    def ratio(num: str, den: str, b: int) -> dict[str, float] | None:
        # Throughput of num over den = den's time / num's time, per repeat (same load for both).
        if (num, b) not in ms or (den, b) not in ms:
            return None
        return spread([d / n for n, d in zip(ms[(num, b)], ms[(den, b)], strict=True)])

    lines = [
        "## Inference speed (benchmarks/inference.py)",
        "",
        f"Machine: {header}.",
        f"{args.threads} threads each (torch.set_num_threads, ORT intra-op); {args.repeats} repeats, round-robin; "
        f"each cell: median over repeats of the median per-batch time (min–max over repeats), about {args.seconds}s of timed runs per cell. "
        "Real test samples; wall clock (perf_counter_ns) around each call.",
        "",
        "| runtime | " + " | ".join(f"batch {b}: ms" for b in batches) + " | " + " | ".join(f"batch {b}: samples/s" for b in batches) + " |",
        "|---|" + "---|" * (2 * len(batches)),
    ]
    for label in candidates:
        t = [spread(ms[(label, b)]) for b in batches]
        tput = [f"{b / s['median'] * 1e3:,.0f}" for b, s in zip(batches, t, strict=True)]
        lines.append(f"| {label} | " + " | ".join(fmt(s) for s in t) + " | " + " | ".join(tput) + " |")
    lines += ["", "Ratios (throughput, computed within each repeat; median (min–max)):", ""]
    checks = []
    for b in batches:
        for num, den in (("onnxruntime fp32", "pytorch eager"), ("onnxruntime int8", "onnxruntime fp32"), ("onnxruntime fp16", "onnxruntime fp32"),
                         ("int8 asym-s8 act (ORT form)", "onnxruntime fp32"), ("int8 asym-u8 act (ORT form)", "onnxruntime fp32"),
                         ("tensorrt fp32", "pytorch eager"), ("tensorrt int8", "tensorrt fp32")):
            r = ratio(num, den, b)
            if r is not None:
                lines.append(f"- batch {b}: {num} / {den}: {fmt(r)}×")
    fp32_vs_torch = ratio("onnxruntime fp32", "pytorch eager", 64)
    int8_vs_fp32 = ratio("onnxruntime int8", "onnxruntime fp32", 64)
    if fp32_vs_torch:
        checks.append(f"- Target ORT fp32 ≥ 3× PyTorch eager at batch 64: {fmt(fp32_vs_torch)}× → {'met' if fp32_vs_torch['median'] >= 3 else 'MISSED'}")
    if int8_vs_fp32:
        checks.append(f"- Target int8 faster than fp32 (ORT, batch 64): {fmt(int8_vs_fp32)}× → {'met' if int8_vs_fp32['median'] > 1 else 'MISSED'}")
    lines += ["", *checks]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        write_section("inference", text)


if __name__ == "__main__":
    main()
