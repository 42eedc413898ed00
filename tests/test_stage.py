import subprocess
import sys
from pathlib import Path

import pytest

from tasks.artifacts import ArtifactRef
from tasks.config import DataConfig, TrainConfig
from tasks.stage import StageSpec, stage_key

SPEC = StageSpec("demo", "tasks.stage", libraries=("numpy",))


def _ref(digest: str) -> ArtifactRef:
    return ArtifactRef(stage="up", key="k", dir="/x", files={"f": digest})


def test_key_depends_on_params_and_upstream_content_only():
    base = stage_key(SPEC, {"up": _ref("1"), "cfg": TrainConfig(), "store": "/a", "refresh": False})
    assert base == stage_key(SPEC, {"up": _ref("1"), "cfg": TrainConfig(), "store": "/elsewhere", "refresh": True})
    assert base != stage_key(SPEC, {"up": _ref("2"), "cfg": TrainConfig(), "store": "/a"})
    assert base != stage_key(SPEC, {"up": _ref("1"), "cfg": TrainConfig(epochs=6), "store": "/a"})
    assert base != stage_key(SPEC, {"up": _ref("1"), "cfg": TrainConfig(threads=1), "store": "/a"})


def test_key_depends_on_code_and_environment():
    a = stage_key(SPEC, {"x": 1})
    assert a != stage_key(StageSpec("demo", "tasks.config", libraries=("numpy",)), {"x": 1})
    env = StageSpec("demo", "tasks.stage", environment=lambda inputs: {"gpu": "H100"})
    env2 = StageSpec("demo", "tasks.stage", environment=lambda inputs: {"gpu": "H200"})
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
    up = run_stage(StageSpec("up"), {"x": 1}, tmp_path, False, _make(b"up", calls))
    up.path("out.bin").write_bytes(b"changed behind the manifest's back")
    with pytest.raises(ArtifactError, match="changed since it was written"):
        run_stage(SPEC, {"up": up}, tmp_path, False, _make(b"down", calls))
    assert calls == [1]


# --- what enters the key ---------------------------------------------------------------------------


class _Key(Exception):
    """Raised by the stand-in run_stage: the key a stage function would have looked up."""


def _leaf_paths(model, prefix=()):
    from pydantic import BaseModel

    for name, info in type(model).model_fields.items():
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            yield from _leaf_paths(value, (*prefix, name))
        elif isinstance(value, dict) and value and all(isinstance(v, BaseModel) for v in value.values()):
            for k, v in value.items():
                yield from _leaf_paths(v, (*prefix, name, str(getattr(k, "value", k))))
        else:
            yield (*prefix, name), value, info.annotation


def _other(value, annotation):
    import enum

    if isinstance(value, bool):
        return not value
    if isinstance(value, enum.Enum):
        return next(m for m in type(value) if m != value)
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, dict):
        return {**value, "extra": 1}
    if value is None:
        text = str(annotation)
        return "nowhere.npz" if "Path" in text else 0.5 if "float" in text else 3 if "int" in text else "x"
    return None


def _with(model, path, value):
    from pydantic import BaseModel

    head, *rest = path
    current = getattr(model, head) if not isinstance(model, dict) else model[next(k for k in model if str(getattr(k, "value", k)) == head)]
    new = value if not rest else _with(current, rest, value)
    if isinstance(model, dict):
        return {k: (new if str(getattr(k, "value", k)) == head else v) for k, v in model.items()}
    assert isinstance(model, BaseModel)
    return model.model_copy(update={head: new})


def _fake(stage: str, tmp: Path, **meta) -> ArtifactRef:
    return ArtifactRef(stage=stage, key=stage * 8, dir=tmp / stage, files={"f": f"digest of {stage}"}, meta=meta)


def _keys_of_every_node(cfg, tmp: Path, monkeypatch) -> dict[str, str]:
    """Each graph node's key for ``cfg``, from the stage functions themselves (their first run_stage call)."""
    import importlib

    from flows.pipeline import GRAPH
    from tasks.config import TrainConfig

    def fake_run_stage(spec, inputs, store, refresh, make):
        raise _Key(stage_key(spec, inputs))

    for node in GRAPH.nodes:
        monkeypatch.setattr(importlib.import_module(node.fn.__module__), "run_stage", fake_run_stage)
    engine = {"backend": "onnxruntime", "engine_file": "engine.onnx", "batch": {"min": 1, "opt": 1, "max": 1}, "inputs": [], "outputs": [], "threads": 2}
    done = {
        "data": _fake("data", tmp), "export": _fake("export", tmp), "validate": _fake("validate", tmp),
        "train": _fake("train", tmp, config=TrainConfig().model_dump(mode="json"), memory_plan={"activation_per_sample": 1}),
    }
    keys = {}
    for inst in GRAPH.instances(cfg.precisions):
        if inst.precision is not None:
            p = inst.precision.value
            done.update({f"precision-{p}": _fake("precision", tmp, precision=p), f"validate-{p}": _fake("validate", tmp), f"build-{p}": _fake("build", tmp, **engine), f"verify-{p}": _fake("verify", tmp)})
        args = GRAPH.arguments(inst, cfg, done)
        with pytest.raises(_Key) as key:
            inst.node.fn(**args, store=tmp, refresh=False)
        keys[inst.id] = str(key.value)
    return keys


