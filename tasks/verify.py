"""Stage ``verify``: engine outputs against PyTorch on the held-out test split.

Each engine runs at batch min, opt and max (the batches its profile was built for), or, with dynamic
axes beyond the batch, at the profile's min, opt and max shape (real samples cut or padded to each
length, PyTorch run on the same inputs). Every call is at exactly that batch: a split smaller than a
batch, or a last call short of it, is filled by repeating the split's samples from the first one
(cycled), so a batch named in the report is a batch the engine ran. The distinct samples are compared
with PyTorch fp32 under the precision's tolerances; the rows that repeat a sample are compared with
that sample's reference too. An engine of a reduced precision (fp16, int8, ...) must also run a share
of its compute operators in that precision (``tasks.compute_share``).

The verdict, passed or failed, is the stage's artifact: a verification that records a failure is a
valid, cacheable result. The stage function raises the failure (``VerificationError``, carrying that
artifact) on every call that finds one, fresh or cached; the flow lets a repair stand behind it.

This module runs the engines; the PyTorch reference and its cache are ``tasks.verify_reference``, the
judging of the outputs (pure, a typed verdict) ``tasks.verify_comparison``, and the report file and
its views ``tasks.verify_result``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from tasks.artifacts import ArtifactRef
from tasks.backends.onnxruntime import QDQ_IN_FP32
from tasks.compare import ComparisonResult
from tasks.compute_share import ComputeShare
from tasks.config import BatchProfile, Precision, Tolerance
from tasks.errors import TrtflowError
from tasks.emulation import NothingToEmulateError
from tasks.precisions import precision_spec
from tasks.progress import Progress
from tasks.stage import StageSpec, run_stage
from tasks.store import Store, as_store
from tasks.verify_comparison import BatchRun, checks_at_batch, describe_runs, not_judged, verdict, verdict_error
from tasks.verify_reference import reference_outputs, reference_outputs_at, reference_threads
from tasks.verify_result import LATEST, write_failure, write_latest, write_report

log = logging.getLogger("trtflow.verify")

def _environment(inputs: Mapping[str, Any]) -> dict[str, str]:
    # The thread counts of both sides: a float reduction split over other threads may round otherwise.
    from tasks.engine import engine_info

    return {"engine_threads": str(engine_info(inputs["engine"]).threads), "torch_threads": str(reference_threads(inputs["checkpoint"]))}


SPEC = StageSpec("verify", __name__, libraries=("torch", "numpy", "onnx", "onnxruntime", "scikit-learn"), environment=_environment)


def batch_sizes(batch: BatchProfile) -> list[int]:
    """The batches verified: the profile's min, opt and max, without repeats."""
    return sorted({batch.min, batch.opt, batch.max})


def outputs_at_batch(
    runner: Any, data: ArtifactRef, split: str, b: int, progress: Progress | None = None,
    fit: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]] | None = None,
) -> tuple[dict[str, np.ndarray], BatchRun]:
    """Run every sample of one split of a ``data`` artifact through a runner, every call at exactly ``b`` rows.

    The split is read ``b`` rows at a time (bounded memory). The last call, and the only one when the
    split is smaller than ``b``, is filled up to ``b`` rows by cycling the split from its first sample.

    Args:
        runner: an active runner.
        data: the ``data`` artifact.
        split: "test", "val" or "train".
        b: the batch size.
        progress: counts the split's samples done.
        fit: changes each filled batch before it is fed (cuts or pads it to a shape point's lengths).

    Returns:
        Output name -> the outputs of every row fed (row ``i`` is sample ``i % n``), and how they ran.
    """
    from tasks.data import split_batches, split_inputs, split_size

    n = split_size(data, split)
    chunks: dict[str, list[np.ndarray]] = {}
    runs = 0
    for _, feed in split_batches(data, split, b):
        rows = len(next(iter(feed.values())))
        if rows < b:
            fill = np.arange(b - rows) % n
            head = split_inputs(data, split, slice(0, min(n, b - rows)))
            feed = {k: np.concatenate([v, np.take(head[k], fill, axis=0)]) for k, v in feed.items()}
        if fit is not None:
            feed = fit(feed)
        for name, arr in runner.infer(feed).items():
            chunks.setdefault(name, []).append(arr)
        runs += 1
        if progress is not None:
            progress.update(rows, samples=rows)
    return {k: np.concatenate(v) for k, v in chunks.items()}, BatchRun(b, runs, n)


@dataclass
class EngineChecks:
    """What running an engine over the test split at each batch size found."""

    results: list[ComparisonResult]
    runs: list[BatchRun]
    confusion: dict[str, Any] | None


