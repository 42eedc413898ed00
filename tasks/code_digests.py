"""Code versions from imports: which source files a stage runs, and their digests, found without running them.

Two kinds of code enter a stage's cache key (``tasks.stage``):

- **trtflow's own modules**: the stage module and every project module (``tasks.*``, ``flows.*``) it
  imports, transitively, including imports inside functions (``project_code``);
- **the user's model code** (``user_code``): the module of the factory ``pkg.mod:callable`` and every
  module it imports, transitively, that is neither in the standard library nor installed in
  site-packages. A user *package* counts as a whole (every ``.py`` file under it); a single-file module
  as that file. Installed packages the user code imports enter by their distribution's version.

Nothing is executed: modules are located with ``importlib.util.find_spec`` of the top-level name (which
runs no package code) and their imports read with ``ast``. The parsed imports are remembered by the
file's SHA-256 in ``~/.cache/trtflow/imports.json`` (``TRTFLOW_CACHE_DIR`` moves it), so a cached run
hashes files but parses none; digests are computed once per process (the code a process runs is the
code it imported).

    from tasks.code_digests import project_code, user_code
    project_code("tasks.export")        # {"tasks/export.py": "3f2a...", "tasks/train.py": ..., ...}
    user_code("usernet:build").files    # {"usernet.py": "...", "helper.py": "..."}
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import site
import sys
import sysconfig
import threading
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import metadata, util
from pathlib import Path
from typing import Any

#: the repository root: the folder holding the ``tasks`` and ``flows`` packages
ROOT = Path(__file__).resolve().parent.parent
#: trtflow's own top-level packages
PROJECT = ("tasks", "flows")

#: an import statement as read from the source: (module or "", imported names, relative level)
ImportRecord = tuple[str, tuple[str, ...], int]
#: a string naming a project module (or ``module:attribute``): code run by name, not imported
_RUN_BY_NAME = re.compile(r"(?:%s)(?:\.\w+)+(?::[\w.]+)?" % "|".join(PROJECT))
#: bumped when ``parse_imports`` changes: older cache entries are not read
_PARSER = "2"


def cache_dir() -> Path:
    """trtflow's per-user cache folder (``$TRTFLOW_CACHE_DIR``, else ``$XDG_CACHE_HOME/trtflow`` or ``~/.cache/trtflow``)."""
    base = os.environ.get("TRTFLOW_CACHE_DIR") or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "trtflow")
    return Path(base)


# --- imports of one file ---------------------------------------------------------------------------

_IMPORTS_LOCK = threading.Lock()
#: source digest -> its import records; filled from and flushed to ``imports.json``
_IMPORTS: dict[str, list[ImportRecord]] | None = None
#: the entries this process parsed and has not written yet (only these are written: the others are the file's)
_IMPORTS_NEW: dict[str, list[ImportRecord]] = {}
#: entries past which the file starts again from this process's new ones
_IMPORTS_BOUND = 20_000


#: CPython 3.11's AST constructor keeps its recursion depth in shared state: two threads parsing at
#: once can fail with "SystemError: AST constructor recursion depth mismatch" (cpython#106905), and a
#: flow's branches hash their code in parallel threads. One parse at a time.
_PARSE_LOCK = threading.Lock()


def parse_imports(source: bytes) -> list[ImportRecord]:
    """Every import statement of a module's source, wherever it is (module level, functions, branches).

    A file that does not parse has no imports (its digest still enters the key).
    """
    try:
        with _PARSE_LOCK:
            tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    out: list[ImportRecord] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(alias.name, (), 0) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            out.append((node.module or "", tuple(alias.name for alias in node.names), node.level))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and _RUN_BY_NAME.fullmatch(node.value):
            # A project module run by name (``python -m tasks.backends._trt_build``, ``"tasks.models:f"``).
            out.append((node.value.partition(":")[0], (), 0))
    return out


def _imports_file() -> Path:
    return cache_dir() / "imports.json"


def _load_imports() -> dict[str, list[ImportRecord]]:
    global _IMPORTS
    if _IMPORTS is None:
        try:
            stored = json.loads(_imports_file().read_text())
            _IMPORTS = {k: [(m, tuple(n), int(lv)) for m, n, lv in v] for k, v in stored.items()} if isinstance(stored, dict) else {}
        except (OSError, ValueError, TypeError):
            _IMPORTS = {}
    return _IMPORTS


def _imports_of(source: bytes, digest: str) -> list[ImportRecord]:
    """``parse_imports`` remembered by the source's digest (content-addressed: never stale)."""
    entry = f"{_PARSER}:{digest}"
    with _IMPORTS_LOCK:
        known = _load_imports().get(entry)
    if known is not None:
        return known
    found = parse_imports(source)
    with _IMPORTS_LOCK:
        _load_imports()[entry] = found
        _IMPORTS_NEW[entry] = found
    return found


