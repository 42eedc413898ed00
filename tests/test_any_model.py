"""Any model, end to end: vectors, sequences, several inputs (integer ids) and outputs, user weights,
datasets without labels; each through fp32, fp16 and int8 on ONNX Runtime with every output verified.
Bad input for each of these fails before training with the problem and the fix named.

    pytest tests/test_any_model.py -q

Models are tiny (a few hundred parameters) and datasets a few hundred rows: each pipeline takes a few
seconds, mostly the exporter.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import _pipeline_kit as kit
from tasks.config import BatchProfile, CollapseGate, DataConfig, Precision, TrainConfig
from tasks.errors import DatasetError, ModelError

ALL = [Precision.fp32, Precision.fp16, Precision.int8]

# --- tiny models (imported by path 'test_any_model:<name>') ----------------------------------------


class TextNet(nn.Module):
    """Two inputs (integer token ids + mask) through an embedding; two outputs in a dict."""

    def __init__(self, vocab: int, num_classes: int, dim: int = 8) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        self.proj = nn.Linear(dim, 4)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        m = attention_mask.unsqueeze(-1).to(torch.float32)
        h = self.norm((self.emb(input_ids) * m).sum(1) / m.sum(1).clamp(min=1.0))
        return {"embedding": self.proj(h), "logits": self.head(h)}


class SeqNet(nn.Module):
    """Sequences N×T×D with BatchNorm and Dropout; returns a tuple (logits, pooled features)."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(in_features, 16)
        self.bn = nn.BatchNorm1d(16)
        self.drop = nn.Dropout(0.1)
        self.out = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.relu(self.fc(x)).mean(1)
        h = self.drop(self.bn(h))
        return self.out(h), h


def text_net() -> nn.Module:
    """Zero-argument factory, the usual way a project exposes its model."""
    return TextNet(vocab=30, num_classes=3)


def _text_data(path: Path, n: int = 240, labels: bool = True, ids_dtype: Any = np.int64) -> Path:
    """Class c puts tokens from its own range; padding (mask 0) at random lengths."""
    rng = np.random.default_rng(0)
    y = np.arange(n) % 3
    ids = (rng.integers(0, 10, (n, 12)) + 10 * y[:, None]).astype(ids_dtype)
    lengths = rng.integers(4, 13, n)
    mask = (np.arange(12)[None, :] < lengths[:, None]).astype(np.int64)
    arrays = {"input_ids": ids, "attention_mask": mask, **({"y": y} if labels else {})}
    np.savez(path, **arrays)
    return path


def _vectors(path: Path, shape: tuple[int, ...], n: int = 240, classes: int = 3) -> Path:
    rng = np.random.default_rng(1)
    y = np.arange(n) % classes
    x = rng.normal(size=(n, *shape)).astype(np.float32)
    x.reshape(n, -1)[:, :classes] += 3 * np.eye(classes, dtype=np.float32)[y]  # separable
    np.savez(path, x=x, y=y)
    return path


def _config(root: Path, dataset: Path, precisions: list[Precision] = ALL, **train: Any) -> Any:
    train = {"epochs": 3, "batch_size": 32, "lr": 1e-2, "collapse_gate": CollapseGate(enabled=False), **train}
    return kit.tiny_config(
        root, dataset, train=TrainConfig(**train), precisions=precisions, batch=BatchProfile(min=1, opt=4, max=16), calibration_samples=32
    )


def _verified(refs: dict[str, Any], precisions: list[Precision] = ALL) -> dict[str, Any]:
    out = {}
    for p in precisions:
        v = refs[f"verify-{p.value}"]
        assert v.meta["passed"], v.meta
        out[p.value] = json.loads(v.path("verification.json").read_text())
    return out


# --- end to end ------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(16,), (6, 5)], ids=["NxD", "NxTxD"])
def test_vectors_and_sequences_with_the_default_model(tmp_path: Path, shape: tuple[int, ...]) -> None:
    refs = kit.run_plain(_config(tmp_path / "art", _vectors(tmp_path / "d.npz", shape)))
    assert refs["train"].meta["model_kwargs"] == {"input_shape": list(shape), "num_classes": 3}
    assert refs["export"].meta["inputs"] == ["x"]
    reports = _verified(refs)
    run = reports["int8"]["checks_run"]
    assert run[run.index("top-1 agreement"):][:3] == ["top-1 agreement", "accuracy drop", "balanced accuracy"]
    assert refs["train"].meta["validation_metrics"]["accuracy"] > 0.8


