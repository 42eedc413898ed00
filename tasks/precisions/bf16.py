"""bf16: weights and activations in bfloat16 (a strongly typed ONNX graph), inputs and outputs fp32.

bf16 keeps fp32's 8 exponent bits (range up to ~3.4e38, so no overflow where fp32 has none) and 8
significant bits (7 stored): a unit roundoff of 2^-8 = 3.9e-3, 8x fp16's 2^-11. onnx's and ONNX
Runtime's float16 converters do not write bf16, so ``bf16_from_onnx`` does, with numpy bit operations
that round to nearest, ties to even (what ``Cast`` to bfloat16 and TensorRT do). Most operators take
bfloat16 only from opset 22 (Conv, MaxPool, AveragePool, GRU, LSTM...): a model of an older opset is
raised to 22 with onnx's version converter; a node whose operator takes no bfloat16 even then (or that
a repair keeps, or that holds a subgraph) stays fp32, with Casts around it.

ONNX Runtime's CPU provider has no kernels for most bf16 operators, so a CPU validates, builds and
verifies the bf16 variant through its rounding emulation (``tasks.emulation``: fp32 arithmetic,
every bf16 tensor rounded to bf16 after the node that writes it). TensorRT builds the variant itself:
a strongly typed network takes bf16 from the ONNX types, no builder flag (``BuilderFlag.BF16`` is
deprecated in TensorRT 10 and gone in 11).

    from tasks.precisions.bf16 import bf16_bits, bf16_values
    bf16_values(np.float32([1 + 2**-8, 1 + 3 * 2**-9]))   # [1.0, 1.0078125]: ties to even, else nearest
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tasks.precisions.base import Emulation, PrecisionSpec, register_precision
from tasks.precisions.onnx_graph import check_kept, named_nodes, topologically_sorted

FLOAT, BFLOAT16 = 1, 16  # onnx.TensorProto.FLOAT, BFLOAT16
#: largest finite bf16 value, (2 - 2^-7) * 2^127
BF16_MAX = float.fromhex("0x1.fep127")
#: the first opset whose Conv, pooling and recurrent operators take bfloat16
BF16_OPSET = 22
#: suffixes of the tensors the conversion adds
_TO_BF16, _TO_FP32, _OUT = "__to_bf16", "__to_fp32", "__bf16"


def bf16_bits(x: np.ndarray) -> np.ndarray:
    """The bfloat16 bit patterns (uint16) of float values, rounded to nearest, ties to even.

    The upper 16 bits of the fp32 pattern, plus one when the lower 16 bits are more than half an
    ulp, or exactly half and the kept last bit is odd. NaN stays a (quiet) NaN; a value beyond
    ``BF16_MAX`` by half an ulp or more rounds to inf, as ``Cast`` does.
    """
    f = np.ascontiguousarray(x, dtype=np.float32)
    bits = f.view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    out = rounded.astype(np.uint16)
    nan = np.isnan(f)
    if nan.any():
        out[nan] = ((bits[nan] >> 16).astype(np.uint16) & 0x8000) | 0x7FC0
    return out


def bf16_values(x: np.ndarray) -> np.ndarray:
    """Float values rounded to bf16, held in fp32 (exactly: every bf16 value is an fp32 value)."""
    return (bf16_bits(x).astype(np.uint32) << 16).view(np.float32)


def _bf16_tensor(t: Any, name: str | None = None) -> Any:
    """A bfloat16 TensorProto holding an fp32 tensor's values rounded to bf16."""
    from onnx import helper, numpy_helper

    values = numpy_helper.to_array(t)
    out = helper.make_tensor(name or t.name, BFLOAT16, list(values.shape), bf16_bits(values).tobytes(), raw=True)
    out.doc_string = t.doc_string
    return out


#: operators kept in fp32 though their schema allows bfloat16, because a real builder refuses them in
#: bf16: TensorRT-RTX 1.7.1.116's ONNX parser rejects a bf16 GRU (its importer subtracts a Float from a
#: BFloat16 tensor; docs/gpu-build-check.md, 2026-12-02), while the fp16/fp32/int8 GRUs build
BUILDERS_REFUSE = frozenset({"GRU"})


