"""Bad input: each mistake a user can make fails fast with a message naming the problem and the fix,
a non-zero exit status, and no loss of what earlier runs produced.

    pytest tests/test_bad_input.py -q

Every test runs its bad input against a folder that already holds a good pipeline, then checks that
every good artifact is still intact.
"""

from __future__ import annotations

import errno
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from torch import nn

import _pipeline_kit as kit
from tasks.artifacts import ArtifactRef
from tasks.config import Backend, BatchProfile, DataConfig, PipelineConfig, Precision, Tolerance, TrainConfig, parse_precisions
from tasks.errors import ConfigError, DatasetError, ExportError, ModelError, StorageError, is_retryable


# --- test models (imported by path 'test_bad_input:<name>') ---------------------------------------


class DataDependent(nn.Module):
    """Takes a branch on the data: eager PyTorch runs it, torch.export cannot trace it."""

    def __init__(self, num_classes: int, in_channels: int) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Flatten(), nn.LazyLinear(num_classes))
        self.b = nn.Sequential(nn.Flatten(), nn.LazyLinear(num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.mean() > 0.3:
            return self.a(x)
        return self.b(x)


class TupleOut(nn.Module):
    def __init__(self, num_classes: int, in_channels: int) -> None:
        super().__init__()
        self.fc = nn.Sequential(nn.Flatten(), nn.LazyLinear(num_classes))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.fc(x)
        return y, y


class DictOut(TupleOut):
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:  # type: ignore[override]
        return {"logits": self.fc(x)}


def data_dependent(num_classes: int, in_channels: int) -> nn.Module:
    return DataDependent(num_classes, in_channels)


def tuple_out(num_classes: int, in_channels: int) -> nn.Module:
    return TupleOut(num_classes, in_channels)


def dict_out(num_classes: int, in_channels: int) -> nn.Module:
    return DictOut(num_classes, in_channels)


def one_channel(num_classes: int, in_channels: int) -> nn.Module:
    """Ignores in_channels: made for grey images only."""
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, num_classes))


def three_logits(num_classes: int, in_channels: int) -> nn.Module:
    """Ignores num_classes."""
    return nn.Sequential(nn.Flatten(), nn.LazyLinear(3))


def no_keywords() -> nn.Module:
    return nn.Linear(1, 1)


def not_a_module(num_classes: int, in_channels: int) -> object:
    return object()


# --- fixtures ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> kit.Good:
    return kit.good_run(tmp_path_factory)


@pytest.fixture(scope="module")
def shared(good: kit.Good, tmp_path_factory: pytest.TempPathFactory) -> kit.Good:
    """A folder holding a good pipeline that every bad run in this module writes into."""
    root = kit.clone(good.root, tmp_path_factory.mktemp("bad") / "artifacts")
    cfg = kit.with_root(good.config, root)
    return kit.Good(root, cfg, kit.run_plain(cfg))


@pytest.fixture
def intact(shared: kit.Good) -> Any:
    """After the test: the good artifacts are all still there and unchanged, and nothing half-made is left."""
    yield shared
    assert {k: v.problems() for k, v in shared.refs.items()} == {k: [] for k in shared.refs}
    assert kit.leftovers(shared.root) == []


def _npz(path: Path, **arrays: Any) -> Path:
    np.savez(path, **arrays)
    return path


def _digits(n_per_class: int = 8) -> tuple[np.ndarray, np.ndarray]:
    from tasks.datasource import digits_dataset

    x, y = digits_dataset()
    idx = np.concatenate([np.flatnonzero(y == c)[:n_per_class] for c in range(10)])
    return x[idx], y[idx]


def _data(intact: kit.Good, path: Path, task: str = "auto") -> ArtifactRef:
    from tasks.data import splits_from_dataset

    return splits_from_dataset(DataConfig(dataset=path, task=task), intact.root)


# --- datasets ---------------------------------------------------------------------------------------


