"""Typed configuration of a trtflow run.

These pydantic models are the flow's parameters, so the Prefect UI renders them as a form with named,
typed, described fields; each artifact stores the part of the config that made it.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tasks.errors import ConfigError
from tasks.policy import model_schema


class Precision(str, Enum):
    """Numeric precision of an engine; each has its own ONNX variant and tolerances."""

    fp32 = "fp32"
    fp16 = "fp16"
    int8 = "int8"
    bf16 = "bf16"


class Backend(str, Enum):
    """The built-in inference backends (``PipelineConfig.backend`` also takes any registered one's name)."""

    auto = "auto"
    onnxruntime = "onnxruntime"
    tensorrt = "tensorrt"


class Stage(str, Enum):
    """Pipeline stages in execution order."""

    data = "data"
    train = "train"
    export = "export"
    validate = "validate"
    precision = "precision"
    build = "build"
    verify = "verify"
    repair = "repair"
    profile = "profile"
    package = "package"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", use_enum_values=False)


class DataConfig(_Strict):
    """Where the data comes from and how it is split."""

    model_config = ConfigDict(title="Data")

    dataset: Path | None = Field(
        None,
        description="A .npz file (or a folder of .npy files, memory-mapped) with one array per model input, named after forward's parameters (a single input "
        "may be x; N×D, N×T×D or N×C×H×W; float, or integer for ids and masks) and labels y (N ints for classes, N or N×K floats "
        "for regression; optional with weights); empty: scikit-learn's bundled digits, upscaled to 3×32×32.",
    )
    val_fraction: float = Field(0.15, gt=0, lt=0.5, description="Share of samples for validation.")
    test_fraction: float = Field(0.15, gt=0, lt=0.5, description="Share of samples held out for verification.")
    seed: int = Field(0, ge=0, description="Seed of the stratified split (and of the imbalance subsampling).")
    imbalance: float | None = Field(
        None,
        description="Make the training split imbalanced on purpose, to rehearse skewed real data: class "
        "'majority_class' becomes this share of the TRAINING split (e.g. 0.8 = 80%) by dropping samples of "
        "the other classes (each keeps at least one), or of the majority class if it is already above the "
        "share; seeded. Validation and test keep their natural distribution. Empty: no change.",
    )
    majority_class: int = Field(0, ge=0, description="The class that 'imbalance' makes the majority.")
    task: Literal["auto", "classification", "regression"] = Field(
        "auto",
        description="What y holds. auto: integer y is class labels (classification), float y is targets "
        "(regression, N or N×K values). Force it when the dtype says otherwise, e.g. classes saved as floats.",
    )

    @field_validator("imbalance")
    @classmethod
    def _imbalance_share(cls, v: float | None) -> float | None:
        # pydantic's own bound message ("greater than 0") does not say what the number means.
        if v is not None and not 0 < v < 1:
            raise ValueError(
                f"got imbalance {v}, expected a share strictly between 0 and 1 (e.g. 0.8: the majority class is "
                "80% of the training split), because 0 or 1 would drop a class or every other class; "
                "pass e.g. --imbalance 0.8, or omit it to keep the natural distribution"
            )
        return v


class CollapseGate(_Strict):
    """Thresholds that fail the train stage when the model collapsed onto one class (classification) or
    learnt nothing (regression).

    Judged on the validation split (natural distribution). With k the most-predicted class, p its share
    of the predictions and t its true share, the gate fails when either holds:

    - p > max(max_majority_prediction_share, t + majority_share_margin): one class takes most of the
      predictions AND clearly more than it deserves; a legitimately 90%-one-class dataset whose model
      predicts that class 90% of the time passes, since t + margin >= 1 there.
    - balanced accuracy < 1 / num_classes + min_balanced_accuracy_over_chance: the mean per-class recall
      is barely above what always answering one class gets (exactly 1 / num_classes); this catches a
      collapse the share rule cannot see because the collapsed-on class truly dominates.

    For regression the gate fails when the validation R² is at most ``min_r2``: R² 0 is what always
    predicting the mean of y gets, so a model at or below it learnt nothing about x.
    """

    model_config = ConfigDict(title="Collapse gate")

    enabled: bool = Field(True, description="Check the trained model for collapse; off ships whatever trained.")
    max_majority_prediction_share: float = Field(
        0.8, gt=0, le=1, description="Largest share of validation predictions one class may take (if also over its true share + margin)."
    )
    majority_share_margin: float = Field(
        0.2, ge=0, le=1, description="How far the most-predicted class's share may exceed its true share before it counts."
    )
    min_balanced_accuracy_over_chance: float = Field(
        0.1, ge=0, lt=1, description="Balanced accuracy must be at least 1/num_classes plus this."
    )
    min_r2: float = Field(
        0.0, ge=-1e9, lt=1,
        description="Regression: the validation R² (mean over targets) must be above this; 0 is what predicting the mean gets.",
    )


class TrainConfig(_Strict):
    """How the PyTorch model is made and trained."""

    model_config = ConfigDict(title="Training")

    model: str = Field(
        "tasks.models:default_model",
        description="Model factory as 'package.module:callable' (an nn.Module subclass or any callable returning one). "
        "It gets only the keyword arguments its signature names out of num_classes, num_outputs, in_channels, in_features and "
        "input_shape, plus model_kwargs. Default: a CNN for images (N×C×H×W), an MLP for vectors and sequences. "
        "A deployment offers the factories its worker allows (TRTFLOW_ALLOWED_MODELS).",
        # The form's choice: read when the schema is made (prefect deploy, trtflow serve), see tasks.policy.
        json_schema_extra=model_schema,
    )
    model_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Extra keyword arguments of the factory (JSON); they override the known ones."
    )
    weights: Path | None = Field(
        None,
        description="Trained weights to load: a state_dict saved with torch.save, a checkpoint dict holding one under "
        "'state_dict' or 'model', or a .safetensors file. With weights and no epochs nothing is trained.",
    )
    epochs: int = Field(5, ge=1, le=1000, description="Training epochs.")
    fine_tune: bool = Field(
        False, description="With weights: train them for 'epochs' more epochs. Off: load them as they are, train nothing."
    )
    logits_output: str | None = Field(
        None,
        description="The output the task judges: the class logits (classification) or the prediction (regression); "
        "task metrics and the gate use it. Empty: the first output shaped N×classes, or shaped like y.",
    )
    batch_size: int = Field(64, ge=1, le=65536, description="Training mini-batch size.")
    step_memory_mib: int = Field(
        1024, ge=0, le=1 << 24,
        description="The most activation memory one training step may take, estimated on a real batch. A larger "
        "batch is computed in equal micro-batches whose gradients add up to the whole batch's (gradient "
        "accumulation): same batch size, same optimizer steps (BatchNorm then normalizes per micro-batch). "
        "0: never split.",
    )
    lr: float = Field(1e-3, gt=0, le=10, description="Adam learning rate.")
    seed: int = Field(0, ge=0, description="Seed of weight init and shuffling.")
    threads: int = Field(2, ge=1, le=256, description="torch CPU threads; results depend on it.")
    balance: Literal["none", "class_weight", "oversample"] = Field(
        "none",
        description="Counter an imbalanced training split. none: plain cross-entropy. class_weight: "
        "cross-entropy weighted by N / (classes * count of the class), so every class weighs the same in "
        "the loss. oversample: each epoch draws as many samples as the split has, with replacement, with "
        "probability 1/count of its class (seeded), so batches are balanced on average.",
    )
    collapse_gate: CollapseGate = Field(
        default_factory=CollapseGate, title="Collapse gate",
        description="Fail training when the model collapsed onto one class, or (regression) predicts no better than the mean.",
    )

    @field_validator("model")
    @classmethod
    def _model_path(cls, v: str) -> str:
        mod, sep, attr = v.partition(":")
        if not sep or not mod or not attr:
            raise ValueError(
                f"got model '{v}', expected 'package.module:callable' (e.g. tasks.models:SmallCNN)"
            )
        return v

    @property
    def epochs_to_run(self) -> int:
        """The epochs that will run: 0 with weights unless ``fine_tune`` (load only), else ``epochs``."""
        return 0 if self.weights is not None and not self.fine_tune else self.epochs