def engine_checks(
    runner: Any,
    reference: Mapping[str, np.ndarray],
    data: ArtifactRef,
    precision: Precision,
    tolerance: Tolerance,
    batch: BatchProfile,
    labels: np.ndarray | None,
    logits: str | None,
    progress: Progress | None = None,
    reference_at: Callable[[Any], Mapping[str, np.ndarray]] | None = None,
    regression: bool = False,
) -> EngineChecks:
    """Run an active runner over the test split at every shape point of the profile (its min, opt and
    max batch, with the dynamic lengths of each point) and compare each pass.

    Args:
        runner: the engine's active runner.
        reference: output name -> PyTorch's outputs on the test split.
        data: the ``data`` artifact.
        precision: names the checks ('int8 batch 32').
        tolerance: that precision's thresholds.
        batch: the profile (min, opt, max).
        labels: the test split's labels (None without labels).
        logits: the output judged by task metrics, or None.
        progress: counts samples, one pass per shape point.
        reference_at: PyTorch's outputs at a shape point with dynamic lengths (needed only for those).
        regression: compare as a regression (``compare_outputs``); no confusion matrix then.

    Returns:
        The comparisons, how each batch size ran, and the confusion matrix at the opt point.
    """
    from tasks.data import input_specs
    from tasks.metrics import confusion_matrix
    from tasks.shapes import fit_lengths, opt_point, shape_points

    task_outputs = {logits} if logits else set()
    specs, pads = input_specs(data), dict(getattr(batch, "pad_values", {}) or {})
    opt = opt_point(batch)
    out = EngineChecks([], [], None)
    for point in shape_points(batch):
        b, shown = point.batch, point.text(specs)
        expected = reference_at(point) if point.lengths and reference_at is not None else reference
        fit = partial(fit_lengths, lengths=point.lengths, pad_values=pads) if point.lengths else None
        got, run = outputs_at_batch(runner, data, "test", b, progress, fit=fit)
        results = checks_at_batch(expected, got, run, tolerance, f"{precision.value} {shown}", labels, task_outputs, regression)
        out.results += results
        out.runs.append(run)
        if progress is not None:
            fill = f", {run.repeated_rows} rows repeated to fill the batch" if run.repeated_rows else ""
            progress.milestone(f"{shown}: {run.distinct_samples} samples compared{fill} ({'pass' if all(r.passed for r in results) else 'FAIL'})")
        if point.key() == opt.key() and logits and labels is not None and logits in got and not regression:
            head = got[logits][: run.distinct_samples]
            pred = head.argmax(axis=1)
            k = max(int(data.meta["num_classes"]), int(head.shape[1]))
            out.confusion = {"batch": b, "accuracy": float((pred == labels).mean()), "matrix": confusion_matrix(labels, pred, k).tolist()}
    return out


def compute_share_of(engine: ArtifactRef, variant: ArtifactRef | None) -> ComputeShare | None:
    """Which precision the engine's compute operators run in: TensorRT's layer report, else the ONNX graph.

    The graph is the variant the engine was built from (what ONNX Runtime runs), or the engine file
    itself when it is ONNX. None when neither is at hand.
    """
    import onnx

    from tasks.compute_share import engine_compute_share, onnx_compute_share
    from tasks.engine import engine_info

    info = engine_info(engine)
    layers = (info.model_extra or {}).get("layers_file")
    has_report = bool(layers) and layers in engine.files
    if has_report:
        found = engine_compute_share(engine.path(layers).read_text())
        if found is not None:
            return found
    if variant is not None:
        graph = variant.path("model.onnx")
    elif info.engine_file.endswith(".onnx"):
        graph = engine.path(info.engine_file)
    else:
        return None
    share = onnx_compute_share(onnx.load(str(graph), load_external_data=False))
    if has_report:
        share.source += " (the engine's layer report types no compute layer)"
    return share