def _bad_dataset(tmp: Path, kind: str) -> Path:
    x, y = _digits()
    p = tmp / f"{kind.replace(' ', '_')}.npz"
    if kind == "missing":
        return tmp / "nope.npz"
    if kind == "a folder":
        return tmp
    if kind == "not an npz":
        p.write_text("x,y\n1,2\n")
    elif kind == "npy":
        np.save(tmp / "a.npy", x)
        return tmp / "a.npy"
    elif kind == "truncated npz":
        _npz(p, x=x, y=y)
        p.write_bytes(p.read_bytes()[:1000])
    elif kind == "pickled objects":
        _npz(p, x=np.array([object()] * len(y)), y=y)
    elif kind == "huge values":
        _npz(p, x=x * 1e30, y=y)
    elif kind == "identical samples":
        _npz(p, x=np.ones_like(x), y=y)
    elif kind == "wrong keys":
        _npz(p, images=x, labels=y)
    elif kind == "wrong rank":
        _npz(p, x=x[:, 0, 0, 0], y=y)
    elif kind == "labels as a column":
        _npz(p, x=x, y=y[:, None])
    elif kind == "length mismatch":
        _npz(p, x=x, y=y[:-1])
    elif kind == "empty":
        _npz(p, x=x[:0], y=y[:0])
    elif kind == "strings":
        _npz(p, x=np.full(x.shape, "a"), y=y)
    elif kind == "nan":
        x = x.copy()
        x[3, 0, 0, 0] = np.nan
        _npz(p, x=x, y=y)
    elif kind == "inf":
        x = x.copy()
        x[4, 1, 2, 3] = np.inf
        _npz(p, x=x, y=y)
    elif kind == "negative labels":
        _npz(p, x=x, y=y - 1)
    elif kind == "labels out of range":
        _npz(p, x=x, y=np.where(y == 9, 1000, y))
    elif kind == "fractional labels":
        _npz(p, x=x, y=y + 0.5)
    elif kind == "a single class":
        _npz(p, x=x, y=np.zeros_like(y))
    elif kind == "a class too rare":
        _npz(p, x=x, y=np.where(y == 9, np.where(np.arange(len(y)) % 4 == 0, 9, 0), y))
    return p


DATASET_CASES = {
    "missing": "does not exist",
    "a folder": "without input .npy files",  # a folder is a dataset format: one .npy per array
    "not an npz": "not a numpy archive",
    "npy": r"numpy\.save",
    "truncated npz": "damaged",
    "pickled objects": r"holds Python objects \(dtype=object\)",
    "huge values": "sane range",
    "identical samples": "identical samples",
    "wrong keys": "name it 'y'",
    "wrong rank": "rank 2 or more",
    "labels as a column": "rank 1",
    "length mismatch": "as many labels as samples",
    "empty": "empty dataset",
    "strings": "real numbers",
    "nan": "NaN or inf",
    "inf": "NaN or inf",
    "negative labels": "cannot be negative",
    "labels out of range": "no sample of class",
    "fractional labels": "integer class indices",
    "a single class": "single class",
    "a class too rare": "fewer than 3 samples",
}


@pytest.mark.parametrize("kind", list(DATASET_CASES))
def test_bad_dataset_fails_with_a_clear_message(intact: kit.Good, tmp_path: Path, kind: str) -> None:
    path = _bad_dataset(tmp_path, kind)
    with pytest.raises(DatasetError, match=DATASET_CASES[kind]) as info:
        # Float y is regression targets unless --task classification says they are classes.
        _data(intact, path, task="classification" if kind == "fractional labels" else "auto")
    assert any(fix in str(info.value) for fix in ("numpy.savez", "--dataset", "renumber", "normalise", "how x was built"))  # the fix
    assert "\x1b[" not in str(info.value) and len(info.value.summary) <= 150
    assert not is_retryable(info.value)


# --- models -----------------------------------------------------------------------------------------


def _train(intact: kit.Good, data: ArtifactRef, model: str) -> ArtifactRef:
    from tasks.train import checkpoint_from_splits

    return checkpoint_from_splits(data, intact.config.train.model_copy(update={"model": model}), intact.root)


MODEL_CASES = {
    "nosuch.module:f": ("an importable module", "--model"),
    "tasks.models:NoSuchNet": ("a callable 'NoSuchNet'", "--model"),
    "test_bad_input:not_a_module": ("torch.nn.Module", "--model"),
    "test_bad_input:one_channel": ("do not fit the dataset's inputs", "a model made for these inputs"),
    "test_bad_input:three_logits": (r"logits of shape \(N, 10\)", "one logit per class"),
    "test_bad_input:scalar_out": ("output 'logits' of shape \(\)", "one row per sample"),
}


