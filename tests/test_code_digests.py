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
from tasks.graph import Rerun, run_plain


@pytest.fixture(autouse=True)
def _fresh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("TRTFLOW_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(code, "_IMPORTS", None)
    code.forget()
    yield
    code.forget()
    # A user module a test imported must not stand for another test's file of the same name
    # (``find_spec`` answers from ``sys.modules``): mutmut runs the selection twice in one process.
    for name in [m for m in sys.modules if m.split(".")[0] in ("usernet", "helper", "mypkg") or m.startswith("cd_")]:
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
        FACTORY = "tasks.models:default_model"
        DOC = "python -m tasks.not_a_name_alone"
        """
    ).encode()
    found = parse_imports(source)
    assert ("os", (), 0) in found and ("tasks.errors", (), 0) in found
    assert ("", ("sibling",), 1) in found and ("up", ("thing",), 2) in found
    assert ("tasks.train", ("predict_split",), 0) in found  # an import inside a function counts
    assert ("tasks.backends._trt_build", (), 0) in found  # a module run by name (python -m) counts
    assert ("tasks.models", (), 0) in found  # and a factory named module:attribute, by its module
    assert not any(m == "tasks.not_a_name_alone" for m, _, _ in found)


def test_a_stage_key_covers_the_modules_its_functions_import():
    # The hand-kept lists missed these: export calls inference.py and models.py; build runs _trt_build by name.
    export = project_code("tasks.export")
    assert {"tasks/export.py", "tasks/inference.py", "tasks/models.py", "tasks/stage.py", "tasks/__init__.py"} <= set(export)
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
    # Repair has the graph make, validate, build and verify variants again (its Rerun): it runs what
    # those stages run, which its key covers through the rerun's code.
    ran["repair"] = set().union(*(ran[s] for s in ("precision", "validate", "build", "verify")))
    (repair,) = [n for n in GRAPH.nodes if n.name == "repair"]
    (rerun,) = [s for s in repair.inputs.values() if isinstance(s, Rerun)]
    reruns = [n for n in GRAPH.nodes if n.per_precision and n.name in ("precision", "validate", "build", "verify")]
    assert rerun.vary == "precision" and repair.recovers == "verify"
    for stage, files in ran.items():
        covered = set(project_code(modules[stage]))
        if stage == "repair":
            covered |= set().union(*(project_code(n.fn.__module__) for n in reruns))
        missing = files - covered
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


def test_the_cache_folder_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setenv("TRTFLOW_CACHE_DIR", str(tmp_path / "mine"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert code.cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("TRTFLOW_CACHE_DIR")
    assert code.cache_dir() == tmp_path / "xdg" / "trtflow"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert code.cache_dir() == tmp_path / "home" / ".cache" / "trtflow"


def test_parsed_imports_are_remembered_by_content_and_parser_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """What a second process does (tests/test_code_digests.py::test_a_fully_cached_process_parses_no_file), in this one."""
    import ast
    import hashlib
    import json

    project_code("tasks.verify")
    stored = json.loads((tmp_path / "cache" / "imports.json").read_text())
    assert len(stored) > 10 and all(k.startswith(f"{code._PARSER}:") and len(k) == len(code._PARSER) + 65 for k in stored)
    parses: list[int] = []
    real = ast.parse
    monkeypatch.setattr(ast, "parse", lambda *a, **k: parses.append(1) or real(*a, **k))
    monkeypatch.setattr(code, "_IMPORTS", None)
    code.forget()
    assert project_code("tasks.verify") and parses == []  # every file read from the cache, none parsed

    # an entry is used for the content it was parsed from, by this parser version only
    folder = tmp_path / "proj"
    folder.mkdir()
    (folder / "cd_user.py").write_text("import json\n")
    monkeypatch.syspath_prepend(str(folder))
    digest = hashlib.sha256((folder / "cd_user.py").read_bytes()).hexdigest()
    stored = {f"{code._PARSER}:{digest}": [["cd_from_cache", [], 0]], f"0{code._PARSER}:{digest}": [["cd_old_parser", [], 0]]}
    (tmp_path / "cache" / "imports.json").write_text(json.dumps(stored))
    monkeypatch.setattr(code, "_IMPORTS", None)
    code.forget()
    assert user_code("cd_user:build").files == {"cd_from_cache (not found)": "absent", "cd_user.py": digest}
    del stored[f"{code._PARSER}:{digest}"]
    (tmp_path / "cache" / "imports.json").write_text(json.dumps(stored))
    monkeypatch.setattr(code, "_IMPORTS", None)
    code.forget()
    assert user_code("cd_user:build").files == {"cd_user.py": digest} and parses == [1]  # parsed: json is the standard library's


def test_the_imports_cache_keeps_what_other_processes_added_and_survives_a_damaged_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import json

    cache = tmp_path / "cache" / "imports.json"
    cache.parent.mkdir(parents=True)
    cache.write_text(json.dumps({"other:process": [["x", ["y"], 1]]}))
    project_code("tasks.errors")
    stored = json.loads(cache.read_text())
    assert stored["other:process"] == [["x", ["y"], 1]] and len(stored) > 1  # merged, not overwritten
    assert not list(cache.parent.glob(".*tmp"))  # written whole, through a temporary file
    for damaged in ("{not json", "[1, 2]"):
        cache.write_text(damaged)
        monkeypatch.setattr(code, "_IMPORTS", None)
        code.forget()
        assert project_code("tasks.errors") and isinstance(json.loads(cache.read_text()), dict)
    # a cache that grew past its bound starts again from this process's entries
    cache.write_text(json.dumps({f"old:{i}": [] for i in range(code._IMPORTS_BOUND + 1)}))
    monkeypatch.setattr(code, "_IMPORTS", None)
    code.forget()
    project_code("tasks.errors")
    assert not any(k.startswith("old:") for k in json.loads(cache.read_text()))
    # nothing new parsed: the file is not written again
    cache.write_text(json.dumps({"kept": []}))
    code.forget()
    project_code("tasks.errors")
    assert json.loads(cache.read_text()) == {"kept": []}
    # a cache that cannot be written is only a lost speed-up
    monkeypatch.setenv("TRTFLOW_CACHE_DIR", str(tmp_path / "file"))
    (tmp_path / "file").write_text("a file where the folder should be")
    monkeypatch.setattr(code, "_IMPORTS", None)
    code.forget()
    assert project_code("tasks.errors") == project_code("tasks.errors")


def test_a_users_module_inside_the_trtflow_checkout_is_still_the_users(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A model file beside tasks/ and flows/ (a user running from the checkout) is hashed as the user's code; the
    imports cache is written however deep its folder is."""
    (tmp_path / "cd_beside.py").write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(code, "ROOT", tmp_path.resolve())
    monkeypatch.setenv("TRTFLOW_CACHE_DIR", str(tmp_path / "a" / "b" / "cache"))
    assert set(user_code("cd_beside:build").files) == {"cd_beside.py"}
    assert (tmp_path / "a" / "b" / "cache" / "imports.json").is_file()


def test_project_code_is_the_module_its_packages_and_imports_by_path(tmp_path: Path):
    found = project_code("tasks.backends.onnxruntime")
    assert {"tasks/__init__.py", "tasks/backends/__init__.py", "tasks/backends/onnxruntime.py"} <= set(found)
    assert list(found) == sorted(found) and all(not p.startswith("/") for p in found)
    assert project_code("json") == {} and project_code("tasks.no_such_module") == {}


def test_user_code_names_each_import_by_kind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Standard library: nothing; installed: its distribution and version; trtflow: its files; the user's: its files;
    not found: named; a package: every file under it but caches and hidden folders; unreadable: said."""
    from importlib import metadata

    folder = tmp_path / "proj"
    (folder / "cd_pkg" / "sub").mkdir(parents=True)
    (folder / "cd_pkg" / "__pycache__").mkdir()
    (folder / "cd_pkg" / ".hidden").mkdir()
    (folder / "cd_ns").mkdir()  # a namespace package: no __init__.py
    (folder / "cd_net.py").write_text(
        "import sys, json, os.path\nimport numpy, sklearn, yaml\nimport cd_installed, cd_multi\nfrom tasks import config\nimport tasks.errors\n"
        "import cd_missing\nfrom cd_pkg.sub import mod\nimport cd_ns.part\nimport cd_broken\n"
    )
    (folder / "cd_pkg" / "__init__.py").write_text("")
    (folder / "cd_pkg" / "sub" / "__init__.py").write_text("from .. import cd_sibling_name_only\n")
    (folder / "cd_pkg" / "sub" / "mod.py").write_text("from ..sub import other\nimport cd_helper\n")
    (folder / "cd_pkg" / "__pycache__" / "mod.cpython-311.py").write_text("")
    (folder / "cd_pkg" / ".hidden" / "x.py").write_text("")
    (folder / "cd_pkg" / "gone.py").symlink_to(folder / "nowhere.py")  # a dangling link: listed, not readable
    (folder / "cd_ns" / "part.py").write_text("")
    (folder / "cd_helper.py").write_text("")
    (folder / "cd_broken.py").write_text("def broken(:\n")  # does not parse: no imports, still hashed
    site = tmp_path / "site"
    site.mkdir()
    (site / "cd_installed.py").write_text("import cd_helper_never_followed\n")
    (site / "cd_multi.py").write_text("")  # provided by several distributions (one of them no longer installed)
    dists = code._distributions()
    monkeypatch.setattr(code, "_distributions", lambda: {**dists, "cd_multi": ["numpy", "PyYAML", "cd-gone-dist"]})
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.syspath_prepend(str(folder))
    roots = code._installed_roots()
    monkeypatch.setattr(code, "_installed_roots", lambda: (*roots, site.resolve()))
    found = user_code("cd_net:build")
    assert set(found.files) == {"cd_net.py", "cd_pkg/__init__.py", "cd_pkg/sub/__init__.py", "cd_pkg/sub/mod.py", "cd_pkg/gone.py",
                                "cd_ns/part.py", "cd_helper.py", "cd_broken.py", "cd_missing (not found)"}
    assert found.files["cd_pkg/gone.py"] == "unreadable" and found.files["cd_missing (not found)"] == "absent"
    assert all(len(found.files[f]) == 64 for f in ("cd_net.py", "cd_helper.py", "cd_broken.py", "cd_ns/part.py"))
    assert found.libraries == {
        "numpy": f"numpy {metadata.version('numpy')}", "sklearn": f"scikit-learn {metadata.version('scikit-learn')}",
        "yaml": f"PyYAML {metadata.version('PyYAML')}", "cd_installed": "unknown version",
        "cd_multi": f"PyYAML {metadata.version('PyYAML')}, numpy {metadata.version('numpy')}",
    }
    assert {"tasks/config.py", "tasks/errors.py", "tasks/__init__.py"} <= set(found.project) and list(found.project) == sorted(found.project)
    assert list(found.files) == sorted(found.files) and list(found.libraries) == sorted(found.libraries)
    assert code.describe("cd_net:build") == {"files": found.files, "project": found.project, "libraries": found.libraries}


def test_the_map_of_installed_modules_is_kept_while_site_packages_stay_unchanged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import json
    from importlib import metadata

    code._distributions.cache_clear()
    try:
        found = code._distributions()
        assert found["sklearn"] == ["scikit-learn"]
        stored = json.loads((tmp_path / "cache" / "distributions.json").read_text())
        assert stored["map"] == found and stored["stamp"] and all(len(s) == 2 for s in stored["stamp"])
        code._distributions.cache_clear()
        monkeypatch.setattr(metadata, "packages_distributions", lambda: pytest.fail("read again although nothing was installed"))
        assert code._distributions() == found
        stored["stamp"] = [["/elsewhere", 1]]  # a site-packages folder changed: read again
        (tmp_path / "cache" / "distributions.json").write_text(json.dumps(stored))
        code._distributions.cache_clear()
        monkeypatch.setattr(metadata, "packages_distributions", lambda: {"cd_mod": ["cd-dist", "cd-dist"]})
        assert code._distributions() == {"cd_mod": ["cd-dist"]}
        assert json.loads((tmp_path / "cache" / "distributions.json").read_text())["map"] == {"cd_mod": ["cd-dist"]}
    finally:
        code._distributions.cache_clear()


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


def test_modules_are_parsed_one_at_a_time(monkeypatch) -> None:
    """Python 3.11's AST constructor fails when two threads parse at once (the flow's branches hash in threads)."""
    import ast
    import threading
    import time

    from tasks import code_digests

    inside, most = [0], [0]
    real = ast.parse

    def parse(source, *a, **kw):  # noqa: ANN001, ANN002, ANN003, ANN202
        inside[0] += 1
        most[0] = max(most[0], inside[0])
        time.sleep(0.1)  # long enough for the other thread to arrive, were it let in
        inside[0] -= 1
        return real(source, *a, **kw)

    monkeypatch.setattr(code_digests.ast, "parse", parse)
    threads = [threading.Thread(target=code_digests.parse_imports, args=(b"import os\n",)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert most[0] == 1
