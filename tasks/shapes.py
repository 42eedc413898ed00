"""Dynamic axes beyond the batch: shape profiles per input, and real samples cut or padded to a length.

The user writes shapes as trtexec does (``--min-shapes input_ids:1x8,attention_mask:1x8``, batch
first); ``engine_profile`` checks them against the dataset's inputs and resolves the profile every
engine is built, verified and timed at (``tasks.config.EngineProfile``). Verification and timing run
at three shape points, the profile's min, opt and max (``shape_points``), on real samples whose
dynamic axes are cut to the point's length, or padded past the dataset's length (``fit_lengths``).

    from tasks.shapes import parse_shapes, shape_points, fit_lengths
    parse_shapes("input_ids:1x8,attention_mask:1x8")     # {"input_ids": [1, 8], "attention_mask": [1, 8]}
    for point in shape_points(profile):                  # min, opt, max
        feed = fit_lengths(batch_of_rows, point.lengths, profile.pad_values)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tasks.config import BatchProfile, EngineProfile, ShapeProfile
from tasks.errors import ConfigError

LEVELS = ("min", "opt", "max")
_SHAPES_FIX = "write each shape batch first, e.g. --min-shapes input_ids:1x8,attention_mask:1x8 (the same inputs in --opt-shapes and --max-shapes)"


def parse_shapes(text: str, option: str = "--max-shapes") -> dict[str, list[int]]:
    """Parse ``'input_ids:1x8,attention_mask:1x8'`` into ``{"input_ids": [1, 8], "attention_mask": [1, 8]}``.

    Raises:
        ConfigError: an entry without ``name:shape``, or a shape that is not integers joined by x.
    """
    out: dict[str, list[int]] = {}
    for item in (t.strip() for t in text.split(",") if t.strip()):
        name, sep, dims = item.rpartition(":")
        try:
            shape = [int(d) for d in dims.lower().replace("×", "x").split("x")]
        except ValueError:
            shape = []
        if not sep or not name or not shape:
            raise ConfigError(got=f"{option} {text!r} (entry {item!r})", expected="NAME:DIMS entries joined by commas, dimensions joined by x",
                              because="each input gets its full shape, batch first, as trtexec's --minShapes", fix=_SHAPES_FIX)
        out[name.strip()] = shape
    return out


def parse_pad_values(text: str) -> dict[str, float]:
    """Parse ``'input_ids:1,attention_mask:0'`` into ``{"input_ids": 1.0, "attention_mask": 0.0}``.

    Raises:
        ConfigError: an entry that is not ``name:number``.
    """
    out: dict[str, float] = {}
    for item in (t.strip() for t in text.split(",") if t.strip()):
        name, sep, value = item.rpartition(":")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or not name:
            raise ConfigError(got=f"--pad-values {text!r} (entry {item!r})", expected="NAME:VALUE entries joined by commas",
                              because="each input may have its own padding value (e.g. the tokenizer's pad id)", fix="e.g. --pad-values input_ids:1,attention_mask:0")
    return out


def engine_profile(batch: BatchProfile, shapes: ShapeProfile, specs: Sequence[Mapping[str, Any]]) -> EngineProfile:
    """The profile of every engine: the batch sizes and the dynamic axes of ``shapes``, checked against the inputs.

    Args:
        batch: the batch sizes (already fitted to memory where that applies).
        shapes: the configured shape profile (may be empty: only the batch varies).
        specs: the dataset's inputs (name, dtype, one sample's shape), as the ``data`` artifact records them.

    Returns:
        An ``EngineProfile`` with the batch sizes, every dynamic axis beyond the batch, the dataset's
        size of each such axis, and the pad value of each input.

    Raises:
        ConfigError: a shape for an input the dataset lacks, of another rank, or with a fixed axis that
            differs from the dataset's; a pad value for an unknown input.
    """
    by_name = {s["name"]: list(s["shape"]) for s in specs}
    names = ", ".join(f"{n} (N×{'×'.join(map(str, s)) or '1'})" for n, s in by_name.items())
    for name in [*shapes.max, *shapes.pad_values]:
        if name not in by_name:
            raise ConfigError(got=f"a shape or pad value for input '{name}'", expected=f"one of the dataset's inputs: {names}",
                              because="shapes are given per model input, named like the dataset's arrays", fix=_SHAPES_FIX)
    axes = shapes.axes()
    for name in shapes.max:
        sample = by_name[name]
        if len(shapes.max[name]) != len(sample) + 1:
            raise ConfigError(got=f"shape {'x'.join(map(str, shapes.max[name]))} for '{name}' (rank {len(shapes.max[name])})",
                              expected=f"rank {len(sample) + 1}: the batch, then {'×'.join(map(str, sample)) or 'nothing'} as in the dataset",
                              because="a shape is the full shape of one batch, batch first", fix=_SHAPES_FIX)
        for i, d in enumerate(sample, start=1):
            if i not in axes.get(name, {}) and shapes.max[name][i] != d:
                raise ConfigError(got=f"axis {i} of '{name}' fixed at {shapes.max[name][i]} by the shapes", expected=f"{d}, the dataset's size of that axis, or a range (min < max)",
                                  because="an axis whose min, opt and max are equal is static, and the model sees it at the dataset's size",
                                  fix=f"give axis {i} of '{name}' a range, e.g. --min-shapes {name}:1x{max(1, d // 4)} --max-shapes {name}:{shapes.max[name][0]}x{2 * d}")
    lengths = {n: {i: by_name[n][i - 1] for i in a} for n, a in axes.items()}
    return EngineProfile(**batch.model_dump(), axes=axes, lengths=lengths, pad_values=dict(shapes.pad_values))


def dynamic(profile: BatchProfile) -> bool:
    """Whether the profile has dynamic axes beyond the batch."""
    return bool(getattr(profile, "axes", None))


@dataclass(frozen=True)
class ShapePoint:
    """One shape an engine is verified and timed at.

    Attributes:
        level: ``min``, ``opt`` or ``max`` (several levels may share one point).
        batch: the batch size.
        lengths: input -> axis -> size of each dynamic axis beyond the batch (empty: none).
    """

    level: str
    batch: int
    lengths: dict[str, dict[int, int]] = field(default_factory=dict)

    def key(self) -> tuple[Any, ...]:
        return (self.batch, tuple(sorted((n, tuple(sorted(a.items()))) for n, a in self.lengths.items())))

    def shapes(self, specs: Sequence[Mapping[str, Any]]) -> dict[str, list[int]]:
        """Full shape of every input at this point (batch first)."""
        out = {}
        for s in specs:
            dims = list(s["shape"])
            for axis, size in self.lengths.get(s["name"], {}).items():
                dims[axis - 1] = size
            out[s["name"]] = [self.batch, *dims]
        return out

    def text(self, specs: Sequence[Mapping[str, Any]] | None = None) -> str:
        """``batch 32`` without dynamic axes, else the inputs' shapes as trtexec writes them: ``input_ids:32x64,...``."""
        if not self.lengths:
            return f"batch {self.batch}"
        specs = specs or [{"name": n, "shape": [0] * max(a)} for n, a in self.lengths.items()]
        shapes = self.shapes(specs)
        return ",".join(f"{n}:{'x'.join(map(str, shapes[n]))}" for n in self.lengths)


