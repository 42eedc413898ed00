"""Code versions are derived from imports: trtflow's modules a stage runs, and the user's model code.

    pytest tests/test_code_digests.py -q
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

import _pipeline_kit as kit
import tasks.code_digests as code
from flows.pipeline import GRAPH
from tasks.code_digests import ROOT, parse_imports, project_code, user_code
from tasks.config import Precision, ProfileConfig, ShipConfig
from tasks.graph import run_plain


@pytest.fixture(autouse=True)
def _fresh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("TRTFLOW_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(code, "_IMPORTS", None)
    code.forget()
    yield
    code.forget()
    # A user module a test imported must not stand for another test's file of the same name
    # (``find_spec`` answers from ``sys.modules``): mutmut runs the selection twice in one process.
    for name in [m for m in sys.modules if m.split(".")[0] in ("usernet", "helper", "mypkg")]:
        del sys.modules[name]


def test_imports_are_read_everywhere_in_a_module_and_by_name():
    source = textwrap.dedent(
        """
        import os, tasks.errors
        from . import sibling
        from ..up import thing
        def f():
            from tasks.train import predict_split
        CMD = "tasks.backends._trt_build"
        DOC = "python -m tasks.not_a_name_alone"
        """
    ).encode()
    found = parse_imports(source)
    assert ("os", (), 0) in found and ("tasks.errors", (), 0) in found
    assert ("", ("sibling",), 1) in found and ("up", ("thing",), 2) in found
    assert ("tasks.train", ("predict_split",), 0) in found  # an import inside a function counts
    assert ("tasks.backends._trt_build", (), 0) in found  # a module run by name (python -m) counts
    assert not any(m == "tasks.not_a_name_alone" for m, _, _ in found)


def test_a_stage_key_covers_the_modules_its_functions_import():
    # The hand-kept lists missed these: export calls train.py and models.py; build runs _trt_build by name.
    export = project_code("tasks.export")
    assert {"tasks/export.py", "tasks/train.py", "tasks/models.py", "tasks/stage.py", "tasks/__init__.py"} <= set(export)
    assert {"tasks/backends/_trt_build.py", "tasks/backends/onnxruntime.py", "tasks/backends/__init__.py"} <= set(project_code("tasks.engine"))
    assert all(len(d) == 64 for d in export.values())
    assert project_code("json") == {}


def _trace_project_calls(calls: dict[str, set[str]], current: list[str]):
    def profile(frame, event, arg):
        if event == "call" and current:
            calls.setdefault(current[-1], set()).add(frame.f_code.co_filename)

    return profile


@pytest.mark.slow
def test_every_project_module_a_stage_calls_into_is_in_its_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Run the pipeline with a profiler: every trtflow file whose code a stage runs is in that stage's key."""
    calls: dict[str, set[str]] = {}
    current: list[str] = []
    nodes = []
    for node in GRAPH.nodes:
        def traced(*args, __fn=node.fn, __name=node.name, **kwargs):
            current.append(__name)
            try:
                return __fn(*args, **kwargs)
            finally:
                current.pop()

        nodes.append(type(node)(**{**node.__dict__, "fn": traced}))
    graph = type(GRAPH)(*nodes)
    cfg = kit.tiny_config(
        tmp_path / "art", kit.tiny_dataset(tmp_path / "d.npz", per_class=20), precisions=[Precision.fp32, Precision.fp16],
        profile=ProfileConfig(min_seconds=0, min_iterations=2, max_seconds=0.05, warmup=1), ship=ShipConfig(),  # the kit turns package off
    )
    hook = _trace_project_calls(calls, current)
    sys.setprofile(hook)
    threading.setprofile(hook)
    try:
        run_plain(graph, cfg)
    finally:
        sys.setprofile(None)
        threading.setprofile(None)  # type: ignore[arg-type]
    modules = {n.name: n.fn.__module__ for n in GRAPH.nodes}
    assert set(calls) == set(modules) - {"repair"}  # every stage ran (repair only runs after a failed verification)
    ran = {
        stage: {p.relative_to(ROOT).as_posix() for p in map(Path, files) if p.is_relative_to(ROOT / "tasks") or p.is_relative_to(ROOT / "flows")}
        for stage, files in calls.items()
    }
    # Repair makes, validates, builds and verifies variants itself: it runs what those stages run.
    ran["repair"] = set().union(*(ran[s] for s in ("precision", "validate", "build", "verify")))
    for stage, files in ran.items():
        missing = files - set(project_code(modules[stage]))
        assert not missing, f"{stage} runs {sorted(missing)}, which its key does not cover"


def _user_project(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "usernet.py").write_text("import json\nimport numpy\nimport helper\nfrom mypkg import layers\n\ndef build():\n    return None\n")
    # Hashing must not run the user's code: this module fails when it is imported.
    (folder / "helper.py").write_text("raise RuntimeError('imported')\n")
    (folder / "mypkg").mkdir()
    (folder / "mypkg" / "__init__.py").write_text("")
    (folder / "mypkg" / "layers.py").write_text("from .blocks import Block\n")
    (folder / "mypkg" / "blocks.py").write_text("Block = 1\n")
    (folder / "mypkg" / "unused.py").write_text("X = 1\n")
    return folder


