"""The run's plan (tasks/plan.py): every check that needs no Prefect, then what the graph runs, on which store."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from flows.pipeline import GRAPH
from tasks.config import Backend, PipelineConfig, Precision, parse_targets
from tasks.errors import ConfigError, DatasetError, PolicyError
from tasks.graph import Instance
from tasks.plan import plan_of
from tasks.policy import ROOTS_ENV
from tasks.stores.local import LocalStore


def test_a_plan_resolves_the_backend_opens_the_store_and_decides_refresh_and_recovery(tmp_path: Path) -> None:
    cfg = PipelineConfig(artifacts_dir=tmp_path / "art", precisions=[Precision.fp32, Precision.int8], refresh=["export"])
    plan = plan_of(cfg, GRAPH)
    assert plan.graph is GRAPH and plan.given is cfg and not plan.over_targets
    assert cfg.backend is Backend.auto and plan.config.backend == "onnxruntime" and plan.backend.startswith("auto: ONNX Runtime")
    assert isinstance(plan.store, LocalStore) and plan.store.root == plan.store.local == (tmp_path / "art").resolve()
    assert (tmp_path / "art").is_dir()  # the store is ready: made and writable
    # --refresh export: export and what takes its artifact (not data, not train)
    assert {"export", "validate", "precision-fp32", "build-int8", "verify-int8", "package"} <= plan.forced
    assert not {"data", "train"} & plan.forced
    # int8 may be repaired, fp32 is never: only int8's verify is a failure the repair mends
    assert plan.recoverable == frozenset({"verify-int8"})
    assert plan.arguments(Instance(GRAPH.nodes[2])) == {"store": plan.store, "refresh": True}
    assert plan.arguments(Instance(GRAPH.nodes[0])) == {"store": plan.store, "refresh": False}


def test_without_repair_nothing_is_recoverable(tmp_path: Path) -> None:
    cfg = PipelineConfig(artifacts_dir=tmp_path, precisions=[Precision.int8], repair={"enabled": False})
    assert plan_of(cfg, GRAPH).recoverable == frozenset()


def test_a_parent_over_targets_plans_the_portable_graph_over_every_targets_precisions(tmp_path: Path) -> None:
    cfg = PipelineConfig(artifacts_dir=tmp_path, precisions=[Precision.fp32],
                         targets=parse_targets("a=pa:onnxruntime:fp32 b=pb:onnxruntime:fp16,int8"))
    plan = plan_of(cfg, GRAPH)
    assert plan.over_targets and plan.backend == "" and plan.config.backend is Backend.auto  # each target names its own
    assert plan.config.precisions == [Precision.fp32, Precision.fp16, Precision.int8]
    names = {n.name for n in plan.graph.nodes}
    assert {"data", "train", "export", "precision"} <= names and not {"build", "verify", "profile"} & names
    assert plan.recoverable == frozenset()  # the repair runs on each target, beside its engines


def test_an_untrusted_run_is_refused_before_any_folder_it_names_is_made(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path / "..")
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    monkeypatch.setenv(ROOTS_ENV, str(allowed))
    outside = Path("/") / "var" / "tmp" / f"trtflow-never-made-{tmp_path.name}"
    cfg = PipelineConfig(artifacts_dir=outside)
    with pytest.raises(PolicyError, match="outside"):
        plan_of(cfg, GRAPH, untrusted=True)
    assert not outside.exists()
    # the same config from the command line (trusted) is planned
    monkeypatch.setenv(ROOTS_ENV, "")
    ok = plan_of(cfg.model_copy(update={"artifacts_dir": allowed / "art"}), GRAPH, untrusted=True)
    assert ok.store.local == (allowed / "art").resolve()


def test_bad_inputs_fail_in_the_plan_with_their_own_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no store is registered for 'ftp://'"):
        plan_of(PipelineConfig(artifacts_dir=tmp_path, store="ftp://host/x"), GRAPH)
    with pytest.raises(DatasetError):
        plan_of(PipelineConfig(artifacts_dir=tmp_path, data={"dataset": tmp_path / "missing.npz"}), GRAPH)
    unlabelled = tmp_path / "u.npz"
    np.savez(unlabelled, x=np.zeros((8, 1, 8, 8), np.float32))
    with pytest.raises(DatasetError, match="without labels y, and no --weights"):
        plan_of(PipelineConfig(artifacts_dir=tmp_path, data={"dataset": unlabelled}), GRAPH)
