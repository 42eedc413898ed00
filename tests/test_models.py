"""Model factories of any common shape, user weights, and inputs/outputs by name (tasks/models.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from tasks.errors import ModelError
from tasks.models import (
    SmallCNN,
    build_model,
    default_model,
    flat_outputs,
    input_binding,
    known_kwargs,
    load_weights,
    state_dict_from_file,
)

# --- factories of every common shape (imported by path 'test_models:<name>') -----------------------


class Net(nn.Module):
    """An nn.Module subclass with a required constructor argument trtflow cannot know."""

    def __init__(self, hidden: int, num_classes: int = 3) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, hidden), nn.Linear(hidden, num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(features)))


def build() -> nn.Module:
    """The usual zero-argument factory."""
    return nn.Linear(4, 3)


def tv_style(num_classes: int = 1000, pretrained: bool = False) -> nn.Module:
    """torchvision style: num_classes but no in_channels."""
    return nn.Linear(4, num_classes)


def kw_only(*, in_features: int, num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    assert isinstance(input_shape, tuple)
    return nn.Linear(in_features, num_classes)


def raising(num_classes: int) -> nn.Module:
    raise RuntimeError("checkpoint server unreachable")


def test_small_cnn_returns_logits():
    model = SmallCNN(num_classes=10, in_channels=3).eval()
    out = model(torch.zeros(4, 3, 32, 32))
    assert out.shape == (4, 10)
    assert not torch.allclose(out.softmax(1).sum(1), out.sum(1))  # logits, not probabilities


def test_default_model_follows_the_rank():
    assert default_model((3, 16, 16), 5)(torch.zeros(2, 3, 16, 16)).shape == (2, 5)
    mlp = default_model((7,), 4)
    assert not any(isinstance(m, nn.Conv2d) for m in mlp.modules())
    assert mlp(torch.zeros(2, 7)).shape == (2, 4)
    assert default_model((6, 7), 4)(torch.zeros(2, 6, 7)).shape == (2, 4)  # sequences: N×T×D


def test_known_kwargs_per_rank():
    assert known_kwargs((768,), 2) == {"input_shape": (768,), "in_features": 768, "num_classes": 2}
    assert known_kwargs((3, 32, 32), 10) == {"input_shape": (3, 32, 32), "in_features": 32, "in_channels": 3, "num_classes": 10}
    assert "num_classes" not in known_kwargs((5,), None)  # no labels, no class count


@pytest.mark.parametrize(
    ("path", "extra", "expected"),
    [
        ("test_models:build", {}, {}),
        ("test_models:tv_style", {}, {"num_classes": 3}),
        ("test_models:kw_only", {}, {"in_features": 4, "num_classes": 3, "input_shape": [4]}),
        ("test_models:Net", {"hidden": 8}, {"hidden": 8, "num_classes": 3}),
        ("test_models:tv_style", {"num_classes": 3, "pretrained": False}, {"num_classes": 3, "pretrained": False}),
    ],
)
def test_each_factory_form_gets_only_what_it_names(path, extra, expected):
    model, kwargs = build_model(path, (4,), 3, extra)
    assert kwargs == expected
    assert model(torch.zeros(2, 4)).shape == (2, 3)


@pytest.mark.parametrize(
    ("path", "extra", "message", "fix"),
    [
        ("no_such_module_xyz:make", {}, "importing 'no_such_module_xyz' failed", "--model"),
        ("tasks.models:NoSuchFactory", {}, "there is no such callable", "--model"),
        ("test_models:Net", {}, "required parameter\\(s\\) hidden", "--model-kwargs '{\"hidden\": ...}'"),
        ("test_models:build", {"depth": 3}, "'depth' is not a parameter", "remove or rename"),
        ("test_models:raising", {}, "checkpoint server unreachable, raised by test_models:raising\\(num_classes=3\\)", "fix the factory"),
        ("tasks.config:Tolerance", {}, "torch.nn.Module", "--model"),
    ],
)
def test_bad_factories_name_the_problem(path, extra, message, fix):
    with pytest.raises(ModelError, match=message) as info:
        build_model(path, (4,), 3, extra)
    assert fix in str(info.value)
    assert "give the factory those keyword arguments" not in str(info.value)


# --- weights ---------------------------------------------------------------------------------------


@pytest.fixture
def trained_net():
    torch.manual_seed(1)
    return Net(hidden=8)


@pytest.mark.parametrize("form", ["state_dict", "checkpoint", "model_key", "safetensors", "data_parallel"])
def test_weights_load_in_every_form(tmp_path, trained_net, form):
    state = trained_net.state_dict()
    path = tmp_path / ("w.safetensors" if form == "safetensors" else "w.pt")
    if form == "safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    elif form == "checkpoint":
        torch.save({"epoch": 3, "state_dict": state, "optimizer": {"lr": 0.1}}, path)
    elif form == "model_key":
        torch.save({"model": state}, path)
    elif form == "data_parallel":
        torch.save({f"module.{k}": v for k, v in state.items()}, path)
    else:
        torch.save(state, path)
    fresh = Net(hidden=8)
    load_weights(fresh, path)
    x = torch.randn(5, 4)
    assert torch.equal(fresh(x), trained_net(x))


def test_weights_of_another_model_are_listed_by_name(tmp_path, trained_net):
    path = tmp_path / "w.pt"
    torch.save(trained_net.state_dict(), path)
    with pytest.raises(ModelError) as info:
        load_weights(Net(hidden=16), path)  # other width: every shape differs
    msg = str(info.value)
    assert "shape mismatches (3): fc1.weight (8, 4) vs model (16, 4)" in msg
    assert "--model-kwargs" in msg
    with pytest.raises(ModelError, match=r"missing keys \(2\): weight, bias; unexpected keys \(4\): fc1.weight"):
        load_weights(nn.Linear(4, 3), path)


def test_a_pickled_model_is_refused_with_the_fix(tmp_path, trained_net):
    path = tmp_path / "whole.pt"
    torch.save(trained_net, path)  # the whole object: would run code when unpickled
    with pytest.raises(ModelError, match="weights_only=True") as info:
        state_dict_from_file(path)
    assert "torch.save(model.state_dict(), path)" in str(info.value)


def test_files_that_hold_no_state_dict(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="readable weights file"):
        state_dict_from_file(tmp_path / "junk.pt")
    torch.save({"epoch": 3}, tmp_path / "meta.pt")
    with pytest.raises(ModelError, match="'state_dict' or 'model'"):
        state_dict_from_file(tmp_path / "meta.pt")
    with pytest.raises(ModelError, match="does not exist"):
        state_dict_from_file(tmp_path / "nope.pt")


# --- inputs and outputs by name -------------------------------------------------------------------


class TwoIn(nn.Module):
    def forward(self, input_ids, attention_mask, scale: float = 1.0):
        return input_ids * attention_mask * scale


def test_binding_by_name_and_single_input_by_position():
    assert input_binding(TwoIn(), ["input_ids", "attention_mask"]) == {"input_ids": "input_ids", "attention_mask": "attention_mask"}
    assert input_binding(nn.Sequential(nn.Linear(2, 2)), ["x"]) == {"x": "input"}  # Sequential.forward(input)
    with pytest.raises(ModelError, match="'token_ids' that TwoIn.forward") as info:
        input_binding(TwoIn(), ["token_ids", "attention_mask"])
    assert "rename the arrays" in str(info.value) and "input_ids=..." in str(info.value)
    with pytest.raises(ModelError) as typo:
        input_binding(TwoIn(), ["input_ids", "attention_masks"])
    assert typo.value.summary == "ModelError: attention_masks: not a parameter of TwoIn.forward; did you mean attention_mask?"
    with pytest.raises(ModelError, match="requiring 'attention_mask'"):
        input_binding(TwoIn(), ["input_ids", "scale"])


def test_outputs_are_flattened_with_names():
    t = torch.zeros(2, 3)
    assert [n for n, _ in flat_outputs(t)] == ["logits"]
    assert [n for n, _ in flat_outputs((t, t))] == ["output_0", "output_1"]
    assert [n for n, _ in flat_outputs({"logits": t, "extra": {"a": t, "b": None}})] == ["logits", "extra.a"]
    assert np.array_equal(flat_outputs({"x": (t, t + 1)})[1][1].numpy(), (t + 1).numpy())