def test_every_config_field_a_stage_reads_changes_its_key(tmp_path, monkeypatch):
    """Any stage input (threads, epochs, a tolerance, a profile setting...) changes the key of the stages that read it."""
    from flows.pipeline import GRAPH
    from tasks.config import Backend, PipelineConfig, Precision
    from tasks.graph import Config, Derived

    cfg = PipelineConfig(precisions=[Precision.int8], backend=Backend.onnxruntime)
    base = _keys_of_every_node(cfg, tmp_path, monkeypatch)

    def reads(node, path: str) -> bool:
        sources = [s for v in node.inputs.values() for s in ([*v.sources] if isinstance(v, Derived) else [v])]
        return any(isinstance(s, Config) and (path + ".").startswith(s.path.format(precision="int8") + ".") for s in sources)

    checked = 0
    for path, value, annotation in _leaf_paths(cfg):
        dotted = ".".join(path)
        readers = {i.id for i in GRAPH.instances(cfg.precisions) if reads(i.node, dotted)}
        # profile.enabled decides whether the profile runs, not what it measures; the backend is resolved
        # before any stage (auto -> a concrete one) and enters build's key as its environment.
        # A shape change is valid only across min/opt/max and the dataset's inputs: tests/test_shapes.py
        # checks the keys it changes.
        if not readers or dotted in ("profile.enabled", "backend") or dotted.startswith("shapes."):
            continue
        changed_cfg = _with(cfg, path, _other(value, annotation))
        keys = _keys_of_every_node(changed_cfg, tmp_path, monkeypatch)
        assert readers <= {k for k in keys if keys[k] != base[k]}, f"{dotted}: the key of {sorted(readers)} must change"
        checked += 1
    assert checked > 30  # data, train, batch, engine (threads), tolerances, profile, repair, calibration


def test_a_library_version_change_changes_the_key_and_is_named(tmp_path, monkeypatch, caplog):
    import logging

    import tasks.stage
    from tasks.data import splits_from_dataset
    from tasks.stage import was_cached

    cfg = DataConfig()
    first = splits_from_dataset(cfg, tmp_path)
    assert splits_from_dataset(cfg, tmp_path).key == first.key and was_cached()
    real = tasks.stage._version
    monkeypatch.setattr(tasks.stage, "_version", lambda dist: "99.0" if dist == "scikit-learn" else real(dist))
    with caplog.at_level(logging.INFO, logger="trtflow"):
        again = splits_from_dataset(cfg, tmp_path)
    assert not was_cached() and again.key != first.key
    assert f"data: scikit-learn {real('scikit-learn')} -> 99.0" in caplog.text


def test_the_manifest_records_what_the_key_is_made_of(tmp_path):
    import json

    from tasks.data import SPEC as DATA, splits_from_dataset
    from tasks.stage import key_ingredients

    ref = splits_from_dataset(DataConfig(), tmp_path)
    manifest = json.loads((ref.dir / "manifest.json").read_text())
    ingredients = manifest["ingredients"]
    assert ingredients == json.loads(json.dumps(key_ingredients(DATA, {"cfg": DataConfig()})))
    assert {"tasks/data.py", "tasks/datasource.py", "tasks/stage.py"} <= set(ingredients["code"])
    assert set(ingredients["libraries"]) == {"numpy", "scikit-learn"}


# --- why a stage runs again ------------------------------------------------------------------------


def test_a_rerun_says_what_changed_and_a_damaged_artifact_is_named(tmp_path, caplog):
    import logging

    from tasks.stage import run_stage

    calls: list[int] = []
    with caplog.at_level(logging.INFO, logger="trtflow"):
        run_stage(SPEC, {"x": 1, "tol": {"atol": 1e-4}}, tmp_path, False, _make(b"a", calls))
        assert "demo:" not in caplog.text  # a first run has nothing to explain
        run_stage(SPEC, {"x": 1, "tol": {"atol": 1e-3}}, tmp_path, False, _make(b"a", calls))
        assert "demo: tol changed (atol 0.0001 -> 0.001)" in caplog.messages
        ref = run_stage(SPEC, {"x": 1, "tol": {"atol": 1e-3}}, tmp_path, False, _make(b"a", calls))
        assert len(calls) == 2
        ref.path("out.bin").write_bytes(b"flipped")
        caplog.clear()
        run_stage(SPEC, {"x": 1, "tol": {"atol": 1e-3}}, tmp_path, False, _make(b"a", calls))
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [("WARNING", "demo: damaged out.bin (digest mismatch), recomputing")]


def test_healing_a_damaged_checkpoint_or_onnx_file_is_never_silent(tmp_path, caplog):
    """A truncated model.pt and a flipped byte in model.onnx, found at the lookup: a warning each, then recomputed."""
    import logging

    import _pipeline_kit as kit
    from tasks.config import CollapseGate
    from tasks.data import splits_from_dataset
    from tasks.export import onnx_from_checkpoint
    from tasks.stage import was_cached
    from tasks.train import checkpoint_from_splits

    data = splits_from_dataset(DataConfig(dataset=kit.tiny_dataset(tmp_path / "d.npz", per_class=10)), tmp_path)
    cfg = TrainConfig(epochs=1, batch_size=32, collapse_gate=CollapseGate(enabled=False))
    ckpt = checkpoint_from_splits(data, cfg, tmp_path)
    onnx = onnx_from_checkpoint(ckpt, tmp_path)
    blob = ckpt.path("model.pt").read_bytes()
    ckpt.path("model.pt").write_bytes(blob[: len(blob) // 2])
    model = bytearray(onnx.path("model.onnx").read_bytes())
    model[len(model) // 2] ^= 0xFF
    onnx.path("model.onnx").write_bytes(bytes(model))
    with caplog.at_level(logging.INFO, logger="trtflow"):
        again = checkpoint_from_splits(data, cfg, tmp_path)
        assert not was_cached() and again.problems() == []
        assert onnx_from_checkpoint(again, tmp_path).problems() == [] and not was_cached()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == "trtflow.stage"]
    assert warnings == ["train: damaged model.pt (digest mismatch), recomputing", "export: damaged model.onnx (digest mismatch), recomputing"]
