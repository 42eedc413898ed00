"""Model factories: the default CNN and the loader for user factories."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from tasks.errors import ModelError

if TYPE_CHECKING:
    from torch import nn


def SmallCNN(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """The default model: two conv blocks and a two-layer head for 32×32 images.

    Args:
        num_classes: size of the logits vector.
        in_channels: image channels.

    Returns:
        A module whose ``forward`` returns logits of shape (N, num_classes); no softmax, so the loss
        and every consumer get what they expect.
    """
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(in_channels, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        # Fixed-size pooling keeps the head valid for any input size divisible by 4.
        nn.AdaptiveAvgPool2d(8),
        nn.Flatten(),
        nn.Linear(64 * 8 * 8, 128),
        nn.ReLU(),
        nn.Linear(128, num_classes),
    )


def factory_from_path(path: str) -> Any:
    """Import 'package.module:callable' and return the callable (cheap: no model is built).

    Raises:
        ModelError: the module cannot be imported or has no such callable.
    """
    mod_name, _, attr = path.partition(":")
    fix = "pass --model 'package.module:callable' importable from the current folder (default tasks.models:SmallCNN)"
    try:
        module = importlib.import_module(mod_name)
    except ImportError as exc:
        raise ModelError(got=f"model '{path}'", expected="an importable module", because=f"importing '{mod_name}' failed: {exc}", fix=fix) from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ModelError(got=f"model '{path}'", expected=f"a callable '{attr}' in {mod_name}", because="there is no such callable", fix=fix)
    return factory


def model_from_path(path: str, num_classes: int, in_channels: int) -> Any:
    """Import 'package.module:callable' and call it with num_classes and in_channels.

    Raises:
        ModelError: the module or attribute does not exist, the call fails, or it returns no nn.Module.
    """
    from torch import nn

    fix = "pass --model 'package.module:callable' importable from the current folder (default tasks.models:SmallCNN)"
    factory = factory_from_path(path)
    try:
        model = factory(num_classes=num_classes, in_channels=in_channels)
    except Exception as exc:
        raise ModelError(
            got=f"{type(exc).__name__}: {exc} from {path}(num_classes={num_classes}, in_channels={in_channels})",
            expected="a factory accepting num_classes and in_channels keywords",
            because="trtflow builds the model to fit the dataset",
            fix="give the factory those keyword arguments",
        ) from exc
    if not isinstance(model, nn.Module):
        raise ModelError(got=f"{type(model).__name__} from {path}", expected="a torch.nn.Module", because="only modules can be trained and exported", fix=fix)
    return model
