"""What a run started through a deployment may do on the worker: which model factories, which folders.

Prefect OSS has no authentication: whoever reaches the API (the UI's Custom run form) chooses a flow
run's parameters. ``train.model`` names Python code that trtflow imports and calls, and dataset, weights
and artifacts paths name files the worker reads and writes. So a run that comes through a deployment
may only use what the operator of the worker declared, in its environment:

- ``TRTFLOW_ALLOWED_MODELS``: model factories ('package.module:callable'), separated by commas or
  whitespace. trtflow's own (``BUILTIN_MODELS``) are always allowed. Matched exactly, before anything
  is imported.
- ``TRTFLOW_ALLOWED_ROOTS``: folders (separated by ``os.pathsep``, ':' on Linux) under which dataset,
  weights and artifacts paths must lie once every symbolic link is followed (``os.path.realpath``),
  besides the working directory of the run (a deployment's pull step sets it to the project root,
  where the default ``artifacts`` folder is).

``trtflow run`` on the user's own machine is not limited by these (the user runs their own code).

    from tasks.policy import allowed_models, check_run
    allowed_models()                     # ['tasks.models:default_model', ..., 'mypkg.nets:Net']
    check_run(config)                    # raises PolicyError naming what is not allowed
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tasks.errors import PolicyError

MODELS_ENV = "TRTFLOW_ALLOWED_MODELS"
ROOTS_ENV = "TRTFLOW_ALLOWED_ROOTS"
#: trtflow's own factories: allowed in every deployment
BUILTIN_MODELS = ("tasks.models:default_model", "tasks.models:SmallCNN", "tasks.models:SmallMLP")


def allowed_models(environ: Mapping[str, str] | None = None) -> list[str]:
    """The model factories deployment runs may use: trtflow's own, then ``TRTFLOW_ALLOWED_MODELS``, in order."""
    env = os.environ if environ is None else environ
    declared = env.get(MODELS_ENV, "").replace(",", " ").split()
    return list(dict.fromkeys([*BUILTIN_MODELS, *declared]))


def allowed_roots(environ: Mapping[str, str] | None = None) -> list[Path]:
    """The folders deployment runs may read and write under (real paths): the working directory, then ``TRTFLOW_ALLOWED_ROOTS``."""
    env = os.environ if environ is None else environ
    given = [p.strip() for p in env.get(ROOTS_ENV, "").split(os.pathsep) if p.strip()]
    return list(dict.fromkeys(Path(os.path.realpath(os.path.expanduser(p))) for p in [os.getcwd(), *given]))


def check_model(model: str, environ: Mapping[str, str] | None = None) -> None:
    """Refuse a model factory the worker does not allow (a string comparison: nothing is imported).

    Raises:
        PolicyError: ``model`` is not in ``allowed_models()``.
    """
    allowed = allowed_models(environ)
    if model in allowed:
        return
    raise PolicyError(
        got=f"train.model '{model}' in a deployment run",
        expected=f"one of the factories this worker allows: {', '.join(allowed)}",
        because="a deployment runs whatever its form is given, and a model factory is Python code the worker would import and call",
        fix=f"choose one of them in the form; the worker's operator adds factories to {MODELS_ENV} (see docs/guarantees.md)",
        summary=f"train.model '{model}' is not in this worker's {MODELS_ENV}; pick a model the form offers",
    )


def _outside(path: Path, roots: list[Path]) -> bool:
    real = Path(os.path.realpath(os.path.expanduser(str(path))))
    return not any(real == r or r in real.parents for r in roots)


def check_paths(paths: Mapping[str, Path | None], environ: Mapping[str, str] | None = None) -> None:
    """Refuse paths that lie outside the allowed roots once symbolic links and '..' are resolved.

    A folder dataset's ``.npy`` files are checked one by one: a link inside an allowed folder may
    point anywhere.

    Args:
        paths: what each path is ("config.data.dataset") -> the path (None: not given).

    Raises:
        PolicyError: naming the first path outside and the allowed roots.
    """
    roots = allowed_roots(environ)
    for what, path in paths.items():
        if path is None:
            continue
        p = Path(path).expanduser()
        members = sorted(p.glob("*.npy")) if what.endswith("dataset") and p.is_dir() and not _outside(p, roots) else []
        for candidate in [p, *members]:
            if _outside(candidate, roots):
                real = os.path.realpath(candidate)
                shown = f"{candidate} (really {real})" if real != str(candidate) else str(candidate)
                raise PolicyError(
                    got=f"{what} {shown}, outside the folders this worker allows",
                    expected=f"a path under {', '.join(map(str, roots))}",
                    because="deployment runs may read and write only where the worker's operator allows (symbolic links and '..' are followed)",
                    fix=f"put the file under one of those folders; the operator sets {ROOTS_ENV} (see docs/guarantees.md)",
                    summary=f"{what} lies outside this worker's {ROOTS_ENV}; move it under an allowed folder: {candidate}",
                )


def check_run(config: Any, environ: Mapping[str, str] | None = None) -> None:
    """Everything a deployment run must satisfy, checked before anything of the run's is imported or read.

    Raises:
        PolicyError: a model factory or a path that the worker does not allow.
    """
    check_model(config.train.model, environ)
    paths = {"config.data.dataset": config.data.dataset, "config.train.weights": config.train.weights, "config.artifacts_dir": config.artifacts_dir}
    # a parent over several targets hands each its folder: the same rule on the parent's worker
    paths.update({f"config.targets[{i}].artifacts_dir": t.artifacts_dir for i, t in enumerate(getattr(config, "targets", []))})
    store = getattr(config, "store", None)
    if store and "://" not in store:
        paths["config.store"] = store  # a folder store is a local path like the others
    elif store and store.lower().startswith("file://"):
        from urllib.parse import unquote, urlparse

        paths["config.store"] = unquote(urlparse(store).path)
    check_paths(paths, environ)


def model_schema(schema: dict[str, Any]) -> None:
    """JSON schema hook of ``train.model``: the form offers the allowed factories as a choice (an enum)."""
    schema["enum"] = allowed_models()
