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
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from tasks.artifacts import ArtifactRef
from tasks.backends.onnxruntime import QDQ_IN_FP32
from tasks.compare import ComparisonResult, compare_outputs
from tasks.compute_share import ComputeShare, share_finding
from tasks.config import BatchProfile, Precision, Tolerance
from tasks.errors import PrecisionShareError, TrtflowError, VerificationError
from tasks.emulation import NothingToEmulateError
from tasks.precisions import precision_spec
from tasks.progress import Progress
from tasks.stage import StageSpec, run_stage
from tasks.store import Store, as_store

log = logging.getLogger("trtflow.verify")

def _environment(inputs: Mapping[str, Any]) -> dict[str, str]:
    # The thread counts of both sides: a float reduction split over other threads may round otherwise.
    from tasks.engine import engine_info

    return {"engine_threads": str(engine_info(inputs["engine"]).threads), "torch_threads": str(reference_threads(inputs["checkpoint"]))}


SPEC = StageSpec("verify", __name__, libraries=("torch", "numpy", "onnx", "onnxruntime", "scikit-learn"), environment=_environment)
REPORT = "verification.json"
#: where the latest verification of each precision is kept, passed or not (relative to the artifacts folder)
LATEST = "reports/verify-{precision}.json"
#: the checks of the task metrics, run when the dataset has labels and the model a logits output
TASK_CHECKS = ("top-1 agreement", "accuracy drop", "balanced accuracy")


def batch_sizes(batch: BatchProfile) -> list[int]:
    """The batches verified: the profile's min, opt and max, without repeats."""
    return sorted({batch.min, batch.opt, batch.max})


@dataclass(frozen=True)
class BatchRun:
    """How the test split went through the engine at one batch size.

    Attributes:
        batch: rows of every engine call.
        runs: engine calls.
        distinct_samples: the split's samples; the rows fed beyond them repeat samples (cycled).
    """

    batch: int
    runs: int
    distinct_samples: int

    @property
    def rows_fed(self) -> int:
        return self.batch * self.runs

    @property
    def repeated_rows(self) -> int:
        return self.rows_fed - self.distinct_samples

    def to_dict(self) -> dict[str, int]:
        return {**asdict(self), "rows_fed": self.rows_fed, "repeated_rows": self.repeated_rows}


def describe_runs(runs: Sequence[Mapping[str, int]]) -> str:
    """e.g. 'batch 1 x150, 32 x5 (10 rows repeated), 256 x1 (106 rows repeated)': what the engine ran."""
    parts = [f"{r['batch']} x{r['runs']}" + (f" ({r['repeated_rows']} rows repeated)" if r["repeated_rows"] else "") for r in runs]
    return "batch " + ", ".join(parts)


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


def checks_at_batch(
    reference: Mapping[str, np.ndarray],
    got: Mapping[str, np.ndarray],
    run: BatchRun,
    tolerance: Tolerance,
    label: str,
    labels: np.ndarray | None = None,
    task_outputs: set[str] | None = None,
    regression: bool = False,
) -> list[ComparisonResult]:
    """Compare what one batch size produced: the distinct samples, then the rows that repeat them.

    The task metrics (agreement, accuracy: shares of samples) are computed on the distinct samples
    only: a repeated sample must not count twice. The repeated rows must still match their sample's
    reference row by row (cosine of the worst row, every element within atol/rtol, finite), so a batch
    position that computes wrong cannot hide behind the fill.

    Returns:
        One result labelled ``label``, and one labelled ``'<label> repeated rows'`` when rows repeat.
    """
    n = run.distinct_samples
    results = [compare_outputs(reference, {k: v[:n] for k, v in got.items()}, tolerance, label=label, labels=labels, task_outputs=task_outputs, regression=regression)]
    if run.repeated_rows > 0:
        rows = np.arange(n, run.rows_fed) % n
        repeated_ref = {k: v[rows] for k, v in reference.items()}
        # No task metrics here, but every output judged as on the split (relative RMSE or cosine), a
        # relative error measured against the whole split's spread, not that of a few repeated rows.
        results.append(compare_outputs(repeated_ref, {k: v[n:] for k, v in got.items()}, tolerance, label=f"{label} repeated rows",
                                       task_outputs=set(), regression=regression, judged_as=task_outputs, spread_of=reference))
    return results


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


