"""Real Prefect components for the deployment tests: a server, the repo's deployments, a process worker.

Everything here is started by the tests themselves (subprocesses with default signal handling, each
in its own process group) and always stopped again, also when a test fails:

- ``prefect_server``: ``prefect server start`` on 127.0.0.1, a free port, a fresh PREFECT_HOME (so a
  fresh database) under the session's temp folder;
- ``deployed``: the work pool ``trtflow-local`` (with the repo's locked work-pool-template.json) and
  ``prefect --no-prompt deploy --all`` of the repo's prefect.yaml, run from the repo root;
- ``worker``: ``prefect worker start --pool trtflow-local`` polling every second.

Helpers (``Api``, ``tiny``, ...) live in prefect_env.py.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from uuid import UUID

import pytest

from prefect_env import POOL, REPO, Api, Server, Worker, _env, free_port, prefect_bin, stop


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """``prefect server start`` on 127.0.0.1 with a fresh database; stopped at the end of the session."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    env = _env(home, port)
    log = home / "server.log"
    server = Server(url=f"http://127.0.0.1:{port}", home=home, env=env, log=log)
    with open(log, "wb") as out:
        proc = subprocess.Popen([prefect_bin(), "server", "start", "--host", "127.0.0.1", "--port", str(port)], env=env, cwd=home, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"prefect server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"{server.api}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            if time.monotonic() > deadline:
                raise RuntimeError(f"prefect server not healthy after 120 s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield server
    finally:
        for p in server.procs:
            stop(p)
        stop(proc)


@pytest.fixture(scope="session")
def shared_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An artifacts folder shared by the tests that only need *a* run to complete: their upstream
    stages come back Cached from each other (keys are content addresses, so sharing is safe)."""
    return tmp_path_factory.mktemp("shared") / "artifacts"


@pytest.fixture(scope="session")
def deployed(prefect_server: Server) -> dict[str, UUID]:
    """The repo's prefect.yaml deployed as an operator would: pool created, ``deploy --all`` from the root."""
    # The locked template of the docs: a run's job variables cannot replace the command or the environment.
    prefect_server.cli("work-pool", "create", POOL, "--type", "process", "--base-job-template", str(REPO / "work-pool-template.json"))
    prefect_server.cli("--no-prompt", "deploy", "--all")
    with Api(prefect_server) as api:
        return {d.name: d.id for d in api.client.read_deployments()}


@pytest.fixture(scope="session")
def worker(prefect_server: Server, deployed: dict[str, UUID]) -> Iterator[Worker]:
    w = Worker(prefect_server).start()
    try:
        yield w
    finally:
        w.stop()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Expose each phase's report as ``item.rep_<phase>`` (the browser fixture screenshots failures)."""
    outcome = yield
    rep = outcome.get_result()  # type: ignore[attr-defined]
    setattr(item, f"rep_{rep.when}", rep)