class BatchProfile(_Strict):
    """Batch sizes the engines are built for (TensorRT's optimization profile) and verified at."""

    model_config = ConfigDict(title="Batch sizes")

    min: int = Field(1, ge=1, description="Smallest batch an engine accepts.")
    opt: int = Field(32, ge=1, description="Batch the engine is tuned for.")
    max: int = Field(256, ge=1, le=1 << 20, description="Largest batch an engine accepts.")
    cpu_memory_mib: int = Field(
        512, ge=0, le=1 << 20,
        description="For engines that run on the CPU (ONNX Runtime): the most memory one batch's activations may "
        "take. opt and max are lowered to a power of two that fits, measured on the trained model, and the run "
        "says so. 0 keeps the profile as given. Engines on a GPU (TensorRT) always keep it.",
    )

    @model_validator(mode="after")
    def _ordered(self) -> BatchProfile:
        if not self.min <= self.opt <= self.max:
            raise ValueError(
                f"got batch sizes min={self.min}, opt={self.opt}, max={self.max}, "
                "expected min <= opt <= max; reorder them"
            )
        return self


def _shape_text(shape: Any) -> Any:
    # '1x8' (the command line's and trtexec's way of writing a shape) as [1, 8].
    if isinstance(shape, str):
        try:
            return [int(d) for d in shape.lower().replace("×", "x").split("x")]
        except ValueError:
            raise ValueError(f"got shape '{shape}', expected dimensions joined by x, e.g. 32x64") from None
    return shape


