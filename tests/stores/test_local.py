"""The local store: the Store interface over the artifacts folder, its layout and guarantees unchanged."""

from __future__ import annotations

import json
import pickle
import threading
import time
from pathlib import Path

import pytest

from tasks.artifacts import MANIFEST, ArtifactRef
from tasks.engine import timing_caches
from tasks.errors import ArtifactError, ConfigError, StorageError
from tasks.stage import StageSpec, run_stage
from tasks.store import Store, Writer, as_store, store_for
from tasks.stores.local import LocalStore

KEY = "cd" * 32


def commit(store: Store, files: dict[str, bytes], key: str = KEY) -> ArtifactRef:
    with store.open("export", key) as w:
        for name, data in files.items():
            (w.dir / name).parent.mkdir(parents=True, exist_ok=True)
            (w.dir / name).write_bytes(data)
        return w.commit({"opset": 17}, {"why": "test"})


def test_store_for_gives_the_local_store_for_no_url_a_folder_and_file_urls(tmp_path):
    plain = store_for(None, tmp_path)
    assert isinstance(plain, LocalStore) and isinstance(plain, Store)
    assert plain.root == plain.local == tmp_path and plain.url == str(tmp_path)
    elsewhere = store_for(str(tmp_path / "shared"), tmp_path / "run")
    assert isinstance(elsewhere, LocalStore) and (elsewhere.root, elsewhere.local) == (tmp_path / "shared", tmp_path / "run")
    url = store_for(f"file://{tmp_path}/x%20y", tmp_path)
    assert isinstance(url, LocalStore) and url.root == tmp_path / "x y" and url.url == f"file://{tmp_path}/x%20y"
    assert isinstance(store_for(f"FILE://localhost{tmp_path}", tmp_path), LocalStore)
    with pytest.raises(ConfigError, match="not of the host 'otherhost'"):
        store_for("file://otherhost/data", tmp_path)
    with pytest.raises(ConfigError, match="no store is registered for 'ftp://'"):
        store_for("ftp://host/x", tmp_path)
    assert isinstance(as_store(tmp_path), LocalStore) and as_store(tmp_path).root == tmp_path
    assert as_store(plain) is plain


def test_a_commit_lands_in_the_layout_of_the_artifacts_folder_and_is_found(tmp_path):
    store = LocalStore(tmp_path)
    with store.open("export", KEY) as w:
        assert isinstance(w, Writer) and w.dir.is_dir() and not any(w.dir.iterdir())
    assert store.lookup("export", KEY) is None and store.list("export") == []  # not committed: nothing
    made = commit(store, {"model.onnx": b"onnx", "sub/names.json": b"[1]"})
    folder = tmp_path / "export" / KEY[:16]
    assert made.dir == folder and sorted(p.name for p in folder.iterdir()) == ["manifest.json", "model.onnx", "sub"]
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["ingredients"] == {"why": "test"} and manifest["files"] == made.files
    found = store.lookup("export", KEY)
    assert found is not None and found.files == made.files and found.meta == {"opset": 17} and found.store is None
    assert store.fetch(found, "sub/names.json").read_bytes() == b"[1]"
    assert [r.key for r in store.list("export")] == [KEY]


def test_list_skips_folders_whose_manifest_is_another_keys_or_unreadable(tmp_path):
    store = LocalStore(tmp_path)
    made = commit(store, {"a": b"1"})
    other = "ef" * 32
    commit(store, {"b": b"2"}, key=other)
    # A copy of one artifact under another folder name is not that key's artifact.
    (tmp_path / "export" / "0000000000000000").mkdir()
    (tmp_path / "export" / "0000000000000000" / MANIFEST).write_text((made.dir / MANIFEST).read_text())
    (tmp_path / "export" / "1111111111111111").mkdir()
    (tmp_path / "export" / "1111111111111111" / MANIFEST).write_text("{not json")
    assert sorted(r.key for r in store.list("export")) == sorted([KEY, other])
    assert store.list("nothing") == []


@pytest.mark.parametrize("damage", ["modify", "delete"])
def test_fetch_checks_the_file_against_its_digest(tmp_path, damage):
    store = LocalStore(tmp_path)
    ref = commit(store, {"model.onnx": b"onnx"})
    if damage == "modify":
        (ref.dir / "model.onnx").write_bytes(b"ONNX")
    else:
        (ref.dir / "model.onnx").unlink()
    with pytest.raises(ArtifactError) as err:
        store.fetch(ref, "model.onnx")
    assert err.value.why == ("digest mismatch" if damage == "modify" else "missing")  # type: ignore[attr-defined]
    with pytest.raises(ArtifactError, match="has no such file"):
        store.fetch(ref, "../manifest.json")


