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
    assert a != stage_key(StageSpec("demo", "tasks.progress", libraries=("numpy",)), {"x": 1})  # another import closure
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
        args = GRAPH.arguments(inst, cfg, done, lambda i: {"store": tmp, "refresh": False})
        with pytest.raises(_Key) as key:
            inst.node.fn(**args, store=tmp, refresh=False)
        keys[inst.id] = str(key.value)
    return keys


def test_every_config_field_a_stage_reads_changes_its_key(tmp_path, monkeypatch):
    """Any stage input (threads, epochs, a tolerance, a profile setting...) changes the key of the stages that read it."""
    from flows.pipeline import GRAPH
    from tasks.config import Backend, PipelineConfig, Precision
    from tasks.graph import Config, Derived, Rerun

    cfg = PipelineConfig(precisions=[Precision.int8], backend=Backend.onnxruntime)
    base = _keys_of_every_node(cfg, tmp_path, monkeypatch)

    def sources_of(node) -> list:
        out = [s for v in node.inputs.values() for s in ([*v.sources] if isinstance(v, Derived) else [v])]
        for rerun in (v for v in node.inputs.values() if isinstance(v, Rerun)):
            # a recovery's rerun reads what the branch's nodes from ``vary`` through the recovered one read
            branch = [n for n in GRAPH.nodes if n.per_precision and not n.recovers and not n.last]
            names = [n.name for n in branch]
            for n in branch[names.index(rerun.vary):names.index(node.recovers) + 1]:
                out += sources_of(n)
        return out

    def reads(node, path: str) -> bool:
        sources = sources_of(node)
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


# --- what a key is made of, as recorded --------------------------------------------------------------


def _user_module(folder: Path, name: str, body: str) -> str:
    """A user's model module ``name`` in ``folder`` (on sys.path through the caller's monkeypatch)."""
    from tasks.code_digests import forget

    (folder / f"{name}.py").write_text(body)
    forget()
    return f"{name}:build"


def test_the_ingredients_are_plain_json_of_every_input_and_the_code_libraries_and_environment_behind_it(tmp_path, monkeypatch):
    import json
    from importlib import metadata

    from tasks.config import Precision
    from tasks.stage import key_ingredients

    monkeypatch.syspath_prepend(str(tmp_path))
    model = _user_module(tmp_path, "stage_usernet", "import numpy\nimport yaml\nfrom tasks import config\n\ndef build():\n    return None\n")
    up = ArtifactRef(stage="up", key="k", dir="/somewhere", files={"f": "1"})
    spec = StageSpec("demo", "tasks.stage", libraries=("numpy", "no-such-dist-xyz"), environment=lambda inputs: {"n": str(inputs["n"])})
    train = TrainConfig(model=model)
    data_cfg = DataConfig(dataset=Path("/data/d.npz"))
    got = key_ingredients(spec, {"data": data_cfg, "up": up, "cfg": train, "path": Path("/a/b"), "p": Precision.int8, "t": (1, 2), "m": {Precision.fp16: [up]}, "n": 3, "store": "/x", "refresh": True})
    assert json.loads(json.dumps(got)) == got  # plain JSON: what the manifest records is what was hashed
    assert got["stage"] == "demo" and got["environment"] == {"n": "3"}
    assert got["inputs"] == {
        "data": {**data_cfg.model_dump(mode="json"), "dataset": "/data/d.npz"}, "up": {"artifact": "up", "digest": up.digest}, "cfg": train.model_dump(mode="json"), "path": "/a/b", "p": "int8", "t": [1, 2],
        "m": {"fp16": [{"artifact": "up", "digest": up.digest}]}, "n": 3,
    }
    # the stage's own libraries by version (an absent one as such), then those the user's code imports, by distribution
    assert got["libraries"] == {"numpy": metadata.version("numpy"), "no-such-dist-xyz": "absent", "yaml": f"PyYAML {metadata.version('PyYAML')}"}
    assert list(got["user_code"]) == ["stage_usernet.py"] and len(got["user_code"]["stage_usernet.py"]) == 64
    # trtflow's modules: the stage module's closure and those the user's model imports, sorted by path
    assert {"tasks/stage.py", "tasks/code_digests.py", "tasks/config.py"} <= set(got["code"]) and list(got["code"]) == sorted(got["code"])
    # the stage's environment sees the inputs a stage's key_inputs picked
    picked = StageSpec("demo", key_inputs=lambda inputs: {"n": inputs["n"] * 10}, environment=lambda inputs: {"n": str(inputs["n"])})
    assert key_ingredients(picked, {"n": 3, "other": 1}) == {"stage": "demo", "code": {}, "user_code": {}, "libraries": {}, "environment": {"n": "30"}, "inputs": {"n": 30}}


