"""The CLI's runtime around the flow: database healing, one-line console records (no server needed)."""

from __future__ import annotations

import logging
import sqlite3
import sys

from flows import runtime


def _real_db(path):
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE t (x)")
    con.executemany("INSERT INTO t VALUES (?)", [(i,) for i in range(2000)])
    con.commit()
    con.close()


def test_a_damaged_database_is_moved_aside_with_one_line(tmp_path, monkeypatch):
    db = tmp_path / "prefect.db"
    _real_db(db)
    monkeypatch.setattr(runtime, "database_file", lambda: db)
    said: list[str] = []
    runtime.heal_database(said.append)
    assert said == [] and db.exists()  # an intact database is left alone
    db.write_bytes(db.read_bytes()[:5000])  # truncated, as a full disk or a kill leaves it
    (tmp_path / "prefect.db-wal").write_bytes(b"x")
    runtime.heal_database(said.append)
    assert len(said) == 1 and "was damaged" in said[0] and "moved it to prefect.db.damaged-" in said[0]
    assert not db.exists() and not (tmp_path / "prefect.db-wal").exists()
    moved = sorted(p.name for p in tmp_path.glob("prefect.db.damaged-*"))
    assert moved[0].endswith(said[0].split("moved it to ")[1].split()[0]) and any(m.endswith("-wal") for m in moved)


def test_garbage_is_not_a_database_but_a_locked_one_is_fine(tmp_path):
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"\x00garbage" * 1000)
    assert runtime.database_problem(bad)
    good = tmp_path / "good.db"
    _real_db(good)
    holder = sqlite3.connect(good, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        assert runtime.database_problem(good) is None  # locked: the server waits for it
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert runtime.database_problem(tmp_path / "missing.db") is None


def test_startup_timeout_is_raised_unless_the_user_set_it(monkeypatch):
    monkeypatch.delenv(runtime.STARTUP_TIMEOUT_ENV, raising=False)
    assert runtime.startup_timeout() == runtime.DEFAULT_STARTUP_TIMEOUT_S > 20
    monkeypatch.setenv(runtime.STARTUP_TIMEOUT_ENV, "45")
    assert runtime.startup_timeout() == 45


def test_console_records_lose_their_traceback_but_the_api_keeps_it():
    inner = logging.Formatter("%(levelname)s %(message)s")
    short = runtime.OneLineFormatter(inner)
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        record = logging.LogRecord("prefect.flow_runs", logging.ERROR, __file__, 1, "Encountered exception: %s", ("boom\nmore",), sys.exc_info())
    text = short.format(record)
    assert text == "ERROR Encountered exception: boom" and "Traceback" not in text
    assert record.exc_info is not None  # the record itself still carries it for Prefect's API handler
    assert "Traceback" in inner.format(record)


def test_the_flow_run_gets_the_clis_sigterm_handler_back():
    """Prefect's own handler raises inside whatever runs; in a native import that became an ImportError (exit 1, not 143)."""
    import signal

    def prefects(signum, frame):  # stands in for the handler a flow run installs
        raise RuntimeError("not ours")

    before = signal.getsignal(signal.SIGTERM)
    try:
        runtime.reclaim_sigterm()  # outside the CLI (a worker, serve): nothing changes
        assert signal.getsignal(signal.SIGTERM) is before
        with runtime.signals_end_the_run(runtime.RunHandle()):
            ours = signal.getsignal(signal.SIGTERM)
            signal.signal(signal.SIGTERM, prefects)
            runtime.reclaim_sigterm()
            assert signal.getsignal(signal.SIGTERM) is ours
        assert signal.getsignal(signal.SIGTERM) is before
    finally:
        signal.signal(signal.SIGTERM, before)
