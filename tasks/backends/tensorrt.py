"""TensorRT backend: builds a strongly typed engine from one precision's ONNX file and runs it.

Precision comes from the ONNX file itself (fp32, fp16, or int8 Q/DQ), parsed into a strongly typed
network: the one build path that works on TensorRT 10.x and 11.x, where the FP16/INT8 builder flags
and calibrators are gone. The build runs in a child process (``python -m tasks.backends._trt_build``)
so that a crash or an out-of-memory kill of TensorRT fails the stage cleanly instead of taking the
flow down, and the flow process's CUDA state never sees the builder. The runner uses pycuda on the
primary CUDA context, shared with PyTorch.

Nothing heavy is imported at module level: this module imports on machines with neither TensorRT
nor pycuda (``availability()`` then says why, and ``auto`` falls back to ONNX Runtime). The logic
that needs no TensorRT (profiles, timing-cache keys, buffer sizes, parser-error text, layer
summaries) lives in small functions here so that it is unit-tested everywhere.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tasks.artifacts import write_bytes_atomic
from tasks.backends.base import BackendSpec, BaseRunner, BuildResult, EngineBuilder, EngineInfo, TensorSpec
from tasks.errors import BackendUnavailableError, EngineBuildError, InferenceError

if TYPE_CHECKING:
    import tensorrt as trt

    from tasks.backends.cuda_buffers import HostDeviceBuffer, Stream

log = logging.getLogger(__name__)

INSTALL_HINT = 'pip install ".[tensorrt]"'
ENGINE_FILE = "engine.plan"
LAYERS_FILE = "layers.json"
DEFAULT_WORKSPACE_MIB = 1024
DEFAULT_BUILD_TIMEOUT_S = 3600
#: Exit status of the build worker when it failed on purpose (its error is in the result file).
WORKER_EXIT_BUILD_ERROR = 3
#: Folder that holds the ``tasks`` package: put on the worker's PYTHONPATH.
_PACKAGE_ROOT = Path(__file__).resolve().parents[2]

#: TensorRT ``DataType`` names -> numpy dtypes (numpy has no bf16/fp8/fp4/int4).
TRT_TO_NUMPY: dict[str, str] = {
    "FLOAT": "float32",
    "HALF": "float16",
    "INT8": "int8",
    "UINT8": "uint8",
    "INT32": "int32",
    "INT64": "int64",
    "BOOL": "bool",
}

# Order in which a layer's tensor types name its precision: a layer that touches int8 and fp32
# (an int8 convolution with a float output, a quantize step) is counted as int8.
_PRECISION_ORDER = ("int4", "fp4", "fp8", "int8", "fp16", "bf16", "fp32")
_FORMAT_TOKENS: tuple[tuple[str, str], ...] = (
    ("int4", "int4"),
    ("fp4", "fp4"),
    ("fp8", "fp8"),
    ("uint8", "other"),
    ("int8", "int8"),
    ("bf16", "bf16"),
    ("bfloat16", "bf16"),
    ("fp16", "fp16"),
    ("half", "fp16"),
    ("fp32", "fp32"),
    ("float", "fp32"),
    ("int32", "other"),
    ("int64", "other"),
    ("bool", "other"),
)


# --------------------------------------------------------------------------------------------------
# Pure logic (no TensorRT, no GPU): unit-tested in tests/backends/test_tensorrt.py
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProfileShapes:
    """Min/opt/max shape of one input in the optimization profile."""

    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    @property
    def dynamic(self) -> bool:
        """True when the shapes differ, i.e. the input needs a profile entry."""
        return not (self.min == self.opt == self.max)

    def to_json(self) -> dict[str, list[int]]:
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max)}


def check_batch_range(batch: Sequence[int]) -> tuple[int, int, int]:
    """Validate a (min, opt, max) batch triple.

    Args:
        batch: three positive ints with min <= opt <= max.

    Returns:
        The triple as a tuple of ints.

    Raises:
        EngineBuildError: it is not three ints with 1 <= min <= opt <= max.
    """
    if len(batch) != 3 or not all(isinstance(b, (int, np.integer)) and not isinstance(b, bool) for b in batch):
        raise EngineBuildError(
            got=f"batch {tuple(batch)!r}",
            expected="three integers (min, opt, max)",
            because="a TensorRT optimization profile has exactly a minimum, an optimum and a maximum shape",
            fix="pass batch=(min, opt, max), e.g. (1, 32, 256)",
        )
    lo, opt, hi = (int(b) for b in batch)
    if not 1 <= lo <= opt <= hi:
        raise EngineBuildError(
            got=f"batch (min, opt, max) = ({lo}, {opt}, {hi})",
            expected="1 <= min <= opt <= max",
            because="TensorRT rejects a profile whose shapes are not ordered",
            fix="choose a batch range with 1 <= min <= opt <= max",
        )
    return lo, opt, hi


def derive_profile(
    inputs: Mapping[str, Sequence[int]], batch: Sequence[int], shapes: Mapping[str, Mapping[str, Sequence[int]]] | None = None
) -> dict[str, ProfileShapes]:
    """Derive the optimization profile of every input from its shape, the batch range and the shape profile.

    Axis 0 is the batch. Other dynamic axes (a sequence length) take their range from ``shapes``
    (``--min-shapes`` and friends); without one they are refused. A static axis 0 is kept as it is, and
    is accepted only when the batch range is exactly that size: building "batch 1..256" on a model
    exported with a fixed batch of 1 would otherwise fail deep inside TensorRT, or worse, silently cap the batch.

    Args:
        inputs: input name -> shape as the ONNX parser sees it (-1 for a dynamic dimension).
        batch: (min, opt, max) batch.
        shapes: input name -> {"min", "opt", "max"} full shapes (batch first) of inputs with dynamic
            axes beyond the batch; their batch axis must be the batch range.

    Returns:
        Input name -> its min/opt/max shapes (equal for a fully static input).

    Raises:
        EngineBuildError: the batch range is invalid, a non-batch dimension is dynamic without a shape
            range, a given shape contradicts a static dimension, or the batch range contradicts a static
            batch dimension.
    """
    lo, opt, hi = check_batch_range(batch)
    shapes = shapes or {}
    profile: dict[str, ProfileShapes] = {}
    for name, raw_shape in inputs.items():
        shape = tuple(int(d) for d in raw_shape)
        if not shape:  # a scalar input has no batch axis
            profile[name] = ProfileShapes(shape, shape, shape)
            continue
        if name in shapes:
            given = {k: tuple(int(d) for d in shapes[name][k]) for k in ("min", "opt", "max")}
            bad = [i for i in range(len(shape)) if any(len(g) != len(shape) for g in given.values()) or (shape[i] >= 0 and i > 0 and any(g[i] != shape[i] for g in given.values()))]
            if bad or (given["min"][0], given["opt"][0], given["max"][0]) != (lo, opt, hi):
                raise EngineBuildError(
                    got=f"shapes min {given['min']}, opt {given['opt']}, max {given['max']} for input '{name}' of shape {_fmt_shape(shape)} and batch ({lo}, {opt}, {hi})",
                    expected="shapes of the input's rank that keep its static dimensions, batch first and equal to the batch range",
                    because="TensorRT's profile may vary only the dimensions the ONNX file leaves dynamic",
                    fix="give --min-shapes/--opt-shapes/--max-shapes that keep the model's fixed dimensions",
                )
            profile[name] = ProfileShapes(given["min"], given["opt"], given["max"])
            continue
        dynamic_rest = [i for i, d in enumerate(shape[1:], start=1) if d < 0]
        if dynamic_rest:
            raise EngineBuildError(
                got=f"input '{name}' of shape {_fmt_shape(shape)} with dynamic dimension(s) {dynamic_rest} and no shape range for them",
                expected="only axis 0 (the batch) dynamic, or a min/opt/max shape for the input",
                because="TensorRT's optimization profile needs a range for every dynamic dimension",
                fix=f"give the input's shapes, e.g. --min-shapes {name}:1x8 --opt-shapes {name}:32x64 --max-shapes {name}:256x128 "
                "(batch first), or export with static non-batch dimensions",
            )
        if shape[0] >= 0:
            static = shape[0]
            if (lo, opt, hi) != (static, static, static):
                raise EngineBuildError(
                    got=f"batch (min, opt, max) = ({lo}, {opt}, {hi}) for input '{name}'",
                    expected=f"batch {static} for min, opt and max",
                    because=f"the ONNX file fixes axis 0 of '{name}' to {static} (shape {_fmt_shape(shape)})",
                    fix=f"re-export the model with a dynamic batch axis, or set min = opt = max batch = {static}",
                )
            profile[name] = ProfileShapes(shape, shape, shape)
            continue
        rest = shape[1:]
        profile[name] = ProfileShapes((lo, *rest), (opt, *rest), (hi, *rest))
    return profile


def _fmt_shape(shape: Sequence[int]) -> str:
    return "(" + ", ".join("?" if d < 0 else str(d) for d in shape) + ")"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-") or "unknown"


def timing_cache_key(trt_version: str, gpu_name: str, compute_capability: str) -> str:
    """Key of a timing cache: a cache is only valid for one TensorRT version on one GPU model.

    Args:
        trt_version: ``tensorrt.__version__``.
        gpu_name: the device name, e.g. "NVIDIA H100 80GB HBM3".
        compute_capability: "major.minor", e.g. "9.0".

    Returns:
        A file-name-safe key; a short digest of the raw values keeps names that only differ in
        punctuation apart.
    """
    digest = hashlib.sha256(f"{trt_version}\0{gpu_name}\0{compute_capability}".encode()).hexdigest()[:8]
    return f"trt{_slug(trt_version)}_{_slug(gpu_name)}_sm{compute_capability.replace('.', '')}_{digest}"


def timing_cache_path(cache_dir: Path | str, trt_version: str, gpu_name: str, compute_capability: str) -> Path:
    """Path of the timing-cache file for this TensorRT version and GPU inside ``cache_dir``."""
    return Path(cache_dir) / f"timing-{timing_cache_key(trt_version, gpu_name, compute_capability)}.cache"


def _digest_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def read_cache_bytes(path: Path) -> tuple[bytes, str | None]:
    """Read a timing cache file, never failing.

    TensorRT does not reliably reject a damaged cache (TensorRT-RTX loaded garbage without a word),
    so ``write_cache_bytes`` keeps a SHA-256 beside the file and a mismatch drops the cache here.

    Args:
        path: the cache file (need not exist).

    Returns:
        (content, warning): empty bytes and no warning when there is no file yet; empty bytes and a
        warning when the file cannot be read, is empty, or does not match its checksum.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return b"", None
    except OSError as exc:
        return b"", f"timing cache {path} ignored: cannot read it ({exc}); starting an empty one"
    if not data:
        return b"", f"timing cache {path} ignored: the file is empty; starting an empty one"
    try:
        expected = _digest_path(path).read_text().strip()
    except OSError:
        expected = None  # a cache from elsewhere (e.g. trtexec): TensorRT validates what it can
    if expected is not None and expected != hashlib.sha256(data).hexdigest():
        return b"", f"timing cache {path} ignored: corrupt (checksum mismatch); starting an empty one"
    return data, None