def verification_of_engine(
    engine: ArtifactRef,
    checkpoint: ArtifactRef,
    data: ArtifactRef,
    precision: Precision,
    tolerance: Tolerance,
    batch: BatchProfile,
    store: Store,
    refresh: bool = False,
    variant: ArtifactRef | None = None,
) -> ArtifactRef:
    """Verify one engine against PyTorch on the test split.

    An engine of a reduced float precision on a backend that computes floats in fp32 (ONNX Runtime's
    CPU provider) is checked through the rounding emulation of its variant (``tasks.emulation``),
    under the same tolerance: as a second pass beside the engine (fp16, which that backend runs
    itself), or as the engine itself when the backend built the emulation in the variant's place (a
    precision it has no kernels for, ``PrecisionSpec.cpu_kernels``). The report's ``numerics`` says
    which numerics were verified.

    Args:
        engine: the ``build`` artifact.
        checkpoint: the ``train`` artifact (the PyTorch reference).
        data: the ``data`` artifact (its test split).
        precision: the engine's precision (names it in messages).
        tolerance: thresholds of that precision.
        batch: the profile; verified at its min, opt and max.
        store: the artifact store.
        refresh: re-verify even if a result exists.
        variant: the ``precision`` artifact the engine was built from (its compute share, the
            emulation's source).

    Returns:
        The ``verify`` artifact of a passed verification, with ``verification.json`` (statistics per
        batch and output, every check, how each batch ran, the compute share, and the engine's
        confusion matrix on the test split, which the UI draws).

    Raises:
        VerificationError: listing every failing check (precision, batch, metric, value, threshold);
            ``PrecisionShareError`` when too few compute operators run in the precision. Raised also
            when the failing verdict is found in the store; ``error.artifact`` is that verdict.
    """
    precision = Precision(precision)
    store = as_store(store)
    latest = LATEST.format(precision=precision.value)

    def make(out: Path) -> dict[str, Any]:
        from tasks.data import split_labels, split_size
        from tasks.engine import engine_info, runner_from_build

        from tasks.data import input_specs
        from tasks.shapes import fit_lengths, opt_point, shape_points

        y = split_labels(data, "test")
        info = engine_info(engine)
        regression = data.meta.get("task") == "regression"
        reference = reference_outputs(checkpoint, data)
        logits = checkpoint.meta.get("logits_output") if y is not None else None
        numerics = numerics_of(info.backend, precision)
        if getattr(info, "graph_optimization", None) == QDQ_IN_FP32:
            # What TensorRT computes (int8 products, an exact int32 sum), not this CPU's saturating kernels.
            numerics = INT8_AS_FP32
        rounding = precision_spec(precision).emulation
        # An engine that is the emulation graph itself verifies the emulated numerics directly: no second pass.
        emulate = rounding is not None and numerics == rounding.label and variant is not None and not (info.model_extra or {}).get("emulation")
        n = split_size(data, "test")
        emulation = None
        opt = opt_point(batch)
        pads, specs = dict(getattr(batch, "pad_values", {}) or {}), input_specs(data)

        def fit_to(point: Any) -> Any:
            return partial(fit_lengths, lengths=point.lengths, pad_values=pads) if point.lengths else None

        # Every pass over the test split counts: one per shape point, and the emulation's.
        with Progress(f"verify {precision.value}", total=n * (len(shape_points(batch)) + emulate), unit="sample", logger=log) as meter:
            with runner_from_build(engine) as runner:
                checked = engine_checks(runner, reference, data, precision, tolerance, batch, y, logits, meter,
                                        reference_at=lambda point: reference_outputs_at(checkpoint, data, point, pads), regression=regression)
            p = precision.value
            if emulate:
                assert variant is not None and rounding is not None
                try:
                    emulated, emulation = emulated_check(
                        variant, precision, reference_outputs_at(checkpoint, data, opt, pads), data, y, batch.opt, tolerance, info.threads,
                        {logits} if logits else set(), meter, fit=fit_to(opt), shape=opt.text(specs), regression=regression,
                    )
                    meter.milestone(f"{p} emulated {opt.text(specs)}: {n} samples compared ({'pass' if all(r.passed for r in emulated) else 'FAIL'})")
                    checked.results += emulated
                except NothingToEmulateError:
                    numerics = f"fp32 (a repair kept every node of the {p} variant in fp32)"
                except Exception as exc:  # noqa: BLE001 - ONNX Runtime raises its own untyped errors
                    # Said in the report, not hidden: the engine was checked, its reduced numerics were not.
                    log.warning("verify: the %s emulation could not run (%s); %s numerics not verified", p, exc, p)
                    numerics = f"{p} weights, computed in fp32 (emulation failed: {str(exc)[:200]})"
            elif rounding is not None and numerics == rounding.label and not (info.model_extra or {}).get("emulation"):
                numerics = f"{p} weights, computed in fp32 (not emulated)"
            elif (info.model_extra or {}).get("emulation"):
                emulation = info.model_extra["emulation"]  # the engine is the emulation graph: what it rounds
        kept = len(((variant.meta.get("conversion") or {}).get("kept_fp32") or [])) if variant is not None else 0
        judged = verdict(precision, tolerance, checked.results, compute_share_of(engine, variant), kept, logits, y is not None, regression)
        report = {
            "precision": precision.value,
            "backend": info.backend,
            "numerics": numerics,
            **judged,
            "samples": n,
            "batches_run": [r.to_dict() for r in checked.runs],
            "outputs": list(reference),
            "logits_output": logits,
            "task": "regression" if regression else "classification" if y is not None else None,
            "outputs_not_judged": not_judged(checkpoint, list(reference), logits),
            "shapes": [{"level": p.level, "batch": p.batch, "shapes": p.shapes(specs), "label": f"{precision.value} {p.text(specs)}"} for p in shape_points(batch)],
            "tolerance": tolerance.model_dump(),
            "emulation": emulation,
            "confusion": checked.confusion,
            "engine_digest": engine.digest,
            "checkpoint_digest": checkpoint.digest,
        }
        summary = write_report(out, report)
        if report["passed"]:
            log.info("verify: %s passed on %d samples at %s (outputs %s; checks %s)", precision.value, n, describe_runs(report["batches_run"]), list(reference), ", ".join(report["checks_run"]))
        return summary

    inputs: dict[str, Any] = {"engine": engine, "checkpoint": checkpoint, "data": data, "precision": precision, "tolerance": tolerance, "batch": batch}
    if variant is not None:
        inputs["variant"] = variant
    try:
        ref = run_stage(SPEC, inputs, store, refresh, make)
    except TrtflowError as exc:
        # The latest report never keeps an older pass once this precision's verification failed.
        write_failure(store, precision.value, exc)
        raise
    report = write_latest(ref, store)
    if not report["passed"]:
        raise verdict_error(report, store.where(latest), ref)
    return ref


