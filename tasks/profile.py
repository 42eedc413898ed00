"""Stage ``profile``: how fast each engine is, next to PyTorch eager on the same inputs.

For every engine it measures latency (p50/p90/p99) at batch 1 and throughput (samples/s) at the
profile's maximum batch (with dynamic axes beyond the batch: at the profile's min, opt and max shape,
latency being the min shape's and throughput the max shape's), after warm-up, with as many runs as ``ProfileConfig`` asks for (adaptive: at
least ``min_seconds`` of timed work and ``min_iterations`` runs, capped at ``max_seconds``). PyTorch
eager is measured once per checkpoint, batch, thread count and machine, in its own artifact
(``profile-torch``), so three precisions share one reference measurement.

Timings belong to a machine: both keys include the CPU model, the usable cores and the thread counts
(and the engine's own environment, e.g. the GPU). Engines are timed through ``BaseRunner.time_infer``
(wall clock by default; a GPU runner overrides it with device events). Measurements in one process
never overlap (a lock), because two timings sharing 2 cores measure each other.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from tasks.artifacts import ArtifactRef
from tasks.config import BatchProfile, ProfileConfig
from tasks.locking import key_lock
from tasks.stage import StageSpec, run_stage, stage_key, was_cached
from tasks.store import Store, as_store

log = logging.getLogger("trtflow.profile")

REPORT = "profile.json"
PERCENTILES = (50, 90, 99)
#: a measurement never runs more than this many timed iterations, whatever the settings
MAX_ITERATIONS = 100_000
#: serialises measurements in this process: concurrent timings on a 2-core CPU distort each other
_LOCK = threading.Lock()
#: the key of the file lock that serialises measurements across processes
MEASURING = "measuring" + "0" * 55
#: PyTorch references measured in this process: a refresh of three precisions measures torch once
_MEASURED: set[str] = set()


def machine() -> dict[str, str]:
    """What a CPU timing depends on besides the code: CPU model, usable cores, architecture."""
    return dict(_machine())


@lru_cache(maxsize=1)
def _machine() -> dict[str, str]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return {"cpu": cpu or platform.processor() or platform.machine(), "cores": str(cores), "machine": platform.machine()}


def _settings_in_key(inputs: Mapping[str, Any]) -> Mapping[str, Any]:
    # 'enabled' decides whether the stage runs at all, not what it measures.
    out = dict(inputs)
    settings = out.get("settings")
    if isinstance(settings, ProfileConfig):
        out["settings"] = settings.model_dump(exclude={"enabled"})
    return out


def _engine_environment(inputs: Mapping[str, Any]) -> dict[str, str]:
    from tasks.engine import engine_info

    env = {f"engine.{k}": str(v) for k, v in sorted(engine_info(inputs["engine"]).environment.items())}
    return {**machine(), **env}


def _torch_environment(inputs: Mapping[str, Any]) -> dict[str, str]:
    return dict(machine())


SPEC = StageSpec(
    "profile",
    __name__,
    libraries=("numpy", "onnxruntime", "tensorrt"),
    environment=_engine_environment,
    key_inputs=_settings_in_key,
)
TORCH_SPEC = StageSpec(
    "profile-torch",
    __name__,
    libraries=("torch", "numpy"),
    environment=_torch_environment,
    key_inputs=_settings_in_key,
)


def percentiles(times_ms: Sequence[float], qs: Sequence[int] = PERCENTILES) -> dict[str, float]:
    """Percentiles of durations (linear interpolation, as numpy's default).

    Args:
        times_ms: durations, any order, at least one.
        qs: percentiles in 0..100.

    Returns:
        ``{"p50_ms": ..., ...}`` for each q.

    Raises:
        ValueError: no durations.
    """
    if not len(times_ms):
        raise ValueError("percentiles of no durations")
    values = np.percentile(np.asarray(times_ms, dtype=np.float64), list(qs))
    return {f"p{q}_ms": float(v) for q, v in zip(qs, values, strict=True)}


def timed_runs(run: Callable[[int], list[float]], settings: ProfileConfig) -> list[float]:
    """Warm up, then time runs in chunks until the settings' budget is met.

    Stops once there are at least ``min_iterations`` runs and ``min_seconds`` of timed work, or when
    ``max_seconds`` of timed work is reached (then possibly with fewer runs), or at ``MAX_ITERATIONS``.
    Chunk sizes are estimated from the warm-up (or the runs so far), so a slow model does not overrun
    the cap by more than about one run.

    Args:
        run: ``run(n)`` executes ``n`` runs and returns their durations in ms (e.g. ``time_infer``).
        settings: warm-up and budget.

    Returns:
        The timed durations (warm-up excluded), in ms.
    """
    min_ms, max_ms = settings.min_seconds * 1e3, settings.max_seconds * 1e3
    estimate = None
    if settings.warmup:
        estimate = float(np.median(run(settings.warmup)))
    times: list[float] = []
    while True:
        total = float(sum(times))
        if times and ((total >= min_ms and len(times) >= settings.min_iterations) or total >= max_ms or len(times) >= MAX_ITERATIONS):
            return times
        per = total / len(times) if times else estimate
        if per is None:
            chunk = 1
        else:
            per = max(per, 1e-6)
            want = max(settings.min_iterations - len(times), math.ceil((min_ms - total) / per))
            room = math.floor((max_ms - total) / per)
            chunk = max(1, min(want, room, MAX_ITERATIONS - len(times)))
        times.extend(run(chunk))


def measurement(times_ms: Sequence[float], batch: int) -> dict[str, Any]:
    """Summarise one measurement: percentiles, mean, extremes and throughput.

    Throughput is samples over the summed duration of the timed runs (not over wall time between
    them), so it matches the latencies it is computed from.
    """
    total_ms = float(sum(times_ms))
    return {
        "batch": int(batch),
        "iterations": len(times_ms),
        **percentiles(times_ms),
        "mean_ms": total_ms / len(times_ms),
        "min_ms": float(min(times_ms)),
        "max_ms": float(max(times_ms)),
        "timed_s": total_ms / 1e3,
        "samples_per_s": batch * len(times_ms) / (total_ms / 1e3) if total_ms > 0 else None,
    }


def speedup(engine: Mapping[str, Any], torch: Mapping[str, Any]) -> dict[str, float | None]:
    """How many times faster the engine is than PyTorch eager.

    Args:
        engine: ``{"latency": measurement, "throughput": measurement}`` of the engine.
        torch: the same for PyTorch eager.

    Returns:
        ``latency_p50``: torch p50 / engine p50 at the latency batch; ``throughput``: engine samples/s
        over torch samples/s at the max batch. None where a value is missing or zero.
    """

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a and b else None

    return {
        "latency_p50": ratio(torch["latency"]["p50_ms"], engine["latency"]["p50_ms"]),
        "throughput": ratio(engine["throughput"]["samples_per_s"], torch["throughput"]["samples_per_s"]),
    }


def inputs_of(data: ArtifactRef, batches: Sequence[int]) -> dict[int, dict[str, np.ndarray]]:
    """Real test samples at each batch size, input name -> array (the test split tiled when a batch is larger)."""
    return {b: inputs_at(data, b) for b in batches}


def inputs_at(data: ArtifactRef, batch: int, lengths: Mapping[str, Mapping[int, int]] | None = None, pad_values: Mapping[str, float] | None = None) -> dict[str, np.ndarray]:
    """Real test samples: ``batch`` rows (the test split tiled when larger), cut or padded to ``lengths``."""
    from tasks.data import split_inputs, split_size
    from tasks.shapes import fit_lengths

    rows = np.arange(batch) % split_size(data, "test")  # only the rows used are read
    feed = {k: np.ascontiguousarray(v) for k, v in split_inputs(data, "test", rows).items()}
    return fit_lengths(feed, lengths, pad_values) if lengths else feed


def timed_shapes(batch: BatchProfile) -> dict[str, tuple[int, dict[str, dict[int, int]], str]]:
    """What is timed: name -> (batch, lengths, shape text).

    ``latency`` at batch 1 (or the profile's min) and ``throughput`` at the max batch; with dynamic axes
    beyond the batch, the profile's ``min``, ``opt`` and ``max`` shapes (latency is then the min shape's
    measurement, throughput the max shape's).
    """
    from tasks.shapes import dynamic, shape_points

    if not dynamic(batch):
        lat_b, thr_b = batches_of(batch)
        return {"latency": (lat_b, {}, f"batch {lat_b}"), "throughput": (thr_b, {}, f"batch {thr_b}")}
    return {p.level: (p.batch, p.lengths, p.text()) for p in shape_points(batch)}


def _headline(measured: dict[str, Any]) -> dict[str, Any]:
    """latency / throughput of a set of measurements by shape (the min and max shapes), plus by_shape."""
    if "latency" in measured:
        return measured
    levels = list(measured)
    return {"latency": measured[levels[0]], "throughput": measured[levels[-1]], "by_shape": [{"level": k, **v} for k, v in measured.items()]}


def batches_of(batch: BatchProfile) -> tuple[int, int]:
    """(latency batch, throughput batch): batch 1, or the profile's minimum when that is larger; and its maximum."""
    return max(1, batch.min), batch.max


def _torch_device(engine: ArtifactRef) -> str:
    # A GPU engine against PyTorch on the CPU would flatter the engine: compare on the same device.
    from tasks.backends.registry import backend_spec
    from tasks.engine import engine_info

    return backend_spec(engine_info(engine).backend).torch_device


def torch_profile(
    checkpoint: ArtifactRef,
    data: ArtifactRef,
    batch: BatchProfile,
    settings: ProfileConfig,
    threads: int,
    device: str,
    store: Store,
    refresh: bool = False,
) -> ArtifactRef:
    """Measure PyTorch eager (``inference_mode``) on the same inputs as the engines.

    Args:
        checkpoint: the ``train`` artifact.
        data: the ``data`` artifact (test samples are the inputs).
        batch: latency at ``batches_of(batch)[0]``, throughput at ``batch.max``.
        settings: warm-up and budget.
        threads: ``torch.set_num_threads`` during the measurement (restored after).
        device: ``cpu`` or ``cuda`` (falls back to the CPU, and says so, when torch has no CUDA).
        store: the artifact store.
        refresh: measure again even if a result exists.

    Returns:
        The ``profile-torch`` artifact; ``meta`` holds the measurements.
    """
    inputs = {"checkpoint": checkpoint, "data": data, "batch": batch, "settings": settings, "threads": threads, "device": device}
    # Within one process a refresh measures PyTorch once, however many engines are profiled.
    measured = stage_key(TORCH_SPEC, inputs) in _MEASURED

    def make(out: Path) -> dict[str, Any]:
        meta = _torch_measurement(checkpoint, data, batch, settings, threads, device)
        (out / REPORT).write_text(json.dumps(meta, indent=2))
        return meta

    ref = run_stage(TORCH_SPEC, inputs, store, refresh and not measured, make)
    if not was_cached():
        _MEASURED.add(ref.key)
    return ref


def _torch_measurement(
    checkpoint: ArtifactRef, data: ArtifactRef, batch: BatchProfile, settings: ProfileConfig, threads: int, device: str
) -> dict[str, Any]:
    import torch

    from tasks.inference import module_from_checkpoint

    used = device if device == "cpu" or torch.cuda.is_available() else "cpu"
    model = module_from_checkpoint(checkpoint).to(used)
    plan = timed_shapes(batch)
    pads = getattr(batch, "pad_values", None)
    xs = {k: [torch.from_numpy(a).to(used) for a in inputs_at(data, b, lengths, pads).values()] for k, (b, lengths, _) in plan.items()}

    def runner(x: Any) -> Callable[[int], list[float]]:
        def run(n: int) -> list[float]:
            times = []
            with torch.inference_mode():
                if used == "cuda":
                    for _ in range(n):
                        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                        start.record()
                        model(*x)
                        end.record()
                        end.synchronize()
                        times.append(float(start.elapsed_time(end)))
                else:
                    for _ in range(n):
                        t0 = time.perf_counter_ns()
                        model(*x)
                        times.append((time.perf_counter_ns() - t0) / 1e6)
            return times

        return run

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        measured = {k: {**measurement(timed_runs(runner(xs[k]), settings), b), "shape": text} for k, (b, _, text) in plan.items()}
    finally:
        torch.set_num_threads(before)
    meta = {
        "runtime": f"PyTorch {torch.__version__} eager (inference_mode)",
        "device": used if used == device else f"{used} (asked {device}: torch has no CUDA)",
        "timer": "cuda_events" if used == "cuda" else "perf_counter_ns",
        "threads": threads,
        "machine": machine(),
        **_headline(measured),
        "checkpoint_digest": checkpoint.digest,
    }
    return meta


def profile_of_engine(
    engine: ArtifactRef,
    checkpoint: ArtifactRef,
    data: ArtifactRef,
    batch: BatchProfile,
    settings: ProfileConfig,
    threads: int,
    store: Store,
    refresh: bool = False,
) -> ArtifactRef:
    """Time one engine and PyTorch eager on the same real inputs.

    Args:
        engine: the ``build`` artifact.
        checkpoint: the ``train`` artifact (the PyTorch reference).
        data: the ``data`` artifact (test samples are the inputs).
        batch: latency at batch 1 (or the profile's min), throughput at its max.
        settings: warm-up and budget per measurement.
        threads: PyTorch's CPU threads (the engine runs with the threads it was built with; the
            report states both).
        store: the artifact store.
        refresh: measure again (the PyTorch reference too) even if results exist.

    Returns:
        The ``profile`` artifact with ``profile.json``; ``meta`` is the summary the run report shows.

    Raises:
        InferenceError: the engine cannot run the inputs.
    """
    from tasks.engine import engine_info, runner_from_build

    store = as_store(store)
    local = store.local

    def make(out: Path) -> dict[str, Any]:
        # One measurement at a time on this machine: threads of this process (_LOCK) and other processes
        # of the same local folder, e.g. Dask workers (a file lock); other machines time their own CPUs.
        with _LOCK, key_lock(local, SPEC.name, MEASURING):
            reference = torch_profile(checkpoint, data, batch, settings, threads, _torch_device(engine), store, refresh=refresh)
            plan = timed_shapes(batch)
            pads = getattr(batch, "pad_values", None)
            xs = {k: inputs_at(data, b, lengths, pads) for k, (b, lengths, _) in plan.items()}
            with runner_from_build(engine) as runner:
                measured = {k: {**measurement(timed_runs(lambda n, k=k: runner.time_infer(xs[k], n), settings), b), "shape": text} for k, (b, _, text) in plan.items()}
                timer, engine_threads = runner.timer, getattr(runner, "threads", None)
        measured = _headline(measured)
        lat_b, thr_b = measured["latency"]["batch"], measured["throughput"]["batch"]
        info = engine_info(engine)
        report = {
            "precision": info.precision,
            "backend": info.backend,
            "timer": timer,
            "machine": machine(),
            "threads": {"engine": engine_threads, "torch": threads},
            "settings": settings.model_dump(),
            "engine": measured,
            "torch": {k: reference.meta[k] for k in ("runtime", "device", "timer", "threads", "latency", "throughput", "by_shape") if k in reference.meta},
            "speedup": speedup(measured, reference.meta),
            "engine_digest": engine.digest,
        }
        (out / REPORT).write_text(json.dumps(report, indent=2, default=str))
        s = summary_of(report)
        log.info(
            "profile: %s p50 %.3f ms at batch %d, %.0f samples/s at batch %d (%.2fx PyTorch)",
            s["precision"], s["latency_ms"]["p50"], lat_b, s["samples_per_s"] or 0, thr_b, s["speedup"]["throughput"] or 0,
        )
        return s

    inputs = {"engine": engine, "checkpoint": checkpoint, "data": data, "batch": batch, "settings": settings, "threads": threads}
    return run_stage(SPEC, inputs, store, refresh, make)


def summary_of(report: Mapping[str, Any]) -> dict[str, Any]:
    """Condense a profile report to what the run report shows per precision."""

    def lat(m: Mapping[str, Any]) -> dict[str, float]:
        return {"p50": m["p50_ms"], "p90": m["p90_ms"], "p99": m["p99_ms"]}

    engine, torch = report["engine"], report["torch"]
    return {
        "precision": report["precision"],
        "backend": report["backend"],
        "timer": report["timer"],
        "machine": report["machine"],
        "threads": report["threads"],
        "latency_batch": engine["latency"]["batch"],
        "latency_ms": lat(engine["latency"]),
        "throughput_batch": engine["throughput"]["batch"],
        "samples_per_s": engine["throughput"]["samples_per_s"],
        "torch": {
            "device": torch["device"],
            "latency_ms": lat(torch["latency"]),
            "samples_per_s": torch["throughput"]["samples_per_s"],
        },
        "speedup": report["speedup"],
        "iterations": {"latency": engine["latency"]["iterations"], "throughput": engine["throughput"]["iterations"]},
        # the shapes timed, as the report lists them (with dynamic axes: min, opt and max)
        "shapes": [
            {"level": m["level"], "shape": m.get("shape"), "batch": m["batch"], "p50_ms": m["p50_ms"], "samples_per_s": m["samples_per_s"],
             "torch_p50_ms": t.get("p50_ms"), "torch_samples_per_s": t.get("samples_per_s")}
            for m, t in zip(engine.get("by_shape") or [], torch.get("by_shape") or [{}] * len(engine.get("by_shape") or []))
        ] or [{"level": k, "shape": engine[k].get("shape"), "batch": engine[k]["batch"], "p50_ms": engine[k]["p50_ms"], "samples_per_s": engine[k]["samples_per_s"]} for k in ("latency", "throughput")],
    }
