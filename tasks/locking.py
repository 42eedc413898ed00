"""Per-key locks: two processes computing the same artifact do the work once.

Atomic renames already keep concurrent runs from tearing each other's files; the lock keeps them from
doing the same (expensive) work twice: the second process waits for the first, then finds its intact
artifact and reuses it. Locks are ``filelock`` locks (``flock`` on Unix) on
``<artifacts>/<stage>/.<key[:16]>.lock``: the kernel releases them when their holder exits or is
killed, so a crash never leaves a lock behind. The lock files themselves stay (empty, one per key);
deleting them would race with waiting processes. ``tasks.stage.run_stage`` takes the lock; a stage must
not run another stage of the same key inside its own (a second lock of the same key waits for itself).
"""

from __future__ import annotations

import contextlib
import errno
import logging
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock, Timeout

from tasks.artifacts import remove_path, stage_folder, store_unwritable

log = logging.getLogger("trtflow.lock")

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
        StorageError: the stage folder or lock file cannot be created; names the path in the way.
    """
    path = lock_path(artifacts_dir, stage, key)
    # One FileLock object per call: flock locks belong to an open file, so two threads of one process
    # exclude each other too (a shared, re-entrant object would let the second one in).
    lock = FileLock(path, thread_local=False)
    try:
        stage_folder(artifacts_dir, stage)
        if path.is_dir() and not path.is_symlink():
            # A folder where the (empty, trtflow-named) lock file belongs: nothing of value is in it.
            # rmtree never deletes a lock file that another process put back meanwhile (not a folder).
            log.warning("%s was a folder, not a lock file: removed it", path)
            remove_path(path)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            log.info("%s: another process is computing %s; waiting for it, then reusing its result", stage, key[:16])
            lock.acquire()
    except OSError as exc:
        if exc.errno not in _READ_ONLY:
            raise store_unwritable(Path(artifacts_dir), exc, stage) from exc
        # Read-only store: cached artifacts can still be read; a stage that must write fails with a
        # clear error when it creates its staging folder.
        log.debug("no lock for %s/%s (%s)", stage, key[:16], exc.strerror)
        yield
        return
    try:
        yield
    finally:
        lock.release()
