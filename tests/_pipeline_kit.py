"""Helpers shared by the robustness tests (crash safety, integrity, concurrency, bad input, retries,
safe loading): a tiny dataset, its config, the whole pipeline as plain function calls, and a child
process that runs it.

    import _pipeline_kit as kit
    good = kit.good_run(tmp_path_factory)            # one tiny verified pipeline per session
    root = kit.clone(good.root, tmp_path / "a")      # a private copy to damage
    refs = kit.run_plain(kit.with_root(good.config, root))
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tasks.artifacts import ArtifactRef
from tasks.config import Backend, BatchProfile, CollapseGate, DataConfig, PipelineConfig, Precision, ProfileConfig, ShipConfig, TrainConfig

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
#: the stages every robustness test runs (profile is off in their config: timings differ run to run)
STAGES = ("data", "train", "export", "validate", "precision", "build", "verify")

#: a child process: run the plain pipeline of the config in argv[1], print the artifact digests as JSON
CHILD = """
import json, os, sys
sys.path.insert(0, {tests!r})
import _pipeline_kit as kit
from tasks.config import PipelineConfig
cfg = PipelineConfig.model_validate_json(sys.argv[1])
if os.environ.get("KIT_COUNT_CALLS"):
    kit.count_calls(os.environ["KIT_COUNT_CALLS"])
print(json.dumps(kit.digests(kit.run_plain(cfg))))
""".format(tests=str(TESTS))


def tiny_dataset(path: Path, per_class: int = 40) -> Path:
    """Write ``per_class`` digits per class (3×32×32, 10 classes) to an npz file; trains in about a second."""
    from tasks.datasource import digits_dataset

    if not path.is_file():
        x, y = digits_dataset()
        idx = np.concatenate([np.flatnonzero(y == c)[:per_class] for c in range(10)])
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, x=x[idx], y=y[idx])
        os.replace(tmp, path)
    return path


def tiny_config(root: Path, dataset: Path, **overrides: Any) -> PipelineConfig:
    """A config for the tiny dataset: 1 epoch, no collapse gate, fp32 + int8 on ONNX Runtime, batches 1/4/8."""
    base: dict[str, Any] = {
        "artifacts_dir": root,
        "data": DataConfig(dataset=dataset),
        "train": TrainConfig(epochs=1, batch_size=32, collapse_gate=CollapseGate(enabled=False)),
        "precisions": [Precision.fp32, Precision.int8],
        "backend": Backend.onnxruntime,
        "batch": BatchProfile(min=1, opt=4, max=8),
        "calibration_samples": 32,
        # Timings differ run to run: the robustness tests compare digests of everything else.
        "profile": ProfileConfig(enabled=False),
        # No bundle: tests/test_package.py covers the package stage (and its default policy needs timings).
        "ship": ShipConfig(enabled=False),
    }
    base.update(overrides)
    return PipelineConfig(**base)


def with_root(cfg: PipelineConfig, root: Path) -> PipelineConfig:
    """The same config writing into another artifacts folder (keys do not depend on the folder)."""
    return cfg.model_copy(update={"artifacts_dir": root})


def run_plain(cfg: PipelineConfig, refresh: tuple[str, ...] = ()) -> dict[str, ArtifactRef]:
    """Run every stage of the pipeline's graph as a plain function (no Prefect).

    Returns:
        Artifacts by instance id: data, train, export, validate, then ``<stage>-<precision>`` for
        precision, validate, build and verify (and profile when the config enables it).
    """
    from flows.pipeline import GRAPH
    from tasks.graph import run_plain as run_graph

    return run_graph(GRAPH, cfg, refresh)


def digests(refs: dict[str, ArtifactRef]) -> dict[str, str]:
    """Artifact name -> content digest."""
    return {k: v.digest for k, v in refs.items()}


def count_calls(log_file: str) -> None:
    """Append a line '<name> <pid>' to ``log_file`` whenever training or export actually runs."""
    import tasks.export
    import tasks.train

    def counted(module: Any, name: str) -> None:
        inner = getattr(module, name)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with open(log_file, "a") as f:
                f.write(f"{name} {os.getpid()}\n")
            return inner(*args, **kwargs)

        setattr(module, name, wrapper)

    counted(tasks.train, "train_model")
    counted(tasks.export, "onnx_from_module")


def child_env(**extra: str) -> dict[str, str]:
    """Environment of a child process: the repo importable, quiet, one thread per library."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("TRTFLOW_TEST_KILL_AT", None)
    env.update(extra)
    return env


def run_child(cfg: PipelineConfig, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run the plain pipeline in a child process (with extra environment ``env``) and wait for it."""
    return subprocess.run(
        [sys.executable, "-c", CHILD, cfg.model_dump_json()],
        cwd=REPO, env=child_env(**(env or {})), capture_output=True, text=True, timeout=timeout,
    )


def start_child(cfg: PipelineConfig, **env: str) -> subprocess.Popen[str]:
    """Start the plain pipeline in a child process (stdout: the digests as JSON)."""
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, cfg.model_dump_json()],
        cwd=REPO, env=child_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def child_digests(out: str) -> dict[str, str]:
    """The digests a child printed (its last stdout line)."""
    return json.loads(out.strip().splitlines()[-1])


def clone(src: Path, dst: Path) -> Path:
    """Copy an artifacts folder (without Prefect's records) to damage it without touching the original."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".prefect"))
    return dst


def committed(root: Path, stage: str) -> list[Path]:
    """Committed artifact folders of a stage (not staging, trash or lock files)."""
    folder = root / stage
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")) if folder.is_dir() else []


def leftovers(root: Path) -> list[Path]:
    """Staging and trash folders anywhere under an artifacts folder."""
    return sorted(p for p in root.rglob(".*") if p.is_dir() and p.name.startswith((".tmp-", ".trash-")))


@dataclass
class Good:
    """One uninterrupted tiny pipeline; tests must not modify its folder (clone it first)."""

    root: Path
    config: PipelineConfig
    refs: dict[str, ArtifactRef]

    @property
    def digests(self) -> dict[str, str]:
        return digests(self.refs)


def good_run(tmp_path_factory: Any) -> Good:
    """The session's good run: computed by the first test module that asks, cache hits afterwards."""
    base = tmp_path_factory.getbasetemp()
    dataset = tiny_dataset(base / "robust-tiny.npz")
    cfg = tiny_config(base / "robust-good", dataset)
    refs = run_plain(cfg)
    assert all(not r.problems() for r in refs.values())
    assert all(refs[f"verify-{p.value}"].meta["passed"] for p in cfg.precisions)
    return Good(Path(cfg.artifacts_dir), cfg, refs)
