"""Stage ``verify``: engine outputs against PyTorch on the held-out test split.

Each engine runs at batch min, opt and max (the batches its profile was built for), or, with dynamic
axes beyond the batch, at the profile's min, opt and max shape (real samples cut or padded to each
length, PyTorch run on the same inputs); each run is compared with PyTorch fp32 under the precision's
tolerances. Every failing check is collected, the
report is written either way (a failed verification keeps its evidence), and then the stage fails.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from tasks.artifacts import ArtifactRef, write_json_atomic
from tasks.compare import ComparisonResult, compare_outputs
from tasks.config import BatchProfile, Precision, Tolerance
from tasks.errors import TrtflowError, VerificationError
from tasks.fp16_emulation import EMULATED, NATIVE, NoFp16Error
from tasks.progress import Progress
from tasks.stage import StageSpec, run_stage

log = logging.getLogger("trtflow.verify")

def _environment(inputs: Mapping[str, Any]) -> dict[str, str]:
    # The thread counts of both sides: a float reduction split over other threads may round otherwise.
    from tasks.engine import engine_info

    return {"engine_threads": str(engine_info(inputs["engine"]).threads), "torch_threads": str(reference_threads(inputs["checkpoint"]))}


SPEC = StageSpec("verify", __name__, libraries=("torch", "numpy", "onnx", "onnxruntime", "scikit-learn"), environment=_environment)
REPORT = "verification.json"
#: where the latest verification of each precision is kept, passed or not (relative to the artifacts folder)
LATEST = "reports/verify-{precision}.json"


def batch_sizes(batch: BatchProfile) -> list[int]:
    """The batches verified: the profile's min, opt and max, without repeats."""
    return sorted({batch.min, batch.opt, batch.max})


def outputs_in_batches(runner: Any, inputs: str | Mapping[str, np.ndarray], x: np.ndarray | int, b: int, min_batch: int) -> dict[str, np.ndarray]:
    """Run inputs through a runner in batches of ``b``; a short last batch is padded up to ``min_batch``.

    Args:
        runner: an active runner.
        inputs: input name -> array (all the same length). The older form ``(runner, name, x, b,
            min_batch)`` with one input name and its array is accepted too.
        x: the array of the older form (ignored otherwise; pass 0).
        b: batch size.
        min_batch: the engine's smallest batch.
    """
    feed: Mapping[str, np.ndarray] = {inputs: x} if isinstance(inputs, str) else inputs  # type: ignore[dict-item]
    n_all = len(next(iter(feed.values())))
    chunks: dict[str, list[np.ndarray]] = {}
    for i in range(0, n_all, b):
        part = {k: v[i : i + b] for k, v in feed.items()}
        n = len(next(iter(part.values())))
        if n < min_batch:
            part = {k: np.concatenate([v, np.repeat(v[-1:], min_batch - n, axis=0)]) for k, v in part.items()}
        for name, arr in runner.infer(part).items():
            chunks.setdefault(name, []).append(arr[:n])
    return {k: np.concatenate(v) for k, v in chunks.items()}


def outputs_of_split(
    runner: Any, data: ArtifactRef, split: str, b: int, min_batch: int, progress: Progress | None = None,
    fit: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]] | None = None,
) -> dict[str, np.ndarray]:
    """``outputs_in_batches`` over one split of a ``data`` artifact, reading only ``b`` rows at a time;
    ``progress`` counts the samples done; ``fit`` changes each batch first (cut or pad it to a length)."""
    from tasks.data import split_batches

    chunks: dict[str, list[np.ndarray]] = {}
    for _, feed in split_batches(data, split, b):
        feed = fit(feed) if fit is not None else feed
        for name, arr in outputs_in_batches(runner, feed, 0, b, min_batch).items():
            chunks.setdefault(name, []).append(arr)
        if progress is not None:
            rows = len(next(iter(feed.values())))
            progress.update(rows, samples=rows)
    return {k: np.concatenate(v) for k, v in chunks.items()}


#: PyTorch's test-split outputs of the latest (checkpoint, data) pair; see ``reference_outputs``
_REFERENCE: dict[tuple[str, ...], dict[str, np.ndarray]] = {}
_REFERENCE_LOCK = threading.Lock()


