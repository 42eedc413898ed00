"""Stage ``precision``: one ONNX file per precision, the files every backend builds from.

Precision lives in the graph itself (fp16 tensors, int8 Q/DQ pairs), which is what a strongly typed
TensorRT network consumes on TensorRT 10 and 11 alike, and what ONNX Runtime runs directly. How each
variant is made is its registry entry's ``convert`` (``tasks.precisions``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tasks.artifacts import ArtifactRef
from tasks.config import Precision
from tasks.precisions import precision_spec
from tasks.stage import StageSpec, run_stage
from tasks.store import Store

log = logging.getLogger("trtflow.precision")

def _key_inputs(inputs: Mapping[str, Any]) -> Mapping[str, Any]:
    # Only a precision that reads the data (int8 calibration) keys on it: the others stay cached when it changes.
    if precision_spec(inputs["precision"]).reads_data:
        return inputs
    return {k: v for k, v in inputs.items() if k not in ("data", "calibration_samples")}


SPEC = StageSpec("precision", __name__, libraries=("onnx", "onnxruntime", "numpy"), key_inputs=_key_inputs)
ONNX_FILE = "model.onnx"


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
        data: the ``data`` artifact (a precision that reads data, int8, calibrates on the first
            samples of its training split).
        precision: a registered precision (``tasks.precisions``).
        calibration_samples: how many training samples calibrate it.
        store: the artifact store.
        refresh: recompute even if an intact artifact exists.
        keep_fp32: node names kept in fp32 in a reduced variant (what a repair chose).

    Returns:
        The ``precision`` artifact with ``model.onnx``.

    Raises:
        ConfigError: the precision has no registry entry.
    """
    precision = Precision(precision)
    spec = precision_spec(precision)
    keep = list(keep_fp32 or [])

    def calibration() -> Mapping[str, Any]:
        from tasks.data import split_inputs

        return split_inputs(data, "train", slice(0, calibration_samples))

    def make(out: Path) -> dict[str, Any]:
        details = spec.convert(model.path(ONNX_FILE), out / ONNX_FILE, keep, calibration)
        log.info("precision: %s variant written (%s)", precision.value, details)
        return {**model.meta, "precision": precision.value, "conversion": details, "source_digest": model.digest}

    inputs: dict[str, Any] = {"model": model, "data": data, "precision": precision, "calibration_samples": calibration_samples}
    if keep:
        inputs["keep_fp32"] = keep  # absent otherwise: the plain variants keep their keys
    return run_stage(SPEC, inputs, store, refresh, make)
