"""Crash safety: a process SIGKILLed inside any stage leaves nothing a later run could use, and the
re-run completes with exactly the artifacts of an uninterrupted run.

    pytest tests/test_crash_safety.py -q

Children are killed either by the test hook ``TRTFLOW_TEST_KILL_AT=<stage>:<point>`` (a SIGKILL at a
precise point inside ``Staging.commit``) or from outside, while a stage is writing.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import _pipeline_kit as kit
from tasks.artifacts import KILL_AT_ENV, MANIFEST, STALE_AFTER_S, _HOST, clean_stale, ensure_writable


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> kit.Good:
    return kit.good_run(tmp_path_factory)


def _without(good: kit.Good, dst: Path, stage: str) -> Path:
    """A copy of the good folder minus every artifact of ``stage`` (so a run must compute it again)."""
    root = kit.clone(good.root, dst)
    for d in kit.committed(root, stage):
        shutil.rmtree(d)
    return root


@pytest.mark.parametrize(
    ("stage", "point"),
    # "rename": the manifest is staged, the rename not done; "hash": files written, nothing hashed yet.
    [(s, "rename") for s in kit.STAGES] + [("data", "hash")],
)
def test_sigkill_inside_a_stage_then_rerun_gives_the_same_artifacts(good: kit.Good, tmp_path: Path, stage: str, point: str) -> None:
    root = _without(good, tmp_path / "artifacts", stage)
    cfg = kit.with_root(good.config, root)

    proc = kit.run_child(cfg, env={KILL_AT_ENV: f"{stage}:{point}"})

    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    # It died inside the commit: its files are in a staging folder, none at a final place.
    staged = list((root / stage).glob(".tmp-*"))
    assert len(staged) == 1
    assert (staged[0] / MANIFEST).is_file() == (point == "rename")
    assert kit.committed(root, stage) == []

    refs = kit.run_plain(cfg)

    assert kit.digests(refs) == good.digests
    assert all(r.problems() == [] for r in refs.values())
    assert kit.leftovers(root) == [], "the dead process's staging folder was not cleaned up"


def test_sigkill_from_outside_while_export_writes(good: kit.Good, tmp_path: Path) -> None:
    root = _without(good, tmp_path / "artifacts", "export")
    cfg = kit.with_root(good.config, root)
    child = kit.start_child(cfg)
    try:
        # The exporter writes model.onnx into the staging folder for about a second: kill it then.
        while not list((root / "export").glob(".tmp-*")) and child.poll() is None:
            time.sleep(0.005)
        child.send_signal(signal.SIGKILL)
    finally:
        child.communicate(timeout=60)
    assert child.returncode == -signal.SIGKILL, "the child finished before it could be killed"
    assert kit.committed(root, "export") == []

    refs = kit.run_plain(cfg)

    assert kit.digests(refs) == good.digests
    assert kit.leftovers(root) == []


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    return int(proc.stdout)


def test_clean_stale_removes_only_folders_of_dead_or_old_runs(tmp_path: Path) -> None:
    stage = tmp_path / "train"
    artifact = stage / "0123456789abcdef"
    artifact.mkdir(parents=True)
    (artifact / MANIFEST).write_text("{}")
    lock = stage / ".0123456789abcdef.lock"
    lock.write_bytes(b"")
    dead = stage / f".tmp-0123456789abcdef-{_HOST}-{_dead_pid()}-aaaaaaaa"
    alive = stage / f".tmp-0123456789abcdef-{_HOST}-{os.getpid()}-bbbbbbbb"
    other_host_new = stage / f".tmp-0123456789abcdef-ffffffff-{_dead_pid()}-cccccccc"
    legacy_old = stage / ".trash-0123456789abcdef-dddddddd"
    for d in (dead, alive, other_host_new, legacy_old):
        d.mkdir()
        (d / "model.pt").write_bytes(b"partial")
    old = time.time() - STALE_AFTER_S - 60
    os.utime(legacy_old, (old, old))

    removed = clean_stale(tmp_path)

    assert sorted(removed) == sorted([dead, legacy_old])
    assert alive.is_dir() and other_host_new.is_dir()
    assert (artifact / MANIFEST).is_file() and lock.is_file()


def test_ensure_writable_cleans_leftovers_of_killed_runs(tmp_path: Path) -> None:
    dead = tmp_path / "export" / f".tmp-0123456789abcdef-{_HOST}-{_dead_pid()}-aaaaaaaa"
    dead.mkdir(parents=True)
    ensure_writable(tmp_path)
    assert not dead.exists()
