"""Helpers of the deployment tests: start/stop Prefect processes, talk to the test server.

Fixtures that use them are in conftest.py; test modules import the helpers with ``from prefect_env import ...``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import UUID


REPO = Path(__file__).resolve().parents[2]
POOL = "trtflow-local"
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def prefect_bin() -> str:
    return str(Path(sys.executable).with_name("prefect"))


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux /proc), also those in their own session.

    Prefect's process worker starts each flow run with ``start_new_session=True``, so killing the
    worker's process group leaves its flow runs running: they must be found by parentage.
    """
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may contain spaces, so split after the last ')'.
        ppid = int(text.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(stat.parent.name))
    out: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    # A zombie still answers signal 0 but is gone for our purposes.
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return False


def kill_tree(proc: subprocess.Popen[Any], sig: int) -> list[int]:
    """Send ``sig`` to a process started with ``start_new_session=True``, its group and all descendants."""
    pids = [proc.pid, *descendants(proc.pid)]
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)
    return pids


def stop(proc: subprocess.Popen[Any] | None, grace: float = 10.0) -> None:
    """Stop a process we started and everything it started (SIGTERM, then SIGKILL after ``grace``)."""
    if proc is None:
        return
    pids: list[int] = []
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        pids = sorted({*pids, *kill_tree(proc, sig)})
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            proc.poll()
            if not any(_alive(pid) for pid in pids):
                return
            time.sleep(0.2)


