"""Backend lookup and the ``auto`` choice."""

from __future__ import annotations

import logging

from tasks.backends.base import EngineBuilder
from tasks.config import Backend
from tasks.errors import BackendUnavailableError

log = logging.getLogger(__name__)


def builder_for(name: Backend | str) -> EngineBuilder:
    """Return the builder of a concrete backend (imports nothing heavy)."""
    name = Backend(name)
    if name is Backend.onnxruntime:
        from tasks.backends.onnxruntime import OnnxRuntimeBuilder

        return OnnxRuntimeBuilder()
    if name is Backend.tensorrt:
        from tasks.backends.tensorrt import TensorRTBuilder

        return TensorRTBuilder()
    raise ValueError(f"'{name.value}' is not a concrete backend")


def choose_backend(requested: Backend | str) -> tuple[EngineBuilder, str]:
    """Resolve the requested backend into a builder that can run here.

    Args:
        requested: ``auto``, ``onnxruntime`` or ``tensorrt``.

    Returns:
        The builder, and a sentence saying why it was chosen (shown in the report).

    Raises:
        BackendUnavailableError: an explicitly requested backend cannot run here.
    """
    requested = Backend(requested)
    if requested is Backend.auto:
        trt = builder_for(Backend.tensorrt)
        why_not = trt.availability()
        if why_not is None:
            return trt, "auto: TensorRT, pycuda and a GPU are present"
        reason = f"auto: ONNX Runtime, because TensorRT cannot run here ({why_not})"
        log.info(reason)
        return builder_for(Backend.onnxruntime), reason
    builder = builder_for(requested)
    why_not = builder.availability()
    if why_not is not None:
        raise BackendUnavailableError(
            got=f"backend '{requested.value}'",
            expected="a backend that can run on this machine",
            because=why_not,
            fix="install what is missing, or pass --backend auto to fall back to ONNX Runtime",
        )
    return builder, f"{requested.value}: requested explicitly"
