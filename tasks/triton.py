"""Triton Inference Server's model configuration (``config.pbtxt``), derived from an engine's own IO specs.

Triton has no offline generator of ``config.pbtxt`` (triton-inference-server/server#3584), and a
hand-written one drifts from the engine it describes. Here it comes from what the build recorded about
the engine (``EngineInfo``): for a TensorRT plan the IO tensors read back from the deserialized plan
when the build could do that (``engine_io``), else the network it was built from; for ONNX Runtime the
session's own inputs and outputs. Types become Triton's (``TYPE_FP32`` ...), dims lose the batch axis
(-1 stays where a dimension is dynamic), ``max_batch_size`` is the profile's max and the dynamic
batcher prefers its opt. The text is then parsed with Triton's own schema (``model_config.proto`` as
shipped in ``tritonclient``) and checked for what Triton core refuses before it loads a backend.

    from tasks.triton import model_of_engine, config_text, parsed_config, config_problems
    model = model_of_engine(info, "my_model", max_queue_delay_us=100)
    text = config_text(model)
    assert not config_problems(parsed_config(text))
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasks.backends.base import EngineInfo
from tasks.errors import BundleError, TrtflowError

#: dtype names (numpy's, TensorRT's ``DataType``, ONNX Runtime's ``tensor(...)``) -> Triton's data type
TRITON_TYPES: dict[str, str] = {
    **dict.fromkeys(("float32", "float", "tensor(float)"), "TYPE_FP32"),
    **dict.fromkeys(("float16", "half", "tensor(float16)"), "TYPE_FP16"),
    **dict.fromkeys(("bfloat16", "bf16", "tensor(bfloat16)"), "TYPE_BF16"),
    **dict.fromkeys(("float64", "double", "tensor(double)"), "TYPE_FP64"),
    **dict.fromkeys(("int64", "tensor(int64)"), "TYPE_INT64"),
    **dict.fromkeys(("int32", "tensor(int32)"), "TYPE_INT32"),
    **dict.fromkeys(("int16", "tensor(int16)"), "TYPE_INT16"),
    **dict.fromkeys(("int8", "tensor(int8)"), "TYPE_INT8"),
    **dict.fromkeys(("uint8", "tensor(uint8)"), "TYPE_UINT8"),
    **dict.fromkeys(("uint16", "tensor(uint16)"), "TYPE_UINT16"),
    **dict.fromkeys(("uint32", "tensor(uint32)"), "TYPE_UINT32"),
    **dict.fromkeys(("uint64", "tensor(uint64)"), "TYPE_UINT64"),
    **dict.fromkeys(("bool", "tensor(bool)"), "TYPE_BOOL"),
}

#: Triton data type -> numpy dtype name (BF16 has none in numpy)
NUMPY_TYPES: dict[str, str] = {
    "TYPE_FP32": "float32", "TYPE_FP16": "float16", "TYPE_FP64": "float64", "TYPE_INT64": "int64",
    "TYPE_INT32": "int32", "TYPE_INT16": "int16", "TYPE_INT8": "int8", "TYPE_UINT8": "uint8",
    "TYPE_UINT16": "uint16", "TYPE_UINT32": "uint32", "TYPE_UINT64": "uint64", "TYPE_BOOL": "bool",
}


@dataclass(frozen=True)
class Platform:
    """How Triton serves one backend's engines."""

    platform: str
    model_file: str
    instance_kind: str


#: Triton platform -> the file name Triton looks for in a model's version folder
MODEL_FILES: dict[str, str] = {"onnxruntime_onnx": "model.onnx", "tensorrt_plan": "model.plan"}


def _declared_platform(backend: str) -> str | None:
    from tasks.backends.registry import backend_spec

    try:
        return backend_spec(backend).triton_platform
    except TrtflowError:
        return None


def platform_of(backend: str) -> Platform:
    """How Triton serves the engines of a registered backend: its spec's platform, on its device's kind.

    Raises:
        BundleError: the backend declares no Triton platform (or one this module has no file name for),
            or is not registered.
    """
    from tasks.backends.registry import backend_spec, backends

    try:
        spec = backend_spec(backend)
    except TrtflowError as exc:
        raise BundleError(got=f"an engine of backend '{backend}'", expected="a registered backend", because=exc.because, fix=exc.fix) from exc
    if spec.triton_platform not in MODEL_FILES:
        served = [s.name for s in backends() if s.triton_platform in MODEL_FILES]
        raise BundleError(
            got=f"an engine of backend '{backend}'",
            expected=f"one of {', '.join(served)}",
            because="only those have a Triton platform",
            fix=f"build with {' or '.join('--backend ' + n for n in served)}",
        )
    # An engine verified on the CPU is served on the CPU too; a GPU one on the GPU.
    return Platform(spec.triton_platform, MODEL_FILES[spec.triton_platform], "KIND_GPU" if spec.device == "gpu" else "KIND_CPU")


