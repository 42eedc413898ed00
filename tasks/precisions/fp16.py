"""fp16: weights and activations in fp16 (ONNX Runtime's float16 converter), inputs and outputs fp32.

A CPU backend computes an fp16 graph in fp32 (ONNX Runtime casts the weights back), so verify also
runs its fp16 rounding emulation (``tasks.emulation``); repair keeps nodes in fp32 through the
converter's ``node_block_list``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tasks.precisions.onnx_graph import check_kept, named_nodes, topologically_sorted
from tasks.precisions.base import Emulation, PrecisionSpec, register_precision

FLOAT16 = 10  # onnx.TensorProto.FLOAT16
#: largest finite fp16 value; anything rounding beyond it is inf
FP16_MAX = 65504.0


def fold_cast_round_trips(graph: Any, original: set[str]) -> int:
    """Remove fp32 -> fp16 -> fp32 Cast pairs that ``convert_float_to_float16`` puts between fp32 nodes.

    The converter rounds the tensor between two neighbouring blocked nodes through fp16 (and the fp32
    input before a blocked first node): exactly the overflow a repair keeps nodes in fp32 to avoid.
    Only Casts the converter added (not in ``original``) are folded; a Cast pair of the user's own
    graph is left alone.

    Returns:
        How many fp16 -> fp32 Casts were removed.
    """
    from onnx import TensorProto

    def to(node: Any) -> int | None:
        return next((a.i for a in node.attribute if a.name == "to"), None) if node.op_type == "Cast" else None

    producer = {o: n for n in graph.node for o in n.output}
    graph_outputs = {o.name for o in graph.output}
    fp32_of: dict[str, str] = {}  # name of a round-tripped fp32 tensor -> the fp32 tensor before the trip
    dropped: set[int] = set()
    renamed: dict[str, str] = {}  # an fp32 tensor -> the graph output it now is (a trip just before an output)
    for node in graph.node:
        if node.name in original or to(node) != TensorProto.FLOAT:
            continue
        up = producer.get(node.input[0])
        if up is None or up.name in original or to(up) != TensorProto.FLOAT16:
            continue
        src = producer.get(up.input[0])
        # The tensor before the trip must be fp32: a graph input, or the output of a node computing in fp32.
        is_fp32 = any(i.name == up.input[0] and i.type.tensor_type.elem_type == TensorProto.FLOAT for i in graph.input)
        if not is_fp32 and src is not None:
            is_fp32 = src.name in original or to(src) == TensorProto.FLOAT
        if not is_fp32:
            continue
        if node.output[0] in graph_outputs:
            if src is None or up.input[0] in graph_outputs or up.input[0] in renamed:
                continue
            renamed[up.input[0]] = node.output[0]
        else:
            fp32_of[node.output[0]] = up.input[0]
        dropped.add(id(node))
    for node in graph.node:
        for i, name in enumerate(node.input):
            before = fp32_of[name] if name in fp32_of else name
            node.input[i] = renamed.get(before, before)
        for i, name in enumerate(node.output):
            node.output[i] = renamed.get(name, name)
    kept = [n for n in graph.node if id(n) not in dropped]
    used = {i for n in kept for i in n.input} | graph_outputs
    # A Cast to fp16 that nothing reads any more goes too.
    kept = [n for n in kept if n.name in original or to(n) != TensorProto.FLOAT16 or n.output[0] in used]
    del graph.node[:]
    graph.node.extend(kept)
    # value_info of tensors that no longer exist (renamed or dropped) would mislead shape inference.
    alive = {o for n in kept for o in n.output}
    stale = [v for v in graph.value_info if v.name not in alive]
    for v in stale:
        graph.value_info.remove(v)
    return len(dropped)


def fp16_from_onnx(src: Path, dst: Path, keep_fp32: Sequence[str] = (), calibration: Callable[[], Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """Convert weights and activations to fp16, keeping fp32 inputs and outputs.

    Args:
        src: the fp32 ONNX file.
        dst: where the fp16 file is written.
        keep_fp32: node names that stay fp32 (repair); explicit Casts surround each fp32 island.
        calibration: not read (fp16 needs no data).

    Raises:
        ValueError: a node to keep that the model does not have.
    """
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    source = named_nodes(onnx.load(str(src)))
    check_kept(source, keep_fp32)
    names = {n.name for n in source.graph.node}
    model = convert_float_to_float16(source, keep_io_types=True, node_block_list=list(keep_fp32) or None)
    if keep_fp32:
        fold_cast_round_trips(model.graph, names)
    topologically_sorted(model.graph)
    onnx.save(model, str(dst))
    details: dict[str, Any] = {"io_types": "float32", "weights": "float16"}
    if keep_fp32:
        details["kept_fp32"] = list(keep_fp32)
    return details


SPEC = register_precision(PrecisionSpec(
    name="fp16",
    title="Thresholds of the fp16 engine.",
    convert=fp16_from_onnx,
    # fp16 keeps ~3 decimal digits; NVIDIA's samples use 1e-2.
    tolerance={"atol": 1e-2, "rtol": 1e-2, "min_cosine": 0.9999, "min_top1_agreement": 0.99, "max_accuracy_drop": 0.01,
               "max_relative_rmse": 1e-2, "max_r2_drop": 0.01},
    element_type=FLOAT16,
    emulation=Emulation(elem_type=FLOAT16, label="fp16 emulated on CPU", max_finite=FP16_MAX),
))
