"""Models: the default models, user factories, user weights, and the named-input/output adapter.

A user model is made by ``--model package.module:callable`` (an ``nn.Module`` subclass or any callable
returning one). trtflow passes only the keyword arguments the callable's signature names, out of
``KNOWN_KWARGS``, plus ``--model-kwargs`` (JSON) for anything else. The model's ``forward`` gets one
tensor per dataset input, by parameter name (see ``input_binding``); whatever it returns (a tensor, a
tuple, a dict, nested) is flattened into named outputs (see ``flat_outputs``).
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tasks.errors import ModelError

if TYPE_CHECKING:
    import torch
    from torch import nn

#: keyword arguments trtflow knows how to fill from the dataset, passed only when the factory names them:
#: num_classes (labels 0..K-1: K; only when the dataset has class labels), num_outputs (regression: K
#: targets per sample, 1 for y of shape N; only for regression), in_channels (axis 1 of the
#: first input, e.g. C of N×C×H×W; only for inputs of rank 3 or more), in_features (the last axis of the
#: first input, e.g. D of N×D or N×T×D), input_shape (the first input's shape without the batch axis, a tuple).
KNOWN_KWARGS = ("num_classes", "num_outputs", "in_channels", "in_features", "input_shape")
#: the name of a model's only output when it returns a single tensor
SINGLE_OUTPUT = "logits"
DEFAULT_MODEL = "tasks.models:default_model"
_FIX = "pass --model 'package.module:callable' importable from the current folder (default tasks.models:default_model)"


def SmallCNN(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """The default model for images: two conv blocks and a two-layer head.

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


def SmallMLP(input_shape: Sequence[int], num_classes: int = 10, hidden: int = 128) -> nn.Module:
    """The default model for vectors (N×D) and sequences (N×T×D): flatten, one hidden layer, logits.

    Args:
        input_shape: one sample's shape (D,) or (T, D).
        num_classes: size of the logits vector.
        hidden: width of the hidden layer.
    """
    from torch import nn

    return nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(input_shape)), hidden), nn.ReLU(), nn.Linear(hidden, num_classes))


def default_model(input_shape: Sequence[int], num_classes: int | None = None, num_outputs: int | None = None) -> nn.Module:
    """The default model, chosen by the input's rank: the CNN for images (C×H×W), an MLP otherwise.

    Its output has ``num_outputs`` values per sample (class logits, or regression targets), by default
    ``num_classes`` (10 when neither is given).
    """
    width = int(num_outputs or num_classes or 10)
    if len(input_shape) == 3:
        return SmallCNN(num_classes=width, in_channels=int(input_shape[0]))
    return SmallMLP(input_shape, num_classes=width)


def factory_from_path(path: str) -> Any:
    """Import 'package.module:callable' and return the callable (cheap: no model is built).

    Raises:
        ModelError: the module cannot be imported or has no such callable.
    """
    mod_name, _, attr = path.partition(":")
    if _standard_library(mod_name):
        # Never imported: 'os:system', 'subprocess:run', 'builtins:exec' are commands, not models.
        raise _not_a_factory(path, f"'{mod_name}' is a module of Python's standard library")
    try:
        module = importlib.import_module(mod_name)
    except ImportError as exc:
        raise ModelError(got=f"model '{path}'", expected="an importable module", because=f"importing '{mod_name}' failed: {exc}", fix=_FIX) from exc
    except Exception as exc:  # the module itself raised while importing
        raise ModelError(got=f"{type(exc).__name__}: {exc} while importing '{mod_name}'", expected="a module that imports cleanly", because="trtflow imports the model's module to build it", fix=f"fix the error in {mod_name}") from exc
    factory = module
    for part in attr.split("."):  # 'module:Class.build' reaches a classmethod too
        factory = getattr(factory, part, None)
    if not callable(factory):
        raise ModelError(got=f"model '{path}'", expected=f"a callable '{attr}' in {mod_name}", because="there is no such callable", fix=_FIX)
    if (why := _not_a_model_factory(factory)) is not None:
        raise _not_a_factory(path, why)
    return factory


def _standard_library(module: str) -> bool:
    return module.split(".")[0] in sys.stdlib_module_names