def write_cache_bytes(path: Path, data: bytes) -> None:
    """Write a timing cache and its checksum, each atomically (see ``read_cache_bytes``)."""
    write_bytes_atomic(path, data)
    write_bytes_atomic(_digest_path(path), (hashlib.sha256(data).hexdigest() + "\n").encode())


def max_buffer_bytes(shape: Sequence[int], dtype: str | np.dtype[Any]) -> int:
    """Bytes a buffer needs for a tensor at its largest shape (e.g. the profile's maximum batch).

    Args:
        shape: fully resolved shape (no -1).
        dtype: numpy dtype name or dtype.

    Returns:
        ``prod(shape) * itemsize``.

    Raises:
        ValueError: a dimension is still dynamic.
    """
    from tasks.backends.cuda_buffers import nbytes_for

    return nbytes_for(shape, dtype)


def numpy_dtype_name(trt_dtype_name: str) -> str:
    """Map a TensorRT ``DataType`` name (e.g. "FLOAT") to a numpy dtype name.

    Raises:
        InferenceError: numpy has no such type (bf16, fp8, fp4, int4 at the engine's inputs or outputs).
    """
    try:
        return TRT_TO_NUMPY[trt_dtype_name]
    except KeyError:
        raise InferenceError(
            got=f"an engine input or output of TensorRT type {trt_dtype_name}",
            expected=f"one of {', '.join(TRT_TO_NUMPY)}",
            because="numpy has no such type, so host buffers cannot hold it",
            fix="keep the ONNX graph's inputs and outputs in fp32 or fp16 (cast inside the graph)",
        ) from None


