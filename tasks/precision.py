"""Stage ``precision``: one ONNX file per precision, the files every backend builds from.

Precision lives in the graph itself (fp16 tensors, int8 Q/DQ pairs), which is what a strongly typed
TensorRT network consumes on TensorRT 10 and 11 alike, and what ONNX Runtime runs directly.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tasks.artifacts import ArtifactRef
from tasks.config import Precision
from tasks.stage import StageSpec, run_stage
from tasks.store import Store

log = logging.getLogger("trtflow.precision")

def _key_inputs(inputs: Mapping[str, Any]) -> Mapping[str, Any]:
    # Only int8 reads the data (calibration): fp32 and fp16 stay cached when the data changes.
    if Precision(inputs["precision"]) is Precision.int8:
        return inputs
    return {k: v for k, v in inputs.items() if k not in ("data", "calibration_samples")}


SPEC = StageSpec("precision", __name__, libraries=("onnx", "onnxruntime", "numpy"), key_inputs=_key_inputs)
ONNX_FILE = "model.onnx"


def topologically_sorted(graph: Any) -> None:
    """Sort a GraphProto's nodes in place so every node follows its producers.

    ``convert_float_to_float16`` appends its input/output Casts at the end of the node list, which
    ``onnx.checker`` rejects ("Nodes in a graph must be topologically sorted").
    """
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending = list(graph.node)
    ordered = []
    while pending:
        ready = [n for n in pending if all(i in available for i in n.input)]
        if not ready:
            names = [n.name for n in pending[:5]]
            raise ValueError(f"graph has a cycle or dangling inputs at nodes {names}")
        for n in ready:
            ordered.append(n)
            available.update(n.output)
        ready_ids = {id(n) for n in ready}
        pending = [n for n in pending if id(n) not in ready_ids]
    del graph.node[:]
    graph.node.extend(ordered)


def named_nodes(model: Any) -> Any:
    """Give every unnamed node of a model's main graph a stable, unique name (in place); returns the model.

    Repair keeps nodes in fp32 by name (``node_block_list``, ``nodes_to_exclude``), and the fp32
    graph it measures against must use the same names, so both sides call this.
    """
    seen = {n.name for n in model.graph.node if n.name}
    for i, node in enumerate(model.graph.node):
        if not node.name:
            name = f"{node.op_type}_{i}"
            while name in seen:
                name += "_"
            node.name = name
            seen.add(name)
    return model


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
            node.input[i] = renamed.get(fp32_of.get(name, name), fp32_of.get(name, name))
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


def fp16_from_onnx(src: Path, dst: Path, keep_fp32: Sequence[str] = ()) -> dict[str, Any]:
    """Convert weights and activations to fp16, keeping fp32 inputs and outputs.

    Args:
        src: the fp32 ONNX file.
        dst: where the fp16 file is written.
        keep_fp32: node names that stay fp32 (repair); explicit Casts surround each fp32 island.
    """
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    source = named_nodes(onnx.load(str(src)))
    names = {n.name for n in source.graph.node}
    if unknown := sorted(set(keep_fp32) - names):
        raise ValueError(f"got nodes {unknown} to keep in fp32, expected node names of the model; re-run the repair from a fresh ranking")
    model = convert_float_to_float16(source, keep_io_types=True, node_block_list=list(keep_fp32) or None)
    if keep_fp32:
        fold_cast_round_trips(model.graph, names)
    topologically_sorted(model.graph)
    onnx.save(model, str(dst))
    details: dict[str, Any] = {"io_types": "float32", "weights": "float16"}
    if keep_fp32:
        details["kept_fp32"] = list(keep_fp32)
    return details


class _Calibration:
    """Feeds calibration batches to ``quantize_static`` (its CalibrationDataReader protocol)."""

    def __init__(self, inputs: Mapping[str, np.ndarray], batch: int = 32) -> None:
        n = len(next(iter(inputs.values())))
        # One batch copied at a time, not all of them up front.
        self._batches = ({k: np.ascontiguousarray(v[i : i + batch]) for k, v in inputs.items()} for i in range(0, n, batch))

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


#: the operators whose inputs int8 quantizes (the compute-heavy ones, as TensorRT's own quantization
#: tools do): quantizing an elementwise op's constant operand (``x * 0.125``) gives an int8 initializer
#: that TensorRT's builder refuses ("Quantized constant ... is only allowed before DQ"), and
#: quantizing normalisation or residual arithmetic costs accuracy for no speed.
INT8_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def calibration_batch(inputs: Mapping[str, np.ndarray], limit: int = 32, budget: int = 256 << 20) -> int:
    """Rows per calibration run (``tasks.datasource.rows_for_memory``). MinMax ranges do not depend on it."""
    from tasks.datasource import rows_for_memory

    return rows_for_memory(sum(int(np.prod(v.shape[1:])) * v.dtype.itemsize for v in inputs.values()), limit, budget)


def int8_from_onnx(src: Path, dst: Path, calibration: np.ndarray | Mapping[str, np.ndarray], keep_fp32: Sequence[str] = ()) -> dict[str, Any]:
    """Static Q/DQ int8 quantization calibrated on real samples, in the form TensorRT parses.

    Symmetric per-channel int8 weights and activations, biases left in float: TensorRT's parser
    rejects the int32 biases that ``quantize_static`` makes by default. Only the inputs of
    ``INT8_OPS`` are quantized; integer inputs (ids, masks) pass through as they are.

    ``quantize_static`` writes ``<input>-inferred.onnx`` (and calibration files) beside its input, so
    it quantizes a private copy of ``src`` in a scratch folder beside ``dst``, removed afterwards:
    nothing is ever written next to ``src``, which may be a committed artifact.

    Args:
        src: the fp32 ONNX file.
        dst: where the int8 file is written.
        calibration: input name -> samples (a bare array feeds a one-input model).
        keep_fp32: node names left unquantized (repair; ``nodes_to_exclude``).
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    source = named_nodes(onnx.load(str(src)))
    if unknown := sorted(set(keep_fp32) - {n.name for n in source.graph.node}):
        raise ValueError(f"got nodes {unknown} to keep in fp32, expected node names of the model; re-run the repair from a fresh ranking")
    if not isinstance(calibration, Mapping):
        calibration = {source.graph.input[0].name: calibration}
    n = len(next(iter(calibration.values())))
    scratch = Path(tempfile.mkdtemp(prefix=".quantize-", dir=Path(dst).parent))
    # quantize_static logs "consider pre-processing" on the root logger at every call; that
    # pre-processing rewrites the graph TensorRT builds from, which we deliberately do not do.
    hint = _DropMessage("pre-process")
    logging.getLogger().addFilter(hint)
    try:
        private = scratch / "model.onnx"
        onnx.save(source, str(private))  # the copy with every node named (repair excludes nodes by name)
        quantize_static(
            str(private),
            str(dst),
            _Calibration(calibration, calibration_batch(calibration)),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            nodes_to_exclude=list(keep_fp32) or None,
            op_types_to_quantize=list(INT8_OPS),
            extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False},
        )
    finally:
        logging.getLogger().removeFilter(hint)
        shutil.rmtree(scratch, ignore_errors=True)
    details: dict[str, Any] = {"format": "QDQ", "weights": "int8 per-channel symmetric", "activations": "int8 symmetric",
                               "quantized_ops": list(INT8_OPS), "calibration_samples": int(n)}
    if keep_fp32:
        details["kept_fp32"] = list(keep_fp32)
    return details


