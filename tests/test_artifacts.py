from pathlib import Path

import pytest

from tasks.artifacts import MANIFEST, ArtifactRef, ensure_writable, load_ref, sha256_file, staging
from tasks.errors import ArtifactError, ConfigError


def _make(root: Path, key: str = "k" * 64, content: bytes = b"hello") -> ArtifactRef:
    with staging(root, "demo", key) as st:
        (st.dir / "a.bin").write_bytes(content)
        (st.dir / "sub").mkdir()
        (st.dir / "sub" / "b.txt").write_text("x")
        return st.commit({"config": {"n": 1}})


def test_commit_records_digests_and_manifest(tmp_path):
    ref = _make(tmp_path)
    assert ref.dir == tmp_path / "demo" / ("k" * 16)
    assert ref.files == {"a.bin": sha256_file(ref.dir / "a.bin"), "sub/b.txt": sha256_file(ref.dir / "sub" / "b.txt")}
    assert load_ref(tmp_path, "demo", "k" * 64) == ref
    assert (ref.dir / MANIFEST).is_file()
    assert ref.problems() == []
    # nothing left behind but the artifact
    assert [p.name for p in (tmp_path / "demo").iterdir()] == ["k" * 16]


def test_failed_stage_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with staging(tmp_path, "demo", "f" * 64) as st:
            (st.dir / "half.bin").write_bytes(b"partial")
            raise RuntimeError("boom")
    assert list((tmp_path / "demo").iterdir()) == []
    assert load_ref(tmp_path, "demo", "f" * 64) is None


@pytest.mark.parametrize("damage", ["delete", "truncate", "modify"])
def test_damage_is_detected(tmp_path, damage):
    ref = _make(tmp_path)
    target = ref.dir / "a.bin"
    if damage == "delete":
        target.unlink()
    elif damage == "truncate":
        target.write_bytes(b"he")
    else:
        target.write_bytes(b"HELLO")
    assert ref.problems()
    with pytest.raises(ArtifactError, match="run the same command again"):
        ref.verify()


def test_recommit_replaces_damaged_artifact(tmp_path):
    ref = _make(tmp_path)
    (ref.dir / "a.bin").unlink()
    again = _make(tmp_path)
    assert again.problems() == [] and again.digest == ref.digest


def test_digest_is_content_address(tmp_path):
    a = _make(tmp_path / "1", key="a" * 64)
    b = _make(tmp_path / "2", key="b" * 64)
    c = _make(tmp_path / "3", key="a" * 64, content=b"other")
    assert a.digest == b.digest != c.digest


def test_unknown_file_name_is_clear(tmp_path):
    ref = _make(tmp_path)
    with pytest.raises(ArtifactError, match="no such file"):
        ref.path("nope.onnx")


def test_unwritable_artifacts_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ConfigError, match="--artifacts-dir"):
        ensure_writable(blocker / "artifacts")


def test_a_parse_error_on_a_full_disk_is_a_storage_error(tmp_path, monkeypatch):
    """onnx/onnxruntime write through C++ and may not report ENOSPC: their truncated output then fails
    to parse (DecodeError). With no space left that must read as the StorageError, nothing else."""
    import shutil
    from collections import namedtuple

    from tasks import artifacts
    from tasks.errors import StorageError

    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(10**9, 10**9, 0))

    class DecodeError(Exception):
        pass

    with pytest.raises(StorageError, match="No space left") as info:
        with artifacts.staging(tmp_path, "precision", "k" * 64):
            raise DecodeError("Error parsing message with type 'onnx.ModelProto'")
    assert "onnxruntime" not in str(info.value)
    monkeypatch.undo()
    with pytest.raises(DecodeError):  # with space left, the real error is kept
        with artifacts.staging(tmp_path, "precision", "k" * 64):
            raise DecodeError("Error parsing message")


def _three_files(out: Path) -> dict:
    for name in ("a.bin", "b.bin", "c.bin"):
        (out / name).write_bytes(name.encode() * 100)
    return {"n": 3}


def _moves_during_commit(tmp_path: Path, monkeypatch) -> int:
    """How many os.replace/os.rename calls a commit of the demo stage makes (a dry run)."""
    import os

    from tasks.stage import StageSpec, run_stage

    seen = []
    for name in ("replace", "rename"):
        real = getattr(os, name)
        monkeypatch.setattr(os, name, lambda src, dst, _real=real: (seen.append(str(dst)), _real(src, dst))[1])
    run_stage(StageSpec("demo"), {"x": 0}, tmp_path / "dry", False, _three_files)
    monkeypatch.undo()
    return sum(1 for d in seen if _in_commit(d))


def _in_commit(dst) -> bool:
    # The commit's moves: staged manifest and the folder into place (not the explanation record after it).
    return "/demo/" in str(dst) and not Path(dst).name.startswith(".last-")