def reference_outputs(checkpoint: ArtifactRef, data: ArtifactRef) -> dict[str, np.ndarray]:
    """PyTorch's outputs (every one, by name) on the test split of ``data``, computed once per process.

    Every precision verifies against the same reference; the branches run concurrently, so the lock
    also makes the first caller compute it while the others wait, instead of all three loading the
    checkpoint and running the model (the largest part of a cold verify on 2 cores).

    Returns:
        Output name -> read-only array (shared between callers).
    """
    from tasks.data import split_size
    from tasks.train import module_from_checkpoint, predict_split, torch_threads

    from tasks.code_digests import user_code
    from tasks.stage import factories_in

    # The model's code too: the same weights through an edited forward are another reference.
    key = (checkpoint.digest, data.digest, *(str(user_code(f).files) for f in factories_in({"checkpoint": checkpoint})))
    with _REFERENCE_LOCK:
        if key not in _REFERENCE:
            names = list(checkpoint.meta.get("outputs") or ["logits"])
            # The training's thread count, not whatever this process has: the reference must not depend
            # on which process (one that trained, or one that found the checkpoint cached) computes it.
            with Progress("verify reference (PyTorch)", total=split_size(data, "test"), unit="sample", logger=log) as meter, torch_threads(reference_threads(checkpoint)):
                arrays = predict_split(module_from_checkpoint(checkpoint), data, "test", progress=meter)
                meter.milestone("PyTorch outputs of the test split")
            for a in arrays:
                a.flags.writeable = False
            _REFERENCE.clear()  # only the current model's outputs are kept
            _REFERENCE[key] = dict(zip(names, arrays, strict=True))
        return _REFERENCE[key]


def reference_threads(checkpoint: ArtifactRef) -> int:
    """The torch thread count the PyTorch reference runs with: the one the checkpoint was trained with."""
    return int((checkpoint.meta.get("config") or {}).get("threads") or checkpoint.meta.get("torch_threads") or 1)


#: PyTorch's test-split outputs at other lengths than the dataset's, of the latest (checkpoint, data) pair
_REFERENCE_AT: dict[tuple[Any, ...], dict[str, np.ndarray]] = {}


def reference_outputs_at(checkpoint: ArtifactRef, data: ArtifactRef, point: Any, pad_values: Mapping[str, float]) -> dict[str, np.ndarray]:
    """PyTorch's outputs on the test split cut or padded to a shape point's lengths (``tasks.shapes``),
    computed once per process and point, as ``reference_outputs`` (which it is without lengths)."""
    from tasks.code_digests import user_code
    from tasks.data import split_size
    from tasks.shapes import fit_lengths
    from tasks.stage import factories_in
    from tasks.train import module_from_checkpoint, predict_split, torch_threads

    if not point.lengths:
        return reference_outputs(checkpoint, data)
    model_key = (checkpoint.digest, data.digest, *(str(user_code(f).files) for f in factories_in({"checkpoint": checkpoint})))
    key = (*model_key, point.key()[1], tuple(sorted(pad_values.items())))
    with _REFERENCE_LOCK:
        if key not in _REFERENCE_AT:
            names = list(checkpoint.meta.get("outputs") or ["logits"])
            fit = partial(fit_lengths, lengths=point.lengths, pad_values=pad_values)
            with Progress(f"verify reference (PyTorch) at {point.text()}", total=split_size(data, "test"), unit="sample", logger=log) as meter, torch_threads(reference_threads(checkpoint)):
                arrays = predict_split(module_from_checkpoint(checkpoint), data, "test", progress=meter, fit=fit)
            for a in arrays:
                a.flags.writeable = False
            if any(k[: len(model_key)] != model_key for k in _REFERENCE_AT):
                _REFERENCE_AT.clear()  # only the current model's outputs are kept
            _REFERENCE_AT[key] = dict(zip(names, arrays, strict=True))
        return _REFERENCE_AT[key]


def reference_logits(checkpoint: ArtifactRef, data: ArtifactRef, x: np.ndarray | None = None) -> np.ndarray:
    """PyTorch's logits output on the test split (see ``reference_outputs``); ``x`` is ignored."""
    ref = reference_outputs(checkpoint, data)
    return ref[checkpoint.meta.get("logits_output") or next(iter(ref))]