def format_parser_errors(onnx_name: str, errors: Sequence[Mapping[str, Any]]) -> str:
    """One line per ONNX parser error, naming the node and its operator.

    Args:
        onnx_name: the ONNX file name (for the first line).
        errors: dicts with ``desc`` and, when known, ``node`` (index, -1 if none), ``node_name``,
            ``node_operator`` and ``code``.

    Returns:
        A multi-line message.
    """
    lines = [f"TensorRT's ONNX parser rejected {onnx_name} with {len(errors)} error(s):"]
    for err in errors:
        node = int(err.get("node", -1))
        where = []
        if node >= 0:
            where.append(f"node #{node}")
        if err.get("node_name"):
            where.append(f"'{err['node_name']}'")
        if err.get("node_operator"):
            where.append(f"({err['node_operator']})")
        place = " ".join(where) or "graph"
        code = f" [{err['code']}]" if err.get("code") else ""
        lines.append(f"  - {place}: {err.get('desc', '?')}{code}")
    return "\n".join(lines)


def tensor_precision(format_datatype: str) -> str:
    """Precision named by an inspector "Format/Datatype" string.

    Args:
        format_datatype: e.g. "Row major linear FP16 format", "Half", "Thirty-two wide channel
            vectorized row major Int8 format.", "Float".

    Returns:
        "int8", "fp16", "fp32", "bf16", "fp8", "int4", "fp4", "other" (integer/bool tensors) or
        "unknown" (e.g. "N/A due to dynamic shapes").
    """
    text = format_datatype.lower()
    for token, precision in _FORMAT_TOKENS:
        if token in text:
            return precision
    return "unknown"


def layer_precision(layer: Mapping[str, Any] | str) -> str:
    """Precision of one inspector layer: the narrowest float/quantized type among its tensors.

    Returns:
        A value of ``tensor_precision``; "unknown" for a layer reported only by name (the engine was
        not built with detailed profiling verbosity).
    """
    if not isinstance(layer, Mapping):
        return "unknown"
    found = {
        tensor_precision(str(t.get("Format/Datatype", "")))
        for t in [*layer.get("Inputs", []), *layer.get("Outputs", [])]
        if isinstance(t, Mapping)
    }
    for precision in _PRECISION_ORDER:
        if precision in found:
            return precision
    return "other" if "other" in found else "unknown"


