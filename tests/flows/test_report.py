"""The run report and the terminal summary say what really ran (the batches fed, a profile lowered for
memory, the precision the compute operators run in); each run writes its own report, and concurrent runs
never mix."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from flows.cli import _print_summary
from flows.report import REPORT, batch_lines, compute_text, run_report, summary_markdown
from tasks.config import Backend, BatchProfile, Precision
from tasks.engine import batch_for_memory, engine_from_variant
from tasks.precision import variant_from_onnx
from tasks.store import store_for
from tasks.verify import batch_sizes, verification_of_engine


def test_a_profile_lowered_for_memory_is_reported_as_what_ran(trained, tmp_path, capsys):
    root = tmp_path / "art"
    asked = BatchProfile(min=1, opt=32, max=100_000, cpu_memory_mib=1)
    fitted = batch_for_memory(asked, Backend.onnxruntime, trained.checkpoint)
    assert fitted.max < 100_000
    cfg = trained.config.model_copy(update={"precisions": [Precision.fp32], "batch": asked, "artifacts_dir": root})
    variant = variant_from_onnx(trained.onnx, trained.data, Precision.fp32, 64, root)
    engine = engine_from_variant(variant, Backend.onnxruntime, fitted, {"threads": 1}, root)
    verified = verification_of_engine(engine, trained.checkpoint, trained.data, Precision.fp32, cfg.tolerance(Precision.fp32), fitted, root, variant=variant)
    report = run_report(cfg, store_for(None, root), "test", {"data": trained.data, "train": trained.checkpoint, "export": trained.onnx}, {Precision.fp32: {"engine": engine, "verify": verified}})
    fp32 = report["precisions"]["fp32"]
    n = trained.data.meta["sizes"]["test"]
    assert fp32["batch"]["max"] == fitted.max and [r["batch"] for r in fp32["batches_run"]] == batch_sizes(fitted)
    assert all(r["rows_fed"] == r["batch"] * r["runs"] >= n and r["distinct_samples"] == n for r in fp32["batches_run"])
    assert fp32["batch_lowered"].startswith(f"profile 1/32/100000 lowered to {fitted.min}/{fitted.opt}/{fitted.max}")
    assert compute_text(fp32) == "4/4 fp32"
    (line,) = batch_lines(report["precisions"])
    assert line.startswith("fp32: batch 1 x") and f"on {n} test samples" in line and "100000 lowered" in line

    _print_summary(report, root)
    out = capsys.readouterr().out
    assert "verified fp32: batch 1 x" in out and "4/4 fp32" in out
    # no batch is named that did not run: 100000 appears only as the configured value that was lowered
    for text in (out, summary_markdown(report)):
        named = {int(b) for b in re.findall(r"batch (\d+)", text)} | {int(b) for b in re.findall(r", (\d+) x\d+", text)}
        assert named <= set(batch_sizes(fitted)), named
def _report(trained, root: Path, epochs: int) -> dict:  # type: ignore[no-untyped-def]
    cfg = trained.config.model_copy(update={"artifacts_dir": root, "train": trained.config.train.model_copy(update={"epochs": epochs})})
    return run_report(cfg, store_for(None, root), "onnxruntime: requested", {"data": trained.data, "train": trained.checkpoint, "export": trained.onnx}, {})


def test_each_run_writes_its_own_report_and_report_json_copies_the_latest(trained, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    first, second = _report(trained, tmp_path, 1), _report(trained, tmp_path, 2)
    assert first["report"] != second["report"] and first["report"].startswith("reports/run-")
    assert json.loads((tmp_path / first["report"]).read_text())["config"]["train"]["epochs"] == 1
    assert json.loads((tmp_path / second["report"]).read_text()) == json.loads((tmp_path / REPORT).read_text())


def test_concurrent_runs_never_interleave(trained, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    with ThreadPoolExecutor(4) as pool:
        reports = list(pool.map(lambda e: _report(trained, tmp_path, e), range(1, 9)))
    assert len({r["report"] for r in reports}) == 8
    for r in reports:
        assert json.loads((tmp_path / r["report"]).read_text())["config"]["train"]["epochs"] == r["config"]["train"]["epochs"]
    latest = json.loads((tmp_path / REPORT).read_text())  # whole, and one run's own
    assert latest in [json.loads((tmp_path / r["report"]).read_text()) for r in reports]


def test_the_summary_names_the_runs_own_report(tmp_path: Path, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    from flows.cli import _print_summary

    monkeypatch.chdir(tmp_path)
    _print_summary({"backend": "onnxruntime", "precisions": {}, "report": "reports/run-20261202T010203-abcd1234.json"}, tmp_path / "artifacts")
    assert "report: artifacts/reports/run-20261202T010203-abcd1234.json" in capsys.readouterr().out

def test_the_error_that_ends_a_run_names_a_full_disk_alone_and_joins_failed_verifications(tmp_path: Path) -> None:
    from flows.report import run_error
    from tasks.errors import StorageError, VerificationError

    report = tmp_path / "reports" / "run-1.json"
    fp16, int8 = VerificationError(["fp16: max_abs 0.3 > 0.1"], "a"), VerificationError(["int8: top-1 0.9 < 0.99"], "b")
    full = StorageError(got="no space left", expected="room", because="disk full", fix="free space")
    assert run_error([], report) is None
    assert run_error([fp16], report) is fp16
    joined = run_error([fp16, int8], report)
    assert isinstance(joined, VerificationError) and joined.failures == fp16.failures + int8.failures and str(report) in str(joined)
    assert run_error([fp16, full, int8], report) is full
    other = ValueError("boom")
    assert run_error([other, fp16], report) is other
