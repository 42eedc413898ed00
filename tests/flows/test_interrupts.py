"""Ctrl-C / SIGTERM and unattended failures of `trtflow run`, in real processes with real signals.

Each case asserts the exit code, the absence of a traceback and the one line that says what happened.
The terminal's Ctrl-C reaches the whole foreground process group: the tests send SIGINT to the group
of a process started in its own session, which is what a terminal does.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from prefect_env import REPO, kill_tree

TINY = ["--epochs", "1", "--precisions", "fp32", "--min-batch", "1", "--opt-batch", "8", "--max-batch", "32", "--no-profile", "--no-package"]


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", PYTHONUNBUFFERED="1", **extra)
    return env


class Cli:
    """`trtflow run ...` in its own session; its merged output is read line by line."""

    def __init__(self, tmp: Path, *argv: str, **env: str) -> None:
        self.home = tmp / "prefect-home"
        self.art = tmp / "art"
        self.log = tmp / f"out-{time.monotonic_ns()}.txt"
        self.out = open(self.log, "wb")  # noqa: SIM115 - closed in finish()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "flows.cli", "run", "--artifacts-dir", str(self.art), *argv],
            cwd=REPO, env=_env(self.home, **env), stdout=self.out, stderr=subprocess.STDOUT, start_new_session=True,
        )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, predicate, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if self.proc.poll() is not None:
                raise AssertionError(f"trtflow exited with {self.proc.returncode} before the point of interest:\n{self.text()[-3000:]}")
            if time.monotonic() > deadline:
                kill_tree(self.proc, signal.SIGKILL)
                raise AssertionError(f"point of interest not reached in {timeout} s:\n{self.text()[-3000:]}")
            time.sleep(0.05)

    def signal(self, sig: int) -> float:
        """Send ``sig`` as a terminal would (the process group); returns the seconds until the exit."""
        t0 = time.monotonic()
        os.killpg(self.proc.pid, sig)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            kill_tree(self.proc, signal.SIGKILL)
            raise
        return time.monotonic() - t0

    def finish(self, timeout: float = 600) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self.out.close()


def _flow_run_states(home: Path) -> list[str]:
    con = sqlite3.connect(home / "prefect.db")
    try:
        return [r[0] for r in con.execute("SELECT state_type FROM flow_run")]
    finally:
        con.close()


def _assert_one_line(text: str, line: str) -> None:
    # Prefect's own run log may say "Crash detected! Execution was aborted by a termination signal."
    # (one line, SIGTERM only); what must never appear is a traceback or the retries against a dead server.
    assert "Traceback" not in text and "ConnectError" not in text and "Error logging to API" not in text, text[-3000:]
    assert [x for x in text.splitlines() if x.startswith("trtflow: ")][-1].startswith(line), text[-2000:]


def _server_gone(cli: Cli) -> bool:
    """No process still runs with this test's PREFECT_HOME (the temporary server was stopped)."""
    mine = f"PREFECT_HOME={cli.home}".encode()
    for env in Path("/proc").glob("[0-9]*/environ"):
        try:
            if mine in env.read_bytes().split(b"\0"):
                return False
        except OSError:
            continue
    return True


@pytest.mark.slow
def test_ctrl_c_while_the_server_starts(tmp_path):
    cli = Cli(tmp_path, *TINY)
    cli.wait_for(lambda: (cli.home / "trtflow-server.log").exists())
    seconds = cli.signal(signal.SIGINT)
    cli.finish()
    assert cli.proc.returncode == 130 and seconds < 5
    _assert_one_line(cli.text(), "trtflow: interrupted; finished stages are kept")
    time.sleep(0.5)
    assert _server_gone(cli)


@pytest.mark.slow
def test_ctrl_c_during_training_cancels_the_run_and_keeps_the_data(tmp_path):
    cli = Cli(tmp_path, *TINY[2:], "--epochs", "50")
    cli.wait_for(lambda: "epoch 1/50" in cli.text())
    seconds = cli.signal(signal.SIGINT)
    cli.finish()
    assert cli.proc.returncode == 130 and seconds < 5, cli.text()[-2000:]
    _assert_one_line(cli.text(), "trtflow: interrupted")
    assert _flow_run_states(cli.home) == ["CANCELLED"]
    assert [p for p in (cli.art / "data").iterdir() if not p.name.startswith(".")], "the finished data stage was lost"
    assert not (cli.art / "train").exists() or not [p for p in (cli.art / "train").iterdir() if not p.name.startswith(".")]


@pytest.mark.slow
def test_sigterm_in_a_later_stage_then_the_next_run_resumes(tmp_path):
    """Also an unattended run on a damaged Prefect database: it is moved aside, said in one line."""
    home = tmp_path / "prefect-home"
    home.mkdir()
    (home / "prefect.db").write_bytes(b"SQLite format 3\0" + b"\x07" * 5000)  # a truncated, garbled file
    cli = Cli(tmp_path, *TINY)
    cli.wait_for(lambda: "Task run 'export" in cli.text())
    seconds = cli.signal(signal.SIGTERM)
    cli.finish()
    first = cli.text()
    assert cli.proc.returncode == 143 and seconds < 5, first[-2000:]
    assert "the Prefect database prefect.db was damaged" in first and list(home.glob("prefect.db.damaged-*"))
    _assert_one_line(first, "trtflow: terminated; finished stages are kept")
    assert _flow_run_states(home) in (["CANCELLED"], ["CRASHED"])

    again = Cli(tmp_path, *TINY)
    assert again.finish() == 0, again.text()[-3000:]
    finished = [x for x in again.text().splitlines() if "Task run '" in x and "Finished in state" in x]
    for stage in ("data", "train", "export"):
        assert any(f"Task run '{stage}'" in x and "Cached" in x for x in finished), "\n".join(finished)


@pytest.mark.slow
def test_a_server_too_slow_to_start_ends_with_the_setting_to_raise(tmp_path):
    cli = Cli(tmp_path, *TINY, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="1")
    assert cli.finish() == 1
    text = cli.text()
    assert "Traceback" not in text
    line = [x for x in text.splitlines() if x.startswith("trtflow: ")][-1]
    assert "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS" in line and len(line) <= 160, line
    assert _server_gone(cli)