def verdict(
    precision: Precision,
    tolerance: Tolerance,
    results: Sequence[ComparisonResult],
    share: ComputeShare | None,
    kept_fp32: int = 0,
    logits: str | None = None,
    has_labels: bool = True,
    regression: bool = False,
) -> dict[str, Any]:
    """Judge the comparisons and the compute share of one engine: the verdict part of its report.

    An engine of a reduced precision passes only when at least ``tolerance.min_compute_share`` of its compute
    operators run in that precision; that failure comes first and is not repairable (a repair keeps
    more nodes in fp32). Every other failing check is repairable.

    Args:
        precision: the engine's precision.
        tolerance: its thresholds.
        results: every comparison (each batch size, the repeated rows, the emulation).
        share: its compute operators by precision (None: not known, the check is skipped).
        kept_fp32: nodes a repair kept in fp32 in the variant (named in the finding).
        logits: the output judged by task metrics, or None.
        has_labels: whether the test split has labels.
        regression: the task is a regression.

    Returns:
        passed, failures, repairable, share_finding (the sentence, or None), compute, checks_run,
        checks_skipped, batches (each comparison).
    """
    failures = [f for r in results for f in r.failures()]
    checks_run, skipped = checks_of(precision, tolerance, results, {logits} if logits else set(), regression, has_labels)
    compute = share.to_dict(precision.value) if share is not None else None
    finding = None
    if precision_spec(precision).reduced:
        if share is None:
            skipped["compute share"] = "neither a layer report nor an ONNX graph of the engine"
        else:
            assert compute is not None
            compute["floor"] = tolerance.min_compute_share
            compute["passed"] = share.share(precision.value) >= tolerance.min_compute_share
            checks_run.append(f"compute share >= {tolerance.min_compute_share:.0%}")
            if not compute["passed"]:
                finding = share_finding(share, precision.value, kept_fp32)
                failures.insert(0, f"{precision.value} compute share: {share.count(precision.value)} of {share.total} compute operators "
                                   f"in {precision.value} = {share.share(precision.value):.0%} (threshold >= {tolerance.min_compute_share:.0%})")
    return {
        "passed": not failures,
        "failures": failures,
        "repairable": bool(failures) and finding is None,
        "share_finding": finding,
        "compute": compute,
        "checks_run": checks_run,
        "checks_skipped": skipped,
        "batches": [r.to_dict() for r in results],
    }


def verdict_error(report: Mapping[str, Any], report_path: str, artifact: ArtifactRef | None = None) -> VerificationError:
    """The error a failing verification report stands for (a ``PrecisionShareError`` when the share failed)."""
    if report.get("share_finding"):
        return PrecisionShareError(report["precision"], report["share_finding"], list(report["failures"]), report_path, artifact)
    return VerificationError(list(report["failures"]), report_path, artifact)


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
    from tasks.inference import module_from_checkpoint, predict_split, torch_threads

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
    from tasks.inference import module_from_checkpoint, predict_split, torch_threads

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
        (out / REPORT).write_text(json.dumps(report, indent=2, default=str))
        if report["passed"]:
            log.info("verify: %s passed on %d samples at %s (outputs %s; checks %s)", precision.value, n, describe_runs(report["batches_run"]), list(reference), ", ".join(report["checks_run"]))
        return summary_of(report)

    inputs: dict[str, Any] = {"engine": engine, "checkpoint": checkpoint, "data": data, "precision": precision, "tolerance": tolerance, "batch": batch}
    if variant is not None:
        inputs["variant"] = variant
    try:
        ref = run_stage(SPEC, inputs, store, refresh, make)
    except TrtflowError as exc:
        # The latest report never keeps an older pass once this precision's verification failed.
        store.put(latest, _json({"precision": precision.value, "passed": False, "failures": [], "error": str(exc)}))
        raise
    report = write_latest(ref, store)
    if not report["passed"]:
        raise verdict_error(report, store.where(latest), ref)
    return ref


def write_latest(verification: ArtifactRef, store: Store) -> dict[str, Any]:
    """Make a ``verify`` artifact the latest verification of its precision (``LATEST``, a side file of the store); returns its report."""
    report = json.loads(verification.path(REPORT).read_text())
    as_store(store).put(LATEST.format(precision=report["precision"]), _json(report))
    return report


def _json(obj: Any) -> bytes:
    return json.dumps(obj, indent=2, default=str).encode()


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


def checks_of(
    precision: Precision, tolerance: Tolerance, results: Sequence[ComparisonResult], task_outputs: set[str], regression: bool, labelled: bool
) -> tuple[list[str], dict[str, str]]:
    """Which checks a verification ran, and which it did not (with why), as the report says them.

    The per-output checks are read off the comparisons themselves: the relative RMSE for the outputs
    judged by it (regression outputs, one-value outputs), the cosine when any output was judged by it.
    """
    judged = [(c.output, c.metric) for r in results for c in r.checks]
    run = ["elementwise (atol/rtol)"] if tolerance.atol is not None or tolerance.rtol is not None else []
    skipped: dict[str, str] = {} if run else {"elementwise": f"no atol/rtol for {precision.value}"}
    if relative := list(dict.fromkeys(o for o, m in judged if m == "max_relative_rmse")):
        run.append(f"relative RMSE ({', '.join(relative)})")
    if any(m == "min_cosine" for _, m in judged):
        run.append("cosine per sample")
    if regression:
        if task_outputs:
            run.append("R² drop (R², MAE, RMSE against the labels)")
        else:
            skipped["R² drop"] = "the dataset has no labels"
    elif task_outputs:
        run += list(TASK_CHECKS)
    else:
        skipped.update({c: "no logits output" if labelled else "the dataset has no labels" for c in TASK_CHECKS})
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