def test_user_code_is_the_factory_module_and_what_it_imports_outside_installed_packages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    folder = _user_project(tmp_path / "proj")
    monkeypatch.syspath_prepend(str(folder))
    found = user_code("usernet:build")
    assert set(found.files) == {"usernet.py", "helper.py", "mypkg/__init__.py", "mypkg/layers.py", "mypkg/blocks.py", "mypkg/unused.py"}
    assert list(found.libraries) == ["numpy"] and found.libraries["numpy"].startswith("numpy ")  # installed: by version
    assert "helper" not in sys.modules and "usernet" not in sys.modules  # nothing was run
    before = found.files

    # Any file of the user's package counts, imported by the factory or not (a package is hashed whole).
    (folder / "mypkg" / "unused.py").write_text("X = 2\n")
    (folder / "helper.py").write_text("raise RuntimeError('imported!')\n")
    code.forget()
    after = user_code("usernet:build").files
    assert {k for k in before if before[k] != after[k]} == {"mypkg/unused.py", "helper.py"}


def test_the_default_model_is_trtflow_code_and_an_unknown_module_is_named(tmp_path: Path):
    default = user_code("tasks.models:default_model")
    assert default.files == {} and "tasks/models.py" in default.project
    assert user_code("no_such_module_xyz:build").files == {"no_such_module_xyz (not found)": "absent"}


def test_a_fully_cached_process_parses_no_file(tmp_path: Path):
    """Parsed imports are remembered by content digest: a second process reads them instead of parsing."""
    script = (
        "import ast, sys; calls = []; real = ast.parse\n"
        "ast.parse = lambda *a, **k: calls.append(1) or real(*a, **k)\n"
        "from tasks.code_digests import project_code; project_code('tasks.verify'); print(len(calls))\n"
    )
    env = kit.child_env(TRTFLOW_CACHE_DIR=str(tmp_path / "cache"))
    first, second = (subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True).stdout.strip() for _ in range(2))
    assert int(first) > 10 and second == "0"


# --- through the graph: an edit of the user's model recomputes from the first stage it affects ---------

USERNET = """
import torch
from torch import nn

import helper


class Net(nn.Module):
    def __init__(self, in_features, num_classes, hidden=32):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x):
        return self.fc2(helper.act(self.fc1(x)))


def build(in_features, num_classes):
    return Net(in_features, num_classes)
"""


def _vectors(path: Path) -> Path:
    import numpy as np

    rng = np.random.default_rng(0)
    y = np.arange(240) % 3
    x = rng.normal(size=(240, 16)).astype(np.float32)
    x[:, :3] += 3 * np.eye(3, dtype=np.float32)[y]
    np.savez(path, x=x, y=y)
    return path


def _edited(folder: Path, **files: str) -> None:
    """Write user files and make this process see them, as a new process would."""
    import importlib

    for name, text in files.items():
        (folder / name).write_text(text)
    for name in ("usernet", "helper"):
        sys.modules.pop(name, None)
    importlib.invalidate_caches()
    code.forget()


def test_an_edit_of_the_users_code_recomputes_what_runs_it_and_says_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture):
    import logging

    import torch

    from tasks.config import TrainConfig

    folder = tmp_path / "proj"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    _edited(folder, **{"usernet.py": USERNET, "helper.py": "import torch\n\ndef act(x):\n    return torch.relu(x)\n"})
    data = _vectors(tmp_path / "d.npz")
    train = TrainConfig(model="usernet:build", epochs=1, batch_size=32, collapse_gate={"enabled": False})
    cfg = kit.tiny_config(tmp_path / "art", data, train=train, precisions=[Precision.fp32], batch={"min": 1, "opt": 4, "max": 8})
    first = kit.run_plain(cfg)
    assert set(first["train"].meta) and kit.run_plain(cfg)["train"].key == first["train"].key  # cached while unchanged

    # A module the factory's module imports changed: training runs again, and says why.
    _edited(folder, **{"helper.py": "import torch\n\ndef act(x):\n    return torch.tanh(x)\n"})
    with caplog.at_level(logging.INFO, logger="trtflow"):
        second = kit.run_plain(cfg)
    assert second["train"].key != first["train"].key and second["export"].digest != first["export"].digest
    assert "train: helper.py changed" in caplog.messages

    # Trained weights given, then only forward changes (same weights): export and everything after recompute.
    weights = tmp_path / "w.pt"
    torch.save(torch.load(second["train"].path("model.pt"), weights_only=True)["state_dict"], weights)
    with_weights = cfg.model_copy(update={"train": train.model_copy(update={"weights": weights})})
    before = kit.run_plain(with_weights)
    _edited(folder, **{"usernet.py": USERNET.replace("return self.fc2(", "return 2 * self.fc2(")})
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="trtflow"):
        after = kit.run_plain(with_weights)
    for stage in ("export", "validate", "precision-fp32", "build-fp32", "verify-fp32"):
        assert after[stage].key != before[stage].key, stage
    assert after["export"].digest != before["export"].digest  # the graph has the new Mul
    assert any(m.startswith("export: usernet.py changed") for m in caplog.messages), caplog.messages
    assert after["verify-fp32"].meta["passed"]


def test_hashing_a_model_that_imports_torch_does_not_import_torch(tmp_path: Path):
    (tmp_path / "usernet.py").write_text("import torch\nfrom torch import nn\n\ndef build():\n    return nn.Linear(2, 2)\n")
    script = "import sys; from tasks.code_digests import user_code; u = user_code('usernet:build'); print('torch' in sys.modules, sorted(u.files), sorted(u.libraries))"
    env = kit.child_env(TRTFLOW_CACHE_DIR=str(tmp_path / "cache"), PYTHONPATH=f"{kit.REPO}:{tmp_path}")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False ['usernet.py'] ['torch']"
