"""The flow end to end on a tiny config: caching, resume after failure, damaged artifacts, refresh."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

from flows.pipeline import pipeline
from tasks.config import Precision, Stage, Tolerance
from tasks.errors import VerificationError

pytestmark = pytest.mark.usefixtures("prefect_harness")


def task_states(state) -> dict[str, Counter]:
    """Stage name -> Counter of final state names ('Cached', 'Completed', 'Failed', ...)."""
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
    out: dict[str, Counter] = {}
    for r in runs:
        out.setdefault(r.name.rsplit("-", 1)[0], Counter())[r.state.name] += 1
    return out


def run(config):
    state = pipeline(config, return_state=True)
    return state, task_states(state)


def test_second_run_is_entirely_cached_and_reports_all_precisions(tiny_config):
    first, states = run(tiny_config)
    assert first.is_completed(), first.message
    assert all("Cached" not in c for c in states.values())
    report = json.loads((tiny_config.artifacts_dir / "report.json").read_text())
    assert report["passed"] and set(report["precisions"]) == {"fp32", "fp16", "int8"}
    assert "ONNX Runtime" in report["backend"] or "onnxruntime" in report["backend"]
    for r in report["precisions"].values():
        assert r["passed"] and r["samples"] > 200 and (tiny_config.artifacts_dir / r["engine"]).is_file()

    second, states = run(tiny_config)
    assert second.is_completed()
    assert {name: set(c) for name, c in states.items()} == {name: {"Cached"} for name in states}
    # data, train, export, validate; then precision, validate, build, verify, profile per precision
    assert sum(sum(c.values()) for c in states.values()) == 4 + 5 * 3


def test_failed_verification_reruns_only_verify(tiny_config):
    impossible = Tolerance(atol=0.0, rtol=0.0, min_cosine=1.0, min_top1_agreement=1.0, max_accuracy_drop=0.0)
    bad = tiny_config.model_copy(update={"precisions": [Precision.fp32, Precision.int8], "tolerances": {**tiny_config.tolerances, Precision.int8: impossible}})
    with pytest.raises(VerificationError, match="int8 batch"):
        pipeline(bad)
    report = json.loads((tiny_config.artifacts_dir / "report.json").read_text())
    assert report["passed"] is False and report["precisions"]["fp32"]["passed"] is True
    assert report["precisions"]["int8"]["failed_stage"] == "verify"

    good = bad.model_copy(update={"tolerances": tiny_config.tolerances})
    state, states = run(good)
    assert state.is_completed()
    assert states["verify"] == Counter({"Cached": 1, "Completed": 1})  # fp32 cached, int8 re-verified
    for name in ("data", "train", "export", "validate", "precision", "build"):
        assert set(states[name]) == {"Cached"}, (name, states[name])


def test_damaged_artifacts_rerun_their_stage(tiny_config):
    cfg = tiny_config.model_copy(update={"precisions": [Precision.fp16]})
    state, _ = run(cfg)
    assert state.is_completed()
    root = cfg.artifacts_dir
    (checkpoint,) = root.glob("train/*/model.pt")
    checkpoint.write_bytes(checkpoint.read_bytes()[:-100])  # truncated
    (engine,) = root.glob("build/*/engine.onnx")
    engine.unlink()

    state, states = run(cfg)
    assert state.is_completed(), state.message
    assert states["train"] == Counter({"Completed": 1})
    assert states["build"] == Counter({"Completed": 1})
    # Training is deterministic: the rebuilt checkpoint has the same digest, so export stays cached.
    assert states["export"] == Counter({"Cached": 1})
    assert engine.is_file()


def test_refresh_forces_a_stage_and_its_dependents(tiny_config):
    cfg = tiny_config.model_copy(update={"precisions": [Precision.fp32]})
    assert run(cfg)[0].is_completed()
    state, states = run(cfg.model_copy(update={"refresh": [Stage.build]}))
    assert state.is_completed()
    assert states["build"] == Counter({"Completed": 1}) and states["verify"] == Counter({"Completed": 1})
    assert set(states["train"]) == {"Cached"} and set(states["precision"]) == {"Cached"}


def test_changing_a_parameter_reruns_only_what_it_affects(tiny_config):
    cfg = tiny_config.model_copy(update={"precisions": [Precision.fp32]})
    assert run(cfg)[0].is_completed()
    looser = {**cfg.tolerances, Precision.fp32: cfg.tolerances[Precision.fp32].model_copy(update={"atol": 2e-4})}
    _, states = run(cfg.model_copy(update={"tolerances": looser}))
    assert states["verify"] == Counter({"Completed": 1})
    assert all(set(c) == {"Cached"} for name, c in states.items() if name != "verify")


def test_moved_artifacts_folder_is_still_used(tiny_config, tmp_path):
    cfg = tiny_config.model_copy(update={"precisions": [Precision.fp16]})
    assert run(cfg)[0].is_completed()
    moved = tmp_path / "moved"
    cfg.artifacts_dir.rename(moved)
    # verify must re-run and read every upstream artifact from the new place
    state, states = run(cfg.model_copy(update={"artifacts_dir": moved, "refresh": [Stage.verify]}))
    assert state.is_completed(), state.message
    assert set(states["train"]) == {"Cached"} and states["verify"] == Counter({"Completed": 1})
    report = json.loads((moved / "report.json").read_text())
    assert (moved / report["precisions"]["fp16"]["engine"]).is_file()