def _takes_bf16(node: Any, opset: int, types: Mapping[str, int]) -> bool:
    """Whether the operator's schema at ``opset`` lets every fp32 input and output of the node be bfloat16
    (and no real builder is known to refuse it so: ``BUILDERS_REFUSE``)."""
    from onnx import AttributeProto, defs

    if node.domain not in ("", "ai.onnx") or node.op_type == "Cast" or node.op_type in BUILDERS_REFUSE:
        return False  # a Cast keeps the type it names; other domains have their own schemas
    if any(a.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS) for a in node.attribute):
        return False  # a subgraph would read bf16 tensors it types fp32
    try:
        schema = defs.get_schema(node.op_type, opset, "")
    except Exception:  # noqa: BLE001 - onnx raises SchemaError for an unknown operator
        return False
    allowed = {c.type_param_str: set(c.allowed_type_strs) for c in schema.type_constraints}
    floats = 0
    for formal, actual in ((schema.inputs, node.input), (schema.outputs, node.output)):
        for i, name in enumerate(actual):
            if not name or types.get(name) != FLOAT:
                continue
            if not formal:
                return False
            floats += 1
            type_str = formal[min(i, len(formal) - 1)].type_str  # variadic: the last formal parameter repeats
            if "tensor(bfloat16)" not in allowed.get(type_str, {type_str}):
                return False
    return floats > 0