#: inspector layer types that do a model's arithmetic: TensorRT's kernel families (CaskConvolution,
#: CaskGemmConvolution, CaskDeconvolution, CaskGemm, MatrixMultiply) and the kernels of fused regions
#: (gemm, correlation)
_COMPUTE_LAYER = re.compile(r"conv|gemm|matrixmultiply|matmul|fullyconnected|correlation|rnn|lstm|attention", re.I)
#: a fused region (Myelin) reported as one layer: it may hold compute, but its inside is not typed
_FUSED_REGION = re.compile(r"myelin|foreignnode", re.I)


def _inspector_layers(report: Mapping[str, Any] | str) -> list[Any]:
    """The "Layers" list of the engine inspector's JSON report (text or parsed).

    Raises:
        ValueError: the report is not JSON or has no "Layers" list.
    """
    data = json.loads(report) if isinstance(report, str) else report
    layers = data.get("Layers") if isinstance(data, Mapping) else None
    if not isinstance(layers, list):
        raise ValueError("engine inspector report has no 'Layers' list")
    return layers


def compute_layers(report: Mapping[str, Any] | str) -> dict[str, int]:
    """Count the engine's compute layers by the precision they run in (the narrowest type of their inputs).

    A fused region reported as one layer (``{ForeignNode[...]}``, Myelin) and a layer reported by
    name only (no detailed profiling verbosity) count as "unknown": their precision is not shown.

    Args:
        report: the inspector's JSON report (text or parsed), as for ``summarize_layers``.

    Returns:
        precision -> compute layers.

    Raises:
        ValueError: the report is not JSON or has no "Layers" list.
    """
    layers = _inspector_layers(report)
    counts: Counter[str] = Counter()
    for layer in layers:
        kind = str(layer.get("LayerType", "")) if isinstance(layer, Mapping) else ""
        name = str(layer.get("Name", "")) if isinstance(layer, Mapping) else str(layer)
        if _FUSED_REGION.search(kind) or _FUSED_REGION.search(name):
            counts["unknown"] += 1
        elif _COMPUTE_LAYER.search(kind or name):
            inputs = {"Inputs": layer.get("Inputs", [])} if isinstance(layer, Mapping) else layer
            precision = layer_precision(inputs)
            counts[precision if precision != "unknown" else layer_precision(layer)] += 1
    return dict(sorted(counts.items()))


def summarize_layers(report: Mapping[str, Any] | str) -> dict[str, Any]:
    """Summarize the engine inspector's JSON layer report.

    Args:
        report: the JSON text of ``get_engine_information(LayerInformationFormat.JSON)`` or its parsed
            form: ``{"Layers": [...], "Bindings": [...]}``.

    Returns:
        ``{"layers": count, "by_precision": {precision: count}, "by_type": {LayerType: count},
        "compute": {precision: count}}`` (``compute``: the compute layers only, see ``compute_layers``).

    Raises:
        ValueError: the report is not JSON or has no "Layers" list.
    """
    data = json.loads(report) if isinstance(report, str) else report
    layers = _inspector_layers(data)
    by_precision = Counter(layer_precision(layer) for layer in layers)
    by_type = Counter(
        str(layer.get("LayerType", "?")) if isinstance(layer, Mapping) else "?" for layer in layers
    )
    return {
        "layers": len(layers),
        "by_precision": dict(sorted(by_precision.items())),
        "by_type": dict(sorted(by_type.items())),
        "compute": compute_layers(data),
    }


def engine_io(engine: Any, input_mode: Any) -> list[dict[str, Any]]:
    """Every IO tensor of a deserialized engine as the plan itself says: what Triton's config is made from.

    Args:
        engine: a ``tensorrt.ICudaEngine`` (or anything with its tensor API).
        input_mode: ``tensorrt.TensorIOMode.INPUT``.

    Returns:
        One ``{"name", "mode": "input"|"output", "dtype": DataType name, "shape": [...]}`` per tensor
        (-1 for a dynamic dimension); a dynamic input also has ``"profile": {"min", "opt", "max"}``,
        its shapes in optimization profile 0.
    """
    out: list[dict[str, Any]] = []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        shape = dims_tuple(engine.get_tensor_shape(name))
        entry: dict[str, Any] = {
            "name": name,
            "mode": "input" if engine.get_tensor_mode(name) == input_mode else "output",
            "dtype": engine.get_tensor_dtype(name).name,
            "shape": list(shape),
        }
        if entry["mode"] == "input" and any(d < 0 for d in shape):
            lo, opt, hi = (dims_tuple(d) for d in engine.get_tensor_profile_shape(name, 0))
            entry["profile"] = ProfileShapes(lo, opt, hi).to_json()
        out.append(entry)
    return out


