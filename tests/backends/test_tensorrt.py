"""Tests of the TensorRT backend.

The unit tests cover the logic that needs no TensorRT (profiles, timing-cache keys, buffer sizes,
parser-error text, layer summaries, the build worker's failure handling) and run everywhere. The
``gpu`` tests build and run real engines; they skip with the reason when TensorRT, pycuda or a GPU
is missing (``pytest -m gpu`` on a GPU machine with ``pip install ".[tensorrt]"``).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tasks.backends import tensorrt as trtb
from tasks.backends.tensorrt import (
    INSTALL_HINT,
    ProfileShapes,
    TensorRTBuilder,
    check_batch_range,
    check_feed,
    derive_profile,
    format_parser_errors,
    layer_precision,
    max_buffer_bytes,
    numpy_dtype_name,
    read_cache_bytes,
    run_build_worker,
    summarize_layers,
    tensor_precision,
    timing_cache_key,
    timing_cache_path,
    write_bytes_atomic,
    write_cache_bytes,
)
from tasks.errors import EngineBuildError, InferenceError

REPO = Path(__file__).resolve().parents[2]

# ------------------------------------------------------------------------------------------------
# Profile derivation
# ------------------------------------------------------------------------------------------------


def test_profile_dynamic_batch_takes_the_batch_range() -> None:
    profile = derive_profile({"x": (-1, 3, 32, 32)}, (1, 32, 256))
    assert profile["x"] == ProfileShapes((1, 3, 32, 32), (32, 3, 32, 32), (256, 3, 32, 32))
    assert profile["x"].dynamic


def test_one_profile_covers_every_input_on_the_shared_batch_range() -> None:
    """Several inputs (token ids and a mask, as the ONNX parser shows them): one entry each, same batch range."""
    profile = derive_profile({"input_ids": (-1, 12), "attention_mask": (-1, 12), "pixel_values": (-1, 3, 8, 8)}, (1, 4, 16))
    assert {k: (v.min, v.opt, v.max) for k, v in profile.items()} == {
        "input_ids": ((1, 12), (4, 12), (16, 12)),
        "attention_mask": ((1, 12), (4, 12), (16, 12)),
        "pixel_values": ((1, 3, 8, 8), (4, 3, 8, 8), (16, 3, 8, 8)),
    }
    assert numpy_dtype_name("INT64") == "int64" and numpy_dtype_name("INT32") == "int32"


def test_profile_static_batch_matching_the_range_is_kept() -> None:
    profile = derive_profile({"x": (4, 3, 8, 8), "scale": ()}, (4, 4, 4))
    assert profile["x"].min == profile["x"].max == (4, 3, 8, 8)
    assert not profile["x"].dynamic and not profile["scale"].dynamic


def test_profile_refuses_range_beyond_a_static_batch() -> None:
    with pytest.raises(EngineBuildError) as exc:
        derive_profile({"x": (1, 3, 32, 32)}, (1, 32, 256))
    msg = str(exc.value)
    assert "batch (min, opt, max) = (1, 32, 256)" in msg
    assert "fixes axis 0 of 'x' to 1" in msg
    assert "re-export" in msg


def test_profile_refuses_dynamic_non_batch_dimensions() -> None:
    with pytest.raises(EngineBuildError, match=r"dynamic dimension\(s\) \[2, 3\]"):
        derive_profile({"x": (-1, 3, -1, -1)}, (1, 2, 4))


@pytest.mark.parametrize("batch", [(0, 1, 2), (4, 2, 8), (1, 8, 4), (1, 2), (1.0, 2, 3), (True, 2, 3)])
def test_batch_range_must_be_ordered_positive_ints(batch: Any) -> None:
    with pytest.raises(EngineBuildError):
        check_batch_range(batch)


def test_profile_json_round_trip() -> None:
    profile = derive_profile({"x": (-1, 3)}, (1, 2, 3))
    assert trtb.profile_to_json(profile) == {"x": {"min": [1, 3], "opt": [2, 3], "max": [3, 3]}}


# ------------------------------------------------------------------------------------------------
# Timing cache
# ------------------------------------------------------------------------------------------------


def test_timing_cache_key_changes_with_version_gpu_and_capability() -> None:
    base = timing_cache_key("10.13.0.35", "NVIDIA H100 80GB HBM3", "9.0")
    assert base.startswith("trt10.13.0.35_nvidia-h100-80gb-hbm3_sm90_")
    others = {
        timing_cache_key("10.13.0.36", "NVIDIA H100 80GB HBM3", "9.0"),
        timing_cache_key("10.13.0.35", "NVIDIA H200", "9.0"),
        timing_cache_key("10.13.0.35", "NVIDIA H100 80GB HBM3", "8.9"),
        timing_cache_key("10.13.0.35", "NVIDIA H100 80GB-HBM3", "9.0"),  # same slug, other name
    }
    assert base not in others and len(others) == 4
    assert timing_cache_key("10.13.0.35", "NVIDIA H100 80GB HBM3", "9.0") == base


def test_timing_cache_path_is_a_safe_file_name(tmp_path: Path) -> None:
    path = timing_cache_path(tmp_path / ".cache" / "tensorrt", "11.0.0", "NVIDIA GeForce RTX 4090 / OEM", "8.9")
    assert path.parent == tmp_path / ".cache" / "tensorrt"
    assert path.suffix == ".cache"
    assert all(c.isalnum() or c in "._-" for c in path.name)


def test_read_cache_bytes_never_fails(tmp_path: Path) -> None:
    assert read_cache_bytes(tmp_path / "missing.cache") == (b"", None)
    empty = tmp_path / "empty.cache"
    empty.write_bytes(b"")
    data, warning = read_cache_bytes(empty)
    assert data == b"" and warning and "empty" in warning
    folder = tmp_path / "a-folder.cache"
    folder.mkdir()
    data, warning = read_cache_bytes(folder)
    assert data == b"" and warning and "cannot read" in warning
    good = tmp_path / "good.cache"
    good.write_bytes(b"\x01\x02")
    assert read_cache_bytes(good) == (b"\x01\x02", None)


def test_cache_checksum_catches_corruption(tmp_path: Path) -> None:
    cache = tmp_path / "timing.cache"
    write_cache_bytes(cache, b"serialized timing cache")
    assert read_cache_bytes(cache) == (b"serialized timing cache", None)
    cache.write_bytes(b"serialized timing cachX")  # flipped byte
    data, warning = read_cache_bytes(cache)
    assert data == b"" and warning and "checksum" in warning
    (tmp_path / "timing.cache.sha256").unlink()  # a cache from elsewhere: handed to TensorRT as is
    assert read_cache_bytes(cache) == (b"serialized timing cachX", None)


def test_write_bytes_atomic_replaces_and_leaves_no_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "timing.cache"
    write_bytes_atomic(target, b"old")
    write_bytes_atomic(target, b"new")
    assert target.read_bytes() == b"new"
    assert [p.name for p in target.parent.iterdir()] == ["timing.cache"]


# ------------------------------------------------------------------------------------------------
# Buffers and dtypes
# ------------------------------------------------------------------------------------------------


def test_buffer_bytes_at_max_batch() -> None:
    assert max_buffer_bytes((256, 3, 32, 32), "float32") == 256 * 3 * 32 * 32 * 4
    assert max_buffer_bytes((256, 10), np.dtype("float16")) == 256 * 10 * 2
    assert max_buffer_bytes((), "int64") == 8
    with pytest.raises(ValueError, match="dynamic"):
        max_buffer_bytes((-1, 10), "float32")


def test_numpy_dtype_names() -> None:
    assert numpy_dtype_name("FLOAT") == "float32"
    assert numpy_dtype_name("HALF") == "float16"
    assert numpy_dtype_name("INT8") == "int8"
    with pytest.raises(InferenceError, match="BF16"):
        numpy_dtype_name("BF16")


def test_feed_check_names_the_allowed_batch_range() -> None:
    profile = ProfileShapes((1, 3, 8, 8), (4, 3, 8, 8), (16, 3, 8, 8))
    check_feed("x", (1, 3, 8, 8), profile)
    check_feed("x", (16, 3, 8, 8), profile)
    with pytest.raises(InferenceError, match=r"batch 17 .*a batch in \[1, 16\]"):
        check_feed("x", (17, 3, 8, 8), profile)
    with pytest.raises(InferenceError, match=r"shape \(N, 3, 8, 8\)"):
        check_feed("x", (2, 3, 9, 8), profile)
    with pytest.raises(InferenceError):
        check_feed("x", (2, 3, 8), profile)


# ------------------------------------------------------------------------------------------------
# Parser errors and layer reports
# ------------------------------------------------------------------------------------------------


def test_engine_io_reads_the_plans_tensors_and_profile() -> None:
    """What a Triton config for a plan is made from: names, types, shapes and profile as the plan says."""

    class Mode:
        INPUT, OUTPUT = "in", "out"

    class DType:
        def __init__(self, name: str) -> None:
            self.name = name

    class Engine:
        tensors = [("ids", Mode.INPUT, "INT64", (-1, 12)), ("scale", Mode.INPUT, "FLOAT", (1,)), ("logits", Mode.OUTPUT, "HALF", (-1, 3))]
        num_io_tensors = 3

        def get_tensor_name(self, i: int) -> str:
            return self.tensors[i][0]

        def _t(self, name: str) -> tuple:
            return next(t for t in self.tensors if t[0] == name)

        def get_tensor_mode(self, name: str) -> str:
            return self._t(name)[1]

        def get_tensor_dtype(self, name: str) -> DType:
            return DType(self._t(name)[2])

        def get_tensor_shape(self, name: str) -> tuple:
            return self._t(name)[3]

        def get_tensor_profile_shape(self, name: str, profile: int) -> list:
            assert name == "ids" and profile == 0, "only a dynamic input has a profile entry"
            return [(1, 12), (32, 12), (256, 12)]

    io = trtb.engine_io(Engine(), Mode.INPUT)
    assert io == [
        {"name": "ids", "mode": "input", "dtype": "INT64", "shape": [-1, 12], "profile": {"min": [1, 12], "opt": [32, 12], "max": [256, 12]}},
        {"name": "scale", "mode": "input", "dtype": "FLOAT", "shape": [1]},
        {"name": "logits", "mode": "output", "dtype": "HALF", "shape": [-1, 3]},
    ]


def test_parser_errors_name_node_and_operator() -> None:
    text = format_parser_errors(
        "model.int8.onnx",
        [
            {
                "desc": "input has type Int32 but must have type FP8, FP4, Int4, Int8, or UInt8",
                "node": 4,
                "node_name": "conv1.bias_DequantizeLinear",
                "node_operator": "DequantizeLinear",
                "code": "UNSUPPORTED_NODE",
            },
            {"desc": "graph-level problem", "node": -1, "node_name": "", "node_operator": ""},
        ],
    )
    lines = text.splitlines()
    assert "model.int8.onnx with 2 error(s)" in lines[0]
    assert "node #4 'conv1.bias_DequantizeLinear' (DequantizeLinear): input has type Int32" in lines[1]
    assert lines[1].endswith("[UNSUPPORTED_NODE]")
    assert lines[2] == "  - graph: graph-level problem"


@pytest.mark.parametrize(
    ("fmt", "precision"),
    [
        ("Row major linear FP32", "fp32"),
        ("Float", "fp32"),
        ("Row major linear FP16 format", "fp16"),
        ("Half", "fp16"),
        ("Thirty-two wide channel vectorized row major Int8 format.", "int8"),
        ("Int8", "int8"),
        ("Row major linear BF16", "bf16"),
        ("Row major linear Int32", "other"),
        ("N/A due to dynamic shapes", "unknown"),
    ],
)
def test_tensor_precision(fmt: str, precision: str) -> None:
    assert tensor_precision(fmt) == precision


def _layer(kind: str, inputs: list[str], outputs: list[str]) -> dict[str, Any]:
    return {
        "Name": kind.lower(),
        "LayerType": kind,
        "Inputs": [{"Name": "i", "Format/Datatype": f} for f in inputs],
        "Outputs": [{"Name": "o", "Format/Datatype": f} for f in outputs],
    }


INSPECTOR_REPORT = {
    "Layers": [
        _layer("Reformat", ["Row major linear FP32"], ["Thirty-two wide channel vectorized row major Int8 format."]),
        _layer("CaskConvolution", ["Int8"], ["Int8"]),
        _layer("CaskConvolution", ["Int8"], ["Float"]),
        _layer("CaskPooling", ["Half"], ["Half"]),
        _layer("CaskGemm", ["Float"], ["Float"]),
        _layer("Shuffle", ["Row major linear Int64"], ["Row major linear Int64"]),
    ],
    "Bindings": ["x", "logits"],
}


def test_layer_summary_counts_layers_per_precision_and_type() -> None:
    summary = summarize_layers(json.dumps(INSPECTOR_REPORT))
    assert summary["layers"] == 6
    assert summary["by_precision"] == {"fp16": 1, "fp32": 1, "int8": 3, "other": 1}
    assert summary["by_type"]["CaskConvolution"] == 2
    assert summary["compute"] == {"fp32": 1, "int8": 2}  # the convolutions and the GEMM, by their inputs
    assert summarize_layers(INSPECTOR_REPORT) == summary


def test_layer_summary_without_detailed_verbosity() -> None:
    # Without ProfilingVerbosity.DETAILED the inspector lists names only.
    summary = summarize_layers({"Layers": ["conv1 + relu", "fc"], "Bindings": []})
    assert summary == {"layers": 2, "by_precision": {"unknown": 2}, "by_type": {"?": 2}, "compute": {"unknown": 1}}
    assert layer_precision("conv1") == "unknown"
    with pytest.raises(ValueError, match="Layers"):
        summarize_layers("{}")


# ------------------------------------------------------------------------------------------------
# Availability, lazy imports, options
# ------------------------------------------------------------------------------------------------


def test_module_imports_without_tensorrt_or_pycuda() -> None:
    code = "import sys, tasks.backends.tensorrt, tasks.backends.cuda_buffers; print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorrt', 'pycuda')))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_availability_without_tensorrt(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes 'import tensorrt' raise ImportError
    reason = TensorRTBuilder().availability()
    assert reason is not None and "tensorrt" in reason and INSTALL_HINT in reason


def test_availability_with_only_type_stubs(monkeypatch: pytest.MonkeyPatch) -> None:
    # tensorrt-stubs installs a 'tensorrt' folder of .pyi files that imports as an empty namespace.
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))
    reason = TensorRTBuilder().availability()
    assert reason is not None and "stubs" in reason and INSTALL_HINT in reason


def test_availability_without_pycuda(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = types.ModuleType("tensorrt")
    fake.Builder = object  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setitem(sys.modules, "pycuda", None)
    monkeypatch.setitem(sys.modules, "pycuda.driver", None)
    reason = TensorRTBuilder().availability()
    assert reason is not None and "pycuda" in reason and INSTALL_HINT in reason


def test_auto_falls_back_to_onnxruntime_with_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("pydantic")
    from tasks.backends.registry import choose_backend

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    builder, why = choose_backend("auto")
    assert builder.name == "onnxruntime"
    assert "TensorRT cannot run here" in why and INSTALL_HINT in why


# Names gone in TensorRT 10 (8.x bindings API) or in 11 (precision flags, calibrators, implicit batch).
# pyright with the 10.13 stubs catches the first group but not the second (still declared there).
REMOVED_TENSORRT_API = (
    "get_binding_shape", "binding_is_input", "max_batch_size", "num_bindings", "execute_async_v2",
    "build_engine(", "max_workspace_size", "BuilderFlag.FP16", "BuilderFlag.INT8", "BuilderFlag.BF16",
    "BuilderFlag.FP8", "EXPLICIT_BATCH", "int8_calibrator", "IInt8EntropyCalibrator",
)


def test_no_removed_tensorrt_api() -> None:
    for module in ("tensorrt.py", "_trt_build.py", "cuda_buffers.py"):
        source = (REPO / "tasks" / "backends" / module).read_text()
        used = [name for name in REMOVED_TENSORRT_API if name in source]
        assert not used, f"{module} uses TensorRT API removed in 10.x/11.x: {used}"


def test_build_options_defaults_and_validation() -> None:
    opts = trtb._build_options({"threads": 2})  # other backends' keys are ignored
    assert opts == {
        "workspace_mib": 1024,
        "tf32": True,
        "build_timeout_s": 3600,
        "builder_optimization_level": None,
        "timing_cache_dir": None,
    }
    assert trtb._build_options({"tf32": False, "timing_cache_dir": Path("/a")})["timing_cache_dir"] == "/a"
    for bad in ({"workspace_mib": 0}, {"workspace_mib": "1G"}, {"tf32": "no"}, {"builder_optimization_level": 9}):
        with pytest.raises(EngineBuildError, match="option"):
            trtb._build_options(bad)


def test_runner_refuses_infer_before_activate(tmp_path: Path) -> None:
    runner = TensorRTBuilder().runner_from_engine(tmp_path / "engine.plan", {})
    with pytest.raises(InferenceError, match="inactive"):
        runner.infer({"x": np.zeros((1, 3), np.float32)})


# ------------------------------------------------------------------------------------------------
# Build worker process: failures become EngineBuildError, never a crash of the caller
# ------------------------------------------------------------------------------------------------

FAKE_WORKERS = {
    "fake_ok": """
        import json, sys
        spec = json.load(open(sys.argv[1]))
        json.dump({"ok": True, "info": {"engine_file": "engine.plan"}, "warnings": ["w1"]}, open(spec["result_file"], "w"))
    """,
    "fake_build_error": """
        import json, sys
        spec = json.load(open(sys.argv[1]))
        json.dump({"ok": False, "error": {"got": "G", "expected": "E", "because": "B", "fix": "F"}}, open(spec["result_file"], "w"))
        sys.exit(3)
    """,
    "fake_crash": """
        import os, signal, sys
        print("CUDA error: out of memory", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """,
    "fake_exit": """
        import sys
        print("Traceback ...\\nRuntimeError: boom", file=sys.stderr)
        sys.exit(1)
    """,
    "fake_slow": """
        import time
        time.sleep(30)
    """,
}


@pytest.fixture()
def fake_worker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    for name, body in FAKE_WORKERS.items():
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(body))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    spec, result = tmp_path / "spec.json", tmp_path / "result.json"
    spec.write_text(json.dumps({"result_file": str(result)}))
    return spec, result


def test_worker_success(fake_worker: tuple[Path, Path]) -> None:
    assert run_build_worker(*fake_worker, timeout_s=30, module="fake_ok")["warnings"] == ["w1"]


def test_worker_build_error_keeps_its_message(fake_worker: tuple[Path, Path]) -> None:
    with pytest.raises(EngineBuildError) as exc:
        run_build_worker(*fake_worker, timeout_s=30, module="fake_build_error")
    assert str(exc.value) == "got G, expected E, because B; F"


def test_worker_killed_reports_signal_and_output(fake_worker: tuple[Path, Path]) -> None:
    with pytest.raises(EngineBuildError, match=r"(?s)signal SIGKILL.*out of memory"):
        run_build_worker(*fake_worker, timeout_s=30, module="fake_crash")


def test_worker_exit_reports_status_and_stderr_tail(fake_worker: tuple[Path, Path]) -> None:
    with pytest.raises(EngineBuildError, match=r"(?s)exit status 1.*RuntimeError: boom"):
        run_build_worker(*fake_worker, timeout_s=30, module="fake_exit")


def test_worker_timeout(fake_worker: tuple[Path, Path]) -> None:
    with pytest.raises(EngineBuildError, match="still running after 0.5 s"):
        run_build_worker(*fake_worker, timeout_s=0.5, module="fake_slow")


# ------------------------------------------------------------------------------------------------
# GPU: real builds and runs (skipped with the reason elsewhere)
# ------------------------------------------------------------------------------------------------


def _needs_tensorrt() -> None:
    why_not = TensorRTBuilder().availability()
    if why_not is not None:
        pytest.skip(f"TensorRT backend unavailable: {why_not}")


def _tiny_model(seed: int = 0) -> Any:
    torch = pytest.importorskip("torch")
    torch.manual_seed(seed)
    nn = torch.nn

    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(
                nn.Conv2d(3, 8, 3, padding=1),
                nn.ReLU(),
                nn.Conv2d(8, 16, 3, padding=1, stride=2),
                nn.ReLU(),
                nn.AdaptiveAvgPool2d(1),
                nn.Flatten(),
                nn.Linear(16, 10),
            )

        def forward(self, x: Any) -> Any:  # the argument name is the ONNX input name
            return self.body(x)

    return Tiny().eval()


def _export(model: Any, path: Path, dynamic: bool = True) -> Path:
    import torch

    x = torch.randn(2, 3, 16, 16)
    kwargs: dict[str, Any] = {"dynamic_shapes": {"x": {0: torch.export.Dim("batch")}}} if dynamic else {}
    with torch.no_grad():
        torch.onnx.export(model, (x,), str(path), dynamo=True, external_data=False, **kwargs)
    return path


def _variant(fp32: Path, precision: str, calib: np.ndarray) -> Path:
    """The precision's ONNX file, by the pipeline's own converters when importable (they need prefect)."""
    if precision == "fp32":
        return fp32
    dst = fp32.with_name(f"model.{precision}.onnx")
    try:
        from tasks.precisions.fp16 import fp16_from_onnx
        from tasks.precisions.int8 import int8_from_onnx
    except ImportError:  # e.g. a bare GPU box without prefect: same recipe, inline
        fp16_from_onnx, int8_from_onnx = _fp16_inline, _int8_inline
    if precision == "fp16":
        fp16_from_onnx(fp32, dst)
    else:
        int8_from_onnx(fp32, dst, calib)
    return dst


def _fp16_inline(src: Path, dst: Path) -> None:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    # convert_float_to_float16 appends its Cast nodes last; the checker needs topological order.
    graph, done = model.graph, {i.name for i in model.graph.input} | {i.name for i in model.graph.initializer}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [n for n in pending if all(not i or i in done for i in n.input)]
        assert ready, "cycle"
        for n in ready:
            ordered.append(n)
            done.update(n.output)
            pending.remove(n)
    del graph.node[:]
    graph.node.extend(ordered)
    onnx.save(model, str(dst))


def _int8_inline(src: Path, dst: Path, calibration: np.ndarray) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    class Reader:
        def __init__(self) -> None:
            self._it = iter([{"x": calibration[i : i + 16]} for i in range(0, len(calibration), 16)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._it, None)

    quantize_static(
        str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False},
    )


TOLERANCE = {"fp32": 1e-3, "fp16": 2e-2, "int8": 0.25}  # max abs error vs ONNX Runtime on fp32 logits


def _build(precision: str, tmp_path: Path, options: dict[str, Any]) -> tuple[Path, Path, Any]:
    calib = np.random.default_rng(0).standard_normal((64, 3, 16, 16)).astype(np.float32)
    fp32 = tmp_path / "model.fp32.onnx"
    if not fp32.exists():
        _export(_tiny_model(), fp32)
    onnx_file = _variant(fp32, precision, calib)
    result = TensorRTBuilder().engine_from_onnx(onnx_file, tmp_path / f"engine-{precision}", (1, 4, 16), options)
    return fp32, onnx_file, result


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_gpu_build(precision: str, tmp_path: Path) -> None:
    _needs_tensorrt()
    cache_dir = tmp_path / ".cache" / "tensorrt"
    _, onnx_file, result = _build(precision, tmp_path, {"timing_cache_dir": cache_dir, "tf32": False})
    info = result.info
    assert (tmp_path / f"engine-{precision}" / result.engine_file).stat().st_size > 0
    assert info["strongly_typed"] and info["tf32"] is False and info["backend"] == "tensorrt"
    assert info["profile"]["x"] == {"min": [1, 3, 16, 16], "opt": [4, 3, 16, 16], "max": [16, 3, 16, 16]}
    assert info["timing_cache"]["status"] == "created"
    (cache,) = cache_dir.glob("timing-*.cache")
    again = TensorRTBuilder().engine_from_onnx(onnx_file, tmp_path / "again", (1, 4, 16), {"timing_cache_dir": cache_dir})
    assert again.info["timing_cache"]["status"] == "loaded"
    cache.write_bytes(b"garbage" * 100)
    damaged = TensorRTBuilder().engine_from_onnx(onnx_file, tmp_path / "damaged", (1, 4, 16), {"timing_cache_dir": cache_dir})
    assert damaged.info["timing_cache"]["status"] == "replaced"
    assert any("ignored" in w for w in damaged.info["warnings"])
    assert read_cache_bytes(cache)[1] is None  # rewritten, checksum matches again


@pytest.mark.gpu
def test_gpu_plan_config_comes_from_the_plans_own_io(tmp_path: Path) -> None:
    """The build reads the plan's IO back; the Triton config for the plan is derived from it and parses."""
    _needs_tensorrt()
    from tasks.backends.base import EngineInfo
    from tasks.package import write_model_repository

    _, _, result = _build("fp16", tmp_path, {})
    io = result.info["engine_io"]
    assert io is not None, result.info.get("warnings")
    assert [t["mode"] for t in io] == ["input", "output"] and io[0]["profile"] == result.info["profile"]["x"]
    info = EngineInfo.model_validate({**result.info, "engine_file": result.engine_file})
    feed = {"x": np.ones((2, 3, 16, 16), np.float32)}
    model = write_model_repository(tmp_path / "repo", "m", info, tmp_path / "engine-fp16" / result.engine_file, feed)
    assert model.platform == "tensorrt_plan" and model.max_batch_size == 16 and "deserialized plan" in model.source


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_gpu_build_and_run(precision: str, tmp_path: Path) -> None:
    _needs_tensorrt()
    ort = pytest.importorskip("onnxruntime")
    fp32, _, result = _build(precision, tmp_path, {})
    engine_dir = tmp_path / f"engine-{precision}"
    assert json.loads((engine_dir / "layers.json").read_text())["Layers"]
    layers = result.info["layers"]
    assert layers["layers"] > 0
    if precision != "fp32":
        assert layers["by_precision"].get(precision, 0) > 0, layers
    # the compute layers (two convolutions, one product) run in the engine's precision, as verify reports
    from tasks.compute_share import ENGINE_INSPECTOR, engine_compute_share

    share = engine_compute_share((engine_dir / "layers.json").read_text())
    assert share is not None and share.source == ENGINE_INSPECTOR and share.share(precision) >= 0.5, layers["compute"]

    rng = np.random.default_rng(1)
    ref = ort.InferenceSession(str(fp32), providers=["CPUExecutionProvider"])
    runner = TensorRTBuilder().runner_from_engine(engine_dir / result.engine_file, result.info)
    with runner:
        assert [s.name for s in runner.input_specs()] == ["x"]
        first, snapshot = None, None
        for n in (1, 7, 16, 3):  # any batch inside the profile, buffers reused
            x = rng.standard_normal((n, 3, 16, 16)).astype(np.float32)
            out = runner.infer({"x": x})
            (name,) = out
            expected = ref.run(None, {"x": x})[0]
            assert out[name].shape == (n, 10)
            assert np.max(np.abs(out[name] - expected)) < TOLERANCE[precision]
            if first is None:
                first, snapshot = out[name], out[name].copy()
        assert np.array_equal(first, snapshot)  # outputs are copies, not views of reused buffers
        # Prefect runs tasks in worker threads: a call from another thread must find the context.
        x = rng.standard_normal((5, 3, 16, 16)).astype(np.float32)
        from_thread: list[Any] = []
        worker = threading.Thread(target=lambda: from_thread.append(runner.infer({"x": x})))
        worker.start()
        worker.join()
        assert from_thread and np.max(np.abs(next(iter(from_thread[0].values())) - ref.run(None, {"x": x})[0])) < TOLERANCE[precision]
        with pytest.raises(InferenceError, match=r"a batch in \[1, 16\]"):
            runner.infer({"x": np.zeros((17, 3, 16, 16), np.float32)})
    assert not runner.is_active


@pytest.mark.gpu
def test_gpu_static_batch_contradiction_is_refused(tmp_path: Path) -> None:
    _needs_tensorrt()
    onnx_file = _export(_tiny_model(), tmp_path / "static.onnx", dynamic=False)  # batch fixed to 2
    with pytest.raises(EngineBuildError, match="fixes axis 0 of 'x' to 2"):
        TensorRTBuilder().engine_from_onnx(onnx_file, tmp_path / "e", (1, 32, 256), {})


@pytest.mark.gpu
def test_gpu_parser_error_names_the_node(tmp_path: Path) -> None:
    _needs_tensorrt()
    from onnxruntime.quantization import QuantFormat, quantize_static

    fp32 = _export(_tiny_model(), tmp_path / "m.onnx")
    calib = np.random.default_rng(0).standard_normal((16, 3, 16, 16)).astype(np.float32)

    class Reader:
        def __init__(self) -> None:
            self._it = iter([{"x": calib}])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._it, None)

    bad = tmp_path / "int32_bias.onnx"
    quantize_static(str(fp32), str(bad), Reader(), quant_format=QuantFormat.QDQ)  # int32 biases: refused
    with pytest.raises(EngineBuildError, match=r"(?s)ONNX parser rejected int32_bias.onnx.*DequantizeLinear"):
        TensorRTBuilder().engine_from_onnx(bad, tmp_path / "e", (1, 2, 4), {})


