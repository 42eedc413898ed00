"""Cache keys of stages: what a stage's output depends on, as one digest.

A key covers the digests of the upstream artifacts, the stage's own parameters, the source code of the
modules that compute it, the versions of the libraries that change its results, and any environment
that does (thread count, backend, device). It is computed without importing torch, so a fully cached run
stays cheap. Stage functions call ``stage_key`` themselves (their output folder is named by it) and the
Prefect cache policy calls the same function, so both always agree.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from tasks.artifacts import ArtifactRef, sha256_json

_ROOT = Path(__file__).resolve().parent

#: inputs that say where or how, not what: they never enter a key
NOT_IN_KEY = frozenset({"artifacts_dir", "refresh"})


@dataclass(frozen=True)
class StageSpec:
    """What a stage's key depends on besides its inputs.

    Attributes:
        name: stage name, also the artifact sub-folder.
        modules: source files (relative to ``tasks/``) whose content is the stage's code version.
        libraries: distributions whose versions change the stage's results.
        environment: extra environment computed from the inputs (e.g. the backend's device).
        key_inputs: picks (or derives) the inputs that matter, e.g. a file's digest instead of its path.
    """

    name: str
    modules: tuple[str, ...]
    libraries: tuple[str, ...] = ()
    environment: Callable[[Mapping[str, Any]], dict[str, str]] | None = field(default=None, compare=False)
    key_inputs: Callable[[Mapping[str, Any]], Mapping[str, Any]] | None = field(default=None, compare=False)


@lru_cache(maxsize=None)
def _file_digest(rel: str) -> str:
    path = _ROOT / rel
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "absent"


@lru_cache(maxsize=None)
def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "absent"


def canonical(value: Any) -> Any:
    """Turn an input into plain JSON for hashing: artifacts become their content digest."""
    if isinstance(value, ArtifactRef):
        return {"artifact": value.stage, "digest": value.digest}
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Mapping):
        return {str(canonical(k)): canonical(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [canonical(v) for v in value]
    return value


def stage_key(spec: StageSpec, inputs: Mapping[str, Any]) -> str:
    """Return the cache key of a stage for the given inputs.

    Args:
        spec: the stage's code and library dependencies.
        inputs: the stage function's arguments by name.

    Returns:
        A hex SHA-256.
    """
    relevant = {k: v for k, v in inputs.items() if k not in NOT_IN_KEY}
    if spec.key_inputs is not None:
        relevant = dict(spec.key_inputs(relevant))
    return sha256_json(
        {
            "stage": spec.name,
            "code": {m: _file_digest(m) for m in spec.modules},
            "libraries": {d: _version(d) for d in spec.libraries},
            "environment": spec.environment(relevant) if spec.environment else {},
            "inputs": canonical(relevant),
        }
    )