def scalar_out(num_classes: int, in_channels: int) -> nn.Module:
    """Reduces over the batch: one number for the whole batch."""

    class Mean(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.mean()

    return Mean()


@pytest.mark.parametrize("model", ["test_bad_input:no_keywords", "test_bad_input:tuple_out", "test_bad_input:dict_out"])
def test_factories_without_keywords_and_structured_outputs_are_accepted(intact: kit.Good, model: str) -> None:
    """Once errors, now supported: a factory taking no keywords is called without them, and tuple or
    dict outputs are named (the logits are the output shaped N×classes); no_keywords' Linear(1, 1)
    then fails on the data, not on the call."""
    if model.endswith("no_keywords"):
        with pytest.raises(ModelError, match="on one real batch"):
            _train(intact, intact.refs["data"], model)
        return
    ref = _train(intact, intact.refs["data"], model)
    assert ref.meta["logits_output"] in ("output_0", "logits")


@pytest.mark.parametrize("model", list(MODEL_CASES))
def test_bad_model_fails_before_training(intact: kit.Good, model: str) -> None:
    problem, fix = MODEL_CASES[model]
    with pytest.raises(ModelError, match=problem) as info:
        _train(intact, intact.refs["data"], model)
    assert fix in str(info.value)


def test_too_few_samples_for_the_stratified_split(intact: kit.Good, tmp_path: Path) -> None:
    x, y = _digits(3)
    with pytest.raises(DatasetError, match="at least about 67 samples") as info:
        _data(intact, _npz(tmp_path / "few.npz", x=x, y=y))
    assert "data.test_fraction" in str(info.value)


def test_images_too_small_for_the_model(intact: kit.Good, tmp_path: Path) -> None:
    x, y = _digits()
    data = _data(intact, _npz(tmp_path / "small.npz", x=x[:, :, 15:17, 15:17].copy(), y=y))
    with pytest.raises(ModelError, match="do not fit the dataset's inputs"):
        _train(intact, data, "tasks.models:SmallCNN")


def test_model_the_exporter_cannot_trace(intact: kit.Good) -> None:
    from tasks.export import onnx_from_checkpoint

    ckpt = _train(intact, intact.refs["data"], "test_bad_input:data_dependent")
    with pytest.raises(ExportError, match="control flow") as info:
        onnx_from_checkpoint(ckpt, intact.root)
    assert "traceable" in str(info.value)
    assert kit.committed(intact.root, "export") == [intact.refs["export"].dir]


def test_invalid_model_string_is_a_config_error() -> None:
    with pytest.raises(ValidationError, match="package.module:callable"):
        TrainConfig(model="tasks.models.SmallCNN")


# --- options ----------------------------------------------------------------------------------------


def test_unknown_precision() -> None:
    with pytest.raises(ConfigError, match="one of fp32, fp16, int8"):
        parse_precisions("fp32,fp64")
    with pytest.raises(ValidationError):
        PipelineConfig(precisions=["fp64"])


@pytest.mark.parametrize(("lo", "opt", "hi"), [(8, 4, 16), (1, 32, 16), (4, 2, 2)])
def test_batch_sizes_out_of_order(lo: int, opt: int, hi: int) -> None:
    with pytest.raises(ValidationError, match="min <= opt <= max"):
        BatchProfile(min=lo, opt=opt, max=hi)


def test_negative_tolerance() -> None:
    with pytest.raises(ValidationError, match="greater than or equal to 0"):
        Tolerance(atol=-1e-3)


def test_more_calibration_samples_than_training_samples_uses_what_exists(intact: kit.Good) -> None:
    from tasks.precision import variant_from_onnx

    ref = variant_from_onnx(intact.refs["export"], intact.refs["data"], Precision.int8, 100000, intact.root)
    assert ref.meta["conversion"]["calibration_samples"] == intact.refs["data"].meta["sizes"]["train"]


def test_unwritable_artifacts_folder(intact: kit.Good, tmp_path: Path) -> None:
    """Root ignores permissions, so the folder is made impossible: a regular file sits on its path."""
    from tasks.artifacts import ensure_writable
    from tasks.data import splits_from_dataset

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="cannot be written") as info:
        ensure_writable(blocker / "artifacts")
    assert "--artifacts-dir" in str(info.value)
    # At run time (a stage writing), the path in the way is named and it is a storage failure (exit 1).
    with pytest.raises(StorageError, match=f"{blocker} is a file"):
        splits_from_dataset(intact.config.data, blocker / "artifacts")


