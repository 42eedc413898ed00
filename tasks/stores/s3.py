"""The object-storage store: artifacts in an S3 bucket (AWS S3, MinIO, Cloudflare R2, moto), ``--store s3://BUCKET/PREFIX``.

Built on obstore (the Python binding of the Rust ``object_store`` crate, used by Apache Arrow, Delta
Lake and DataFusion): it exposes S3's conditional writes as ``PutMode`` (``"create"`` sends
``If-None-Match: *``, ``{"e_tag": …}`` sends ``If-Match``), which atomic commits and leases need, it reads
the standard ``AWS_*`` variables itself, retries transient failures with backoff, and has no boto or
aiobotocore dependency. s3fs would need the same conditional headers passed by hand.

Layout in the bucket (``P`` is the URL's prefix):

- ``P/<stage>/<key[:16]>/blobs/<sha256>``: an artifact's files, named by their content's digest, so
  two machines committing the same key never overwrite each other's files with different bytes;
- ``P/<stage>/<key[:16]>/manifest.json``: the ``ArtifactRef`` (file name -> digest, meta) and the key's
  ingredients, written last with a conditional create: it is the commit;
- ``P/<stage>/.leases/<key[:16]>.json``: the lock of a stage key (holder, ``expires_at``);
- ``P/<name>``: side files (``put`` / ``get``: reports, run records, timing caches); the run's reports
  also in ``<local>/<name>`` (``put(..., keep_local=True)``).

Locally (``local``, the ``--artifacts-dir``): ``.s3-cache/<bucket>/<prefix>/<stage>/<key[:16]>/<file>``
holds each file fetched or committed here, reused while its digest matches the manifest, and
``.s3-staging/`` the private folders stages write into.

Configuration: ``AWS_ENDPOINT_URL`` (MinIO, R2, moto; leave unset for AWS), ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``; ``TRTFLOW_S3_LEASE_S`` the lease's lifetime.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

try:
    import obstore as obs
    from obstore.exceptions import AlreadyExistsError, BaseError, PreconditionError
    from obstore.store import S3Store as ObjectStore
except ImportError:  # the optional extra: ``--store s3://`` then says how to install it (``make``)
    if TYPE_CHECKING:  # pyright checks the calls against obstore's own annotations
        raise
    obs = None

from tasks.artifacts import _HOST as _HOST_ID
from tasks.artifacts import MANIFEST, ArtifactRef, _test_hook, clean_stale, ensure_writable, file_digest, remember_store, sha256_file, write_bytes_atomic
from tasks.errors import ArtifactError, ConfigError, StorageError

log = logging.getLogger("trtflow.s3")

#: environment variable: seconds a lease lives without renewal (the holder renews it every third of that)
LEASE_ENV = "TRTFLOW_S3_LEASE_S"
LEASE_S = 60.0
_CHUNK = 1 << 20
_HOST = socket.gethostname()


def parse_url(url: str) -> tuple[str, str]:
    """Split ``s3://bucket/prefix`` into the bucket and the prefix (no slashes around it).

    Raises:
        ConfigError: no bucket, or a bucket name S3 does not allow.
    """
    m = re.fullmatch(r"s3://([^/]*)/*(.*?)/*", url.strip(), flags=re.IGNORECASE)
    bucket, prefix = (m.group(1), m.group(2)) if m else ("", "")
    if not re.fullmatch(r"[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]", bucket):
        raise ConfigError(
            got=f"--store {url!r}",
            expected="s3://BUCKET/PREFIX with a bucket name of 3-63 lower-case letters, digits, dots or hyphens",
            because="the bucket name is missing or not one S3 accepts",
            fix="pass --store s3://BUCKET/PREFIX, e.g. --store s3://my-artifacts/trtflow",
        )
    return bucket, prefix


class S3Store:
    """Artifacts and side files in one bucket prefix; files read through a digest-checked local cache.

    Args:
        url: ``s3://bucket/prefix``.
        local: the local folder: read cache, staging folders.
        lease_s: a lock lease's lifetime without renewal (default ``TRTFLOW_S3_LEASE_S`` or 60 s).
        poll_s: how often a waiter looks at a held lease (default a quarter of ``lease_s``, at most 2 s).

    Raises:
        ConfigError: a malformed URL, or an AWS variable obstore refuses.
    """

    def __init__(self, url: str, local: Path, lease_s: float | None = None, poll_s: float | None = None) -> None:
        self.url = url
        self.local = Path(local)
        self.bucket, self.prefix = parse_url(url)
        self.lease_s = _lease_s(lease_s)
        self.poll_s = float(poll_s if poll_s is not None else min(2.0, self.lease_s / 4))
        self.endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT") or ""
        try:
            self._s3 = ObjectStore(
                self.bucket,
                prefix=self.prefix or None,
                # Plain http only where the user pointed us at an http endpoint (MinIO on a LAN, moto).
                client_options={"allow_http": self.endpoint.startswith("http://"), "connect_timeout": dt.timedelta(seconds=5)},
                retry_config={"max_retries": 3, "retry_timeout": dt.timedelta(seconds=30),
                              "backoff": {"init_backoff": dt.timedelta(milliseconds=100), "max_backoff": dt.timedelta(seconds=5), "base": 2}},
            )
        except (BaseError, ValueError) as exc:
            raise ConfigError(
                got=f"--store {url!r}: {exc}",
                expected="AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION with valid values",
                because="the S3 client cannot be configured from the environment",
                fix="check the AWS_* variables (docs/storage.md lists them)",
            ) from exc
        #: whether a request has reached the endpoint: a connection failure after that is transient
        self._reached = False

    # --- layout -------------------------------------------------------------------------------------

    @staticmethod
    def _folder(stage: str, key: str) -> str:
        return f"{stage}/{key[:16]}"

    def _blob(self, stage: str, key: str, digest: str) -> str:
        return f"{self._folder(stage, key)}/blobs/{digest}"

    def _cache(self, stage: str, key: str) -> Path:
        return self.local.joinpath(".s3-cache", self.bucket, *self.prefix.split("/"), stage, key[:16])

    def _where(self, path: str = "") -> str:
        return f"s3://{self.bucket}/" + "/".join(p for p in (self.prefix, path) if p)

    # --- requests -----------------------------------------------------------------------------------

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run one obstore request; S3's failures become StorageError (see ``_failure``)."""
        try:
            out = fn(self._s3, *args, **kwargs)
        except (FileNotFoundError, AlreadyExistsError, PreconditionError) as exc:
            if isinstance(exc, FileNotFoundError) and "NoSuchBucket" in str(exc):
                raise self._failure(what, exc) from exc
            self._reached = True
            raise
        except (BaseError, ValueError) as exc:
            raise self._failure(what, exc) from exc
        self._reached = True
        return out

    def _failure(self, what: str, exc: Exception) -> StorageError:
        text = str(exc)
        where = self._where()
        endpoint = self.endpoint or "AWS S3"
        if "NoSuchBucket" in text:
            err = StorageError(
                got=f"no bucket {self.bucket!r} at {endpoint}",
                expected=f"the bucket of --store {self.url} to exist",
                because="trtflow does not create buckets (their region, access and lifecycle are yours to choose)",
                fix=f"create it (aws s3 mb s3://{self.bucket}, mc mb, or the provider's console), or fix the bucket name in --store",
                summary=f"no bucket {self.bucket!r} at {endpoint}; create it or fix --store",
            )
        elif _status(text) in (401, 403) or re.search(r"<Code>(InvalidAccessKeyId|SignatureDoesNotMatch|AccessDenied|ExpiredToken|InvalidToken)", text):
            err = StorageError(
                got=f"{where} refused {what}: {_s3_code(text) or 'access denied'}",
                expected="credentials that may read and write the bucket",
                because="S3 rejected the request's credentials (a wrong key or secret, an expired token, or no permission)",
                fix="set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN for temporary ones) to a key allowed on the bucket",
                summary=f"{where} rejected the credentials ({_s3_code(text) or 'access denied'}); check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY",
            )
        elif not self._reached and _status(text) is None and re.search(r"error sending request|dns error|kind: Connect|timed out", text, re.I):
            err = StorageError(
                got=f"no answer from {endpoint} for {where}",
                expected="an S3 endpoint that answers",
                because="the endpoint is down, unreachable from here, or AWS_ENDPOINT_URL names the wrong host or port",
                fix="check AWS_ENDPOINT_URL (e.g. http://minio:9000; unset for AWS) and that the server runs",
                summary=f"cannot reach the S3 endpoint {endpoint}; check AWS_ENDPOINT_URL and that the server runs",
            )
        elif re.search(r"<Code>(PermanentRedirect|AuthorizationHeaderMalformed|IllegalLocationConstraintException)|incorrectly configured region", text):
            code = _s3_code(text) or "a redirect"
            err = StorageError(
                got=f"{where} answered {code} to {what}",
                expected=f"AWS_DEFAULT_REGION to be the region of the bucket {self.bucket!r}",
                because="S3 serves a bucket only from its own region",
                fix="set AWS_DEFAULT_REGION to the bucket's region (aws s3api get-bucket-location --bucket " + self.bucket + ")",
                summary=f"{where} is in another region ({code}); set AWS_DEFAULT_REGION to the bucket's region",
            )
        elif (_status(text) or 0) >= 500 or (_status(text) is None and re.search(r"error sending request|connection|timed out|timeout|broken pipe", text, re.I)):
            # A server error, a dropped connection, a timeout after the endpoint answered before: may pass.
            err = StorageError(
                got=f"{what} on {where} failed: {_first_line(text)}",
                expected="the S3 request to succeed",
                because="the object store failed or the connection dropped (after retries)",
                fix="run the same command again: finished stages are reused",
            )
            err.retryable = True
        else:
            err = StorageError(
                got=f"{what} on {where} failed: {_first_line(text)}",
                expected="the S3 request to succeed",
                because=f"S3 refused it ({_s3_code(text) or 'HTTP ' + str(_status(text) or '?')})",
                fix="check --store and the AWS_* variables (docs/storage.md)",
            )
        return err

    def _read(self, path: str) -> tuple[bytes, str] | None:
        """An object's bytes and ETag, or None when it is absent."""

        def read(st: Any, path: str) -> tuple[bytes, str]:
            res = obs.get(st, path)
            return bytes(res.bytes()), res.meta.get("e_tag") or ""

        try:
            return self._call(f"reading {path}", read, path)
        except FileNotFoundError:
            return None

    # --- Store --------------------------------------------------------------------------------------

    def lookup(self, stage: str, key: str) -> ArtifactRef | None:
        """The committed artifact of a stage key, or None (absent, or its manifest unreadable).

        Raises:
            StorageError: the bucket is missing, unreachable, or refuses the credentials.
        """
        found = self._read(f"{self._folder(stage, key)}/{MANIFEST}")
        return None if found is None else self._ref(found[0], stage, key)

    def _ref(self, blob: bytes, stage: str, key: str) -> ArtifactRef | None:
        try:
            ref = ArtifactRef.model_validate_json(blob)
        except ValueError:
            return None
        if ref.stage != stage or ref.key != key:
            return None
        return ref.model_copy(update={"dir": self._cache(stage, key), "store": self.url})

    def list(self, stage: str) -> list[ArtifactRef]:
        """Every committed artifact of a stage (one request per manifest)."""
        refs = []
        # The listing is a lazy stream: read it inside _call, where its failures are translated.
        listing = self._call(f"listing {stage}/", lambda st, prefix: [m for chunk in obs.list(st, prefix=prefix) for m in chunk], f"{stage}/")
        for meta in listing:
            parts = meta["path"].split("/")
            if len(parts) != 3 or parts[2] != MANIFEST:
                continue
            found = self._read(meta["path"])
            try:
                ref = ArtifactRef.model_validate_json(found[0]) if found else None
            except ValueError:
                continue  # an unreadable manifest is no artifact (lookup says the same)
            # The key's first 16 characters name the folder: a manifest elsewhere is not its own.
            if ref is not None and ref.stage == stage and ref.key[:16] == parts[1]:
                refs.append(ref.model_copy(update={"dir": self._cache(stage, ref.key), "store": self.url}))
        return refs

    def fetch(self, ref: ArtifactRef, name: str) -> Path:
        """The local path of one file of an artifact: downloaded once into the cache, digest-checked.

        Raises:
            ArtifactError: no such file in the artifact, the object is gone (``why`` = ``missing``), or
                its bytes are not the manifest's (``why`` = ``digest mismatch``).
            StorageError: the bucket cannot be read.
        """
        if name not in ref.files or Path(name).is_absolute() or ".." in Path(name).parts:
            raise ArtifactError(
                got=f"a request for '{name}'",
                expected=f"one of {sorted(ref.files)}",
                because=f"the {ref.stage} artifact in {self._where(self._folder(ref.stage, ref.key))} has no such file",
                fix="re-run the stage with --refresh " + ref.stage,
            )
        digest = ref.files[name]
        local = self._cache(ref.stage, ref.key) / name
        with contextlib.suppress(OSError):
            if file_digest(local) == digest:
                return local  # downloaded (or committed) here before, and unchanged since
        blob = self._blob(ref.stage, ref.key, digest)
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.parent / f".{local.name}.{uuid.uuid4().hex[:8]}.part"
        h = hashlib.sha256()

        def download(st: Any, blob: str) -> None:
            with open(tmp, "wb") as f:
                for chunk in obs.get(st, blob).stream(min_chunk_size=_CHUNK):
                    h.update(chunk)
                    f.write(chunk)

        try:
            try:
                self._call(f"reading {blob}", download, blob)
            except FileNotFoundError:
                raise _damaged(ref, name, self._where(blob), "missing") from None
            if h.hexdigest() != digest:
                raise _damaged(ref, name, self._where(blob), "digest mismatch")
            os.replace(tmp, local)
        finally:
            tmp.unlink(missing_ok=True)
        return local

    def damage(self, ref: ArtifactRef) -> list[tuple[str, str]]:
        """What is wrong with an artifact's objects: (file name, ``missing`` or ``digest mismatch``).

        Every file is fetched (once; later calls read the cache), so a hit is checked by content.
        """
        found = []
        for name in sorted(ref.files):
            try:
                self.fetch(ref, name)
            except ArtifactError as exc:
                found.append((name, getattr(exc, "why", "digest mismatch")))
        return found

    @contextlib.contextmanager
    def open(self, stage: str, key: str) -> Iterator[S3Writer]:
        """A writer with a private local folder; its files reach the bucket only on ``commit``.

        Raises:
            StorageError: the local staging folder cannot be made, or the bucket cannot be read.
        """
        w = S3Writer(self, stage, key)
        try:
            yield w
        finally:
            shutil.rmtree(w.dir, ignore_errors=True)

    @contextlib.contextmanager
    def lock(self, stage: str, key: str) -> Iterator[None]:
        """Hold the lease of a stage key; wait while another live holder (any machine) has it.

        Raises:
            StorageError: the bucket cannot be written.
        """
        lease = Lease(self, f"{stage}/.leases/{key[:16]}.json")
        lease.acquire()
        try:
            yield
        finally:
            lease.release()

    def ready(self) -> None:
        """Prove the local read cache writable and the bucket reachable (one request).

        Raises:
            ConfigError: the local folder cannot be created or written.
            StorageError: a missing bucket, refused credentials, an unreachable endpoint.
        """
        ensure_writable(self.local)
        self.get("report.json")

    def put(self, name: str, data: bytes, keep_local: bool = False) -> None:
        """Write a side file (one PUT: S3 replaces an object atomically); ``keep_local``: a copy in the local folder too."""
        self._call(f"writing {name}", obs.put, name.lstrip("/"), data)
        if keep_local:
            write_bytes_atomic(self.local.joinpath(*Path(name.lstrip("/")).parts), data)

    def get(self, name: str) -> bytes | None:
        """Read a side file, or None when there is none."""
        found = self._read(name.lstrip("/"))
        return None if found is None else found[0]

    def where(self, name: str) -> str:
        """The URL of a side file (``s3://bucket/prefix/name``)."""
        return self._where(name.lstrip("/"))

    def entries(self, folder: str) -> list[str]:
        """The names of the side files directly in ``folder`` (one listing request, not recursive)."""
        prefix = folder.strip("/")
        listing = self._call(f"listing {prefix}/", lambda st, p: obs.list_with_delimiter(st, p)["objects"], prefix or None)
        return sorted(m["path"].rsplit("/", 1)[-1] for m in listing)

    def __reduce__(self) -> tuple[Any, ...]:
        # Sent to another process (a Dask worker): reopened there and recorded as opened, so that the
        # references it finds are read through it (``tasks.artifacts.opened_store``).
        return (reopen, (self.url, self.local))


