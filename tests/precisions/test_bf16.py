"""bf16 (tasks/precisions/bf16.py): rounding, the strongly typed variant, its emulation on a CPU."""

import ml_dtypes
import numpy as np
import onnx
import pytest
from _precision_models import overflowing_mlp, run
from onnx import TensorProto, helper, numpy_helper

from tasks.emulation import emulation_of, tensor_types
from tasks.precisions import precision_spec
from tasks.precisions.bf16 import BF16_MAX, bf16_bits, bf16_from_onnx, bf16_values

#: values bf16 cannot hold, each with its correct rounding; truncation, round-half-up and fp16 each get one wrong
CASES = {
    1 + 3 * 2**-9: 1 + 2**-7,       # above half an ulp: up (truncation would give 1.0)
    1 + 2**-8: 1.0,                 # a tie, last kept bit even: down (round-half-up would give 1 + 2**-7)
    1 + 2**-7 + 2**-8: 1 + 2**-6,   # a tie, last kept bit odd: up to even
    1 + 2**-10: 1.0,                # below half an ulp: down (fp16 holds it exactly)
    -(1 + 3 * 2**-9): -(1 + 2**-7),
    70000.5: 70144.0,               # past fp16's range, well inside bf16's
}


def test_rounds_to_nearest_even():
    x = np.array(list(CASES), np.float32)
    assert bf16_values(x).tolist() == list(CASES.values())
    assert np.isinf(bf16_values(np.float32([3.4e38]))[0]) and bf16_values(np.float32([BF16_MAX]))[0] == BF16_MAX
    assert np.isnan(bf16_values(np.float32([np.nan]))[0]) and bf16_values(np.float32([-np.inf]))[0] == -np.inf
    r = np.random.default_rng(0).standard_normal(10_000).astype(np.float32) * np.float32(1e3)
    assert (bf16_bits(r) == r.astype(ml_dtypes.bfloat16).view(np.uint16)).all()  # ml_dtypes rounds to nearest even too