def _enospc(*args: Any, **kwargs: Any) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


def test_full_disk_while_a_stage_writes(intact: kit.Good, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    x, y = _digits()
    path = _npz(tmp_path / "fresh.npz", x=x, y=y)  # a new key: the data stage must write

    def half_then_full(file: Any, **arrays: Any) -> None:
        Path(file).write_bytes(b"PK\x03\x04 half an archive")
        _enospc()

    monkeypatch.setattr(np, "savez", half_then_full)
    with pytest.raises(StorageError, match="No space left on device") as info:
        _data(intact, path)
    assert "free disk space" in str(info.value) and "intact" in str(info.value)
    assert not is_retryable(info.value)


def test_full_disk_while_exporting_is_not_blamed_on_the_model(intact: kit.Good, monkeypatch: pytest.MonkeyPatch) -> None:
    from tasks.export import onnx_from_checkpoint

    monkeypatch.setattr(torch.onnx, "export", _enospc)
    with pytest.raises(StorageError, match="No space left"):
        onnx_from_checkpoint(intact.refs["train"], intact.root, refresh=True)
    assert kit.committed(intact.root, "export") == [intact.refs["export"].dir]


# --- the command line: exit status and message -----------------------------------------------------


def _cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    from flows.cli import main

    code = main(["run", *args])
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--min-batch", "8", "--opt-batch", "4"], "min <= opt <= max"),
        (["--precisions", "fp32,fp64"], "precision 'fp64'"),
        (["--tolerance", "fp16.atol=-1"], "greater than or equal to 0"),
        (["--tolerance", "fp16.speed=1"], "METRIC one of"),
        (["--epochs", "0"], "train.epochs"),
        (["--model", "tasks.models.SmallCNN"], "package.module:callable"),
    ],
)
def test_cli_rejects_bad_options_with_exit_2(intact: kit.Good, capsys: pytest.CaptureFixture[str], args: list[str], message: str) -> None:
    code, err = _cli([*args, "--artifacts-dir", str(intact.root)], capsys)
    assert code == 2
    assert "invalid options" in err and message in err


@pytest.mark.parametrize("content", ["{not json", "[1, 2]"])
def test_cli_config_file_that_is_not_a_json_object(intact: kit.Good, tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str) -> None:
    cfg = tmp_path / "run.json"
    cfg.write_text(content)
    code, err = _cli(["--config", str(cfg), "--epochs", "1", "--artifacts-dir", str(intact.root)], capsys)
    assert code == 2
    assert "config file" in err and "JSON" in err


def test_cli_missing_dataset_exits_1(prefect_harness: None, intact: kit.Good, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = _cli(["--dataset", str(tmp_path / "nope.npz"), "--backend", "onnxruntime", "--artifacts-dir", str(intact.root)], capsys)
    assert code == 1
    assert "DatasetError" in err and "does not exist" in err and "--dataset" in err


def test_cli_unknown_model_exits_1(prefect_harness: None, intact: kit.Good, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = intact.config
    code, err = _cli(
        ["--dataset", str(cfg.data.dataset), "--epochs", "1", "--model", "nosuch.module:f", "--precisions", "fp32",
         "--backend", "onnxruntime", "--artifacts-dir", str(intact.root)],
        capsys,
    )
    assert code == 1
    assert "ModelError" in err and "importable module" in err


def test_cli_unwritable_artifacts_folder_exits_2(prefect_harness: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code, err = _cli(["--backend", "onnxruntime", "--artifacts-dir", str(blocker / "artifacts")], capsys)
    assert code == 2
    assert "cannot be written" in err and "--artifacts-dir" in err


def test_config_file_round_trip_is_accepted(tmp_path: Path) -> None:
    """The file format the errors above ask for really is accepted."""
    from flows.cli import _parser, config_from_args

    cfg = tmp_path / "run.json"
    cfg.write_text(json.dumps({"train": {"epochs": 2}}))
    args = _parser().parse_args(["run", "--config", str(cfg), "--backend", "onnxruntime"])
    assert config_from_args(args).train.epochs == 2
    assert config_from_args(args).backend is Backend.onnxruntime
