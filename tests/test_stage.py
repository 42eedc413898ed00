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