def _cnn(weight: float) -> onnx.ModelProto:
    """x (N×1×4×4) -> Conv (every weight ``weight``) -> Relu -> MaxPool -> Flatten -> Gemm -> y (N×3); opset 17, IR 9."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(np.full((2, 1, 3, 3), weight, np.float32), "w"), numpy_helper.from_array(rng.standard_normal((8, 3)).astype(np.float32), "fc")]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("MaxPool", ["r"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["p"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "fc"], ["y"], name="head"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def _convert(tmp_path, model, keep=()):
    src, dst = tmp_path / "fp32.onnx", tmp_path / "bf16.onnx"
    onnx.save(model, str(src))
    details = bf16_from_onnx(src, dst, keep)
    return onnx.load(str(dst)), details


def test_the_variant_is_strongly_typed_bf16_inside_and_fp32_outside(tmp_path):
    from tasks.compute_share import onnx_compute_share

    variant, details = _convert(tmp_path, _cnn(1 + 3 * 2**-9))
    onnx.checker.check_model(variant, full_check=True)
    # Conv and MaxPool take bf16 from opset 22 on: the model is raised to it.
    assert details["opset"] == 22 and details["opset_raised_from"] == 17 and "fp32_ops" not in details
    assert [(i.name, i.type.tensor_type.elem_type) for i in [*variant.graph.input, *variant.graph.output]] == [("x", TensorProto.FLOAT), ("y", TensorProto.FLOAT)]
    assert {t.name: t.data_type for t in variant.graph.initializer} == {"w": TensorProto.BFLOAT16, "fc": TensorProto.BFLOAT16}
    types = tensor_types(variant)
    by_name = {n.name: n for n in variant.graph.node}
    for name in ("conv", "relu", "pool", "flat", "head"):
        assert all(types[t] == TensorProto.BFLOAT16 for t in [*by_name[name].input, *by_name[name].output] if types.get(t) in (TensorProto.FLOAT, TensorProto.BFLOAT16)), name
    assert onnx_compute_share(variant).to_dict("bf16")["by_precision"] == {"bf16": 2}
    # The weight 1 + 3·2^-9 is stored rounded to nearest (1 + 2^-7): not truncated (1.0), not fp16 (exact).
    w = numpy_helper.to_array(next(t for t in variant.graph.initializer if t.name == "w")).astype(np.float32)
    assert (w == np.float32(1 + 2**-7)).all()


def test_a_kept_node_stays_fp32_between_casts_and_its_weights_too(tmp_path):
    model, x = overflowing_mlp()
    variant, details = _convert(tmp_path, model, keep=["fc1"])
    assert details["kept_fp32"] == ["fc1"]
    types = tensor_types(variant)
    fc1 = next(n for n in variant.graph.node if n.name == "fc1")
    fc2 = next(n for n in variant.graph.node if n.name == "fc2")
    assert all(types[t] == TensorProto.FLOAT for t in [*fc1.input, *fc1.output])
    assert types[fc2.input[0]] == TensorProto.BFLOAT16 and types[fc2.input[1]] == TensorProto.BFLOAT16
    assert {t.name: t.data_type for t in variant.graph.initializer}["w1"] == TensorProto.FLOAT
    with pytest.raises(ValueError, match="nodes \\['nope'\\] to keep in fp32"):
        _convert(tmp_path, model, keep=["nope"])


def test_an_operator_without_a_bf16_schema_stays_fp32(tmp_path):
    """Einsum takes no bfloat16 at any opset: it computes in fp32, its neighbours in bf16."""
    w = numpy_helper.from_array(np.eye(3, dtype=np.float32), "w")
    nodes = [helper.make_node("Einsum", ["x", "w"], ["e"], name="einsum", equation="ij,jk->ik"), helper.make_node("Relu", ["e"], ["y"], name="relu")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])], [w])
    variant, details = _convert(tmp_path, helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10))
    assert details["fp32_ops"] == ["Einsum"]
    types = tensor_types(variant)
    relu = next(n for n in variant.graph.node if n.name == "relu")
    assert types["e"] == TensorProto.FLOAT and types[relu.input[0]] == TensorProto.BFLOAT16
    onnx.checker.check_model(variant, full_check=True)


def test_the_emulation_rounds_every_bf16_tensor_on_a_cpu(tmp_path):
    """y = x * 1 in bf16: the CPU's emulation returns x rounded to bf16 (what a GPU holds), not x."""
    one = numpy_helper.from_array(np.ones(4, np.float32), "one")
    graph = helper.make_graph([helper.make_node("Mul", ["x", "one"], ["y"], name="mul")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], [one])
    variant, _ = _convert(tmp_path, helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10))
    emulated, info = emulation_of(variant, precision_spec("bf16").emulation.elem_type)
    assert info.rounded_tensors >= 2 and all(t.data_type == TensorProto.FLOAT for t in emulated.graph.initializer)
    x = np.array([list(CASES)[:4]], np.float32)
    out = run(emulated, x, optimize=False)
    assert out.tolist() == [list(CASES.values())[:4]] and (out != x).any()


def test_the_emulation_of_a_model_tracks_fp32_within_bf16_precision(tmp_path):
    model, x = overflowing_mlp()
    variant, _ = _convert(tmp_path, model)
    out = run(emulation_of(variant, TensorProto.BFLOAT16)[0], x, optimize=False)
    ref = run(model, x)
    # fc1 reaches ~1e5, past fp16's range: bf16 keeps it finite, within a few bf16 ulps.
    assert np.isfinite(out).all()
    rel = np.abs(out - ref).max() / np.abs(ref).max()
    assert 2**-12 < rel < 2**-5  # rounded (not fp32), but not lost


def test_bf16_is_emulated_on_onnxruntime_and_native_on_tensorrt():
    from tasks.verify import numerics_of

    spec = precision_spec("bf16")
    assert not spec.cpu_kernels and spec.reduced and not spec.reads_data and spec.element_type == TensorProto.BFLOAT16
    assert numerics_of("onnxruntime", "bf16") == "bf16 emulated on CPU" and numerics_of("tensorrt", "bf16") == "native bf16"
    # Looser than fp16's gates: bf16 keeps 8 significant bits to fp16's 11.
    assert spec.tolerance["atol"] > precision_spec("fp16").tolerance["atol"] and spec.tolerance["min_cosine"] < precision_spec("fp16").tolerance["min_cosine"]


