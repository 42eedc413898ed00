"""A Prefect API that is not there or goes away, and a trtflow process that is killed: nothing hangs, nothing leaks.

- ``PREFECT_API_URL`` at a closed port: one line naming it and the fix, exit 1, in seconds;
- a real ``prefect server start`` killed during training: the run ends in at most 90 s with one line
  naming ``PREFECT_API_URL``, exit 1, the finished data stage kept (it used to hang for minutes);
- ``kill -9`` of ``trtflow`` alone (the OOM killer): its temporary server is gone within 10 s;
- progress updates never wait for the API, in the training thread or anywhere else.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from flows import runtime
from flows.ui import LatestOnlySender
from prefect_env import _env, descendants, free_port, kill_tree, prefect_bin, stop
from test_interrupts import TINY, Cli


def _last_line(text: str) -> str:
    assert "Traceback" not in text, text[-3000:]
    lines = [x for x in text.splitlines() if x.startswith("trtflow: ")]
    assert lines, text[-3000:]
    assert len(lines[-1]) <= 160, lines[-1]
    return lines[-1]


def test_an_api_url_at_a_closed_port_is_one_line_with_the_fix(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}/api"
    cli = Cli(tmp_path, *TINY, PREFECT_API_URL=url)
    assert cli.finish(300) == 1, cli.text()[-3000:]
    line = _last_line(cli.text())
    assert f"PREFECT_API_URL={url}" in line and "prefect server start" in line and "unset PREFECT_API_URL" in line, line
    assert "unexpected error" not in cli.text()


def _prefect_server(home: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = _env(home, port)
    with open(home / "server.log", "wb") as out:
        proc = subprocess.Popen([prefect_bin(), "server", "start", "--host", "127.0.0.1", "--port", str(port)], env=env, cwd=home, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + 180
    while not runtime.api_answers(url):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(proc)
            raise AssertionError(f"prefect server did not start:\n{(home / 'server.log').read_text()[-3000:]}")
        time.sleep(0.5)
    return proc, url


@pytest.mark.slow
def test_a_server_killed_during_training_ends_the_run_with_one_line(tmp_path: Path) -> None:
    home = tmp_path / "server-home"
    home.mkdir()
    server, url = _prefect_server(home)
    try:
        cli = Cli(tmp_path, *TINY[2:], "--epochs", "200", PREFECT_API_URL=url)
        try:
            cli.wait_for(lambda: "epoch 1/200" in cli.text(), timeout=300)
            kill_tree(server, signal.SIGKILL)
            killed = time.monotonic()
            code = cli.finish(240)
            seconds = time.monotonic() - killed
        finally:
            kill_tree(cli.proc, signal.SIGKILL)
    finally:
        stop(server)
    text = cli.text()
    print(f"the run ended {seconds:.1f} s after the server was killed; its output ends:\n{text[-1500:]}")
    assert code == 1, text[-3000:]
    assert seconds <= 90, f"the run took {seconds:.0f} s to end after the server died"
    line = _last_line(text)
    assert "PREFECT_API_URL" in line and "prefect server start" in line, line
    assert [p for p in (cli.art / "data").iterdir() if not p.name.startswith(".")], "the finished data stage was lost"


@pytest.mark.slow
def test_the_temporary_server_dies_with_a_sigkilled_trtflow(tmp_path: Path) -> None:
    cli = Cli(tmp_path, *TINY[2:], "--epochs", "200")
    try:
        cli.wait_for(lambda: "epoch 1/200" in cli.text(), timeout=300)
        servers = [pid for pid in descendants(cli.proc.pid) if runtime.SERVER_CHILD.encode() in _cmdline(pid)]
        assert servers, "no temporary server found below trtflow"
        cli.proc.kill()  # SIGKILL of trtflow alone: no handler, no cleanup runs
        cli.proc.wait(10)
        deadline = time.monotonic() + 10
        while any(_alive(pid) for pid in servers) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = [pid for pid in servers if _alive(pid)]
    finally:
        kill_tree(cli.proc, signal.SIGKILL)
        cli.finish(10)
    assert not left, f"temporary server {left} outlived the trtflow process by 10 s"


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def test_the_api_watchdog_ends_a_run_whose_api_went_away(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    ended = threading.Event()
    codes: list[int] = []

    def fake_exit(code: int) -> None:
        codes.append(code)
        dog.stop()  # ends the watchdog thread, as os._exit would end the process
        ended.set()

    monkeypatch.setattr(runtime.os, "_exit", fake_exit)
    run = runtime.RunHandle()
    run.api_url = f"http://127.0.0.1:{free_port()}/api"
    dog = runtime.ApiWatchdog(run, dead_after=0.5, poll=0.1)
    dog.start()
    try:
        assert ended.wait(60)
    finally:
        dog.stop()
    assert codes == [1]
    line = capsys.readouterr().err.strip()
    assert line.startswith("trtflow: PrefectServerError: the server at PREFECT_API_URL=") and "is gone" in line and "prefect server start" in line, line


def test_the_api_watchdog_stays_quiet_while_the_api_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime, "api_answers", lambda url, timeout=2.0: True)
    monkeypatch.setattr(runtime.os, "_exit", lambda code: pytest.fail("the watchdog ended a healthy run"))
    run = runtime.RunHandle()
    run.api_url = "http://127.0.0.1:1/api"
    dog = runtime.ApiWatchdog(run, dead_after=0.2, poll=0.05).start()
    polls = 0
    while polls < 20:  # many polls, each well past dead_after since the start
        time.sleep(0.05)
        polls += 1
    dog.stop()


def test_progress_updates_never_wait_for_the_api(monkeypatch: pytest.MonkeyPatch) -> None:
    """A server that hangs: the training loop's progress calls return at once, and only the latest waits."""
    import uuid

    import prefect.artifacts

    from flows import ui

    release = threading.Event()
    sent: list[tuple[float, str]] = []

    def hanging_update(_id: Any, progress: float, description: str) -> None:
        sent.append((progress, threading.current_thread().name))
        release.wait(60)

    bar = ui.Progress(10)  # outside a flow run: no artifact yet
    monkeypatch.setattr(ui, "_in_flow_run", lambda: True)
    monkeypatch.setattr(prefect.artifacts, "update_progress_artifact", hanging_update)
    bar.id = uuid.uuid4()
    for fraction in (0.1, 0.2, 0.3, 0.4):
        bar.within_stage("train", fraction, "")  # would block for 60 s each if sent from here
    assert not release.is_set()
    while not sent:
        time.sleep(0.01)
    assert sent[0][1] == "trtflow-progress"  # sent by the background thread, not this one
    assert not bar.flush(0.1)  # still in flight: the run's end does not wait long for it
    release.set()
    assert bar.flush(30)
    # One went out; of those queued behind it only the latest (4 %) was sent.
    assert sent[-1][0] == 4.0 and len(sent) <= 2, sent


def test_a_sender_drops_updates_queued_behind_one_in_flight() -> None:
    gate = threading.Event()
    done: list[int] = []
    sender = LatestOnlySender("test-sender")
    sender.submit(lambda: (gate.wait(30), done.append(0)))
    while not sender._busy:  # the first one is in flight
        time.sleep(0.01)
    for i in (1, 2, 3):
        sender.submit(lambda i=i: done.append(i))
    gate.set()
    assert sender.flush(30)
    assert done == [0, 3]