def verification_of_engine(
    engine: ArtifactRef,
    checkpoint: ArtifactRef,
    data: ArtifactRef,
    precision: Precision,
    tolerance: Tolerance,
    batch: BatchProfile,
    artifacts_dir: Path,
    refresh: bool = False,
    variant: ArtifactRef | None = None,
) -> ArtifactRef:
    """Verify one engine against PyTorch on the test split.

    An fp16 engine of a backend that cannot compute in fp16 (ONNX Runtime's CPU provider) is also
    checked through the fp16 emulation of its variant (``tasks.fp16_emulation``), under the same
    tolerance; the report's ``numerics`` says which fp16 numerics were verified.

    Args:
        engine: the ``build`` artifact.
        checkpoint: the ``train`` artifact (the PyTorch reference).
        data: the ``data`` artifact (its test split).
        precision: the engine's precision (names it in messages).
        tolerance: thresholds of that precision.
        batch: the profile; verified at its min, opt and max.
        artifacts_dir: root of the artifact store.
        refresh: re-verify even if an intact result exists.
        variant: the ``precision`` artifact the engine was built from (the fp16 emulation's source).

    Returns:
        The ``verify`` artifact with ``verification.json`` (statistics per batch and output, every
        check, and the engine's confusion matrix on the test split, which the UI draws).

    Raises:
        VerificationError: listing every failing check (precision, batch, metric, value, threshold).
    """
    from tasks.metrics import confusion_matrix

    precision = Precision(precision)
    latest = Path(artifacts_dir) / LATEST.format(precision=precision.value)

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
        # Without labels there is no task: every output is still compared elementwise and by cosine.
        task_outputs = {logits} if logits else set()
        results, confusion = [], None
        numerics = numerics_of(info.backend, precision)
        emulate = numerics == EMULATED and variant is not None
        # The batch sizes min, opt and max; with dynamic axes beyond the batch, the min, opt and max shapes.
        points, specs, pads = shape_points(batch), input_specs(data), dict(getattr(batch, "pad_values", {}) or {})
        opt = opt_point(batch)

        def fit_to(point: Any) -> Any:
            return partial(fit_lengths, lengths=point.lengths, pad_values=pads) if point.lengths else None

        # Every pass over the test split counts: one per shape, and the fp16 emulation's.
        n = split_size(data, "test")
        meter = Progress(f"verify {precision.value}", total=n * (len(points) + emulate), unit="sample", logger=log)
        with meter:
            with runner_from_build(engine) as runner:
                for point in points:
                    expected = reference_outputs_at(checkpoint, data, point, pads)
                    got = outputs_of_split(runner, data, "test", point.batch, batch.min, meter, fit=fit_to(point))
                    results.append(compare_outputs(expected, got, tolerance, label=f"{precision.value} {point.text(specs)}", labels=y, task_outputs=task_outputs, regression=regression))
                    meter.milestone(f"{point.text(specs)}: {n} samples compared ({'pass' if results[-1].passed else 'FAIL'})")
                    if point.key() == opt.key() and logits and y is not None and logits in got and not regression:
                        pred = got[logits].argmax(axis=1)
                        k = max(int(data.meta["num_classes"]), int(got[logits].shape[1]))
                        confusion = {"batch": point.batch, "accuracy": float((pred == y).mean()), "matrix": confusion_matrix(y, pred, k).tolist()}
            emulation = None
            if emulate:
                assert variant is not None
                try:
                    emulated, emulation = emulated_fp16_check(
                        variant, reference_outputs_at(checkpoint, data, opt, pads), data, y, batch.opt, tolerance, info.threads, task_outputs, meter,
                        fit=fit_to(opt), shape=opt.text(specs), regression=regression,
                    )
                    meter.milestone(f"fp16 emulated {opt.text(specs)}: {n} samples compared ({'pass' if emulated.passed else 'FAIL'})")
                    results.append(emulated)
                except NoFp16Error:
                    numerics = "fp32 (a repair kept every node of the fp16 variant in fp32)"
                except Exception as exc:  # noqa: BLE001 - ONNX Runtime raises its own untyped errors
                    # Said in the report, not hidden: the engine was checked, its fp16 numerics were not.
                    log.warning("verify: the fp16 emulation could not run (%s); fp16 numerics not verified", exc)
                    numerics = f"fp16 weights, computed in fp32 (emulation failed: {str(exc)[:200]})"
            elif numerics == EMULATED:
                numerics = "fp16 weights, computed in fp32 (not emulated)"
        failures = [f for r in results for f in r.failures()]
        checks_run, skipped = checks_of(precision, tolerance, reference, task_outputs, regression, y is not None)
        report = {
            "precision": precision.value,
            "backend": info.backend,
            "numerics": numerics,
            "passed": not failures,
            "failures": failures,
            "samples": n,
            "outputs": list(reference),
            "logits_output": logits,
            "checks_run": checks_run,
            "checks_skipped": skipped,
            "task": "regression" if regression else "classification" if y is not None else None,
            "outputs_not_judged": not_judged(checkpoint, list(reference), logits),
            "shapes": [{"level": p.level, "batch": p.batch, "shapes": p.shapes(specs), "label": f"{precision.value} {p.text(specs)}"} for p in points],
            "tolerance": tolerance.model_dump(),
            "batches": [r.to_dict() for r in results],
            "emulation": emulation,
            "confusion": confusion,
            "engine_digest": engine.digest,
            "checkpoint_digest": checkpoint.digest,
        }
        write_json_atomic(latest, report)
        if failures:
            raise VerificationError(failures, str(latest))
        (out / REPORT).write_text(json.dumps(report, indent=2, default=str))
        log.info("verify: %s passed on %d samples at %s (outputs %s; checks %s)", precision.value, report["samples"], "; ".join(p.text(specs) for p in points), list(reference), ", ".join(checks_run))
        return summary_of(report)

    inputs: dict[str, Any] = {"engine": engine, "checkpoint": checkpoint, "data": data, "precision": precision, "tolerance": tolerance, "batch": batch}
    if variant is not None:
        inputs["variant"] = variant
    try:
        ref = run_stage(SPEC, inputs, artifacts_dir, refresh, make)
    except VerificationError:
        raise
    except TrtflowError as exc:
        # The latest report never keeps an older pass once this precision's verification failed.
        write_json_atomic(latest, {"precision": precision.value, "passed": False, "failures": [], "error": str(exc)})
        raise
    # A reused verification is the current one too (an earlier run may have left another result).
    write_json_atomic(latest, json.loads(ref.path(REPORT).read_text()))
    return ref