class ShapeProfile(_Strict):
    """Smallest, tuned-for and largest shape of each input with axes beyond the batch that vary (a
    sequence length, an image size): TensorRT's ``--minShapes/--optShapes/--maxShapes``.

    Full shapes, batch first, as trtexec and Polygraphy take them: ``{"input_ids": [1, 8]}`` (the
    command line: ``--min-shapes input_ids:1x8,attention_mask:1x8``). An axis whose min, opt and max
    differ is exported dynamic and built into the engine's profile; the others must equal the dataset's.
    Axes with the same range share one dimension (``input_ids`` and ``attention_mask``: one sequence
    length). Axis 0 is the batch: the shapes' batch sizes are the run's batch sizes (``--min-batch``
    and friends are the shorthand for shapes where only the batch varies). Verification and timing run
    at the min, opt and max shape, on real samples cut to the length, or padded with ``pad_values``.
    """

    model_config = ConfigDict(title="Input shapes")

    min: dict[str, list[int]] = Field(default_factory=dict, description="Smallest shape per input, batch first, e.g. {\"input_ids\": [1, 8]}.")
    opt: dict[str, list[int]] = Field(default_factory=dict, description="Shape per input the engine is tuned for, e.g. {\"input_ids\": [32, 64]}.")
    max: dict[str, list[int]] = Field(default_factory=dict, description="Largest shape per input, e.g. {\"input_ids\": [256, 128]}.")
    pad_values: dict[str, float] = Field(
        default_factory=dict,
        description="Value that fills an input past the dataset's length, when a shape is longer than the data "
        "(default 0 for every input: the usual padding id, and mask 0 = padding).",
    )

    @field_validator("min", "opt", "max", mode="before")
    @classmethod
    def _shapes(cls, v: Any) -> Any:
        return {k: _shape_text(s) for k, s in v.items()} if isinstance(v, Mapping) else v

    @model_validator(mode="after")
    def _consistent(self) -> ShapeProfile:
        levels = {"min": self.min, "opt": self.opt, "max": self.max}
        given = [k for k, v in levels.items() if v]
        if not given:
            return self
        names = {k: sorted(v) for k, v in levels.items()}
        if len({tuple(n) for n in names.values()}) != 1:
            raise ValueError(
                "got shapes for inputs " + ", ".join(f"{k} {names[k]}" for k in levels)
                + ", expected min, opt and max shapes for the same inputs (TensorRT needs all three per input)"
            )
        for name in self.min:
            lo, opt, hi = self.min[name], self.opt[name], self.max[name]
            if not len(lo) == len(opt) == len(hi) or not lo:
                raise ValueError(f"got shapes {lo}, {opt}, {hi} for '{name}', expected three shapes of the same rank (batch first)")
            if any(d < 1 for d in (*lo, *opt, *hi)):
                raise ValueError(f"got shapes {lo}, {opt}, {hi} for '{name}', expected every dimension >= 1")
            if not all(a <= b <= c for a, b, c in zip(lo, opt, hi)):
                raise ValueError(f"got shapes min {lo}, opt {opt}, max {hi} for '{name}', expected min <= opt <= max on every axis")
        for level, shapes in levels.items():
            batches = {s[0] for s in shapes.values()}
            if len(batches) > 1:
                raise ValueError(f"got {level} shapes with batch sizes {sorted(batches)}, expected one batch (axis 0) for every input")
        return self

    @property
    def batch(self) -> tuple[int, int, int] | None:
        """(min, opt, max) of axis 0, or None when no shape is given."""
        if not self.max:
            return None
        return next(iter(self.min.values()))[0], next(iter(self.opt.values()))[0], next(iter(self.max.values()))[0]

    def axes(self) -> dict[str, dict[int, tuple[int, int, int]]]:
        """The dynamic axes beyond the batch: input -> axis -> (min, opt, max), for axes whose range is not one size."""
        out: dict[str, dict[int, tuple[int, int, int]]] = {}
        for name in self.max:
            ranges = {i: (self.min[name][i], self.opt[name][i], self.max[name][i]) for i in range(1, len(self.max[name]))}
            dyn = {i: r for i, r in ranges.items() if len(set(r)) > 1}
            if dyn:
                out[name] = dyn
        return out


