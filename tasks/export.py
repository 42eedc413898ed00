"""Stage ``export``: PyTorch module -> one self-contained ONNX file with a dynamic batch axis."""

from __future__ import annotations

import logging
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.artifacts import ArtifactRef
from tasks.errors import ExportError, one_line, plain
from tasks.stage import StageSpec, run_stage

if TYPE_CHECKING:
    from torch import nn

log = logging.getLogger("trtflow.export")

SPEC = StageSpec("export", __name__, libraries=("torch", "onnx", "onnxscript"))
ONNX_FILE = "model.onnx"
INPUT_NAME = "input"
OUTPUT_NAME = "logits"


def onnx_from_module(
    model: nn.Module,
    sample_shape: tuple[int, ...] | None,
    path: Path,
    inputs: list[dict[str, Any]] | None = None,
    outputs: list[str] | None = None,
) -> dict[str, Any]:
    """Export a module with the dynamo exporter: eval mode, no grad, one shared dynamic batch, weights inside.

    Args:
        model: the trained module, taking its inputs positionally (``tasks.models.bind`` makes one).
        sample_shape: shape of one sample of a single float input named ``input`` (when ``inputs`` is None).
        path: where to write the .onnx file.
        inputs: name, dtype and sample shape of each input, in the order ``model`` takes them.
        outputs: names of the outputs, in the order ``model`` returns them (default ``logits``).

    Returns:
        opset, IR version, input and output names.

    Raises:
        ExportError: the exporter cannot handle the model.
        ModelError: an input no operation of the model reads (a misspelt name a ``**kwargs`` forward took).
    """
    import numpy as np
    import onnx
    import torch

    if inputs is None:
        inputs = [{"name": INPUT_NAME, "dtype": "float32", "shape": list(sample_shape or ())}]
    model.eval()
    # "torchvision is not installed. Skipping torchvision::nms" x4 on every first export: noise.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    # Batch 2, not 1: the exporter specialises size-1 dimensions to static 1. Zeros are valid for
    # every input, ids included (index 0 exists in any embedding).
    examples = tuple(torch.from_numpy(np.zeros((2, *s["shape"]), dtype=np.dtype(s["dtype"]))) for s in inputs)
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                examples,
                str(path),
                dynamo=True,
                # Names are set afterwards (``_rename_values``): the exporter's own renaming can
                # collide with internal values (an output "embedding" beside an Embedding node's
                # "embedding" breaks single static assignment).
                # One Dim object for every input: they share one batch axis (one TensorRT profile range).
                dynamic_shapes=(tuple({0: batch} for _ in inputs),) if _takes_varargs(model) else tuple({0: batch} for _ in inputs),
                # Default is a separate .onnx.data file; one file is what TensorRT users expect to ship.
                external_data=False,
                verbose=False,
            )
    except OSError:
        raise  # a full or failing disk is not the model's fault (the staging folder reports it)
    except Exception as exc:
        raise export_error(exc) from exc
    proto = onnx.load(str(path), load_external_data=False)
    _strip_stack_traces(proto)
    wanted_in = [s["name"] for s in inputs]
    wanted_out = list(outputs or [OUTPUT_NAME])
    if len(proto.graph.input) != len(wanted_in) or len(proto.graph.output) != len(wanted_out):
        raise ExportError(
            got=f"an ONNX graph with {len(proto.graph.input)} input(s) and {len(proto.graph.output)} output(s)",
            expected=f"inputs {wanted_in} and outputs {wanted_out}",
            because="the exporter dropped or merged tensors (an input the model ignores, or an output that repeats another or an input)",
            fix="use every input in forward and return each output once (not an input unchanged)",
        )
    mapping = {v.name: w for v, w in zip(proto.graph.input, wanted_in)}
    mapping.update({v.name: w for v, w in zip(proto.graph.output, wanted_out)})
    if len(set(mapping.values())) != len(mapping) or len(mapping) != len(wanted_in) + len(wanted_out):
        raise ExportError(got=f"graph tensors {sorted(mapping)}", expected="distinct inputs and outputs", because="an output is an input passed through, or repeats another output", fix="return each output once, and no input unchanged")
    _rename_values(proto.graph, mapping)
    if unread := unread_inputs(proto):
        from tasks.models import unread_inputs_error

        raise unread_inputs_error(model, unread, wanted_in)
    onnx.save(proto, str(path))
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    return {
        "opset": opset,
        "ir_version": proto.ir_version,
        "inputs": [i.name for i in proto.graph.input],
        "outputs": [o.name for o in proto.graph.output],
        "producer": f"{proto.producer_name} {proto.producer_version}",
    }


def unread_inputs(proto: Any) -> list[str]:
    """The graph inputs that no node reads (subgraphs included) and that are no graph output."""
    read = {o.name for o in proto.graph.output}

    def visit(graph: Any) -> None:
        for node in graph.node:
            read.update(node.input)
            for a in node.attribute:
                for g in (*([a.g] if a.HasField("g") else []), *a.graphs):
                    visit(g)

    visit(proto.graph)
    return [i.name for i in proto.graph.input if i.name not in read]