class S3Writer:
    """A private local folder for one artifact; ``commit`` uploads its files, then creates the manifest."""

    def __init__(self, store: S3Store, stage: str, key: str) -> None:
        self.store, self.stage, self.key = store, stage, key
        # Named as the local store names its staging folders, so that clean_stale removes those of dead processes.
        staging = store.local / ".s3-staging"
        self.dir = staging / stage / f".tmp-{key[:16]}-{_HOST_ID}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            self.dir.mkdir(parents=True)
            clean_stale(staging, stage)
        except OSError as exc:
            raise StorageError(
                got=f"{self.dir} cannot be created: {exc.strerror or exc}",
                expected=f"a writable local folder {store.local} (the S3 store's cache and staging)",
                because="stages write their files locally before they are uploaded",
                fix=f"pass --artifacts-dir a writable folder, or free space in {store.local}",
            ) from exc
        self.manifest = f"{store._folder(stage, key)}/{MANIFEST}"
        # The manifest there now (damaged, or being refreshed) may be replaced; one that appears while
        # this writer works was committed by another machine and is kept.
        found = store._read(self.manifest)
        self._found = None if found is None else found[1]

    def commit(self, meta: dict[str, Any], ingredients: dict[str, Any] | None = None) -> ArtifactRef:
        """Upload the files (named by digest), then create the manifest: the artifact appears whole or not at all.

        Returns:
            The committed artifact, or the one another machine committed first when it is intact.

        Raises:
            StorageError: the bucket cannot be written.
            ArtifactError: other writers replaced the manifest on every attempt.
        """
        s = self.store
        files = {str(p.relative_to(self.dir)): sha256_file(p) for p in sorted(self.dir.rglob("*")) if p.is_file()}
        for name, digest in files.items():
            s._call(f"uploading {name}", obs.put, s._blob(self.stage, self.key, digest), self.dir / name)
        _test_hook(self.stage, "rename")  # the crash-safety tests die here: files up, manifest not
        ref = ArtifactRef(stage=self.stage, key=self.key, dir=Path(s._folder(self.stage, self.key)), files=files, meta=meta)
        doc = ref.model_dump(mode="json", exclude={"store"})
        if ingredients is not None:
            doc["ingredients"] = ingredients
        body = json.dumps(doc, indent=2, default=str).encode()
        mode: Any = "create"
        for _ in range(5):
            try:
                s._call(f"writing {self.manifest}", obs.put, self.manifest, body, mode=mode)
            except (AlreadyExistsError, PreconditionError):
                pass  # someone committed (or replaced) it meanwhile: look at theirs
            else:
                return self._keep(ref)
            found = s._read(self.manifest)
            if found is None:
                mode = "create"  # deleted meanwhile
                continue
            theirs = s._ref(found[0], self.stage, self.key)
            if found[1] != self._found and theirs is not None and self._intact(theirs, files):
                log.info("%s: another machine committed %s first; keeping its artifact", self.stage, s._where(self.manifest))
                return theirs
            # Damaged, unreadable, or the one this writer set out to replace: replace exactly that one.
            mode, self._found = {"e_tag": found[1]}, found[1]
        raise ArtifactError(
            got=f"{s._where(self.manifest)} replaced by other writers on every attempt",
            expected="one commit of the artifact to succeed",
            because="several machines kept writing the same artifact at once",
            fix="run the same command again",
        )

    def _intact(self, theirs: ArtifactRef, ours: dict[str, str]) -> bool:
        # A file with our digest is intact: its blob holds the bytes this writer just uploaded.
        return all(ours.get(n) == d for n, d in theirs.files.items()) or not self.store.damage(theirs)

    def _keep(self, ref: ArtifactRef) -> ArtifactRef:
        # The committed files become the read cache: this machine never downloads what it made.
        cache = self.store._cache(self.stage, self.key)
        for name in ref.files:
            dest = cache / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(self.dir / name, dest)
        return ref.model_copy(update={"dir": cache, "store": self.store.url})


