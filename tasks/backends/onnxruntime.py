"""ONNX Runtime backend: the engine that runs everywhere (CPU), and in CI.

"Building" an ONNX Runtime engine means running its offline graph optimizer once and saving the
result, so each session later loads an already-fused graph, mirroring TensorRT's build/run split.

The execution providers are a parameter (``EngineOptions.providers``, default the CPU provider) that
reaches every session of the build and of the runner. This module's ``BACKEND`` declares the CPU
backend; one on another device is one more spec with its own builder name, e.g.::

    class OnnxRuntimeCudaBuilder(OnnxRuntimeBuilder):
        name = "onnxruntime-cuda"
    register_backend(BackendSpec(
        name="onnxruntime-cuda", builder=OnnxRuntimeCudaBuilder, device="gpu",
        native_precisions=frozenset({"fp32", "fp16", "int8"}), engine_file=ENGINE_FILE,
        engine_format="ONNX (optimized by ONNX Runtime)", label="ONNX Runtime (CUDA)", version_key="onnxruntime",
    ))  # with engine.providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] in the config
"""

from __future__ import annotations

import os
import platform
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tasks.backends.base import BackendSpec, BaseRunner, BuildResult, EngineBuilder, EngineInfo, TensorSpec, engine_unloadable
from tasks.errors import EngineBuildError, InferenceError, TrtflowError
from tasks.precisions import precision_spec

ENGINE_FILE = "engine.onnx"
#: the providers of a session when none are asked for
CPU_PROVIDERS = ("CPUExecutionProvider",)
_ORT_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64", "tensor(int32)": "int32"}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> frozenset[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


#: x86 instructions that give ONNX Runtime's int8 kernels an exact int32 dot product
_VNNI = frozenset({"avx512_vnni", "avx_vnni", "amx_int8", "avx_vnni_int8"})


def int8_kernels_saturate(flags: frozenset[str] | None = None) -> bool:
    """True on an x86 CPU with AVX2 but no VNNI, where ONNX Runtime's int8 kernels lose accuracy.

    There MLAS multiplies u8 by s8 with VPMADDUBSW, whose int16 pair sums saturate (ONNX Runtime's
    quantization docs; measured here: the digits CNN's int8 variant agreed on 95% of top-1 with fused
    int8 kernels and on 100% with its Q/DQ nodes run in fp32). TensorRT accumulates int8 in int32,
    so the faithful CPU check of a Q/DQ variant on such a CPU runs its Q/DQ nodes in fp32.
    """
    flags = _cpu_flags() if flags is None else flags
    return platform.machine().lower() in ("x86_64", "amd64") and "avx2" in flags and not flags & _VNNI


def has_qdq(model: Path | Any) -> bool:
    """True when an ONNX file (or a loaded ModelProto) holds QuantizeLinear nodes (an int8 variant)."""
    import onnx

    proto = onnx.load(str(model), load_external_data=False) if isinstance(model, (str, Path)) else model
    return any(n.op_type == "QuantizeLinear" for n in proto.graph.node)


#: ``graph_optimization`` of an engine whose Q/DQ nodes must not be fused into int8 kernels
QDQ_IN_FP32 = "basic: Q/DQ run in fp32 (this CPU's int8 kernels saturate without VNNI)"