def numerics_of(backend: str, precision: Precision) -> str:
    """Which numerics verifying an engine of this backend checks: native, or fp16 emulated."""
    from tasks.backends.registry import builder_for

    if precision is Precision.fp16 and not builder_for(backend).native_fp16:
        return EMULATED
    return NATIVE if precision is Precision.fp16 else f"native {precision.value}"


def emulated_fp16_check(
    variant: ArtifactRef,
    reference: dict[str, np.ndarray],
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
) -> tuple[ComparisonResult, dict[str, Any]]:
    """Run the fp16 emulation of a variant on the test split and compare it like an engine.

    Args:
        fit: cuts or pads each batch to the shape the reference was computed at (see ``outputs_of_split``).
        shape: that shape as the label says it (default ``batch B``).
        regression: compare as a regression (``compare_outputs``).

    Returns:
        The comparison, labelled 'fp16 emulated batch B' (or the shape), and what the emulation rounded.

    Raises:
        NoFp16Error: the variant has no fp16 tensor left.
    """
    import tempfile

    from tasks.fp16_emulation import emulation_runner

    variant.verify()
    with tempfile.TemporaryDirectory(prefix="trtflow-emulation-") as tmp:
        runner, info = emulation_runner(variant.path("model.onnx"), tmp, threads)
        with runner:
            got = outputs_of_split(runner, data, "test", batch, 1, progress, fit=fit)  # its test split, batch by batch
    return compare_outputs(reference, got, tolerance, label=f"fp16 emulated {shape or f'batch {batch}'}", labels=y, task_outputs=task_outputs, regression=regression), info.to_dict()


def checks_of(
    precision: Precision, tolerance: Tolerance, reference: Mapping[str, np.ndarray], task_outputs: set[str], regression: bool, labelled: bool
) -> tuple[list[str], dict[str, str]]:
    """Which checks a verification ran, and which it did not (with why), as the report says them."""
    from tasks.compare import judged_by_relative_rmse

    run = ["elementwise (atol/rtol)"] if tolerance.atol is not None or tolerance.rtol is not None else []
    skipped: dict[str, str] = {} if run else {"elementwise": f"no atol/rtol for {precision.value}"}
    relative = [k for k, v in reference.items() if judged_by_relative_rmse(k, v, task_outputs, regression)]
    if relative:
        run.append(f"relative RMSE ({', '.join(relative)})")
    if len(relative) < len(reference):
        run.append("cosine per sample")
    if regression:
        if task_outputs:
            run += ["R² drop (R², MAE, RMSE against the labels)"]
        else:
            skipped["R² drop"] = "the dataset has no labels"
    elif task_outputs:
        run += ["top-1 agreement", "accuracy drop", "balanced accuracy"]
    else:
        reason = "the dataset has no labels" if not labelled else "no logits output"
        for c in ("top-1 agreement", "accuracy drop", "balanced accuracy"):
            skipped[c] = reason
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


def summary_of(report: dict[str, Any]) -> dict[str, Any]:
    """Condense a verification report to the worst value of each metric over all batches."""
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
        "samples": report["samples"],
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