class _DropMessage(logging.Filter):
    """Drops log records whose message contains a given text."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def variant_from_onnx(
    model: ArtifactRef,
    data: ArtifactRef,
    precision: Precision,
    calibration_samples: int,
    store: Store,
    refresh: bool = False,
    keep_fp32: list[str] | None = None,
) -> ArtifactRef:
    """Make the ONNX file of one precision from the exported fp32 file.

    Args:
        model: the ``export`` artifact.
        data: the ``data`` artifact (int8 calibrates on the first samples of its training split).
        precision: fp32 (a copy), fp16 or int8.
        calibration_samples: how many training samples calibrate int8.
        store: the artifact store.
        refresh: recompute even if an intact artifact exists.
        keep_fp32: node names kept in fp32 in an fp16 or int8 variant (what a repair chose).

    Returns:
        The ``precision`` artifact with ``model.onnx``.
    """
    precision = Precision(precision)
    keep = list(keep_fp32 or [])

    def make(out: Path) -> dict[str, Any]:
        src, dst = model.path(ONNX_FILE), out / ONNX_FILE
        if precision is Precision.fp32:
            shutil.copyfile(src, dst)
            details: dict[str, Any] = {"weights": "float32"}
        elif precision is Precision.fp16:
            details = fp16_from_onnx(src, dst, keep)
        else:
            from tasks.data import split_inputs

            details = int8_from_onnx(src, dst, split_inputs(data, "train", slice(0, calibration_samples)), keep)
        log.info("precision: %s variant written (%s)", precision.value, details)
        return {**model.meta, "precision": precision.value, "conversion": details, "source_digest": model.digest}

    inputs: dict[str, Any] = {"model": model, "data": data, "precision": precision, "calibration_samples": calibration_samples}
    if keep:
        inputs["keep_fp32"] = keep  # absent otherwise: the plain variants keep their keys
    return run_stage(SPEC, inputs, store, refresh, make)