def session_options(threads: int | None, optimize: bool, fuse_int8: bool = True):
    """Return ORT session options with a fixed thread count (results and timings depend on it).

    Args:
        threads: intra-op threads (None: ONNX Runtime's default).
        optimize: apply graph optimizations at load.
        fuse_int8: allow Q/DQ fusion into int8 kernels (False keeps them as fp32 arithmetic).
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    level = ort.GraphOptimizationLevel
    so.graph_optimization_level = (
        (level.ORT_ENABLE_ALL if fuse_int8 else level.ORT_ENABLE_BASIC) if optimize else level.ORT_DISABLE_ALL
    )
    so.log_severity_level = 3
    return so


def checked_providers(providers: Sequence[str] | None, error: type[TrtflowError] = EngineBuildError) -> list[str]:
    """The execution providers a session is given: ``providers``, each one present in this onnxruntime.

    Args:
        providers: in order of preference; None or empty: the CPU provider.
        error: what a missing provider raises (a runner's is an ``InferenceError``).

    Raises:
        EngineBuildError: a provider this onnxruntime does not have (ONNX Runtime itself would only
            warn and run on the CPU provider: the engine would be verified and timed as what it is not).
    """
    import onnxruntime as ort

    wanted = list(providers or CPU_PROVIDERS)
    available = ort.get_available_providers()
    missing = [p for p in wanted if p not in available]
    if missing:
        raise error(
            got=f"execution providers {wanted}",
            expected=f"providers this onnxruntime {ort.__version__} has: {available}",
            because=f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not built into the installed onnxruntime package",
            fix="install the onnxruntime package that has it (onnxruntime-gpu for CUDAExecutionProvider), or leave engine.providers at its default",
        )
    return wanted


def _specs(nodes: Sequence[Any]) -> list[TensorSpec]:
    return [
        TensorSpec(n.name, _ORT_DTYPES.get(n.type) or str(n.type), tuple(d if isinstance(d, int) else -1 for d in n.shape))
        for n in nodes
    ]


def _build_result(backend: str, sess: Any, batch: tuple[int, int, int], shapes: Mapping[str, Mapping[str, Any]] | None,
                  graph_optimization: str, **extra: Any) -> BuildResult:
    """What a build records of its session: providers, inputs and outputs, the profile, how the graph was optimized."""
    return BuildResult(
        engine_file=ENGINE_FILE,
        info={
            "backend": backend,
            "providers": sess.get_providers(),
            "inputs": [s.__dict__ for s in _specs(sess.get_inputs())],
            "outputs": [s.__dict__ for s in _specs(sess.get_outputs())],
            "batch": {"min": batch[0], "opt": batch[1], "max": batch[2]},
            # ONNX Runtime runs any length; the runner holds feeds to the profile, as TensorRT does.
            "shapes": {k: {lvl: list(v[lvl]) for lvl in ("min", "opt", "max")} for k, v in (shapes or {}).items()},
            "graph_optimization": graph_optimization,
            **extra,
        },
    )


class OnnxRuntimeBuilder(EngineBuilder):
    """Optimizes an ONNX file with ONNX Runtime's portable (extended) graph optimizations."""

    name = "onnxruntime"

    def availability(self) -> str | None:
        import importlib.util

        # Found, not imported: a cached run never loads ONNX Runtime (~0.5 s); a broken install fails
        # at its first build or run with ONNX Runtime's own error.
        if importlib.util.find_spec("onnxruntime") is None:
            return "onnxruntime is not installed; do: pip install onnxruntime"
        return None

    def environment(self) -> dict[str, str]:
        from importlib.metadata import version

        return {
            "onnxruntime": version("onnxruntime"), "cpu": _cpu_name(), "machine": platform.machine(),
            "int8_kernels": "saturating (no VNNI): Q/DQ run in fp32" if int8_kernels_saturate() else "exact",
        }

    def engine_from_onnx(
        self, onnx_path: Path, out_dir: Path, batch: tuple[int, int, int], options: Mapping[str, Any],
        shapes: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> BuildResult:
        import onnxruntime as ort

        precision = options.get("precision")
        if precision is not None and not precision_spec(precision).cpu_kernels:
            return self._emulation_engine(onnx_path, out_dir, batch, shapes, precision)
        fuse_int8 = not (int8_kernels_saturate() and has_qdq(onnx_path))
        so = session_options(options.get("threads"), optimize=True, fuse_int8=fuse_int8)
        # EXTENDED fusions are valid on any CPU; layout (NCHWc) ones are applied again at load time.
        if fuse_int8:
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = str(out_dir / ENGINE_FILE)
        providers = checked_providers(options.get("providers"))
        try:
            sess = ort.InferenceSession(str(onnx_path), so, providers=providers)
        except Exception as exc:  # ORT raises its own untyped errors
            raise EngineBuildError(
                got=f"ONNX Runtime error: {exc}",
                expected="a model ONNX Runtime can load",
                because=f"{onnx_path.name} uses something this onnxruntime does not support",
                fix="check the opset and operators (the validate stage reports them), or upgrade onnxruntime",
            ) from exc
        return _build_result(self.name, sess, batch, shapes, "extended (saved) + all (at load)" if fuse_int8 else QDQ_IN_FP32)

    def _emulation_engine(
        self, onnx_path: Path, out_dir: Path, batch: tuple[int, int, int], shapes: Mapping[str, Mapping[str, Any]] | None, precision: str,
    ) -> BuildResult:
        """The engine of a precision this CPU has no kernels for: the variant's rounding emulation graph.

        It computes in fp32 and rounds every reduced tensor as the variant's own kernels would hold it
        (``tasks.emulation``); saved unoptimized and run without graph optimizations, so no optimizer
        removes the rounding.
        """
        import onnx
        import onnxruntime as ort

        from tasks.emulation import emulation_of

        rounding = precision_spec(precision).emulation
        if rounding is None:
            raise EngineBuildError(
                got=f"a {precision} variant", expected="a precision ONNX Runtime's CPU provider runs, or one with a rounding emulation",
                because=f"this CPU has no {precision} kernels and the precision declares no emulation",
                fix=f"build {precision} with --backend tensorrt on a GPU machine",
            )
        try:
            emulated, emulation = emulation_of(onnx.load(str(onnx_path)), rounding.elem_type)
            onnx.save(emulated, str(out_dir / ENGINE_FILE))
            sess = ort.InferenceSession(str(out_dir / ENGINE_FILE), session_options(1, optimize=False), providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT and onnx raise their own untyped errors
            raise EngineBuildError(
                got=f"{type(exc).__name__}: {str(exc)[:400]}", expected=f"a {precision} variant whose emulation graph ONNX Runtime loads",
                because=f"this CPU has no {precision} kernels, so the engine is the variant's {precision} rounding emulation",
                fix="check the opset and operators (the validate stage reports them), or upgrade onnxruntime",
            ) from exc
        return _build_result(
            self.name, sess, batch, shapes, "none: the rounding emulation of the variant (fp32 arithmetic, reduced tensors rounded)",
            emulation={"precision": precision, "label": rounding.label, **emulation.to_dict()},
        )

    def runner_from_engine(self, engine_path: Path, info: EngineInfo) -> BaseRunner:
        # An emulation engine keeps its rounding casts only without graph optimizations.
        optimize = not (info.model_extra or {}).get("emulation")
        return OnnxRuntimeRunner(
            engine_path, threads=info.threads, optimize=optimize, min_batch=info.batch.min, max_batch=info.batch.max, shapes=info.shapes,
            providers=info.options.get("providers"),
        )


class OnnxRuntimeRunner(BaseRunner):
    """Runs an ONNX file with ONNX Runtime (the CPU provider unless ``providers`` says otherwise)."""

    def __init__(
        self,
        onnx_path: Path,
        threads: int | None = None,
        optimize: bool = True,
        min_batch: int | None = None,
        max_batch: int | None = None,
        shapes: Mapping[str, Mapping[str, Any]] | None = None,
        fuse_int8: bool | None = None,
        providers: Sequence[str] | None = None,
    ) -> None:
        super().__init__(f"onnxruntime:{Path(onnx_path).name}")
        #: execution providers of the session, in order of preference (None: the CPU provider)
        self.providers = list(providers) if providers else None
        # None: fuse Q/DQ into int8 kernels unless this CPU's int8 kernels saturate (int8_kernels_saturate)
        self.fuse_int8 = fuse_int8
        self.onnx_path = Path(onnx_path)
        self.threads = threads or min(os.cpu_count() or 1, 8)
        self.optimize = optimize
        self.min_batch, self.max_batch = min_batch, max_batch
        self.shapes = {k: (tuple(v["min"]), tuple(v["max"])) for k, v in (shapes or {}).items()}
        self._sess: Any = None

    def activate_impl(self) -> None:
        import onnxruntime as ort
        import onnxruntime.capi.onnxruntime_pybind11_state as state

        from google.protobuf.message import DecodeError

        try:
            # _fuse_int8 may read the file too (onnx.load): a damaged one fails there first.
            options = session_options(self.threads, self.optimize, self._fuse_int8())
            providers = checked_providers(self.providers, InferenceError)
            self._sess = ort.InferenceSession(str(self.onnx_path), options, providers=providers)
        except (state.Fail, state.InvalidProtobuf, state.InvalidGraph, state.NoSuchFile, DecodeError) as exc:
            raise engine_unloadable(self.name, exc) from exc

    def _fuse_int8(self) -> bool:
        if self.fuse_int8 is not None:
            return self.fuse_int8
        return not (int8_kernels_saturate() and has_qdq(self.onnx_path))

    def batch_limits(self) -> tuple[int, int] | None:
        if self.min_batch is None and self.max_batch is None:
            return None
        return self.min_batch or 1, self.max_batch or (1 << 62)

    def shape_limits(self) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
        return dict(self.shapes)

    def infer_impl(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = [o.name for o in self._sess.get_outputs()]
        outs = self._sess.run(names, {k: np.ascontiguousarray(v) for k, v in feed.items()})
        return dict(zip(names, outs, strict=True))

    def deactivate_impl(self) -> None:
        self._sess = None

    def input_specs(self) -> list[TensorSpec]:
        return _specs(self._sess.get_inputs())

    def output_specs(self) -> list[TensorSpec]:
        return _specs(self._sess.get_outputs())


#: ONNX Runtime on the CPU: the backend that runs everywhere, and ``auto``'s fallback
BACKEND = BackendSpec(
    name=OnnxRuntimeBuilder.name,
    builder=OnnxRuntimeBuilder,
    device="cpu",
    # The CPU provider casts fp16 weights back to fp32 and computes in fp32 (facts: ORT CPU fp16).
    native_precisions=frozenset({"fp32", "int8"}),
    engine_file=ENGINE_FILE,
    engine_format="ONNX (optimized by ONNX Runtime)",
    label="ONNX Runtime",
    auto=100,
    present="onnxruntime is installed",
    version_key="onnxruntime",
    triton_platform="onnxruntime_onnx",
)
