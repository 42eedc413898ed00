"""The `trtflow` command: options, exit codes, one-line reasons, and a real run in fresh processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from flows.cli import EXIT_FAILED, EXIT_USAGE, config_from_args, main, _parser
from tasks.config import Precision

def assert_short_failure(err: str, reason: str) -> None:
    """A failure as the terminal must show it: one line of <= 160 characters naming the reason, a few
    indented detail lines, and no traceback."""
    lines = err.rstrip("\n").splitlines()
    assert "Traceback" not in err, err
    assert lines[0].startswith("trtflow: ") and len(lines[0]) <= 160, lines[0]
    assert reason in lines[0], f"{reason!r} not in the first line: {lines[0]!r}"
    assert len(lines) <= 8 and all(line.startswith("  ") for line in lines[1:]), err


TINY = ["--epochs", "1", "--min-batch", "1", "--opt-batch", "8", "--max-batch", "64", "--calibration-samples", "64"]


def test_help_lists_the_main_options(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["run", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--epochs", "--precisions", "--backend", "--max-batch", "--dataset", "--model", "--artifacts-dir", "--refresh"):
        assert flag in out


def test_options_map_onto_the_config(tmp_path):
    args = _parser().parse_args(["run", "--precisions", "fp16,int8", "--max-batch", "128", "--threads", "1", "--tolerance", "fp16.atol=0.05", "--tolerance", "int8.min_cosine=0.9", "--artifacts-dir", str(tmp_path), "--refresh", "verify"])
    cfg = config_from_args(args)
    assert cfg.precisions == [Precision.fp16, Precision.int8]
    assert cfg.batch.max == 128 and cfg.train.threads == 1 and cfg.engine.threads == 1
    assert cfg.tolerance(Precision.fp16).atol == 0.05 and cfg.tolerance(Precision.int8).min_cosine == 0.9
    assert cfg.artifacts_dir == tmp_path and [s.value for s in cfg.refresh] == ["verify"]


def test_repair_options_map_onto_the_config():
    assert config_from_args(_parser().parse_args(["run"])).repair.enabled is True
    cfg = config_from_args(_parser().parse_args(["run", "--no-repair", "--repair-budget", "2"]))
    assert cfg.repair.enabled is False and cfg.repair.budget == 2
    assert config_from_args(_parser().parse_args(["run", "--repair"])).repair.enabled is True
    assert main(["run", "--repair-budget", "0"]) == EXIT_USAGE


def test_config_file_is_overridden_by_options(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"train": {"epochs": 9, "lr": 0.01}, "precisions": ["fp32"]}))
    cfg = config_from_args(_parser().parse_args(["run", "--config", str(path), "--epochs", "2"]))
    assert cfg.train.epochs == 2 and cfg.train.lr == 0.01 and cfg.precisions == [Precision.fp32]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--precisions", "fp32,bf8"], "precision 'bf8'"),
        (["--min-batch", "64", "--max-batch", "8"], "min <= opt <= max"),
        (["--tolerance", "fp16.atol=-1"], "greater than or equal to 0"),
        (["--tolerance", "fp16.speed=1"], "METRIC one of"),
        (["--tolerance", "fp99.atol=1"], "--tolerance fp99.atol=1: PRECISION one of fp32, fp16, int8"),
        (["--epochs", "0"], "train.epochs"),
        (["--model", "no_colon"], "package.module:callable"),
        (["--config", "/nonexistent/c.json"], "config file"),
        (["--imbalance", "1.5"], "data.imbalance"),
        (["--balance", "none", "--max-majority-share", "0"], "max_majority_prediction_share"),
    ],
)
def test_bad_options_exit_2_with_one_line_reason(argv, message, capsys):
    assert main(["run", *argv]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert_short_failure(err, message)
    assert err.startswith("trtflow: invalid options: ")


@pytest.mark.usefixtures("prefect_harness")
@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        (["--dataset", "/nonexistent/data.npz"], EXIT_FAILED, "DatasetError: dataset path /nonexistent/data.npz does not exist"),
        (["--model", "no_such_pkg_xyz.models:Net"], EXIT_FAILED, "ModelError: got model 'no_such_pkg_xyz.models:Net'"),
        (["--backend", "tensorrt"], EXIT_FAILED, "BackendUnavailableError"),
    ],
)
def test_bad_input_fails_before_any_work(argv, code, message, tmp_path, capsys):
    from tasks.backends.registry import builder_for

    if "tensorrt" in argv and builder_for("tensorrt").availability() is None:
        pytest.skip("TensorRT is usable here")
    art = tmp_path / "art"
    assert main(["run", "--artifacts-dir", str(art), *TINY, *argv]) == code
    assert message in capsys.readouterr().err
    assert not (art / "train").exists()  # nothing was trained


@pytest.mark.usefixtures("prefect_harness")
def test_labels_out_of_range_for_model(tmp_path, capsys):
    x = np.random.default_rng(0).random((30, 3, 32, 32), dtype=np.float32)
    path = tmp_path / "d.npz"
    np.savez(path, x=x, y=np.arange(30) % 3)
    (tmp_path / "fixed_head.py").write_text(
        "from tasks.models import SmallCNN\n"
        "def Net(num_classes, in_channels):\n    return SmallCNN(num_classes=2, in_channels=in_channels)\n"
    )
    sys.path.insert(0, str(tmp_path))
    try:
        code = main(["run", "--artifacts-dir", str(tmp_path / "art"), "--dataset", str(path), "--model", "fixed_head:Net", *TINY])
    finally:
        sys.path.remove(str(tmp_path))
    assert code == EXIT_FAILED
    assert "logits of shape (N, 3)" in capsys.readouterr().err


@pytest.mark.slow
def test_fresh_processes_run_then_reuse_everything(tmp_path):
    """The README's command, twice, each in a new process with its own temporary Prefect server."""
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_API_URL": ""}
    env.pop("PREFECT_API_URL")
    cmd = [sys.executable, "-m", "flows.cli", "run", "--artifacts-dir", str(tmp_path / "art"), *TINY]
    first = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "fp32" in first.stdout and "report:" in first.stdout
    second = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    log = second.stdout + second.stderr
    finished = [line for line in log.splitlines() if "Task run" in line and "Finished in state" in line]
    # 4 shared stages, 4 per precision, a profile per precision, and the package stage
    assert len(finished) == 20 and all("Cached" in line for line in finished), "\n".join(finished)