class Lease:
    """The lock of one stage key in the bucket: an object ``{holder, expires_at}`` made by a conditional create.

    A waiter polls it. It is taken over (conditionally on its ETag, so of two takers only one wins) when
    it has not changed for ``lease_s`` by the waiter's own clock, or its ``expires_at`` is more than
    ``lease_s`` past: clocks of two machines may differ, the waiter's monotonic clock never jumps. The
    holder renews it from a daemon thread every third of ``lease_s`` and deletes it on release.
    """

    def __init__(self, store: S3Store, path: str) -> None:
        self.store, self.path = store, path
        self.holder = f"{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.etag = ""
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _body(self) -> bytes:
        return json.dumps({"holder": self.holder, "host": _HOST, "pid": os.getpid(), "expires_at": time.time() + self.store.lease_s}).encode()

    def acquire(self) -> None:
        """Wait until this holder has the lease, then start renewing it."""
        s, seen, since, said = self.store, "", 0.0, False
        while True:
            try:
                self.etag = s._call(f"locking {self.path}", obs.put, self.path, self._body(), mode="create")["e_tag"] or ""
                break
            except AlreadyExistsError:
                pass
            found = s._read(self.path)
            if found is None:
                continue  # released meanwhile: try again at once
            blob, etag = found
            now = time.monotonic()
            if etag != seen:
                seen, since = etag, now
            try:
                expires_at = float(json.loads(blob).get("expires_at", 0))
            except (ValueError, AttributeError):
                expires_at = 0.0  # garbage where a lease belongs: treat it as expired
            if now - since >= s.lease_s or expires_at + s.lease_s < time.time():
                try:
                    self.etag = s._call(f"taking over {self.path}", obs.put, self.path, self._body(), mode={"e_tag": etag})["e_tag"] or ""
                    log.warning("%s: took over the expired lease of %s", s._where(self.path), _holder(blob))
                    break
                except PreconditionError:
                    continue  # another waiter took it, or the holder renewed it
            if not said:
                log.info("waiting for %s, held by %s", s._where(self.path), _holder(blob))
                said = True
            time.sleep(s.poll_s)
        self._thread = threading.Thread(target=self._renew, name=f"lease {self.path}", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        while not self._stop.wait(self.store.lease_s / 3):
            try:
                self.etag = self.store._call(f"renewing {self.path}", obs.put, self.path, self._body(), mode={"e_tag": self.etag})["e_tag"] or ""
            except PreconditionError:
                # Taken over (this process stalled past the expiry): the work goes on, and the commit's
                # conditional create still keeps exactly one artifact.
                log.warning("%s: lease lost to another holder", self.store._where(self.path))
                self.lost = True
                return
            except StorageError as exc:
                log.warning("%s: could not renew the lease: %s", self.store._where(self.path), exc.summary)

    def release(self) -> None:
        """Stop renewing and delete the lease if it is still this holder's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.lost:
            return
        with contextlib.suppress(StorageError, FileNotFoundError):
            found = self.store._read(self.path)
            if found is not None and found[1] == self.etag:
                self.store._call(f"unlocking {self.path}", obs.delete, self.path)


def _lease_s(given: float | None) -> float:
    text = os.environ.get(LEASE_ENV, "") if given is None else str(given)
    try:
        value = float(text or LEASE_S)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise ConfigError(
            got=f"{LEASE_ENV}={text!r}",
            expected="a lease lifetime in seconds, above 0",
            because="the S3 store's locks expire when their holder stops renewing them for that long",
            fix=f"set {LEASE_ENV}=60 (or unset it)",
        )
    return value


def _holder(blob: bytes) -> str:
    try:
        return str(json.loads(blob).get("holder", "?"))
    except (ValueError, AttributeError):
        return "?"


def _damaged(ref: ArtifactRef, name: str, where: str, why: str) -> ArtifactError:
    err = ArtifactError(
        got=f"{where} is missing" if why == "missing" else f"{where} does not match its digest in the manifest",
        expected=f"the bytes of {name} recorded in the {ref.stage} manifest (sha256 {ref.files[name][:12]}…)",
        because="an object in the bucket was deleted, truncated or replaced after it was committed",
        fix=f"run the same command again: the {ref.stage} stage re-runs (or pass --refresh {ref.stage})",
    )
    err.why = why  # type: ignore[attr-defined]  # read by S3Store.damage
    return err


def _status(text: str) -> int | None:
    # obstore's messages say "Server returned non-2xx status code: 403 Forbidden".
    m = re.search(r"status code: (\d{3})", text)
    return int(m.group(1)) if m else None


def _s3_code(text: str) -> str:
    m = re.search(r"<Code>([^<]+)</Code>", text)
    return m.group(1) if m else ""


def _first_line(text: str) -> str:
    return re.split(r"\n|Debug source", text, maxsplit=1)[0].strip()[:300]


def reopen(url: str, local: Path) -> S3Store:
    """The S3 store at ``url`` made in this process and recorded as the one its references read through."""
    store = make(url, local)
    remember_store(url, store)
    return store


def make(url: str, local: Path) -> S3Store:
    """The S3 store at ``url`` (registered for ``s3://`` by ``tasks.store``), its read cache in ``local``."""
    if obs is None:
        raise ConfigError(
            got=f"--store {url}",
            expected="obstore installed (the S3 client)",
            because="the S3 store is an optional extra",
            fix="pip install 'trtflow[s3]' (or pip install obstore)",
        )
    return S3Store(url, local)

