"""The layering of trtflow's modules: no import cycle, no import from a lower layer up to a higher one.

Every import statement counts, wherever it stands (in functions and ``TYPE_CHECKING`` blocks too),
resolved as the cache keys resolve it (``tasks.code_digests``). ``docs/development.md`` draws the same map.

    pytest tests/test_layers.py -q
"""

from __future__ import annotations

import ast
from fnmatch import fnmatch
from pathlib import Path

import pytest

import tasks.code_digests as code
from tasks.code_digests import ROOT

#: the layers, lowest first: a module imports only modules of its own layer or of a lower one
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("tasks", "tasks.errors", "tasks.paths", "tasks.progress", "tasks.code_digests", "tasks.sizing")),
    # the precision registry: each entry's conversion, gates and CPU check (config reads its default gates)
    ("precisions", ("tasks.precisions", "tasks.precisions.*", "tasks.emulation")),
    ("models", ("tasks.models",)),
    ("config", ("tasks.config", "tasks.policy", "tasks.shapes", "tasks.options")),
    ("numerics", ("tasks.metrics", "tasks.compare")),
    ("store", ("tasks.artifacts", "tasks.locking", "tasks.store", "tasks.stores", "tasks.stores.*", "tasks.stage")),
    ("backends", ("tasks.backends", "tasks.backends.*")),
    ("data", ("tasks.datasource", "tasks.data", "tasks.inference")),
    ("stages", ("tasks.export", "tasks.diagnose", "tasks.validate", "tasks.precision",
                "tasks.compute_share", "tasks.engine", "tasks.train", "tasks.verify", "tasks.verify_*", "tasks.profile",
                "tasks.repair", "tasks.package", "tasks.triton")),
    ("schedule", ("tasks.graph", "tasks.caching", "tasks.plan")),
    ("flows", ("flows", "flows.*")),
]
#: libraries slow to import: loaded inside the functions that use them (plain ``import`` statements,
#: which the cache keys read), never at module level
HEAVY = ("torch", "onnx", "onnxruntime", "onnxscript", "tensorrt", "pycuda", "sklearn", "matplotlib")
#: run as a script in its own process (``python -m``): importing TensorRT is what it is for
HEAVY_AT_TOP_OK = {"tasks.backends._trt_build"}