def test_the_users_code_enters_a_key_through_the_training_config_or_the_checkpoint_only(tmp_path, monkeypatch):
    from tasks.stage import factories_in, key_ingredients

    monkeypatch.syspath_prepend(str(tmp_path))
    a = _user_module(tmp_path, "stage_net_a", "def build():\n    return 1\n")
    b = _user_module(tmp_path, "stage_net_b", "def build():\n    return 2\n")
    checkpoint = ArtifactRef(stage="train", key="k", dir="/x", files={"model.pt": "1"}, meta={"config": {"model": b}})
    exported = ArtifactRef(stage="export", key="k", dir="/x", files={"model.onnx": "1"}, meta={"config": {"model": a}})
    assert factories_in({"cfg": TrainConfig(model=b), "ckpt": checkpoint, "onnx": exported, "x": 1}) == [b]  # each once
    assert factories_in({"cfg": TrainConfig(model=b), "other": TrainConfig(model=a)}) == [a, b]  # sorted
    assert factories_in({"ckpt": ArtifactRef(stage="train", key="k", dir="/x", files={}, meta={"config": {"model": None}})}) == []
    assert factories_in({"ckpt": ArtifactRef(stage="train", key="k", dir="/x", files={}, meta={})}) == []
    assert set(key_ingredients(SPEC, {"ckpt": checkpoint})["user_code"]) == {"stage_net_b.py"}
    assert key_ingredients(SPEC, {"onnx": exported})["user_code"] == {}  # an ONNX graph runs no Python of the user's
    before = stage_key(SPEC, {"ckpt": checkpoint})
    _user_module(tmp_path, "stage_net_b", "def build():\n    return 3\n")
    assert stage_key(SPEC, {"ckpt": checkpoint}) != before


# --- why a stage runs again, each cause in words ------------------------------------------------------


def _messages(caplog) -> list[tuple[str, str]]:
    return [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "trtflow.stage"]


def test_a_changed_upstream_artifact_is_named_with_what_changed_it(tmp_path, caplog):
    import json
    import logging

    from tasks.stage import run_stage, stage_instance

    up, calls = StageSpec("up"), []
    with caplog.at_level(logging.INFO, logger="trtflow"):
        u1 = run_stage(up, {"x": 1}, tmp_path, False, _make(b"1", calls))
        run_stage(SPEC, {"up": u1, "cfg": {"lr": 0.1}}, tmp_path, False, _make(b"d", calls))
        u2 = run_stage(up, {"x": 2}, tmp_path, False, _make(b"2", calls))
        run_stage(SPEC, {"up": u2, "cfg": {"lr": 0.1}}, tmp_path, False, _make(b"d", calls))
        assert _messages(caplog) == [("INFO", "up: x changed (1 -> 2)"), ("INFO", "demo: up changed (after up: x changed (1 -> 2))")]
        caplog.clear()
        # the upstream's own cause and a config field of this stage, both said
        u3 = run_stage(up, {"x": 2}, tmp_path, True, _make(b"3", calls))
        run_stage(SPEC, {"up": u3, "cfg": {"lr": 0.2}}, tmp_path, False, _make(b"d", calls))
        assert _messages(caplog) == [("INFO", "up: --refresh, recomputing"), ("INFO", "demo: lr changed (0.1 -> 0.2); up changed (after up: --refresh)")]
        caplog.clear()
        # two instances of the upstream stage: the cause is the one of the instance that made this artifact
        with stage_instance("up-a"):
            run_stage(up, {"x": 30}, tmp_path, False, _make(b"a30", calls))
            run_stage(up, {"x": 31}, tmp_path, False, _make(b"a31", calls))
        with stage_instance("up-b"):
            run_stage(up, {"x": 40}, tmp_path, False, _make(b"b40", calls))
            b41 = run_stage(up, {"x": 41}, tmp_path, False, _make(b"b41", calls))
        caplog.clear()
        # another JSON file beside the records is no record
        (tmp_path / "up" / "notes.json").write_text(json.dumps({"digest": b41.digest, "causes": ["not a record"]}))
        run_stage(SPEC, {"up": b41, "cfg": {"lr": 0.2}}, tmp_path, False, _make(b"d", calls))
        assert _messages(caplog) == [("INFO", "demo: up changed (after up-b: x changed (40 -> 41))")]
        caplog.clear()
        # an upstream artifact whose cause this folder does not know: made by another run
        u4 = run_stage(up, {"x": 4}, tmp_path, False, _make(b"4", calls))
        for record in (tmp_path / "up").glob(".last-*.json"):
            record.unlink()
        run_stage(SPEC, {"up": u4, "cfg": {"lr": 0.2}}, tmp_path, False, _make(b"d", calls))
        assert _messages(caplog)[-1] == ("INFO", "demo: up changed (made by another run)")
        caplog.clear()
        # an upstream made for the first time in this folder: changed, with no cause to add
        u5 = run_stage(StageSpec("up"), {"x": 5}, tmp_path, False, _make(b"5", calls))
        run_stage(SPEC, {"up": u5, "cfg": {"lr": 0.2}}, tmp_path, False, _make(b"d", calls))
        assert _messages(caplog)[-1] == ("INFO", "demo: up changed")


