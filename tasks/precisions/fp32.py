"""fp32: the exported file itself, copied; the reference every reduced precision is measured against."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tasks.precisions.base import PrecisionSpec, register_precision

FLOAT = 1  # onnx.TensorProto.FLOAT (onnx is not imported to register a precision)


def fp32_copy(src: Path, dst: Path, keep_fp32: Sequence[str] = (), calibration: Callable[[], Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """Copy the fp32 export unchanged (every node is fp32 already: ``keep_fp32`` changes nothing)."""
    shutil.copyfile(src, dst)
    return {"weights": "float32"}


SPEC = register_precision(PrecisionSpec(
    name="fp32",
    title="Thresholds of the fp32 engine.",
    convert=fp32_copy,
    # ORT vs eager differs by <= 5e-6 on the seed CNN; 1e-4 leaves room for other CPUs/GPUs (TF32).
    tolerance={"atol": 1e-4, "rtol": 1e-3, "min_cosine": 0.99999, "min_top1_agreement": 0.999, "max_accuracy_drop": 0.002,
               "max_relative_rmse": 1e-4, "max_r2_drop": 0.002},
    reduced=False,
    element_type=FLOAT,
))
