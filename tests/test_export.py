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


# --- dynamic axes beyond the batch -------------------------------------------------------------------

_TEXT = [{"name": "input_ids", "dtype": "int64", "shape": [12]}, {"name": "attention_mask", "dtype": "int64", "shape": [12]}]
_SEQ = [("input_ids_axis1", 2, 48, [("input_ids", 1), ("attention_mask", 1)])]


class _MaskedMean(torch.nn.Module):
    """Length-independent: pools over the sequence with the mask."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.head = torch.nn.Embedding(20, 4), torch.nn.Linear(4, 3)

    def forward(self, input_ids, attention_mask):
        m = attention_mask.unsqueeze(-1).float()
        return (self.head((self.emb(input_ids) * m).sum(1) / m.sum(1).clamp(min=1.0)),)


class _Flattening(torch.nn.Module):
    """Bakes in the dataset's length: a Linear over the flattened sequence."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.head = torch.nn.Embedding(20, 4), torch.nn.Linear(12 * 4, 3)

    def forward(self, input_ids, attention_mask):
        return (self.head((self.emb(input_ids) * attention_mask.unsqueeze(-1)).flatten(1)),)


class _Positions(torch.nn.Module):
    """Runs up to 16 positions only (a learnt position table), while 48 are declared."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.pos, self.head = torch.nn.Embedding(20, 4), torch.nn.Embedding(16, 4), torch.nn.Linear(4, 3)

    def forward(self, input_ids, attention_mask):
        t = input_ids.shape[1]
        h = (self.emb(input_ids) + self.pos.weight[:t]) * attention_mask.unsqueeze(-1)
        return (self.head(h.mean(1)),)


def test_declared_axes_are_symbolic_in_the_onnx_file_and_run_at_any_length(tmp_path):
    import numpy as np
    import onnxruntime as ort

    from tasks.models import bind

    model = bind(_MaskedMean().eval(), {"input_ids": "input_ids", "attention_mask": "attention_mask"})
    meta = onnx_from_module(model, None, tmp_path / "m.onnx", inputs=_TEXT, outputs=["logits"], dims=_SEQ)
    assert meta["dynamic_axes"] == {"input_ids": {1: "input_ids_axis1"}, "attention_mask": {1: "input_ids_axis1"}}
    proto = onnx.load(str(tmp_path / "m.onnx"))
    assert [[d.dim_param for d in i.type.tensor_type.shape.dim] for i in proto.graph.input] == [["batch", "input_ids_axis1"]] * 2
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"))
    for t in (2, 12, 48):
        ids, mask = np.ones((3, t), np.int64), np.ones((3, t), np.int64)
        with torch.no_grad():
            want = model(torch.from_numpy(ids), torch.from_numpy(mask))[0].numpy()
        np.testing.assert_allclose(sess.run(None, {"input_ids": ids, "attention_mask": mask})[0], want, atol=1e-5)


def test_a_model_that_fixes_a_declared_length_names_the_layer_and_operation(tmp_path):
    from tasks.models import bind

    with pytest.raises(ExportError) as info:
        onnx_from_module(bind(_Flattening().eval(), {"input_ids": "input_ids", "attention_mask": "attention_mask"}), None, tmp_path / "m.onnx", inputs=_TEXT, outputs=["logits"], dims=_SEQ)
    err = info.value
    # The exporter would have fixed the length to 12 without a word; the error names where and how.
    assert "fixes input_ids axis 1 (declared 2..48, operation" in err.summary and "test_export.py:" in err.summary
    assert "fixes it to 12" in err.got and "flatten(1)" in err.got
    assert len(err.summary) <= 150 and "--max-shapes" in err.fix and not err.summary.endswith("…")


def test_a_model_that_limits_a_declared_length_names_the_layer(tmp_path):
    from tasks.models import bind

    with pytest.raises(ExportError) as info:
        onnx_from_module(bind(_Positions().eval(), {"input_ids": "input_ids", "attention_mask": "attention_mask"}), None, tmp_path / "m.onnx", inputs=_TEXT, outputs=["logits"], dims=_SEQ)
    err = info.value
    assert "input_ids axis 1" in err.summary and "(declared 2..48" in err.summary, err.summary
    assert "test_export.py" in err.got and "self.pos.weight[:t]" in err.got, err.got
