"""The stage skeleton: cache key, lock, lookup, staging and commit, written once.

A key covers the digests of the upstream artifacts *as found on disk*, the stage's own parameters, the
source code of the modules that compute it, the versions of the libraries that change its results, and
any environment that does (thread count, backend, device). It is computed without importing torch, so a
fully cached run stays cheap.

``run_stage`` is the only cache there is: every stage function hands it its inputs and a ``make``
callback that writes the stage's files into a private staging folder and returns the manifest's
metadata. Upstream artifacts are checked against their files before the key is computed, so an
artifact replaced on disk (with or without a matching manifest) changes the keys of everything
downstream instead of being trusted from a record. Prefect's task wrappers (``tasks.caching``) add
retries and the "Cached" state name on top; they keep no cache of their own.
"""

from __future__ import annotations

import contextvars
import enum
import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from tasks.artifacts import ArtifactRef, load_ref, sha256_json, staging
from tasks.locking import key_lock

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


#: set by ``run_stage``: whether the latest call in this context found its artifact (see ``was_cached``)
_HIT: contextvars.ContextVar[bool] = contextvars.ContextVar("trtflow_stage_hit", default=False)


def was_cached() -> bool:
    """True when the latest ``run_stage`` call in this context reused an intact artifact."""
    return _HIT.get()


def checked_inputs(inputs: Mapping[str, Any]) -> None:
    """Check every upstream artifact among ``inputs`` (and in mappings among them) against its files on disk.

    Raises:
        ArtifactError: an upstream file is missing or differs from the digest its artifact records
            (the upstream stage must run again; the message says so).
    """
    for value in inputs.values():
        if isinstance(value, ArtifactRef):
            value.verify()
        elif isinstance(value, Mapping):
            checked_inputs(value)  # a gather stage's {precision: artifact}


def run_stage(
    spec: StageSpec,
    inputs: Mapping[str, Any],
    artifacts_dir: Path,
    refresh: bool,
    make: Callable[[Path], dict[str, Any]],
) -> ArtifactRef:
    """Return the stage's artifact for ``inputs``: the intact one in the store, or a new one.

    Args:
        spec: the stage's name and what its key depends on.
        inputs: the stage function's arguments that define its output (artifacts, parameters).
        artifacts_dir: root of the artifact store.
        refresh: make the artifact again even if an intact one exists.
        make: writes the stage's files into the folder it is given and returns the manifest metadata;
            called only on a miss, under the key's lock.

    Returns:
        The committed (or found) artifact.

    Raises:
        ArtifactError: an upstream artifact's files changed since it was written.
        StorageError: the disk filled up while ``make`` wrote.
    """
    checked_inputs(inputs)
    key = stage_key(spec, inputs)
    root = Path(artifacts_dir)
    with key_lock(root, spec.name, key):
        # Looked up under the lock: another process may have committed it while this one waited.
        if not refresh and (ref := load_ref(root, spec.name, key)) is not None and not ref.problems():
            _HIT.set(True)
            return ref
        with staging(root, spec.name, key) as st:
            ref = st.commit(make(st.dir))
    # Set last: ``make`` may run other stages (profile measures PyTorch) that set it themselves.
    _HIT.set(False)
    return ref
