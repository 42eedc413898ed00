"""Which precision the compute operators of a variant or an engine really run in.

A variant called int8 whose every convolution and matrix product stays in fp32 (a repair kept them
all, or the model has nothing int8 can quantize) is an fp32 engine with extra steps: no speed-up, and
a report saying "int8" would be a lie. Verification therefore counts the compute operators (the ones
that cost the time: convolutions, matrix products, recurrent cells, attention) by the precision they
run in, and gates the reduced precisions on the share that does (``Tolerance.min_compute_share``).

Where the count comes from:

- ONNX Runtime runs the variant's ONNX graph: a compute node is int8 when its data inputs come from
  ``DequantizeLinear`` (a Q/DQ pair ONNX Runtime fuses into an int8 kernel) or it is an integer kernel
  itself (``QLinearConv``, ``MatMulInteger``...), fp16 when its first input is typed fp16, else fp32:
  which rule names which precision is each precision's registry entry (``tasks.precisions``:
  ``dequantized``, ``kernels``, ``element_type``).
- TensorRT reports what it built: the engine inspector's layers (``layers.json``, built with
  ``ProfilingVerbosity.DETAILED``), each compute layer typed by its inputs' formats (see
  ``tasks.backends.tensorrt.compute_layers``). A report whose compute layers are all untyped (fused
  regions that say nothing of their inside) falls back to the ONNX graph, and says so.

    from tasks.compute_share import onnx_compute_share
    share = onnx_compute_share(onnx.load("int8.onnx"))
    share.count("int8"), share.total, share.share("int8")   # e.g. 3, 4, 0.75
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

#: ONNX operators that do the arithmetic of a model (plain, fused by ONNX Runtime, and integer kernels)
COMPUTE_OPS = frozenset({
    "Conv", "ConvTranspose", "Gemm", "MatMul", "Einsum", "GRU", "LSTM", "RNN", "Attention", "MultiHeadAttention",
    "FusedConv", "FusedGemm", "FusedMatMul", "QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger",
    "MatMulIntegerToFloat", "QGemm", "QAttention", "DynamicQuantizeMatMul",
})
#: which inputs carry data (not bias) for the Q/DQ rule: both operands of a product or convolution
_DATA_INPUTS = 2
#: where a count comes from
ONNX_GRAPH = "onnx graph"
ENGINE_INSPECTOR = "tensorrt engine inspector"


@dataclass
class ComputeShare:
    """Compute operators by the precision they run in.

    Attributes:
        source: ``ONNX_GRAPH`` or ``ENGINE_INSPECTOR`` (with a note when it fell back from one to the other).
        by_precision: precision ("fp32", "fp16", "bf16", "int8", ..., "unknown") -> operators.
    """

    source: str
    by_precision: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        """Every compute operator, typed or not."""
        return sum(self.by_precision.values())

    def count(self, precision: str) -> int:
        return self.by_precision.get(precision, 0)

    def share(self, precision: str) -> float:
        """The share of compute operators that run in ``precision`` (0 when there is none at all).

        Untyped operators count against it: an operator the report cannot type is not shown to run
        in the reduced precision.
        """
        return self.count(precision) / self.total if self.total else 0.0

    def to_dict(self, precision: str | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"source": self.source, "operators": self.total, "by_precision": dict(sorted(self.by_precision.items()))}
        if precision is not None:
            out["precision"] = precision
            out["share"] = self.share(precision)
        return out


def _precision_of_type(elem_type: int | None) -> str:
    from onnx import TensorProto

    from tasks.precisions import registered

    for spec in registered():
        if spec.element_type is not None and spec.element_type == elem_type:
            return spec.name
    # Float types no precision is registered for keep their usual names.
    return {
        TensorProto.FLOAT16: "fp16",
        TensorProto.BFLOAT16: "bf16",
        TensorProto.FLOAT: "fp32",
        TensorProto.DOUBLE: "fp32",
    }.get(elem_type or 0, "unknown" if not elem_type else "other")


def onnx_compute_share(model: Any) -> ComputeShare:
    """Count the compute operators of an ONNX model (``onnx.ModelProto``) by precision, subgraphs included.

    A compute node reading only integer tensors (an embedding lookup done as a product of ids) is not
    counted: it computes no floating-point arithmetic to speak of a precision for.
    """
    from tasks.emulation import tensor_types
    from tasks.precisions import registered

    types = tensor_types(model)
    counts: Counter[str] = Counter()
    quantized = [s for s in registered() if s.dequantized or s.kernels]

    def visit(graph: Any) -> None:
        dequantized = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear" and n.output}
        for node in graph.node:
            for a in node.attribute:
                for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                    visit(g)
            if node.op_type not in COMPUTE_OPS:
                continue
            data = [i for i in node.input[:_DATA_INPUTS] if i]
            fed = bool(data) and all(i in dequantized for i in data)
            if q := next((s for s in quantized if node.op_type in s.kernels or (s.dequantized and fed)), None):
                counts[q.name] += 1
                continue
            kind = _precision_of_type(types.get(data[0])) if data else "unknown"
            if kind != "other":
                counts[kind] += 1

    visit(model.graph)
    return ComputeShare(ONNX_GRAPH, dict(counts))


def engine_compute_share(layers_report: Mapping[str, Any] | str) -> ComputeShare | None:
    """Count a TensorRT engine's compute layers by precision, from its inspector report.

    Returns:
        The count, or None when the report has no compute layer whose precision it tells (every
        one untyped, e.g. an engine built without detailed profiling verbosity): ask the graph then.
    """
    from tasks.backends.tensorrt import compute_layers

    try:
        counts = compute_layers(layers_report)
    except ValueError:
        return None
    if not any(n for p, n in counts.items() if p != "unknown"):
        return None
    return ComputeShare(ENGINE_INSPECTOR, counts)


def share_finding(share: ComputeShare, precision: str, kept_fp32: int) -> str:
    """The sentence a report gives a variant with (almost) no operator in its precision.

    e.g. "int8: 0 of 5 compute operators run in int8 after repair kept 5 in fp32; the model has no int8 benefit".
    """
    if not share.total:
        return f"{precision}: the model has no compute operator (Conv, Gemm, MatMul, GRU, ...) to run in {precision}; it has no {precision} benefit"
    after = f" after repair kept {kept_fp32} in fp32" if kept_fp32 else ""
    return f"{precision}: {share.count(precision)} of {share.total} compute operators run in {precision}{after}; the model has no {precision} benefit"
