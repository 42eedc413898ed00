"""The backends a run can use, by name, with their capabilities; and the ``auto`` choice.

A backend is one ``BackendSpec`` (``tasks.backends.base``) registered here. The built-in ones declare
theirs in their own module (``BACKEND``); a new backend is one module that declares its spec and calls
``register_backend(spec)`` before the run. Stages ask a spec's capabilities (``backend_spec(name)``)
and never compare names.

    from tasks.backends.registry import backend_spec, backends
    [(s.name, s.device, sorted(s.native_precisions)) for s in backends()]
    backend_spec("onnxruntime").runs_natively("fp16")   # False: verified through the fp16 emulation
"""

from __future__ import annotations

import logging

from tasks.backends import onnxruntime, tensorrt
from tasks.backends.base import BackendSpec, EngineBuilder
from tasks.errors import BackendUnavailableError

log = logging.getLogger(__name__)

#: the name that asks for the first backend that can run here (``BackendSpec.auto`` order)
AUTO = "auto"

_REGISTRY: dict[str, BackendSpec] = {}


def register_backend(spec: BackendSpec, replace: bool = False) -> BackendSpec:
    """Make a backend available under ``spec.name`` (to ``--backend``, ``auto`` and every stage).

    Args:
        spec: the backend's capabilities and builder.
        replace: allow a spec of the same name to replace the registered one.

    Returns:
        ``spec``.

    Raises:
        ValueError: the name is taken (and ``replace`` is false) or is ``auto``.
    """
    if spec.name == AUTO:
        raise ValueError("'auto' is the choice among backends, not a backend's name")
    if spec.name in _REGISTRY and not replace and _REGISTRY[spec.name] != spec:
        raise ValueError(f"a backend named '{spec.name}' is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def unregister_backend(name: str) -> None:
    """Remove a registered backend (a test's, or a plug-in's being replaced); unknown names are ignored."""
    _REGISTRY.pop(name, None)


def backends() -> list[BackendSpec]:
    """Every registered backend, in registration order."""
    return list(_REGISTRY.values())


def _name(name: object) -> str:
    # config.Backend members and plain names alike
    return str(getattr(name, "value", name))


def backend_spec(name: object) -> BackendSpec:
    """The capabilities of a registered backend.

    Raises:
        BackendUnavailableError: no backend of that name is registered (``auto`` is resolved first,
            by ``choose_backend``).
    """
    key = _name(name)
    spec = _REGISTRY.get(key)
    if spec is None:
        raise BackendUnavailableError(
            got=f"backend '{key}'",
            expected=f"one of {', '.join([AUTO, *_REGISTRY])}",
            because="no backend of that name is registered" + (" ('auto' is resolved to one first)" if key == AUTO else ""),
            fix="pass --backend auto, or import the module that registers that backend before the run",
        )
    return spec


def builder_for(name: object) -> EngineBuilder:
    """Return the builder of a registered backend (its module imports nothing heavy).

    Raises:
        BackendUnavailableError: no backend of that name is registered.
        ValueError: the spec's builder calls itself by another name (engines would be recorded under it).
    """
    spec = backend_spec(name)
    builder = spec.builder()
    if builder.name != spec.name:
        raise ValueError(f"backend '{spec.name}': its builder calls itself '{builder.name}'")
    return builder


def choose_backend(requested: object) -> tuple[EngineBuilder, str]:
    """Resolve the requested backend into a builder that can run here.

    Args:
        requested: ``auto`` or a registered backend's name.

    Returns:
        The builder, and a sentence saying why it was chosen (shown in the report).

    Raises:
        BackendUnavailableError: an explicitly requested backend cannot run here, or none that
            ``auto`` tries can, or the name is not registered.
    """
    name = _name(requested)
    candidates = sorted((s for s in _REGISTRY.values() if s.auto is not None), key=lambda s: s.auto or 0)
    if name == AUTO:
        skipped: list[str] = []
        for spec in candidates:
            builder = builder_for(spec.name)
            why_not = builder.availability()
            if why_not is None:
                if not skipped:
                    return builder, f"auto: {spec.present or (spec.label or spec.name) + ' can run here'}"
                reason = f"auto: {spec.label or spec.name}, because {'; '.join(skipped)}"
                log.info(reason)
                return builder, reason
            skipped.append(f"{spec.label or spec.name} cannot run here ({why_not})")
        raise BackendUnavailableError(
            got="--backend auto",
            expected=f"one of {', '.join(s.name for s in candidates)} able to run here",
            because="; ".join(skipped) or "no registered backend is chosen by auto",
            fix="install one of them",
        )
    builder = builder_for(name)
    why_not = builder.availability()
    if why_not is not None:
        fallback = candidates[-1] if candidates else None
        raise BackendUnavailableError(
            got=f"backend '{name}'",
            expected="a backend that can run on this machine",
            because=why_not,
            fix="install what is missing" + (f", or pass --backend auto to fall back to {fallback.label or fallback.name}" if fallback else ""),
        )
    return builder, f"{name}: requested explicitly"


register_backend(tensorrt.BACKEND)
register_backend(onnxruntime.BACKEND)
