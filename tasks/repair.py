"""Automatic precision repair: find the nodes that break a reduced variant (fp16, int8, ...) and keep them in fp32.

When a variant fails its gate, ``node_errors`` runs the fp32 graph and the reduced-precision graph
(the rounding emulation of a reduced float precision, or the int8 Q/DQ graph: what the precision's
registry entry declares) side by side on calibration samples with every intermediate tensor exposed,
and charges each node with the error it adds: the error of its output minus the worst error of its
inputs. ``next_nodes`` picks what the next attempt keeps in fp32: every node that writes or reads a
tensor past the reduced type's range (emulated precisions only; nothing else can fix an overflow),
otherwise the one node adding the most error. ``repair_of_variant`` then loops: it only decides which
nodes to keep (``decide``), and the graph runs the branch again with that list (a ``Rerun``: a new
variant keeping those nodes through the precision's ``convert`` with ``keep_fp32``, then validate,
build, verify), until the gate passes or the budget of kept nodes runs out. Each attempt's ranking, variant, engine
and (passing) verification are ordinary cached artifacts; the repair's own artifact records them all.

Error of a tensor: per channel (axis 1), the RMS error relative to the channel's RMS, capped at 1 (the
channel is lost), averaged over channels. A whole-tensor relative error would miss the classic int8
failure: one huge channel sets the quantization scale and every small channel rounds to zero, while
the tensor's total energy barely changes.

    from tasks.repair import node_errors, next_nodes
    errors = node_errors(fp32_model, fp16_variant, {"input": x}, Precision.fp16)
    keep = next_nodes(errors, kept=[])   # e.g. ['node_mul_16', 'node_layer_norm']
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from tasks.artifacts import ArtifactRef
from tasks.config import Precision, RepairConfig, Tolerance
from tasks.errors import PrecisionShareError, TrtflowError, VerificationError
from tasks.emulation import EMULATION_SUFFIX, emulation_of, tensor_types
from tasks.precisions import PrecisionSpec, precision_spec
from tasks.stage import StageSpec, run_stage
from tasks.store import Store, as_store

log = logging.getLogger("trtflow.repair")

#: a tensor whose fp32 values come within this factor of the reduced type's largest value is treated as overflowing:
#: calibration samples rarely show the largest activation the test data (or production) will
FP16_RANGE_MARGIN = 2.0
#: a channel whose reference energy is below this share of the tensor's largest channel counts as silent
_SILENT = 1e-12


@dataclass
class NodeError:
    """How much error one node adds in the reduced-precision graph.

    Attributes:
        node: node name (as in the fp32 graph and the variant).
        op_type: its ONNX operator.
        error: error of its output (0: exact, 1: every channel lost, inf: not finite).
        input_error: worst error of its inputs.
        contribution: ``error - input_error`` (inf when it turns finite inputs into inf/nan, or overflows).
        reason: why it ranks where it does.
    """

    node: str
    op_type: str
    error: float
    input_error: float
    contribution: float
    reason: str

    def to_dict(self) -> dict[str, Any]:
        # JSON has no inf: write it as a string that reads back with float().
        return {k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> NodeError:
        return cls(**{k: float(v) if k in ("error", "input_error", "contribution") else v for k, v in d.items()})


class _TensorError:
    """Streaming per-channel error statistics of one tensor over batches."""

    def __init__(self) -> None:
        self.ref_sq: np.ndarray | None = None
        self.diff_sq: np.ndarray | None = None
        self.ref_max = 0.0
        self.nonfinite = False

    def add(self, ref: np.ndarray, got: np.ndarray) -> None:
        ref64, got64 = ref.astype(np.float64), got.astype(np.float64)
        finite = np.isfinite(ref64)
        if finite.any():
            self.ref_max = max(self.ref_max, float(np.abs(ref64[finite]).max()))
        if not np.isfinite(got64[finite]).all():
            self.nonfinite = True
        if self.nonfinite:
            return
        axes = tuple(i for i in range(ref64.ndim) if i != 1) if ref64.ndim >= 2 else None
        diff = np.where(finite, got64 - ref64, 0.0)
        ref_sq = np.atleast_1d(np.sum(np.where(finite, ref64, 0.0) ** 2, axis=axes))
        diff_sq = np.atleast_1d(np.sum(diff**2, axis=axes))
        if self.ref_sq is None or self.diff_sq is None:
            self.ref_sq, self.diff_sq = ref_sq, diff_sq
        else:
            self.ref_sq, self.diff_sq = self.ref_sq + ref_sq, self.diff_sq + diff_sq

    def error(self) -> float:
        if self.nonfinite:
            return math.inf
        if self.ref_sq is None or self.diff_sq is None:
            return 0.0
        floor = _SILENT * float(self.ref_sq.max()) + 1e-30
        per_channel = np.minimum(np.sqrt(self.diff_sq / np.maximum(self.ref_sq, floor)), 1.0)
        return float(per_channel.mean())


def _exposed(model: Any, names: Sequence[str]) -> Any:
    """A copy of ``model`` with the fp32 tensors ``names`` added as graph outputs."""
    import onnx
    from onnx import TensorProto, helper

    out = onnx.ModelProto()
    out.CopyFrom(model)
    present = {o.name for o in out.graph.output}
    for name in names:
        if name not in present:
            out.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    return out


def _session(model: Any, optimize: bool, threads: int | None) -> Any:
    from tasks.backends.onnxruntime import has_qdq, int8_kernels_saturate, session_options

    import onnxruntime as ort

    fuse_int8 = not (int8_kernels_saturate() and has_qdq(model))
    return ort.InferenceSession(
        model.SerializeToString(), session_options(threads, optimize, fuse_int8), providers=["CPUExecutionProvider"]
    )


def _candidate_names(reference: Any, candidate: Any) -> dict[str, str]:
    """Map each fp32 output tensor of the reference graph to the candidate tensor holding the same value.

    Nodes keep their names in both variants, so a node's outputs map by position: a node kept in fp32
    by the converter writes '<name>_cast_to_fp16' instead of '<name>'. In the fp16 emulation the
    rounded value (what the GPU holds) keeps the original name; the unrounded one carries a suffix.
    """
    by_name = {n.name: n for n in candidate.graph.node if n.name}
    tensors = {o for n in candidate.graph.node for o in n.output} | {i.name for i in candidate.graph.input}
    out: dict[str, str] = {}
    for node in reference.graph.node:
        twin = by_name.get(node.name)
        for i, name in enumerate(node.output):
            got = twin.output[i] if twin is not None and i < len(twin.output) else name
            if got.endswith(f"{EMULATION_SUFFIX}32"):
                got = got[: -len(f"{EMULATION_SUFFIX}32")]
            if got in tensors:
                out[name] = got
    return out


def _reduced_nodes(variant: Any, spec: PrecisionSpec) -> set[str]:
    """Names of the variant's nodes that compute in reduced precision: the ones a repair can keep in fp32.

    A float precision (``spec.element_type``): a node reading or writing a tensor of its type (Casts
    excepted). A Q/DQ precision (``spec.dequantized``): a node reading a DequantizeLinear output.
    """
    if spec.dequantized:
        dequantized = {n.output[0] for n in variant.graph.node if n.op_type == "DequantizeLinear"}
        return {n.name for n in variant.graph.node if n.op_type not in ("QuantizeLinear", "DequantizeLinear") and dequantized & set(n.input)}
    types = tensor_types(variant)
    return {
        n.name
        for n in variant.graph.node
        if n.op_type != "Cast" and any(types.get(t) == spec.element_type for t in [*n.input, *n.output] if t)
    }


def node_errors(
    reference: Any,
    variant: Any,
    samples: Mapping[str, np.ndarray],
    precision: Precision,
    batch: int = 8,
    threads: int | None = None,
) -> list[NodeError]:
    """Rank the nodes of a reduced-precision variant by the error each adds, worst first.

    Args:
        reference: the fp32 graph (``onnx.ModelProto``, nodes named as in the variant).
        variant: the reduced variant made from it.
        samples: input name -> calibration samples (first axis: samples).
        precision: its precision: one with an emulation (fp16) is measured through it, with the range
            rule; the others (int8 Q/DQ) as the variant runs.
        batch: samples per run (bounds memory: every intermediate tensor is held for one batch).
        threads: ONNX Runtime threads.

    Returns:
        One entry per node that computes in reduced precision, worst contribution first.
    """
    from onnx import TensorProto

    precision = Precision(precision)
    spec = precision_spec(precision)
    rounding = spec.emulation
    if not _reduced_nodes(variant, spec):
        return []  # every node already computes in fp32: nothing left to keep
    candidate = emulation_of(variant, rounding.elem_type)[0] if rounding is not None else variant
    ref_types = tensor_types(reference)
    cand_types = tensor_types(candidate)
    mapping = {
        r: c
        for r, c in _candidate_names(reference, candidate).items()
        if ref_types.get(r) == TensorProto.FLOAT and cand_types.get(c, TensorProto.FLOAT) == TensorProto.FLOAT
    }
    inputs = [i.name for i in reference.graph.input]
    ref_sess = _session(_exposed(reference, list(mapping)), True, threads)
    # The emulation must keep its rounding casts: no graph optimizer for it.
    cand_sess = _session(_exposed(candidate, sorted(set(mapping.values()))), rounding is None, threads)
    stats = {r: _TensorError() for r in mapping}
    n = len(next(iter(samples.values())))
    for start in range(0, n, batch):
        feed = {k: np.ascontiguousarray(v[start : start + batch]) for k, v in samples.items() if k in inputs}
        ref_out = dict(zip([o.name for o in ref_sess.get_outputs()], ref_sess.run(None, feed), strict=True))
        cand_out = dict(zip([o.name for o in cand_sess.get_outputs()], cand_sess.run(None, feed), strict=True))
        for r, c in mapping.items():
            if ref_out[r].shape == cand_out[c].shape:
                stats[r].add(ref_out[r], cand_out[c])
    errors = {r: s.error() for r, s in stats.items()}
    errors.update({name: 0.0 for name in inputs})  # inputs are fed exactly
    too_big: set[str] = set()
    if rounding is not None:
        limit = rounding.max_finite / FP16_RANGE_MARGIN
        too_big = {r for r, s in stats.items() if s.ref_max > limit}
        too_big |= {t.name for t in reference.graph.initializer if t.data_type == TensorProto.FLOAT and _max_abs(t) > rounding.max_finite}
    reduced = _reduced_nodes(variant, spec)
    ranked: list[NodeError] = []
    for node in reference.graph.node:
        if node.name not in reduced:
            continue
        outs = [errors[o] for o in node.output if o in errors]
        ins = [errors[i] for i in node.input if i in errors]
        if not outs:
            continue
        e_out, e_in = max(outs), max(ins, default=0.0)
        big = sorted({*node.input, *node.output} & too_big)
        if big:
            peak = max((stats[t].ref_max for t in big if t in stats), default=math.inf)
            assert rounding is not None  # too_big is empty without an emulation
            reason = (f"{', '.join(big)} reaches {peak:.4g} in fp32, past {precision.value}'s largest value {rounding.max_finite:g} "
                      f"(checked with a {FP16_RANGE_MARGIN:g}x margin)")
            ranked.append(NodeError(node.name, node.op_type, e_out, e_in, math.inf, reason))
        elif math.isinf(e_out) and not math.isinf(e_in):
            ranked.append(NodeError(node.name, node.op_type, e_out, e_in, math.inf, "turns finite inputs into inf/nan"))
        elif math.isinf(e_in):
            ranked.append(NodeError(node.name, node.op_type, e_out, e_in, 0.0, "downstream of an inf/nan: not judged"))
        else:
            ranked.append(NodeError(node.name, node.op_type, e_out, e_in, e_out - e_in, f"adds {e_out - e_in:.3g} relative error"))
    ranked.sort(key=lambda e: -e.contribution)
    return ranked


def _max_abs(t: Any) -> float:
    from onnx import numpy_helper

    a = numpy_helper.to_array(t)
    return float(np.abs(a).max()) if a.size else 0.0


def next_nodes(errors: Sequence[NodeError], kept: Sequence[str]) -> list[str]:
    """The nodes the next attempt adds to those kept in fp32.

    Every node with an infinite contribution (an overflow, or the first inf/nan) at once: each of them
    alone breaks the result. Otherwise the one node adding the most error, if it adds any.
    """
    fresh = [e for e in errors if e.node not in kept]
    infinite = [e.node for e in fresh if math.isinf(e.contribution)]
    if infinite:
        return infinite
    return [fresh[0].node] if fresh and fresh[0].contribution > 0 else []


# --- stages -------------------------------------------------------------------------------------

SENSITIVITY = StageSpec("sensitivity", __name__, libraries=("onnx", "onnxruntime", "numpy"))
SPEC = StageSpec(
    "repair",
    __name__,
    libraries=("onnx", "onnxruntime", "numpy", "torch"),
)
ERRORS_FILE = "node_errors.json"
REPORT = "repair.json"
#: the verification figures a repair report shows before and after
FIGURES = ("numerics", "compute", "finite_share", "max_abs", "min_cosine", "top1_agreement", "accuracy", "accuracy_drop", "max_relative_rmse", "r2_drop")


def sensitivity_of_variant(
    model: ArtifactRef,
    variant: ArtifactRef,
    data: ArtifactRef,
    precision: Precision,
    samples: int,
    threads: int | None,
    store: Store,
    refresh: bool = False,
) -> ArtifactRef:
    """Rank the nodes of one variant by the error they add (``node_errors``) on calibration samples.

    Args:
        model: the ``export`` artifact (the fp32 graph).
        variant: the reduced ``precision`` artifact made from it.
        data: the ``data`` artifact (its first ``samples`` training samples are used).
        precision: the variant's precision.
        samples: how many samples.
        threads: ONNX Runtime threads.
        store: the artifact store.
        refresh: recompute even if an intact artifact exists.

    Returns:
        The ``sensitivity`` artifact with ``node_errors.json`` (worst first).
    """
    precision = Precision(precision)

    def make(out: Path) -> dict[str, Any]:
        import onnx

        from tasks.data import split_inputs
        from tasks.precisions.onnx_graph import named_nodes

        reference = named_nodes(onnx.load(str(model.path("model.onnx"))))
        feed = split_inputs(data, "train", slice(0, samples))  # every input, by name
        errors = node_errors(reference, onnx.load(str(variant.path("model.onnx"))), feed, precision, threads=threads)
        (out / ERRORS_FILE).write_text(json.dumps([e.to_dict() for e in errors], indent=2))
        return {"precision": precision.value, "samples": int(len(next(iter(feed.values())))), "nodes": len(errors), "worst": errors[0].to_dict() if errors else None}

    inputs = {"model": model, "variant": variant, "data": data, "precision": precision, "samples": samples, "threads": threads}
    return run_stage(SENSITIVITY, inputs, store, refresh, make)


def errors_of(sensitivity: ArtifactRef) -> list[NodeError]:
    """Read the ranking of a ``sensitivity`` artifact."""
    return [NodeError.from_dict(d) for d in json.loads(sensitivity.path(ERRORS_FILE).read_text())]


@dataclass(frozen=True)
class Decision:
    """What a repair does after a failing attempt: keep ``keep_fp32`` in fp32 and try again, or stop.

    Attributes:
        keep_fp32: every node the next attempt keeps in fp32 (those kept so far, then ``added``).
        added: the nodes this decision adds.
        stop: why the repair stops instead (None: try ``keep_fp32``).
    """

    keep_fp32: list[str]
    added: list[str]
    stop: str | None = None


def decide(errors: Sequence[NodeError], kept: Sequence[str], budget: int) -> Decision:
    """The next attempt from a ranking of the failing variant's nodes: ``next_nodes``, within the budget.

    Args:
        errors: the failing variant's ranking (``node_errors``, worst first).
        kept: the nodes kept in fp32 so far.
        budget: the most nodes a repair may keep in fp32.

    Returns:
        The decision; it stops when no node adds error any more or the next attempt would exceed the budget.
    """
    new = next_nodes(errors, kept)
    if not new:
        return Decision(list(kept), [], "no node of the variant adds error any more: the failure is not one of precision per node")
    if len(kept) + len(new) > budget:
        return Decision(list(kept), new, f"the next attempt would keep {len(kept) + len(new)} nodes in fp32 ({', '.join(new)} added), over the budget of {budget}")
    return Decision([*kept, *new], new)


@dataclass
class Attempt:
    """One run of the branch's stages with a set of nodes kept in fp32.

    Attributes:
        variant, engine: its ``precision`` and ``build`` artifacts.
        verify: its passing ``verify`` artifact (None when it fails).
        figures: the verification's summary (the failing verdict's when it fails) with its ``failures``.
        failure: the verification's error (None when it passes).
    """

    variant: ArtifactRef
    engine: ArtifactRef
    verify: ArtifactRef | None
    figures: dict[str, Any]
    failure: VerificationError | None


class Rerun(Protocol):
    """The branch run again by the graph (``tasks.graph.BranchRerun``): ``rerun(keep_fp32=[...])``.

    Attributes:
        key: what the reruns depend on besides the repair's own inputs (the branch's config values and code).
    """

    key: Any

    def __call__(self, **changes: Any) -> tuple[dict[str, ArtifactRef | None], TrtflowError | None]: ...


def _attempt(rerun: Rerun, **changes: Any) -> Attempt:
    """The branch run again with ``changes``; a failing verdict is data (its summary is the manifest's metadata)."""
    got, failure = rerun(**changes)
    variant, engine, verify = got["variant"], got["engine"], got["verification"]
    assert variant is not None and engine is not None
    if failure is None:
        assert verify is not None
        return Attempt(variant, engine, verify, {**verify.meta, "failures": []}, None)
    if not isinstance(failure, VerificationError):
        raise failure
    return Attempt(variant, engine, None, {**(failure.artifact.meta if failure.artifact is not None else {}), "failures": failure.failures}, failure)


def _stop_of(failure: VerificationError | None, precision: Precision, tolerance: Tolerance, first: bool) -> tuple[str | None, str | None]:
    """Whether a verification ends the repair: (why it stops, the share finding); (None, None) to go on."""
    if failure is None:
        return "verification passed", None
    if isinstance(failure, PrecisionShareError):
        # Every further attempt keeps more in fp32: it can only lower the share further.
        if first:
            return f"{failure.finding}; keeping nodes in fp32 cannot add {precision.value} operators", failure.finding
        return f"{failure.finding} (the floor is --tolerance {precision.value}.min_compute_share={tolerance.min_compute_share:g})", failure.finding
    return None, None


#: what a repair's meta (and the run report, ``flows.report.repair_summary``) says of it
SUMMARY = ("passed", "kept_fp32", "tried_fp32", "budget", "attempts", "stopped", "share_finding", "before", "after")


def repair_of_variant(
    model: ArtifactRef,
    checkpoint: ArtifactRef,
    data: ArtifactRef,
    variant: ArtifactRef,
    engine: ArtifactRef,
    precision: Precision,
    tolerance: Tolerance,
    repair: RepairConfig,
    rerun: Rerun,
    store: Store,
    refresh: bool = False,
) -> ArtifactRef:
    """Repair a variant that failed verification by keeping its worst nodes in fp32, attempt by attempt.

    A loop of decisions: rank the failing variant's nodes (``sensitivity_of_variant``), ``decide``
    what to keep in fp32 (or stop), have the graph run the branch again with that list (``rerun``:
    precision with ``keep_fp32``, then every stage after it through verify, each through its own
    stage cache, keyed by its own inputs), and decide again on the verdict. It stops when verification passes, when no node
    adds error any more, when the next attempt would keep more than ``repair.budget`` nodes, or on
    the int8-share finding. The outcome, passed or not, is an artifact: the same failing model is not
    repaired again on the next run.

    Args:
        model: the ``export`` artifact (fp32 graph).
        checkpoint: the ``train`` artifact, the reference the reruns verify against (so its model's
            code is in the repair's key).
        data: the ``data`` artifact.
        variant: the failing ``precision`` artifact.
        engine: its ``build`` artifact.
        precision: a reduced precision (``PrecisionSpec.reduced``).
        tolerance: that precision's thresholds.
        repair: budget and ranking samples.
        rerun: the branch run again by the graph, giving ``variant``, ``engine`` and ``verification``.
        store: the artifact store.
        refresh: recompute the repair and its rankings (the branch's stages follow their own ``--refresh``).

    Returns:
        The ``repair`` artifact with ``repair.json``; its meta says ``passed``, the ``kept_fp32`` nodes,
        the figures ``before`` and ``after``, and where the final ``engine`` and ``verify`` artifacts are.
    """
    from tasks.engine import engine_info

    precision = Precision(precision)
    info = engine_info(engine)

    def make(out: Path) -> dict[str, Any]:
        first = last = _attempt(rerun)
        stop, finding = _stop_of(first.failure, precision, tolerance, first=True)
        kept: list[str] = []
        attempts: list[dict[str, Any]] = []
        while stop is None:
            try:
                ranking = sensitivity_of_variant(model, last.variant, data, precision, repair.samples, info.threads, store, refresh)
            except TrtflowError:
                raise
            except Exception as exc:  # noqa: BLE001 - ONNX Runtime's untyped errors on an unusual graph
                stop = f"the nodes could not be ranked ({type(exc).__name__}: {str(exc)[:300]})"
                break
            errors = errors_of(ranking)
            decision = decide(errors, kept, repair.budget)
            if decision.stop is not None:
                stop = decision.stop
                break
            kept = decision.keep_fp32
            log.info("repair %s: attempt %d keeps %s in fp32", precision.value, len(attempts) + 1, kept)
            last = _attempt(rerun, keep_fp32=kept)
            stop, finding = _stop_of(last.failure, precision, tolerance, first=False)
            why = {e.node: e for e in errors}
            attempts.append({
                "kept_fp32": kept,
                "added": [{"node": n, "op_type": why[n].op_type if n in why else "", "reason": why[n].reason if n in why else ""} for n in decision.added],
                "passed": last.verify is not None,
                "figures": {k: last.figures.get(k) for k in FIGURES},
                "failures": last.figures["failures"],
                "variant": last.variant.digest,
                "sensitivity": ranking.digest,
            })
        passed = last.verify is not None
        report = {
            "precision": precision.value,
            "passed": passed,
            "kept_fp32": kept if passed else [],
            "tried_fp32": kept,
            "budget": repair.budget,
            "stopped": stop or "verification still fails",
            "share_finding": finding,
            "before": {k: first.figures.get(k) for k in FIGURES},
            "before_failures": first.figures["failures"],
            "after": attempts[-1]["figures"] if attempts else None,
            "attempts": attempts,
        }
        (out / REPORT).write_text(json.dumps(report, indent=2, default=str))
        log.info("repair %s: %s (%s)", precision.value, "passed" if passed else "failed", report["stopped"])
        meta = {"precision": precision.value, **{k: report[k] for k in SUMMARY if k != "attempts"}, "attempts": len(attempts)}
        meta["failures"] = last.figures["failures"]
        # Stage and key only: the artifacts are found again under whatever folder the store is in now.
        meta["engine"] = {"stage": last.engine.stage, "key": last.engine.key} if passed else None
        meta["verify"] = {"stage": last.verify.stage, "key": last.verify.key} if last.verify is not None else None
        return meta

    inputs = {
        "model": model, "checkpoint": checkpoint, "data": data, "variant": variant, "engine": engine, "precision": precision,
        "tolerance": tolerance, "repair": repair, "branch": rerun.key,
    }
    return run_stage(SPEC, inputs, store, refresh, make)


def stand_ins(repair: ArtifactRef, store: Store) -> dict[str, ArtifactRef]:
    """What a repair puts in its branch's place: ``{"build": engine, "verify": verdict}`` of the repaired variant.

    The repaired verification also becomes the precision's latest view (``reports/verify-<p>.json``).

    Raises:
        PrecisionRepairError: the repair did not pass (what it kept, what still fails).
        ArtifactError: the repaired artifacts are gone or damaged since the repair ran.
    """
    from tasks.errors import PrecisionRepairError
    from tasks.verify import write_latest

    refs = repaired_refs(repair, store)
    if refs is None:
        m = repair.meta
        raise PrecisionRepairError(m["precision"], m["failures"], m["tried_fp32"], m["stopped"], str(repair.path(REPORT)), m.get("share_finding"))
    write_latest(refs[1], store)
    return {refs[0].stage: refs[0], refs[1].stage: refs[1]}


def repaired_refs(repair: ArtifactRef, store: Store) -> tuple[ArtifactRef, ArtifactRef] | None:
    """The final engine and verification of a passed repair (None when it did not pass).

    Raises:
        ArtifactError: one of them is gone or damaged since the repair ran.
    """
    from tasks.errors import ArtifactError

    if not repair.meta.get("passed"):
        return None
    refs = []
    for name in ("engine", "verify"):
        where = repair.meta[name]
        ref = as_store(store).lookup(where["stage"], where["key"])
        problems = ["missing"] if ref is None else ref.problems()
        if ref is None or problems:
            raise ArtifactError(
                got=f"the repaired {name} artifact {where['stage']}/{where['key'][:16]} {'; '.join(problems)}",
                expected="the artifacts a cached repair names, intact",
                because="they were deleted or changed after the repair ran",
                fix="run again with --refresh repair",
            )
        refs.append(ref)
    return refs[0], refs[1]