def test_repair_ranks_bf16_nodes_through_the_emulation(tmp_path):
    """No overflow in bf16 where fp16 overflows: every node adds a finite, rounding-sized error."""
    from tasks.config import Precision
    from tasks.precisions.onnx_graph import named_nodes
    from tasks.repair import next_nodes, node_errors

    model, x = overflowing_mlp()
    variant, _ = _convert(tmp_path, model)
    errors = node_errors(named_nodes(model), variant, {"x": x[:32]}, Precision.bf16)
    assert {e.node for e in errors} == {"fc0", "relu", "fc1", "fc2"}
    assert all(0 <= e.error < 2**-5 and "adds" in e.reason for e in errors)  # none past bf16's range
    worst = next_nodes(errors, kept=[])
    assert worst == [errors[0].node] and errors[0].contribution > 0
    kept, details = _convert(tmp_path, model, keep=worst)
    assert details["kept_fp32"] == worst and node_errors(named_nodes(model), kept, {"x": x[:32]}, Precision.bf16)


def test_onnxruntime_builds_the_emulation_as_the_bf16_engine(tmp_path):
    """ONNX Runtime cannot load the bf16 graph itself (no bf16 Gemm kernel); its engine is the emulation, run unoptimized."""
    import onnxruntime as ort

    from tasks.backends.base import EngineInfo
    from tasks.backends.onnxruntime import OnnxRuntimeBuilder

    model, x = overflowing_mlp()
    _convert(tmp_path, model)
    with pytest.raises(Exception, match="NOT_IMPLEMENTED|implementation"):
        ort.InferenceSession(str(tmp_path / "bf16.onnx"), providers=["CPUExecutionProvider"])
    out_dir = tmp_path / "engine"
    out_dir.mkdir()
    built = OnnxRuntimeBuilder().engine_from_onnx(tmp_path / "bf16.onnx", out_dir, (1, 4, 16), {"threads": 1, "precision": "bf16"})
    assert built.info["emulation"]["label"] == "bf16 emulated on CPU" and built.info["emulation"]["rounded_tensors"] >= 4
    info = EngineInfo.model_validate({**built.info, "engine_file": built.engine_file, "threads": 1})
    with OnnxRuntimeBuilder().runner_from_engine(out_dir / built.engine_file, info) as runner:
        assert runner._sess.get_session_options().graph_optimization_level == ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        got = runner.infer({"x": x[:4]})["logits"]
    np.testing.assert_array_equal(got, run(emulation_of(onnx.load(str(tmp_path / "bf16.onnx")), TensorProto.BFLOAT16)[0], x[:4], optimize=False))


def test_a_gru_stays_fp32_in_bf16_because_tensorrts_parser_refuses_a_bf16_gru(tmp_path):
    """GRU has a bfloat16 schema at opset 22, but TensorRT-RTX's parser rejects it (docs/gpu-build-check.md):
    the variant computes the GRU in fp32 and says so; the Relu after it is still bf16."""
    h, d = 4, 3
    w = numpy_helper.from_array(np.random.default_rng(0).normal(size=(1, 3 * h, d)).astype(np.float32), "w")
    r = numpy_helper.from_array(np.random.default_rng(1).normal(size=(1, 3 * h, h)).astype(np.float32), "r")
    nodes = [helper.make_node("GRU", ["x", "w", "r"], ["seq"], name="gru", hidden_size=h), helper.make_node("Relu", ["seq"], ["y"], name="relu")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5, "N", d])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [5, 1, "N", h])], [w, r])
    variant, details = _convert(tmp_path, helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10))
    assert details["fp32_ops"] == ["GRU"]
    types = tensor_types(variant)
    relu = next(n for n in variant.graph.node if n.name == "relu")
    assert types["seq"] == TensorProto.FLOAT and types[relu.input[0]] == TensorProto.BFLOAT16
    onnx.checker.check_model(variant, full_check=True)