@pytest.mark.parametrize("damaged_before", [False, True], ids=["new", "replacing-a-damaged-one"])
def test_a_commit_that_fails_during_the_move_leaves_no_half_filled_artifact(tmp_path, monkeypatch, damaged_before):
    """Fail each file move of a commit in turn (after the first one succeeded): the artifact is whole or absent."""
    import os

    from tasks.stage import StageSpec, run_stage, stage_key

    spec = StageSpec("demo")
    moves = _moves_during_commit(tmp_path, monkeypatch)
    assert moves >= 2
    for failing in range(2, moves + 1):
        root = tmp_path / f"fail-{failing}"
        old_manifest = None
        if damaged_before:
            old = run_stage(spec, {"x": 1}, root, False, _three_files)
            old.path("b.bin").write_bytes(b"torn")
            old_manifest = (old.dir / MANIFEST).read_text()
        count = [0]
        for name in ("replace", "rename"):
            real = getattr(os, name)

            def move(src, dst, _real=real, _count=count, _failing=failing):
                if _in_commit(dst):
                    _count[0] += 1
                    if _count[0] == _failing:
                        raise OSError(5, "Input/output error (injected)")
                return _real(src, dst)

            monkeypatch.setattr(os, name, move)
        with pytest.raises(OSError, match="injected"):
            run_stage(spec, {"x": 1}, root, False, _three_files)
        monkeypatch.undo()
        for folder in (p for p in (root / "demo").iterdir() if p.is_dir()):
            assert not folder.name.startswith((".tmp-", ".trash-")), f"left {folder.name}"
            ref = load_ref(root, "demo", stage_key(spec, {"x": 1}))
            # Whatever is in place is a whole artifact, never some of its files: the new one intact, or
            # the damaged one it was replacing, untouched (a lookup recomputes that one).
            assert ref is not None and set(ref.files) == {"a.bin", "b.bin", "c.bin"}, sorted(os.listdir(folder))
            assert sorted(os.listdir(folder)) == ["a.bin", "b.bin", "c.bin", MANIFEST]
            assert ref.problems() == [] or (folder / MANIFEST).read_text() == old_manifest
        again = run_stage(spec, {"x": 1}, root, False, _three_files)
        assert again.problems() == [] and set(again.files) == {"a.bin", "b.bin", "c.bin"}


# --- damage where a stage writes: healed where it is trtflow's own, else named with its fix -----------------


def _run_demo(root: Path, key: str = "d" * 64) -> ArtifactRef:
    from tasks.stage import StageSpec, run_stage

    def make(folder: Path) -> dict:
        (folder / "out.bin").write_bytes(b"made")
        return {}

    return run_stage(StageSpec("build", "tasks.stage"), {"key": key}, root, False, make)


def test_stale_trash_files_are_removed_like_folders(tmp_path):
    from tasks.artifacts import _HOST, clean_stale

    stage = tmp_path / "build"
    stage.mkdir()
    dead = 2**22 + 1  # above the default pid_max: no such process
    stale_file = stage / f".trash-{'a' * 16}-{_HOST}-{dead}-0123abcd"
    stale_file.write_bytes(b"an artifact folder that was replaced by a file")
    stale_dir = stage / f".trash-{'b' * 16}-{_HOST}-{dead}-0123abcd"
    stale_dir.mkdir()
    live_file = stage / f".trash-{'c' * 16}-{_HOST}-{__import__('os').getpid()}-0123abcd"
    live_file.write_bytes(b"")
    removed = clean_stale(tmp_path)
    assert set(removed) == {stale_file, stale_dir}
    assert not stale_file.exists() and not stale_dir.exists() and live_file.exists()


def test_an_artifact_folder_replaced_by_a_file_heals_without_leaving_trash(tmp_path):
    ref = _run_demo(tmp_path)
    import shutil

    shutil.rmtree(ref.dir)
    ref.dir.write_bytes(b"not a folder")
    healed = _run_demo(tmp_path)
    assert healed.dir.is_dir() and healed.path("out.bin").read_bytes() == b"made"
    assert not [p for p in healed.dir.parent.iterdir() if p.name.startswith(".trash-")]


def test_a_stage_folder_replaced_by_a_file_heals(tmp_path):
    import shutil

    ref = _run_demo(tmp_path)
    shutil.rmtree(tmp_path / "build")
    (tmp_path / "build").write_bytes(b"someone's file")
    again = _run_demo(tmp_path)
    assert (tmp_path / "build").is_dir() and again.path("out.bin").read_bytes() == b"made" and again.key == ref.key


def test_a_lock_file_replaced_by_a_folder_heals(tmp_path):
    from tasks.locking import lock_path

    ref = _run_demo(tmp_path)
    lock = lock_path(tmp_path, "build", ref.key)
    lock.unlink()
    (lock / "inside").mkdir(parents=True)
    assert _run_demo(tmp_path).key == ref.key
    assert lock.is_file()


def test_what_cannot_be_healed_is_named_with_its_fix(tmp_path):
    """A dangling link where the stage folder goes: the user's, never removed; a StorageError (exit 1), not an option error."""
    from tasks.errors import StorageError

    (tmp_path / "build").symlink_to(tmp_path / "unmounted-disk" / "build")
    with pytest.raises(StorageError) as info:
        _run_demo(tmp_path)
    assert info.value.summary.startswith(f"StorageError: {tmp_path / 'build'} is a broken link, not a folder; move or delete it")
    assert (tmp_path / "build").is_symlink()


def test_a_folder_where_a_report_file_goes_is_named(tmp_path):
    from tasks.artifacts import write_json_atomic
    from tasks.errors import StorageError

    (tmp_path / "report.json" / "x").mkdir(parents=True)
    with pytest.raises(StorageError) as info:
        write_json_atomic(tmp_path / "report.json", {"a": 1})
    summary = info.value.summary
    assert f"{tmp_path / 'report.json'} is a folder" in summary and "rm -r" in summary and "disk" not in summary
    assert not list(tmp_path.glob(".report.json.*"))  # no temporary file named instead