def _not_a_model_factory(factory: Any) -> str | None:
    """Why ``factory`` cannot be a model factory (it is called with user-given keyword arguments), or None.

    A factory is an ``nn.Module`` subclass, or a Python function (or bound method) outside the standard
    library. Builtins (``os.system``, ``exec``) and standard-library callables never build a model, and
    called with ``--model-kwargs`` they run commands.
    """
    owner = getattr(factory, "__module__", None) or ""
    if inspect.isclass(factory):
        if not any(c.__name__ == "Module" and c.__module__ == "torch.nn.modules.module" for c in inspect.getmro(factory)):
            return f"{factory.__qualname__} is a class but not a torch.nn.Module"
    elif not (inspect.isfunction(factory) or inspect.ismethod(factory)):
        return f"it is a {type(factory).__name__}, not a class or a Python function"
    if _standard_library(owner) or owner == "builtins":
        return f"it comes from Python's standard library ({owner})"
    return None


def _not_a_factory(path: str, why: str) -> ModelError:
    return ModelError(
        got=f"model '{path}': {why}",
        expected="an nn.Module subclass, or a function of your own code that returns one",
        because="trtflow calls the factory with the run's --model-kwargs, and a builtin or standard-library callable (os.system, subprocess.run, exec) would run a command instead",
        fix=_FIX,
        summary=f"model '{path}' is not a model factory ({why}); pass your nn.Module class or a function returning one",
    )


def known_kwargs(input_shape: Sequence[int], num_classes: int | None, num_outputs: int | None = None) -> dict[str, Any]:
    """The values of ``KNOWN_KWARGS`` for a dataset (see there for what each means)."""
    shape = tuple(int(d) for d in input_shape)
    out: dict[str, Any] = {"input_shape": shape}
    if shape:
        out["in_features"] = shape[-1]
    if len(shape) >= 2:
        out["in_channels"] = shape[0]
    if num_classes is not None:
        out["num_classes"] = int(num_classes)
    if num_outputs is not None:
        out["num_outputs"] = int(num_outputs)
    return out


