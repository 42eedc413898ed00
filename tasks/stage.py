"""The stage skeleton: cache key, lock, lookup, staging and commit, written once.

A key is the digest of the stage's *ingredients* (``key_ingredients``): the digests of the upstream
artifacts *as found on disk*, the stage's own parameters, the source code it runs, the versions of the
libraries that change its results, and any environment that does (thread count, backend, device). The
code is derived, never listed: trtflow's modules are the stage module's import closure and the user's
model code is found from the factory's imports (``tasks.code_digests``). Keys are computed without
importing torch, so a fully cached run stays cheap.

``run_stage`` is the only cache there is: every stage function hands it its inputs and a ``make``
callback that writes the stage's files into a private staging folder and returns the manifest's
metadata. Upstream artifacts are checked against their files before the key is computed, so an
artifact replaced on disk (with or without a matching manifest) changes the keys of everything
downstream instead of being trusted from a record. Prefect's task wrappers (``tasks.caching``) add
retries and the "Cached" state name on top; they keep no cache of their own.

When a stage runs again although it ran before (a miss), one log line says why, like Bazel's
``--explain``: ``train: usernet.py changed``, ``data: d.npz changed``, ``verify-fp32: tolerance changed
(atol 1e-05 -> 0.001)``, ``export: damaged model.onnx (digest mismatch), recomputing``. The ingredients of
every committed artifact are in its manifest, and the latest ones of each stage instance in
the store's side file ``<stage>/.last-<instance>.json``, which is what the new ingredients are compared with.
"""

from __future__ import annotations

import contextlib
import contextvars
import enum
import json
import logging
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from tasks.artifacts import MANIFEST, ArtifactRef, sha256_json
from tasks.code_digests import project_code, user_code
from tasks.config import TrainConfig
from tasks.errors import StorageError
from tasks.store import Store, as_store

log = logging.getLogger("trtflow.stage")

#: inputs that say where or how, not what: they never enter a key
NOT_IN_KEY = frozenset({"store", "refresh"})
#: the stage whose artifacts are checkpoints: a stage taking one runs the model's code
CHECKPOINT_STAGE = "train"


@dataclass(frozen=True)
class StageSpec:
    """What a stage's key depends on besides its inputs.

    Attributes:
        name: stage name, also the artifact sub-folder.
        module: the module that computes the stage (``__name__`` where the spec is declared); its
            import closure of trtflow modules is the stage's code version. None: no code (tests).
        libraries: distributions whose versions change the stage's results.
        environment: extra environment computed from the inputs (e.g. the backend's device).
        key_inputs: picks (or derives) the inputs that matter, e.g. a file's digest instead of its path.
    """

    name: str
    module: str | None = None
    libraries: tuple[str, ...] = ()
    environment: Callable[[Mapping[str, Any]], dict[str, str]] | None = field(default=None, compare=False)
    key_inputs: Callable[[Mapping[str, Any]], Mapping[str, Any]] | None = field(default=None, compare=False)


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


def factories_in(inputs: Mapping[str, Any]) -> list[str]:
    """The model factories (``pkg.mod:callable``) a stage with these inputs runs: the one a training
    config names, and the one a checkpoint (a ``train`` artifact) was made with."""
    out = []
    for value in inputs.values():
        if isinstance(value, TrainConfig):
            out.append(value.model)
        elif isinstance(value, ArtifactRef) and value.stage == CHECKPOINT_STAGE:
            model = (value.meta.get("config") or {}).get("model")
            if isinstance(model, str):
                out.append(model)
    return sorted(set(out))


