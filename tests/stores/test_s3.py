"""The S3 store against a real S3 HTTP server (moto's), one fresh bucket per test.

Two ``S3Store`` objects with different local folders stand for two machines sharing a bucket.
"""

from __future__ import annotations

import contextlib
import http.server
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("obstore")
pytest.importorskip("moto.server")

from _s3_kit import S3_CREDENTIALS  # noqa: E402

from tasks.artifacts import KILL_AT_ENV, ArtifactRef, opened_store  # noqa: E402
from tasks.errors import ArtifactError, ConfigError, StorageError, is_retryable  # noqa: E402
from tasks.store import Store, Writer, store_for  # noqa: E402
from tasks.stores.s3 import Lease, S3Store, parse_url  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
KEY = "ab" * 32


@pytest.fixture
def s3(s3_bucket):
    """A boto3 client on a fresh bucket; the AWS variables point at the server. Returns (client, bucket, url)."""
    client, bucket = s3_bucket
    return client, bucket, f"s3://{bucket}/runs"


def keys(client, bucket: str) -> list[str]:
    return sorted(o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", []))


def commit(store, files: dict[str, bytes], key: str = KEY, meta: dict | None = None) -> ArtifactRef:
    with store.open("export", key) as w:
        for name, data in files.items():
            (w.dir / name).parent.mkdir(parents=True, exist_ok=True)
            (w.dir / name).write_bytes(data)
        return w.commit(meta or {"opset": 17}, {"why": "test"})


def test_an_artifact_committed_on_one_machine_is_found_on_another(s3, tmp_path):
    client, bucket, url = s3
    a = store_for(url, tmp_path / "a")
    assert isinstance(a, Store)
    with a.open("export", KEY) as w:
        assert isinstance(w, Writer) and w.dir.is_dir() and not any(w.dir.iterdir())
    made = commit(a, {"model.onnx": b"onnx bytes", "sub/names.json": b"[1]"})
    b = store_for(url, tmp_path / "b")
    found = b.lookup("export", KEY)
    assert found is not None and found.files == made.files and found.meta == {"opset": 17}
    assert found.store == url and found.dir.is_relative_to(tmp_path / "b")
    # path() fetches through the store opened for that URL in this process (b, the last one).
    assert opened_store(url) is b
    assert found.path("sub/names.json").read_bytes() == b"[1]"
    assert found.path("model.onnx").is_relative_to(tmp_path / "b" / ".s3-cache" / bucket / "runs")
    assert found.damage() == []
    assert found.under(tmp_path / "elsewhere") is found, "re-rooting never moves a bucket's artifact to a local folder"
    assert b.lookup("export", "cd" * 32) is None and b.lookup("train", KEY) is None
    assert [r.key for r in b.list("export")] == [KEY] and b.list("train") == []
    # Files named by digest under the key's folder, the manifest beside them; staging cleaned up.
    assert f"runs/export/{KEY[:16]}/manifest.json" in keys(client, bucket)
    assert {f"runs/export/{KEY[:16]}/blobs/{d}" for d in made.files.values()} <= set(keys(client, bucket))
    assert not list((tmp_path / "a" / ".s3-staging").rglob(".tmp-*"))


def test_a_crash_between_the_files_and_the_manifest_leaves_nothing_lookup_returns(s3, tmp_path):
    client, bucket, url = s3
    script = textwrap.dedent(f"""
        from pathlib import Path
        from tasks.stores.s3 import S3Store
        store = S3Store({url!r}, Path({str(tmp_path / "a")!r}))
        with store.open("export", {KEY!r}) as w:
            (w.dir / "model.onnx").write_bytes(b"half")
            w.commit({{}})
    """)
    env = {**os.environ, KILL_AT_ENV: "export:rename", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    # It died after uploading the file (so the test does cross the crash point) and before the manifest.
    assert [k for k in keys(client, bucket) if "/blobs/" in k]
    assert S3Store(url, tmp_path / "b").lookup("export", KEY) is None
    assert S3Store(url, tmp_path / "b").list("export") == []
    # The next run on that machine removes the dead process's staging folder and commits.
    assert list((tmp_path / "a" / ".s3-staging").rglob(".tmp-*"))
    made = commit(S3Store(url, tmp_path / "a"), {"model.onnx": b"whole"})
    assert not list((tmp_path / "a" / ".s3-staging").rglob(".tmp-*"))
    found = S3Store(url, tmp_path / "b").lookup("export", KEY)
    assert found is not None and found.digest == made.digest


def test_two_concurrent_commits_of_one_key_keep_one(s3, tmp_path):
    _, _, url = s3
    machines = [S3Store(url, tmp_path / name) for name in ("a", "b", "c", "d")]
    ready, results, errors = threading.Barrier(len(machines)), {}, []

    def work(i: int, store: S3Store) -> None:
        try:
            with store.open("export", KEY) as w:
                # Not deterministic (like a TensorRT build): each machine makes different bytes.
                (w.dir / "model.onnx").write_bytes(f"build {i}".encode())
                ready.wait(timeout=30)
                results[i] = w.commit({"by": i})
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i, s)) for i, s in enumerate(machines)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and len(results) == len(machines)
    assert len({r.digest for r in results.values()}) == 1, "every committer returns the one kept artifact"
    kept = S3Store(url, tmp_path / "e").lookup("export", KEY)
    assert kept is not None and kept.digest == results[0].digest
    winner = kept.meta["by"]
    for store in machines:
        assert store.fetch(kept, "model.onnx").read_bytes() == f"build {winner}".encode()


