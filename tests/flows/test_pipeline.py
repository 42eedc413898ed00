"""The flow end to end on a tiny config: caching, resume after failure, damaged artifacts, refresh."""

from __future__ import annotations

import json
import time
from collections import Counter

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

from flows.pipeline import pipeline
from tasks.config import Precision, RepairConfig, Stage, Tolerance
from tasks.errors import VerificationError

pytestmark = pytest.mark.usefixtures("prefect_harness")


def task_states(state, report: dict | None = None) -> dict[str, Counter]:
    """Stage name -> Counter of final state names ('Cached', 'Completed', 'Failed', ...), as the API holds them.

    Task runs reach the API server as events, recorded in the background: when the flow returns, some
    runs can still be missing or read Running. The run's report lists every task run the flow finished
    (``tasks``), so this waits until the API holds exactly those, each in its final state, and checks
    that the API and the report agree.

    Args:
        state: the flow run's final state.
        report: the run's report (default: ``report.json`` of the run's artifacts folder, read by the caller).
    """
    expected = Counter((report or {}).get("tasks", {}).values())
    deadline = time.monotonic() + 60
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
            final = [r for r in runs if r.state is not None and r.state.is_final()]
            if (len(final) == len(runs) and (report is None or Counter(r.state.name for r in final) == expected)) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    out: dict[str, Counter] = {}
    for r in runs:
        out.setdefault(r.name.rsplit("-", 1)[0], Counter())[r.state.name] += 1
    if report is not None:
        assert Counter(r.state.name for r in runs) == expected, (out, report["tasks"])
    return out


def run(config):
    state = pipeline(config, return_state=True)
    return state, task_states(state, json.loads((config.artifacts_dir / "report.json").read_text()))


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
    # data, train, export, validate; then precision, validate, build, verify, profile per precision; package
    assert sum(sum(c.values()) for c in states.values()) == 4 + 5 * 3 + 1


def test_failed_verification_reruns_only_verify(tiny_config):
    impossible = Tolerance(atol=0.0, rtol=0.0, min_cosine=1.0, min_top1_agreement=1.0, max_accuracy_drop=0.0)
    # No repair: this is about re-running verification (tests/flows/test_repair_flow.py covers repair).
    bad = tiny_config.model_copy(update={"precisions": [Precision.fp32, Precision.int8], "tolerances": tiny_config.tolerances.model_copy(update={"int8": impossible}), "repair": RepairConfig(enabled=False)})
    with pytest.raises(VerificationError, match="int8 batch"):
        pipeline(bad)
    report = json.loads((tiny_config.artifacts_dir / "report.json").read_text())
    assert report["passed"] is False and report["precisions"]["fp32"]["passed"] is True
    assert report["precisions"]["int8"]["failed_stage"] == "verify"
    # The bundle ships only what passed: fp32, chosen by the default policy, with int8 recorded as not passed.
    bundle = json.loads((tiny_config.artifacts_dir / "bundle" / "bundle.json").read_text())
    assert report["bundle"]["precision"] == bundle["shipped"]["precision"] == "fp32" and report["bundle"]["policy"] == "fastest"
    assert bundle["variants"]["int8"]["passed"] is False and "not passed: int8" in bundle["choice"]["reason"]

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


def test_refresh_forces_a_stage_and_its_true_descendants_only(tiny_config):
    cfg = tiny_config.model_copy(update={"precisions": [Precision.fp32]})
    assert run(cfg)[0].is_completed()
    state, states = run(cfg.model_copy(update={"refresh": [Stage.build]}))
    assert state.is_completed()
    assert states["build"] == states["verify"] == states["profile"] == Counter({"Completed": 1})
    assert set(states["train"]) == set(states["precision"]) == set(states["validate"]) == {"Cached"}

    # Nothing takes validation's output: refreshing it re-validates and rebuilds nothing.
    state, states = run(cfg.model_copy(update={"refresh": [Stage.validate]}))
    assert state.is_completed()
    assert states["validate"] == Counter({"Completed": 2})  # the export and the fp32 variant
    assert all(set(c) == {"Cached"} for name, c in states.items() if name != "validate"), states


def _forge(ref_dir, file, change):
    """Rewrite one file of a committed artifact AND its manifest entry, as a forger (or a buggy stage) would."""
    from tasks.artifacts import MANIFEST, sha256_file

    change(ref_dir / file)
    manifest = json.loads((ref_dir / MANIFEST).read_text())
    manifest["files"][file] = sha256_file(ref_dir / file)
    (ref_dir / MANIFEST).write_text(json.dumps(manifest))


def _scaled_weights(path):
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    target = max((t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT), key=lambda t: int(np.prod(t.dims)))
    target.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(target) * 1.05, target.name))
    onnx.save(model, str(path))


@pytest.mark.parametrize("stage", ["build", "precision"])
def test_a_swapped_onnx_or_engine_with_a_matching_manifest_is_reverified_and_fails(tiny_config, stage):
    """The store is the only cache: a plain re-run reads the swapped artifact's digest from disk, so
    everything downstream of it runs again and verification catches the changed outputs."""
    cfg = tiny_config.model_copy(update={"precisions": [Precision.fp32]})
    assert run(cfg)[0].is_completed()
    (folder,) = [p.parent for p in (cfg.artifacts_dir / stage).glob("*/manifest.json")]
    _forge(folder, "engine.onnx" if stage == "build" else "model.onnx", _scaled_weights)

    with pytest.raises(VerificationError, match="fp32 batch"):
        pipeline(cfg)
    latest = json.loads((cfg.artifacts_dir / "reports" / "verify-fp32.json").read_text())
    assert latest["passed"] is False
    report = json.loads((cfg.artifacts_dir / "report.json").read_text())
    assert report["precisions"]["fp32"]["failed_stage"] == "verify"