def shape_points(profile: BatchProfile) -> list[ShapePoint]:
    """The shapes verified and timed: the profile's min, opt and max (batch and every dynamic axis), without repeats.

    Without dynamic axes these are the batch sizes min, opt and max, smallest first.
    """
    out: dict[tuple[Any, ...], ShapePoint] = {}
    for k, level in enumerate(LEVELS):
        point = ShapePoint(level, int(getattr(profile, level)), _level_lengths(profile, k))
        out.setdefault(point.key(), point)
    return sorted(out.values(), key=lambda p: (LEVELS.index(p.level)))


def opt_point(profile: BatchProfile) -> ShapePoint:
    """The point at the profile's opt shape."""
    return ShapePoint("opt", int(profile.opt), _level_lengths(profile, 1))


def _level_lengths(profile: BatchProfile, k: int) -> dict[str, dict[int, int]]:
    return {n: {int(i): int(r[k]) for i, r in a.items()} for n, a in (getattr(profile, "axes", {}) or {}).items()}


def fit_lengths(feed: Mapping[str, np.ndarray], lengths: Mapping[str, Mapping[int, int]], pad_values: Mapping[str, float] | None = None) -> dict[str, np.ndarray]:
    """Real samples at another length: each dynamic axis cut to ``lengths``, or padded past the data's size.

    Padding appends ``pad_values[name]`` (default 0: the usual padding id, and mask 0, so a padded
    position is masked out) after the data's last position, as a tokenizer pads to a longer length.

    Args:
        feed: input name -> array (batch first).
        lengths: input name -> axis -> the size wanted (inputs and axes not named stay as they are).
        pad_values: input name -> fill value of the padded positions.

    Returns:
        Input name -> array (a new array where changed, C-contiguous).
    """
    out: dict[str, np.ndarray] = {}
    for name, arr in feed.items():
        a = np.asarray(arr)
        for axis, size in sorted((lengths.get(name) or {}).items()):
            have = a.shape[axis]
            if size < have:
                a = a[(slice(None),) * axis + (slice(0, size),)]
            elif size > have:
                pad = [(0, 0)] * a.ndim
                pad[axis] = (0, size - have)
                a = np.pad(a, pad, constant_values=np.array((pad_values or {}).get(name, 0)).astype(a.dtype))
        out[name] = np.ascontiguousarray(a)
    return out


