import pytest
import torch

from tasks.errors import ModelError
from tasks.models import SmallCNN, model_from_path


def test_small_cnn_returns_logits():
    model = SmallCNN(num_classes=10, in_channels=3).eval()
    out = model(torch.zeros(4, 3, 32, 32))
    assert out.shape == (4, 10)
    assert not torch.allclose(out.softmax(1).sum(1), out.sum(1))  # logits, not probabilities


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("no_such_module_xyz:make", "importing 'no_such_module_xyz' failed"),
        ("tasks.models:NoSuchFactory", "there is no such callable"),
        ("tasks.config:parse_precisions", "num_classes and in_channels"),
        ("tasks.models:model_from_path", "num_classes and in_channels"),
    ],
)
def test_bad_model_paths(path, message):
    with pytest.raises(ModelError, match=message):
        model_from_path(path, num_classes=3, in_channels=3)