def key_ingredients(spec: StageSpec, inputs: Mapping[str, Any]) -> dict[str, Any]:
    """Everything a stage's key is the digest of, as plain JSON (recorded in the manifest).

    Args:
        spec: the stage's module, libraries, environment and input selection.
        inputs: the stage function's arguments by name.

    Returns:
        ``stage``; ``code`` (trtflow file -> SHA-256: the stage module's import closure, and the trtflow
        modules the user's model imports); ``user_code`` (the model factory's source files -> SHA-256);
        ``libraries`` (distribution -> version: the stage's own and those the user's code imports);
        ``environment``; ``inputs`` (artifacts as their content digest).
    """
    relevant = {k: v for k, v in inputs.items() if k not in NOT_IN_KEY}
    if spec.key_inputs is not None:
        relevant = dict(spec.key_inputs(relevant))
    code = dict(project_code(spec.module)) if spec.module else {}
    libraries = {d: _version(d) for d in spec.libraries}
    users: dict[str, str] = {}
    for factory in factories_in(relevant):
        found = user_code(factory)
        code.update(found.project)
        users.update(found.files)
        libraries.update({k: v for k, v in found.libraries.items() if k not in libraries})
    return {
        "stage": spec.name,
        "code": dict(sorted(code.items())),
        "user_code": users,
        "libraries": libraries,
        "environment": spec.environment(relevant) if spec.environment else {},
        "inputs": canonical(relevant),
    }


def stage_key(spec: StageSpec, inputs: Mapping[str, Any]) -> str:
    """Return the cache key of a stage for the given inputs: the digest of its ``key_ingredients``.

    Args:
        spec: the stage's code and library dependencies.
        inputs: the stage function's arguments by name.

    Returns:
        A hex SHA-256.
    """
    return sha256_json(key_ingredients(spec, inputs))


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
    store: Store,
    refresh: bool,
    make: Callable[[Path], dict[str, Any]],
) -> ArtifactRef:
    """Return the stage's artifact for ``inputs``: the intact one in the store, or a new one.

    On a miss, one log line says why the stage runs again (``explain``): what changed since this stage
    instance's last commit, or the damaged file found at the lookup (a warning: healing is never silent).

    Args:
        spec: the stage's name and what its key depends on.
        inputs: the stage function's arguments that define its output (artifacts, parameters).
        store: the artifact store (a folder: the local store in it).
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
    ingredients = key_ingredients(spec, inputs)
    key = sha256_json(ingredients)
    store = as_store(store)
    with store.lock(spec.name, key):
        # Looked up under the lock: another process may have committed it while this one waited.
        found = None if refresh else store.lookup(spec.name, key)
        damage = found.damage() if found is not None else []
        if found is not None and not damage:
            _HIT.set(True)
            return found
        instance = _instance(spec, inputs)
        causes = explain(store, spec.name, instance, key, ingredients, refresh, found, damage)
        with store.open(spec.name, key) as writer:
            ref = writer.commit(make(writer.dir), ingredients)
        _remember(store, spec.name, instance, ref, ingredients, causes)
    # Set last: ``make`` may run other stages (profile measures PyTorch) that set it themselves.
    _HIT.set(False)
    return ref


# --- why a stage runs again ------------------------------------------------------------------------

#: the graph instance being run in this context (``verify-fp32``), set by the runners (``stage_instance``)
_INSTANCE: contextvars.ContextVar[str | None] = contextvars.ContextVar("trtflow_stage_instance", default=None)


@contextlib.contextmanager
def stage_instance(instance: str | None) -> Iterator[None]:
    """Name the graph instance (``train``, ``verify-fp32``) whose stage function runs in this block.

    Its ``run_stage`` calls keep their last ingredients under that name, so a later run of the same
    instance can say what changed. Without one, the stage name (and its ``precision`` input) is used.
    """
    token = _INSTANCE.set(instance)
    try:
        yield
    finally:
        _INSTANCE.reset(token)


def _instance(spec: StageSpec, inputs: Mapping[str, Any]) -> str:
    """The name a stage's last ingredients are kept under: its graph instance, or stage and precision."""
    current = _INSTANCE.get()
    if current is None:
        precision = inputs.get("precision")
        return spec.name if precision is None else f"{spec.name}-{getattr(precision, 'value', precision)}"
    if current == spec.name or current.startswith(spec.name + "-"):
        return current
    return f"{spec.name} in {current}"  # a stage another one runs (repair builds and verifies)


