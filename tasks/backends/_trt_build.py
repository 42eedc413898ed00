"""TensorRT build worker: ``python -m tasks.backends._trt_build SPEC.json``.

Runs in a child process of the flow (see ``tasks.backends.tensorrt.run_build_worker``) so that
TensorRT's CUDA state, memory and any crash stay out of the calling process. It parses one
precision's ONNX file into a strongly typed network, builds and writes the engine, updates the
timing cache, and writes the layer report; then it writes a JSON result file:
``{"ok": true, "info": {...}, "warnings": [...]}`` on success, or
``{"ok": false, "error": {got, expected, because, fix}}`` with exit status 3 on a build error.
Anything else (a crash, a kill) shows as another exit status and is reported by the parent.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import tensorrt as trt

from tasks.backends.tensorrt import (
    WORKER_EXIT_BUILD_ERROR,
    ProfileShapes,
    derive_profile,
    dims_tuple,
    engine_io,
    format_parser_errors,
    profile_to_json,
    read_cache_bytes,
    summarize_layers,
    write_bytes_atomic,
    write_cache_bytes,
)
from tasks.errors import EngineBuildError

_SHOWN = {trt.ILogger.INTERNAL_ERROR, trt.ILogger.ERROR, trt.ILogger.WARNING}
_ERRORS = {trt.ILogger.INTERNAL_ERROR, trt.ILogger.ERROR}


class _Logger(trt.ILogger):
    """Prints warnings and errors to stderr (the parent keeps its tail) and remembers the errors."""

    def __init__(self) -> None:
        trt.ILogger.__init__(self)
        self.errors: list[str] = []

    def log(self, severity: trt.ILogger.Severity, msg: str) -> None:
        if severity in _SHOWN:
            print(f"[TensorRT {severity.name}] {msg}", file=sys.stderr, flush=True)
        if severity in _ERRORS:
            self.errors.append(msg)


def _parse(builder: trt.Builder, logger: _Logger, onnx_path: Path) -> tuple[trt.INetworkDefinition, trt.OnnxParser]:
    # STRONGLY_TYPED: precision comes from the ONNX types (fp16 graph, Q/DQ int8), the only way on
    # TensorRT 11, where the FP16/INT8 builder flags are gone.
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    # parse_from_file resolves external weight files relative to the model.
    if not parser.parse_from_file(str(onnx_path)):
        errors: list[dict[str, Any]] = []
        for i in range(parser.num_errors):
            err = parser.get_error(i)
            errors.append(
                {
                    "desc": err.desc(),
                    "node": err.node(),
                    "node_name": err.node_name(),
                    "node_operator": err.node_operator(),
                    "code": err.code().name,
                }
            )
        raise EngineBuildError(
            got=format_parser_errors(onnx_path.name, errors),
            expected="an ONNX graph that TensorRT's parser accepts as a strongly typed network",
            because="those nodes use operators, types or attributes this TensorRT does not support "
            "(int8 Q/DQ needs int8 weights and activations and float biases)",
            fix="fix the named nodes in the export/precision stage, or upgrade TensorRT",
        )
    # The parser must outlive the network (it owns the weights), so both are returned.
    return network, parser


def _set_timing_cache(
    config: trt.IBuilderConfig, cache_file: Path | None, logger: _Logger, warnings: list[str]
) -> str:
    """Load the timing cache into the config; a bad cache is replaced by an empty one, with a warning."""
    if cache_file is None:
        return "disabled"
    data, warning = read_cache_bytes(cache_file)
    status = "created"
    if warning:
        warnings.append(warning)
        status = "replaced"
    if data:
        try:
            errors_before = len(logger.errors)
            cache = config.create_timing_cache(data)
            # ignore_mismatch=False: a cache from another GPU is refused rather than silently misused.
            if cache is not None and config.set_timing_cache(cache, False) and len(logger.errors) == errors_before:
                return "loaded"
            warnings.append(f"timing cache {cache_file} ignored: TensorRT refused it (other GPU or version); "
                            "starting an empty one")
        except Exception as exc:  # a corrupt file raises from the bindings
            warnings.append(f"timing cache {cache_file} ignored: corrupt ({exc}); starting an empty one")
        status = "replaced"
    config.set_timing_cache(config.create_timing_cache(b""), False)
    return status


def _layer_report(
    plan: bytes, logger: _Logger, profile: dict[str, ProfileShapes], warnings: list[str]
) -> tuple[str | None, list[dict[str, Any]] | None]:
    """The engine inspector's JSON report, with shapes resolved at the profile's opt batch, and the
    plan's own IO tensors (``engine_io``: what a Triton config for the plan is derived from)."""
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(plan)
    if engine is None:
        warnings.append("layer report and engine IO skipped: the engine could not be deserialized for inspection")
        return None, None
    try:
        io: list[dict[str, Any]] | None = engine_io(engine, trt.TensorIOMode.INPUT)
    except Exception as exc:
        warnings.append(f"engine IO not read from the plan: {exc}")
        io = None
    inspector = engine.create_engine_inspector()
    context = None
    try:
        # Without a context whose input shapes are set, every format reads "N/A due to dynamic shapes".
        context = engine.create_execution_context()
        if context is not None:
            for name, shapes in profile.items():
                context.set_input_shape(name, shapes.opt)
            inspector.execution_context = context
    except Exception as exc:
        warnings.append(f"layer report without resolved shapes: {exc}")
    report = inspector.get_engine_information(trt.LayerInformationFormat.JSON)
    del inspector, context, engine, runtime
    return report, io