def test_two_integer_inputs_and_two_outputs_every_output_verified(tmp_path: Path) -> None:
    refs = kit.run_plain(_config(tmp_path / "art", _text_data(tmp_path / "t.npz"), model="test_any_model:text_net"))
    assert refs["train"].meta["outputs"] == {"embedding": [2, 4], "logits": [2, 3]}
    assert refs["train"].meta["logits_output"] == "logits"  # not the first output: the one shaped N×classes
    import onnx

    for p in ALL:
        proto = onnx.load(str(refs[f"precision-{p.value}"].path("model.onnx")))
        types = {i.name: i.type.tensor_type.elem_type for i in proto.graph.input}
        assert types == {"input_ids": onnx.TensorProto.INT64, "attention_mask": onnx.TensorProto.INT64}  # never cast, never quantized
    reports = _verified(refs)
    for p, report in reports.items():
        for batch in report["batches"]:
            assert set(batch["outputs"]) == {"embedding", "logits"}
            assert batch["outputs"]["embedding"]["top1_agreement"] is None  # task metrics on the logits only
            # rows repeated to fill a batch are compared with PyTorch, not scored against labels twice
            assert (batch["outputs"]["logits"]["accuracy"] is None) is batch["label"].endswith("repeated rows")
    assert refs["train"].meta["validation_metrics"]["accuracy"] > 0.5  # chance: 1/3


def test_weights_without_epochs_load_and_convert_and_the_key_follows_the_file(tmp_path: Path) -> None:
    data = _vectors(tmp_path / "s.npz", (6, 5))
    torch.manual_seed(0)
    net = SeqNet(in_features=5, num_classes=3)
    weights = tmp_path / "net.safetensors"
    from safetensors.torch import save_file

    save_file(net.state_dict(), str(weights))
    cfg = _config(tmp_path / "art", data, precisions=[Precision.fp32, Precision.int8], model="test_any_model:SeqNet", weights=weights, logits_output="output_0")
    refs = kit.run_plain(cfg)
    train = refs["train"]
    assert train.meta["mode"] == "load" and train.meta["epoch_seconds"] == []
    assert train.meta["outputs"] == {"output_0": [2, 3], "output_1": [2, 16]}
    from tasks.inference import module_from_checkpoint

    x = torch.randn(4, 6, 5)
    assert torch.equal(module_from_checkpoint(train)(x)[0], net.eval()(x)[0])  # the weights given, untouched
    assert "accuracy" in train.meta["validation_metrics"]  # still judged on validation
    _verified(refs, [Precision.fp32, Precision.int8])
    again = kit.run_plain(cfg)
    assert again["train"].digest == train.digest
    net.out.bias.data += 1
    save_file(net.state_dict(), str(weights))
    changed = kit.run_plain(cfg)
    assert changed["train"].key != train.key  # a changed weights file re-runs from train


def test_a_dataset_without_labels_runs_with_weights_and_says_what_was_checked(tmp_path: Path) -> None:
    torch.manual_seed(0)
    weights = tmp_path / "ckpt.pt"
    torch.save({"epoch": 7, "state_dict": text_net().state_dict()}, weights)
    data = _text_data(tmp_path / "unlabelled.npz", labels=False)
    refs = kit.run_plain(_config(tmp_path / "art", data, model="test_any_model:text_net", weights=weights))
    assert refs["data"].meta["has_labels"] is False and refs["train"].meta["validation_metrics"] == {}
    for report in _verified(refs).values():
        assert report["logits_output"] is None
        assert report["checks_skipped"]["top-1 agreement"] == "the dataset has no labels"
        assert "cosine per sample" in report["checks_run"]
        assert all(o["accuracy"] is None and o["top1_agreement"] is None for b in report["batches"] for o in b["outputs"].values())


# --- bad input: fails before training, names the problem and the fix ------------------------------


