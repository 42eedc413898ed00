"""Start-up of trtflow's temporary Prefect server: it dies with the process that started it, whatever kills that one.

Run as a script (not imported) by ``flows.runtime.TemporaryServer``::

    python flows/_server_child.py <parent pid> <uvicorn arguments...>

SIGKILL of ``trtflow`` (the OOM killer) runs no cleanup, so the parent cannot stop its server. Here the
server asks the kernel for SIGKILL when its parent dies (Linux ``prctl(PR_SET_PDEATHSIG)``), and a
watchdog thread also polls the parent's pid (other systems; and a parent that died before the prctl).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

PR_SET_PDEATHSIG = 1
POLL_S = 0.5


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _watch(parent: int) -> None:
    while True:
        if os.getppid() != parent:  # reparented: the parent is gone
            _die()
        time.sleep(POLL_S)


def main() -> None:
    # Run as a script, its folder is first on sys.path: trtflow's cli.py, ui.py... must not shadow anything.
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    parent = int(sys.argv[1])
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass  # the watchdog below still ends the server
    if os.getppid() != parent:
        sys.exit(1)  # the parent died before the death signal was armed
    threading.Thread(target=_watch, args=(parent,), name="trtflow-parent-watchdog", daemon=True).start()
    sys.argv = ["uvicorn", *sys.argv[2:]]
    from uvicorn.main import main as uvicorn_main

    uvicorn_main()


if __name__ == "__main__":
    main()