def triton_type(dtype: str, tensor: str) -> str:
    """Triton's data type for a dtype name of numpy, TensorRT or ONNX Runtime.

    Raises:
        BundleError: a type Triton has no name for.
    """
    try:
        return TRITON_TYPES[str(dtype).lower()]
    except KeyError:
        raise BundleError(
            got=f"tensor '{tensor}' of type {dtype}",
            expected=f"one of {', '.join(sorted(set(TRITON_TYPES.values())))}",
            because="Triton's model configuration names a tensor's type with one of those",
            fix="keep the model's inputs and outputs in a standard type (cast inside the model)",
        ) from None


@dataclass(frozen=True)
class TritonTensor:
    """One input or output as Triton's config names it: dims without the batch axis, -1 where dynamic."""

    name: str
    data_type: str
    dims: tuple[int, ...]


@dataclass(frozen=True)
class WarmupInput:
    """One input of the warm-up request: a real sample's raw bytes in ``warmup/<file>`` (or zeros)."""

    name: str
    data_type: str
    dims: tuple[int, ...]
    file: str | None = None


@dataclass(frozen=True)
class TritonModel:
    """Everything ``config.pbtxt`` says about one model."""

    name: str
    platform: str
    max_batch_size: int
    inputs: tuple[TritonTensor, ...]
    outputs: tuple[TritonTensor, ...]
    instance_kind: str
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_delay_us: int = 100
    parameters: Mapping[str, str] = field(default_factory=dict)
    warmup: tuple[WarmupInput, ...] = ()
    #: where the IO specs came from, written as a comment (e.g. "the deserialized plan")
    source: str = ""


@dataclass(frozen=True)
class EngineIO:
    """An engine's inputs and outputs with full shapes, its batch range, and where they were read from."""

    inputs: tuple[tuple[str, str, tuple[int, ...]], ...]
    outputs: tuple[tuple[str, str, tuple[int, ...]], ...]
    batch: tuple[int, int, int]
    source: str


def engine_io(info: EngineInfo) -> EngineIO:
    """The IO tensors and batch profile of a built engine, from its own record.

    A TensorRT build that could deserialize its plan records the plan's tensors and optimization
    profile (``engine_io``); those are used first. Otherwise the specs the build took from the network
    (TensorRT) or the session (ONNX Runtime) are used, with the build's batch profile.
    """
    extra = info.model_extra or {}
    plan_io = extra.get("engine_io")
    if plan_io:
        ins = tuple((t["name"], t["dtype"], tuple(int(d) for d in t["shape"])) for t in plan_io if t["mode"] == "input")
        outs = tuple((t["name"], t["dtype"], tuple(int(d) for d in t["shape"])) for t in plan_io if t["mode"] == "output")
        profiles = [t["profile"] for t in plan_io if t["mode"] == "input" and t.get("profile")]
        if profiles:
            p = profiles[0]
            batch = (int(p["min"][0]), int(p["opt"][0]), int(p["max"][0]))
        else:
            batch = (info.batch.min, info.batch.opt, info.batch.max)
        return EngineIO(ins, outs, batch, "the deserialized plan's IO tensors and optimization profile")
    plan = MODEL_FILES.get(_declared_platform(info.backend) or "") == "model.plan"
    what = "the TensorRT network the plan was built from" if plan else f"the {info.backend} session's inputs and outputs"
    return EngineIO(
        tuple((s.name, s.dtype, tuple(s.shape)) for s in info.inputs),
        tuple((s.name, s.dtype, tuple(s.shape)) for s in info.outputs),
        (info.batch.min, info.batch.opt, info.batch.max),
        f"{what} and the build's batch profile",
    )


def batched(io: EngineIO) -> bool:
    """Whether every input and output has a dynamic batch axis first (Triton then batches requests)."""
    return all(len(shape) >= 1 and shape[0] < 0 for _, _, shape in (*io.inputs, *io.outputs))