def test_version_and_defaults_in_help(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.startswith("trtflow ")
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for text in ("--epochs N Training epochs; with --weights: fine-tune for this many (without: load only) (default: 5)", "--batch-size N Training mini-batch size (default: 64)", "(default: 256)", "(default: fp32,fp16,int8)"):
        assert text in out


def test_serve_help_is_not_a_docstring(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = capsys.readouterr().out
    assert "From Python::" not in out and "pipeline_on" not in out and "--cron" in out
    assert max(len(line) for line in out.splitlines()) <= 110


def test_every_option_names_a_config_field():
    """The option table is checked against the config: a renamed field breaks this, not a user's run."""
    from tasks.options import all_options, field_at, parameter_path

    for o in all_options():
        for path in o.paths:
            field_at(path)  # KeyError if the field is gone
    assert parameter_path("--lr") == "config.train.lr"
    assert parameter_path("--balance", "class_weight") == "config.train.balance=class_weight"
    assert parameter_path("--no-profile") == "config.profile.enabled=false"


def test_messages_in_the_ui_name_parameter_paths_and_relative_files(tmp_path):
    from flows.ui import for_ui

    text = for_ui(f"loosen --tolerance fp16.atol=0.05, retrain with --balance class_weight or lower --lr; read {tmp_path}/reports/train-metrics.json", str(tmp_path))
    assert text == "loosen config.tolerances.fp16.atol=0.05, retrain with config.train.balance=class_weight or lower config.train.lr; read reports/train-metrics.json"


def test_an_error_is_data_its_text_the_same_inside_a_flow_run(tmp_path):
    """str(error) never changes with where it is read; the flow renders the UI's text into its state."""
    from prefect import flow

    from flows.ui import error_text, failed_in_ui_terms
    from tasks.errors import ConfigError

    error = ConfigError(got=f"{tmp_path}/x", expected="y", because="z", fix="lower --lr")
    seen: list[str] = []

    @flow
    def failing(config: dict) -> None:
        seen.extend([str(error), error_text(error), error_text(ValueError("--lr"))])
        return failed_in_ui_terms(error)

    state = failing({"artifacts_dir": str(tmp_path)}, return_state=True)
    # The report's text of it is in the UI's terms (a trtflow error's only); str(error) is the same everywhere.
    assert seen == [str(error), "got x, expected y, because z; lower config.train.lr", "--lr"] and "--lr" in str(error)
    assert error_text(error) == str(error)  # outside a flow run
    assert state.is_failed() and state.message == "Flow run encountered an exception: ConfigError: got x, expected y, because z; lower config.train.lr"
    with pytest.raises(ConfigError) as raised:
        state.result()
    assert raised.value is error


def test_summary_paths_are_relative(tmp_path, monkeypatch, capsys):
    from flows.cli import _print_summary

    monkeypatch.chdir(tmp_path)
    report = {"backend": "onnxruntime", "precisions": {"fp32": {"passed": True, "accuracy": 1, "top1_agreement": 1, "min_cosine": 1, "max_abs": 0, "engine": "build/abc/engine.onnx"}}}
    _print_summary(report, tmp_path / "artifacts")
    out = capsys.readouterr().out
    assert "artifacts/build/abc/engine.onnx" in out and str(tmp_path) not in out


def test_store_is_an_option_and_a_field_of_the_run_form(tmp_path):
    from prefect.utilities.callables import parameter_schema

    from flows.pipeline import pipeline

    cfg = config_from_args(_parser().parse_args(["run", "--store", "s3://bucket/team", "--artifacts-dir", str(tmp_path)]))
    assert cfg.store == "s3://bucket/team" and cfg.artifacts_dir == tmp_path
    assert config_from_args(_parser().parse_args(["run"])).store is None
    form = parameter_schema(pipeline).model_dump()["definitions"]["PipelineConfig"]["properties"]["store"]
    assert "s3://BUCKET/PREFIX" in form["description"] and form["default"] is None
