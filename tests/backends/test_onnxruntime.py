import numpy as np
import pytest

from tasks.backends.base import EngineInfo
from tasks.backends.onnxruntime import OnnxRuntimeBuilder, OnnxRuntimeRunner
from tasks.backends.registry import builder_for, choose_backend
from tasks.config import Backend
from tasks.data import load_splits
from tasks.errors import BackendUnavailableError, InferenceError
from tasks.inference import module_from_checkpoint, predict_logits


@pytest.fixture(scope="module")
def engine(trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("ort")
    result = OnnxRuntimeBuilder().engine_from_onnx(trained.onnx.path("model.onnx"), out, (1, 4, 16), {"threads": 1})
    info = EngineInfo.model_validate({**result.info, "engine_file": result.engine_file, "threads": 1})
    return out / result.engine_file, info


def test_runner_matches_pytorch(trained, engine):
    path, info = engine
    x = load_splits(trained.data)["x_test"][:16]
    ref = predict_logits(module_from_checkpoint(trained.checkpoint), x)
    with OnnxRuntimeBuilder().runner_from_engine(path, info) as runner:
        assert [s.name for s in runner.input_specs()] == ["x"]
        assert runner.input_specs()[0].shape[0] == -1  # dynamic batch
        for n in (1, 5, 16):
            out = runner.infer({"x": x[:n]})
            assert list(out) == ["logits"]
            np.testing.assert_allclose(out["logits"], ref[:n], atol=1e-4)
    assert not runner.is_active


def test_runner_refuses_misuse(trained, engine):
    path, info = engine
    x = load_splits(trained.data)["x_test"][:32]
    runner = OnnxRuntimeBuilder().runner_from_engine(path, info)
    with pytest.raises(InferenceError, match="context manager"):
        runner.infer({"x": x[:1]})
    with runner:
        with pytest.raises(InferenceError, match=r"batch in \[1, 16\]"):
            runner.infer({"x": x})
        with pytest.raises(InferenceError, match="inputs"):
            runner.infer({"images": x[:1]})
    runner.deactivate()  # idempotent


@pytest.mark.parametrize(
    ("feed", "message"),
    [
        (lambda x: {"x": x[:4].astype(np.int64)}, "floating point"),
        (lambda x: {"x": x[:4, :1]}, r"shape \(N, 3, 32, 32\)"),
        (lambda x: {"x": x[:4, 0]}, "of shape"),
        (lambda x: {"x": x[:17]}, r"batch in \[1, 16\]"),
    ],
    ids=["int for float", "wrong channels", "wrong rank", "batch above max"],
)
def test_the_base_runner_checks_every_feed_before_the_backend_sees_it(trained, engine, feed, message):
    path, info = engine
    x = load_splits(trained.data)["x_test"][:32]
    with OnnxRuntimeBuilder().runner_from_engine(path, info) as runner:
        with pytest.raises(InferenceError, match=message):
            runner.infer(feed(x))
        runner.infer({"x": x[:16]})  # the limit itself is accepted


def test_outputs_are_not_overwritten_by_later_calls(trained, engine):
    path, _ = engine
    x = load_splits(trained.data)["x_test"][:4]
    with OnnxRuntimeRunner(path) as runner:
        first = runner.infer({"x": x[:2]})["logits"]
        keep = first.copy()
        runner.infer({"x": x[2:4]})
    np.testing.assert_array_equal(first, keep)


def test_environment_names_versions_and_cpu():
    env = OnnxRuntimeBuilder().environment()
    assert {"onnxruntime", "cpu", "machine"} <= set(env)


def test_auto_falls_back_to_onnxruntime_with_reason():
    builder, why = choose_backend("auto")
    if builder_for(Backend.tensorrt).availability() is None:
        pytest.skip("TensorRT is usable here; the fallback is not taken")
    assert builder.name == "onnxruntime"
    assert "TensorRT cannot run here" in why


def test_explicit_tensorrt_without_it_fails_with_hint():
    if builder_for(Backend.tensorrt).availability() is None:
        pytest.skip("TensorRT is usable here")
    with pytest.raises(BackendUnavailableError, match="--backend auto"):
        choose_backend("tensorrt")


def _qdq_matmul(path):
    """x (N x 64) -> Q/DQ -> MatMul with an int8 weight: what the int8 variant looks like to ONNX Runtime."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = rng.integers(-127, 128, (64, 32)).astype(np.int8)
    inits = [
        numpy_helper.from_array(np.array(0.05, np.float32), "xs"), numpy_helper.from_array(np.array(0, np.int8), "xz"),
        numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array(0.01, np.float32), "ws"),
        numpy_helper.from_array(np.array(0, np.int8), "wz"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
        helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"]),
        helper.make_node("MatMul", ["xd", "wd"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 32])], inits,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)]), path)
    return path


@pytest.mark.parametrize(
    ("flags", "saturate"),
    [({"avx2"}, True), ({"avx2", "avx512_vnni"}, False), ({"avx2", "avx_vnni"}, False), (set(), False)],
)
def test_int8_kernels_saturate_on_avx2_without_vnni(monkeypatch, flags, saturate):
    import tasks.backends.onnxruntime as ortb

    monkeypatch.setattr(ortb.platform, "machine", lambda: "x86_64")
    assert ortb.int8_kernels_saturate(frozenset(flags)) is saturate


@pytest.mark.parametrize("saturate", [True, False])
def test_a_qdq_engine_keeps_its_qdq_in_fp32_where_int8_kernels_saturate(tmp_path, monkeypatch, saturate):
    import onnx

    import tasks.backends.onnxruntime as ortb

    monkeypatch.setattr(ortb, "int8_kernels_saturate", lambda flags=None: saturate)
    model = _qdq_matmul(tmp_path / "q.onnx")
    out = tmp_path / "engine"
    out.mkdir()
    result = OnnxRuntimeBuilder().engine_from_onnx(model, out, (1, 4, 16), {"threads": 1})
    ops = {n.op_type for n in onnx.load(str(out / result.engine_file)).graph.node}
    assert ("MatMul" in ops and "DequantizeLinear" in ops) is saturate
    assert (result.info["graph_optimization"] == ortb.QDQ_IN_FP32) is saturate
    assert OnnxRuntimeBuilder().environment()["int8_kernels"].startswith("saturating" if saturate else "exact")
    # The runner decides the same way at load time (ALL would fuse the Q/DQ nodes again).
    runner = OnnxRuntimeRunner(model, threads=1)
    assert runner._fuse_int8() is not saturate
    x = np.random.default_rng(1).random((4, 64), dtype=np.float32)
    with runner:
        y = runner.infer({"x": x})["y"]
    exact = (np.clip(np.round(x / 0.05), -128, 127) * 0.05) @ (onnx.numpy_helper.to_array(onnx.load(str(model)).graph.initializer[2]).astype(np.float32) * 0.01)
    if saturate:
        np.testing.assert_allclose(y, exact, rtol=1e-5, atol=1e-4)


def test_every_session_gets_the_configured_thread_count(tmp_path):
    """Results and timings depend on the thread count: each ONNX Runtime session must use the configured one."""
    import onnx
    from _precision_models import overflowing_mlp

    from onnx import TensorProto

    from tasks.verify import emulation_runner
    from tasks.precisions.fp16 import fp16_from_onnx
    from tasks.repair import _session

    model, _ = overflowing_mlp()
    onnx.save(model, str(tmp_path / "m.onnx"))
    built = OnnxRuntimeBuilder().engine_from_onnx(tmp_path / "m.onnx", tmp_path, (1, 4, 16), {"threads": 3})
    info = EngineInfo.model_validate({**built.info, "engine_file": built.engine_file, "threads": 3})
    fp16_from_onnx(tmp_path / "m.onnx", tmp_path / "half.onnx")
    emulation, _ = emulation_runner(tmp_path / "half.onnx", tmp_path, TensorProto.FLOAT16, threads=2)
    for runner, threads in ((OnnxRuntimeBuilder().runner_from_engine(tmp_path / built.engine_file, info), 3), (emulation, 2)):
        with runner:
            options = runner._sess.get_session_options()
            assert (options.intra_op_num_threads, options.inter_op_num_threads) == (threads, 1)
    options = _session(model, True, 5).get_session_options()  # repair's ranking sessions
    assert (options.intra_op_num_threads, options.inter_op_num_threads) == (5, 1)


def test_the_providers_option_reaches_the_build_and_the_runners_sessions(trained, tmp_path, monkeypatch):
    import onnxruntime as ort

    from tasks.config import BatchProfile, EngineOptions, PipelineConfig, Precision
    from tasks.engine import engine_from_variant, runner_from_build
    from tasks.precision import variant_from_onnx

    variant = variant_from_onnx(trained.onnx, trained.data, Precision.fp32, 16, tmp_path)
    real, here, seen = ort.InferenceSession, ort.get_available_providers(), []

    def recording(path, sess_options=None, providers=None, **kw):
        seen.append(list(providers))  # what the session receives
        return real(path, sess_options, providers=[p for p in providers if p in here], **kw)

    monkeypatch.setattr(ort, "get_available_providers", lambda: [*here, "ToyExecutionProvider"])
    monkeypatch.setattr(ort, "InferenceSession", recording)
    batch = BatchProfile(min=1, opt=2, max=4)
    asked = ["ToyExecutionProvider", "CPUExecutionProvider"]
    engine = engine_from_variant(variant, Backend.onnxruntime, batch, EngineOptions(threads=1, providers=asked), tmp_path)
    assert seen == [asked] and engine.meta["options"]["providers"] == asked
    with runner_from_build(engine) as runner:
        runner.infer({"x": load_splits(trained.data)["x_test"][:2]})
    assert seen == [asked, asked]
    # The default: the CPU provider, as before the option existed.
    assert PipelineConfig().engine.providers == ["CPUExecutionProvider"]
    seen.clear()
    default = engine_from_variant(variant, Backend.onnxruntime, batch, {"threads": 1}, tmp_path)
    with runner_from_build(default):
        pass
    assert seen == [["CPUExecutionProvider"]] * 2 and default.key != engine.key


def test_a_provider_this_onnxruntime_lacks_fails_the_build_instead_of_running_on_the_cpu(trained, tmp_path):
    from tasks.errors import EngineBuildError

    with pytest.raises(EngineBuildError) as info:
        OnnxRuntimeBuilder().engine_from_onnx(trained.onnx.path("model.onnx"), tmp_path, (1, 2, 4), {"providers": ["NoSuchExecutionProvider"]})
    assert "NoSuchExecutionProvider" in info.value.got and "CPUExecutionProvider" in info.value.expected
    runner = OnnxRuntimeRunner(trained.onnx.path("model.onnx"), providers=["NoSuchExecutionProvider"])
    with pytest.raises(InferenceError, match="NoSuchExecutionProvider"):
        runner.activate()
