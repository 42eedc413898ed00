"""Checks that run before the temporary Prefect server: bad inputs fail in seconds, in one short line."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from flows import cli
from flows.cli import EXIT_FAILED, main

EIG_MODEL = '''
import torch
from torch import nn


class Eig(nn.Module):
    def __init__(self, num_classes, in_channels):
        super().__init__()
        self.fc = nn.Linear(in_channels * 8 * 8, 16)
        self.out = nn.Linear(4, num_classes)

    def forward(self, x):
        h = self.fc(x.flatten(1)).view(-1, 4, 4)
        return self.out(torch.linalg.eigvals(h).real)


def make(num_classes, in_channels):
    return Eig(num_classes, in_channels)
'''


@pytest.fixture
def no_prefect(monkeypatch):
    """Fail the test if the flow (and so the Prefect server) would start."""
    import flows.runtime

    def refuse(*a, **k):
        raise AssertionError("the Prefect flow started although a check before it should have failed")

    monkeypatch.setattr(flows.runtime, "run_flow", refuse)


def _dataset(tmp_path: Path, x: np.ndarray, y: np.ndarray) -> Path:
    path = tmp_path / "d.npz"
    np.savez(path, x=x, y=y)
    return path


def _small(n: int = 60) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.random((n, 1, 8, 8), dtype=np.float32), np.arange(n) % 3


def _run(tmp_path, capsys, *argv: str) -> tuple[int, str]:
    code = main(["run", "--artifacts-dir", str(tmp_path / "art"), "--epochs", "1", *argv])
    return code, capsys.readouterr().err


@pytest.mark.usefixtures("no_prefect")
@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda x, y: (x * 1e30, y), "values up to 1e+30"),
        (lambda x, y: (np.ones_like(x), y), "every sample of x is identical"),
        (lambda x, y: (np.array([object()] * len(y)), y), "object array (dtype=object)"),
        (lambda x, y: (x, y + 0.5), "expected integer class indices"),
    ],
    ids=["huge values", "identical samples", "object array", "fractional labels"],
)
def test_bad_dataset_fails_before_the_server(tmp_path, capsys, make, reason):
    from test_cli import assert_short_failure

    x, y = make(*_small())
    if x.dtype == object:
        path = tmp_path / "d.npz"
        np.savez(path, x=x, y=y, allow_pickle=True)
    else:
        path = _dataset(tmp_path, x, y)
    # Float y is regression targets unless --task classification says they are classes.
    forced = ["--task", "classification"] if "integer class indices" in reason else []
    code, err = _run(tmp_path, capsys, "--dataset", str(path), *forced)
    assert code == EXIT_FAILED
    assert_short_failure(err, reason)


@pytest.mark.usefixtures("no_prefect")
def test_unexportable_model_names_the_operator_before_training(tmp_path, capsys, monkeypatch):
    from test_cli import assert_short_failure

    (tmp_path / "eig_model.py").write_text(EIG_MODEL)
    monkeypatch.syspath_prepend(str(tmp_path))
    x, y = _small()
    code, err = _run(tmp_path, capsys, "--dataset", str(_dataset(tmp_path, x, y)), "--model", "eig_model:make")
    assert code == EXIT_FAILED
    assert_short_failure(err, "aten.linalg_eig")
    assert "\x1b[" not in err and "control flow" not in err
    assert not (tmp_path / "art" / "train").exists()


def test_a_passing_check_is_remembered(tmp_path, monkeypatch):
    from flows import preflight
    from tasks.config import PipelineConfig

    x, y = _small()
    cfg = PipelineConfig(artifacts_dir=tmp_path / "art", data={"dataset": _dataset(tmp_path, x, y)})
    calls = []
    monkeypatch.setattr(preflight, "model_checks", lambda *a: calls.append(a))
    preflight.check_before_run(cfg)
    preflight.check_before_run(cfg)
    assert len(calls) == 1
    np.savez(tmp_path / "d.npz", x=x * 1e30, y=y)  # an edited dataset is checked again
    with pytest.raises(Exception, match="sane range"):
        preflight.check_before_run(cfg)


HF_STYLE_MODEL = '''
from torch import nn


class TinyHF(nn.Module):
    """Hugging Face style: named inputs, an optional mask, and **kwargs that swallow any other name."""

    def __init__(self, num_classes):
        super().__init__()
        self.emb = nn.Embedding(50, 8)
        self.head = nn.Linear(8, num_classes)

    def forward(self, input_ids, attention_mask=None, **kwargs):
        h = self.emb(input_ids)
        if attention_mask is not None:
            h = h * attention_mask.unsqueeze(-1)
        return self.head(h.mean(1))
'''


#: a padding mask per sample (lengths 2..6 of 6): masks must differ between samples, like real ones
MASK = (np.arange(6) < np.random.default_rng(1).integers(2, 7, size=(60, 1))).astype(np.float32)


def _text_dataset(tmp_path: Path, **arrays: np.ndarray) -> Path:
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 50, size=(60, 6))
    path = tmp_path / "text.npz"
    np.savez(path, input_ids=ids, y=ids[:, 0] % 3, **arrays)
    return path


@pytest.mark.usefixtures("no_prefect")
@pytest.mark.parametrize(
    ("arrays", "reason"),
    [
        ({"attention_masks": MASK}, "attention_masks: not read by the model; did you mean attention_mask?"),
        ({"attention_mask": MASK, "foo": np.random.default_rng(2).normal(size=(60, 2)).astype(np.float32)}, "foo: not read by the model"),
    ],
    ids=["misspelt mask", "extra array"],
)
def test_an_array_the_model_does_not_read_fails_before_training(tmp_path, capsys, monkeypatch, arrays, reason):
    from test_cli import assert_short_failure

    (tmp_path / "hf_style.py").write_text(HF_STYLE_MODEL)
    monkeypatch.syspath_prepend(str(tmp_path))
    code, err = _run(tmp_path, capsys, "--dataset", str(_text_dataset(tmp_path, **arrays)), "--model", "hf_style:TinyHF")
    assert code == EXIT_FAILED
    assert_short_failure(err, reason)
    if "foo" in reason:
        assert "did you mean" not in err.splitlines()[0]  # nothing in forward is close to foo
    assert not (tmp_path / "art" / "train").exists()


def test_arrays_the_model_reads_pass_the_check(tmp_path, monkeypatch):
    from flows.preflight import check_before_run
    from tasks.config import PipelineConfig

    (tmp_path / "hf_style.py").write_text(HF_STYLE_MODEL)
    monkeypatch.syspath_prepend(str(tmp_path))
    path = _text_dataset(tmp_path, attention_mask=MASK)
    cfg = PipelineConfig(artifacts_dir=tmp_path / "art", data={"dataset": path}, train={"model": "hf_style:TinyHF"})
    assert check_before_run(cfg) == (tmp_path / "art").resolve()
FLAT_TEXT_MODEL = '''
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.emb = nn.Embedding(30, 4)
        self.head = nn.Linear(12 * 4, num_classes)

    def forward(self, input_ids, attention_mask):
        h = self.emb(input_ids) * attention_mask.unsqueeze(-1)
        return self.head(h.reshape(len(h), -1))
'''


@pytest.mark.usefixtures("no_prefect")
def test_a_model_that_bakes_in_a_dynamic_length_fails_before_training_naming_it(tmp_path, capsys, monkeypatch):
    from test_cli import assert_short_failure

    (tmp_path / "flat_text.py").write_text(FLAT_TEXT_MODEL)
    monkeypatch.syspath_prepend(str(tmp_path))
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "t.npz", input_ids=rng.integers(0, 30, (60, 12)), attention_mask=np.ones((60, 12), np.int64), y=np.arange(60) % 3)
    code, err = _run(tmp_path, capsys, "--dataset", str(tmp_path / "t.npz"), "--model", "flat_text:Net",
                     "--min-shapes", "input_ids:1x4,attention_mask:1x4", "--opt-shapes", "input_ids:8x12,attention_mask:8x12",
                     "--max-shapes", "input_ids:16x24,attention_mask:16x24")
    assert code == EXIT_FAILED
    assert_short_failure(err, "layer 'head' (Linear) at flat_text.py:14 fixes input_ids axis 1 (declared 4..24, operation mm)")
    assert "--max-shapes" in err
    assert not (tmp_path / "art" / "train").exists()