def model_of_engine(
    info: EngineInfo,
    name: str,
    max_queue_delay_us: int = 100,
    warmup: Sequence[WarmupInput] = (),
) -> TritonModel:
    """The Triton model of a built engine.

    Args:
        info: the ``build`` artifact's engine record.
        name: the model's name (its folder in the repository).
        max_queue_delay_us: how long the dynamic batcher waits for a fuller batch.
        warmup: the warm-up request's inputs (real samples), if any.

    Returns:
        The model: ``max_batch_size`` = profile max and ``preferred_batch_size`` = opt when every
        tensor has a dynamic batch axis; otherwise ``max_batch_size`` 0 with the full shapes.

    Raises:
        BundleError: the backend has no Triton platform, or a tensor's type has no Triton name.
    """
    plat = platform_of(info.backend)
    io = engine_io(info)
    batch = batched(io)

    def tensors(specs: Sequence[tuple[str, str, tuple[int, ...]]]) -> tuple[TritonTensor, ...]:
        return tuple(TritonTensor(n, triton_type(d, n), tuple(shape[1:] if batch else shape)) for n, d, shape in specs)

    params: dict[str, str] = {}
    if plat.platform == "onnxruntime_onnx" and info.threads:
        # Results and speed were verified with this many threads (Triton's ONNX Runtime backend parameters).
        params = {"intra_op_thread_count": str(info.threads), "inter_op_thread_count": "1"}
    return TritonModel(
        name=name,
        platform=plat.platform,
        max_batch_size=io.batch[2] if batch else 0,
        inputs=tensors(io.inputs),
        outputs=tensors(io.outputs),
        instance_kind=plat.instance_kind,
        preferred_batch_sizes=(io.batch[1],) if batch else (),
        max_queue_delay_us=max_queue_delay_us,
        parameters=params,
        warmup=tuple(warmup),
        source=io.source,
    )


def _quoted(text: str) -> str:
    if any(ord(c) < 32 for c in text):
        raise BundleError(got=f"name {text!r} with a control character", expected="a printable name", because="config.pbtxt holds names as quoted strings", fix="rename the tensor or model")
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _dims(dims: Sequence[int]) -> str:
    return "[ " + ", ".join(str(int(d)) for d in dims) + " ]"


def _tensor_block(kind: str, tensors: Sequence[TritonTensor]) -> list[str]:
    lines = [f"{kind} ["]
    for i, t in enumerate(tensors):
        lines += ["  {", f"    name: {_quoted(t.name)}", f"    data_type: {t.data_type}", f"    dims: {_dims(t.dims)}", "  }" + ("," if i < len(tensors) - 1 else "")]
    return lines + ["]"]


def config_text(model: TritonModel, header: str = "") -> str:
    """``config.pbtxt`` of a model, in Triton's protobuf text format.

    Args:
        model: the model.
        header: comment lines written on top (without '#').
    """
    lines = [f"# {line}" for line in header.splitlines() if line.strip()]
    if model.source:
        lines.append(f"# IO specs from {model.source}.")
    lines += [f"name: {_quoted(model.name)}", f"platform: {_quoted(model.platform)}", f"max_batch_size: {model.max_batch_size}"]
    lines += _tensor_block("input", model.inputs)
    lines += _tensor_block("output", model.outputs)
    if model.max_batch_size > 0:
        lines += ["dynamic_batching {"]
        if model.preferred_batch_sizes:
            lines.append(f"  preferred_batch_size: {_dims(model.preferred_batch_sizes)}")
        lines += [f"  max_queue_delay_microseconds: {model.max_queue_delay_us}", "}"]
    lines += ["instance_group [", "  {", f"    kind: {model.instance_kind}", "    count: 1", "  }", "]"]
    for key, value in model.parameters.items():
        lines.append(f"parameters {{ key: {_quoted(key)} value: {{ string_value: {_quoted(value)} }} }}")
    if model.warmup:
        lines += ["model_warmup [", "  {", '    name: "real_sample"', "    batch_size: 1"]
        for w in model.warmup:
            source = f"input_data_file: {_quoted(w.file)}" if w.file else "zero_data: true"
            lines += ["    inputs {", f"      key: {_quoted(w.name)}", "      value: {", f"        data_type: {w.data_type}", f"        dims: {_dims(w.dims)}", f"        {source}", "      }", "    }"]
        lines += ["  }", "]"]
    return "\n".join(lines) + "\n"