def check_feed(name: str, shape: Sequence[int], profile: ProfileShapes) -> None:
    """Check one input array's shape against the engine's profile.

    Raises:
        InferenceError: wrong rank, a dimension outside [profile min, profile max] (a fixed one that
            differs, a sequence longer than the profile's), or the batch outside its range.
    """
    shape = tuple(int(d) for d in shape)
    if len(shape) != len(profile.max) or any(not profile.min[i] <= shape[i] <= profile.max[i] for i in range(1, len(shape))):
        expected = ("N", *(str(a) if a == b else f"{a}..{b}" for a, b in zip(profile.min[1:], profile.max[1:]))) if profile.max else ()
        raise InferenceError(
            got=f"input '{name}' of shape {shape}",
            expected=f"shape ({', '.join(str(d) for d in expected)})",
            because="the engine was built for that shape (its optimization profile)",
            fix="feed arrays of the shape the model was exported with, lengths inside the profile (rebuild with wider --min-shapes/--max-shapes)",
        )
    if shape and not profile.min[0] <= shape[0] <= profile.max[0]:
        raise InferenceError(
            got=f"batch {shape[0]} for input '{name}'",
            expected=f"a batch in [{profile.min[0]}, {profile.max[0]}]",
            because="the engine's optimization profile covers only that range",
            fix="split the input into smaller batches or rebuild with a larger --max-batch",
        )


def stderr_tail(text: str, lines: int = 25, chars: int = 4000) -> str:
    """Last lines of a child process's output, for error messages."""
    tail = "\n".join(text.strip().splitlines()[-lines:])
    return tail[-chars:] if tail else "(no output)"


# --------------------------------------------------------------------------------------------------
# Builder
# --------------------------------------------------------------------------------------------------


def require_real_tensorrt(module: object) -> None:
    """Tell a real TensorRT install from the stub-only namespace package.

    tensorrt-stubs (installed for pyright) leaves a 'tensorrt' folder of .pyi files, which imports
    as an empty namespace package.

    Raises:
        ImportError: ``module`` has no ``Builder``.
    """
    if not hasattr(module, "Builder"):
        raise ImportError("only type stubs of 'tensorrt' are installed (no 'tensorrt.Builder')")