class EngineProfile(BatchProfile):
    """The profile every engine is built, verified and timed at: the batch sizes (fitted to memory on
    a CPU backend) and the dynamic axes beyond the batch, resolved against the dataset's inputs.

    Made by trtflow from ``batch`` and ``shapes`` (``tasks.shapes.engine_profile``); not a config section.

    Attributes:
        axes: input -> axis -> [min, opt, max] of each dynamic axis beyond the batch.
        lengths: input -> axis -> the dataset's size of that axis (what real samples are cut or padded from).
        pad_values: input -> the value that pads it past the dataset's length.
    """

    axes: dict[str, dict[int, tuple[int, int, int]]] = Field(default_factory=dict)
    lengths: dict[str, dict[int, int]] = Field(default_factory=dict)
    pad_values: dict[str, float] = Field(default_factory=dict)


class Tolerance(_Strict):
    """Pass/fail thresholds of one precision. A None threshold is not checked.

    An element passes when |engine - torch| <= atol + rtol * |torch| (numpy.allclose semantics).
    """

    atol: float | None = Field(None, ge=0, description="Absolute error allowed per element.")
    rtol: float | None = Field(None, ge=0, description="Relative error allowed per element.")
    min_cosine: float = Field(0.999, ge=-1, le=1, description="Lowest cosine similarity per sample (worst sample).")
    min_top1_agreement: float = Field(0.99, ge=0, le=1, description="Lowest share of samples with the same argmax.")
    max_accuracy_drop: float = Field(0.01, ge=0, le=1, description="Largest accuracy loss against PyTorch.")
    min_compute_share: float = Field(
        0.1, ge=0, le=1,
        description="fp16 and int8: the smallest share of compute operators (Conv, Gemm, MatMul, ...) that must run "
        "in that precision; below it the engine is not that precision and fails (0 accepts it, shown as it is).",
    )
    max_relative_rmse: float = Field(
        0.01, ge=0,
        description="Largest RMS error relative to the reference's spread (per column: RMSE / std of PyTorch's values). "
        "Judges regression outputs and outputs one value wide, where the per-sample cosine is only ±1.",
    )
    max_r2_drop: float = Field(0.01, ge=0, le=10, description="Regression: largest loss of R² (against the labels) against PyTorch.")


def default_tolerances() -> dict[Precision, Tolerance]:
    """Per-precision defaults: each precision's registry entry (``tasks.precisions``) says them and why.

    Raises:
        ConfigError: a ``Precision`` member has no registry entry.
    """
    from tasks.precisions import precision_spec

    return {p: Tolerance(**precision_spec(p).tolerance) for p in Precision}


def _tolerance_field(precision: Precision) -> Any:
    """The ``Tolerances`` field of one precision: its registry entry's defaults and title."""
    from tasks.precisions import precision_spec

    return Field(default_factory=lambda: default_tolerances()[precision], title=precision.value, description=precision_spec(precision).title)


class Tolerances(_Strict):
    """Pass/fail thresholds per precision: one field per ``Precision`` member, named by its value.

    A partial override merges field by field into that precision's defaults: setting only
    ``fp32.atol`` keeps fp32's own ``min_cosine``, never the generic one (in the UI form, a config
    file and the CLI alike).
    """

    # One field per precision, made from the enum: a new precision needs no field written here.
    for _p in Precision:
        vars().setdefault("__annotations__", {})[_p.value] = "Tolerance"
        vars()[_p.value] = _tolerance_field(_p)
    del _p

    @model_validator(mode="before")
    @classmethod
    def _merge_into_defaults(cls, given: Any) -> Any:
        if not isinstance(given, Mapping):
            return given
        defaults = default_tolerances()
        merged: dict[str, Any] = {}
        for name, value in given.items():
            try:
                p = Precision(name)
            except ValueError:
                merged[str(name)] = value  # refused by extra="forbid", naming the key
                continue
            if isinstance(value, Tolerance):
                value = value.model_dump(include=value.model_fields_set)
            merged[p.value] = {**defaults[p].model_dump(), **value} if isinstance(value, Mapping) else value
        return merged

    def __getitem__(self, precision: Precision | str) -> Tolerance:
        return getattr(self, Precision(precision).value)

    def replaced(self, precision: Precision | str, **fields: Any) -> Tolerances:
        """A copy with some thresholds of one precision changed (validated).

        Raises:
            pydantic.ValidationError: a value out of range, or an unknown threshold.
        """
        p = Precision(precision)
        return Tolerances.model_validate({**self.model_dump(), p.value: {**self[p].model_dump(), **fields}})


