"""The artifact store: the one interface through which the pipeline reads and writes what it keeps.

Stages receive a ``Store``, never a folder. Every file the pipeline writes goes through it: stage
artifacts (``open`` -> ``Writer.commit``), and side files such as reports, run records and TensorRT
timing caches (``put`` / ``get`` / ``entries``). Implementations are registered by URL scheme (``register_store``)
and made by ``store_for``; a new one (object storage) is one module plus a registration.

Guarantees every implementation keeps (tests/stores/ checks them for each registered store):

- ``Writer.commit`` is atomic: a reader sees the whole artifact or none of it (the files first, the
  manifest last), and a commit that fails halfway leaves nothing that ``lookup`` returns.
- ``lookup`` returns only an artifact whose manifest names this stage and key; its files' digests are
  checked when they are read (``ArtifactRef.damage``), so a damaged artifact is recomputed, never used.
- ``lock`` excludes every other holder of the same stage key, in this process, on this machine, or on
  another machine sharing the store, and a holder that dies releases it (on expiry, for remote stores).
- ``ArtifactRef.path(name)`` is a local file (a remote store downloads it once into ``local``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from tasks.artifacts import ArtifactRef, remember_store


@runtime_checkable
class Writer(Protocol):
    """A private place a stage writes one artifact's files into (``dir``), committed once."""

    #: a local folder, empty at the start, private to this writer
    dir: Path

    def commit(self, meta: dict[str, Any], ingredients: dict[str, Any] | None = None) -> ArtifactRef:
        """Publish the files in ``dir`` with their digests and ``meta``; return the artifact.

        When another writer committed an intact artifact of the same key meanwhile, that one is kept
        and returned (a reader may be using it).
        """
        ...


@runtime_checkable
class Store(Protocol):
    """Where artifacts and side files live (a local folder, a bucket)."""

    #: what the user passed (``artifacts``, ``s3://bucket/prefix``), shown in messages
    url: str
    #: the local folder of this run: its reports, and the read cache of a remote store
    local: Path

    def ready(self) -> None:
        """Prove, before any work, that a run can keep its artifacts and reports here (one cheap probe).

        Raises:
            ConfigError: the local folder (or the store's own folder) cannot be created or written.
            StorageError: the store cannot be reached (a missing bucket, refused credentials).
        """
        ...

    def lookup(self, stage: str, key: str) -> ArtifactRef | None:
        """The committed artifact of a stage key, or None (absent, or its manifest unreadable)."""
        ...

    def open(self, stage: str, key: str) -> contextlib.AbstractContextManager[Writer]:
        """A writer for a new artifact of a stage key; discarded unless committed inside the block.

        Raises:
            StorageError: the store cannot be written (full, read-only, a file in the way).
        """
        ...

    def lock(self, stage: str, key: str) -> contextlib.AbstractContextManager[None]:
        """Hold the exclusive lock of one stage key; wait while another holder has it."""
        ...

    def list(self, stage: str) -> list[ArtifactRef]:
        """Every committed artifact of a stage."""
        ...

    def fetch(self, ref: ArtifactRef, name: str) -> Path:
        """The local path of one file of an artifact (a remote store downloads it once, digest-checked).

        Raises:
            ArtifactError: the file is not the artifact's, or its content is not what the manifest says.
        """
        ...

    def put(self, name: str, data: bytes, keep_local: bool = False) -> None:
        """Write a side file (``reports/run-….json``, ``train/.last-train.json``), replacing it atomically.

        ``keep_local``: also a copy in ``local`` where the store keeps its side files elsewhere (a bucket,
        another folder): the run's reports, found where the user runs trtflow.
        """
        ...

    def get(self, name: str) -> bytes | None:
        """Read a side file, or None when there is none."""
        ...

    def where(self, name: str) -> str:
        """Where a side file is, as its user finds it (a local path, ``s3://bucket/prefix/name``), for messages."""
        ...

    def entries(self, folder: str) -> list[str]:
        """The names of the side files directly in ``folder`` (``train`` -> ``[".last-train.json", …]``)."""
        ...


#: URL scheme -> factory(url, local folder); "" is a plain path
_STORES: dict[str, Callable[[str, Path], Store]] = {}


def register_store(scheme: str, factory: Callable[[str, Path], Store]) -> None:
    """Make ``store_for`` build stores of one URL scheme (``s3``) with ``factory(url, local)``."""
    _STORES[scheme] = factory


def schemes() -> list[str]:
    """The registered URL schemes ("" is a local path)."""
    _load_builtin()
    return sorted(_STORES)


def store_for(url: str | Path | None, local: Path) -> Store:
    """Return the store at ``url`` (None or a path: the local store in ``local``).

    Args:
        url: ``s3://bucket/prefix`` or another registered scheme; None or a plain path for a folder.
        local: the local folder (``--artifacts-dir``): the local store itself, or a remote one's read cache.

    Raises:
        ConfigError: a URL whose scheme no store is registered for.
    """
    _load_builtin()
    text = "" if url is None else str(url)
    scheme = text.split("://", 1)[0].lower() if "://" in text else ""
    if scheme not in _STORES:
        from tasks.errors import ConfigError

        raise ConfigError(
            got=f"store {text!r}",
            expected="a folder or one of " + ", ".join(f"{s}://" for s in sorted(_STORES) if s),
            because=f"no store is registered for '{scheme}://'",
            fix="pass --store s3://BUCKET/PREFIX, or leave --store out to keep artifacts in --artifacts-dir",
        )
    store = _STORES[scheme](text, Path(local))
    remember_store(text, store)  # ``ArtifactRef.path`` fetches through it (``tasks.artifacts.opened_store``)
    return store


def as_store(store: Store | str | os.PathLike[str]) -> Store:
    """A store as given; a folder is the local store in it (for callers outside the flow: scripts, tests).

    Args:
        store: a store (``store_for``), or a local folder.
    """
    if isinstance(store, (str, os.PathLike)):
        return store_for(None, Path(store))
    return store


def _load_builtin() -> None:
    # The built-in stores are registered here, imported when first asked for (not at the top): this
    # interface module stays free of their dependencies, and they import nothing above them.
    if "" in _STORES:
        return
    from tasks.stores import local

    register_store("", local.make)
    register_store("file", local.make)
    with contextlib.suppress(ImportError):
        from tasks.stores import s3

        register_store("s3", s3.make)
