"""The command line's options, derived from the pydantic config: one table of option -> field path.

Each option's type, choices, help text and default come from the ``PipelineConfig`` field it sets, so
the CLI, ``--help`` and the error messages (``--lr`` in a terminal, ``config.train.lr`` in the Prefect
UI) cannot drift from the config. Adding an option is one row of ``OPTIONS``::

    from tasks.options import add_config_options, config_dict_from_args
    add_config_options(parser)              # argparse groups with the config's descriptions
    raw = config_dict_from_args(args, {})   # {"train": {"epochs": 3}, ...} for PipelineConfig
"""

from __future__ import annotations

import argparse
import enum
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel


@dataclass(frozen=True)
class Option:
    """One command-line option and the config field(s) it sets.

    Args:
        flag: the option, e.g. "--epochs".
        paths: dotted field paths under ``PipelineConfig`` (several: the value goes to each).
        switch: for a flag without a value, the value it stores (e.g. False for "--no-tf32").
        toggle: a boolean field with both forms, "--repair" and "--no-repair".
        metavar: argparse's name of the value.
        help: text used instead of the field's description.
        parse: turns the option's text into the field's value (default: the field's own validation).
    """

    flag: str
    paths: tuple[str, ...]
    switch: Any = None
    toggle: bool = False
    metavar: str | None = None
    help: str | None = None
    parse: Callable[[str], Any] | None = None

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")


def _precisions(text: str) -> list[str]:
    from tasks.config import parse_precisions

    return [p.value for p in parse_precisions(text)]


def _targets(text: str) -> list[dict[str, Any]]:
    from tasks.config import parse_targets

    return parse_targets(text)


def _json_object(text: str) -> dict[str, Any]:
    import json

    from tasks.errors import ConfigError

    try:
        value = json.loads(text)
    except ValueError as exc:
        raise ConfigError(got=f"--model-kwargs {text!r} ({exc})", expected="a JSON object", because="it holds the factory's keyword arguments", fix='quote it for the shell, e.g. --model-kwargs \'{"hidden": 64}\'') from None
    if not isinstance(value, dict):
        raise ConfigError(got=f"--model-kwargs {text!r}", expected="a JSON object of keyword arguments", because="it holds the factory's keyword arguments by name", fix='e.g. --model-kwargs \'{"hidden": 64}\'')
    return value


def _shapes(flag: str) -> Callable[[str], dict[str, list[int]]]:
    def parse(text: str) -> dict[str, list[int]]:
        from tasks.shapes import parse_shapes

        return parse_shapes(text, flag)

    return parse


def _pad_values(text: str) -> dict[str, float]:
    from tasks.shapes import parse_pad_values

    return parse_pad_values(text)


def _opt(flag: str, *paths: str, **kw: Any) -> Option:
    return Option(flag, paths, **kw)