def test_a_deleted_missing_or_unreadable_artifact_is_said_before_it_is_made_again(tmp_path, caplog):
    import logging
    import shutil

    from tasks.stage import run_stage, was_cached

    calls: list[int] = []
    ref = run_stage(SPEC, {"x": 1}, tmp_path, False, _make(b"a", calls))
    with caplog.at_level(logging.INFO, logger="trtflow"):
        ref.path("out.bin").unlink()
        ref = run_stage(SPEC, {"x": 1}, tmp_path, False, _make(b"a", calls))
        (ref.dir / "manifest.json").write_text("{not json")
        ref = run_stage(SPEC, {"x": 1}, tmp_path, False, _make(b"a", calls))
        shutil.rmtree(ref.dir)
        run_stage(SPEC, {"x": 1}, tmp_path, False, _make(b"a", calls))
        run_stage(SPEC, {"x": 1}, tmp_path, True, _make(b"a", calls))
    assert _messages(caplog) == [
        ("WARNING", "demo: missing out.bin, recomputing"),
        ("WARNING", "demo: unreadable manifest.json, recomputing"),
        ("WARNING", "demo: its artifact was deleted, recomputing"),
        ("INFO", "demo: --refresh, recomputing"),
    ]
    assert was_cached() is False and len(calls) == 5


def test_each_instance_of_a_stage_is_compared_with_its_own_last_run(tmp_path, caplog):
    import logging

    from tasks.config import Precision
    from tasks.stage import run_stage, stage_instance

    calls: list[int] = []
    with caplog.at_level(logging.INFO, logger="trtflow"):
        with stage_instance("demo-a"):
            run_stage(SPEC, {"x": 1}, tmp_path, False, _make(b"a", calls))
        with stage_instance("demo-b"):
            run_stage(SPEC, {"x": 5}, tmp_path, False, _make(b"b", calls))
        with stage_instance("demo-a"):
            run_stage(SPEC, {"x": 2}, tmp_path, False, _make(b"a", calls))
        # no instance named: the stage and its precision input
        run_stage(SPEC, {"x": 1, "precision": Precision.int8}, tmp_path, False, _make(b"i", calls))
        run_stage(SPEC, {"x": 2, "precision": Precision.int8}, tmp_path, False, _make(b"i", calls))
        run_stage(SPEC, {"x": 1, "precision": "fp16"}, tmp_path, False, _make(b"h", calls))
        run_stage(SPEC, {"x": 3, "precision": "fp16"}, tmp_path, False, _make(b"h", calls))
        # a stage another instance runs (repair builds and verifies) keeps its own record too
        with stage_instance("demo-Fp32"):  # letters of either case are kept in the record's name
            run_stage(SPEC, {"x": 21}, tmp_path, False, _make(b"u", calls))
        with stage_instance("repair-int8/b"):
            run_stage(SPEC, {"x": 1}, tmp_path, False, _make(b"r", calls))  # found: nothing recorded
            run_stage(SPEC, {"x": 11}, tmp_path, False, _make(b"r", calls))
            run_stage(SPEC, {"x": 14}, tmp_path, False, _make(b"r", calls))
        run_stage(SPEC, {"x": 9}, tmp_path, False, _make(b"p", calls))  # outside any instance: a first run
    assert _messages(caplog) == [
        ("INFO", "demo-a: x changed (1 -> 2)"), ("INFO", "demo-int8: x changed (1 -> 2)"), ("INFO", "demo-fp16: x changed (1 -> 3)"),
        ("INFO", "demo in repair-int8/b: x changed (11 -> 14)"),
    ]
    assert {p.name for p in (tmp_path / "demo").glob(".last-*.json")} == {
        ".last-demo-a.json", ".last-demo-b.json", ".last-demo-int8.json", ".last-demo-fp16.json", ".last-demo_in_repair-int8_b.json", ".last-demo.json", ".last-demo-Fp32.json"}


