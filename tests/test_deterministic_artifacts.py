"""An artifact's content is a function of its key: the same stage gives the same bytes under CPU load,
in another process, whatever thread count the process happens to have.

    pytest tests/test_deterministic_artifacts.py -q
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import _pipeline_kit as kit
from tasks.config import CollapseGate, Precision, TrainConfig


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> kit.Good:
    base = tmp_path_factory.mktemp("deterministic")
    # One training thread: a process that finds the checkpoint cached has torch's default (the cores).
    cfg = kit.tiny_config(
        base / "art", kit.tiny_dataset(base / "d.npz", per_class=20), precisions=[Precision.fp32, Precision.fp16],
        train=TrainConfig(epochs=1, batch_size=32, threads=1, collapse_gate=CollapseGate(enabled=False)),
    )
    return kit.Good(Path(cfg.artifacts_dir), cfg, kit.run_plain(cfg))


def _busy_loops(n: int) -> list[subprocess.Popen[bytes]]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def test_verification_is_the_same_under_cpu_contention(made: kit.Good, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """verify recomputed (the PyTorch reference too), alone and with every core busy: the first run's digests."""
    import tasks.verify
    import tasks.verify_reference

    verify = {k: v for k, v in made.digests.items() if k.startswith("verify-")}
    cfg = kit.with_root(made.config, kit.clone(made.root, tmp_path / "a"))
    manifests = {k: (cfg.artifacts_dir / "verify" / made.refs[k].key[:16] / "manifest.json") for k in verify}
    for load in (0, 3):
        monkeypatch.setattr(tasks.verify_reference, "_REFERENCE", {})
        committed = {k: m.stat().st_ino for k, m in manifests.items()}
        busy = _busy_loops(load)
        try:
            refs = kit.run_plain(cfg, refresh=("verify",))
        finally:
            for p in busy:
                p.kill()
                p.wait()
        assert all(m.stat().st_ino != committed[k] for k, m in manifests.items())  # really computed again
        assert {k: refs[k].digest for k in verify} == verify, f"with {load} busy processes"


def test_the_pytorch_reference_runs_with_the_checkpoints_thread_count(made: kit.Good, monkeypatch: pytest.MonkeyPatch) -> None:
    """Not the process's: one that trained has the training's count, one that found the checkpoint cached has the default."""
    import torch

    import tasks.inference
    import tasks.verify
    import tasks.verify_reference

    seen: list[int] = []
    real = tasks.inference.predict_outputs
    monkeypatch.setattr(tasks.inference, "predict_outputs", lambda *a, **k: (seen.append(torch.get_num_threads()), real(*a, **k))[1])
    monkeypatch.setattr(tasks.verify_reference, "_REFERENCE", {})
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        tasks.verify_reference.reference_outputs(made.refs["train"], made.refs["data"])
        assert set(seen) == {1} and torch.get_num_threads() == 3  # and the process's count is restored
    finally:
        torch.set_num_threads(before)