#: numerics of an int8 engine whose Q/DQ nodes ONNX Runtime runs in fp32 (``tasks.backends.onnxruntime``)
INT8_AS_FP32 = "int8 Q/DQ computed in fp32 (this CPU has no VNNI and its int8 kernels saturate; int8 rounding verified, int8 kernels not)"


def numerics_of(backend: str, precision: Precision) -> str:
    """Which numerics verifying an engine of this backend checks: native, or emulated (the
    precision's ``Emulation.label``) on a backend that does not compute that precision natively."""
    from tasks.backends.registry import backend_spec

    spec = precision_spec(precision)
    if spec.emulation is not None and not backend_spec(backend).runs_natively(spec.name):
        return spec.emulation.label
    return f"native {spec.name}"


def emulation_runner(variant_onnx: Any, folder: Any, elem_type: int, threads: int | None = None) -> tuple[Any, Any]:
    """Write the emulation graph of a variant into ``folder`` and return an inactive Runner for it.

    The runner runs ONNX Runtime's CPU provider with graph optimizations off, so no optimizer removes
    the rounding casts, and with no batch limits (the emulation is not an engine).

    Args:
        variant_onnx: path of the reduced variant.
        folder: where ``emulation.onnx`` is written (a private temporary folder).
        elem_type: the reduced type it rounds through (``Emulation.elem_type``).
        threads: ONNX Runtime threads.

    Returns:
        The runner and what the emulation rounds (``EmulationInfo``).

    Raises:
        NothingToEmulateError: the variant has no tensor of that type.
    """
    import onnx

    from tasks.backends.onnxruntime import OnnxRuntimeRunner
    from tasks.emulation import EMULATION_FILE, emulation_of

    emulated, info = emulation_of(onnx.load(str(variant_onnx)), elem_type)
    path = Path(folder) / EMULATION_FILE
    onnx.save(emulated, str(path))
    return OnnxRuntimeRunner(path, threads=threads, optimize=False), info


def emulated_check(
    variant: ArtifactRef,
    precision: Precision,
    reference: Mapping[str, np.ndarray],
    data: ArtifactRef,
    y: np.ndarray | None,
    batch: int,
    tolerance: Tolerance,
    threads: int | None,
    task_outputs: set[str] | None = None,
    progress: Progress | None = None,
    fit: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]] | None = None,
    shape: str | None = None,
    regression: bool = False,
) -> tuple[list[ComparisonResult], dict[str, Any]]:
    """Run the rounding emulation of a reduced float variant on the test split and compare it like an engine.

    Args:
        precision: the variant's precision; its registry entry's ``emulation`` says the rounding.
        fit: cuts or pads each batch to the shape the reference was computed at (see ``outputs_at_batch``).
        shape: that shape as the label says it (default ``batch B``).
        regression: compare as a regression (``compare_outputs``).

    Returns:
        The comparisons, labelled 'fp16 emulated batch B' (or the shape; and its repeated rows), and
        what the emulation rounded.

    Raises:
        NothingToEmulateError: the variant has no tensor of the reduced type left.
        ValueError: the precision has no emulation.
    """
    import tempfile

    rounding = precision_spec(precision).emulation
    if rounding is None:
        raise ValueError(f"got precision {precision.value}, expected one with an emulation, because only reduced float precisions are emulated")
    variant.verify()
    with tempfile.TemporaryDirectory(prefix="trtflow-emulation-") as tmp:  # pragma: no mutate (the folder's name)
        runner, info = emulation_runner(variant.path("model.onnx"), tmp, rounding.elem_type, threads)
        with runner:
            got, run = outputs_at_batch(runner, data, "test", batch, progress, fit=fit)
    label = f"{precision.value} emulated {shape or f'batch {batch}'}"
    return checks_at_batch(reference, got, run, tolerance, label, y, task_outputs, regression), info.to_dict()
