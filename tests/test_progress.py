"""tasks/progress.py: per-epoch lines with samples/s and ETA, the UI sink fed while a loop runs, a bar only on a terminal."""

from __future__ import annotations

import logging

from tasks import progress


def test_milestones_log_rate_and_eta_and_the_sink_sees_progress_during_the_loop(monkeypatch, caplog):
    seen: list[tuple[str, float, str]] = []
    monkeypatch.setattr(progress, "SINK_INTERVAL_S", 0.0)
    previous = progress.set_sink(lambda stage, fraction, text: seen.append((stage, fraction, text)))
    try:
        with caplog.at_level(logging.INFO, logger="trtflow.test"):
            with progress.Progress("train", total=4, unit="batch", logger=logging.getLogger("trtflow.test"), bar=False) as p:
                p.update(samples=32, loss=1.5)
                p.update(samples=32, loss=1.2)
                line = p.milestone("epoch 1/2", loss=1.2)
    finally:
        progress.set_sink(previous)
    assert line.startswith("train: epoch 1/2  loss 1.2  ") and "samples/s" in line and "ETA " in line
    assert caplog.records[-1].getMessage() == line
    assert [f for _, f, _ in seen] == [0.25, 0.5, 0.5] and seen[-1][2] == line


def test_no_bar_without_a_terminal(capsys):
    with progress.Progress("verify fp16", total=3) as p:
        p.update()
    assert p._bar is None and capsys.readouterr().err == ""


def test_a_failing_sink_never_fails_the_loop(monkeypatch):
    monkeypatch.setattr(progress, "SINK_INTERVAL_S", 0.0)

    def broken(*a):
        raise RuntimeError("API down")

    previous = progress.set_sink(broken)
    try:
        with progress.Progress("train", total=2, bar=False) as p:
            p.update()
            p.milestone("epoch 1/1")
    finally:
        progress.set_sink(previous)


def test_units_are_pluralised_in_the_status_line():
    line = progress.Progress("train", total=4, unit="batch", bar=False)._status({})
    assert line.startswith("train: 0/4 batches") and line.endswith("batches/s")