def _needs_pycuda_and_torch_cuda() -> Any:
    pytest.importorskip("pycuda.driver", reason="pycuda is not installed (pip install \".[tensorrt]\")")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU visible to torch")
    return torch


@pytest.mark.gpu
def test_gpu_buffers_round_trip_on_the_context_shared_with_torch() -> None:
    torch = _needs_pycuda_and_torch_cuda()
    from tasks.backends import cuda_buffers as cb

    # torch first: it creates the primary context; pycuda must join it, not make a second one.
    t = torch.arange(1 << 20, device="cuda", dtype=torch.float32)
    errors: list[BaseException] = []

    def work() -> None:  # on another thread, as Prefect runs tasks
        try:
            with cb.context_current():
                stream = cb.Stream()
                buf = cb.HostDeviceBuffer((64, 3, 8, 8), "float32")
                host_ptr = buf.host.ctypes.data if buf.host is not None else 0
                for n in (64, 5, 1):
                    x = np.random.default_rng(n).standard_normal((n, 3, 8, 8)).astype(np.float32)
                    buf.upload(x, stream)
                    # device-to-device through torch on the same memory proves one shared context
                    view = torch.empty((n, 3, 8, 8), device="cuda")
                    stream.synchronize()
                    cb._driver().memcpy_dtod(view.data_ptr(), buf.device_ptr, x.nbytes)
                    torch.cuda.synchronize()
                    assert np.array_equal(view.cpu().numpy(), x)
                    view.mul_(2)
                    torch.cuda.synchronize()
                    cb._driver().memcpy_dtod(buf.device_ptr, view.data_ptr(), x.nbytes)
                    out = buf.download((n, 3, 8, 8), stream)
                    stream.synchronize()
                    assert np.array_equal(out, 2 * x)
                    assert buf.host is not None and buf.host.ctypes.data == host_ptr  # never replaced
                buf.free()
                buf.free()  # idempotent
                stream.release()
        except BaseException as exc:  # re-raised on the main thread
            errors.append(exc)

    worker = threading.Thread(target=work)
    worker.start()
    worker.join()
    if errors:
        raise errors[0]
    assert float(t.sum()) == pytest.approx((1 << 20) * ((1 << 20) - 1) / 2, rel=1e-6)