class EngineOptions(_Strict):
    """Backend build and run options."""

    model_config = ConfigDict(title="Engine options")

    threads: int = Field(2, ge=1, le=256, description="CPU threads of ONNX Runtime sessions.")
    workspace_mib: int = Field(1024, ge=16, description="TensorRT builder workspace limit (MiB).")
    tf32: bool = Field(True, description="Allow TF32 in TensorRT fp32 engines; off for strict fp32.")
    providers: list[str] = Field(
        default_factory=lambda: ["CPUExecutionProvider"], min_length=1,
        description="ONNX Runtime execution providers of every engine's session, in order of preference (each must be in the installed onnxruntime).",
    )


class ProfileConfig(_Strict):
    """How each engine and PyTorch eager are timed (the ``profile`` stage).

    Each measurement runs ``warmup`` untimed batches, then timed ones until both ``min_seconds`` of
    timed work and ``min_iterations`` runs are reached; ``max_seconds`` caps a slow measurement, which
    then stops with fewer runs (the report states how many).
    """

    model_config = ConfigDict(title="Speed profile")

    enabled: bool = Field(True, description="Time every engine and PyTorch eager (latency at batch 1, throughput at max batch).")
    min_seconds: float = Field(0.3, ge=0, le=600, description="Timed work per measurement, at least (seconds).")
    min_iterations: int = Field(50, ge=1, le=1_000_000, description="Timed runs per measurement, at least.")
    max_seconds: float = Field(0.6, gt=0, le=3600, description="Stop adding runs after this many seconds per measurement.")
    warmup: int = Field(3, ge=0, le=10_000, description="Untimed runs before each measurement.")


class RepairConfig(_Strict):
    """Automatic repair of an fp16 or int8 variant that fails verification (see docs/precision.md).

    Each attempt ranks the nodes by the error they add on calibration samples, keeps the worst ones in
    fp32, and rebuilds and re-verifies, until the gate passes or ``budget`` nodes are kept. A variant
    that passes is never touched.
    """

    enabled: bool = Field(True, description="Repair failing fp16/int8 variants by keeping their worst nodes in fp32.")
    budget: int = Field(4, ge=1, le=10_000, description="Most nodes a repair may keep in fp32 before it gives up.")
    samples: int = Field(64, ge=1, le=100_000, description="Training samples that rank the nodes (the first ones, as int8 calibration).")

    @property
    def applies(self) -> dict[str, bool]:
        """Precision name -> whether a failing variant of it is repaired (every reduced precision, when enabled)."""
        from tasks.precisions import precision_spec

        return {p.value: self.enabled and precision_spec(p).reduced for p in Precision}


#: ship policies that need the speed profile (timings of every engine)
TIMED_POLICIES = ("fastest", "lowest-latency", "latency-budget")


def parse_ship_policy(text: str) -> tuple[str, str | float | None]:
    """Split a ``--ship`` policy into its kind and value.

    Args:
        text: ``fastest``, ``lowest-latency``, ``smallest``, a precision (``fp16``) or
            ``latency-budget=MS`` (milliseconds, > 0).

    Returns:
        ``(kind, value)``: ``("fastest", None)``, ``("precision", "fp16")``, ``("latency-budget", 2.5)``.

    Raises:
        ValueError: any other text (the message names the accepted forms).
    """
    t = str(text).strip().lower()
    if t in ("fastest", "lowest-latency", "smallest"):
        return t, None
    if t in {p.value for p in Precision}:
        return "precision", t
    kind, sep, value = t.partition("=")
    if kind == "latency-budget" and sep:
        import math

        try:
            ms = float(value)
        except ValueError:
            ms = -1.0
        if ms > 0 and math.isfinite(ms):
            return "latency-budget", ms
    raise ValueError(
        f"got ship policy {text!r}, expected fastest, lowest-latency, smallest, a precision ({', '.join(p.value for p in Precision)}) "
        "or latency-budget=MS with MS > 0 (milliseconds at batch 1); e.g. --ship latency-budget=2.5"
    )