def test_an_explanation_that_cannot_be_kept_or_read_never_fails_the_stage(tmp_path, caplog):
    import logging

    from tasks.stage import run_stage

    calls: list[int] = []
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / ".last-demo.json").mkdir()  # a folder where the record goes: it cannot be written
    first = run_stage(SPEC, {"x": 1}, tmp_path, False, _make(b"a", calls))
    assert first.problems() == [] and calls == [1]
    (tmp_path / "demo" / ".last-demo.json").rmdir()
    (tmp_path / "demo" / ".last-demo.json").write_text("[1, 2]")  # not a record
    with caplog.at_level(logging.INFO, logger="trtflow"):
        run_stage(SPEC, {"x": 2}, tmp_path, False, _make(b"a", calls))
    assert _messages(caplog) == [] and calls == [1, 1]  # nothing known to compare with: said nothing


def test_what_changed_is_said_in_words_the_users_edits_first():
    from tasks.stage import changes

    old = {
        "user_code": {"usernet.py": "1", "old.py": "1"}, "code": {"tasks/a.py": "1"}, "libraries": {"torch": "2.5.0"}, "environment": {"threads": "1"},
        "inputs": {"cfg": {"epochs": 1, "opt": {"lr": 0.1}}, "data": {"file": "d.npz", "digest": "a", "size": 1}, "gone": 1, "tol": {"atol": 1e-5, "rtol": 0.0}},
    }
    new = {
        "user_code": {"usernet.py": "2", "helper.py": "1"}, "code": {"tasks/a.py": "2"}, "libraries": {"torch": "2.6.0", "onnx": "1.17"}, "environment": {"threads": "2"},
        "inputs": {"cfg": {"epochs": 2, "opt": {"lr": 0.2}}, "data": {"file": "d.npz", "digest": "b", "size": 1}, "tol": {"atol": 1e-3, "rtol": 0.1}, "new": "x" * 50},
    }
    own, derived = changes(old, new)
    assert own == [
        "helper.py added", "old.py removed", "usernet.py changed",
        "epochs changed (1 -> 2)", "opt.lr changed (0.1 -> 0.2)", "d.npz changed", "tol changed (atol 1e-05 -> 0.001, rtol 0.0 -> 0.1)",
        "new added", "gone removed", "trtflow code changed (tasks/a.py)", "onnx absent -> 1.17", "torch 2.5.0 -> 2.6.0", "threads 1 -> 2",
    ] and derived == []
    many_old, many_new = {"code": {f"tasks/{c}.py": "1" for c in "abcde"}}, {"code": {f"tasks/{c}.py": "2" for c in "abcde"}}
    assert changes(many_old, many_new) == (["trtflow code changed (tasks/a.py, tasks/b.py, tasks/c.py and 2 more)"], [])
    long_old, long_new = {"inputs": {"p": {"a": "x" * 50, "b": 1, "c": 1, "d": 1}}}, {"inputs": {"p": {"a": "y" * 50, "b": 2, "c": 2, "d": 2}}}
    assert changes(long_old, long_new)[0] == [f"p changed (a {'x' * 37}... -> {'y' * 37}..., b 1 -> 2, c 1 -> 2)"]  # three at most, each cut
    assert changes({"inputs": {"n": 1}}, {"inputs": {"n": [1, 2]}})[0] == ["n changed (1 -> [1, 2])"]
    assert changes({"stage": "a"}, {"stage": "b"}) == (["its key changed"], [])
    three, four = ({"code": {f"tasks/{c}.py": v for c in cs}} for v, cs in (("1", "abc"), ("1", "abcd")))
    assert changes(three, {"code": {k: "2" for k in three["code"]}})[0] == ["trtflow code changed (tasks/a.py, tasks/b.py, tasks/c.py)"]
    assert changes(four, {"code": {k: "2" for k in four["code"]}})[0] == ["trtflow code changed (tasks/a.py, tasks/b.py, tasks/c.py and 1 more)"]
    assert changes({"libraries": {"onnx": "1.17"}, "environment": {"gpu": "H100"}}, {})[0] == ["onnx 1.17 -> absent", "gpu H100 -> absent"]
    # a file input whose content is the same (another path to it): its fields, not "changed"
    moved = changes({"inputs": {"data": {"file": "d.npz", "digest": "a", "path": "/x"}}}, {"inputs": {"data": {"file": "d.npz", "digest": "a", "path": "/y"}}})
    assert moved == (['data changed (path /x -> /y)'], [])
    # an artifact of the same content under another stage name is this stage's own input change, not an upstream's
    renamed = changes({"inputs": {"ckpt": {"artifact": "train", "digest": "1"}}}, {"inputs": {"ckpt": {"artifact": "load", "digest": "1"}}})
    assert renamed == (["ckpt changed (artifact train -> load)"], [])
    # values are shown as JSON (anything else as its text), 40 characters at most
    assert changes({"inputs": {"p": "a" * 40}}, {"inputs": {"p": "b" * 41}})[0] == [f"p changed ({'a' * 40} -> {'b' * 37}...)"]
    assert changes({"inputs": {"p": {"at": 1}}}, {"inputs": {"p": {"at": Path("/x")}}})[0] == ['p changed (at 1 -> "/x")']
    assert changes({"inputs": {"p": {"a": {"b": 1}}}}, {"inputs": {"p": {"a": {"b": 2}}}})[0] == ["p changed (a.b 1 -> 2)"]  # a nested field by its path
    up_old = {"inputs": {"ckpt": {"artifact": "train", "digest": "1"}}}
    up_new = {"inputs": {"ckpt": {"artifact": "train", "digest": "2"}}}
    asked = []
    assert changes(up_old, up_new, lambda stage, digest: asked.append((stage, digest)) or ["train: epochs changed (1 -> 2)"]) == (
        [], [("ckpt", ["train: epochs changed (1 -> 2)"])])
    assert asked == [("train", "2")] and changes(up_old, up_new) == ([], [("ckpt", None)])  # unknown by default