class TensorRTBuilder(EngineBuilder):
    """Builds TensorRT engines from fp32, fp16 or Q/DQ int8 ONNX files (strongly typed networks).

    Options (all optional):
        ``workspace_mib`` (int, default 1024): builder workspace memory pool limit.
        ``tf32`` (bool, default True): False clears ``BuilderFlag.TF32`` (fp32 layers stay exact fp32).
        ``timing_cache_dir`` (path): folder of the timing caches; none: no persistent cache.
        ``build_timeout_s`` (int, default 3600): the build worker is killed after this.
        ``builder_optimization_level`` (int 0-5): TensorRT's default (3) when absent.
    Other keys are ignored, so one options mapping can serve every backend.
    """

    name = "tensorrt"

    def availability(self) -> str | None:
        try:
            import tensorrt as trt

            require_real_tensorrt(trt)
        except Exception as exc:  # a broken install raises OSError/RuntimeError from its loader too
            return f"the tensorrt Python package cannot be imported ({exc}); do: {INSTALL_HINT}"
        try:
            import pycuda.driver as cuda  # pyright: ignore[reportMissingImports]
        except Exception as exc:
            return f"pycuda cannot be imported ({exc}); do: {INSTALL_HINT} on a machine with the CUDA toolkit"
        try:
            cuda.init()
            count = int(cuda.Device.count())
        except Exception as exc:
            return f"the CUDA driver cannot be initialized ({exc}); an NVIDIA GPU and its driver are needed"
        if count == 0:
            return "no NVIDIA GPU is visible (check CUDA_VISIBLE_DEVICES and the driver)"
        return None

    def environment(self) -> dict[str, str]:
        why_not = self.availability()
        if why_not is not None:
            raise BackendUnavailableError(
                got="a request for the TensorRT environment",
                expected="TensorRT, pycuda and a GPU",
                because=why_not,
                fix="install what is missing, or use the onnxruntime backend",
            )
        import pycuda  # pyright: ignore[reportMissingImports]
        import pycuda.driver as cuda  # pyright: ignore[reportMissingImports]
        import tensorrt as trt

        dev = cuda.Device(0)  # TensorRT and the runner both use device 0 of CUDA_VISIBLE_DEVICES
        major, minor = dev.compute_capability()
        driver = int(cuda.get_driver_version())
        return {
            "tensorrt": trt.__version__,
            "pycuda": str(pycuda.VERSION_TEXT),
            "cuda_driver": f"{driver // 1000}.{driver % 1000 // 10}",
            "gpu": str(dev.name()),
            "compute_capability": f"{major}.{minor}",
        }

    def engine_from_onnx(
        self, onnx_path: Path, out_dir: Path, batch: tuple[int, int, int], options: Mapping[str, Any],
        shapes: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> BuildResult:
        batch = check_batch_range(batch)
        opts = _build_options(options)
        env = self.environment()
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        cache_file = None
        if opts["timing_cache_dir"]:
            cache_file = str(
                timing_cache_path(opts["timing_cache_dir"], env["tensorrt"], env["gpu"], env["compute_capability"])
            )
        with tempfile.TemporaryDirectory(prefix="trtflow-trt-build-") as tmp:
            spec = {
                "onnx_path": str(Path(onnx_path).resolve()),
                "out_dir": str(out_dir.resolve()),
                "engine_file": ENGINE_FILE,
                "layers_file": LAYERS_FILE,
                "batch": list(batch),
                "shapes": {k: {lvl: list(v[lvl]) for lvl in ("min", "opt", "max")} for k, v in (shapes or {}).items()},
                "workspace_mib": opts["workspace_mib"],
                "tf32": opts["tf32"],
                "builder_optimization_level": opts["builder_optimization_level"],
                "timing_cache_file": cache_file,
                "result_file": str(Path(tmp) / "result.json"),
            }
            spec_file = Path(tmp) / "spec.json"
            spec_file.write_text(json.dumps(spec))
            result = run_build_worker(spec_file, Path(spec["result_file"]), opts["build_timeout_s"])
        for warning in result.get("warnings", []):
            log.warning("%s", warning)
        info = dict(result["info"])
        info.update(
            {
                "backend": self.name,
                "environment": env,
                "batch": {"min": batch[0], "opt": batch[1], "max": batch[2]},
                "warnings": result.get("warnings", []),
            }
        )
        return BuildResult(engine_file=ENGINE_FILE, info=info)

    def runner_from_engine(self, engine_path: Path, info: EngineInfo) -> BaseRunner:
        # Everything the runner needs (tensor names, dtypes, profile) is read from the engine itself.
        return TensorRTRunner(engine_path)


def _build_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """Validate and default the builder's options (see ``TensorRTBuilder``)."""

    def bad(key: str, expected: str) -> EngineBuildError:
        return EngineBuildError(
            got=f"option {key}={options[key]!r}",
            expected=expected,
            because="the TensorRT builder config takes it as such",
            fix=f"pass a valid {key} or leave it out for the default",
        )

    workspace = options.get("workspace_mib", DEFAULT_WORKSPACE_MIB)
    if not isinstance(workspace, int) or isinstance(workspace, bool) or workspace <= 0:
        raise bad("workspace_mib", "a positive integer (MiB)")
    tf32 = options.get("tf32", True)
    if not isinstance(tf32, bool):
        raise bad("tf32", "true or false")
    timeout = options.get("build_timeout_s", DEFAULT_BUILD_TIMEOUT_S)
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or timeout <= 0:
        raise bad("build_timeout_s", "a positive number of seconds")
    level = options.get("builder_optimization_level")
    if level is not None and (not isinstance(level, int) or isinstance(level, bool) or not 0 <= level <= 5):
        raise bad("builder_optimization_level", "an integer from 0 to 5")
    cache_dir = options.get("timing_cache_dir")
    return {
        "workspace_mib": workspace,
        "tf32": tf32,
        "build_timeout_s": timeout,
        "builder_optimization_level": level,
        "timing_cache_dir": str(cache_dir) if cache_dir else None,
    }


def run_build_worker(
    spec_file: Path, result_file: Path, timeout_s: float, module: str = "tasks.backends._trt_build"
) -> dict[str, Any]:
    """Run the build worker in a child Python process and return its result.

    Args:
        spec_file: JSON spec written by ``engine_from_onnx``.
        result_file: where the worker writes its JSON result.
        timeout_s: the child is killed after this many seconds.
        module: the worker module run with ``python -m`` (tests substitute a fake one).

    Returns:
        The worker's result: ``{"ok": True, "info": {...}, "warnings": [...]}``.

    Raises:
        EngineBuildError: the worker reported a build error (re-raised with its own message), crashed,
            was killed (e.g. out of memory), or timed out; the message holds the tail of its output.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_PACKAGE_ROOT), env.get("PYTHONPATH", "")) if p)
    env.setdefault("PYTHONUNBUFFERED", "1")
    cmd = [sys.executable, "-m", module, str(spec_file)]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired as exc:
        out = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        raise EngineBuildError(
            got=f"a TensorRT build still running after {timeout_s:g} s (killed)",
            expected="a build that finishes in time",
            because=f"the builder is slow on this model or stuck; last output:\n{stderr_tail(out)}",
            fix="raise the build_timeout_s option, or lower builder_optimization_level",
        ) from exc
    for line in proc.stderr.splitlines():
        log.debug("trt build: %s", line)
    result: dict[str, Any] | None = None
    try:
        result = json.loads(result_file.read_text())
    except (OSError, ValueError):
        result = None
    if proc.returncode == WORKER_EXIT_BUILD_ERROR and result and "error" in result:
        raise EngineBuildError(**result["error"])
    if proc.returncode != 0 or not result or not result.get("ok"):
        how = f"exit status {proc.returncode}"
        if proc.returncode < 0:
            import signal

            try:
                how = f"signal {signal.Signals(-proc.returncode).name}"
            except ValueError:
                how = f"signal {-proc.returncode}"
        raise EngineBuildError(
            got=f"the TensorRT build process ended with {how}",
            expected="a built engine",
            because=f"TensorRT failed or crashed (a kill often means out of host or GPU memory); "
            f"its output ends with:\n{stderr_tail(proc.stderr + proc.stdout)}",
            fix="read the output above; lower workspace_mib or the max batch if memory ran out",
        )
    return result


# --------------------------------------------------------------------------------------------------
# Runner
# --------------------------------------------------------------------------------------------------

_LOGGER: Any = None


def trt_logger() -> trt.ILogger:
    """One TensorRT logger per process: TensorRT keeps a pointer to it, so it must outlive every runtime."""
    import tensorrt as trt

    global _LOGGER
    if _LOGGER is None:
        _LOGGER = trt.Logger(trt.Logger.WARNING)
    return _LOGGER


def dims_tuple(dims: trt.Dims | Sequence[int]) -> tuple[int, ...]:
    """A TensorRT ``Dims`` (or any sequence of ints) as a tuple of ints."""
    return tuple(int(dims[i]) for i in range(len(dims)))


class TensorRTRunner(BaseRunner):
    """Runs a serialized TensorRT engine with pycuda buffers on the primary CUDA context.

    ``activate`` deserializes the engine, creates one execution context, one stream, and pinned host
    plus device buffers sized for the profile's maximum batch; ``infer`` reuses them for any batch
    inside the profile; ``deactivate`` frees them explicitly.
    """

    def __init__(self, engine_path: Path) -> None:
        super().__init__(f"tensorrt:{Path(engine_path).name}")
        self.engine_path = Path(engine_path)
        self._runtime: trt.Runtime | None = None
        self._engine: trt.ICudaEngine | None = None
        self._context: trt.IExecutionContext | None = None
        self._stream: Stream | None = None
        self._buffers: dict[str, HostDeviceBuffer] = {}
        self._profiles: dict[str, ProfileShapes] = {}
        self._outputs: list[str] = []
        self._in_specs: list[TensorSpec] = []
        self._out_specs: list[TensorSpec] = []

    @property
    def batch_range(self) -> tuple[int, int]:
        """(min, max) batch the engine accepts (valid once active)."""
        first = next(iter(self._profiles.values()), None)
        if first is None or not first.max:
            return (1, 1)
        return first.min[0], first.max[0]

    def batch_limits(self) -> tuple[int, int] | None:
        return self.batch_range if self._profiles else None

    def shape_limits(self) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
        return {name: (p.min, p.max) for name, p in self._profiles.items() if p.min[1:] != p.max[1:]}

    def activate_impl(self) -> None:
        import tensorrt as trt

        from tasks.backends import cuda_buffers

        require_real_tensorrt(trt)
        with cuda_buffers.context_current():
            try:
                self._activate()
            except BaseException:
                self._release()
                raise

    def _activate(self) -> None:
        import tensorrt as trt

        from tasks.backends import cuda_buffers

        self._runtime = runtime = trt.Runtime(trt_logger())
        engine = runtime.deserialize_cuda_engine(self.engine_path.read_bytes())
        if engine is None:
            raise InferenceError(
                got=f"an engine file TensorRT {trt.__version__} cannot load ({self.engine_path})",
                expected="an engine built by this TensorRT version on this GPU model",
                because="engines are not portable across TensorRT versions or GPUs (TensorRT's log says more)",
                fix="rebuild the engine here: run the same command with --refresh build (the engine cache key includes the TensorRT version and GPU)",
            )
        self._engine = engine
        context = engine.create_execution_context()
        if context is None:
            raise InferenceError(
                got="no execution context",
                expected="an execution context for the engine",
                because="TensorRT could not allocate its activation memory (likely out of GPU memory)",
                fix="free GPU memory or rebuild with a smaller max batch",
            )
        self._context = context
        max_shapes: dict[str, tuple[int, ...]] = {}
        dtypes: dict[str, str] = {}
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            dtypes[name] = numpy_dtype_name(engine.get_tensor_dtype(name).name)
            shape = dims_tuple(engine.get_tensor_shape(name))
            spec = TensorSpec(name, dtypes[name], shape)
            if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                if any(d < 0 for d in shape):
                    lo, opt, hi = (dims_tuple(d) for d in engine.get_tensor_profile_shape(name, 0))
                    self._profiles[name] = ProfileShapes(lo, opt, hi)
                else:
                    self._profiles[name] = ProfileShapes(shape, shape, shape)
                max_shapes[name] = self._profiles[name].max
                context.set_input_shape(name, max_shapes[name])
                self._in_specs.append(spec)
            else:
                self._outputs.append(name)
                self._out_specs.append(spec)
        for name in self._outputs:
            # With every input at its maximum, TensorRT resolves each output's largest shape.
            max_shapes[name] = dims_tuple(context.get_tensor_shape(name))
            if any(d < 0 for d in max_shapes[name]):
                raise InferenceError(
                    got=f"output '{name}' of data-dependent shape {max_shapes[name]}",
                    expected="outputs whose shape follows from the input shapes",
                    because="buffers are allocated once, for the profile's maximum",
                    fix="use a model without data-dependent output shapes (e.g. NonZero)",
                )
        self._stream = cuda_buffers.Stream()
        for name, shape in max_shapes.items():
            buf = cuda_buffers.HostDeviceBuffer(shape, dtypes[name])
            self._buffers[name] = buf
            # Buffers never move, so addresses are bound once here rather than on every call.
            if not context.set_tensor_address(name, buf.device_ptr):
                raise InferenceError(
                    got=f"TensorRT refused the address of tensor '{name}'",
                    expected="a bound device buffer",
                    because="set_tensor_address returned False (TensorRT's log says why)",
                    fix="report this with the TensorRT log",
                )

    #: device time between CUDA events on the runner's stream, upload to download included
    timer = "cuda_events"

    def _checked(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        arrays = {name: np.asarray(arr) for name, arr in feed.items()}
        for name, arr in arrays.items():
            check_feed(name, arr.shape, self._profiles[name])
        return arrays

    def _enqueue(self, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Queue upload, execution and download on the stream (context current); return pinned views."""
        context, stream = self._context, self._stream
        assert context is not None and stream is not None
        for name, arr in arrays.items():
            if not context.set_input_shape(name, arr.shape):
                raise InferenceError(
                    got=f"shape {arr.shape} for input '{name}'",
                    expected="a shape inside the engine's profile",
                    because="TensorRT refused it (its log says why)",
                    fix="feed a batch inside the profile's range",
                )
            try:
                self._buffers[name].upload(arr, stream)
            except TypeError as exc:
                raise InferenceError(
                    got=f"input '{name}' of dtype {arr.dtype}",
                    expected=f"dtype {self._buffers[name].dtype} (or one that casts to it within its kind)",
                    because="the engine's input has that type",
                    fix=f"feed {self._buffers[name].dtype} arrays",
                ) from exc
        if not context.execute_async_v3(stream.handle):
            raise InferenceError(
                got="execute_async_v3 returned False",
                expected="a successful enqueue",
                because="TensorRT could not run the engine (its log says why)",
                fix="check the TensorRT log; rebuild the engine if it is stale",
            )
        return {
            name: self._buffers[name].download(dims_tuple(context.get_tensor_shape(name)), stream)
            for name in self._outputs
        }

    def infer_impl(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        from tasks.backends import cuda_buffers

        arrays = self._checked(feed)
        assert self._stream is not None
        with cuda_buffers.context_current():
            views = self._enqueue(arrays)
            self._stream.synchronize()
        # The pinned buffers are reused by the next call: hand out copies of the valid slice.
        return {name: view.copy() for name, view in views.items()}

    def time_infer(self, feed: Mapping[str, np.ndarray], iterations: int) -> list[float]:
        """Time ``iterations`` runs with CUDA events around upload, execution and download.

        The events bracket everything one ``infer`` puts on the stream, the host's copy into the pinned
        buffer included (the stream waits for it), so the figure compares with the wall-clock timing
        of the CPU backends; only the final copy out of the pinned buffer is left out.
        """
        from tasks.backends import cuda_buffers

        if not self.is_active:
            return super().time_infer(feed, iterations)  # raises the inactive-runner error
        arrays = self._checked(feed)
        stream = self._stream
        assert stream is not None
        drv = cuda_buffers._driver()
        times: list[float] = []
        with cuda_buffers.context_current():
            start, end = drv.Event(), drv.Event()
            for _ in range(iterations):
                start.record(stream.pycuda_stream)
                self._enqueue(arrays)
                end.record(stream.pycuda_stream)
                end.synchronize()
                times.append(float(start.time_till(end)))
            # Events are destroyed when collected: drop them while their context is still current.
            del start, end
        return times

    def deactivate_impl(self) -> None:
        from tasks.backends import cuda_buffers

        with cuda_buffers.context_current():
            self._release()

    def _release(self) -> None:
        """Free in dependency order: finish queued work, then context, engine, runtime, buffers."""
        if self._stream is not None:
            self._stream.synchronize()
        # Dropping the last reference destroys a TensorRT object at once (no garbage-collector delay).
        self._context = None
        self._engine = None
        self._runtime = None
        for buf in self._buffers.values():
            buf.free()
        self._buffers = {}
        if self._stream is not None:
            self._stream.release()
            self._stream = None
        self._profiles, self._outputs = {}, []
        self._in_specs, self._out_specs = [], []

    def input_specs(self) -> list[TensorSpec]:
        return list(self._in_specs)

    def output_specs(self) -> list[TensorSpec]:
        return list(self._out_specs)


def profile_to_json(profile: Mapping[str, ProfileShapes]) -> dict[str, dict[str, list[int]]]:
    """JSON form of a profile, for ``BuildResult.info``."""
    return {name: shapes.to_json() for name, shapes in profile.items()}



#: TensorRT on an NVIDIA GPU: what ``auto`` picks first where TensorRT, pycuda and a GPU are present
BACKEND = BackendSpec(
    name=TensorRTBuilder.name,
    builder=TensorRTBuilder,
    device="gpu",
    # A strongly typed network computes each tensor in the type the ONNX file gives it.
    native_precisions=frozenset({"fp32", "fp16", "bf16", "int8"}),
    engine_file=ENGINE_FILE,
    engine_format="TensorRT plan (serialized engine)",
    timing_cache=True,
    label="TensorRT",
    auto=0,
    present="TensorRT, pycuda and a GPU are present",
    version_key="tensorrt",
    portable_keys=("tensorrt", "gpu", "compute_capability"),
    triton_platform="tensorrt_plan",
)