def _record_name(stage: str, instance: str) -> str:
    """The side file of a stage instance's last ingredients (``train/.last-train.json``)."""
    return f"{stage}/.last-{re.sub(r'[^A-Za-z0-9_.-]+', '_', instance)}.json"


def _read_json(store: Store, name: str) -> dict[str, Any] | None:
    try:
        value = json.loads(store.get(name) or b"null")
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _remember(store: Store, stage: str, instance: str, ref: ArtifactRef, ingredients: dict[str, Any], causes: list[str]) -> None:
    record = {"key": ref.key, "digest": ref.digest, "causes": causes, "ingredients": ingredients}
    try:
        store.put(_record_name(stage, instance), json.dumps(record, indent=2, default=str).encode())
    except (OSError, StorageError):
        pass  # only an explanation is lost


def _upstream_causes(store: Store, stage: str, digest: str) -> list[str] | None:
    """What made the upstream artifact with this digest, as its stage explained it then (None: unknown)."""
    try:
        records = [n for n in store.entries(stage) if n.startswith(".last-") and n.endswith(".json")]
    except (OSError, StorageError):
        return None
    for name in records:
        record = _read_json(store, f"{stage}/{name}")
        if record and record.get("digest") == digest and isinstance(record.get("causes"), list):
            return [str(c) for c in record["causes"]]
    return None


def explain(
    store: Store, stage: str, instance: str, key: str, ingredients: dict[str, Any], refresh: bool,
    found: ArtifactRef | None, damage: list[tuple[str, str]],
) -> list[str]:
    """Log, in one line, why a stage instance is computed although it may have run before.

    Nothing is logged the first time an instance runs in an artifacts folder. A changed upstream
    artifact is named with what changed it (``validate: model changed (after train: epochs changed
    (1 -> 2))``).

    Args:
        store: the artifact store (its ``.last-…`` records).
        stage: the stage name.
        instance: the stage instance (``verify-fp32``), as kept by ``run_stage``.
        key: the key being computed.
        ingredients: its ``key_ingredients``.
        refresh: the run asked for it (``--refresh``).
        found: the artifact found under ``key`` (damaged), or None.
        damage: what is wrong with ``found``'s files: (file, ``missing`` or ``digest mismatch``).

    Returns:
        The causes, for the stages downstream (``["train: usernet.py changed"]``); empty on a first run.
    """
    if refresh:
        log.info("%s: --refresh, recomputing", instance)
        return [f"{instance}: --refresh"]
    if damage:
        parts = [f"missing {name}" if why == "missing" else f"damaged {name} ({why})" for name, why in damage]
        log.warning("%s: %s, recomputing", instance, ", ".join(parts))
        return [f"{instance}: {', '.join(parts)}"]
    # Every store keeps a key's manifest at ``<stage>/<key[:16]>/manifest.json`` of its side-file names.
    if found is None and store.get(f"{stage}/{key[:16]}/{MANIFEST}") is not None:
        log.warning("%s: unreadable %s, recomputing", instance, MANIFEST)
        return [f"{instance}: unreadable {MANIFEST}"]
    record = _read_json(store, _record_name(stage, instance))
    if record is None:
        return []
    if record.get("key") == key:
        log.warning("%s: its artifact was deleted, recomputing", instance)
        return [f"{instance}: artifact deleted"]
    own, derived = changes(record.get("ingredients") or {}, ingredients, lambda s, d: _upstream_causes(store, s, d))
    # An upstream cause this stage shares (the same trtflow file changed for both) is said once.
    upstream = [c for c in dict.fromkeys(c for _, found_causes in derived for c in found_causes or []) if c.split(": ", 1)[-1] not in own]
    phrases = list(own)
    if derived:
        names = ", ".join(n for n, _ in derived)
        unknown = any(found_causes is None for _, found_causes in derived)
        phrases.append(f"{names} changed" + (f" (after {'; '.join(upstream[:3])})" if upstream else " (made by another run)" if unknown else ""))
    log.info("%s: %s", instance, "; ".join(phrases))
    return [*(f"{instance}: {p}" for p in own), *upstream][:8]


