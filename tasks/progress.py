"""Progress of a long loop, told three ways: a live bar on a terminal, log lines, and the run's UI progress.

A stage knows nothing of Prefect: it counts its work with ``Progress``; ``flows.ui`` registers a sink
(``set_sink``) that turns the counts into the flow run's progress artifact while the stage runs. Log
lines go to the ``trtflow.*`` logger the stage passes, which Prefect forwards to its run logs and the UI.

    from tasks.progress import Progress

    with Progress("train", total=epochs * steps, unit="batch", logger=log) as p:
        for epoch in range(1, epochs + 1):
            for batch in batches:
                ...
                p.update(samples=len(batch), loss=loss)        # the bar; the UI every few seconds
            p.milestone(f"epoch {epoch}/{epochs}", loss=0.41)  # one log line with samples/s and ETA
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

#: receives (stage, fraction done in 0..1, one-line description); set by the flow while it runs
Sink = Callable[[str, float, str], None]

_sink: Sink | None = None
_sink_lock = threading.Lock()

#: least seconds between two reports to the sink from ``update`` (milestones always report)
SINK_INTERVAL_S = 2.0


def set_sink(sink: Sink | None) -> Sink | None:
    """Install the sink that mirrors progress elsewhere (the Prefect UI); returns the previous one."""
    global _sink
    with _sink_lock:
        previous, _sink = _sink, sink
    return previous


def _report(stage: str, fraction: float, text: str) -> None:
    sink = _sink
    if sink is None:
        return
    try:
        sink(stage, fraction, text)
    except Exception as exc:  # noqa: BLE001 - showing progress must never fail a stage
        logging.getLogger("trtflow.progress").debug("progress sink failed: %s", exc)


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class Progress:
    """Counts the units of a long loop; shows a bar on a terminal, logs milestones, feeds the UI sink.

    Args:
        stage: the stage name shown everywhere ("train", "verify fp16").
        total: units the loop will do (batches, samples).
        unit: the unit's name for the bar.
        logger: where milestone lines go (default ``trtflow.progress``).
        bar: show a tqdm bar; None: only when stderr is a terminal.
    """

    def __init__(self, stage: str, total: int, unit: str = "step", logger: logging.Logger | None = None, bar: bool | None = None) -> None:
        self.stage, self.total, self.unit = stage, max(int(total), 1), unit
        self.log = logger or logging.getLogger("trtflow.progress")
        self.done = 0
        self.samples = 0
        self.t0 = time.perf_counter()
        self._last_sink = 0.0
        show = sys.stderr.isatty() if bar is None else bar
        self._bar: Any = None
        if show:
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, desc=stage, unit=unit, leave=False, dynamic_ncols=True, file=sys.stderr)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def fraction(self) -> float:
        return min(1.0, self.done / self.total)

    def rate(self) -> float:
        """Samples (or units, when no samples were counted) per second so far."""
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        return (self.samples or self.done) / elapsed

    def eta(self) -> float | None:
        """Seconds left at the pace so far (None before the first unit)."""
        if not self.done:
            return None
        elapsed = time.perf_counter() - self.t0
        return elapsed * (self.total - self.done) / self.done

    def update(self, n: int = 1, samples: int = 0, **metrics: Any) -> None:
        """Count ``n`` units (and ``samples`` samples); moves the bar, reports to the UI every few seconds."""
        self.done += n
        self.samples += samples
        if self._bar is not None:
            self._bar.update(n)
            if metrics:
                self._bar.set_postfix({k: _fmt(v) for k, v in metrics.items()}, refresh=False)
        now = time.perf_counter()
        if now - self._last_sink >= SINK_INTERVAL_S:
            self._last_sink = now
            _report(self.stage, self.fraction, self._status(metrics))

    def milestone(self, what: str, **metrics: Any) -> str:
        """Log one line: ``what``, the metrics, samples/s and the ETA; also reported to the UI. Returns the line."""
        line = self._status(metrics, what)
        if self._bar is not None:
            self._bar.clear()
        self.log.info("%s", line)
        self._last_sink = time.perf_counter()
        _report(self.stage, self.fraction, line)
        return line

    def _status(self, metrics: dict[str, Any], what: str = "") -> str:
        units = self.unit + ("es" if self.unit.endswith(("s", "x", "ch", "sh")) else "s")  # batches, steps
        parts = [f"{self.stage}: {what}".rstrip(": ") if what else f"{self.stage}: {self.done}/{self.total} {units}"]
        parts += [f"{k.replace('_', ' ')} {_fmt(v)}" for k, v in metrics.items()]
        parts.append(f"{self.rate():.0f} {'samples' if self.samples else units}/s")
        eta = self.eta()
        if eta is not None and self.done < self.total:
            parts.append(f"ETA {_duration(eta)}")
        return "  ".join(parts)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