def export_error(exc: BaseException) -> ExportError:
    """An ExportError that names what the exporter could not handle: the operator, or the control flow.

    The exporter's own message is long, coloured with ANSI codes and starts with generic advice; the
    useful part is the operator without an ONNX translation (e.g. ``aten.linalg_eig``) or the
    data-dependent expression torch.export could not trace.
    """
    text = plain(str(exc))
    ops = list(dict.fromkeys(re.findall(r"OpOverload\(op='([\w.]+)'", text) + re.findall(r"target=torch\.ops\.([\w]+\.[\w]+)", text)))
    if ops:
        names = ", ".join(ops[:3])
        return ExportError(
            got=f"operator {names} in the model, which has no ONNX translation",
            expected="operators the ONNX exporter can translate",
            because="the dynamo ONNX exporter (torch.onnx.export) has no function for it",
            fix=f"replace {ops[0].split('.')[-1]} in forward() by supported operations, or compute it outside the model",
            summary=f"export to ONNX failed: no ONNX translation for {names}; replace it in the model's forward()",
        )
    data_dependent = any(k in text for k in ("data-dependent", "GuardOnDataDependent", "Could not guard", "Dynamic control flow", "torch.cond", ".item()"))
    # The exporter's message opens with generic advice; the cause follows "## Exception summary".
    summary = re.search(r"## Exception summary\s*(.+?)(?:\n\s*\n|\(Refer to|$)", text, re.S)
    core = summary.group(1) if summary else text
    core = re.sub(r"<class '(?:[\w.]*\.)?(\w+)'>", r"\1", core)
    first = next((line.strip() for line in core.splitlines() if line.strip() and not line.strip().startswith("- ")), type(exc).__name__)
    if data_dependent:
        return ExportError(
            got=f"{type(exc).__name__}: {one_line(first, 300)}",
            expected="a forward() that torch.export can trace for any batch",
            because="it branches on, or converts, values of tensors (Python control flow on data)",
            fix="make forward() traceable: no branches on tensor values, no .item()/.numpy()/.tolist() (torch.cond for branches)",
            summary="export to ONNX failed: forward() depends on tensor values (Python control flow); make it traceable",
        )
    return ExportError(
        got=f"{type(exc).__name__}: {one_line(first, 300)}",
        expected="a model the dynamo ONNX exporter can capture",
        because="torch.export or the ONNX translation refused it (see the message)",
        fix="run torch.onnx.export(model, (x,), dynamo=True, report=True) on the model to see the failing step, then simplify that part",
    )
def _rename_values(graph: Any, mapping: dict[str, str]) -> None:
    """Rename graph values (``old -> new``) everywhere they occur; a value already called ``new`` is
    moved aside first, so the graph stays in single static assignment form."""
    taken = {v for n in graph.node for v in n.output} | {t.name for t in graph.initializer}
    taken |= {v.name for v in (*graph.input, *graph.output, *graph.value_info)}
    full = dict(mapping)
    for new in mapping.values():
        if new in taken and new not in mapping:
            k = 1
            while f"{new}__{k}" in taken:
                k += 1
            full[new] = f"{new}__{k}"
    # Apply in one pass: a name may be both moved aside and the target of another rename.
    _apply_names(graph, full)


def _apply_names(graph: Any, full: dict[str, str]) -> None:
    for coll in (graph.input, graph.output, graph.value_info):
        for v in coll:
            v.name = full.get(v.name, v.name)
    for t in graph.initializer:
        t.name = full.get(t.name, t.name)
    for n in graph.node:
        n.input[:] = [full.get(i, i) for i in n.input]
        n.output[:] = [full.get(o, o) for o in n.output]
        for a in n.attribute:  # subgraphs (If, Loop, Scan) may read outer values
            for g in (*([a.g] if a.HasField("g") else []), *a.graphs):
                _apply_names(g, full)


def _takes_varargs(model: nn.Module) -> bool:
    import inspect

    try:
        return any(p.kind is p.VAR_POSITIONAL for p in inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return False


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
        inputs = checkpoint.meta.get("inputs") or [{"name": INPUT_NAME, "dtype": "float32", "shape": list(shape)}]
        outputs = list(checkpoint.meta.get("outputs") or [OUTPUT_NAME])
        meta = onnx_from_module(model, shape, out / ONNX_FILE, inputs=inputs, outputs=outputs)
        meta.update(
            sample_shape=list(shape), num_classes=checkpoint.meta["num_classes"], precision="fp32",
            input_specs=inputs, logits_output=checkpoint.meta.get("logits_output"),
            logits_width=(checkpoint.meta.get("outputs") or {}).get(checkpoint.meta.get("logits_output"), [None, checkpoint.meta["num_classes"]])[-1],
        )
        log.info("export: opset %s, IR %s, %s -> %s", meta["opset"], meta["ir_version"], meta["inputs"], meta["outputs"])
        return meta

    return run_stage(SPEC, {"checkpoint": checkpoint}, artifacts_dir, refresh, make)
