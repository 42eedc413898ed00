"""Run the flow from the command line like a finished tool: its own temporary server, clean signals, short errors.

``trtflow run`` without ``PREFECT_API_URL`` needs a temporary Prefect server. Prefect's own one lives in
the terminal's process group, so Ctrl-C stops it first and the engine then retries its API calls for
minutes. Here the server runs in its own session (a terminal's Ctrl-C reaches only trtflow), its output
goes to ``$PREFECT_HOME/trtflow-server.log``, and:

- a damaged Prefect database (``prefect.db``) is moved aside and a fresh one is created (one line says so);
- a slow start gets a generous start-up timeout (``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS``,
  default here ``DEFAULT_STARTUP_TIMEOUT_S``) and ends, if still too slow, with one line naming the fix;
- Ctrl-C or SIGTERM at any point prints one line, marks the flow run Cancelled, stops the server and
  exits 130 (143) within seconds; finished stages are committed artifacts, so the next run resumes;
- Prefect's console handler prints one line per log record (no tracebacks) unless ``debug``;
- the temporary server dies with trtflow, also when trtflow is SIGKILLed (``_server_child.py``);
- a ``PREFECT_API_URL`` that does not answer fails at once with one line naming it and the fix, and an
  API that stops answering during the run (the server died) ends the run within ``API_DEAD_AFTER_S``
  seconds with that line and exit status 1 (finished stages are kept), instead of hanging in retries.

    from flows.runtime import run_flow
    report = run_flow(pipeline, config, debug=False)
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tasks.errors import TrtflowError, one_line

#: start-up timeout of the temporary server unless the user set Prefect's setting (Prefect's default: 20 s)
DEFAULT_STARTUP_TIMEOUT_S = 180
STARTUP_TIMEOUT_ENV = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
SERVER_LOG = "trtflow-server.log"
#: the start-up script of the temporary server (beside this file): it dies with the trtflow process
SERVER_CHILD = "_server_child.py"
#: seconds the Prefect API may stay silent during a run before the run ends (Prefect's client would retry for minutes)
API_DEAD_AFTER_S = 40.0
#: seconds between two health checks of the API during a run
API_POLL_S = 2.0
#: seconds a signal may spend marking the run Cancelled and stopping the server
SIGNAL_BUDGET_S = 3.0


class PrefectServerError(TrtflowError):
    """The temporary Prefect server could not be started (timeout, damaged or locked database)."""


def prepare_environment() -> None:
    """Settings trtflow wants before Prefect is imported: its loggers in Prefect's handlers, no telemetry."""
    extra = [x for x in os.environ.get("PREFECT_LOGGING_EXTRA_LOGGERS", "").split(",") if x]
    if "trtflow" not in extra:
        os.environ["PREFECT_LOGGING_EXTRA_LOGGERS"] = ",".join([*extra, "trtflow"])
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # Another trtflow run's server may hold SQLite's write lock for a moment: wait, don't fail.
    os.environ.setdefault("PREFECT_SERVER_DATABASE_TIMEOUT", "60")
    os.environ.setdefault("PREFECT_SERVER_DATABASE_CONNECTION_TIMEOUT", "60")


# --- the Prefect database ----------------------------------------------------------------------------


def database_file() -> Path | None:
    """The SQLite file of the Prefect database the temporary server would use (None: not SQLite)."""
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    url = settings.server.database.connection_url
    text = url.get_secret_value() if hasattr(url, "get_secret_value") else str(url or "")
    if not text:
        return Path(settings.home).expanduser() / "prefect.db"
    if not text.startswith("sqlite"):
        return None
    path = text.split(":///", 1)[-1].split("?", 1)[0]
    return None if path in ("", ":memory:") else Path(path).expanduser()


def database_problem(path: Path) -> str | None:
    """Why the SQLite file at ``path`` is unusable, or None (also when it does not exist yet).

    A locked database is not a problem here: the server waits for the lock.
    """
    if not path.exists():
        return None
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
        try:
            row = con.execute("PRAGMA quick_check(1)").fetchone()
        finally:
            con.close()
    except sqlite3.OperationalError as exc:
        return None if "locked" in str(exc) else str(exc)
    except sqlite3.DatabaseError as exc:
        return str(exc)
    return None if row and row[0] == "ok" else str(row[0] if row else "empty answer to quick_check")


