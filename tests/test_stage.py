import subprocess
import sys

from tasks.artifacts import ArtifactRef
from tasks.config import DataConfig, TrainConfig
from tasks.stage import StageSpec, stage_key

SPEC = StageSpec("demo", modules=("stage.py",), libraries=("numpy",))


def _ref(digest: str) -> ArtifactRef:
    return ArtifactRef(stage="up", key="k", dir="/x", files={"f": digest})


def test_key_depends_on_params_and_upstream_content_only():
    base = stage_key(SPEC, {"up": _ref("1"), "cfg": TrainConfig(), "artifacts_dir": "/a", "refresh": False})
    assert base == stage_key(SPEC, {"up": _ref("1"), "cfg": TrainConfig(), "artifacts_dir": "/elsewhere", "refresh": True})
    assert base != stage_key(SPEC, {"up": _ref("2"), "cfg": TrainConfig(), "artifacts_dir": "/a"})
    assert base != stage_key(SPEC, {"up": _ref("1"), "cfg": TrainConfig(epochs=6), "artifacts_dir": "/a"})
    assert base != stage_key(SPEC, {"up": _ref("1"), "cfg": TrainConfig(threads=1), "artifacts_dir": "/a"})


def test_key_depends_on_code_and_environment():
    a = stage_key(SPEC, {"x": 1})
    assert a != stage_key(StageSpec("demo", modules=("config.py",), libraries=("numpy",)), {"x": 1})
    env = StageSpec("demo", modules=("stage.py",), environment=lambda inputs: {"gpu": "H100"})
    env2 = StageSpec("demo", modules=("stage.py",), environment=lambda inputs: {"gpu": "H200"})
    assert stage_key(env, {"x": 1}) != stage_key(env2, {"x": 1})


def test_key_is_stable_across_processes():
    code = "from tasks.config import DataConfig; from tasks.data import SPEC; from tasks.stage import stage_key; print(stage_key(SPEC, {'cfg': DataConfig()}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    from tasks.data import SPEC as DATA

    assert out == stage_key(DATA, {"cfg": DataConfig()})


def test_computing_a_key_does_not_import_torch():
    code = (
        "import sys; from tasks.config import PipelineConfig; from tasks import data, train, export, verify; "
        "from tasks.stage import stage_key; stage_key(train.SPEC, {'cfg': PipelineConfig().train}); "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"


# --- the skeleton: key, lock, lookup, staging, commit ----------------------------------------------


def _make(content: bytes, calls: list[int]):
    def make(out):
        calls.append(1)
        (out / "out.bin").write_bytes(content)
        return {"n": len(calls)}

    return make


def test_run_stage_makes_once_then_finds_the_artifact(tmp_path):
    from tasks.stage import run_stage, was_cached

    calls: list[int] = []
    first = run_stage(SPEC, {"x": 1}, tmp_path, False, _make(b"a", calls))
    assert not was_cached() and first.problems() == []
    again = run_stage(SPEC, {"x": 1}, tmp_path, False, _make(b"a", calls))
    assert was_cached() and again.digest == first.digest and calls == [1]
    refreshed = run_stage(SPEC, {"x": 1}, tmp_path, True, _make(b"a", calls))
    assert not was_cached() and calls == [1, 1] and refreshed.meta == {"n": 2}


def test_run_stage_remakes_a_damaged_artifact_and_keeps_nothing_of_a_failed_make(tmp_path):
    import pytest

    from tasks.stage import run_stage, was_cached

    calls: list[int] = []
    ref = run_stage(SPEC, {"x": 2}, tmp_path, False, _make(b"a", calls))
    ref.path("out.bin").write_bytes(b"torn")
    run_stage(SPEC, {"x": 2}, tmp_path, False, _make(b"a", calls))
    assert not was_cached() and calls == [1, 1]

    def failing(out):
        (out / "half.bin").write_bytes(b"half")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        run_stage(SPEC, {"x": 3}, tmp_path, False, failing)
    assert not any(p.name.startswith(".tmp-") for p in (tmp_path / "demo").iterdir())
    assert len([p for p in (tmp_path / "demo").iterdir() if p.is_dir()]) == 1  # x=2's artifact alone


def test_an_upstream_artifact_is_checked_against_its_files_before_the_key_is_computed(tmp_path):
    import pytest

    from tasks.errors import ArtifactError
    from tasks.stage import run_stage

    calls: list[int] = []
    up = run_stage(StageSpec("up", modules=()), {"x": 1}, tmp_path, False, _make(b"up", calls))
    up.path("out.bin").write_bytes(b"changed behind the manifest's back")
    with pytest.raises(ArtifactError, match="changed since it was written"):
        run_stage(SPEC, {"up": up}, tmp_path, False, _make(b"down", calls))
    assert calls == [1]
