"""Reduced float numerics on a machine that computes in fp32: a verification-only emulation graph.

ONNX Runtime's CPU provider does not run a reduced float graph in that precision: for fp16 its
optimizer casts the weights back to fp32 and computes everything in fp32, so overflow past 65504 and
the rounding of activations never show up; for bf16 it has no kernels at all. ``emulation_of`` turns
such a variant into an fp32 graph that holds every tensor the variant types as the reduced type
(``elem_type``: fp16, bf16) the way a GPU holds it: after each node that writes one, a ``Cast`` to
the reduced type and back rounds the value (round to nearest even; beyond the type's range it
becomes inf). Everything else (fp32 islands, integer tensors, inputs and outputs kept in fp32) is
untouched. Which type a precision rounds through is its registry entry's ``emulation``
(``tasks.precisions``).

What it models and what it cannot (see docs/precision.md): each node computes in fp32 from
rounded inputs and weights and rounds its output once, which is what a kernel with fp32
accumulation does (TensorRT's fp16 and bf16 convolutions and GEMMs accumulate in fp32 on tensor
cores). It does not model kernels that accumulate in the reduced type, fused layers that keep an
intermediate in fp32 (the emulation rounds it, so it is slightly pessimistic there), or the
approximations of math functions on a GPU. Run the emulation graph with graph optimizations off,
or an optimizer may remove the rounding casts as redundant.

    import onnx
    from onnx import TensorProto
    from tasks.emulation import emulation_of
    emulated, info = emulation_of(onnx.load("fp16.onnx"), TensorProto.FLOAT16)
    onnx.save(emulated, "fp16-emulation.onnx")   # run with ORT_DISABLE_ALL
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

#: suffix of the tensors the emulation adds (the unrounded value is "<name>__fp16emu32")
EMULATION_SUFFIX = "__fp16emu"
#: file name of an emulation graph written beside other files
EMULATION_FILE = "emulation.onnx"


class NothingToEmulateError(ValueError):
    """The model has no tensor of the reduced type: there is nothing to emulate (an fp32 graph, or every node kept in fp32)."""


@dataclass
class EmulationInfo:
    """What the emulation rounds.

    Attributes:
        rounded_tensors: reduced tensors of the variant rounded through their type after their producer.
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


def _round_trip(src: str, dst: str, reduced: int) -> list[Any]:
    """Nodes rounding the fp32 tensor ``src`` through the type ``reduced`` into the fp32 tensor ``dst``."""
    from onnx import TensorProto, helper

    half = f"{dst}{EMULATION_SUFFIX}16"
    return [
        helper.make_node("Cast", [src], [half], name=f"{dst}{EMULATION_SUFFIX}_to16", to=reduced),
        helper.make_node("Cast", [half], [dst], name=f"{dst}{EMULATION_SUFFIX}_to32", to=TensorProto.FLOAT),
    ]


def _emulate_graph(graph: Any, types: dict[str, int], counts: dict[str, int], f16: int, outer: dict[str, str] | None = None) -> None:
    """Rewrite one graph (and its subgraphs) in place: the reduced type ``f16`` becomes fp32 plus rounding.

    ``outer`` maps names of the enclosing graph that now read a rounded copy (a subgraph may use them).
    """
    from onnx import AttributeProto, TensorProto

    f32 = TensorProto.FLOAT
    rename: dict[str, str] = dict(outer or {})
    nodes: list[Any] = []
    for v in graph.input:
        if v.type.tensor_type.elem_type == f16:
            # A reduced input is fed in fp32 and rounded as the engine's input would be.
            v.type.tensor_type.elem_type = f32
            rename[v.name] = f"{v.name}{EMULATION_SUFFIX}_in"
            nodes += _round_trip(v.name, rename[v.name], f16)
            counts["rounded_tensors"] += 1
    for i, t in enumerate(graph.initializer):
        if t.data_type == f16:
            # fp16 and bf16 weights are exactly representable in fp32: the values the GPU sees.
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
                _emulate_graph(a.g, types, counts, f16, rename)
            elif a.type == AttributeProto.GRAPHS:
                for g in a.graphs:
                    _emulate_graph(g, types, counts, f16, rename)
        rounding: list[Any] = []
        for i, out in enumerate(node.output):
            kind = types.get(out)
            if not out:
                continue
            if kind == f16:
                node.output[i] = f"{out}{EMULATION_SUFFIX}32"
                rounding += _round_trip(node.output[i], out, f16)
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
    # The variant's value_info types reduced tensors: drop it and let runtimes infer the fp32 types.
    del graph.value_info[:]


def emulation_of(model: Any, elem_type: int) -> tuple[Any, EmulationInfo]:
    """Build the verification-only fp32 graph that rounds like a reduced float variant.

    Args:
        model: the variant (an ``onnx.ModelProto``; not modified).
        elem_type: the reduced type it rounds through (``onnx.TensorProto.FLOAT16``, ``BFLOAT16``):
            the precision's ``Emulation.elem_type``.

    Returns:
        The emulation model (same input and output names; reduced inputs/outputs become fp32) and
        what it rounds.

    Raises:
        NothingToEmulateError: the model has no tensor of that type at all, so there is nothing to emulate.
    """
    import onnx

    name = onnx.TensorProto.DataType.Name(elem_type).lower().replace("bfloat", "bf").replace("float", "fp")  # fp16, bf16
    emulated = onnx.ModelProto()
    emulated.CopyFrom(model)
    types = tensor_types(emulated)
    counts = {"rounded_tensors": 0, "fp32_tensors": 0, "untyped_tensors": 0}
    _emulate_graph(emulated.graph, types, counts, elem_type)
    if counts["rounded_tensors"] == 0:
        raise NothingToEmulateError(
            f"got a model without {name} tensors, expected a {name} variant, because only {name} tensors are rounded; "
            "pass the reduced variant, not the fp32 export"
        )
    emulated.graph.name = f"{model.graph.name or 'graph'}-{name}-emulation"
    return emulated, EmulationInfo(**counts)
