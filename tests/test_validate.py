import shutil

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from tasks.data import load_splits
from tasks.errors import OnnxValidationError
from tasks.validate import check_onnx, validated_onnx


@pytest.fixture
def sample(trained):
    return load_splits(trained.data)["x_val"][:4]


def test_exported_model_passes_every_check(trained, tmp_path):
    ref = validated_onnx(trained.onnx, trained.data, tmp_path)
    assert set(ref.meta["checks"]) == {"onnx.checker", "shape inference", "self-contained", "dynamic batch", "onnxruntime load", "inference"}


def _copy(trained, tmp_path):
    dst = tmp_path / "m.onnx"
    shutil.copyfile(trained.onnx.path("model.onnx"), dst)
    return dst


def test_truncated_file_fails_the_checker(trained, tmp_path, sample):
    path = _copy(trained, tmp_path)
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(OnnxValidationError, match="onnx.checker"):
        check_onnx(path, sample, 10)


def test_reshaped_initializer_passes_checker_but_fails_inference(trained, tmp_path, sample):
    """The checker misses a weight of the wrong shape with the same element count."""
    path = _copy(trained, tmp_path)
    model = onnx.load(str(path))
    init = max(model.graph.initializer, key=lambda t: len(t.dims))
    arr = numpy_helper.to_array(init)
    init.CopyFrom(numpy_helper.from_array(arr.reshape(arr.shape[::-1]).copy(), init.name))
    onnx.save(model, str(path))
    onnx.checker.check_model(str(path), full_check=False)  # what the checker alone says: fine
    with pytest.raises(OnnxValidationError, match="'(inference|onnxruntime load|strict shape inference|onnx.checker)'"):
        check_onnx(path, sample, 10)


def test_unknown_opset_fails_in_onnxruntime(trained, tmp_path, sample):
    path = _copy(trained, tmp_path)
    model = onnx.load(str(path))
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            o.version = 99
    onnx.save(model, str(path))
    with pytest.raises(OnnxValidationError) as err:
        check_onnx(path, sample, 10)
    assert "99" in str(err.value) or "opset" in str(err.value).lower()


def test_wrong_class_count_is_reported(trained, tmp_path, sample):
    with pytest.raises(OnnxValidationError, match="output shape"):
        check_onnx(trained.onnx.path("model.onnx"), sample, 7)


def test_nan_weights_are_reported(trained, tmp_path, sample):
    path = _copy(trained, tmp_path)
    model = onnx.load(str(path))
    init = next(t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 1)
    arr = numpy_helper.to_array(init).copy()
    arr[...] = np.nan
    init.CopyFrom(numpy_helper.from_array(arr, init.name))
    onnx.save(model, str(path))
    with pytest.raises(OnnxValidationError, match="finite outputs"):
        check_onnx(path, sample, 10)