def factory_kwargs(factory: Any, path: str, known: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """Pick the keyword arguments a factory gets: the known ones it names, then ``extra`` (overrides).

    Raises:
        ModelError: ``extra`` names a parameter the factory lacks, or a required parameter has no value.
    """
    try:
        sig: inspect.Signature | None = inspect.signature(factory)
    except (TypeError, ValueError):  # a builtin or C extension: nothing to inspect
        sig = None
    if sig is None:
        return dict(extra)
    params = sig.parameters
    named = {n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    var_kw = any(p.kind is p.VAR_KEYWORD for p in params.values())
    unknown = sorted(k for k in extra if k not in named) if not var_kw else []
    if unknown:
        raise ModelError(
            got=f"--model-kwargs {sorted(extra)} for {path}{sig}",
            expected=f"only parameters the factory takes ({', '.join(sorted(named)) or 'none'})",
            because=f"{', '.join(map(repr, unknown))} is not a parameter of it",
            fix="remove or rename those keys in --model-kwargs",
        )
    kwargs = {k: v for k, v in known.items() if k in named}
    kwargs.update(extra)
    try:
        sig.bind(**kwargs)
    except TypeError:
        missing = [n for n, p in params.items() if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and n not in kwargs]
        example = ", ".join(f'"{n}": ...' for n in missing)
        raise ModelError(
            got=f"{path}{sig} with required parameter(s) {', '.join(missing)} that trtflow cannot fill",
            expected=f"values for every required parameter (trtflow fills only {', '.join(KNOWN_KWARGS)})",
            because="the factory cannot be called without them",
            fix=f"pass them as JSON: --model-kwargs '{{{example}}}'",
        ) from None
    return kwargs


def model_from_path(path: str, kwargs: Mapping[str, Any]) -> nn.Module:
    """Import a factory and call it with exactly ``kwargs`` (see ``factory_kwargs`` to choose them).

    Raises:
        ModelError: the factory cannot be imported, raises, or returns no nn.Module.
    """
    from torch import nn

    factory = factory_from_path(path)
    kwargs = {k: tuple(v) if k == "input_shape" and isinstance(v, list) else v for k, v in kwargs.items()}
    shown = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    try:
        model = factory(**kwargs)
    except Exception as exc:
        raise ModelError(
            got=f"{type(exc).__name__}: {exc}, raised by {path}({shown})",
            expected="a factory that builds the model",
            because="the factory itself failed while building it",
            fix="fix the factory, or its arguments with --model-kwargs JSON (trtflow passes the known ones it names: "
            + ", ".join(KNOWN_KWARGS) + ")",
        ) from exc
    if not isinstance(model, nn.Module):
        raise ModelError(got=f"{type(model).__name__} from {path}", expected="a torch.nn.Module", because="only modules can be trained and exported", fix=_FIX)
    return model


def build_model(path: str, input_shape: Sequence[int], num_classes: int | None, extra: Mapping[str, Any], num_outputs: int | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Build a user's (or the default) model for a dataset.

    Returns:
        The module and the keyword arguments it was built with (JSON-able, stored in the checkpoint).

    Raises:
        ModelError: as ``factory_kwargs`` and ``model_from_path``.
    """
    factory = factory_from_path(path)
    kwargs = factory_kwargs(factory, path, known_kwargs(input_shape, num_classes, num_outputs), extra)
    model = model_from_path(path, kwargs)
    return model, {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}


# --- weights ---------------------------------------------------------------------------------------


def state_dict_from_file(path: Path) -> dict[str, torch.Tensor]:
    """Read a state_dict: ``torch.save`` of one (``weights_only`` load), a checkpoint dict holding one
    under ``state_dict`` or ``model``, or a ``.safetensors`` file.

    Raises:
        ModelError: missing, unreadable, or not holding tensors by name.
    """
    import pickle

    import torch

    path = Path(path).expanduser()
    fix = "pass --weights a file written by torch.save(model.state_dict(), path) or safetensors.torch.save_file"
    from tasks.paths import file_problem

    if (problem := file_problem(path)) is not None:
        raise ModelError(got=f"weights file {path}", expected="an existing file", because=f"it {problem}", fix=fix, summary=f"weights file {path} {problem.split(':')[0]}; {fix}")
    with open(path, "rb") as f:
        head = f.read(8)
    is_safetensors = path.suffix == ".safetensors" or (len(head) == 8 and 0 < int.from_bytes(head, "little") < 100_000_000 and not head.startswith((b"PK", b"\x80")))
    if not is_safetensors and not head.startswith((b"PK", b"\x80")):
        raise ModelError(got=f"{path.name}, which is neither a torch.save file nor a .safetensors file (it starts with {head!r})", expected="a readable weights file", because="trtflow reads weights with torch.load (weights_only) or safetensors", fix=fix)
    try:
        if is_safetensors:
            from safetensors.torch import load_file

            obj: Any = load_file(str(path), device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ModelError(
            got=f"{path.name} holding objects other than tensors and plain containers ({str(exc).splitlines()[0][:200]})",
            expected="a state_dict or a checkpoint dict of tensors",
            because="weights load with weights_only=True, so a pickled model object (torch.save(model)) is refused: it could run code",
            fix="save model.state_dict() instead of the model: torch.save(model.state_dict(), path)",
        ) from exc
    except Exception as exc:
        raise ModelError(got=f"{path.name} ({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})", expected="a readable weights file", because="neither torch.load nor safetensors can read it", fix=fix) from exc
    if isinstance(obj, Mapping) and not _all_tensors(obj):
        for key in ("state_dict", "model", "model_state_dict", "module"):
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and _all_tensors(inner):
                obj = inner
                break
    if not isinstance(obj, Mapping) or not obj or not _all_tensors(obj):
        keys = sorted(map(str, obj))[:8] if isinstance(obj, Mapping) else type(obj).__name__
        raise ModelError(
            got=f"{path.name} holding {keys}",
            expected="a state_dict (parameter name -> tensor), or a dict holding one under 'state_dict' or 'model'",
            because="trtflow loads weights into the model your factory builds",
            fix=fix,
        )
    return dict(obj)


def _all_tensors(obj: Mapping[Any, Any]) -> bool:
    import torch

    return all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def load_weights(model: nn.Module, path: Path) -> None:
    """Load a weights file into a model, strictly.

    A ``module.`` prefix on every key (``nn.DataParallel``) is removed first.

    Raises:
        ModelError: listing missing keys, unexpected keys and shape mismatches by name.
    """
    from torch.nn.parameter import is_lazy

    state = state_dict_from_file(path)
    own = model.state_dict()
    if not any(k.startswith("module.") for k in own) and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and not is_lazy(v) and tuple(v.shape) != tuple(state[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
            if items:
                parts.append(f"{label} ({len(items)}): " + ", ".join(items[:8]) + (f" and {len(items) - 8} more" if len(items) > 8 else ""))
        raise ModelError(
            got=f"weights {Path(path).name} that do not fit the model: " + "; ".join(parts),
            expected="a state_dict of the same architecture (same parameter names and shapes)",
            because="the weights were saved from another model, or the factory built it with other arguments",
            fix="pass the --model the weights were trained with, and its arguments with --model-kwargs (e.g. num_classes)",
        )
    model.load_state_dict(state, strict=True)


# --- inputs and outputs by name --------------------------------------------------------------------


def input_binding(model: nn.Module, names: Sequence[str]) -> dict[str, str | None]:
    """Match dataset inputs to the parameters of ``model.forward``.

    The convention: each dataset array (other than the labels ``y``) is named after a parameter of
    ``forward``. A dataset with a single input may name it anything (``x`` by habit): it goes to
    ``forward``'s first parameter.

    Returns:
        Dataset input name -> parameter name, or None for "pass positionally" (``forward(*args)``).

    Raises:
        ModelError: an input ``forward`` does not take, or a required parameter with no input.
    """
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return {n: None for n in names}
    var_pos = any(p.kind is p.VAR_POSITIONAL for p in params)
    var_kw = any(p.kind is p.VAR_KEYWORD for p in params)
    named = [p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY, p.POSITIONAL_ONLY)]
    pnames = [p.name for p in named]
    required = [p.name for p in named if p.default is p.empty]
    sig = f"forward({', '.join(str(p) for p in params)})"
    if len(names) == 1 and names[0] not in pnames:
        if named and len(required) <= 1 and named[0].kind is not named[0].KEYWORD_ONLY:
            return {names[0]: None if named[0].kind is named[0].POSITIONAL_ONLY else named[0].name}
        if var_pos and not required:
            return {names[0]: None}
    # A **kwargs forward takes any name: whether it reads the array shows in the exported graph
    # (``unread_inputs_error``, checked before training).
    unknown = [n for n in names if n not in pnames] if not var_kw else []
    if unknown:
        guesses = closest_parameters(unknown, pnames, names)
        raise ModelError(
            got=f"dataset input(s) {', '.join(map(repr, unknown))} that {type(model).__name__}.{sig} does not take",
            expected=f"one array per parameter of forward, named after it ({', '.join(pnames) or 'none'}), plus labels 'y'",
            because="trtflow passes each dataset array to the forward parameter of the same name",
            fix="rename the arrays in the dataset after forward's parameters, e.g. numpy.savez(path, "
            + ", ".join(f"{p}=..." for p in (pnames or ["x"])) + ", y=labels)",
            summary=f"{_listed(unknown)}: not a parameter of {type(model).__name__}.forward{_did_you_mean(unknown, guesses)}",
        )
    missing = [r for r in required if r not in names]
    if missing:
        raise ModelError(
            got=f"{type(model).__name__}.{sig} requiring {', '.join(map(repr, missing))}, which the dataset lacks (it has {', '.join(map(repr, names))})",
            expected="an array for every required parameter of forward",
            because="forward cannot run without them",
            fix="add arrays named " + ", ".join(map(repr, missing)) + " to the dataset",
        )
    return {n: n for n in names}


def _user_model(model: nn.Module) -> nn.Module:
    """The user's model, also from inside its ``bind`` wrapper."""
    return model.model if getattr(model, "wraps_user_model", False) else model  # type: ignore[return-value]


def takes_varargs(model: nn.Module) -> bool:
    """Whether ``model.forward`` takes ``*args`` (torch.export then wants its dynamic shapes as one tuple more)."""
    try:
        return any(p.kind is p.VAR_POSITIONAL for p in inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return False


def forward_parameters(model: nn.Module) -> list[str]:
    """The named parameters of ``model.forward`` (of the user's model inside a ``bind`` wrapper)."""
    try:
        params = inspect.signature(_user_model(model).forward).parameters.values()
    except (TypeError, ValueError):
        return []
    return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY, p.POSITIONAL_ONLY)]


def closest_parameters(arrays: Sequence[str], parameters: Sequence[str], taken: Sequence[str] = ()) -> dict[str, str | None]:
    """For each array name, the closest parameter name no other array already fills (difflib), or None."""
    free = [p for p in parameters if p not in taken] or list(parameters)
    return {a: next(iter(difflib.get_close_matches(a, free, n=1, cutoff=0.6)), None) for a in arrays}


def _listed(names: Sequence[str]) -> str:
    return ", ".join(names)


def _did_you_mean(names: Sequence[str], guesses: Mapping[str, str | None]) -> str:
    found = [(n, g) for n in names if (g := guesses.get(n))]
    if not found:
        return ""
    if len(names) == 1:
        return f"; did you mean {found[0][1]}?"
    return "; did you mean " + ", ".join(f"{g} (for {n})" for n, g in found) + "?"


def unread_inputs_error(model: nn.Module, unread: Sequence[str], names: Sequence[str]) -> ModelError:
    """The error for dataset arrays that no operation of the exported model reads.

    A ``forward(self, input_ids, attention_mask=None, **kwargs)`` takes a misspelt ``attention_masks``
    into ``**kwargs`` and ignores it: the model would train and verify without its mask.

    Args:
        model: the model (or its ``bind`` wrapper).
        unread: the arrays no node of the exported graph reads.
        names: every dataset input, in order.
    """
    params = forward_parameters(model)
    guesses = closest_parameters(unread, params, [n for n in names if n not in unread])
    renames = [f"rename {n} to {g}" for n, g in guesses.items() if g]
    drops = [n for n, g in guesses.items() if not g]
    fix = "; ".join([*renames, *([f"drop {_listed(drops)} from the dataset (or use it in forward)"] if drops else [])])
    return ModelError(
        got=f"dataset input(s) {_listed(unread)} that no operation of {type(_user_model(model)).__name__} reads "
        f"(forward's parameters: {_listed(params) or 'none'})",
        expected="every dataset array (besides the labels y) read by the model",
        because="an array forward does not use would become an engine input that changes nothing: a misspelt name "
        "trains and verifies the model without that input",
        fix=fix,
        summary=f"{_listed(unread)}: not read by the model{_did_you_mean(unread, guesses)}",
    )


def flat_outputs(out: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Flatten what ``forward`` returns into (name, value) pairs, in a fixed order.

    A tensor is ``logits``; a tuple or list gives ``output_0``, ``output_1``...; a dict (or an
    ordered mapping such as Hugging Face's ``ModelOutput``) gives its keys; a named tuple its fields;
    nested structures join names with dots. None entries are dropped.
    """
    import torch

    if isinstance(out, torch.Tensor):
        return [(prefix or SINGLE_OUTPUT, out)]
    if out is None:
        return []
    if isinstance(out, Mapping):
        items: list[tuple[str, Any]] = [(str(k), v) for k, v in out.items()]
    elif isinstance(out, tuple) and hasattr(out, "_fields"):
        items = [(str(f), getattr(out, f)) for f in out._fields]
    elif isinstance(out, (tuple, list)):
        items = [(f"output_{i}" if not prefix else str(i), v) for i, v in enumerate(out)]
    else:
        return [(prefix or SINGLE_OUTPUT, out)]  # not a tensor: the trial pass names it
    flat: list[tuple[str, Any]] = []
    for name, value in items:
        flat.extend(flat_outputs(value, f"{prefix}.{name}" if prefix else name))
    return flat


def _bound_class() -> type:
    from torch import nn

    class Bound(nn.Module):
        """The user's model with dataset-ordered positional inputs and a flat tuple of outputs.

        This is what is traced and exported: ONNX inputs are the dataset's names, outputs the names
        ``flat_outputs`` gives, in order.
        """

        #: tells this wrapper from a user model that happens to have a ``model`` attribute
        wraps_user_model = True

        def __init__(self, model: nn.Module, binding: Mapping[str, str | None]) -> None:
            super().__init__()
            self.model = model
            self.input_names = list(binding)
            self.params = [binding[n] for n in self.input_names]

        def forward(self, *args: Any) -> tuple[Any, ...]:
            pos = [a for a, p in zip(args, self.params) if p is None]
            kw = {p: a for a, p in zip(args, self.params) if p is not None}
            return tuple(v for _, v in flat_outputs(self.model(*pos, **kw)))

    return Bound


def bind(model: nn.Module, binding: Mapping[str, str | None]) -> nn.Module:
    """Wrap ``model`` so that it takes the dataset's inputs positionally (in ``binding``'s order) and
    returns a flat tuple of outputs (named by ``output_names``)."""
    return _bound_class()(model, binding)


def output_names(model: nn.Module, binding: Mapping[str, str | None], feed: Mapping[str, np.ndarray]) -> list[tuple[str, Any]]:
    """Run ``model`` (unbound) on a feed and return its flat outputs by name (eval, no grad)."""
    import torch

    pos = [torch.from_numpy(np.array(feed[n])) for n, p in binding.items() if p is None]
    kw = {p: torch.from_numpy(np.array(feed[n])) for n, p in binding.items() if p is not None}
    model.eval()
    with torch.no_grad():
        return flat_outputs(model(*pos, **kw))