def model_config_schema() -> Any:
    """Triton's ``model_config_pb2`` module, as ``tritonclient`` ships it.

    ``tritonclient.grpc``'s package needs the grpc extra (``grpcio``) only for its client; the schema
    module itself needs only protobuf, so without grpc it is loaded from its file directly.

    Raises:
        BundleError: tritonclient is not installed.
    """
    name = "tritonclient.grpc.model_config_pb2"
    if name in sys.modules:
        return sys.modules[name]
    try:
        return importlib.import_module(name)
    except (ImportError, RuntimeError):  # RuntimeError: tritonclient.grpc without grpcio
        pass
    private = "_trtflow_triton_model_config_pb2"
    if private in sys.modules:
        return sys.modules[private]
    spec = importlib.util.find_spec("tritonclient")
    path = Path(next(iter(spec.submodule_search_locations or []), "")) / "grpc" / "model_config_pb2.py" if spec else None
    if path is None or not path.is_file():
        raise BundleError(
            got="no tritonclient package (Triton's model configuration schema)",
            expected="tritonclient installed",
            because="every config.pbtxt is checked against Triton's own schema before it is shipped",
            fix="pip install tritonclient==2.73.0 (a dependency of trtflow: pip install -e .)",
        )
    loader_spec = importlib.util.spec_from_file_location(private, path)
    assert loader_spec is not None and loader_spec.loader is not None
    module = importlib.util.module_from_spec(loader_spec)
    loader_spec.loader.exec_module(module)
    sys.modules[private] = module
    return module


def schema_version() -> str:
    """The tritonclient version whose schema checks configs."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tritonclient")
    except PackageNotFoundError:
        return "absent"


def parsed_config(text: str, where: str = "config.pbtxt") -> Any:
    """Parse ``config.pbtxt`` text with Triton's schema (``inference.ModelConfig``).

    Raises:
        BundleError: a syntax error, an unknown field or an unknown enum value (Triton would refuse it).
    """
    from google.protobuf import text_format

    schema = model_config_schema()
    try:
        return text_format.Parse(text, schema.ModelConfig())
    except text_format.ParseError as exc:
        raise BundleError(
            got=f"{where} that Triton's schema refuses: {exc}",
            expected="a ModelConfig in protobuf text format",
            because="Triton parses config.pbtxt with model_config.proto before it loads a model",
            fix="report this: trtflow wrote a config Triton cannot read",
        ) from exc


def config_problems(config: Any) -> list[str]:
    """What Triton core refuses in a parsed ModelConfig before it loads any backend (empty: none).

    The checks follow Triton's ``model_config_utils`` validation: batch sizes, dims, names and types,
    warm-up requests.
    """
    problems: list[str] = []
    schema = model_config_schema()
    invalid = schema.DataType.Value("TYPE_INVALID")
    mbs = int(config.max_batch_size)
    if mbs < 0:
        problems.append(f"max_batch_size {mbs} < 0")
    if not config.platform and not config.backend:
        problems.append("neither platform nor backend")
    if config.HasField("dynamic_batching"):
        if mbs == 0:
            problems.append("dynamic batching with max_batch_size 0")
        for size in config.dynamic_batching.preferred_batch_size:
            if size < 1 or size > mbs:
                problems.append(f"dynamic batching preferred size {size} must be <= max batch size {mbs} (and >= 1)")
    for kind, tensors in (("input", config.input), ("output", config.output)):
        if not tensors:
            problems.append(f"no {kind}")
        names = [t.name for t in tensors]
        if len(set(names)) != len(names):
            problems.append(f"{kind} names repeat: {names}")
        for t in tensors:
            if not t.name:
                problems.append(f"an {kind} without a name")
            if t.data_type == invalid:
                problems.append(f"{kind} '{t.name}' has TYPE_INVALID")
            if not t.dims and mbs == 0:
                problems.append(f"{kind} '{t.name}' has no dims")
            if any(d == 0 or d < -1 for d in t.dims):
                problems.append(f"{kind} '{t.name}' dims {list(t.dims)}: each must be > 0 or -1")
    inputs = {t.name: t for t in config.input}
    for w in config.model_warmup:
        if w.batch_size < 1 or (mbs > 0 and w.batch_size > mbs) or (mbs == 0 and w.batch_size != 1):
            problems.append(f"warm-up '{w.name}' batch_size {w.batch_size} outside 1..{max(mbs, 1)}")
        for key, value in w.inputs.items():
            if key not in inputs:
                problems.append(f"warm-up input '{key}' is not an input of the model")
            elif value.data_type != inputs[key].data_type:
                problems.append(f"warm-up input '{key}' has another type than the input")
            if any(d < 1 for d in value.dims):
                problems.append(f"warm-up input '{key}' dims {list(value.dims)} must be concrete")
        missing = set(inputs) - set(w.inputs)
        if missing:
            problems.append(f"warm-up '{w.name}' lacks inputs {sorted(missing)}")
    return problems
