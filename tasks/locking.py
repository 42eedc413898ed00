"""Per-key locks: two processes computing the same artifact do the work once.

Atomic renames already keep concurrent runs from tearing each other's files; the lock keeps them from
doing the same (expensive) work twice: the second process waits for the first, then finds its intact
artifact and reuses it. Locks are ``fcntl.flock`` locks on ``<artifacts>/<stage>/.<key[:16]>.lock``:
the kernel releases them when their holder exits or is killed, so a crash never leaves a lock behind.
The lock files themselves stay (empty, one per key); deleting them would race with waiting processes.
A stage function must not call another stage function of the same key: ``flock`` locks belong to an
open file, so a second lock of the same key in the same process waits for itself.

    from tasks.locking import exclusive

    @exclusive(SPEC)
    def checkpoint_from_splits(data, cfg, artifacts_dir, refresh=False): ...
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import inspect
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from tasks.artifacts import unwritable
from tasks.stage import StageSpec, stage_key

log = logging.getLogger("trtflow.lock")

F = TypeVar("F", bound=Callable[..., Any])

#: filesystems where a lock cannot be created: a read-only store can still serve cached artifacts
_READ_ONLY = (errno.EROFS, errno.EACCES, errno.EPERM)


def lock_path(artifacts_dir: Path, stage: str, key: str) -> Path:
    """Return the lock file of one stage key."""
    return Path(artifacts_dir) / stage / f".{key[:16]}.lock"


@contextlib.contextmanager
def key_lock(artifacts_dir: Path, stage: str, key: str) -> Iterator[None]:
    """Hold the exclusive lock of one stage key; wait while another process (or thread) holds it.

    Args:
        artifacts_dir: root of the artifact store.
        stage: stage name.
        key: the stage's cache key.

    Raises:
        ConfigError: the artifacts folder cannot be created (e.g. a regular file is in the way).
    """
    path = lock_path(artifacts_dir, stage, key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        if exc.errno not in _READ_ONLY:
            raise unwritable(Path(artifacts_dir), exc) from exc
        # Read-only store: cached artifacts can still be read; a stage that must write fails with a
        # clear error when it creates its staging folder.
        log.debug("no lock for %s/%s (%s)", stage, key[:16], exc.strerror)
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("%s: another process is computing %s; waiting for it, then reusing its result", stage, key[:16])
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def exclusive(spec: StageSpec) -> Callable[[F], F]:
    """Decorate a stage function so that it runs under the lock of its cache key.

    The key is computed from the call's arguments exactly as ``ArtifactCache`` does (every argument
    but ``artifacts_dir`` and ``refresh``), so the function's own cache check, which runs under the
    lock, sees an artifact another process committed while this one waited.

    Args:
        spec: the stage's key specification.

    Returns:
        The decorator; the wrapped function keeps its name, signature and docstring.
    """

    def decorate(fn: F) -> F:
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def locked(*args: Any, **kwargs: Any) -> Any:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            key = stage_key(spec, bound.arguments)
            with key_lock(Path(bound.arguments["artifacts_dir"]), spec.name, key):
                return fn(*args, **kwargs)

        return locked  # type: ignore[return-value]

    return decorate