def test_a_corrupted_object_is_detected_on_fetch_and_reported_as_damage(s3, tmp_path):
    client, bucket, url = s3
    made = commit(store_for(url, tmp_path / "a"), {"model.onnx": b"good", "names.json": b"[]"})
    client.put_object(Bucket=bucket, Key=f"runs/export/{KEY[:16]}/blobs/{made.files['model.onnx']}", Body=b"evil")
    client.delete_object(Bucket=bucket, Key=f"runs/export/{KEY[:16]}/blobs/{made.files['names.json']}")
    b = store_for(url, tmp_path / "b")
    found = b.lookup("export", KEY)
    assert found is not None
    with pytest.raises(ArtifactError, match="does not match its digest"):
        b.fetch(found, "model.onnx")
    assert not (found.dir / "model.onnx").exists(), "damaged bytes never reach the cache"
    assert found.damage() == [("model.onnx", "digest mismatch"), ("names.json", "missing")]
    with pytest.raises(ArtifactError):
        found.verify()
    # A new commit of the key (the stage re-running) replaces the damaged artifact.
    healed = commit(b, {"model.onnx": b"good", "names.json": b"[]"})
    again = S3Store(url, tmp_path / "c").lookup("export", KEY)
    assert again is not None and again.digest == healed.digest == made.digest
    assert S3Store(url, tmp_path / "c").fetch(again, "model.onnx").read_bytes() == b"good"


def test_a_refresh_replaces_an_intact_artifact_but_a_later_one_is_kept(s3, tmp_path):
    _, _, url = s3
    a, b = S3Store(url, tmp_path / "a"), S3Store(url, tmp_path / "b")
    commit(a, {"model.onnx": b"v1"})
    # b sets out to replace v1 (--refresh); meanwhile a commits v2: v2 appeared while b worked and is kept.
    with b.open("export", KEY) as w:
        (w.dir / "model.onnx").write_bytes(b"v3")
        v2 = commit(a, {"model.onnx": b"v2"})
        assert w.commit({}).digest == v2.digest
    with b.open("export", KEY) as w:
        (w.dir / "model.onnx").write_bytes(b"v4")
        v4 = w.commit({})
    found = S3Store(url, tmp_path / "c").lookup("export", KEY)
    assert found is not None and found.digest == v4.digest != v2.digest