@pytest.mark.gpu
def test_gpu_large_pinned_round_trip() -> None:
    _needs_pycuda_and_torch_cuda()
    from tasks.backends import cuda_buffers as cb

    with cb.context_current():
        stream = cb.Stream()
        buf = cb.HostDeviceBuffer((256, 3, 224, 224), "float32")  # ~154 MB
        assert buf.host is not None
        assert buf.host.base is not None and type(buf.host.base).__name__.endswith("HostAllocation")
        x = np.ones((256, 3, 224, 224), np.float32)
        buf.upload(x, stream)
        out = buf.download(x.shape, stream)
        stream.synchronize()
        assert np.array_equal(out, x)
        buf.free()
        stream.release()



class _FakeTRT:
    """Just enough of the TensorRT runtime API for TensorRTRunner: an engine computing
    ``y = 2 * relu(x).reshape(N, -1)`` with torch on the stream the runner passes, so the runner's
    own pycuda code (buffers sized from the profile, addresses, shapes, copies) runs on a real GPU
    where no TensorRT runs (TensorRT-RTX refuses sm_90)."""

    class _Enum:
        def __init__(self, name: str) -> None:
            self.name = name

    class TensorIOMode:
        INPUT = "INPUT"
        OUTPUT = "OUTPUT"

    class Logger:
        WARNING = 2

        def __init__(self, severity: int) -> None:
            self.severity = severity

    Builder = object
    __version__ = "fake-10"

    class Runtime:
        def __init__(self, logger: Any) -> None:
            self.logger = logger

        def deserialize_cuda_engine(self, plan: bytes) -> Any:
            return _FakeEngine() if plan == b"fake-engine" else None


