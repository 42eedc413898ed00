"""Each run writes its own report; report.json is a whole copy of the latest one; concurrent runs never mix."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from flows.report import REPORT, run_report


def _report(trained, root: Path, epochs: int) -> dict:  # type: ignore[no-untyped-def]
    cfg = trained.config.model_copy(update={"artifacts_dir": root, "train": trained.config.train.model_copy(update={"epochs": epochs})})
    return run_report(cfg, root, "onnxruntime: requested", trained.data, trained.checkpoint, trained.onnx, {})


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