#: every option that sets a config field, by help group
OPTIONS: dict[str, list[Option]] = {
    "data and model": [
        _opt("--dataset", "data.dataset"),
        _opt("--task", "data.task", help="What y holds: auto (integer y: classes, float y: regression targets), classification or regression."),
        _opt("--model", "train.model", help="Model factory 'package.module:callable': an nn.Module subclass or a function."),
        _opt("--model-kwargs", "train.model_kwargs", metavar="JSON", parse=_json_object, help="Extra keyword arguments of the factory, e.g. '{\"hidden\": 64}'."),
        _opt("--weights", "train.weights", help="Trained weights (state_dict .pt, checkpoint dict, or .safetensors); without --epochs nothing is trained."),
        _opt("--logits-output", "train.logits_output", metavar="NAME"),
        _opt("--epochs", "train.epochs", help="Training epochs; with --weights: fine-tune for this many (without: load only)."),
        _opt("--batch-size", "train.batch_size"),
        _opt("--step-memory-mib", "train.step_memory_mib", metavar="MIB", help="Most activation memory of one training step; a larger batch runs as micro-batches (0: never split)."),
        _opt("--lr", "train.lr"),
        _opt("--seed", "data.seed", "train.seed", help="Seed of the split, the weight init and the shuffling."),
        _opt("--threads", "train.threads", "engine.threads", help="CPU threads for training and ONNX Runtime; results depend on it."),
        _opt("--balance", "train.balance", help="Re-balance skewed labels: class_weight (weighted loss) or oversample (weighted sampling)."),
        _opt("--imbalance", "data.imbalance", metavar="SHARE", help="Make --majority-class this share of the training split (demos, tests)."),
        _opt("--majority-class", "data.majority_class", metavar="K"),
        _opt("--max-majority-share", "train.collapse_gate.max_majority_prediction_share", help="Collapse gate: largest share of predictions one class may take."),
        _opt("--min-balanced-accuracy-over-chance", "train.collapse_gate.min_balanced_accuracy_over_chance", help="Collapse gate: balanced accuracy must beat 1/classes by this."),
        _opt("--min-r2", "train.collapse_gate.min_r2", help="Regression gate: the validation R² must be above this (0: no better than the mean)."),
        _opt("--no-collapse-gate", "train.collapse_gate.enabled", switch=False, help="Record the metrics but never fail on a collapsed model (or, regression, one that learnt nothing)."),
    ],
    "engines": [
        _opt("--precisions", "precisions", parse=_precisions, metavar="LIST", help="Comma-separated engines to build and verify: fp32,fp16,int8."),
        _opt("--backend", "backend"),
        _opt("--targets", "targets", metavar="NAME=POOL:BACKEND:PRECISIONS ...", parse=_targets,
             help="Build on several machines: per target its work pool, backend (empty: auto) and precisions, e.g. "
             "'gpu-h100=h100:tensorrt:fp16,int8 cpu=cpu:onnxruntime:fp32'; each needs a deployment trtflow/target-NAME on its pool."),
        _opt("--min-batch", "batch.min"),
        _opt("--opt-batch", "batch.opt"),
        _opt("--max-batch", "batch.max"),
        _opt("--min-shapes", "shapes.min", metavar="NAME:SHAPE,...", parse=_shapes("--min-shapes"), help="Smallest shape per input, batch first, as trtexec: input_ids:1x8,attention_mask:1x8 (axes that vary become dynamic)."),
        _opt("--opt-shapes", "shapes.opt", metavar="NAME:SHAPE,...", parse=_shapes("--opt-shapes"), help="Shape per input the engines are tuned for, e.g. input_ids:32x64,attention_mask:32x64."),
        _opt("--max-shapes", "shapes.max", metavar="NAME:SHAPE,...", parse=_shapes("--max-shapes"), help="Largest shape per input, e.g. input_ids:256x128,attention_mask:256x128."),
        _opt("--pad-values", "shapes.pad_values", metavar="NAME:VALUE,...", parse=_pad_values, help="Value that pads an input past the dataset's length when a shape is longer (default 0), e.g. input_ids:1."),
        _opt("--cpu-batch-memory-mib", "batch.cpu_memory_mib", metavar="MIB", help="On a CPU backend, most activation memory of one engine batch; opt and max are lowered to fit (0: keep them)."),
        _opt("--calibration-samples", "calibration_samples"),
        _opt("--no-tf32", "engine.tf32", switch=False, help="Strict fp32 in TensorRT engines (no TF32)."),
        _opt("--no-profile", "profile.enabled", switch=False, help="Skip timing the engines against PyTorch (the profile stage)."),
        _opt("--repair", "repair.enabled", toggle=True, help="Keep the worst nodes of a failing fp16/int8 variant in fp32 and re-verify."),
        _opt("--repair-budget", "repair.budget", metavar="N"),
    ],
    "shipping": [
        _opt("--ship", "ship.policy", metavar="POLICY", help="Which verified variant goes into artifacts/bundle/: fastest, lowest-latency, smallest, fp32|fp16|int8, or latency-budget=MS."),
        _opt("--bundle-name", "ship.name", metavar="NAME", help="Triton model name in the bundle (default: the model factory's name)."),
        _opt("--no-package", "ship.enabled", switch=False, help="Write no deployment bundle (the package stage)."),
    ],
    "run": [
        _opt("--artifacts-dir", "artifacts_dir"),
        _opt("--store", "store", metavar="URL", help="Keep artifacts in object storage, e.g. s3://BUCKET/PREFIX (AWS_* variables configure it); --artifacts-dir then holds the report and a read cache."),
        _opt("--refresh", "refresh", metavar="STAGE", help="Recompute this stage and its dependents (repeatable)."),
    ],
}