def _flush_imports() -> None:
    """Write newly parsed imports to the cache file (only a speed-up: failures are ignored)."""
    with _IMPORTS_LOCK:
        if not _IMPORTS_NEW:
            return
        path = _imports_file()
        try:
            try:
                stored = json.loads(path.read_text())  # another process may have added entries
                stored = stored if isinstance(stored, dict) else {}
            except (OSError, ValueError):
                stored = {}
            if len(stored) > _IMPORTS_BOUND:
                stored = {}
            stored.update({k: [list(r) for r in v] for k, v in _IMPORTS_NEW.items()})
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
            tmp.write_text(json.dumps(stored))
            os.replace(tmp, path)
        except OSError:
            pass
        _IMPORTS_NEW.clear()


@dataclass(frozen=True)
class _File:
    digest: str
    imports: list[ImportRecord]


@lru_cache(maxsize=None)
def _read(path: Path) -> _File:
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    return _File(digest, _imports_of(data, digest) if path.suffix == ".py" else [])


def _absolute(record: ImportRecord, module: str, is_package: bool) -> list[str]:
    """The dotted module names an import statement may load (parents first), made absolute."""
    name, names, level = record
    if level:
        parts = module.split(".") if is_package else module.split(".")[:-1]
        parts = parts[: len(parts) - (level - 1)] if level > 1 else parts
        if not parts:
            return []
        name = ".".join([*parts, name] if name else parts)
    if not name:
        return []
    pieces = name.split(".")
    out = [".".join(pieces[: i + 1]) for i in range(len(pieces))]
    # `from pkg import sub` loads pkg.sub when sub is a module (checked by the caller).
    out += [f"{name}.{n}" for n in names if n != "*"]
    return out


# --- trtflow's own modules -------------------------------------------------------------------------


@lru_cache(maxsize=None)
def _project_file(module: str) -> Path | None:
    parts = module.split(".")
    if parts[0] not in PROJECT:
        return None
    base = ROOT.joinpath(*parts)
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    return None


@lru_cache(maxsize=None)
def _project_imports(module: str) -> tuple[str, ...]:
    """The project modules one project module loads directly: its imports and its parent packages."""
    path = _project_file(module)
    if path is None:
        return ()
    parts = module.split(".")
    out = [".".join(parts[:i]) for i in range(1, len(parts))]  # importing a.b runs a/__init__.py
    for record in _read(path).imports:
        out += [m for m in _absolute(record, module, path.name == "__init__.py") if m.split(".")[0] in PROJECT]
    return tuple(m for m in dict.fromkeys(out) if _project_file(m) is not None)


@lru_cache(maxsize=None)
def project_code(module: str) -> dict[str, str]:
    """The digests of a project module and of every project module it imports, transitively.

    Args:
        module: a dotted name under ``tasks`` or ``flows`` (e.g. ``tasks.export``).

    Returns:
        Path relative to the repository root (``tasks/export.py``) -> SHA-256, sorted by path; empty
        when ``module`` is not a project module.
    """
    todo, seen = [module], set()
    while todo:
        name = todo.pop()
        if name not in seen and _project_file(name) is not None:
            seen.add(name)
            todo += _project_imports(name)
    _flush_imports()
    files = {_project_file(m) for m in seen}
    return dict(sorted((p.relative_to(ROOT).as_posix(), _read(p).digest) for p in files if p is not None))


# --- the user's code -------------------------------------------------------------------------------


@dataclass(frozen=True)
class UserCode:
    """What a model factory's code is made of.

    Attributes:
        files: user source file (relative to the folder its top-level module or package is found in,
            e.g. ``usernet.py``, ``mypkg/layers.py``) -> SHA-256.
        project: trtflow modules it imports -> SHA-256 (as ``project_code``).
        libraries: installed distributions it imports -> version.
    """

    files: dict[str, str] = field(default_factory=dict)
    project: dict[str, str] = field(default_factory=dict)
    libraries: dict[str, str] = field(default_factory=dict)


@lru_cache(maxsize=1)
def _installed_roots() -> tuple[Path, ...]:
    paths = {sysconfig.get_paths().get(k) for k in ("purelib", "platlib", "stdlib", "platstdlib")}
    try:
        paths.update(site.getsitepackages())
    except AttributeError:  # some virtualenv builds lack it
        pass
    try:
        paths.add(site.getusersitepackages())
    except AttributeError:
        pass
    for base in {sys.prefix, sys.base_prefix, sys.exec_prefix}:
        paths.add(os.path.join(base, "lib"))
        paths.add(os.path.join(base, "lib64"))
    return tuple(Path(p).resolve() for p in paths if p)


def _under(path: Path, roots: tuple[Path, ...]) -> bool:
    return any(path == r or r in path.parents for r in roots)


