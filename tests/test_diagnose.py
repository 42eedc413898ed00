"""Models that hard-code the batch: the pre-flight names the cause (a hard-coded size, a batch frozen by int())
and the fix, instead of blaming the layers or letting the run train an engine that takes only batches of 2.

    pytest tests/test_diagnose.py -q
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from flows.cli import EXIT_FAILED

MODELS = '''
import numpy as np
import torch
from torch import nn


class View32(nn.Module):
    def __init__(self, input_shape, num_classes=10):
        super().__init__()
        self.fc = nn.Linear(int(np.prod(input_shape)), num_classes)

    def forward(self, x):
        return self.fc(x.view(32, -1))


class Hidden32(nn.Module):
    def __init__(self, input_shape, num_classes=10):
        super().__init__()
        self.gru = nn.GRU(input_shape[-1], 16, batch_first=True)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        h0 = torch.zeros(1, 32, 16)
        out, _ = self.gru(x, h0)
        return self.fc(out[:, -1])


class IntOfShape(nn.Module):
    def __init__(self, input_shape, num_classes=10):
        super().__init__()
        self.fc = nn.Linear(int(np.prod(input_shape)), num_classes)

    def forward(self, x):
        n = int(x.shape[0])
        return self.fc(x.reshape(n, -1))


class WrongFeatures(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.fc = nn.Linear(100, num_classes)

    def forward(self, x):
        return self.fc(x.flatten(1))
'''


@pytest.fixture
def models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "batchy_models.py").write_text(MODELS)
    monkeypatch.syspath_prepend(str(tmp_path))
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "images.npz", x=rng.random((60, 3, 8, 8), dtype=np.float32), y=np.arange(60) % 3)
    np.savez(tmp_path / "sequences.npz", x=rng.random((60, 5, 4), dtype=np.float32), y=np.arange(60) % 3)
    return tmp_path


def _run(models: Path, model: str, data: str, capsys: pytest.CaptureFixture[str]) -> str:
    # A fresh process, as a user runs it: in-process CLI runs earlier in the suite leave Prefect's
    # console handler writing to a stream pytest has closed, and this test reads the error output.
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(models), str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", "--artifacts-dir", str(models / "art"), "--model", f"batchy_models:{model}", "--dataset", str(models / data), "--epochs", "1"],
        capture_output=True, text=True, env=env, cwd=models, timeout=300,
    )
    code, err = done.returncode, done.stderr
    assert code == EXIT_FAILED, err
    assert "Traceback" not in err and "unexpected error" not in err, err
    first = err.splitlines()[0]
    assert len(first) <= 160, first
    assert not (models / "art" / "train").exists()  # nothing was trained
    return first


@pytest.mark.parametrize(("model", "data"), [("View32", "images.npz"), ("Hidden32", "sequences.npz")])
def test_a_hard_coded_batch_size_is_named(models: Path, capsys: pytest.CaptureFixture[str], model: str, data: str) -> None:
    first = _run(models, model, data, capsys)
    assert first.startswith("trtflow: ModelError: the model hard-codes a batch size of 32: the trial batch of 2 samples fails; use x.size(0)"), first


def test_layers_that_do_not_fit_are_not_called_a_hard_coded_batch(models: Path, capsys: pytest.CaptureFixture[str]) -> None:
    first = _run(models, "WrongFeatures", "images.npz", capsys)
    assert "hard-codes" not in first and "mat1 and mat2" in first, first


def test_a_batch_frozen_by_int_of_the_shape_is_named_at_its_line(models: Path, capsys: pytest.CaptureFixture[str]) -> None:
    first = _run(models, "IntOfShape", "images.npz", capsys)
    line = next(i for i, text in enumerate(MODELS.splitlines(), 1) if "n = int(x.shape[0])" in text)
    assert first.startswith(f"trtflow: ExportError: forward fixes the batch size to a number at batchy_models.py:{line} (n = int(x.shape[0])); use x.size(0)"), first
