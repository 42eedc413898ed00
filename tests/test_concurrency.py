"""Concurrency: runs at once on one artifacts folder finish correctly, compute each artifact once, and
never clobber or tear each other's files.

    pytest tests/test_concurrency.py -q
"""

from __future__ import annotations

import fcntl
import os
import threading
from pathlib import Path

import pytest

import _pipeline_kit as kit
from tasks.artifacts import MANIFEST, Staging, sha256_file
from tasks.config import Precision
from tasks.locking import key_lock, lock_path
from tasks.stage import StageSpec, run_stage, was_cached


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> kit.Good:
    return kit.good_run(tmp_path_factory)


def test_three_runs_at_once_on_one_folder_train_once_and_agree(good: kit.Good, tmp_path: Path) -> None:
    root = tmp_path / "artifacts"
    calls = tmp_path / "calls.log"
    same = kit.with_root(good.config, root)
    # Different parameters sharing data, train and export: another precision and another batch profile.
    other = same.model_copy(update={"precisions": [Precision.fp16], "batch": same.batch.model_copy(update={"opt": 2})})
    children = [kit.start_child(cfg, KIT_COUNT_CALLS=str(calls)) for cfg in (same, same, other)]
    outs = [c.communicate(timeout=300) for c in children]

    for child, (_, err) in zip(children, outs, strict=True):
        assert child.returncode == 0, err[-3000:]
    a, b, c = (kit.child_digests(out) for out, _ in outs)
    assert a == b == good.digests
    assert {k: c[k] for k in ("data", "train", "export", "validate")} == {k: a[k] for k in ("data", "train", "export", "validate")}
    # The per-key lock: the waiting processes reused the first one's model instead of training again.
    ran = calls.read_text().split()
    assert ran.count("train_model") == 1 and ran.count("onnx_from_module") == 1, ran
    assert kit.leftovers(root) == []
    assert len(kit.committed(root, "train")) == 1
    for stage in kit.STAGES:
        assert all((d / MANIFEST).is_file() for d in kit.committed(root, stage))
    refs = kit.run_plain(same)
    assert all(r.problems() == [] for r in refs.values())


SPEC = StageSpec("demo")


def _stage(root: Path, key: str, content: bytes) -> Staging:
    s = Staging(root, "demo", key)
    (s.dir / "out.bin").write_bytes(content)
    return s


def test_commit_keeps_an_intact_artifact_another_process_committed_meanwhile(tmp_path: Path) -> None:
    key = "a" * 64
    mine, theirs = _stage(tmp_path, key, b"mine"), _stage(tmp_path, key, b"theirs")
    committed = theirs.commit({"who": "theirs"})
    manifest_inode = os.stat(committed.dir / MANIFEST).st_ino

    got = mine.commit({"who": "mine"})

    assert got.meta == {"who": "theirs"} and got.files == committed.files
    assert os.stat(committed.dir / MANIFEST).st_ino == manifest_inode, "the other process's artifact was replaced"
    assert not mine.dir.exists()


def test_commit_replaces_a_damaged_artifact_another_process_left(tmp_path: Path) -> None:
    key = "b" * 64
    mine, theirs = _stage(tmp_path, key, b"mine"), _stage(tmp_path, key, b"theirs")
    broken = theirs.commit({"who": "theirs"})
    (broken.dir / "out.bin").write_bytes(b"torn")

    got = mine.commit({"who": "mine"})

    assert got.meta == {"who": "mine"} and got.problems() == []
    assert (got.dir / "out.bin").read_bytes() == b"mine"


def test_commit_replaces_the_artifact_it_was_asked_to_refresh(tmp_path: Path) -> None:
    key = "c" * 64
    old = _stage(tmp_path, key, b"old").commit({"v": 1})
    new = _stage(tmp_path, key, b"new").commit({"v": 2})
    assert new.meta == {"v": 2} and sha256_file(old.dir / "out.bin") == new.files["out.bin"]


def test_key_lock_excludes_other_holders_until_released(tmp_path: Path) -> None:
    key = "d" * 64
    path = lock_path(tmp_path, "demo", key)

    def try_lock() -> bool:
        fd = os.open(path, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        finally:
            os.close(fd)
        return True

    with key_lock(tmp_path, "demo", key):
        assert not try_lock()
    assert try_lock()


def test_run_stage_makes_under_the_key_lock_and_a_waiter_reuses_the_result(tmp_path: Path) -> None:
    seen: list[str] = []
    inside, release = threading.Event(), threading.Event()

    def demo(x: int) -> str:
        def make(out: Path) -> dict[str, str]:
            inside.set()
            release.wait(30)
            (out / "out.bin").write_bytes(b"x")
            seen.append("computed")
            return {"by": threading.current_thread().name}

        ref = run_stage(SPEC, {"x": x}, tmp_path, False, make)
        if was_cached():
            seen.append("reused")
        return ref.meta["by"]

    results: dict[str, str] = {}
    first = threading.Thread(target=lambda: results.update(first=demo(1)), name="first")
    first.start()
    assert inside.wait(30)
    second = threading.Thread(target=lambda: results.update(second=demo(1)), name="second")
    second.start()
    # The second caller waits on the lock instead of computing the same artifact in parallel.
    second.join(0.5)
    assert second.is_alive() and seen == []
    release.set()
    first.join(30)
    second.join(30)
    assert seen == ["computed", "reused"]
    assert results == {"first": "first", "second": "first"}
