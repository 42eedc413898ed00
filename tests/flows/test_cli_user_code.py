"""Through the command: a re-run after an edit of the user's model file recomputes and says why."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]

USERNET = """
from torch import nn


def build(in_features, num_classes):
    return nn.Sequential(nn.Linear(in_features, 32), nn.ReLU(), nn.Linear(32, num_classes))
"""


@pytest.mark.slow
def test_a_wider_user_model_is_trained_again_not_cached(tmp_path: Path) -> None:
    """usernet:build (Linear 16->32->3) run once, widened to 16->64->3, same command again."""
    rng = np.random.default_rng(0)
    y = np.arange(240) % 3
    x = rng.normal(size=(240, 16)).astype(np.float32)
    x[:, :3] += 3 * np.eye(3, dtype=np.float32)[y]
    np.savez(tmp_path / "d.npz", x=x, y=y)
    (tmp_path / "usernet.py").write_text(USERNET)
    env = {**os.environ, "PYTHONPATH": str(REPO), "PREFECT_HOME": str(tmp_path / "prefect-home"), "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("PREFECT_API_URL", None)
    cmd = [
        sys.executable, "-m", "flows.cli", "run", "--model", "usernet:build", "--dataset", "d.npz", "--epochs", "1",
        "--precisions", "fp32", "--min-batch", "1", "--opt-batch", "8", "--max-batch", "32", "--no-profile",
        "--no-collapse-gate", "--artifacts-dir", "art",
    ]
    first = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]

    (tmp_path / "usernet.py").write_text(USERNET.replace("32", "64"))
    second = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    log = second.stdout + second.stderr
    assert "train: usernet.py changed" in log, log[-3000:]
    states = {line.split("Task run '")[1].split("'")[0]: line.split("Finished in state ")[1] for line in log.splitlines() if "Task run '" in line and "Finished in state" in line}
    assert states["data"].startswith("Cached"), states
    for stage in ("train", "export", "validate", "precision-fp32", "build-fp32", "verify-fp32"):
        assert states[stage].startswith("Completed"), (stage, states)
    report = json.loads((tmp_path / "art" / "report.json").read_text())
    import torch

    checkpoint = torch.load(tmp_path / "art" / report["model"]["checkpoint"], weights_only=True)
    assert tuple(checkpoint["state_dict"]["0.weight"].shape) == (64, 16)
