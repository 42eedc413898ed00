"""Which precision the compute operators of a variant (ONNX graph) or engine (TensorRT's layer report) run in."""

import json

import numpy as np
import onnx
import pytest
from _precision_models import outlier_channel_mlp, overflowing_mlp
from onnx import TensorProto, helper

from tasks.compute_share import ENGINE_INSPECTOR, ONNX_GRAPH, engine_compute_share, onnx_compute_share
from tasks.precisions.fp16 import fp16_from_onnx
from tasks.precisions.int8 import int8_from_onnx


def _variant(tmp_path, model, kind, keep=()):
    src, dst = tmp_path / "fp32.onnx", tmp_path / f"{kind}-{len(keep)}.onnx"
    onnx.save(model, str(src))
    if kind == "fp16":
        fp16_from_onnx(src, dst, keep)
    else:
        int8_from_onnx(src, dst, np.random.default_rng(0).normal(size=(64, 8)).astype(np.float32), keep)
    return onnx.load(str(dst))


def test_int8_counts_the_products_whose_operands_are_dequantized(tmp_path):
    model, _ = outlier_channel_mlp()  # fc1, relu, scale (Mul), fc2: two compute operators
    assert onnx_compute_share(model).by_precision == {"fp32": 2}
    assert onnx_compute_share(_variant(tmp_path, model, "int8")).by_precision == {"int8": 2}
    one = onnx_compute_share(_variant(tmp_path, model, "int8", ["fc2"]))
    assert one.by_precision == {"int8": 1, "fp32": 1} and one.share("int8") == 0.5 and one.source == ONNX_GRAPH
    # a repair that kept every compute operator leaves an "int8" variant with no int8 in it
    none = onnx_compute_share(_variant(tmp_path, model, "int8", ["fc1", "fc2"]))
    assert none.by_precision == {"fp32": 2} and none.share("int8") == 0.0 and none.total == 2


def test_fp16_counts_the_products_that_read_fp16(tmp_path):
    model, _ = overflowing_mlp()  # fc0, relu, fc1, fc2
    assert onnx_compute_share(_variant(tmp_path, model, "fp16")).by_precision == {"fp16": 3}
    kept = onnx_compute_share(_variant(tmp_path, model, "fp16", ["fc1", "fc2"]))
    assert kept.by_precision == {"fp16": 1, "fp32": 2} and kept.share("fp16") == pytest.approx(1 / 3)


def test_integer_kernels_count_as_int8_and_integer_only_products_not_at_all():
    nodes = [
        helper.make_node("MatMulInteger", ["a", "b"], ["ab"], name="mmi"),
        helper.make_node("MatMul", ["ids", "ids2"], ["p"], name="int_product"),  # int64 x int64: no float arithmetic
    ]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("a", TensorProto.INT8, [2, 2]), helper.make_tensor_value_info("b", TensorProto.INT8, [2, 2]),
         helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 2]), helper.make_tensor_value_info("ids2", TensorProto.INT64, [2, 2])],
        [helper.make_tensor_value_info("ab", TensorProto.INT32, [2, 2]), helper.make_tensor_value_info("p", TensorProto.INT64, [2, 2])],
    )
    share = onnx_compute_share(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert share.by_precision == {"int8": 1}


def _layer(kind, fmt, name=None):
    return {"Name": name or kind.lower(), "LayerType": kind, "Inputs": [{"Name": "i", "Format/Datatype": fmt}], "Outputs": [{"Name": "o", "Format/Datatype": "Float"}]}


def test_engine_report_counts_compute_layers_by_their_input_precision():
    report = {"Layers": [
        _layer("Reformat", "Row major linear FP32"),
        _layer("CaskConvolution", "Thirty-two wide channel vectorized row major Int8 format."),
        _layer("CaskGemmConvolution", "Half"),
        _layer("CaskPooling", "Int8"),
        _layer("MatrixMultiply", "Row major linear FP32"),
        _layer("Myelin", "Half", name="{ForeignNode[/attn/MatMul.../Softmax]}"),
    ]}
    share = engine_compute_share(json.dumps(report))
    assert share.source == ENGINE_INSPECTOR
    assert share.by_precision == {"fp16": 1, "fp32": 1, "int8": 1, "unknown": 1}  # the fused region is not typed
    assert share.share("int8") == 0.25
    # a report that types no compute layer says nothing: the ONNX graph is asked instead
    assert engine_compute_share({"Layers": ["conv1 + relu", "fc"], "Bindings": []}) is None
    assert engine_compute_share("{}") is None