def _modules() -> list[str]:
    out = []
    for top in code.PROJECT:
        for path in sorted((ROOT / top).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            out.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return out


def _layer(module: str) -> int:
    for i, (_, patterns) in enumerate(LAYERS):
        if any(fnmatch(module, p) for p in patterns):
            return i
    raise AssertionError(f"{module} is on no layer: add it to LAYERS here and to the map in docs/development.md")


def _statements(module: str) -> list[code.ImportRecord]:
    """The import statements of a module, wherever they stand (functions and ``TYPE_CHECKING`` blocks too)."""
    path = code._project_file(module)
    assert path is not None
    tree = ast.parse(path.read_bytes())
    out: list[code.ImportRecord] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(alias.name, (), 0) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            out.append((node.module or "", tuple(alias.name for alias in node.names), node.level))
    return out


def _imports() -> dict[str, set[str]]:
    """Project module -> the project modules its import statements load.

    Left out: its parent packages (Python runs them first; they import nothing back), and modules it
    only runs by name in a child process (``python -m tasks.backends._trt_build``: a process boundary,
    though the cache keys count them).
    """
    graph = {}
    for m in _modules():
        path = code._project_file(m)
        assert path is not None
        parents = {".".join(m.split(".")[:i]) for i in range(1, len(m.split(".")))}
        found = {d for r in _statements(m) for d in code._absolute(r, m, path.name == "__init__.py")}
        graph[m] = {d for d in found if d.split(".")[0] in code.PROJECT and code._project_file(d) is not None and d != m and d not in parents}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            part = []
            while True:
                w = stack.pop()
                on.discard(w)
                part.append(w)
                if w == v:
                    break
            if len(part) > 1:
                found.append(sorted(part))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def upward(graph: dict[str, set[str]]) -> list[str]:
    """Every import from a module up to a module of a higher layer, as ``a (layer) -> b (layer)``."""
    names = [n for n, _ in LAYERS]
    return sorted(
        f"{a} ({names[_layer(a)]}) -> {b} ({names[_layer(b)]})"
        for a, deps in graph.items() for b in deps if _layer(b) > _layer(a)
    )


def test_the_project_has_no_import_cycle() -> None:
    assert cycles(_imports()) == []


def test_no_module_imports_a_higher_layer() -> None:
    assert upward(_imports()) == []


def test_the_checks_find_a_cycle_and_an_upward_import() -> None:
    # What the two tests above would say of the cycle that errors -> options -> config -> errors was.
    graph = {"tasks.errors": {"tasks.options"}, "tasks.options": {"tasks.config"}, "tasks.config": {"tasks.errors"}}
    assert cycles(graph) == [["tasks.config", "tasks.errors", "tasks.options"]]
    assert upward(graph) == ["tasks.errors (base) -> tasks.options (config)"]
    with pytest.raises(AssertionError, match="on no layer"):
        _layer("tasks.somewhere_new")


def test_errors_know_neither_prefect_nor_the_command_line() -> None:
    """An error is data (got, expected, because, fix); the CLI and the flow render it."""
    source = (ROOT / "tasks" / "errors.py").read_bytes()
    imported = {m.split(".")[0] for m, _, _ in code.parse_imports(source)}
    assert not imported & {"prefect", "argparse", "tasks", "flows"}, imported
    assert _imports()["tasks.errors"] == set()


def test_only_the_task_wrapper_meets_prefect_among_the_stages() -> None:
    meets = {m for m in _modules() if m.startswith("tasks") and _reads_prefect(m)}
    assert meets == {"tasks.caching"}


def _reads_prefect(module: str) -> bool:
    path = code._project_file(module)
    assert path is not None
    return any(m.split(".")[0] == "prefect" for m, _, _ in code.parse_imports(path.read_bytes()))


def _imported_at_top(tree: ast.Module) -> list[str]:
    """Modules imported by statements that run when the module is imported (not in functions, not for the type checker)."""
    out: list[str] = []

    def walk(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.Import):
                out.extend(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and not node.level:
                out.append(node.module or "")
            elif isinstance(node, ast.If):
                if not (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"):
                    walk(node.body)
                walk(node.orelse)
            elif isinstance(node, ast.Try):
                walk(node.body)
                for h in node.handlers:
                    walk(h.body)
                walk(node.orelse)
                walk(node.finalbody)
            elif isinstance(node, ast.With):
                walk(node.body)

    walk(tree.body)
    return out


def _dynamic_imports(tree: ast.Module) -> list[str]:
    """Heavy libraries loaded through ``importlib.import_module`` or ``__import__`` (invisible to the cache keys' reader)."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
            if name in ("import_module", "__import__") and node.args[0].value.split(".")[0] in HEAVY:
                out.append(node.args[0].value)
    return out


def test_heavy_libraries_are_imported_in_the_functions_that_use_them() -> None:
    """One idiom for lazy imports: a plain import statement inside the function (read by the cache keys too)."""
    at_top, dynamic = [], []
    for m in _modules():
        path = code._project_file(m)
        assert path is not None
        tree = ast.parse(path.read_bytes())
        if m not in HEAVY_AT_TOP_OK:
            at_top += [f"{m}: {name}" for name in _imported_at_top(tree) if name.split(".")[0] in HEAVY]
        dynamic += [f"{m}: {name}" for name in _dynamic_imports(tree)]
    assert at_top == [] and dynamic == []


def test_the_lazy_import_check_sees_a_module_level_import() -> None:
    tree = ast.parse("import os\nif TYPE_CHECKING:\n    import torch\ntry:\n    import onnx\nexcept ImportError:\n    pass\ndef f():\n    import tensorrt\n")
    assert _imported_at_top(tree) == ["os", "onnx"]
    assert _dynamic_imports(ast.parse("importlib.import_module('torch.nn')\n__import__('json')\n")) == ["torch.nn"]


def test_the_layer_map_in_the_docs_names_every_layer() -> None:
    text = Path(ROOT / "docs" / "development.md").read_text()
    for name, _ in LAYERS:
        assert f"**{name}**" in text, f"docs/development.md does not describe the layer {name}"