def _train_only(tmp_path: Path, dataset: Path, **train: Any) -> Any:
    from tasks.data import splits_from_dataset
    from tasks.train import checkpoint_from_splits

    cfg = _config(tmp_path / "art", dataset, **train)
    data = splits_from_dataset(cfg.data, cfg.artifacts_dir)
    return checkpoint_from_splits(data, cfg.train, cfg.artifacts_dir)


def test_integer_ids_given_as_float(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="ids or indices arrived as float") as info:
        _train_only(tmp_path, _text_data(tmp_path / "f.npz", ids_dtype=np.float32), model="test_any_model:text_net")
    assert "astype(numpy.int64)" in str(info.value)
    assert not (tmp_path / "art" / "train").exists() or not any((tmp_path / "art" / "train").glob("*/manifest.json"))


def test_an_input_forward_does_not_take(tmp_path: Path) -> None:
    path = tmp_path / "renamed.npz"
    with np.load(_text_data(tmp_path / "t.npz")) as z:
        np.savez(path, token_ids=z["input_ids"], attention_mask=z["attention_mask"], y=z["y"])
    with pytest.raises(ModelError, match="'token_ids' that TextNet.forward") as info:
        _train_only(tmp_path, path, model="test_any_model:text_net")
    assert "input_ids=..." in str(info.value)


def test_weights_for_another_model(tmp_path: Path) -> None:
    weights = tmp_path / "other.pt"
    torch.save(SeqNet(5, 3).state_dict(), weights)
    with pytest.raises(ModelError, match="missing keys") as info:
        _train_only(tmp_path, _text_data(tmp_path / "t.npz"), model="test_any_model:text_net", weights=weights)
    assert "emb.weight" in str(info.value) and "--model the weights were trained with" in str(info.value)


def test_labels_missing_without_weights(tmp_path: Path) -> None:
    from flows.pipeline import GRAPH
    from tasks.plan import plan_of

    cfg = _config(tmp_path / "art", _text_data(tmp_path / "u.npz", labels=False), model="test_any_model:text_net")
    with pytest.raises(DatasetError, match="without labels y, and no --weights") as info:
        plan_of(cfg, GRAPH)
    assert "--weights FILE" in str(info.value)
    with pytest.raises(ModelError, match="without labels y and no --weights"):
        _train_only(tmp_path, cfg.data.dataset, model="test_any_model:text_net")


def test_default_model_refuses_integer_inputs(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="one float input for the default model") as info:
        _train_only(tmp_path, _text_data(tmp_path / "t.npz"))
    assert "--model package.module:callable" in str(info.value)


def test_no_output_fits_the_labels_names_the_outputs(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"outputs output_0 \(N, 5\), output_1 \(N, 16\)") as info:
        _train_only(tmp_path, _vectors(tmp_path / "s.npz", (6, 5)), model="test_any_model:SeqNet", model_kwargs={"num_classes": 5})
    assert "--logits-output" in str(info.value)
    with pytest.raises(ModelError, match="one of the model's outputs"):
        _train_only(tmp_path, _vectors(tmp_path / "s.npz", (6, 5)), model="test_any_model:SeqNet", logits_output="scores")


def test_model_kwargs_reach_the_train_key(tmp_path: Path) -> None:
    from tasks.stage import stage_key
    from tasks.train import SPEC

    a = stage_key(SPEC, {"data": None, "cfg": TrainConfig(model_kwargs={"dim": 8})})
    b = stage_key(SPEC, {"data": None, "cfg": TrainConfig(model_kwargs={"dim": 16})})
    assert a != b
    assert DataConfig  # the data config is untouched by model options


@pytest.mark.parametrize(
    ("path", "kwargs"),
    [("test_models:build", {}), ("test_models:tv_style", {}), ("test_models:kw_only", {}), ("test_models:Net", {"hidden": 8})],
    ids=["zero-argument function", "torchvision style (num_classes only)", "keyword-only", "Module subclass + --model-kwargs"],
)
def test_every_factory_form_runs_the_whole_pipeline(tmp_path: Path, path: str, kwargs: dict[str, Any]) -> None:
    cfg = _config(tmp_path / "a", _vectors(tmp_path / "v.npz", (4,)), model=path, model_kwargs=kwargs)
    _verified(kit.run_plain(cfg))