def build(spec: dict[str, Any]) -> dict[str, Any]:
    """Build one engine as the spec says.

    Args:
        spec: onnx_path, out_dir, engine_file, layers_file, batch [min, opt, max], shapes (input ->
            {min, opt, max} full shapes, for dynamic axes beyond the batch; optional), workspace_mib, tf32,
            builder_optimization_level (or None), timing_cache_file (or None).

    Returns:
        ``{"ok": True, "info": {...}, "warnings": [...]}``.

    Raises:
        EngineBuildError: the parser rejected the model, the profile contradicts it, or the build failed.
    """
    started = time.perf_counter()
    warnings: list[str] = []
    onnx_path, out_dir = Path(spec["onnx_path"]), Path(spec["out_dir"])
    logger = _Logger()
    builder = trt.Builder(logger)
    network, parser = _parse(builder, logger, onnx_path)

    inputs = [network.get_input(i) for i in range(network.num_inputs)]
    outputs = [network.get_output(i) for i in range(network.num_outputs)]
    profile = derive_profile({t.name: dims_tuple(t.shape) for t in inputs}, spec["batch"], spec.get("shapes"))

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(spec["workspace_mib"]) << 20)
    if not spec["tf32"]:
        config.clear_flag(trt.BuilderFlag.TF32)
    if spec.get("builder_optimization_level") is not None:
        config.builder_optimization_level = int(spec["builder_optimization_level"])
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    if any(p.dynamic for p in profile.values()):
        opt_profile = builder.create_optimization_profile()
        for name, shapes in profile.items():
            if shapes.dynamic:
                opt_profile.set_shape(name, trt.Dims(list(shapes.min)), trt.Dims(list(shapes.opt)), trt.Dims(list(shapes.max)))
        config.add_optimization_profile(opt_profile)
    cache_file = Path(spec["timing_cache_file"]) if spec.get("timing_cache_file") else None
    cache_status = _set_timing_cache(config, cache_file, logger, warnings)

    plan_mem = builder.build_serialized_network(network, config)
    if plan_mem is None:  # the stubs say never None; the bindings do return None on failure
        raise EngineBuildError(
            got="no engine from build_serialized_network",
            expected="a serialized engine",
            because="TensorRT failed: " + ("; ".join(logger.errors[-5:]) or "see its log"),
            fix="read TensorRT's errors above; raise workspace_mib if a tactic ran out of workspace",
        )
    plan = bytes(plan_mem)
    del plan_mem
    write_bytes_atomic(out_dir / spec["engine_file"], plan)
    if cache_file is not None:
        write_cache_bytes(cache_file, bytes(config.get_timing_cache().serialize()))

    layers: dict[str, Any] | None = None
    report, plan_io = _layer_report(plan, logger, profile, warnings)
    if report is not None:
        write_bytes_atomic(out_dir / spec["layers_file"], report.encode())
        try:
            layers = summarize_layers(report)
        except ValueError as exc:
            warnings.append(f"layer summary skipped: {exc}")

    def spec_of(t: trt.ITensor) -> dict[str, Any]:
        return {"name": t.name, "dtype": t.dtype.name, "shape": list(dims_tuple(t.shape))}

    info = {
        "engine_file": spec["engine_file"],
        "engine_bytes": len(plan),
        "tensorrt": trt.__version__,
        "strongly_typed": True,
        "inputs": [spec_of(t) for t in inputs],
        "outputs": [spec_of(t) for t in outputs],
        "profile": profile_to_json(profile),
        "engine_io": plan_io,
        "workspace_mib": spec["workspace_mib"],
        "tf32": spec["tf32"],
        "builder_optimization_level": spec.get("builder_optimization_level"),
        "timing_cache": {"file": str(cache_file) if cache_file else None, "status": cache_status},
        "layers_file": spec["layers_file"] if report is not None else None,
        "layers": layers,
        "build_seconds": round(time.perf_counter() - started, 3),
    }
    del parser
    return {"ok": True, "info": info, "warnings": warnings}


def main(argv: list[str]) -> int:
    """Entry point: read the spec, build, write the result file. Returns the exit status."""
    if len(argv) != 2:
        print("usage: python -m tasks.backends._trt_build SPEC.json", file=sys.stderr)
        return 2
    spec = json.loads(Path(argv[1]).read_text())
    result_file = Path(spec["result_file"])
    try:
        result = build(spec)
    except EngineBuildError as exc:
        result_file.write_text(
            json.dumps({"ok": False, "error": {"got": exc.got, "expected": exc.expected, "because": exc.because, "fix": exc.fix}})
        )
        print(str(exc), file=sys.stderr)
        return WORKER_EXIT_BUILD_ERROR
    result_file.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
