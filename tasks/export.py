"""Stage ``export``: PyTorch module -> one self-contained ONNX file with a dynamic batch axis."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.artifacts import ArtifactRef
from tasks.errors import ExportError
from tasks.stage import StageSpec, run_stage

if TYPE_CHECKING:
    from torch import nn

log = logging.getLogger("trtflow.export")

SPEC = StageSpec("export", modules=("export.py",), libraries=("torch", "onnx", "onnxscript"))
ONNX_FILE = "model.onnx"
INPUT_NAME = "input"
OUTPUT_NAME = "logits"


def onnx_from_module(model: nn.Module, sample_shape: tuple[int, ...], path: Path) -> dict[str, Any]:
    """Export a module with the dynamo exporter: eval mode, no grad, dynamic batch, weights inside.

    Args:
        model: the trained module.
        sample_shape: shape of one sample (C, H, W).
        path: where to write the .onnx file.

    Returns:
        opset, IR version, input and output names.

    Raises:
        ExportError: the exporter cannot handle the model.
    """
    import onnx
    import torch

    model.eval()
    # Batch 2, not 1: the exporter specialises size-1 dimensions to static 1.
    example = torch.zeros((2, *sample_shape), dtype=torch.float32)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                (example,),
                str(path),
                dynamo=True,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1 << 20)},),
                # Default is a separate .onnx.data file; one file is what TensorRT users expect to ship.
                external_data=False,
                verbose=False,
            )
    except OSError:
        raise  # a full or failing disk is not the model's fault (the staging folder reports it)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(
            got=f"{type(exc).__name__}: {first[:400]}",
            expected="a model torch.export can trace",
            because="the model uses Python control flow or operations the dynamo ONNX exporter cannot capture",
            fix="make forward() traceable (no data-dependent branches, no .item()/.numpy()), or simplify the model",
        ) from exc
    proto = onnx.load(str(path), load_external_data=False)
    _strip_stack_traces(proto)
    onnx.save(proto, str(path))
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    return {
        "opset": opset,
        "ir_version": proto.ir_version,
        "inputs": [i.name for i in proto.graph.input],
        "outputs": [o.name for o in proto.graph.output],
        "producer": f"{proto.producer_name} {proto.producer_version}",
    }


def _strip_stack_traces(proto: Any) -> None:
    # The exporter records each node's Python stack trace, i.e. absolute paths of this machine
    # (site-packages, the user's home): they have no place in a file that ships.
    for nodes in [proto.graph.node, *(f.node for f in proto.functions)]:
        for node in nodes:
            keep = [p for p in node.metadata_props if p.key != "pkg.torch.onnx.stack_trace"]
            if len(keep) != len(node.metadata_props):
                del node.metadata_props[:]
                node.metadata_props.extend(keep)


def onnx_from_checkpoint(checkpoint: ArtifactRef, artifacts_dir: Path, refresh: bool = False) -> ArtifactRef:
    """Export the trained model of a ``train`` artifact.

    Returns:
        The ``export`` artifact with ``model.onnx``; meta has opset, IR version and tensor names.

    Raises:
        ExportError: the exporter cannot handle the model.
    """

    def make(out: Path) -> dict[str, Any]:
        from tasks.train import module_from_checkpoint

        model = module_from_checkpoint(checkpoint)
        shape = tuple(checkpoint.meta["sample_shape"])
        meta = onnx_from_module(model, shape, out / ONNX_FILE)
        meta.update(sample_shape=list(shape), num_classes=checkpoint.meta["num_classes"], precision="fp32")
        log.info("export: opset %s, IR %s, %s -> %s", meta["opset"], meta["ir_version"], meta["inputs"], meta["outputs"])
        return meta

    return run_stage(SPEC, {"checkpoint": checkpoint}, artifacts_dir, refresh, make)