def all_options() -> list[Option]:
    return [o for group in OPTIONS.values() for o in group]


def field_at(path: str) -> tuple[Any, Any]:
    """The pydantic FieldInfo of a dotted path under PipelineConfig and its default value."""
    from tasks.config import PipelineConfig

    model: type[BaseModel] = PipelineConfig
    value: Any = PipelineConfig()
    info: Any = None
    for name in path.split("."):
        info = model.model_fields[name]
        value = getattr(value, name)
        ann = info.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            model = ann
    return info, value


def _choices(annotation: Any) -> list[str] | None:
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is typing.Literal:
        return [str(a) for a in args]
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return [str(m.value) for m in annotation]
    for a in args:  # list[Stage], X | None
        if (c := _choices(a)) is not None:
            return c
    return None


def _is_list(annotation: Any) -> bool:
    return typing.get_origin(annotation) is list


def _metavar(annotation: Any) -> str:
    kinds = {int: "N", float: "X", Path: "PATH", str: "TEXT"}
    for t in (annotation, *typing.get_args(annotation)):
        if t in kinds:
            return kinds[t]
    return "VALUE"


def _shown(value: Any) -> str:
    if isinstance(value, enum.Enum):
        return str(value.value)
    if isinstance(value, list):
        return ",".join(_shown(v) for v in value) or "none"
    if value is None or value == {}:
        return "none"
    return str(value)


def add_config_options(parser: argparse.ArgumentParser) -> None:
    """Add every option of ``OPTIONS`` to ``parser``, typed and described by its config field.

    Values stay None unless given, so a ``--config`` file's values survive; ``--help`` shows the
    config's default.
    """
    for title, options in OPTIONS.items():
        group = parser.add_argument_group(title)
        for o in options:
            info, default = field_at(o.paths[0])
            text = o.help or info.description or ""
            text = text[:-1] if text.endswith(".") and not text.endswith("...") else text
            if o.toggle:
                group.add_argument(o.flag, dest=o.dest, action=argparse.BooleanOptionalAction, default=None, help=f"{text} (default: {'on' if default else 'off'})")
                continue
            if o.switch is not None:
                group.add_argument(o.flag, dest=o.dest, action="store_const", const=o.switch, default=None, help=f"{text} (sets {o.paths[0]}={_shown(o.switch).lower()})")
                continue
            choices = _choices(info.annotation)
            kw: dict[str, Any] = {"dest": o.dest, "default": None, "metavar": o.metavar or (None if choices else _metavar(info.annotation)), "help": f"{text} (default: {_shown(default)})"}
            if _is_list(info.annotation) and o.parse is None:
                kw.update(action="append", choices=choices)
            elif choices and o.parse is None:
                kw["choices"] = choices
            group.add_argument(o.flag, **kw)


def config_dict_from_args(args: argparse.Namespace, raw: dict[str, Any]) -> dict[str, Any]:
    """Write the options given on the command line into ``raw`` (a PipelineConfig dict) and return it."""
    for o in all_options():
        value = getattr(args, o.dest, None)
        if value is None or value == []:
            continue
        if o.parse is not None:
            value = o.parse(value)
        elif isinstance(value, Path):
            value = str(value)
        for path in o.paths:
            node = raw
            *parents, leaf = path.split(".")
            for k in parents:
                node = node.setdefault(k, {})
            node[leaf] = value
    return raw


def parameter_path(flag: str, value: str | None = None) -> str | None:
    """The flow parameter an option sets, as the Prefect UI's form names it.

    Args:
        flag: e.g. "--lr" or "--no-profile".
        value: the option's value in a message, if any (e.g. "class_weight").

    Returns:
        e.g. "config.train.lr", "config.train.balance=class_weight", "config.profile.enabled=false";
        None for options that are not config fields.
    """
    for o in all_options():
        if o.toggle and flag in (o.flag, "--no-" + o.flag[2:]):
            return f"config.{o.paths[0]}={'false' if flag.startswith('--no-') else 'true'}"
        if o.flag == flag:
            path = f"config.{o.paths[0]}"
            if o.switch is not None:
                return f"{path}={_shown(o.switch).lower()}"
            return f"{path}={value}" if value else path
    return None
