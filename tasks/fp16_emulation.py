"""fp16 numerics on a machine that cannot compute in fp16: a verification-only emulation graph.

ONNX Runtime's CPU provider does not run an fp16 graph in fp16: its optimizer casts the fp16 weights
back to fp32 and computes everything in fp32, so overflow past 65504 and the rounding of activations
never show up. ``emulation_from_fp16_onnx`` turns the fp16 variant into an fp32 graph that holds every
tensor the variant types as fp16 the way a GPU holds it: after each node that writes an fp16 tensor, a
``Cast`` to fp16 and back rounds the value (round to nearest even; beyond the fp16 range it becomes
inf). Everything else (fp32 islands, integer tensors, inputs and outputs kept in fp32) is untouched.

What it models and what it cannot (see docs/precision.md): each node computes in fp32 from
fp16-rounded inputs and weights and rounds its output once, which is what a kernel with fp32
accumulation does (TensorRT's fp16 convolutions and GEMMs accumulate in fp32 on tensor cores). It does
not model kernels that accumulate in fp16, fused layers that keep an intermediate in fp32 (the
emulation rounds it, so it is slightly pessimistic there), or the approximations of fp16 math
functions on a GPU. Run the emulation graph with graph optimizations off, or an optimizer may remove
the rounding casts as redundant.

    import onnx
    from tasks.fp16_emulation import emulation_from_fp16_onnx
    emulated, info = emulation_from_fp16_onnx(onnx.load("fp16.onnx"))
    onnx.save(emulated, "fp16-emulation.onnx")   # run with ORT_DISABLE_ALL
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

#: largest finite fp16 value; anything rounding beyond it is inf
FP16_MAX = 65504.0
#: what reports call the two ways of verifying fp16
NATIVE = "native fp16"
EMULATED = "fp16 emulated on CPU"
#: suffix of the tensors the emulation adds (the unrounded value is "<name>__fp16emu32")
EMULATION_SUFFIX = "__fp16emu"


class NoFp16Error(ValueError):
    """The model has no fp16 tensor: there is nothing to emulate (an fp32 graph, or every node kept in fp32)."""


@dataclass
class EmulationInfo:
    """What the emulation rounds.

    Attributes:
        rounded_tensors: fp16 tensors of the variant rounded through fp16 after their producer.
        fp32_tensors: float tensors the variant keeps in fp32 (fp32 islands, fp32 inputs/outputs).
        untyped_tensors: node outputs whose type shape inference could not tell; left unrounded.
    """

    rounded_tensors: int
    fp32_tensors: int
    untyped_tensors: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def tensor_types(model: Any) -> dict[str, int]:
    """Element type (``onnx.TensorProto`` enum) of every tensor of a model whose type is known.

    Runs ONNX shape inference (non-strict) and reads inputs, outputs, value_info, initializers and
    Constant nodes, subgraphs included.
    """
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # noqa: BLE001 - a model inference cannot type is still emulated where types are given
        inferred = model
    types: dict[str, int] = {}

    def visit(graph: Any) -> None:
        for v in [*graph.input, *graph.output, *graph.value_info]:
            if v.type.HasField("tensor_type") and v.type.tensor_type.elem_type:
                types[v.name] = v.type.tensor_type.elem_type
        for t in graph.initializer:
            types[t.name] = t.data_type
        for node in graph.node:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                for a in node.attribute:
                    if a.name == "value":
                        types[node.output[0]] = a.t.data_type
            if node.op_type == "Cast" and node.domain in ("", "ai.onnx"):
                to = next((a.i for a in node.attribute if a.name == "to"), None)
                if to:
                    types[node.output[0]] = to
            for a in node.attribute:
                for g in [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs):
                    visit(g)

    visit(inferred.graph)
    return types


def _fp32_tensor(t: Any) -> Any:
    from onnx import numpy_helper

    out = numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float32), t.name)
    out.doc_string = t.doc_string
    return out


def _round_trip(src: str, dst: str) -> list[Any]:
    """Nodes rounding the fp32 tensor ``src`` through fp16 into the fp32 tensor ``dst``."""
    from onnx import TensorProto, helper

    half = f"{dst}{EMULATION_SUFFIX}16"
    return [
        helper.make_node("Cast", [src], [half], name=f"{dst}{EMULATION_SUFFIX}_to16", to=TensorProto.FLOAT16),
        helper.make_node("Cast", [half], [dst], name=f"{dst}{EMULATION_SUFFIX}_to32", to=TensorProto.FLOAT),
    ]


def _emulate_graph(graph: Any, types: dict[str, int], counts: dict[str, int], outer: dict[str, str] | None = None) -> None:
    """Rewrite one graph (and its subgraphs) in place: fp16 becomes fp32 plus rounding.

    ``outer`` maps names of the enclosing graph that now read a rounded copy (a subgraph may use them).
    """
    from onnx import AttributeProto, TensorProto

    f16, f32 = TensorProto.FLOAT16, TensorProto.FLOAT
    rename: dict[str, str] = dict(outer or {})
    nodes: list[Any] = []
    for v in graph.input:
        if v.type.tensor_type.elem_type == f16:
            # An fp16 input is fed in fp32 and rounded as the engine's fp16 input would be.
            v.type.tensor_type.elem_type = f32
            rename[v.name] = f"{v.name}{EMULATION_SUFFIX}_in"
            nodes += _round_trip(v.name, rename[v.name])
            counts["rounded_tensors"] += 1
    for i, t in enumerate(graph.initializer):
        if t.data_type == f16:
            # fp16 weights are exactly representable in fp32: the values the GPU sees.
            graph.initializer[i].CopyFrom(_fp32_tensor(t))
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
        for a in node.attribute:
            if a.name in ("to", "dtype") and a.type == AttributeProto.INT and a.i == f16:
                a.i = f32
            elif a.type == AttributeProto.TENSOR and a.t.data_type == f16:
                a.t.CopyFrom(_fp32_tensor(a.t))
            elif a.type == AttributeProto.GRAPH:
                _emulate_graph(a.g, types, counts, rename)
            elif a.type == AttributeProto.GRAPHS:
                for g in a.graphs:
                    _emulate_graph(g, types, counts, rename)
        rounding: list[Any] = []
        for i, out in enumerate(node.output):
            kind = types.get(out)
            if not out:
                continue
            if kind == f16:
                node.output[i] = f"{out}{EMULATION_SUFFIX}32"
                rounding += _round_trip(node.output[i], out)
                counts["rounded_tensors"] += 1
            elif kind == f32:
                counts["fp32_tensors"] += 1
            elif kind is None:
                counts["untyped_tensors"] += 1
        nodes.append(node)
        nodes += rounding
    del graph.node[:]
    graph.node.extend(nodes)
    for v in graph.output:
        if v.type.tensor_type.elem_type == f16:
            v.type.tensor_type.elem_type = f32
    # The variant's value_info types fp16 tensors: drop it and let runtimes infer the fp32 types.
    del graph.value_info[:]


def emulation_from_fp16_onnx(model: Any) -> tuple[Any, EmulationInfo]:
    """Build the verification-only fp32 graph that rounds like the fp16 variant.

    Args:
        model: the fp16 variant (an ``onnx.ModelProto``; not modified).

    Returns:
        The emulation model (same input and output names; fp16 inputs/outputs become fp32) and what
        it rounds.

    Raises:
        NoFp16Error: the model has no fp16 tensor at all, so there is nothing to emulate.
    """
    import onnx

    emulated = onnx.ModelProto()
    emulated.CopyFrom(model)
    types = tensor_types(emulated)
    counts = {"rounded_tensors": 0, "fp32_tensors": 0, "untyped_tensors": 0}
    _emulate_graph(emulated.graph, types, counts)
    if counts["rounded_tensors"] == 0:
        raise NoFp16Error(
            "got a model without fp16 tensors, expected an fp16 variant, because only fp16 tensors are rounded; "
            "pass the fp16 variant, not the fp32 export"
        )
    emulated.graph.name = f"{model.graph.name or 'graph'}-fp16-emulation"
    return emulated, EmulationInfo(**counts)


def emulation_runner(fp16_onnx: Any, folder: Any, threads: int | None = None) -> tuple[Any, EmulationInfo]:
    """Write the emulation graph of an fp16 ONNX file into ``folder`` and return an inactive Runner for it.

    The runner runs ONNX Runtime's CPU provider with graph optimizations off, so no optimizer removes
    the rounding casts, and with no batch limits (the emulation is not an engine).

    Args:
        fp16_onnx: path of the fp16 variant.
        folder: where ``fp16-emulation.onnx`` is written (a private temporary folder).
        threads: ONNX Runtime threads.

    Returns:
        The runner and what the emulation rounds.
    """
    from pathlib import Path

    import onnx

    from tasks.backends.onnxruntime import OnnxRuntimeRunner

    emulated, info = emulation_from_fp16_onnx(onnx.load(str(fp16_onnx)))
    path = Path(folder) / "fp16-emulation.onnx"
    onnx.save(emulated, str(path))
    return OnnxRuntimeRunner(path, threads=threads, optimize=False), info