def dim_groups(profile: BatchProfile) -> list[tuple[str, int, int, list[tuple[str, int]]]]:
    """The export's dynamic dimensions beyond the batch: axes with the same (min, opt, max) share one.

    Returns:
        (dimension name, min, max, [(input, axis), ...]) per dimension; the name is the first member's
        ``<input>_axis<k>`` (it becomes the ONNX file's symbolic dimension).
    """
    groups: dict[tuple[int, int, int], list[tuple[str, int]]] = {}
    for name, axes in (getattr(profile, "axes", {}) or {}).items():
        for axis, rng in sorted(axes.items()):
            groups.setdefault(tuple(int(v) for v in rng), []).append((name, int(axis)))  # type: ignore[arg-type]
    return [(f"{m[0][0]}_axis{m[0][1]}", rng[0], rng[2], m) for rng, m in groups.items()]


def export_dims(shapes: ShapeProfile | None, specs: Sequence[Mapping[str, Any]]) -> list[tuple[str, int, int, list[tuple[str, int]]]]:
    """The export's dynamic dimensions beyond the batch (``dim_groups``) of a shape profile, checked
    against the inputs (``engine_profile``); none without a profile or dynamic axes.

    Raises:
        ConfigError: as ``engine_profile``.
    """
    if shapes is None or not shapes.axes():
        return []
    return dim_groups(engine_profile(BatchProfile.model_validate({}), shapes, specs))


def full_shapes(profile: BatchProfile, specs: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, list[int]]]:
    """Every input's min, opt and max shape (batch first), as TensorRT's profile and the engine info record them."""
    out: dict[str, dict[str, list[int]]] = {s["name"]: {} for s in specs}
    for k, level in enumerate(LEVELS):
        point = ShapePoint(level, int(getattr(profile, level)), _level_lengths(profile, k))
        for name, shape in point.shapes(specs).items():
            out[name][level] = shape
    return out


def activation_scale(profile: BatchProfile) -> float:
    """How much larger one sample's activations get at the profile's max shape than at the dataset's
    (the product of max size over data size of each input's dynamic axes; the largest input's)."""
    axes, lengths = getattr(profile, "axes", {}) or {}, getattr(profile, "lengths", {}) or {}
    scale = 1.0
    for name, a in axes.items():
        s = float(np.prod([r[2] / max(1, lengths.get(name, {}).get(i, r[2])) for i, r in a.items()]))
        scale = max(scale, s)
    return scale
