import json
from pathlib import Path

import numpy as np
import pytest

from flows.report import speed_markdown, table_columns
from tasks.artifacts import ArtifactRef
from tasks.backends.base import BaseRunner, TensorSpec
from tasks.config import Backend, BatchProfile, Precision, ProfileConfig
from tasks.engine import engine_from_variant
from tasks.precision import variant_from_onnx
from tasks.profile import (
    TORCH_SPEC,
    measurement,
    percentiles,
    profile_of_engine,
    speedup,
    timed_runs,
    torch_profile,
)
from tasks.store import store_for

BATCH = BatchProfile(min=1, opt=8, max=32)
#: the smallest budget: a handful of runs per measurement, so the whole file stays fast
QUICK = ProfileConfig(min_seconds=0.0, min_iterations=5, max_seconds=0.5, warmup=2)


class FakeRunner(BaseRunner):
    """Records every infer call; each 'takes' a fixed time on the fake clock."""

    def __init__(self) -> None:
        super().__init__("fake")
        self.calls = 0

    def activate_impl(self) -> None:
        pass

    def infer_impl(self, feed):
        self.calls += 1
        return {"y": feed["x"] * 2}

    def deactivate_impl(self) -> None:
        pass

    def input_specs(self):
        return [TensorSpec("x", "float32", (-1, 2))]

    def output_specs(self):
        return [TensorSpec("y", "float32", (-1, 2))]


def test_percentiles_interpolate_like_numpy():
    times = list(range(1, 101))  # 1..100 ms
    p = percentiles(times)
    assert p == {"p50_ms": 50.5, "p90_ms": pytest.approx(90.1), "p99_ms": pytest.approx(99.01)}
    assert percentiles([3.0]) == {"p50_ms": 3.0, "p90_ms": 3.0, "p99_ms": 3.0}
    with pytest.raises(ValueError):
        percentiles([])


def test_default_time_infer_runs_infer_once_per_iteration():
    r = FakeRunner()
    with r:
        times = r.time_infer({"x": np.ones((1, 2), np.float32)}, 7)
    assert r.calls == 7 and len(times) == 7 and all(t >= 0 for t in times)
    assert r.timer == "perf_counter_ns"


def test_timed_runs_honours_warmup_and_min_iterations():
    calls: list[int] = []

    def run(n: int) -> list[float]:
        calls.append(n)
        return [1.0] * n  # 1 ms each

    times = timed_runs(run, ProfileConfig(min_seconds=0.0, min_iterations=20, max_seconds=10, warmup=3))
    assert calls[0] == 3  # warm-up first, not counted
    assert len(times) == 20 and sum(calls[1:]) == 20


def test_timed_runs_extends_to_min_seconds_and_stops_at_the_cap():
    def run(n: int) -> list[float]:
        return [10.0] * n  # 10 ms each

    # 50 iterations reach 0.5 s only after 50 runs; 0.8 s needs 80.
    assert len(timed_runs(run, ProfileConfig(min_seconds=0.8, min_iterations=50, max_seconds=10, warmup=0))) == 80
    # The cap (0.2 s = 20 runs) wins over min_iterations.
    assert len(timed_runs(run, ProfileConfig(min_seconds=0.5, min_iterations=50, max_seconds=0.2, warmup=1))) == 20


def test_timed_runs_without_warmup_starts_with_one_probe_run():
    calls: list[int] = []

    def run(n: int) -> list[float]:
        calls.append(n)
        return [2.0] * n

    times = timed_runs(run, ProfileConfig(min_seconds=0.0, min_iterations=4, max_seconds=10, warmup=0))
    assert calls == [1, 3] and len(times) == 4


def test_measurement_and_speedup():
    m = measurement([2.0, 2.0, 4.0, 4.0], batch=8)
    assert m["iterations"] == 4 and m["p50_ms"] == 3.0 and m["min_ms"] == 2.0 and m["max_ms"] == 4.0
    assert m["samples_per_s"] == pytest.approx(8 * 4 / 0.012)
    engine = {"latency": {"p50_ms": 0.5}, "throughput": {"samples_per_s": 3000.0}}
    torch = {"latency": {"p50_ms": 2.0}, "throughput": {"samples_per_s": 1000.0}}
    assert speedup(engine, torch) == {"latency_p50": 4.0, "throughput": 3.0}
    assert speedup({"latency": {"p50_ms": 0.0}, "throughput": {"samples_per_s": None}}, torch) == {"latency_p50": None, "throughput": None}


@pytest.fixture(scope="module")
def fp32_engine(trained, tmp_path_factory):
    root = tmp_path_factory.mktemp("profile")
    variant = variant_from_onnx(trained.onnx, trained.data, Precision.fp32, 64, root)
    return root, engine_from_variant(variant, Backend.onnxruntime, BATCH, {"threads": 1}, root)


