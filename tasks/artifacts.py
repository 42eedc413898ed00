"""Content-addressed artifact store.

Every stage writes its files into a staging folder; only when the stage succeeded are the files
hashed, a ``manifest.json`` written beside them, and the folder renamed into place in one atomic
``os.replace``. So a crashed or failed stage never leaves a half-written artifact a later run could
pick up, and every artifact carries the digests (and the config) that made it.

Layout: ``<artifacts_dir>/<stage>/<key[:16]>/`` where ``key`` is the stage's cache key (a digest of its
inputs' content, its parameters, the code and the library versions). The artifact's own content
address is ``ArtifactRef.digest``, the digest of its files' digests; downstream keys use it.

Staging folders are named ``.tmp-<key[:16]>-<host>-<pid>-<random>``: a folder whose process died
(SIGKILL, power loss) is recognisable and removed by the next run (``clean_stale``); one whose owner
cannot be checked (another host, an unknown name) is removed once it is older than ``STALE_AFTER_S``.

Test hook: ``TRTFLOW_TEST_KILL_AT=<stage>:<point>`` makes the process SIGKILL itself inside
``Staging.commit`` (points: ``hash`` before the files are hashed, ``rename`` after the manifest is
staged and right before the rename). Only the crash-safety tests set it; it is read nowhere else.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel

from tasks.errors import ArtifactError, ConfigError, StorageError

MANIFEST = "manifest.json"
_CHUNK = 1 << 20
#: staging or trash folders whose owner cannot be checked are removed once older than this (seconds)
STALE_AFTER_S = 6 * 3600
#: environment variable of the crash-safety test hook (see the module docstring)
KILL_AT_ENV = "TRTFLOW_TEST_KILL_AT"
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]

log = logging.getLogger("trtflow.artifacts")


def sha256_file(path: Path) -> str:
    """Return the hex SHA-256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


#: digests of files already hashed in this process, by file identity; see ``file_digest``
_DIGESTS: dict[tuple[str, int, int, int, int], str] = {}
_DIGESTS_LOCK = threading.Lock()


def file_digest(path: Path) -> str:
    """``sha256_file`` of a file, hashed once per process while the file stays unchanged.

    Any write or replacement changes the file's size, inode, mtime or ctime, which are the memo's key,
    so a changed file is always hashed again; an unchanged one (read by many stages of one run) is not.

    Raises:
        OSError: the file cannot be read.
    """
    st = os.stat(path)
    identity = (str(path), st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns)
    with _DIGESTS_LOCK:
        known = _DIGESTS.get(identity)
    if known is None:
        known = sha256_file(path)
        with _DIGESTS_LOCK:
            if len(_DIGESTS) > 4096:
                _DIGESTS.clear()
            _DIGESTS[identity] = known
    return known