class _FakeEngine:
    num_io_tensors = 2
    PROFILE = ((1, 3, 4, 4), (8, 3, 4, 4), (32, 3, 4, 4))

    def get_tensor_name(self, i: int) -> str:
        return ["x", "y"][i]

    def get_tensor_mode(self, name: str) -> str:
        return "INPUT" if name == "x" else "OUTPUT"

    def get_tensor_dtype(self, name: str) -> Any:
        return _FakeTRT._Enum("FLOAT")

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return (-1, 3, 4, 4) if name == "x" else (-1, 48)

    def get_tensor_profile_shape(self, name: str, index: int) -> list[tuple[int, ...]]:
        assert index == 0
        return list(self.PROFILE)

    def create_execution_context(self) -> Any:
        return _FakeContext()


class _FakeContext:
    def __init__(self) -> None:
        self.shape: tuple[int, ...] = (-1, 3, 4, 4)
        self.addresses: dict[str, int] = {}

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        self.shape = tuple(shape)
        return _FakeEngine.PROFILE[0][0] <= self.shape[0] <= _FakeEngine.PROFILE[2][0]

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return self.shape if name == "x" else (self.shape[0], 48)

    def set_tensor_address(self, name: str, ptr: int) -> bool:
        self.addresses[name] = ptr
        return True

    def execute_async_v3(self, stream_handle: int) -> bool:
        import torch

        def tensor(ptr: int, shape: tuple[int, ...]) -> Any:
            cai = types.SimpleNamespace(
                __cuda_array_interface__={"shape": shape, "typestr": "<f4", "data": (ptr, False), "version": 3}
            )
            return torch.as_tensor(cai, device="cuda")

        with torch.cuda.stream(torch.cuda.ExternalStream(stream_handle)):
            x = tensor(self.addresses["x"], self.shape)
            y = tensor(self.addresses["y"], (self.shape[0], 48))
            y.copy_(torch.relu(x).reshape(self.shape[0], -1) * 2)
        return True