def check_ship_policy(config: PipelineConfig) -> None:
    """Refuse a ship policy that cannot be met by this config (``PipelineConfig`` checks it when it is made).

    Raises:
        ConfigError: a speed policy with the profile stage off, or a precision not among --precisions.
    """
    ship = config.ship
    if not ship.enabled:
        return
    kind, value = parse_ship_policy(ship.policy)
    if ship.needs_timings and not config.profile.enabled:
        raise ConfigError(
            got=f"--ship {ship.policy} with --no-profile",
            expected="the speed profile for a speed policy",
            because=f"'{kind}' chooses by measured speed, and the profile stage measures it",
            fix="drop --no-profile, or pass --ship smallest or --ship PRECISION, or --no-package",
            summary=f"--ship {ship.policy} needs the speed profile; drop --no-profile, or pass --ship smallest, --ship fp32 or --no-package",
        )
    if kind == "precision" and Precision(value) not in config.precisions:
        raise ConfigError(
            got=f"--ship {value} with --precisions {','.join(p.value for p in config.precisions)}",
            expected=f"a precision that is built: {', '.join(p.value for p in config.precisions)}",
            because="only a built and verified variant can be shipped",
            fix=f"add {value} to --precisions, or pass another --ship",
            summary=f"--ship {value} but --precisions has no {value}; add it or pass another --ship",
        )


class ShipConfig(_Strict):
    """What the ``package`` stage ships: one verified engine as a Triton model repository (docs/shipping.md)."""

    model_config = ConfigDict(title="Shipping")

    enabled: bool = Field(True, description="Write the deployment bundle (artifacts/bundle/) after verify and profile.")
    policy: str = Field(
        "fastest",
        description="Which variant that PASSED its gates is shipped: fastest (highest throughput at the max batch), "
        "lowest-latency (p50 at batch 1), smallest (engine file size), a precision (fp32, fp16, int8), or "
        "latency-budget=MS (the fastest whose batch-1 p50 is at most MS milliseconds). Unset with the profile off: smallest.",
    )
    name: str | None = Field(
        None, description="Triton model name (letters, digits, '_', '-', '.'). Empty: the model factory's name, e.g. default_model."
    )
    samples: int = Field(8, ge=1, le=4096, description="Real test samples (inputs and verified outputs) stored in the bundle for smoke tests.")
    max_queue_delay_us: int = Field(100, ge=0, le=10_000_000, description="Triton dynamic batching: the longest a request waits for a fuller batch (microseconds).")

    @field_validator("policy")
    @classmethod
    def _policy(cls, v: str) -> str:
        kind, value = parse_ship_policy(v)
        return kind if value is None else (str(value) if kind == "precision" else f"latency-budget={value:g}")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        import re

        if v is not None and not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}", v):
            raise ValueError(f"got model name {v!r}, expected letters, digits, '_', '-' and '.' (not first), at most 128; e.g. --bundle-name my_model")
        return v

    @property
    def needs_timings(self) -> bool:
        """Whether the policy compares speed figures (the profile stage must run)."""
        return parse_ship_policy(self.policy)[0] in TIMED_POLICIES


class Target(_Strict):
    """One place engines are built for: a Prefect work pool whose workers run one backend on one kind of device.

    The parent run makes the shared artifacts once (data, train, export, the precision variants), then
    starts this target's deployment on its pool; that run builds, verifies and profiles there.
    """

    name: str = Field(description="Short name shown in the report (e.g. gpu-h100, cpu): lower-case letters, digits and '-'.")
    pool: str = Field(description="The Prefect work pool whose workers run on this target's machines.")
    backend: Backend = Field(Backend.auto, description="The backend the target's engines are built with (auto: what its worker has).")
    precisions: list[Precision] = Field(min_length=1, description="The precisions built and verified on this target.")
    deployment: str | None = Field(
        None, description="The deployment of the trtflow flow on that pool, as FLOW/NAME (empty: trtflow/target-NAME)."
    )
    artifacts_dir: Path | None = Field(
        None, description="The local folder on the target's machines (read cache, its reports). Empty: the same as this run's."
    )

    @field_validator("name")
    @classmethod
    def _target_name(cls, v: str) -> str:
        import re

        if not re.fullmatch(r"[a-z0-9][a-z0-9-]{0,62}", v):
            raise ValueError(f"got target name {v!r}, expected lower-case letters, digits and '-' (not first), at most 63; e.g. gpu-h100")
        return v

    @field_validator("precisions")
    @classmethod
    def _target_precisions(cls, v: list[Precision]) -> list[Precision]:
        return list(dict.fromkeys(v))

    @property
    def deployment_name(self) -> str:
        """FLOW/NAME of the deployment ``run_deployment`` starts for this target."""
        return self.deployment or f"trtflow/target-{self.name}"