def _locations(top: str) -> tuple[str, list[Path]]:
    """Where a top-level module lives: ('stdlib'|'installed'|'project'|'user'|'absent', its files or folders)."""
    if top in sys.builtin_module_names or top in getattr(sys, "stdlib_module_names", ()):
        return "stdlib", []
    try:
        spec = util.find_spec(top)  # a top-level name: finds it without running any of its code
    except (ImportError, ValueError, AttributeError):
        spec = None
    if spec is None:
        return "absent", []
    if spec.origin in ("built-in", "frozen"):
        return "stdlib", []
    places = [Path(p) for p in (spec.submodule_search_locations or [])] or ([Path(spec.origin)] if spec.origin else [])
    places = [p.resolve() for p in places if p.exists()]
    if not places:
        return "absent", []
    if top in PROJECT and all(_under(p, (ROOT,)) for p in places):
        return "project", places
    if all(_under(p, _installed_roots()) for p in places):
        return "installed", places
    return "user", places


@lru_cache(maxsize=1)
def _distributions() -> dict[str, list[str]]:
    """Top-level module -> distributions providing it (``importlib.metadata.packages_distributions``).

    That reads every installed distribution's file list (about half a second), so the mapping is kept in
    ``distributions.json`` of the cache folder while no site-packages folder changes (installing or
    removing a distribution changes its folder's mtime).
    """
    stamp = []
    for root in sorted({str(p) for p in _installed_roots() if p.name in ("site-packages", "dist-packages")}):
        try:
            stamp.append([root, os.stat(root).st_mtime_ns])
        except OSError:
            pass
    path = cache_dir() / "distributions.json"
    try:
        stored = json.loads(path.read_text())
        if stored.get("stamp") == stamp and isinstance(stored.get("map"), dict):
            return stored["map"]
    except (OSError, ValueError, AttributeError):
        pass
    found = {k: sorted(set(v)) for k, v in metadata.packages_distributions().items()}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"stamp": stamp, "map": found}))
        os.replace(tmp, path)
    except OSError:
        pass
    return found


def _version_of_module(top: str) -> str:
    for dist in (top, top.replace("_", "-")):
        try:
            return f"{dist} {metadata.version(dist)}"
        except metadata.PackageNotFoundError:
            pass
    dists = _distributions().get(top) or []
    versions = []
    for dist in sorted(set(dists)):
        try:
            versions.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            pass
    return ", ".join(versions) or "unknown version"


def _user_files(top: str, places: list[Path]) -> dict[Path, str]:
    """The source files of a user module (a file) or package (every .py file under it), by display name."""
    out: dict[Path, str] = {}
    for place in places:
        if place.is_dir():
            for p in sorted(place.rglob("*.py")):
                rel = p.relative_to(place)
                if "__pycache__" in rel.parts or any(part.startswith(".") for part in rel.parts):
                    continue
                out[p] = (Path(place.name) / rel).as_posix()
        else:
            out[place] = place.name
    return out


@lru_cache(maxsize=None)
def user_code(model: str) -> UserCode:
    """The code a model factory ``pkg.mod:callable`` runs, found from its imports without importing it.

    Args:
        model: the factory path (``config.train.model``).

    Returns:
        Its user source files, the trtflow modules and the installed distributions it imports. A module
        that cannot be found is recorded as ``<name>: absent`` (the stage then fails importing it).
    """
    files: dict[str, str] = {}
    project: dict[str, str] = {}
    libraries: dict[str, str] = {}
    module = model.partition(":")[0]
    todo: list[str] = [module]
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        top = name.split(".")[0]
        if not top or top in seen and top not in PROJECT or name in seen:
            continue
        seen.update((name, top))
        kind, places = _locations(top)
        if kind == "project":
            project.update(project_code(name))
        elif kind == "installed":
            libraries[top] = _version_of_module(top)
        elif kind == "absent":
            files[f"{top} (not found)"] = "absent"
        elif kind == "user":
            for path, shown in _user_files(top, places).items():
                try:
                    found = _read(path)
                except OSError:
                    files[shown] = "unreadable"
                    continue
                files[shown] = found.digest
                rel = Path(shown)
                mod = ".".join([*rel.parent.parts, *([] if rel.stem == "__init__" else [rel.stem])]) or top
                for record in found.imports:
                    todo += _absolute(record, mod, rel.name == "__init__.py")
    _flush_imports()
    return UserCode(dict(sorted(files.items())), dict(sorted(project.items())), dict(sorted(libraries.items())))


def forget() -> None:
    """Forget this process's code digests (tests that edit code between runs; a new process starts empty)."""
    project_code.cache_clear()
    user_code.cache_clear()
    _read.cache_clear()
    _project_file.cache_clear()
    _project_imports.cache_clear()


def describe(model: str) -> dict[str, Any]:
    """The user code of a factory as JSON (for manifests and docs)."""
    found = user_code(model)
    return {"files": found.files, "project": found.project, "libraries": found.libraries}