def test_the_read_cache_downloads_a_file_once(s3, tmp_path):
    client, bucket, url = s3
    a = S3Store(url, tmp_path / "a")
    made = commit(a, {"model.onnx": b"weights"})
    b = S3Store(url, tmp_path / "b")
    found = b.lookup("export", KEY)
    assert found is not None
    first = b.fetch(found, "model.onnx")
    # With the object gone from the bucket, only a cached copy can answer.
    client.delete_object(Bucket=bucket, Key=f"runs/export/{KEY[:16]}/blobs/{made.files['model.onnx']}")
    assert b.fetch(found, "model.onnx") == first and first.read_bytes() == b"weights"
    assert S3Store(url, tmp_path / "b").fetch(found, "model.onnx") == first, "another process on the machine reuses it"
    assert a.fetch(made, "model.onnx").read_bytes() == b"weights", "the committing machine never downloads its own files"
    # A cached copy that changed is not trusted: fetched again, here absent.
    first.write_bytes(b"edited")
    with pytest.raises(ArtifactError, match="missing"):
        b.fetch(found, "model.onnx")


def test_a_changed_cached_file_is_downloaded_again(s3, tmp_path):
    _, _, url = s3
    made = commit(S3Store(url, tmp_path / "a"), {"model.onnx": b"weights"})
    b = S3Store(url, tmp_path / "b")
    path = b.fetch(made, "model.onnx")
    path.write_bytes(b"edited!")
    assert b.fetch(made, "model.onnx").read_bytes() == b"weights"


def test_a_lease_excludes_a_second_holder_on_another_machine_while_it_is_renewed(s3, tmp_path):
    client, bucket, url = s3
    a, b = (S3Store(url, tmp_path / n, lease_s=1.0, poll_s=0.05) for n in ("a", "b"))
    spans: dict[str, tuple[float, float]] = {}
    held = threading.Event()

    def hold(name: str, store: S3Store, seconds: float) -> None:
        with store.lock("export", KEY):
            start = time.monotonic()
            held.set()
            time.sleep(seconds)
            spans[name] = (start, time.monotonic())

    first = threading.Thread(target=hold, args=("a", a, 2.5))  # 2.5 leases: only renewals keep it
    first.start()
    assert held.wait(10)
    second = threading.Thread(target=hold, args=("b", b, 0.0))
    second.start()
    first.join(20)
    second.join(20)
    assert spans["b"][0] >= spans["a"][1], f"b entered while a held the lease: {spans}"
    assert not [k for k in keys(client, bucket) if ".leases" in k], "a released lease is deleted"


def test_an_expired_lease_is_taken_over_by_exactly_one_waiter(s3, tmp_path, monkeypatch):
    import obstore

    _, _, url = s3
    # Both waiters send their takeover only once both have decided to: a real race on the ETag.
    real_put, race, takeovers = obstore.put, threading.Barrier(2), []

    def put(store, path, data, **kw):
        if "/.leases/" in path and kw.get("mode") != "create" and len(takeovers) < 2:
            takeovers.append(path)
            with contextlib.suppress(threading.BrokenBarrierError):
                race.wait(timeout=5)
        return real_put(store, path, data, **kw)

    monkeypatch.setattr(obstore, "put", put)
    dead = S3Store(url, tmp_path / "dead", lease_s=1.0, poll_s=0.05)
    lease = Lease(dead, f"export/.leases/{KEY[:16]}.json")
    lease.acquire()
    lease._stop.set()  # the holder is killed: it stops renewing and never deletes the lease
    assert lease._thread is not None
    lease._thread.join()
    start = time.monotonic()
    spans: list[tuple[float, float]] = []
    waiters = [S3Store(url, tmp_path / n, lease_s=1.0, poll_s=0.05) for n in ("b", "c")]

    def wait(store: S3Store) -> None:
        with store.lock("export", KEY):
            t = time.monotonic()
            time.sleep(0.3)
            spans.append((t, time.monotonic()))

    threads = [threading.Thread(target=wait, args=(s,)) for s in waiters]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(spans) == 2
    (s1, e1), (s2, _) = sorted(spans)
    assert s1 - start >= 0.5, "the lease was taken before it expired"
    assert s1 - start < 10
    assert s2 >= e1, "two waiters held the taken-over lease at once"
    assert len(takeovers) == 2 and race.n_waiting == 0 and not race.broken, "both waiters tried to take it over at once"