def parse_targets(text: str) -> list[dict[str, Any]]:
    """Targets from ``NAME=POOL:BACKEND:PRECISIONS`` entries separated by spaces or ';'.

    ``gpu-h100=h100-pool:tensorrt:fp16,int8 cpu=cpu-pool:onnxruntime:fp32,int8``; BACKEND may be empty
    (auto). Returns the targets as dicts for ``PipelineConfig.targets``.

    Raises:
        ConfigError: an entry not of that form, or an unknown backend or precision.
    """
    out: list[dict[str, Any]] = []
    for entry in (e for e in text.replace(";", " ").split() if e):
        name, eq, rest = entry.partition("=")
        parts = rest.split(":")
        if not eq or len(parts) != 3 or not name or not parts[0]:
            raise ConfigError(
                got=f"--targets entry {entry!r}", expected="NAME=POOL:BACKEND:PRECISIONS",
                because="each target names its work pool, backend and precisions",
                fix="e.g. --targets 'gpu-h100=h100-pool:tensorrt:fp16,int8 cpu=cpu-pool:onnxruntime:fp32'",
            )
        pool, backend, precisions = parts
        if backend and backend not in {b.value for b in Backend}:
            raise ConfigError(
                got=f"backend {backend!r} in --targets entry {entry!r}", expected=" or ".join(b.value for b in Backend),
                because="a target's engines are built by one backend", fix=f"e.g. {name}={pool}:onnxruntime:{precisions}",
            )
        out.append({"name": name, "pool": pool, "backend": backend or Backend.auto.value, "precisions": [p.value for p in parse_precisions(precisions)]})
    return out