def test_side_files_are_replaced_whole_listed_and_kept_inside_the_store(tmp_path):
    store = LocalStore(tmp_path)
    assert store.get("reports/run-1.json") is None and store.entries("reports") == []
    store.put("reports/run-1.json", b"one")
    store.put("reports/run-1.json", b"two")
    store.put("reports/sub/deeper.json", b"x")
    assert (tmp_path / "reports" / "run-1.json").read_bytes() == b"two" == store.get("reports/run-1.json")
    assert store.entries("reports") == ["run-1.json"]  # files only, no temporary left behind
    assert store.where("reports/run-1.json") == str(tmp_path / "reports" / "run-1.json")
    for bad in ("../outside.json", "/etc/passwd"):
        with pytest.raises(ValueError, match="relative to the store"):
            store.put(bad, b"x")
    (tmp_path / "report.json").mkdir()
    with pytest.raises(StorageError, match="is a folder"):
        store.put("report.json", b"{}")


def test_the_lock_excludes_a_second_holder_until_released(tmp_path):
    store = LocalStore(tmp_path)
    order: list[str] = []

    def second() -> None:
        with store.lock("export", KEY):
            order.append("second")

    with store.lock("export", KEY):
        waiter = threading.Thread(target=second)
        waiter.start()
        time.sleep(0.3)
        order.append("first done")
    waiter.join(5)
    assert order == ["first done", "second"]


def test_a_store_survives_pickling_as_a_dask_worker_receives_it(tmp_path):
    store = LocalStore(tmp_path / "art", tmp_path / "run", "file://x")
    copy = pickle.loads(pickle.dumps(store))
    assert isinstance(copy, LocalStore) and (copy.root, copy.local, copy.url) == (store.root, store.local, store.url)


def test_run_stage_keeps_artifacts_and_records_in_the_store_not_the_local_folder(tmp_path):
    store = LocalStore(tmp_path / "shared", tmp_path / "run")
    spec = StageSpec("demo")

    def make(out: Path) -> dict:
        (out / "f").write_bytes(b"x")
        return {}

    ref = run_stage(spec, {"x": 1}, store, False, make)
    assert ref.dir.parent == tmp_path / "shared" / "demo" and (tmp_path / "shared" / "demo" / ".last-demo.json").is_file()
    assert not (tmp_path / "run").exists()
    again = run_stage(spec, {"x": 1}, LocalStore(tmp_path / "shared", tmp_path / "other"), False, make)
    assert again == ref


def test_timing_caches_of_a_store_elsewhere_are_copied_in_and_what_a_build_changed_put_back(tmp_path):
    store = LocalStore(tmp_path / "shared", tmp_path / "run")
    store.put(".cache/tensorrt/timing-a.cache", b"old")
    store.put(".cache/tensorrt/timing-b.cache", b"kept")
    with timing_caches(store, "tensorrt") as folder:
        assert folder == tmp_path / "run" / ".cache" / "tensorrt"
        assert sorted(p.name for p in folder.iterdir()) == ["timing-a.cache", "timing-b.cache"]
        (folder / "timing-a.cache").write_bytes(b"new")
        (folder / "timing-c.cache").write_bytes(b"made")
        (tmp_path / "shared" / ".cache" / "tensorrt" / "timing-b.cache").write_bytes(b"another machine's")
    assert store.get(".cache/tensorrt/timing-a.cache") == b"new" and store.get(".cache/tensorrt/timing-c.cache") == b"made"
    # Unchanged here: not put back over what another machine wrote meanwhile.
    assert store.get(".cache/tensorrt/timing-b.cache") == b"another machine's"
    # The store in the local folder itself: the builder works in place, nothing is copied.
    same = LocalStore(tmp_path / "shared")
    with timing_caches(same, "tensorrt") as folder:
        assert folder == tmp_path / "shared" / ".cache" / "tensorrt"


def test_ready_creates_both_folders_and_refuses_one_that_cannot_be_written(tmp_path):
    store = store_for(str(tmp_path / "shared"), tmp_path / "run")
    store.ready()
    assert (tmp_path / "shared").is_dir() and (tmp_path / "run").is_dir()
    (tmp_path / "file").write_text("not a folder")
    for blocked in (store_for(str(tmp_path / "file" / "store"), tmp_path / "run2"), store_for(None, tmp_path / "file" / "run")):
        with pytest.raises(ConfigError, match="cannot be written"):
            blocked.ready()


def test_keep_local_copies_a_side_file_into_the_run_folder_only_when_the_store_is_elsewhere(tmp_path):
    elsewhere = store_for(str(tmp_path / "shared"), tmp_path / "run")
    elsewhere.put("reports/run-1.json", b"1", keep_local=True)
    elsewhere.put("train/.last-train.json", b"t")
    assert (tmp_path / "shared" / "reports" / "run-1.json").read_bytes() == (tmp_path / "run" / "reports" / "run-1.json").read_bytes() == b"1"
    assert (tmp_path / "shared" / "train" / ".last-train.json").is_file() and not (tmp_path / "run" / "train").exists()
    here = store_for(None, tmp_path / "here")
    here.put("report.json", b"r", keep_local=True)
    assert (tmp_path / "here" / "report.json").read_bytes() == b"r"