def test_side_files_are_shared_and_replaced(s3, tmp_path):
    client, bucket, url = s3
    a, b = S3Store(url, tmp_path / "a"), S3Store(url, tmp_path / "b")
    assert a.get("reports/run-1.json") is None
    a.put("reports/run-1.json", b"{}")
    a.put("reports/run-1.json", b'{"ok": true}')
    assert b.get("reports/run-1.json") == b'{"ok": true}'
    assert "runs/reports/run-1.json" in keys(client, bucket)
    b.put("reports/run-2.json", b"2")
    b.put("reports/deeper/x.json", b"x")
    commit(a, {"model.onnx": b"m"})  # an artifact is no side file of its stage folder
    a.put("export/.last-export.json", b"{}")
    assert a.entries("reports") == ["run-1.json", "run-2.json"] and a.entries("/reports/") == ["run-1.json", "run-2.json"]
    assert a.entries("export") == [".last-export.json"] and a.entries("nothing") == []
    assert a.where("reports/run-1.json") == f"s3://{bucket}/runs/reports/run-1.json"


def test_keep_local_also_writes_the_side_file_where_the_user_runs_trtflow(s3, tmp_path):
    client, bucket, url = s3
    store = S3Store(url, tmp_path / "run")
    store.put("reports/run-1.json", b"1", keep_local=True)
    store.put("train/.last-train.json", b"t")
    assert {"runs/reports/run-1.json", "runs/train/.last-train.json"} <= set(keys(client, bucket))
    assert (tmp_path / "run" / "reports" / "run-1.json").read_bytes() == b"1" and not (tmp_path / "run" / "train").exists()


def test_ready_probes_the_bucket_and_the_local_folder(s3, tmp_path):
    _, _, url = s3
    S3Store(url, tmp_path / "run").ready()
    assert (tmp_path / "run").is_dir()
    with pytest.raises(StorageError, match="no bucket"):
        S3Store("s3://no-such-bucket-here/x", tmp_path / "other").ready()
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(ConfigError, match="cannot be written"):
        S3Store(url, tmp_path / "file" / "run").ready()


def test_a_store_sent_to_another_process_is_reopened_there(s3, tmp_path):
    import pickle

    import tasks.artifacts as registry

    client, bucket, url = s3
    a = store_for(url, tmp_path / "a")
    made = commit(a, {"model.onnx": b"m"})
    registry._OPENED.pop(url)  # as in a fresh Dask worker: no store opened for this URL yet
    copy = pickle.loads(pickle.dumps(a))
    assert isinstance(copy, S3Store) and (copy.url, copy.local) == (url, a.local)
    assert opened_store(url) is copy and made.path("model.onnx").read_bytes() == b"m"


