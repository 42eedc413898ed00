"""Helpers shared by the benchmarks: statistics over repeats, the machine line, RESULTS.md sections.

Not a benchmark itself; the scripts beside it import it (run them from the repository root).
"""

from __future__ import annotations

import datetime as dt
import os
import re
import statistics
import sys
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
if str(ROOT) not in sys.path:
    # The scripts run as files (python benchmarks/x.py); the repo's packages must import either way.
    sys.path.insert(0, str(ROOT))


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median, min, max, and the repeat count of one quantity measured several times."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def fmt(s: dict[str, float], digits: int = 3, unit: str = "") -> str:
    """'1.23 (1.10–1.40)': the median and the range over repeats."""
    return f"{s['median']:.{digits}g}{unit} ({s['min']:.{digits}g}–{s['max']:.{digits}g})"


def machine() -> str:
    """CPU model, usable cores, load, library versions and the date: what a number belongs to."""
    from tasks.profile import machine as m

    info = m()
    versions = []
    for dist in ("torch", "onnxruntime", "prefect", "tensorrt"):
        try:
            versions.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            pass
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    today = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"{today}; {info['cpu']}, {info['cores']} cores ({info['machine']}); load average at start {load}; {', '.join(versions)}"


def write_section(name: str, markdown: str) -> None:
    """Replace (or append) the section of benchmark ``name`` in RESULTS.md."""
    begin, end = f"<!-- begin {name} -->", f"<!-- end {name} -->"
    block = f"{begin}\n{markdown.rstrip()}\n{end}"
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n\nWritten by the scripts in this folder; each section is replaced when its script runs again.\n"
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    RESULTS.write_text(text if text.endswith("\n") else text + "\n")
    print(f"wrote the '{name}' section of {RESULTS.relative_to(ROOT)}")