@dataclass
class Server:
    """A running ``prefect server start`` and the environment that points subprocesses at it."""

    url: str
    home: Path
    env: dict[str, str]
    log: Path
    procs: list[subprocess.Popen[Any]] = field(default_factory=list)

    @property
    def api(self) -> str:
        return f"{self.url}/api"

    def start(self, args: list[str], log_name: str, cwd: Path = REPO, extra_env: dict[str, str] | None = None) -> subprocess.Popen[Any]:
        """Start a long-running child (worker, serve) in its own process group; ``stop`` ends it."""
        out = open(self.home / log_name, "ab")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(args, cwd=cwd, env={**self.env, **(extra_env or {})}, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        return proc

    def cli(self, *args: str, cwd: Path = REPO, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a ``prefect`` CLI command against this server."""
        res = subprocess.run([prefect_bin(), *args], cwd=cwd, env={**self.env, "PWD": str(cwd)}, capture_output=True, text=True, timeout=timeout)
        if check and res.returncode != 0:
            raise AssertionError(f"prefect {' '.join(args)} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
        return res


def _env(home: Path, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_API_URL=f"http://127.0.0.1:{port}/api",
        PREFECT_UI_API_URL=f"http://127.0.0.1:{port}/api",
        PREFECT_SERVER_API_HOST="127.0.0.1",
        PREFECT_SERVER_API_PORT=str(port),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_WORKER_QUERY_SECONDS="1",
        PREFECT_WORKER_PREFETCH_SECONDS="5",
        # A loaded 2-core CI box makes SQLite writers wait: give statements time rather than fail.
        PREFECT_SERVER_DATABASE_TIMEOUT="60",
        PREFECT_SERVER_DATABASE_CONNECTION_TIMEOUT="60",
        PREFECT_LOGGING_EXTRA_LOGGERS="trtflow",
        PYTHONUNBUFFERED="1",
        # Deployment runs read and write only under allowed folders (tasks/policy.py); tests use temp folders.
        TRTFLOW_ALLOWED_ROOTS=os.pathsep.join(sorted({tempfile.gettempdir(), os.path.realpath(tempfile.gettempdir())})),
    )
    return env


class Worker:
    """A ``prefect worker start`` process of the test server; restartable (a test may kill it)."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.proc: subprocess.Popen[Any] | None = None

    def start(self) -> Worker:
        self.proc = self.server.start([prefect_bin(), "worker", "start", "--pool", POOL, "--type", "process", "--limit", "2"], "worker.log")
        return self

    def kill(self) -> None:
        """SIGKILL the worker and every flow-run process it started at once (the machine is lost)."""
        if self.proc is not None:
            kill_tree(self.proc, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        stop(self.proc)


class Api:
    """Prefect's client pointed at the test server (sync), with the few queries the tests need."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> Api:
        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_API_URL, temporary_settings

        self._stack.enter_context(temporary_settings(updates={PREFECT_API_URL: self.server.api}))
        self.client = self._stack.enter_context(get_client(sync_client=True))
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()
        # A flow run in this process under this server's URL started the events worker against it
        # (task-run states travel as events); drain it so later flows report to their own API again.
        from prefect.events.worker import EventsWorker

        EventsWorker.drain_all()

    def deployment_id(self, name: str) -> UUID:
        return self.client.read_deployment_by_name(name).id

    def run(self, deployment: str, config: dict[str, Any]) -> UUID:
        """Create a run of ``trtflow/<deployment>`` with ``config`` (the API call behind the UI's Run)."""
        return self.client.create_flow_run_from_deployment(self.deployment_id(f"trtflow/{deployment}"), parameters={"config": config}).id

    def wait(self, run_id: UUID, timeout: float = 240, until: set[str] = FINAL, attempt: int = 0) -> Any:
        """Poll a flow run until it reaches a state type in ``until`` (in attempt ``attempt`` or later); returns it.

        ``attempt`` 0 takes any state, also of a run refused before it started (its ``run_count`` stays 0).

        A retried run is waited on by its attempt (``run_count``), never by a passing state such as
        RUNNING: an attempt whose stages are all cached can pass through RUNNING between two polls.
        """
        deadline = time.monotonic() + timeout
        while True:
            fr = self.client.read_flow_run(run_id)
            if fr.state is not None and fr.state.type.value in until and fr.run_count >= attempt:
                return fr
            if time.monotonic() > deadline:
                history = " -> ".join(s.name or "?" for s in self.client.read_flow_run_states(run_id))
                raise AssertionError(
                    f"flow run {run_id} still {fr.state.name if fr.state else None} (attempt {fr.run_count}, waiting for"
                    f" attempt {attempt}) after {timeout} s; states: {history}; worker log:\n{_tail(self.server.home / 'worker.log')}"
                )
            time.sleep(1)

    def task_states(self, run_id: UUID, attempt: int | None = None) -> dict[str, list[str]]:
        """Stage name -> the state names of its task runs in this flow run (e.g. 'Cached').

        Args:
            run_id: the flow run.
            attempt: only task runs of this attempt of the flow run (1 = first run, 2 = first Retry);
                None: the latest attempt.
        """
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

        # Task runs report their states in the background: once the flow run is over, wait briefly
        # until every task run reads final too (a poll during the run returns at once).
        flow_over = (state := self.client.read_flow_run(run_id).state) is not None and state.is_final()
        deadline = time.monotonic() + (30 if flow_over else 0)
        while True:
            runs = self.client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
            if all(r.state is not None and r.state.is_final() for r in runs) or time.monotonic() >= deadline:
                break
            time.sleep(0.2)
        if attempt is None:
            attempt = max((r.flow_run_run_count for r in runs), default=0)
        out: dict[str, list[str]] = {}
        for r in runs:
            if r.flow_run_run_count != attempt:
                continue
            out.setdefault(r.name.rsplit("-", 1)[0], []).append((r.state.name if r.state else None) or "?")
        return {k: sorted(v) for k, v in out.items()}

    def artifacts(self, run_id: UUID) -> dict[str, Any]:
        """Artifacts of a flow run by key (keyless ones, like progress, by type)."""
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

        arts = self.client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])))
        return {a.key or a.type or "?": a for a in arts}


def _tail(path: Path, n: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return "(no log)"


def tiny(root: Path, **over: Any) -> dict[str, Any]:
    """A config (as the JSON the UI sends) that runs the whole pipeline in seconds."""
    cfg: dict[str, Any] = {
        "artifacts_dir": str(root),
        "train": {"epochs": 1},
        "precisions": ["fp32", "int8"],
        "batch": {"min": 1, "opt": 16, "max": 64},
        "calibration_samples": 64,
    }
    for k, v in over.items():
        cfg[k] = {**cfg[k], **v} if isinstance(v, dict) and isinstance(cfg.get(k), dict) else v
    return json.loads(json.dumps(cfg))