def bf16_from_onnx(src: Path, dst: Path, keep_fp32: Sequence[str] = (), calibration: Callable[[], Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """Convert weights and activations to bf16, keeping fp32 inputs and outputs (a strongly typed graph).

    Args:
        src: the fp32 ONNX file.
        dst: where the bf16 file is written.
        keep_fp32: node names that stay fp32 (repair); Casts surround each fp32 island.
        calibration: not read (bf16 needs no data).

    Returns:
        What the conversion did: io types, weights, the opset (and the one it was raised from), the
        operators left in fp32 because no bf16 schema exists for them, the nodes kept by a repair.

    Raises:
        ValueError: a node to keep that the model does not have.
    """
    import onnx
    from onnx import helper, version_converter

    from tasks.emulation import tensor_types

    model = named_nodes(onnx.load(str(src)))
    check_kept(model, keep_fp32)
    names = [n.name for n in model.graph.node]
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
    raised_from = None
    if opset < BF16_OPSET:
        try:
            converted = version_converter.convert_version(model, BF16_OPSET)
            # The converter keeps the nodes, so it keeps their names: repair's keep list still applies.
            if [n.name for n in converted.graph.node] == names:
                model, raised_from, opset = converted, opset, BF16_OPSET
                model.ir_version = max(model.ir_version, 10)  # opset 22 needs IR 10
        except Exception:  # noqa: BLE001 - an adapter the converter lacks: convert at the model's own opset
            pass
    graph = model.graph
    types = tensor_types(model)
    keep = set(keep_fp32)
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}
    # Names a subgraph reads from this graph: their producers stay fp32 (the subgraph types them so).
    inner = {i for n in graph.node for a in n.attribute for g in [a.g, *a.graphs] for m in g.node for i in m.input}
    bf16 = {n.name for n in graph.node
            if n.name not in keep and n.op_type != "Constant" and _takes_bf16(n, opset, types) and not set(n.output) & inner}
    # A constant (initializer or Constant node) is stored in bf16 when only bf16 nodes read it.
    def only_bf16_reads(name: str) -> bool:
        users = consumers.get(name, [])
        return bool(users) and name not in outputs and name not in inner and all(u.name in bf16 for u in users)

    home: dict[str, int] = {}  # float tensor -> the type it is stored in
    for i, t in enumerate(graph.initializer):
        if t.data_type == FLOAT:
            home[t.name] = BFLOAT16 if only_bf16_reads(t.name) else FLOAT
            if home[t.name] == BFLOAT16:
                graph.initializer[i].CopyFrom(_bf16_tensor(t))
    for node in graph.node:
        if node.op_type == "Constant" and types.get(node.output[0]) == FLOAT and node.name not in keep and only_bf16_reads(node.output[0]):
            for a in node.attribute:
                if a.name == "value":
                    a.t.CopyFrom(_bf16_tensor(a.t))
                    home[node.output[0]] = BFLOAT16
        if node.name in bf16:
            for a in node.attribute:
                if a.type == onnx.AttributeProto.TENSOR and a.t.data_type == FLOAT:
                    a.t.CopyFrom(_bf16_tensor(a.t))  # ConstantOfShape's value: the output's type
                elif a.name == "dtype" and a.type == onnx.AttributeProto.INT and a.i == FLOAT:
                    a.i = BFLOAT16
            for name in node.output:
                if types.get(name) == FLOAT:
                    home[name] = BFLOAT16
    for v in graph.input:
        home.setdefault(v.name, FLOAT)
    # A graph output written in bf16 is renamed; a Cast writes the fp32 output under its own name.
    renamed = {name: f"{name}{_OUT}" for name in outputs if home.get(name) == BFLOAT16}
    casts: dict[tuple[str, int], str] = {}
    added: list[Any] = []

    def cast(name: str, to: int) -> str:
        if (name, to) not in casts:
            casts[name, to] = f"{name}{_TO_BF16 if to == BFLOAT16 else _TO_FP32}"
            added.append(helper.make_node("Cast", [name], [casts[name, to]], name=casts[name, to], to=to))
        return casts[name, to]

    for node in graph.node:
        for i, name in enumerate(node.output):
            node.output[i] = renamed.get(name, name)
        want = BFLOAT16 if node.name in bf16 else FLOAT
        for i, name in enumerate(node.input):
            if types.get(name) == FLOAT and home.get(name, FLOAT) != want:
                node.input[i] = cast(renamed.get(name, name), want)
            else:
                node.input[i] = renamed.get(name, name)
    for name, inside in renamed.items():
        added.append(helper.make_node("Cast", [inside], [name], name=f"{name}{_TO_FP32}", to=FLOAT))
    graph.node.extend(added)
    del graph.value_info[:]  # it types converted tensors fp32: let shape inference type them again
    topologically_sorted(graph)
    onnx.save(model, str(dst))
    left = sorted({n.op_type for n in graph.node if n.name in names and n.name not in bf16 and n.name not in keep
                   and n.op_type not in ("Cast", "Constant") and any(types.get(t) == FLOAT for t in [*n.input, *n.output])})
    details: dict[str, Any] = {"io_types": "float32", "weights": "bfloat16", "rounding": "nearest, ties to even", "opset": opset}
    if raised_from is not None:
        details["opset_raised_from"] = raised_from
    if left:
        details["fp32_ops"] = left  # no bfloat16 schema at this opset (or a subgraph reads them)
    if keep_fp32:
        details["kept_fp32"] = list(keep_fp32)
    return details


SPEC = register_precision(PrecisionSpec(
    name="bf16",
    title="Thresholds of the bf16 engine.",
    convert=bf16_from_onnx,
    # bf16's unit roundoff (2^-8) is 8x fp16's (2^-11): elementwise and RMS gates 8x fp16's 1e-2. The
    # per-sample cosine loses with the square of the relative error (1 - cos ~ e^2 / 2), so 8x fp16's
    # error would allow 1 - 64e-4; 0.999 is kept tighter, as the task metrics stay close to fp16's
    # (torch.testing's own bf16 default is rtol 1.6e-2, 16x its fp16 default: facts.md).
    tolerance={"atol": 8e-2, "rtol": 8e-2, "min_cosine": 0.999, "min_top1_agreement": 0.98, "max_accuracy_drop": 0.02,
               "max_relative_rmse": 8e-2, "max_r2_drop": 0.02},
    element_type=BFLOAT16,
    emulation=Emulation(elem_type=BFLOAT16, label="bf16 emulated on CPU", max_finite=BF16_MAX),
    cpu_kernels=False,
))