def test_urls(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    assert parse_url("s3://my-bucket") == ("my-bucket", "")
    assert parse_url("s3://my-bucket/a/b/") == ("my-bucket", "a/b")
    assert isinstance(store_for("s3://my-bucket/x", tmp_path), S3Store)
    for bad in ("s3://", "s3:///prefix", "s3://B!/x"):
        with pytest.raises(ConfigError, match="bucket"):
            parse_url(bad)
    monkeypatch.setenv("TRTFLOW_S3_LEASE_S", "7.5")
    assert S3Store("s3://my-bucket/x", tmp_path).lease_s == 7.5
    for bad in ("soon", "0", "-1"):
        monkeypatch.setenv("TRTFLOW_S3_LEASE_S", bad)
        with pytest.raises(ConfigError, match="TRTFLOW_S3_LEASE_S"):
            S3Store("s3://my-bucket/x", tmp_path)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_endpoint_names_the_variable(monkeypatch, tmp_path):
    for name, value in {**S3_CREDENTIALS, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{_closed_port()}"}.items():
        monkeypatch.setenv(name, value)
    store = store_for("s3://some-bucket/x", tmp_path)
    with pytest.raises(StorageError) as err:
        store.lookup("export", KEY)
    assert "cannot reach the S3 endpoint" in err.value.summary and "AWS_ENDPOINT_URL" in err.value.summary
    assert "\n" not in err.value.summary and not is_retryable(err.value)


def test_a_missing_bucket_says_to_create_it(s3, tmp_path):
    store = S3Store("s3://no-such-bucket-here/x", tmp_path)
    with pytest.raises(StorageError) as err:
        store.lookup("export", KEY)
    assert "no bucket 'no-such-bucket-here'" in err.value.summary and "create it" in err.value.summary
    with pytest.raises(StorageError, match="no bucket"):
        store.put("reports/x.json", b"{}")
    with pytest.raises(StorageError, match="no bucket"):
        store.list("export")


def test_bad_credentials_name_the_variables(s3, tmp_path, monkeypatch):
    from moto import settings

    _, _, url = s3
    monkeypatch.setattr(settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)  # the server now checks keys
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG0")
    with pytest.raises(StorageError) as err:
        S3Store(url, tmp_path).lookup("export", KEY)
    assert "rejected the credentials" in err.value.summary and "AWS_ACCESS_KEY_ID" in err.value.summary
    assert not is_retryable(err.value)


class _Answering(http.server.BaseHTTPRequestHandler):
    """A server that answers every request with one status and S3 error code (set on a subclass)."""

    status, code = 503, "SlowDown"

    def _answer(self) -> None:
        body = f"<?xml version='1.0'?><Error><Code>{self.code}</Code><Message>test</Message></Error>".encode()
        self.send_response(self.status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_PUT = do_HEAD = _answer  # noqa: N815 - the http.server interface

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.parametrize(
    "status, code, says, retryable",
    [
        (503, "SlowDown", "run the same command again", True),
        (500, "InternalError", "run the same command again", True),
        (301, "PermanentRedirect", "set AWS_DEFAULT_REGION", False),
        (400, "InvalidRequest", "check --store and the AWS_* variables", False),
    ],
)
def test_server_errors_are_retryable_and_refusals_are_not(monkeypatch, tmp_path, status, code, says, retryable):
    handler = type("Handler", (_Answering,), {"status": status, "code": code})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        for name, value in {**S3_CREDENTIALS, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{server.server_port}"}.items():
            monkeypatch.setenv(name, value)
        with pytest.raises(StorageError) as err:
            S3Store("s3://some-bucket/x", tmp_path).get("reports/x.json")
        assert is_retryable(err.value) is retryable and says in err.value.summary, err.value.summary
    finally:
        server.shutdown()


def test_timing_caches_come_from_the_bucket_and_go_back_to_it(s3, tmp_path):
    from tasks.engine import timing_caches

    client, bucket, url = s3
    a, b = S3Store(url, tmp_path / "a"), S3Store(url, tmp_path / "b")
    with timing_caches(a, "tensorrt") as folder:
        assert folder == tmp_path / "a" / ".cache" / "tensorrt"
        folder.mkdir(parents=True)
        (folder / "timing-x.cache").write_bytes(b"tuned")
    assert "runs/.cache/tensorrt/timing-x.cache" in keys(client, bucket)
    with timing_caches(b, "tensorrt") as folder:  # the other machine starts from it
        assert (folder / "timing-x.cache").read_bytes() == b"tuned"