@pytest.mark.gpu
def test_gpu_runner_buffers_and_streams_with_a_fake_engine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _needs_pycuda_and_torch_cuda()
    monkeypatch.setitem(sys.modules, "tensorrt", _FakeTRT)
    monkeypatch.setattr(trtb, "_LOGGER", None)
    engine = tmp_path / "engine.plan"
    engine.write_bytes(b"fake-engine")
    runner = trtb.TensorRTRunner(engine)
    rng = np.random.default_rng(0)
    with runner:
        assert runner.batch_range == (1, 32)
        assert [(s.name, s.dtype, s.shape) for s in runner.output_specs()] == [("y", "float32", (-1, 48))]
        outs = []
        for n in (32, 1, 5, 32):
            x = rng.standard_normal((n, 3, 4, 4)).astype(np.float32)
            out = runner.infer({"x": x})
            assert out["y"].shape == (n, 48)
            np.testing.assert_array_equal(out["y"], 2 * np.maximum(x, 0).reshape(n, -1))
            outs.append((out["y"], out["y"].copy()))
        assert all(np.array_equal(a, b) for a, b in outs)  # earlier outputs untouched by later calls
        x = rng.standard_normal((3, 3, 4, 4)).astype(np.float64)  # cast into the float32 buffer
        got: list[Any] = []
        worker = threading.Thread(target=lambda: got.append(runner.infer({"x": x})))
        worker.start()
        worker.join()
        assert got, "infer from another thread failed"
        np.testing.assert_allclose(got[0]["y"], 2 * np.maximum(x, 0).reshape(3, -1), rtol=1e-6)
        with pytest.raises(InferenceError, match=r"a batch in \[1, 32\]"):
            runner.infer({"x": np.zeros((33, 3, 4, 4), np.float32)})
        times = runner.time_infer({"x": np.ones((32, 3, 4, 4), np.float32)}, 20)  # CUDA events
        assert runner.timer == "cuda_events" and len(times) == 20 and all(0 < t < 1000 for t in times)
        with pytest.raises(InferenceError, match="dtype"):
            runner.infer({"x": np.zeros((2, 3, 4, 4), np.complex64)})
    assert not runner.is_active and runner._buffers == {}
    runner.activate()  # reusable after deactivate
    np.testing.assert_array_equal(runner.infer({"x": np.ones((2, 3, 4, 4), np.float32)})["y"], np.full((2, 48), 2.0))
    runner.deactivate()

    engine.write_bytes(b"stale engine")
    with pytest.raises(InferenceError, match="cannot load"):
        trtb.TensorRTRunner(engine).activate()