def test_several_upstream_changes_are_said_together_and_a_shared_cause_once(tmp_path, caplog):
    import logging

    from tasks.stage import run_stage

    env = {"gpu": "H100"}
    one, two = StageSpec("one", environment=lambda i: dict(env)), StageSpec("two")
    demo = StageSpec("demo", environment=lambda i: dict(env))
    calls: list[int] = []
    a = run_stage(one, {"x": 1}, tmp_path, False, _make(b"a", calls))
    b = run_stage(two, {"u": 1, "v": 1, "w": 1}, tmp_path, False, _make(b"b", calls))
    run_stage(demo, {"one": a, "two": b}, tmp_path, False, _make(b"d", calls))
    env["gpu"] = "H200"
    with caplog.at_level(logging.INFO, logger="trtflow"):
        a = run_stage(one, {"x": 2}, tmp_path, False, _make(b"a2", calls))
        b = run_stage(two, {"u": 2, "v": 2, "w": 2}, tmp_path, False, _make(b"b2", calls))
        run_stage(demo, {"one": a, "two": b}, tmp_path, False, _make(b"d", calls))
    assert _messages(caplog) == [
        ("INFO", "one: x changed (1 -> 2); gpu H100 -> H200"),
        ("INFO", "two: u changed (1 -> 2); v changed (1 -> 2); w changed (1 -> 2)"),
        # the GPU changed for this stage too: said once, as its own; three upstream causes at most
        ("INFO", "demo: gpu H100 -> H200; one, two changed (after one: x changed (1 -> 2); two: u changed (1 -> 2); two: v changed (1 -> 2))"),
    ]


def test_two_damaged_files_are_named_in_one_warning(tmp_path, caplog):
    import logging

    from tasks.stage import run_stage

    def make(out):
        (out / "a.bin").write_bytes(b"a")
        (out / "b.bin").write_bytes(b"b")
        return {}

    ref = run_stage(SPEC, {"x": 1}, tmp_path, False, make)
    ref.path("a.bin").unlink()
    ref.path("b.bin").write_bytes(b"flipped")
    with caplog.at_level(logging.INFO, logger="trtflow"):
        run_stage(SPEC, {"x": 1}, tmp_path, False, make)
    assert _messages(caplog) == [("WARNING", "demo: missing a.bin, damaged b.bin (digest mismatch), recomputing")]
