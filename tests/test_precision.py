import json

import onnx
import pytest

from tasks.config import Precision
from tasks.precision import variant_from_onnx
from tasks.precisions.onnx_graph import topologically_sorted
from tasks.validate import validated_onnx


@pytest.mark.parametrize("precision", list(Precision))
def test_variants_are_valid_and_typed(trained, tmp_path, precision):
    ref = variant_from_onnx(trained.onnx, trained.data, precision, 64, tmp_path)
    validated_onnx(ref, trained.data, tmp_path)
    model = onnx.load(str(ref.path("model.onnx")))
    types = {t.data_type for t in model.graph.initializer}
    ops = {n.op_type for n in model.graph.node}
    io = {i.type.tensor_type.elem_type for i in [*model.graph.input, *model.graph.output]}
    assert io == {onnx.TensorProto.FLOAT}  # callers always feed and read fp32
    if precision is Precision.fp16:
        assert onnx.TensorProto.FLOAT16 in types
    if precision is Precision.bf16:
        # Strongly typed bf16 (opset 22: Conv and pooling take bf16), validated on a CPU as its emulation.
        assert onnx.TensorProto.BFLOAT16 in types and onnx.TensorProto.FLOAT not in types and ref.meta["conversion"]["opset"] == 22
        assert "fp32_ops" not in ref.meta["conversion"], ref.meta["conversion"]  # every float op of the CNN takes bf16
        assert "bf16 rounding emulation" in json.loads(validated_onnx(ref, trained.data, tmp_path).path("validation.json").read_text())["checks"]["onnxruntime load"]
    if precision is Precision.int8:
        assert {"QuantizeLinear", "DequantizeLinear"} <= ops
        assert onnx.TensorProto.INT8 in types
        assert onnx.TensorProto.INT32 not in types  # TensorRT rejects int32 biases


def test_only_int8_depends_on_the_data(trained, tmp_path):
    from dataclasses import replace

    from tasks.precision import SPEC
    from tasks.stage import stage_key

    other_data = trained.data.model_copy(update={"files": {"splits.npz": "0" * 64}})
    for p in Precision:
        a = stage_key(SPEC, {"model": trained.onnx, "data": trained.data, "precision": p, "calibration_samples": 64})
        b = stage_key(SPEC, {"model": trained.onnx, "data": other_data, "precision": p, "calibration_samples": 32})
        assert (a == b) == (p is not Precision.int8)
    del replace


def test_topological_sort_fixes_appended_casts():
    from onnx import helper

    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
    second = helper.make_node("Relu", ["t"], ["y"])
    first = helper.make_node("Neg", ["x"], ["t"])
    graph = helper.make_graph([second, first], "g", [x], [y])
    topologically_sorted(graph)
    assert [n.op_type for n in graph.node] == ["Neg", "Relu"]
    onnx.checker.check_model(helper.make_model(graph))


def test_int8_quantization_never_writes_beside_its_input_and_runs_concurrently(trained, tmp_path):
    """quantize_static writes '<input>-inferred.onnx' next to its input: it must work on a private copy."""
    from concurrent.futures import ThreadPoolExecutor

    export_dir = trained.onnx.dir
    before = sorted(p.name for p in export_dir.iterdir())
    roots = [tmp_path / f"r{i}" for i in range(3)]
    with ThreadPoolExecutor(3) as pool:
        refs = list(pool.map(lambda r: variant_from_onnx(trained.onnx, trained.data, Precision.int8, 32, r), roots))
    assert sorted(p.name for p in export_dir.iterdir()) == before
    assert trained.onnx.problems() == []
    assert len({r.digest for r in refs}) == 1
    assert all(set(r.files) == {"model.onnx"} for r in refs)  # no scratch files committed


def test_unnamed_nodes_get_stable_unique_names():
    from onnx import helper

    from tasks.precisions.onnx_graph import named_nodes

    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
    nodes = [helper.make_node("Neg", ["x"], ["a"]), helper.make_node("Neg", ["a"], ["b"], name="Neg_0"), helper.make_node("Relu", ["b"], ["y"])]
    model = named_nodes(helper.make_model(helper.make_graph(nodes, "g", [x], [y])))
    names = [n.name for n in model.graph.node]
    assert names == ["Neg_0_", "Neg_0", "Relu_2"] and len(set(names)) == 3


def test_int8_quantizes_only_the_inputs_of_compute_ops_so_tensorrt_accepts_constants(tmp_path):
    """A Mul by a scalar constant (attention's x * 0.125, a gain) quantized by default gave an int8
    initializer that TensorRT's builder refused; only Conv/Gemm/MatMul inputs are quantized now."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    from tasks.precisions.int8 import INT8_OPS, int8_from_onnx

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "w")
    gain = numpy_helper.from_array(np.array(0.125, dtype=np.float32), "gain")
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="fc"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Mul", ["r", "gain"], ["y"], name="scale"),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], [w, gain]), opset_imports=[helper.make_opsetid("", 17)])
    src, dst = tmp_path / "fp32.onnx", tmp_path / "int8.onnx"
    onnx.save(model, str(src))
    int8_from_onnx(src, dst, rng.standard_normal((64, 8)).astype(np.float32))

    q = onnx.load(str(dst))
    consumers: dict[str, list[str]] = {}
    for n in q.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n.op_type)
    inits = {t.name: t for t in q.graph.initializer}
    # Every int8 constant is a weight dequantized straight into a compute op; the gain stays float.
    int8_consts = [n for n in q.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    assert int8_consts and all(set(consumers[n.output[0]]) <= set(INT8_OPS) for n in int8_consts)
    assert inits["gain"].data_type == TensorProto.FLOAT
    assert not any("gain" in n.input[0] for n in q.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear"))
