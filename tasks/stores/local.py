"""The local store: artifacts in a folder (``--artifacts-dir``), the layout trtflow always had.

- ``<root>/<stage>/<key[:16]>/``: an artifact's files and its ``manifest.json``, committed by one atomic
  rename of a private staging folder (``tasks.artifacts.Staging``);
- ``<root>/<stage>/.<key[:16]>.lock``: the lock of a stage key, a kernel file lock (``tasks.locking``)
  that dies with its holder;
- ``<root>/<name>``: side files (``put`` / ``get``: ``report.json``, ``reports/…``, ``train/.last-train.json``,
  timing caches), each replaced atomically.

The functions of ``tasks.artifacts`` and ``tasks.locking`` do the work; this class is how stages reach them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote, urlparse

from tasks.artifacts import MANIFEST, ArtifactRef, Staging, ensure_writable, file_digest, load_ref, staging, write_bytes_atomic
from tasks.errors import ArtifactError, ConfigError
from tasks.locking import key_lock


class LocalStore:
    """Artifacts and side files in one local folder.

    Args:
        root: the folder artifacts live in.
        local: this run's local folder (its report); default ``root``.
        url: what the user passed, shown in messages; default ``root``.
    """

    def __init__(self, root: Path, local: Path | None = None, url: str | None = None) -> None:
        self.root = Path(root)
        self.local = Path(local) if local is not None else self.root
        self.url = url or str(self.root)

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    def ready(self) -> None:
        """Create this run's folder and the store's, and prove both writable.

        Raises:
            ConfigError: a folder that cannot be created or written (a file in the way, read-only).
        """
        for folder in dict.fromkeys([self.local, self.root]):
            ensure_writable(folder)

    def lookup(self, stage: str, key: str) -> ArtifactRef | None:
        """The committed artifact of a stage key, or None (absent, or its manifest unreadable)."""
        return load_ref(self.root, stage, key)

    def open(self, stage: str, key: str) -> contextlib.AbstractContextManager[Staging]:
        """A staging folder beside the artifact's place, renamed into place by ``commit``.

        Raises:
            StorageError: the stage folder cannot be created, or the disk filled up while the block wrote.
        """
        return staging(self.root, stage, key)

    def lock(self, stage: str, key: str) -> contextlib.AbstractContextManager[None]:
        """The kernel file lock of a stage key (released when its holder exits, however it exits).

        Raises:
            StorageError: the stage folder or lock file cannot be created.
        """
        return key_lock(self.root, stage, key)

    def list(self, stage: str) -> list[ArtifactRef]:
        """Every committed artifact of a stage whose manifest is readable and names its own folder."""
        refs = []
        for folder in sorted(_folders(self.root / stage)):
            try:
                key = ArtifactRef.model_validate_json((folder / MANIFEST).read_text()).key
            except (OSError, ValueError):
                continue
            ref = load_ref(self.root, stage, key) if key[:16] == folder.name else None
            if ref is not None:
                refs.append(ref)
        return refs

    def fetch(self, ref: ArtifactRef, name: str) -> Path:
        """The path of one file of an artifact, checked against its digest.

        Raises:
            ArtifactError: not a file of the artifact, missing (``why`` = ``missing``), or changed
                (``why`` = ``digest mismatch``).
        """
        path = ref.path(name)
        try:
            intact = file_digest(path) == ref.files[name]
        except OSError:
            raise _damaged(ref, name, path, "missing") from None
        if not intact:
            raise _damaged(ref, name, path, "digest mismatch")
        return path

    def put(self, name: str, data: bytes, keep_local: bool = False) -> None:
        """Write a side file under the root, replacing it atomically; ``keep_local``: also under ``local``
        when that is another folder (``--store`` elsewhere).

        Raises:
            StorageError: a folder (or a file on its path) is in the way.
        """
        write_bytes_atomic(self._side(name), data)
        if keep_local and self.local != self.root:
            write_bytes_atomic(self.local.joinpath(*Path(name).parts), data)

    def get(self, name: str) -> bytes | None:
        """Read a side file, or None when there is none (or it cannot be read)."""
        try:
            return self._side(name).read_bytes()
        except OSError:
            return None

    def where(self, name: str) -> str:
        """The path of a side file."""
        return str(self._side(name))

    def entries(self, folder: str) -> list[str]:
        """The names of the side files directly in ``folder`` (``train`` -> ``[".last-train.json", …]``)."""
        try:
            return sorted(p.name for p in self._side(folder).iterdir() if p.is_file())
        except OSError:
            return []

    def _side(self, name: str) -> Path:
        parts = Path(name).parts
        if Path(name).is_absolute() or ".." in parts:
            raise ValueError(f"a side file's name must be relative to the store, without '..': {name!r}")
        return self.root.joinpath(*parts)


def _folders(parent: Path) -> Iterator[Path]:
    with contextlib.suppress(OSError):
        for p in parent.iterdir():
            if p.is_dir() and not p.name.startswith("."):
                yield p


def _damaged(ref: ArtifactRef, name: str, path: Path, why: str) -> ArtifactError:
    err = ArtifactError(
        got=f"{path} is missing" if why == "missing" else f"{path} changed since it was written (digest mismatch)",
        expected=f"the file {name} recorded in {ref.dir / MANIFEST}",
        because="an artifact was deleted, truncated or modified after it was written",
        fix=f"run the same command again: the {ref.stage} stage re-runs (or pass --refresh {ref.stage})",
    )
    err.why = why  # type: ignore[attr-defined]  # what ArtifactRef.damage reports
    return err


def make(url: str, local: Path) -> LocalStore:
    """The local store of ``url`` (a folder, ``file:///folder``; empty: ``local`` itself); registered by ``tasks.store``."""
    if not url:
        return LocalStore(local)
    if url.lower().startswith("file://"):
        parsed = urlparse(url)
        if parsed.netloc not in ("", "localhost"):
            raise ConfigError(
                got=f"--store {url!r}",
                expected="file:///ABSOLUTE/FOLDER (a folder on this machine)",
                because=f"a file:// URL names a folder of this machine, not of the host {parsed.netloc!r}",
                fix="pass --store file:///path/to/folder, or a plain folder path",
            )
        return LocalStore(Path(unquote(parsed.path)), local, url)
    return LocalStore(Path(url).expanduser().resolve(), local, url)

