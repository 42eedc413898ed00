"""Stage ``precision``: one ONNX file per precision, the files every backend builds from.

Precision lives in the graph itself (fp16 tensors, int8 Q/DQ pairs), which is what a strongly typed
TensorRT network consumes on TensorRT 10 and 11 alike, and what ONNX Runtime runs directly.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from tasks.artifacts import ArtifactRef
from tasks.config import Precision
from tasks.stage import StageSpec, run_stage

log = logging.getLogger("trtflow.precision")

def _key_inputs(inputs: Mapping[str, Any]) -> Mapping[str, Any]:
    # Only int8 reads the data (calibration): fp32 and fp16 stay cached when the data changes.
    if Precision(inputs["precision"]) is Precision.int8:
        return inputs
    return {k: v for k, v in inputs.items() if k not in ("data", "calibration_samples")}


SPEC = StageSpec("precision", modules=("precision.py",), libraries=("onnx", "onnxruntime", "numpy"), key_inputs=_key_inputs)
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


def fp16_from_onnx(src: Path, dst: Path) -> dict[str, Any]:
    """Convert weights and activations to fp16, keeping fp32 inputs and outputs."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    topologically_sorted(model.graph)
    onnx.save(model, str(dst))
    return {"io_types": "float32", "weights": "float16"}


class _Calibration:
    """Feeds calibration batches to ``quantize_static`` (its CalibrationDataReader protocol)."""

    def __init__(self, input_name: str, x: np.ndarray, batch: int = 32) -> None:
        self._batches = iter([{input_name: x[i : i + batch]} for i in range(0, len(x), batch)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def int8_from_onnx(src: Path, dst: Path, calibration: np.ndarray) -> dict[str, Any]:
    """Static Q/DQ int8 quantization calibrated on real samples, in the form TensorRT parses.

    Symmetric per-channel int8 weights and activations, biases left in float: TensorRT's parser
    rejects the int32 biases that ``quantize_static`` makes by default.

    ``quantize_static`` writes ``<input>-inferred.onnx`` (and calibration files) beside its input, so
    it quantizes a private copy of ``src`` in a scratch folder beside ``dst``, removed afterwards:
    nothing is ever written next to ``src``, which may be a committed artifact.
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    name = onnx.load(str(src), load_external_data=False).graph.input[0].name
    scratch = Path(tempfile.mkdtemp(prefix=".quantize-", dir=Path(dst).parent))
    # quantize_static logs "consider pre-processing" on the root logger at every call; that
    # pre-processing rewrites the graph TensorRT builds from, which we deliberately do not do.
    hint = _DropMessage("pre-process")
    logging.getLogger().addFilter(hint)
    try:
        private = scratch / "model.onnx"
        shutil.copyfile(src, private)
        quantize_static(
            str(private),
            str(dst),
            _Calibration(name, calibration),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False},
        )
    finally:
        logging.getLogger().removeFilter(hint)
        shutil.rmtree(scratch, ignore_errors=True)
    return {"format": "QDQ", "weights": "int8 per-channel symmetric", "activations": "int8 symmetric", "calibration_samples": int(len(calibration))}


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
    artifacts_dir: Path,
    refresh: bool = False,
) -> ArtifactRef:
    """Make the ONNX file of one precision from the exported fp32 file.

    Args:
        model: the ``export`` artifact.
        data: the ``data`` artifact (int8 calibrates on the first samples of its training split).
        precision: fp32 (a copy), fp16 or int8.
        calibration_samples: how many training samples calibrate int8.
        artifacts_dir: root of the artifact store.
        refresh: recompute even if an intact artifact exists.

    Returns:
        The ``precision`` artifact with ``model.onnx``.
    """
    precision = Precision(precision)

    def make(out: Path) -> dict[str, Any]:
        src, dst = model.path(ONNX_FILE), out / ONNX_FILE
        if precision is Precision.fp32:
            shutil.copyfile(src, dst)
            details: dict[str, Any] = {"weights": "float32"}
        elif precision is Precision.fp16:
            details = fp16_from_onnx(src, dst)
        else:
            from tasks.data import load_splits

            details = int8_from_onnx(src, dst, load_splits(data)["x_train"][:calibration_samples])
        log.info("precision: %s variant written (%s)", precision.value, details)
        return {**model.meta, "precision": precision.value, "conversion": details, "source_digest": model.digest}

    inputs = {"model": model, "data": data, "precision": precision, "calibration_samples": calibration_samples}
    return run_stage(SPEC, inputs, artifacts_dir, refresh, make)
