import json

import numpy as np
import onnx
import pytest
from _precision_models import overflowing_mlp, run
from onnx import TensorProto, helper, numpy_helper

from tasks.compare import compare_outputs
from tasks.config import Backend, BatchProfile, Precision, default_tolerances
from tasks.emulation import NothingToEmulateError, emulation_of

FP16 = TensorProto.FLOAT16
#: what reports call the two ways of verifying fp16
EMULATED = "fp16 emulated on CPU"
NATIVE = "native fp16"


def fp16(model, **kw):
    from onnxruntime.transformers.float16 import convert_float_to_float16

    from tasks.precisions.onnx_graph import topologically_sorted

    out = convert_float_to_float16(model, keep_io_types=True, **kw)
    topologically_sorted(out.graph)
    return out


def test_overflow_that_the_cpu_hides_fails_under_emulation():
    model, x = overflowing_mlp()
    ref = run(model, x)
    half = fp16(model)
    tol = default_tolerances()[Precision.fp16]
    # ONNX Runtime's CPU computes the fp16 graph in fp32: it passes, although fp16 would overflow.
    assert compare_outputs({"logits": ref}, {"logits": run(half, x)}, tol, "cpu").passed
    emulated, info = emulation_of(half, FP16)
    onnx.checker.check_model(emulated)
    out = run(emulated, x, optimize=False)
    assert not np.isfinite(out).all()
    result = compare_outputs({"logits": ref}, {"logits": out}, tol, "fp16 emulated")
    assert not result.passed and "finite share" in result.failures()[0]
    assert info.rounded_tensors >= 4 and info.untyped_tensors == 0


def _identity_fp32(n_nodes: int = 1):
    """x -> Mul(1) [-> Mul(1) ...] -> y in fp32."""
    one = numpy_helper.from_array(np.ones(1, np.float32), "one")
    names = ["x", *[f"t{i}" for i in range(n_nodes - 1)], "y"]
    nodes = [helper.make_node("Mul", [names[i], "one"], [names[i + 1]], name=f"mul{i}") for i in range(n_nodes)]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], [one]
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def _identity_fp16(n_nodes: int = 1, **kw):
    """``_identity_fp32`` converted to fp16 with fp32 inputs/outputs."""
    return fp16(_identity_fp32(n_nodes), **kw)


def test_rounds_like_fp16_between_nodes_and_keeps_names():
    x = np.array([[1.0001, 3.14159265, 70000.0, 1e-9]], np.float32)
    emulated, _ = emulation_of(_identity_fp16(), FP16)
    out = run(emulated, x, optimize=False)
    with np.errstate(over="ignore"):
        expected = x.astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(out, expected)
    assert np.isinf(out[0, 2]) and out[0, 0] != x[0, 0]  # overflow and rounding, as a GPU holds them
    assert [i.name for i in emulated.graph.input] == ["x"] and [o.name for o in emulated.graph.output] == ["y"]
    assert all(t.data_type != TensorProto.FLOAT16 for t in emulated.graph.initializer)


def test_fp32_islands_are_not_rounded(tmp_path):
    from tasks.precisions.fp16 import fp16_from_onnx

    x = np.array([[1.0001, 2.0002, 70000.0, 3.0003]], np.float32)
    src = tmp_path / "fp32.onnx"
    onnx.save(_identity_fp32(2), str(src))
    half = tmp_path / "fp16.onnx"
    fp16_from_onnx(src, half, keep_fp32=["mul1"])
    emulated, info = emulation_of(onnx.load(str(half)), FP16)
    out = run(emulated, x, optimize=False)
    # mul0 rounds its output (70000 -> inf); mul1 then computes in fp32 and its output is not rounded
    assert np.isinf(out[0, 2]) and out[0, 0] == np.float32(np.float16(1.0001))
    fp16_from_onnx(src, half, keep_fp32=["mul0", "mul1"])
    with pytest.raises(NothingToEmulateError):  # both nodes in fp32: nothing left to round, the variant is all fp32
        emulation_of(onnx.load(str(half)), FP16)
    fp16_from_onnx(src, half, keep_fp32=["mul0"])
    emulated, info = emulation_of(onnx.load(str(half)), FP16)
    out = run(emulated, x, optimize=False)
    # mul0 in fp32: 70000 survives it, then mul1 (fp16) receives it rounded to fp16 -> inf; 1.0001 rounds once
    assert np.isinf(out[0, 2]) and out[0, 0] == np.float32(np.float16(1.0001)) and info.fp32_tensors >= 1


def test_a_model_without_fp16_is_refused():
    model, _ = overflowing_mlp()
    with pytest.raises(ValueError, match="fp16 variant"):
        emulation_of(model, FP16)


def test_fp16_typed_constants_casts_and_io_become_fp32():
    c = numpy_helper.from_array(np.array([2.0], np.float16), "c")
    nodes = [
        helper.make_node("Constant", [], ["k"], value=c, name="const"),
        helper.make_node("Mul", ["x", "k"], ["m"], name="mul"),
        helper.make_node("Cast", ["m"], ["y"], to=TensorProto.FLOAT16, name="cast"),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["N"])], [helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["N"])]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    emulated, info = emulation_of(model, FP16)
    onnx.checker.check_model(emulated)
    assert emulated.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert emulated.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    x = np.array([1.0001, 40000.0], np.float32)
    out = run(emulated, x, optimize=False)
    assert out[0] == np.float32(np.float16(np.float16(1.0001) * 2)) and np.isinf(out[1])
    assert info.rounded_tensors == 4  # the input, k, m, y


