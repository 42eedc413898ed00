"""The precision registry: one ``PrecisionSpec`` per precision, declaring what the pipeline needs of it.

Every module that treats precisions differently asks the registry instead of testing names: how the
precision's ONNX variant is made (``convert``), whether that reads the data (the cache key of the
``precision`` stage), its default tolerances, how a CPU checks it honestly (``emulation``,
``cpu_kernels``), which compute operators count as running in it (``element_type``, ``dequantized``,
``kernels``: the compute-share gate and repair's ranking), and whether repair may keep nodes of it
in fp32 (``reduced``). A new precision is one module in this package that calls
``register_precision``, plus its import in ``tasks/precisions/__init__.py`` and its
``tasks.config.Precision`` member; an unknown precision fails with a ``ConfigError``.

    from tasks.precisions import precision_spec
    spec = precision_spec("fp16")
    spec.emulation.label          # 'fp16 emulated on CPU'
    spec.tolerance["atol"]        # 0.01
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasks.errors import ConfigError

#: convert(src, dst, keep_fp32, calibration) -> details: writes the variant of the fp32 file ``src`` at
#: ``dst``, keeping the named nodes in fp32; ``calibration()`` loads input name -> training samples
#: (called only by a precision that reads data); returns what the conversion did (the artifact's meta).
Convert = Callable[[Path, Path, Sequence[str], Callable[[], Mapping[str, Any]]], dict[str, Any]]


@dataclass(frozen=True)
class Emulation:
    """How a machine whose arithmetic is fp32 checks a reduced float precision honestly.

    The emulation graph (``tasks.emulation``) computes in fp32 and rounds every tensor the variant
    types ``elem_type`` through ``elem_type`` after the node that writes it (weights included).

    Attributes:
        elem_type: the ONNX element type (``onnx.TensorProto``) of the variant's reduced tensors.
        label: what reports call the numerics verified this way, e.g. 'fp16 emulated on CPU'.
        max_finite: the largest finite value of the type; repair treats a tensor near it as overflowing.
    """

    elem_type: int
    label: str
    max_finite: float


@dataclass(frozen=True)
class PrecisionSpec:
    """What one precision is, as every stage needs to know it.

    Attributes:
        name: the ``tasks.config.Precision`` value ('fp16').
        title: the description of its tolerances in the config form.
        convert: makes its ONNX variant from the fp32 export (see ``Convert``).
        tolerance: its default ``tasks.config.Tolerance`` fields.
        reads_data: ``convert`` reads training samples (int8 calibration): the data is part of its key.
        reduced: a reduced precision (not fp32): gated on its compute share, repairable by keeping
            nodes in fp32.
        element_type: the ONNX element type of its float tensors (FLOAT16 for fp16); None when its
            compute is told by Q/DQ instead.
        dequantized: a compute operator whose data inputs come from DequantizeLinear runs in it.
        kernels: ONNX Runtime operators that compute in it whatever their inputs (QLinearConv...).
        emulation: how a backend without native kernels for it checks it (None: it needs none).
        cpu_kernels: ONNX Runtime's CPU provider loads and runs the variant as it is; when False the
            CPU runs (validates, builds) the emulation graph in its place.
    """

    name: str
    title: str
    convert: Convert
    tolerance: Mapping[str, float | None]
    reads_data: bool = False
    reduced: bool = True
    element_type: int | None = None
    dequantized: bool = False
    kernels: frozenset[str] = field(default_factory=frozenset)
    emulation: Emulation | None = None
    cpu_kernels: bool = True


_REGISTRY: dict[str, PrecisionSpec] = {}


def register_precision(spec: PrecisionSpec) -> PrecisionSpec:
    """Add a precision to the registry; returns it.

    Raises:
        ValueError: a precision of that name is registered already.
    """
    if spec.name in _REGISTRY:
        raise ValueError(f"got a second precision named '{spec.name}', expected one entry per precision; rename one of them")
    _REGISTRY[spec.name] = spec
    return spec


def registered() -> list[PrecisionSpec]:
    """Every registered precision, in registration order."""
    return list(_REGISTRY.values())


def precision_spec(precision: Any) -> PrecisionSpec:
    """The registry entry of a precision (a ``Precision`` member or its name).

    Raises:
        ConfigError: no precision of that name is registered.
    """
    name = str(getattr(precision, "value", precision))
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(_REGISTRY)
        raise ConfigError(
            got=f"precision '{name}'",
            expected=f"one of {known}",
            because="a precision exists only as an entry of the precision registry (tasks/precisions): its variant, tolerances and CPU check",
            fix=f"use one of {known}, or register a PrecisionSpec for '{name}' in tasks/precisions",
        ) from None
