"""int8: static Q/DQ quantization calibrated on training samples, in the form TensorRT parses.

ONNX Runtime runs the Q/DQ graph natively on a CPU (``tasks.backends.onnxruntime`` decides whether to
fuse it into int8 kernels), so no emulation is needed; repair keeps nodes in fp32 by excluding them
from quantization (``nodes_to_exclude``). The only precision that reads the data.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tasks.precisions.onnx_graph import check_kept, named_nodes
from tasks.precisions.base import PrecisionSpec, register_precision

#: the operators whose inputs int8 quantizes (the compute-heavy ones, as TensorRT's own quantization
#: tools do): quantizing an elementwise op's constant operand (``x * 0.125``) gives an int8 initializer
#: that TensorRT's builder refuses ("Quantized constant ... is only allowed before DQ"), and
#: quantizing normalisation or residual arithmetic costs accuracy for no speed.
INT8_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
#: ONNX Runtime compute operators that are int8 kernels whatever their neighbours
INT8_KERNELS = frozenset({"QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger", "MatMulIntegerToFloat", "QGemm", "QAttention", "DynamicQuantizeMatMul"})


class _Calibration:
    """Feeds calibration batches to ``quantize_static`` (its CalibrationDataReader protocol)."""

    def __init__(self, inputs: Mapping[str, np.ndarray], batch: int = 32) -> None:
        n = len(next(iter(inputs.values())))
        # One batch copied at a time, not all of them up front.
        self._batches = ({k: np.ascontiguousarray(v[i : i + batch]) for k, v in inputs.items()} for i in range(0, n, batch))

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def calibration_batch(inputs: Mapping[str, np.ndarray], limit: int = 32, budget: int = 256 << 20) -> int:
    """Rows per calibration run (``tasks.sizing.rows_for_memory``). MinMax ranges do not depend on it."""
    from tasks.sizing import rows_for_memory

    return rows_for_memory(sum(int(np.prod(v.shape[1:])) * v.dtype.itemsize for v in inputs.values()), limit, budget)


class _DropMessage(logging.Filter):
    """Drops log records whose message contains a given text."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


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

    Raises:
        ValueError: a node to keep that the model does not have.
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    source = named_nodes(onnx.load(str(src)))
    check_kept(source, keep_fp32)
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
        # Duck-typed CalibrationDataReader: subclassing it would import onnxruntime.quantization with this module.
        reader: Any = _Calibration(calibration, calibration_batch(calibration))
        quantize_static(
            str(private),
            str(dst),
            reader,
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


def _convert(src: Path, dst: Path, keep_fp32: Sequence[str], calibration: Callable[[], Mapping[str, Any]]) -> dict[str, Any]:
    return int8_from_onnx(src, dst, calibration(), keep_fp32)


SPEC = register_precision(PrecisionSpec(
    name="int8",
    title="Thresholds of the int8 engine (judged by task metrics).",
    convert=_convert,
    # Elementwise error says little for int8: judge by the task metric on real data.
    # Regression outputs under int8: within 10% of the outputs' spread, and R² within 0.02.
    tolerance={"atol": None, "rtol": None, "min_cosine": 0.99, "min_top1_agreement": 0.97, "max_accuracy_drop": 0.02,
               "max_relative_rmse": 0.1, "max_r2_drop": 0.02},
    reads_data=True,
    dequantized=True,
    kernels=INT8_KERNELS,
))
