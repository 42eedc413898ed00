"""Run a command and measure its whole process tree: wall time, summed RSS, each process's high-water mark.

Used by ``scale.py --cli``; on its own::

    python benchmarks/_tree.py trtflow run --dataset big.npz

``getrusage(RUSAGE_CHILDREN).ru_maxrss`` (what ``/usr/bin/time`` prints) is the largest single
process's peak; a pipeline also runs a Prefect server and worker processes, so the tree's summed RSS,
sampled every ``interval`` seconds, is reported beside it. Pages shared between processes (libraries)
count once per process in the sum, so the sum errs high.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def _status(pid: int) -> dict[str, int]:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    return {k: int(v.split()[0]) * 1024 for k, v in (line.split(":", 1) for line in text.splitlines()) if k in ("VmRSS", "VmHWM")}


def run_measured(cmd: list[str], env: dict[str, str] | None = None, cwd: str | Path | None = None, interval: float = 0.25) -> dict[str, Any]:
    """Run ``cmd``; return rc, wall_s, peak_tree_rss_gib, peak_process_gib (largest VmHWM) and the output tail."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak_tree, hwm = 0, 0
    stop = threading.Event()
    lines: list[str] = []

    def sample() -> None:
        nonlocal peak_tree, hwm
        while not stop.is_set():
            pids, todo = [], [proc.pid]
            while todo:
                p = todo.pop()
                pids.append(p)
                todo += _children(p)
            stats = [_status(p) for p in pids]
            peak_tree = max(peak_tree, sum(s.get("VmRSS", 0) for s in stats))
            hwm = max([hwm, *(s.get("VmHWM", 0) for s in stats)])
            stop.wait(interval)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        del lines[:-40]
    rc = proc.wait()
    stop.set()
    sampler.join()
    gib = float(1 << 30)
    return {"rc": rc, "wall_s": time.perf_counter() - t0, "peak_tree_rss_gib": peak_tree / gib, "peak_process_gib": hwm / gib, "tail": "".join(lines)}


if __name__ == "__main__":
    result = run_measured(sys.argv[1:])
    print(result.pop("tail"))
    print(json.dumps(result))
