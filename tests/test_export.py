import onnx
import pytest
import torch

from tasks.errors import ExportError
from tasks.export import ONNX_FILE, OUTPUT_NAME, onnx_from_module


def test_export_is_self_contained_with_dynamic_batch(trained):
    ref = trained.onnx
    assert list(ref.files) == [ONNX_FILE]  # no .onnx.data beside it
    proto = onnx.load(str(ref.path(ONNX_FILE)))
    dim0 = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_param and not dim0.dim_value
    assert ref.meta["inputs"] == ["x"] and ref.meta["outputs"] == [OUTPUT_NAME]  # named after the dataset array
    assert ref.meta["opset"] >= 17


class _DataDependent(torch.nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: not exportable
            return x.flatten(1)[:, :3]
        return -x.flatten(1)[:, :3]


def test_untraceable_model_gets_a_clear_error(tmp_path):
    with pytest.raises(ExportError, match="make forward\\(\\) traceable"):
        onnx_from_module(_DataDependent(), (3, 8, 8), tmp_path / "m.onnx")


def test_unexportable_operator_is_named_without_colour_codes(tmp_path):
    """An operator without ONNX translation is named (not blamed on control flow); no ANSI codes, not cut."""
    import torch
    from torch import nn

    from tasks.errors import ExportError
    from tasks.export import onnx_from_module

    class Eig(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.linalg.eigvals(x.flatten(1)[:, :16].reshape(-1, 4, 4)).real

    with pytest.raises(ExportError) as info:
        onnx_from_module(Eig(), (1, 4, 4), tmp_path / "m.onnx")
    err = info.value
    assert "aten.linalg_eig" in err.summary and "control flow" not in str(err)
    assert "\x1b" not in str(err) and "Next steps" not in str(err)
    assert len(err.summary) <= 150 and err.summary.endswith("forward()")