@pytest.fixture(scope="module")
def fp16_engine(trained, tmp_path_factory):
    from tasks.engine import engine_from_variant
    from tasks.precision import variant_from_onnx

    root = tmp_path_factory.mktemp("emulation")
    variant = variant_from_onnx(trained.onnx, trained.data, Precision.fp16, 64, root)
    return root, variant, engine_from_variant(variant, Backend.onnxruntime, BatchProfile(min=1, opt=8, max=64), {"threads": 1}, root)


def test_verify_runs_the_emulation_on_a_cpu_backend_and_says_so(trained, fp16_engine):
    from tasks.verify import verification_of_engine

    root, variant, engine = fp16_engine
    batch = BatchProfile(min=1, opt=8, max=64)
    tol = default_tolerances()[Precision.fp16]
    ref = verification_of_engine(engine, trained.checkpoint, trained.data, Precision.fp16, tol, batch, root, variant=variant)
    report = json.loads(ref.path("verification.json").read_text())
    assert report["numerics"] == EMULATED == ref.meta["numerics"]
    by_label = {b["label"]: b for b in report["batches"]}
    assert "fp16 emulated batch 8" in by_label and report["emulation"]["rounded_tensors"] > 5
    emulated = by_label["fp16 emulated batch 8"]["outputs"]["logits"]
    cpu = by_label["fp16 batch 8"]["outputs"]["logits"]
    # the emulation rounds activations the CPU engine keeps in fp32: its error is larger, not equal
    assert emulated["max_abs"] > cpu["max_abs"]
    # without the variant the report does not pretend fp16 was checked: the engine's own graph computes in fp32
    from tasks.errors import PrecisionShareError

    with pytest.raises(PrecisionShareError, match="0 of 4 compute operators run in fp16"):
        verification_of_engine(engine, trained.checkpoint, trained.data, Precision.fp16, tol, batch, root)
    assert "not emulated" in json.loads((root / "reports" / "verify-fp16.json").read_text())["numerics"]


def test_native_backends_need_no_emulation():
    from tasks.verify import numerics_of

    assert numerics_of("tensorrt", Precision.fp16) == NATIVE
    assert numerics_of("onnxruntime", Precision.fp16) == EMULATED
    assert numerics_of("onnxruntime", Precision.int8) == "native int8"


def test_an_emulation_that_cannot_run_is_reported_not_hidden(trained, fp16_engine, monkeypatch):
    import tasks.verify
    from tasks.verify import verification_of_engine

    def broken(*_, **__):
        raise RuntimeError("unsupported op")

    monkeypatch.setattr(tasks.verify, "emulation_runner", broken)
    root, variant, engine = fp16_engine
    tol = default_tolerances()[Precision.fp16]
    ref = verification_of_engine(engine, trained.checkpoint, trained.data, Precision.fp16, tol, BatchProfile(min=1, opt=8, max=64), root, refresh=True, variant=variant)
    assert ref.meta["numerics"].startswith("fp16 weights, computed in fp32 (emulation failed: unsupported op")


def _one_op(op: str, x_shape, weights: dict, inputs: list[str], **attrs):
    """x (fp32) -> one ``op`` -> y (fp32), for the op kinds fp16 variants hold."""
    graph = helper.make_graph(
        [helper.make_node(op, inputs, ["y"], name=op.lower(), **attrs)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in weights.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


ONE_OP_CASES = {
    # every case computes 1e5 (past fp16's 65504) from inputs and weights that fit fp16
    "Conv": (_one_op("Conv", [1, 1, 2, 2], {"w": np.full((1, 1, 1, 1), 1000.0)}, ["x", "w"]), np.full((1, 1, 2, 2), 100.0, np.float32)),
    "ConvTranspose": (_one_op("ConvTranspose", [1, 1, 2, 2], {"w": np.full((1, 1, 1, 1), 1000.0)}, ["x", "w"]), np.full((1, 1, 2, 2), 100.0, np.float32)),
    "Gemm": (_one_op("Gemm", [1, 2], {"w": np.full((2, 2), 500.0)}, ["x", "w"]), np.full((1, 2), 100.0, np.float32)),
    "MatMul": (_one_op("MatMul", [1, 2], {"w": np.full((2, 2), 500.0)}, ["x", "w"]), np.full((1, 2), 100.0, np.float32)),
    "Mul": (_one_op("Mul", [1, 2], {"w": np.full((1, 2), 1000.0)}, ["x", "w"]), np.full((1, 2), 100.0, np.float32)),
    "Add": (_one_op("Add", [1, 2], {"w": np.full((1, 2), 50000.0)}, ["x", "w"]), np.full((1, 2), 50000.0, np.float32)),
    "Exp": (_one_op("Exp", [1, 2], {}, ["x"]), np.full((1, 2), np.log(1e5), np.float32)),
    "ReduceSum": (_one_op("ReduceSum", [1, 4], {}, ["x"], keepdims=1), np.full((1, 4), 25000.0, np.float32)),
}


@pytest.mark.parametrize("op", list(ONE_OP_CASES))
def test_every_op_kind_rounds_its_output_to_fp16(op):
    model, x = ONE_OP_CASES[op]
    exact = run(model, x, optimize=False)
    assert np.isfinite(exact).all() and np.abs(exact).max() >= 1e5 * 0.99  # fp32 holds the value
    emulated, info = emulation_of(fp16(model), FP16)
    out = run(emulated, x, optimize=False)
    assert np.isinf(out).all(), (op, out)  # the op's own output went through fp16: inf, as on a GPU
    assert info.rounded_tensors >= 2  # the input and the op's output