def test_a_swapped_checkpoint_is_a_changed_input_of_export(tiny_config):
    import torch

    cfg = tiny_config.model_copy(update={"precisions": [Precision.fp32]})
    assert run(cfg)[0].is_completed()
    (folder,) = [p.parent for p in (cfg.artifacts_dir / "train").glob("*/manifest.json")]

    def scale(path):
        ckpt = torch.load(path, weights_only=True)
        ckpt["state_dict"] = {k: v * 1.01 if v.is_floating_point() else v for k, v in ckpt["state_dict"].items()}
        torch.save(ckpt, path)

    _forge(folder, "model.pt", scale)
    state, states = run(cfg)
    # Nothing can say the new weights are wrong, but nothing made from the old ones is reused.
    assert state.is_completed(), state.message
    assert set(states["train"]) == {"Cached"}
    for name in ("export", "precision", "build", "verify"):
        assert states[name] == Counter({"Completed": 1}), (name, states)


def test_changing_a_parameter_reruns_only_what_it_affects(tiny_config):
    cfg = tiny_config.model_copy(update={"precisions": [Precision.fp32]})
    assert run(cfg)[0].is_completed()
    looser = cfg.tolerances.replaced(Precision.fp32, atol=2e-4)
    _, states = run(cfg.model_copy(update={"tolerances": looser}))
    assert states["verify"] == Counter({"Completed": 1})
    # The bundle holds the verification's gates: a new tolerance re-packages too, nothing else runs.
    assert states.get("package", Counter({"Completed": 1})) == Counter({"Completed": 1})
    assert all(set(c) == {"Cached"} for name, c in states.items() if name not in ("verify", "package"))


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


def test_bf16_is_verified_on_a_cpu_through_its_emulation_and_named_in_the_report(tiny_config):
    from flows.report import numerics_lines, summary_markdown

    config = tiny_config.model_copy(update={"precisions": [Precision.fp32, Precision.bf16]})
    state, _ = run(config)
    assert state.is_completed(), state.message
    report = json.loads((config.artifacts_dir / "report.json").read_text())
    bf16 = report["precisions"]["bf16"]
    assert report["passed"] and bf16["passed"] and bf16["numerics"] == "bf16 emulated on CPU"
    # The variant's compute operators run in bf16 (counted on the strongly typed graph, not the emulation).
    assert bf16["compute"]["precision"] == "bf16" and bf16["compute"]["by_precision"] == {"bf16": bf16["compute"]["operators"]} and bf16["compute"]["operators"] > 0
    assert numerics_lines(report["precisions"]) == ["bf16: bf16 emulated on CPU (this backend computes bf16 graphs in fp32; bf16 rounding and overflow were emulated)"]
    assert "bf16: bf16 emulated on CPU" in summary_markdown(report)
    verification = json.loads((config.artifacts_dir / "reports" / "verify-bf16.json").read_text())
    assert verification["emulation"]["rounded_tensors"] > 5 and verification["tolerance"]["atol"] == 8e-2
    # The bf16 "engine" here is its rounding emulation (fp32 arithmetic): verified, never shipped as bf16.
    assert report["bundle"]["precision"] == "fp32" and "not shipped: bf16" in report["bundle"]["reason"]
    from tasks.config import ShipConfig
    from tasks.errors import BundleError

    with pytest.raises(BundleError, match="the bf16 engine built here is its rounding emulation"):
        pipeline(config.model_copy(update={"ship": ShipConfig(policy="bf16")}))


def test_parameters_the_config_refuses_fail_the_run_in_one_line_of_the_forms_terms(tmp_path):
    """A deployment's run gets its config as JSON: the flow validates it itself, so a refusal is a
    trtflow error rendered with the form's fields (never Prefect's dump, never a flag), before any stage."""
    from flows.pipeline import config_of
    from tasks.config import PipelineConfig
    from tasks.errors import ConfigError

    unmet = {"artifacts_dir": str(tmp_path / "a"), "profile": {"enabled": False}, "ship": {"policy": "fastest"}}
    state = pipeline(config=unmet, return_state=True)
    assert state.is_failed() and "ConfigError: got config.ship.policy=fastest with config.profile.enabled=false" in state.message
    assert "--" not in state.message and not (tmp_path / "a").exists()
    state = pipeline(config={"artifacts_dir": str(tmp_path / "b"), "train": {"epochs": 0}}, return_state=True)
    assert state.is_failed() and "got train.epochs: Input should be greater than or equal to 1" in state.message
    assert not (tmp_path / "b").exists()
    given = PipelineConfig(artifacts_dir=tmp_path)
    assert config_of(given) is given and config_of({"precisions": ["fp16"]}).precisions == [Precision.fp16]
    with pytest.raises(ConfigError, match="train.epochs"):
        config_of({"train": {"epochs": 0}})
