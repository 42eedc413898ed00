import numpy as np
import pytest

from tasks.backends.base import EngineInfo
from tasks.backends.onnxruntime import OnnxRuntimeBuilder, OnnxRuntimeRunner
from tasks.backends.registry import builder_for, choose_backend
from tasks.config import Backend
from tasks.data import load_splits
from tasks.errors import BackendUnavailableError, InferenceError
from tasks.train import module_from_checkpoint, predict_logits


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


def test_every_session_gets_the_configured_thread_count(tmp_path):
    """Results and timings depend on the thread count: each ONNX Runtime session must use the configured one."""
    import onnx
    from _precision_models import overflowing_mlp

    from tasks.fp16_emulation import emulation_runner
    from tasks.precision import fp16_from_onnx
    from tasks.repair import _session

    model, _ = overflowing_mlp()
    onnx.save(model, str(tmp_path / "m.onnx"))
    built = OnnxRuntimeBuilder().engine_from_onnx(tmp_path / "m.onnx", tmp_path, (1, 4, 16), {"threads": 3})
    info = EngineInfo.model_validate({**built.info, "engine_file": built.engine_file, "threads": 3})
    fp16_from_onnx(tmp_path / "m.onnx", tmp_path / "half.onnx")
    emulation, _ = emulation_runner(tmp_path / "half.onnx", tmp_path, threads=2)
    for runner, threads in ((OnnxRuntimeBuilder().runner_from_engine(tmp_path / built.engine_file, info), 3), (emulation, 2)):
        with runner:
            options = runner._sess.get_session_options()
            assert (options.intra_op_num_threads, options.inter_op_num_threads) == (threads, 1)
    options = _session(model, True, 5).get_session_options()  # repair's ranking sessions
    assert (options.intra_op_num_threads, options.inter_op_num_threads) == (5, 1)