def move_aside(path: Path) -> Path:
    """Rename a damaged database (and its -wal/-shm/-journal files) to ``<name>.damaged-<time>``."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = path.with_name(f"{path.name}.damaged-{stamp}")
    for suffix in ("", "-wal", "-shm", "-journal"):
        src = Path(f"{path}{suffix}")
        if src.exists():
            src.rename(f"{target}{suffix}")
    return target


def heal_database(say: Callable[[str], None]) -> None:
    """Move a damaged Prefect database aside (saying so in one line); a fresh one is created on start."""
    path = database_file()
    if path is None:
        return
    problem = database_problem(path)
    if problem is None:
        return
    target = move_aside(path)
    say(f"the Prefect database {path.name} was damaged ({one_line(problem, 60)}); moved it to {target.name} and started a fresh one (run history only)")


# --- the temporary server ------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def startup_timeout() -> float:
    """Seconds the server may take to answer: the user's Prefect setting, else ``DEFAULT_STARTUP_TIMEOUT_S``."""
    try:
        return float(os.environ[STARTUP_TIMEOUT_ENV])
    except (KeyError, ValueError):
        return float(DEFAULT_STARTUP_TIMEOUT_S)


class TemporaryServer:
    """A Prefect API server in its own session, on a free port of 127.0.0.1, for one run."""

    def __init__(self, log_dir: Path) -> None:
        self.log = log_dir / SERVER_LOG
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self, timeout: float) -> str:
        """Start the server and wait until it answers; returns its API URL.

        Raises:
            PrefectServerError: it exited or did not answer within ``timeout`` seconds.
        """
        import prefect
        from prefect.settings import get_current_settings

        port = _free_port()
        self.url = f"http://127.0.0.1:{port}/api"
        env = {
            **os.environ,
            **get_current_settings().to_environment_variables(exclude_unset=True),
            "PREFECT_UI_ENABLED": "0",
            "PREFECT__SERVER_EPHEMERAL": "1",
            "PREFECT__SERVER_FINAL": "1",
        }
        env.pop("PREFECT_API_URL", None)
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                # uvicorn behind a start-up script that ties the server's life to this process (see there).
                [sys.executable, str(Path(__file__).with_name(SERVER_CHILD)), str(os.getpid()),
                 "--app-dir", str(Path(prefect.__file__).parent.parent), "--factory",
                 "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port), "--log-level", "error", "--lifespan", "on"],
                env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                # Its own session: the terminal's Ctrl-C reaches trtflow only, which then stops it in order.
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise self._failed(f"exited with code {self.proc.returncode}")
            with contextlib.suppress(OSError, ValueError):
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        return self.url
            time.sleep(0.1)
        self.stop()
        raise self._failed(f"did not answer within {timeout:g} s", timed_out=True)

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def _failed(self, what: str, timed_out: bool = False) -> PrefectServerError:
        tail = self.log_tail()
        if "locked" in tail:
            return PrefectServerError(
                got=f"a Prefect database that stays locked (the temporary server {what})",
                expected="the database free within PREFECT_SERVER_DATABASE_TIMEOUT",
                because="another process (a second run, a `prefect server`) holds its write lock",
                fix="wait for the other run, or give this one its own PREFECT_HOME=<folder>",
                summary="the Prefect database is locked by another process; wait for it, or run with PREFECT_HOME=<another folder>",
            )
        if timed_out:
            return PrefectServerError(
                got=f"a temporary Prefect server that {what}",
                expected="it to answer on /api/health",
                because="the machine is busy or the database is slow (its log is " + str(self.log) + ")",
                fix=f"raise {STARTUP_TIMEOUT_ENV} (e.g. =600), or start `prefect server start` and set PREFECT_API_URL",
                summary=f"the temporary Prefect server {what.replace('did not answer', 'did not start')}; set {STARTUP_TIMEOUT_ENV}=600",
            )
        last = next((line for line in reversed(tail.strip().splitlines()) if line.strip()), "no output")
        return PrefectServerError(
            got=f"a temporary Prefect server that {what} ({one_line(last, 100)})",
            expected="it to start",
            because=f"the server failed; its log is {self.log}",
            fix="read that log; start `prefect server start` yourself and set PREFECT_API_URL to bypass it",
            summary=f"the temporary Prefect server {what}: {one_line(last, 70)}; see {self.log.name} in PREFECT_HOME",
        )

    def stop(self, grace: float = 5.0) -> None:
        """Terminate the server (SIGTERM, SIGKILL after ``grace`` seconds)."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def start_server(server: TemporaryServer, say: Callable[[str], None]) -> str:
    """Heal the database, then start ``server``; a start that fails on a damaged database heals and retries once.

    Returns:
        The server's API URL.

    Raises:
        PrefectServerError: the server cannot start; its message names the fix.
    """
    heal_database(say)
    try:
        return server.start(startup_timeout())
    except PrefectServerError:
        tail = server.log_tail()
        path = database_file()
        damaged = any(s in tail for s in ("malformed", "not a database", "DatabaseError"))
        if not (damaged and path is not None and path.exists()):
            raise
        target = move_aside(path)
        say(f"the Prefect database {path.name} was damaged; moved it to {target.name} and started a fresh one (run history only)")
        return server.start(startup_timeout())


# --- is the API there? ----------------------------------------------------------------------------------


def api_answers(url: str, timeout: float = 2.0) -> bool:
    """Whether anything answers HTTP at ``<url>/health`` (any status: an answer, even 401, means the server is up)."""
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=timeout):
            return True
    except urllib.error.HTTPError:
        return True
    except (OSError, ValueError):
        return False


def api_unreachable(url: str, temporary: bool, during_run: bool, what: str = "") -> PrefectServerError:
    """The one-line error of a Prefect API that does not (or no longer) answer, naming PREFECT_API_URL and the fix.

    Args:
        url: the API's URL.
        temporary: it is trtflow's own temporary server.
        during_run: it answered when the run started.
        what: how it failed, for the details (e.g. "stopped answering for 40 s").
    """
    kept = "; finished stages are kept, the same command resumes" if during_run else ""
    if temporary:
        return PrefectServerError(
            got=f"trtflow's temporary Prefect server at {url} that {what or 'does not answer'}",
            expected="it to answer until the run ends",
            because=f"it was stopped or died (its log is {SERVER_LOG} in PREFECT_HOME)",
            fix=f"run the same command again{kept}; or start `prefect server start` and set PREFECT_API_URL",
            summary=f"the temporary Prefect server {what or 'does not answer'}; run the same command again (finished stages are kept)",
        )
    return PrefectServerError(
        got=f"PREFECT_API_URL={url}, where no Prefect server answers" + (f" ({what})" if what else ""),
        expected="a running Prefect server at that address",
        because="the flow records its runs and stages through that API",
        fix=f"start it (prefect server start) or unset PREFECT_API_URL so that trtflow starts a temporary server{kept}",
        summary=(f"the server at PREFECT_API_URL={url} is gone; start it (prefect server start) or unset PREFECT_API_URL" if during_run
                 else f"nothing answers at PREFECT_API_URL={url}; start it (prefect server start) or unset PREFECT_API_URL"),
    )


def check_api(url: str, attempts: int = 3) -> None:
    """Fail at once, with one line, when the user's PREFECT_API_URL does not answer (a few tries, a second apart).

    Raises:
        PrefectServerError: nothing answers there.
    """
    for i in range(attempts):
        if api_answers(url):
            return
        if i + 1 < attempts:
            time.sleep(1.0)
    raise api_unreachable(url, temporary=False, during_run=False)


class ApiWatchdog:
    """Ends the run (one line, exit status 1) when the Prefect API stops answering for ``dead_after`` seconds.

    Without it, a server that dies mid-run hangs the run: Prefect's client retries every state change
    for minutes. Finished stages are committed artifacts, so the next run resumes; a half-written
    staging folder is swept by it.
    """

    def __init__(self, run: RunHandle, dead_after: float = API_DEAD_AFTER_S, poll: float = API_POLL_S) -> None:
        self.run, self.dead_after, self.poll = run, dead_after, poll
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="trtflow-api-watchdog", daemon=True)

    def start(self) -> ApiWatchdog:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        url = self.run.api_url or ""
        last_answer = time.monotonic()
        while not self._stop.wait(self.poll):
            server = self.run.server
            if server is not None and server.proc is not None and server.proc.poll() is not None:
                self._end(api_unreachable(url, temporary=True, during_run=True, what=f"exited during the run (code {server.proc.returncode})"))
            if api_answers(url, timeout=min(self.poll * 2, 5.0)):
                last_answer = time.monotonic()
            elif time.monotonic() - last_answer > self.dead_after and not self._stop.is_set():
                self._end(api_unreachable(url, temporary=server is not None, during_run=True, what=f"stopped answering for {self.dead_after:g} s during the run"))

    def _end(self, error: PrefectServerError) -> None:
        if self._stop.is_set():  # the run ended meanwhile
            return
        with contextlib.suppress(Exception):
            sys.stderr.write(f"trtflow: {error.summary}\n")
            sys.stderr.flush()
        if self.run.server is not None:
            with contextlib.suppress(Exception):
                self.run.server.stop(grace=1.0)
        os._exit(1)


# --- signals -------------------------------------------------------------------------------------------


def _api(url: str, path: str, body: dict[str, Any], timeout: float) -> Any:
    req = urllib.request.Request(f"{url}{path}", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read() or b"null")


def cancel_flow_run(api_url: str, flow_run_id: str, why: str, timeout: float = 1.5) -> None:
    """Mark a flow run and its unfinished task runs Cancelled through the REST API (best effort)."""
    state = {"type": "CANCELLED", "name": "Cancelled", "message": why}
    with contextlib.suppress(Exception):
        runs = _api(api_url, "/task_runs/filter", {"flow_runs": {"id": {"any_": [flow_run_id]}}, "task_runs": {"state": {"type": {"any_": ["RUNNING", "PENDING", "SCHEDULED"]}}}}, timeout)
        for run in runs or []:
            _api(api_url, f"/task_runs/{run['id']}/set_state", {"state": state, "force": True}, timeout)
    with contextlib.suppress(Exception):
        _api(api_url, f"/flow_runs/{flow_run_id}/set_state", {"state": state, "force": True}, timeout)


def _current_flow_run_id() -> str | None:
    with contextlib.suppress(Exception):
        from prefect.context import FlowRunContext

        ctx = FlowRunContext.get()
        if ctx is not None and ctx.flow_run is not None:
            return str(ctx.flow_run.id)
    return None


class RunHandle:
    """What a signal handler needs to end a run cleanly; filled in as the run gets going."""

    server: TemporaryServer | None = None
    api_url: str | None = None


@contextlib.contextmanager
def signals_end_the_run(run: RunHandle) -> Iterator[None]:
    """Within the block, SIGINT/SIGTERM print one line, cancel the flow run, stop the server and exit 130/143.

    The exit is immediate (``os._exit``): training threads and Prefect's retrying API clients would
    otherwise keep the process alive for minutes. Nothing finished is lost: stages commit their
    artifacts atomically, and a half-written staging folder is swept by the next run.
    """
    def handler(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        what = "interrupted" if signum == signal.SIGINT else "terminated"
        with contextlib.suppress(Exception):
            sys.stderr.write(f"trtflow: {what}; finished stages are kept, run the same command to resume\n")
            sys.stderr.flush()
        run_id = _current_flow_run_id()
        if run.api_url and run_id:
            cancel_flow_run(run.api_url, run_id, f"{what} by signal {signal.Signals(signum).name}")
        if run.server is not None:
            with contextlib.suppress(Exception):
                run.server.stop(grace=SIGNAL_BUDGET_S / 2)
        os._exit(128 + signum)

    global _HANDLER
    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    _HANDLER = handler
    try:
        yield
    finally:
        _HANDLER = None
        for s, h in previous.items():
            signal.signal(s, h)


#: the handler of the active ``signals_end_the_run`` block (None outside one, e.g. under a Prefect worker)
_HANDLER: Any = None


def reclaim_sigterm() -> None:
    """Inside a flow run started by the CLI, put back the CLI's SIGTERM handler.

    A flow run swaps in Prefect's handler, which raises ``TerminationSignal`` wherever the main thread
    is. Raised inside a native import (ONNX Runtime's module initialisation), that exception comes
    out as ``ImportError: initialization failed``: the stage fails and the run exits 1 instead of
    143 (seen in 1 of 4 runs terminated as validate started). Under a Prefect worker or ``serve``
    nothing is changed: their cancellation relies on Prefect's handler.
    """
    if _HANDLER is None:
        return
    with contextlib.suppress(ValueError):  # not the main thread: signals cannot be set here
        signal.signal(signal.SIGTERM, _HANDLER)


def started_by_deployment() -> bool:
    """Whether the current flow run comes from a deployment (a worker, ``trtflow serve``, the UI's Run button).

    Such a run's parameters come from whoever reached the API, so ``tasks.policy`` limits them; a flow
    called directly (``trtflow run``) is the user's own.
    """
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    return ctx is not None and ctx.flow_run is not None and ctx.flow_run.deployment_id is not None


# --- short console lines ---------------------------------------------------------------------------------


class OneLineFormatter(logging.Formatter):
    """Wraps a console formatter: every record on one line, no traceback (the API handler keeps them)."""

    def __init__(self, inner: logging.Formatter | None, limit: int = 200) -> None:
        super().__init__()
        self.inner = inner or logging.Formatter()
        self.limit = limit

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if not (record.exc_info or record.exc_text or record.stack_info or "\n" in msg or len(msg) > self.limit):
            return self.inner.format(record)
        # A copy: the same record goes on to Prefect's API handler, which must keep the traceback.
        short = copy.copy(record)
        short.exc_info, short.exc_text, short.stack_info = None, None, None
        short.msg, short.args = one_line(msg.strip().splitlines()[0] if msg.strip() else "", self.limit), None
        return self.inner.format(short)


@contextlib.contextmanager
def one_line_console() -> Iterator[None]:
    """Make Prefect's console handlers print one line per record (tracebacks stay in the API logs)."""
    from prefect.logging.handlers import PrefectConsoleHandler

    loggers = [logging.getLogger(), *(lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger))]
    changed: list[tuple[logging.Handler, logging.Formatter | None]] = []
    for lg in loggers:
        for h in lg.handlers:
            if isinstance(h, PrefectConsoleHandler) and not isinstance(h.formatter, OneLineFormatter):
                changed.append((h, h.formatter))
                h.setFormatter(OneLineFormatter(h.formatter))
    try:
        yield
    finally:
        for h, f in changed:
            h.setFormatter(f)  # type: ignore[arg-type]


def _flush_logs() -> None:
    # Prefect ships logs and events to the API from background workers; drain them while the server
    # still answers, else they retry against a stopped server at exit for a minute or more.
    with contextlib.suppress(Exception):
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=5, at_exit=False)
    with contextlib.suppress(Exception):
        from prefect.events.worker import EventsWorker

        EventsWorker.drain_all(timeout=5, at_exit=False)


def run_flow(flow: Callable[..., Any], config: Any, debug: bool = False, say: Callable[[str], None] | None = None) -> Any:
    """Call the flow on ``config`` against a temporary server (or ``PREFECT_API_URL``), with clean signals.

    Args:
        flow: the pipeline flow (or a ``with_options`` variant).
        config: its PipelineConfig.
        debug: keep Prefect's tracebacks in the terminal.
        say: prints a one-line notice (database healed); default: stderr with a "trtflow: " prefix.

    Returns:
        The flow's return value.

    Raises:
        PrefectServerError: no server could be started, PREFECT_API_URL does not answer, or the API died
            during the run. Whatever the flow raises.
    """
    say = say or (lambda line: print(f"trtflow: {line}", file=sys.stderr))
    run = RunHandle()
    with contextlib.ExitStack() as stack:
        # Installed first: Ctrl-C while the server starts also ends with one line and stops it.
        stack.enter_context(signals_end_the_run(run))
        from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

        run.api_url = get_current_settings().api.url or None
        if run.api_url is None:
            run.server = TemporaryServer(Path(get_current_settings().home).expanduser())
            stack.callback(run.server.stop)
            url = start_server(run.server, say)
            stack.enter_context(temporary_settings(updates={PREFECT_API_URL: url}))
            run.api_url = url
            # Drained only before our own server stops; a user's server keeps receiving them.
            stack.callback(_flush_logs)
        else:
            check_api(run.api_url)
        # Stopped first at the end (LIFO): the server's own stop is not a death.
        stack.callback(ApiWatchdog(run).start().stop)
        if logging.getLogger("trtflow").level == logging.NOTSET:
            logging.getLogger("trtflow").setLevel(logging.INFO)  # per-epoch lines, stage summaries
        if not debug:
            stack.enter_context(one_line_console())
        try:
            return flow(config)
        except TrtflowError:
            raise
        except Exception as exc:
            # Prefect's client gives up with its own error (httpx.ConnectError...) when the API is gone.
            if not api_answers(run.api_url):
                raise api_unreachable(run.api_url, temporary=run.server is not None, during_run=True, what="stopped answering during the run") from exc
            raise
