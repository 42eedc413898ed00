"""The flow repairs a failing fp16 variant, reports what it kept, and leaves a passing model alone."""

from __future__ import annotations

import json

import pytest

from flows.pipeline import pipeline
from tasks.config import Precision, TrainConfig

pytestmark = [pytest.mark.usefixtures("prefect_harness"), pytest.mark.slow]


def test_fp16_overflow_fails_on_cpu_only_through_emulation_and_is_repaired(tiny_config, capsys):
    from flows.cli import _print_summary

    cfg = tiny_config.model_copy(update={"precisions": [Precision.fp16], "train": TrainConfig(model="_precision_models:OverflowNet", epochs=1)})
    report = pipeline(cfg)
    fp16 = report["precisions"]["fp16"]
    assert fp16["passed"] and fp16["numerics"] == "fp16 emulated on CPU"
    repair = fp16["repair"]
    assert repair["passed"] and len(repair["kept_fp32"]) <= 2 and repair["attempts"] == 1
    assert any("layer_norm" in n for n in repair["kept_fp32"])
    assert repair["before"]["finite_share"] < 1 and repair["after"]["finite_share"] == 1
    assert repair["speed"]["samples_per_s_before"] > 0 and repair["speed"]["samples_per_s_after"] > 0
    kept = json.loads((cfg.artifacts_dir / repair["report"]).read_text())["kept_fp32"]
    assert kept == repair["kept_fp32"]
    _print_summary(report, cfg.artifacts_dir)
    out = capsys.readouterr().out
    assert "numerics fp16: fp16 emulated on CPU" in out and f"kept {', '.join(kept)} in fp32" in out

    # The same config again: every stage comes back Cached, the failed verification too (its failing
    # verdict is an artifact, which the flow hands to the cached repair): no task run fails again.
    from test_pipeline import task_states

    state = pipeline(cfg, return_state=True)
    states = task_states(state, json.loads((cfg.artifacts_dir / "report.json").read_text()))
    assert state.is_completed() and {name: set(c) for name, c in states.items()} == {name: {"Cached"} for name in states}, states
    assert states["verify"]["Cached"] == 1 and states["repair"]["Cached"] == 1 and states["profile"]["Cached"] == 2  # the repaired engine and the one before
    again = state.result()
    assert again["precisions"]["fp16"]["repair"]["kept_fp32"] == kept and again["precisions"]["fp16"]["passed"]
    # the repair's verification is the latest of fp16, cached or not
    assert json.loads((cfg.artifacts_dir / "reports" / "verify-fp16.json").read_text())["passed"] is True

    # --no-repair: the same failure is reported as verify's, with the emulated check named
    from tasks.config import RepairConfig
    from tasks.errors import VerificationError

    with pytest.raises(VerificationError, match="fp16 emulated batch 8"):
        pipeline(cfg.model_copy(update={"repair": RepairConfig(enabled=False)}))


def test_an_int8_repair_that_leaves_no_int8_fails_instead_of_passing_as_int8(tiny_config, tmp_path):
    """The held-out case: a regressor whose int8 repair kept every compute operator in fp32 used to be
    reported 'int8 yes, numerics: native int8' with fp32-level errors."""
    import numpy as np
    import torch

    from _precision_models import TinyRegressor
    from test_pipeline import task_states
    from tasks.config import DataConfig, ProfileConfig
    from tasks.errors import PrecisionRepairError

    torch.manual_seed(0)
    torch.save(TinyRegressor().state_dict(), tmp_path / "regressor.pt")
    np.savez(tmp_path / "x.npz", x=np.random.default_rng(0).normal(size=(300, 8)).astype(np.float32))  # no labels: a regressor
    strict = tiny_config.tolerances.replaced("int8", min_cosine=0.9999999)  # int8 rounding cannot meet it
    cfg = tiny_config.model_copy(update={
        "precisions": [Precision.int8], "data": DataConfig(dataset=tmp_path / "x.npz"), "tolerances": strict,
        "train": TrainConfig(model="_precision_models:TinyRegressor", weights=tmp_path / "regressor.pt"), "profile": ProfileConfig(enabled=False),
    })
    finding = "int8: 0 of 2 compute operators run in int8 after repair kept 2 in fp32; the model has no int8 benefit"
    with pytest.raises(PrecisionRepairError) as err:
        pipeline(cfg)
    assert err.value.summary.startswith(f"PrecisionRepairError: {finding}; drop int8")
    int8 = json.loads((cfg.artifacts_dir / "report.json").read_text())["precisions"]["int8"]
    assert int8["passed"] is False and int8["failed_stage"] == "repair"
    assert int8["repair"]["share_finding"] == finding and not int8["repair"]["passed"] and int8["repair"]["tried_fp32"]
    assert int8["compute"]["share"] == 1.0  # the variant as it was: every operator int8 (and failing its gate)

    # a cached re-run: every stage Cached, verify-int8 too; the flow fails with the same finding
    state = pipeline(cfg, return_state=True)
    assert state.is_failed() and finding in (state.message or "")
    states = task_states(state, json.loads((cfg.artifacts_dir / "report.json").read_text()))
    assert {name: set(c) for name, c in states.items()} == {name: {"Cached"} for name in states}, states