def test_profile_artifact_structure_and_report_columns(trained, fp32_engine):
    root, engine = fp32_engine
    ref = profile_of_engine(engine, trained.checkpoint, trained.data, BATCH, QUICK, 1, root)
    report = json.loads(ref.path("profile.json").read_text())
    for who in ("engine", "torch"):
        lat, thr = report[who]["latency"], report[who]["throughput"]
        assert lat["batch"] == 1 and thr["batch"] == BATCH.max
        assert lat["iterations"] >= QUICK.min_iterations and lat["p50_ms"] <= lat["p90_ms"] <= lat["p99_ms"]
        assert thr["samples_per_s"] > 0
    assert report["threads"] == {"engine": 1, "torch": 1} and report["timer"] == "perf_counter_ns"
    assert report["machine"]["cores"] and report["torch"]["device"] == "cpu"
    s = ref.meta
    assert s["precision"] == "fp32" and s["latency_batch"] == 1 and s["throughput_batch"] == BATCH.max
    assert s["speedup"]["throughput"] == pytest.approx(s["samples_per_s"] / s["torch"]["samples_per_s"])
    # What the run report and the Prefect table show.
    cols = table_columns(s)
    assert set(cols) >= {"p50 ms (b1)", f"samples/s (b{BATCH.max})", "x torch (throughput)"}
    md = "\n".join(speed_markdown({"fp32": {"profile": s}, "int8": {"error": "x"}}))
    assert "## Speed" in md and "| fp32 |" in md and "int8" not in md
    # A second call is a cache hit: same artifact, nothing re-measured.
    again = profile_of_engine(engine, trained.checkpoint, trained.data, BATCH, QUICK, 1, root)
    assert again.dir == ref.dir and again.meta == ref.meta


def test_torch_reference_is_measured_once_for_every_precision(trained, fp32_engine):
    root, _ = fp32_engine
    a = torch_profile(trained.checkpoint, trained.data, BATCH, QUICK, 1, "cpu", root)
    b = torch_profile(trained.checkpoint, trained.data, BATCH, QUICK, 1, "cpu", root)
    committed = [p for p in (Path(root) / TORCH_SPEC.name).iterdir() if not p.name.startswith(".")]  # not lock files
    assert a.dir == b.dir and len(committed) == 1
    # A refresh measures again, but only once per process.
    c = torch_profile(trained.checkpoint, trained.data, BATCH, QUICK, 1, "cpu", root, refresh=True)
    d = torch_profile(trained.checkpoint, trained.data, BATCH, QUICK, 1, "cpu", root, refresh=True)
    assert c.meta == d.meta


def test_run_report_carries_profile_numbers(trained, fp32_engine):
    from flows.report import run_report
    from tasks.verify import verification_of_engine

    root, engine = fp32_engine
    cfg = trained.config.model_copy(update={"precisions": [Precision.fp32], "batch": BATCH, "artifacts_dir": root})
    verified = verification_of_engine(engine, trained.checkpoint, trained.data, Precision.fp32, cfg.tolerance(Precision.fp32), BATCH, root)
    prof = profile_of_engine(engine, trained.checkpoint, trained.data, BATCH, QUICK, 1, root)
    outcomes = {Precision.fp32: {"engine": engine, "verify": verified, "profile": prof}}
    report = run_report(cfg, store_for(None, root), "test", {"data": trained.data, "train": trained.checkpoint, "export": trained.onnx}, outcomes)
    speed = report["precisions"]["fp32"]["profile"]
    assert speed["latency_ms"]["p50"] > 0 and speed["samples_per_s"] > 0 and speed["speedup"]["throughput"] > 0
    assert speed["report"].startswith("profile/") and not Path(speed["report"]).is_absolute()
    failed = run_report(cfg, store_for(None, root), "test", {"data": trained.data, "train": trained.checkpoint, "export": trained.onnx}, {Precision.fp32: {"engine": engine, "verify": verified, "profile_error": "boom"}})
    assert failed["precisions"]["fp32"]["profile"] == {"error": "boom"}


def test_profile_is_in_the_config_and_cli():
    from flows.cli import _parser, config_from_args

    assert ProfileConfig().enabled
    assert config_from_args(_parser().parse_args(["run", "--no-profile"])).profile.enabled is False
    assert config_from_args(_parser().parse_args(["run"])).profile.enabled is True


def test_settings_enabled_is_not_in_the_key(trained, fp32_engine):
    from tasks.profile import SPEC
    from tasks.stage import stage_key

    _, engine = fp32_engine
    inputs = {"engine": engine, "checkpoint": trained.checkpoint, "data": trained.data, "batch": BATCH, "threads": 1}
    on = stage_key(SPEC, {**inputs, "settings": QUICK})
    off = stage_key(SPEC, {**inputs, "settings": QUICK.model_copy(update={"enabled": False})})
    slower = stage_key(SPEC, {**inputs, "settings": QUICK.model_copy(update={"warmup": 9})})
    assert on == off != slower
    assert isinstance(engine, ArtifactRef)