def _shown(value: Any, limit: int = 40) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _leaves(value: Any, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    if isinstance(value, Mapping) and value:
        out: dict[tuple[str, ...], Any] = {}
        for k, v in value.items():
            out.update(_leaves(v, (*prefix, str(k))))
        return out
    return {prefix: value}


def _file_changes(old: Mapping[str, str], new: Mapping[str, str]) -> list[tuple[str, str]]:
    out = []
    for name in sorted(set(old) | set(new)):
        if name not in old:
            out.append((name, "added"))
        elif name not in new:
            out.append((name, "removed"))
        elif old[name] != new[name]:
            out.append((name, "changed"))
    return out


def _input_change(name: str, old: Any, new: Any) -> list[str]:
    if old is None or new is None:
        return [f"{name} {'added' if old is None else 'removed'}"]
    if isinstance(old, Mapping) and isinstance(new, Mapping) and "file" in new and old.get("digest") != new.get("digest"):
        return [f"{new['file']} changed"]
    before, after = _leaves(old), _leaves(new)
    diffs = [(path, before.get(path), after.get(path)) for path in dict.fromkeys([*before, *after]) if before.get(path) != after.get(path)]
    if name == "cfg":  # a stage's own config section: its fields by name
        return [f"{'.'.join(p) or name} changed ({_shown(a)} -> {_shown(b)})" for p, a, b in diffs]
    detail = ", ".join(f"{'.'.join(p) + ' ' if p else ''}{_shown(a)} -> {_shown(b)}" for p, a, b in diffs[:3])
    return [f"{name} changed ({detail})"]


def changes(
    old: Mapping[str, Any], new: Mapping[str, Any], upstream: Callable[[str, str], list[str] | None] = lambda s, d: None,
) -> tuple[list[str], list[tuple[str, list[str] | None]]]:
    """What differs between two ``key_ingredients``, in words, the user's edits first.

    Args:
        old: the ingredients of the instance's last commit.
        new: the ingredients now.
        upstream: (stage, digest) -> what made that upstream artifact, to name a changed input's cause.

    Returns:
        The stage's own changes (``usernet.py changed``, ``d.npz changed``, ``epochs changed (1 -> 2)``,
        ``trtflow code changed (tasks/train.py)``, ``torch 2.5.0 -> 2.6.0``), and the upstream artifacts
        that changed with their causes (``("checkpoint", ["train: epochs changed (1 -> 2)"])``; None:
        unknown). At least one of the two is not empty.
    """
    own = [f"{f} {how}" for f, how in _file_changes(old.get("user_code") or {}, new.get("user_code") or {})]
    derived: list[tuple[str, list[str] | None]] = []
    old_in, new_in = old.get("inputs") or {}, new.get("inputs") or {}
    for name in dict.fromkeys([*new_in, *old_in]):
        before, after = old_in.get(name), new_in.get(name)
        if before == after:
            continue
        if isinstance(before, Mapping) and isinstance(after, Mapping) and "artifact" in after and before.get("digest") != after.get("digest"):
            derived.append((name, upstream(str(after["artifact"]), str(after["digest"]))))
        else:
            own += _input_change(name, before, after)
    code = [f for f, _ in _file_changes(old.get("code") or {}, new.get("code") or {})]
    if code:
        own.append(f"trtflow code changed ({', '.join(code[:3])}" + (f" and {len(code) - 3} more)" if len(code) > 3 else ")"))
    for kind in ("libraries", "environment"):
        before, after = old.get(kind) or {}, new.get(kind) or {}
        own += [f"{k} {before.get(k, 'absent')} -> {after.get(k, 'absent')}" for k in sorted(set(before) | set(after)) if before.get(k) != after.get(k)]
    if not own and not derived:
        own.append("its key changed")
    return own, derived