class PipelineConfig(_Strict):
    """Everything a trtflow run needs. Defaults run the bundled example end to end on a CPU."""

    artifacts_dir: Path = Field(Path("artifacts"), description="Folder for every output and the cache.")
    store: str | None = Field(
        None,
        description="Where artifacts live when not in the artifacts folder: s3://BUCKET/PREFIX (object storage, shared by machines); "
        "the artifacts folder then holds this run's report and a read cache. Empty: the artifacts folder.",
    )
    data: DataConfig = Field(default_factory=DataConfig, title="Data", description="Dataset and split.")
    train: TrainConfig = Field(default_factory=TrainConfig, title="Training", description="Model factory, optimiser and the collapse gate.")
    precisions: list[Precision] = Field(
        default_factory=lambda: [Precision.fp32, Precision.fp16, Precision.int8],
        min_length=1,
        description="Engines to build and verify.",
    )
    # A built-in name becomes its Backend member; any other is a registered backend's (checked when the run resolves it).
    backend: Backend | str = Field(Backend.auto, union_mode="left_to_right", description="auto: TensorRT when it and a GPU are present, else ONNX Runtime.")
    batch: BatchProfile = Field(default_factory=BatchProfile, title="Batch sizes", description="Smallest, tuned-for and largest batch of every engine.")
    shapes: ShapeProfile = Field(
        default_factory=ShapeProfile, title="Input shapes",
        description="Min/opt/max shape per input for axes beyond the batch that vary (sequence lengths); empty: only the batch varies.",
    )
    engine: EngineOptions = Field(default_factory=EngineOptions, title="Engine options", description="Threads, TensorRT workspace and TF32.")
    calibration_samples: int = Field(256, ge=1, le=100000, description="Training samples used to calibrate int8.")
    tolerances: Tolerances = Field(
        default_factory=Tolerances, description="Per-precision pass/fail thresholds; a partial override keeps the precision's other defaults."
    )
    refresh: list[Stage] = Field(
        default_factory=list, description="Stages to recompute even when cached (their dependents follow)."
    )
    profile: ProfileConfig = Field(default_factory=ProfileConfig, title="Speed profile", description="Speed measurement of every engine.")
    repair: RepairConfig = Field(default_factory=RepairConfig, title="Precision repair", description="Automatic repair of fp16/int8 variants that fail verification.")
    ship: ShipConfig = Field(default_factory=ShipConfig, title="Shipping", description="The deployment bundle: which verified variant to ship, as a Triton model repository.")
    targets: list[Target] = Field(
        default_factory=list, title="Targets",
        description="Build on several machines: each target a work pool, its backend and precisions. Empty: build here, for `precisions`.",
    )
    target: str | None = Field(
        None, description="Set by a parent run on the run it starts for one of its targets (that target's name); leave empty."
    )

    @field_validator("precisions")
    @classmethod
    def _unique(cls, v: list[Precision]) -> list[Precision]:
        return list(dict.fromkeys(v))

    @model_validator(mode="after")
    def _targets_unique(self) -> PipelineConfig:
        names = [t.name for t in self.targets]
        if len(set(names)) != len(names):
            raise ValueError(f"got targets {names}, expected each name once (it names the target's row in the report)")
        return self

    @property
    def target_precisions(self) -> list[Precision]:
        """The precisions a run makes variants of: every target's (in order), or ``precisions`` without targets."""
        if not self.targets:
            return list(self.precisions)
        return list(dict.fromkeys(p for t in self.targets for p in t.precisions))

    @model_validator(mode="after")
    def _batch_from_shapes(self) -> PipelineConfig:
        # The shapes' axis 0 is the batch: it sets the batch sizes, which must not say otherwise.
        given = self.shapes.batch
        if given is None:
            return self
        clash = [f"{k} {getattr(self.batch, k)} vs {b}" for k, b in zip(("min", "opt", "max"), given) if k in self.batch.model_fields_set and getattr(self.batch, k) != b]
        if clash:
            raise ValueError(
                f"got batch sizes that differ from the shapes' batch (axis 0): {', '.join(clash)}, expected the same "
                "batch in both; drop --min-batch/--opt-batch/--max-batch (the shapes set them) or make them agree"
            )
        self.batch = self.batch.model_copy(update=dict(zip(("min", "opt", "max"), given)))
        return self

    @model_validator(mode="after")
    def _ship_without_timings(self) -> PipelineConfig:
        # The default policy compares speed; with the profile off and no policy chosen, ship the smallest
        # passed variant instead of refusing a run the user never asked to be timed. A policy the user
        # chose is kept, and check_ship_policy refuses it with the fix.
        if not self.profile.enabled and "policy" not in self.ship.model_fields_set and self.ship.needs_timings:
            self.ship = self.ship.model_copy(update={"policy": "smallest"})
        return self

    @model_validator(mode="after")
    def _ship_policy_met(self) -> PipelineConfig:
        # A ConfigError, not a ValueError: pydantic passes it on unwrapped, with its fix (the CLI and the
        # flow render it like any other), so a config that cannot ship is refused when it is made.
        check_ship_policy(self)
        return self

    def tolerance(self, precision: Precision) -> Tolerance:
        """Return the thresholds of one precision."""
        return self.tolerances[precision]


def parse_precisions(text: str) -> list[Precision]:
    """Parse 'fp32,fp16' into precisions.

    Raises:
        ConfigError: an unknown precision name.
    """
    out = []
    for name in (t.strip() for t in text.split(",") if t.strip()):
        try:
            out.append(Precision(name))
        except ValueError:
            raise ConfigError(
                got=f"precision '{name}'",
                expected="one of " + ", ".join(p.value for p in Precision),
                because="only those have an ONNX variant and tolerances",
                fix="fix --precisions, e.g. --precisions fp32,fp16,int8",
            ) from None
    if not out:
        raise ConfigError(got="no precision", expected="at least one", because="there is nothing to build", fix="pass --precisions fp32")
    return out


def validation_problems(exc: Any) -> str:
    """One line naming every problem of a pydantic ValidationError: 'train.epochs: ...; batch: ...'."""
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}" for e in exc.errors())


def read_config_file(path: Path) -> dict[str, Any]:
    """Read a JSON file of PipelineConfig fields (not yet validated).

    Raises:
        ConfigError: the file is unreadable, not JSON, or not a JSON object.
    """
    import json

    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(got=f"config file {path} ({exc})", expected="a readable JSON object", because="--config is parsed as PipelineConfig", fix="fix the file or drop --config") from exc
    if not isinstance(raw, dict):
        raise ConfigError(got=f"config file {path} holding a JSON {type(raw).__name__}", expected="a JSON object of PipelineConfig fields", because="--config is parsed as PipelineConfig", fix='write it as {"train": {"epochs": 5}, ...} or drop --config')
    return raw