def sha256_json(obj: Any) -> str:
    """Return the hex SHA-256 of an object's canonical JSON form."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()


class Fetches(Protocol):
    """What an artifact of a remote store is read through: its store (``tasks.store.Store``)."""

    def fetch(self, ref: ArtifactRef, name: str) -> Path: ...


#: url -> the store this process opened for it (``tasks.store.store_for``); kept here, below the
#: store interface, so that a reference reads its files without importing the layer above it
_OPENED: dict[str, Fetches] = {}


def remember_store(url: str, store: Fetches) -> None:
    """Record ``store`` as the one the references recording ``url`` read their files through."""
    _OPENED[url] = store


def opened_store(url: str) -> Fetches:
    """The store this process opened (``store_for``) for ``url``: what a reference recording ``url`` is read through.

    Raises:
        ConfigError: no store was opened for ``url`` in this process.
    """
    if url not in _OPENED:
        raise ConfigError(
            got=f"an artifact of the store {url!r}, read in a process that did not open it",
            expected="the store opened (store_for) before its artifacts' files are read",
            because="an artifact's files are fetched through the store that found it",
            fix=f"open the store first (--store {url})",
        )
    return _OPENED[url]


class ArtifactRef(BaseModel):
    """What a stage returns: where its files are, their digests, and small metadata.

    Attributes:
        stage: the stage that made it.
        key: the stage's cache key (input address).
        dir: the folder holding the files and ``manifest.json``.
        files: file name (relative to ``dir``) -> SHA-256.
        meta: small JSON metadata (config that made it, metrics, tensor names).
        store: the URL of the remote store it lives in (``s3://…``), None for a local folder; then
            ``dir`` is the local read cache and ``path`` fetches each file from the store on first use.
    """

    stage: str
    key: str
    dir: Path
    files: dict[str, str]
    meta: dict[str, Any] = {}
    store: str | None = None

    @property
    def digest(self) -> str:
        """Content address of the artifact: the digest of its files' names and digests."""
        return sha256_json(sorted(self.files.items()))

    def under(self, artifacts_dir: Path) -> ArtifactRef:
        """Return this reference re-rooted in ``artifacts_dir`` (the folder may have been moved since)."""
        if self.store is not None:
            return self  # it lives in its store; ``dir`` is only the store's read cache
        where = artifact_dir(artifacts_dir, self.stage, self.key)
        return self if where == self.dir else self.model_copy(update={"dir": where})

    def path(self, name: str) -> Path:
        """Return the path of one of the artifact's files.

        Raises:
            ArtifactError: the artifact has no file of that name.
        """
        if name not in self.files or Path(name).is_absolute() or ".." in Path(name).parts:
            raise ArtifactError(
                got=f"a request for '{name}'",
                expected=f"one of {sorted(self.files)}",
                because=f"the {self.stage} artifact in {self.dir} has no such file",
                fix="re-run the stage with --refresh " + self.stage,
            )
        if self.store is not None:
            return opened_store(self.store).fetch(self, name)
        return self.dir / name

    def damage(self) -> list[tuple[str, str]]:
        """What is wrong with the files on disk: (file name, ``missing`` or ``digest mismatch``); empty when intact.

        A remote store's artifact is checked by fetching each file (once: later calls read the cache).
        """
        found = []
        if self.store is not None:
            for name in sorted(self.files):
                try:
                    self.path(name)
                except ArtifactError as exc:
                    found.append((name, getattr(exc, "why", "digest mismatch")))
            return found
        for name, digest in sorted(self.files.items()):
            p = self.dir / name
            if not p.is_file():
                found.append((name, "missing"))
            elif file_digest(p) != digest:
                found.append((name, "digest mismatch"))
        return found

    def problems(self) -> list[str]:
        """List what is wrong with the files on disk (missing, changed), as sentences; empty when intact."""
        return [
            f"{self.dir / name} is missing" if why == "missing" else f"{self.dir / name} changed since it was written (digest mismatch)"
            for name, why in self.damage()
        ]

    def verify(self) -> None:
        """Check every file against its recorded digest before it is used.

        Raises:
            ArtifactError: a file is missing or its content changed.
        """
        if found := self.problems():
            raise ArtifactError(
                got="; ".join(found),
                expected=f"the files recorded in {self.dir / MANIFEST}",
                because="an artifact was deleted, truncated or modified after it was written",
                fix=f"run the same command again: the {self.stage} stage re-runs (or pass --refresh {self.stage})",
            )


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never half of one.

    Args:
        path: destination; its folder is created if missing.
        data: the content.

    Raises:
        StorageError: a folder (or something else that is not a file) stands at ``path``, or on its way.
        OSError: the disk failed.
    """
    path = Path(path)
    blocker = path if path.is_dir() else _in_the_way(path.parent)
    if blocker is not None:
        what = "a folder" if blocker == path else "a file, not a folder"
        raise StorageError(
            got=f"{blocker} is {what}, where trtflow writes the file {path.name}",
            expected=f"{path} to be a file (or absent)",
            because="the file is replaced as a whole on every write, which cannot replace a folder" if blocker == path else f"{path.name} is written inside it",
            fix=f"move or delete {blocker} (e.g. rm -r {blocker}) and run the same command again: finished stages are reused",
            summary=f"{blocker} is {what}; move or delete it (rm -r {blocker}) and run the same command again",
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write a JSON report atomically (a reader never sees half of it)."""
    write_bytes_atomic(Path(path), json.dumps(obj, indent=2, default=str).encode())


def artifact_dir(artifacts_dir: Path, stage: str, key: str) -> Path:
    """Return the folder that holds the artifact of ``stage`` for cache key ``key``."""
    return Path(artifacts_dir) / stage / key[:16]


def load_ref(artifacts_dir: Path, stage: str, key: str) -> ArtifactRef | None:
    """Read the manifest of an existing artifact, or None when there is none or it is unreadable.

    The returned ``dir`` is where the manifest was found, not the path recorded in it: an artifacts
    folder that was moved or copied must never send a reader to the files at its old place.
    """
    folder = artifact_dir(artifacts_dir, stage, key)
    try:
        ref = ArtifactRef.model_validate_json((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if ref.key != key or ref.stage != stage:
        return None
    return ref.model_copy(update={"dir": folder})


def ensure_writable(artifacts_dir: Path) -> Path:
    """Create the artifacts folder if needed and prove it is writable, before any work starts.

    Raises:
        ConfigError: the folder cannot be created or written.
    """
    root = Path(artifacts_dir).expanduser().resolve()
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".write-probe-{uuid.uuid4().hex}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise unwritable(root, exc) from exc
    clean_stale(root)
    return root


def unwritable(folder: Path, exc: OSError) -> ConfigError:
    """The error of an artifacts folder that cannot be created or written (a file in the way, read-only)."""
    return ConfigError(
        got=f"artifacts folder {folder} that cannot be written ({exc.strerror or exc})",
        expected="a folder this user can create files in",
        because="every stage stores its outputs there",
        fix="pass a writable folder with --artifacts-dir (no regular file on its path), or fix its permissions",
    )


def _in_the_way(path: Path) -> Path | None:
    """The first existing part of ``path`` (from the top) that is not a folder: what blocks a write there."""
    path = Path(path)
    for p in [*reversed(path.parents), path]:
        if (p.exists() or p.is_symlink()) and not p.is_dir():
            return p
    return None


def store_unwritable(root: Path, exc: OSError, stage: str) -> StorageError:
    """The error of a stage that cannot write into the store at run time: names the real path and its fix.

    At run time (the options were checked before), this is a storage problem of the store, exit status
    1, not an invalid option.
    """
    where = Path(exc.filename) if exc.filename else Path(root)
    blocker = _in_the_way(where)
    if blocker is not None:
        what = "a file" if blocker.is_file() else "a broken link" if blocker.is_symlink() and not blocker.exists() else "not a folder"
        return StorageError(
            got=f"{blocker} is {what}, where the {stage} stage needs a folder",
            expected="folders on the path of every stage's output",
            because="something other than trtflow put it there (trtflow heals only files inside its own stage folders)",
            fix=f"move or delete {blocker} and run the same command again: finished stages are reused",
            summary=f"{blocker} is {what}, not a folder; move or delete it and run the same command again",
        )
    return StorageError(
        got=f"'{exc.strerror or exc}' at {where} while the {stage} stage wrote",
        expected="a store this user can write",
        because="every stage writes its output into the artifacts folder",
        fix=f"fix {where} (permissions, or what sits there) and run the same command again: finished stages are reused",
        summary=f"{where}: {exc.strerror or exc}; fix it and run the same command again",
    )


def stage_folder(artifacts_dir: Path, stage: str) -> Path:
    """The folder of one stage's artifacts, created if missing; a file in its place is removed first.

    Stage folders are trtflow's own: a regular file where one belongs holds nothing trtflow made (a
    user's mistake, a bad copy), so it is deleted, like an artifact folder replaced by a file. A
    symbolic link is the user's choice and is left alone.

    Raises:
        OSError: the folder cannot be created (the caller names the path).
    """
    folder = Path(artifacts_dir) / stage
    if not folder.is_symlink() and folder.exists() and not folder.is_dir():
        with contextlib.suppress(FileNotFoundError, IsADirectoryError):  # another process healed it first
            folder.unlink()
            log.warning("%s was a file, not the %s stage's folder: removed it", folder, stage)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def remove_path(path: Path) -> None:
    """Delete a file or a folder tree (best effort: what cannot be removed stays)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def disk_full(folder: Path, stage: str, exc: OSError) -> StorageError:
    """The error of a stage that ran out of disk space while writing its artifact (never retried)."""
    return StorageError(
        got=f"'{exc.strerror or 'No space left on device'}' while the {stage} stage wrote into {folder}",
        expected="enough free space for the artifact",
        because="the disk holding the artifacts folder is full; the half-written files were deleted and "
        "every finished artifact is intact",
        fix="free disk space (or pass --artifacts-dir on a larger disk) and run the same command again: "
        "finished stages are reused",
    )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    try:
        # A killed child its parent has not reaped yet still answers kill(0): a zombie is dead.
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _is_stale(folder: Path, now: float) -> bool:
    parts = folder.name.split("-")
    # .tmp-<key16>-<host>-<pid>-<rand>
    if len(parts) == 5 and parts[2] == _HOST and parts[3].isdigit():
        return not _pid_alive(int(parts[3]))
    try:
        return now - folder.stat().st_mtime > STALE_AFTER_S
    except OSError:
        return False


def clean_stale(artifacts_dir: Path, stage: str | None = None) -> list[Path]:
    """Delete staging and trash folders (and trash files) left by processes that died (or older than ``STALE_AFTER_S``).

    Never touches committed artifacts, lock files, or the staging folder of a live process on this host.

    Args:
        artifacts_dir: root of the artifact store.
        stage: only this stage's folder; None: every stage.

    Returns:
        The paths removed.
    """
    root = Path(artifacts_dir)
    parents = [root / stage] if stage else [p for p in _listdir(root) if p.is_dir() and not p.name.startswith(".")]
    now, removed = time.time(), []
    for parent in parents:
        for p in _listdir(parent):
            # Files too: an artifact folder replaced by a file is moved aside as a .trash-… file.
            if p.name.startswith((".tmp-", ".trash-")) and _is_stale(p, now):
                remove_path(p)
                if not (p.exists() or p.is_symlink()):
                    removed.append(p)
                    log.info("removed %s, left by an interrupted run", p)
    return removed


def _listdir(folder: Path) -> list[Path]:
    try:
        return list(folder.iterdir())
    except OSError:
        return []


def _test_hook(stage: str, point: str) -> None:
    # Crash-safety tests only: die here as a SIGKILL would (no cleanup, no finally blocks).
    if os.environ.get(KILL_AT_ENV) == f"{stage}:{point}":
        os.kill(os.getpid(), signal.SIGKILL)


def _fsync_dir(folder: Path) -> None:
    # A rename is durable only once its directory is synced; best effort (not every filesystem allows it).
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _identity(final: Path) -> tuple[int, int] | None:
    # Which committed artifact sits at ``final``: each commit writes a new manifest (new inode).
    try:
        st = (final / MANIFEST).stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns


class Staging:
    """A private folder a stage writes into; committed atomically by ``commit``.

    Raises:
        StorageError: the stage folder cannot be created (the path that blocks it is named), or the disk is full.
    """

    def __init__(self, artifacts_dir: Path, stage: str, key: str) -> None:
        self.root, self.stage, self.key = Path(artifacts_dir), stage, key
        self.final = artifact_dir(artifacts_dir, stage, key)
        self.dir = self.final.parent / f".tmp-{self.final.name}-{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            stage_folder(self.root, stage)
            self.dir.mkdir()
        except OSError as exc:
            raise (disk_full(self.final.parent, stage, exc) if exc.errno == errno.ENOSPC else store_unwritable(self.root, exc, stage)) from exc
        clean_stale(self.root, stage)
        # The artifact that was there when we started (a damaged one, or one being refreshed) may be
        # replaced; one that appears while we work was made by another process and is kept.
        self._found = _identity(self.final)

    def commit(self, meta: dict[str, Any], ingredients: dict[str, Any] | None = None) -> ArtifactRef:
        """Hash the staged files, write the manifest and move the folder into place.

        When another process committed an intact artifact of the same key while this one worked, that
        artifact is kept (a reader may be using it) and this staging folder is discarded.

        Args:
            meta: small JSON-able metadata stored in the manifest (config, metrics, names).
            ingredients: what the key is the digest of (``tasks.stage.key_ingredients``), recorded in
                the manifest beside the reference (not part of ``ArtifactRef``).

        Returns:
            The reference to the committed artifact (the other process's, when it won).

        Raises:
            ArtifactError: the artifact could not be put in place after several attempts.
        """
        _test_hook(self.stage, "hash")
        files = {
            str(p.relative_to(self.dir)): sha256_file(p)
            for p in sorted(self.dir.rglob("*"))
            if p.is_file()
        }
        ref = ArtifactRef(stage=self.stage, key=self.key, dir=self.final, files=files, meta=meta)
        tmp_manifest = self.dir / (MANIFEST + ".tmp")
        manifest = ref.model_dump(mode="json")
        if ingredients is not None:
            manifest["ingredients"] = ingredients
        tmp_manifest.write_text(json.dumps(manifest, indent=2, default=str))
        for p in self.dir.rglob("*"):
            if p.is_file():
                _fsync(p)
        os.replace(tmp_manifest, self.dir / MANIFEST)
        _fsync_dir(self.dir)
        _test_hook(self.stage, "rename")
        for _ in range(5):
            current = _identity(self.final)
            if current is not None and current != self._found:
                theirs = load_ref(self.root, self.stage, self.key)
                if theirs is not None and not theirs.problems():
                    log.info("%s: another process committed %s first; keeping its artifact", self.stage, self.final)
                    self.discard()
                    return theirs
            if self.final.exists():
                # A damaged (or refreshed) artifact: move it aside first, since os.replace cannot
                # overwrite a non-empty folder, then delete it.
                trash = self.final.parent / f".trash-{self.final.name}-{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
                try:
                    os.replace(self.final, trash)
                except FileNotFoundError:
                    pass  # another process moved it first
                else:
                    remove_path(trash)  # a folder, or a file that stood in the artifact's place
            try:
                os.replace(self.dir, self.final)
            except OSError as exc:
                if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                    self._found = None  # whatever is there now is another process's: re-check it
                    continue
                raise
            _fsync_dir(self.final.parent)
            return ref
        raise ArtifactError(
            got=f"{self.final} replaced by other processes on every attempt",
            expected="one commit of the artifact to succeed",
            because="several processes kept writing the same artifact at once",
            fix="run the same command again",
        )

    def discard(self) -> None:
        """Delete the staging folder (the stage failed)."""
        shutil.rmtree(self.dir, ignore_errors=True)


#: free bytes below which a failure while writing is put down to a full disk
LOW_SPACE_BYTES = 1 << 20


def _out_of_space(folder: Path) -> bool:
    try:
        return shutil.disk_usage(folder).free < LOW_SPACE_BYTES
    except OSError:
        return False


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


@contextlib.contextmanager
def staging(artifacts_dir: Path, stage: str, key: str) -> Iterator[Staging]:
    """Give a stage a private folder; discard it if the stage raises.

    The caller must call ``Staging.commit`` on success; an uncommitted folder is discarded too.

    Raises:
        StorageError: the disk filled up while the stage wrote (an ``OSError`` ENOSPC, never retried).
    """
    s = Staging(artifacts_dir, stage, key)
    try:
        yield s
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise disk_full(s.dir.parent, stage, exc) from exc
        if _out_of_space(s.dir.parent):
            raise disk_full(s.dir.parent, stage, OSError(errno.ENOSPC, "No space left on device")) from exc
        raise
    except Exception as exc:
        # Libraries that write through C++ (onnx, onnxruntime) may not report ENOSPC: their truncated
        # output then fails to parse ("DecodeError"). On a full disk that is a storage problem.
        if _out_of_space(s.dir.parent):
            raise disk_full(s.dir.parent, stage, OSError(errno.ENOSPC, "No space left on device")) from exc
        raise
    finally:
        if s.dir.exists():
            s.discard()
