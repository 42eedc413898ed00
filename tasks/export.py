"""Stage ``export``: PyTorch module -> one self-contained ONNX file with a dynamic batch axis, and the
dynamic axes beyond the batch that the shape profile declares (a sequence length)."""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.artifacts import ArtifactRef
from tasks.config import ShapeProfile
from tasks.errors import ExportError, one_line, plain
from tasks.models import takes_varargs
from tasks.stage import StageSpec, run_stage
from tasks.store import Store

if TYPE_CHECKING:
    from torch import nn

log = logging.getLogger("trtflow.export")

def _key_inputs(inputs: Mapping[str, Any]) -> Mapping[str, Any]:
    # Only the axes beyond the batch shape the export (the batch is always dynamic); no shapes: as before.
    shapes = inputs.get("shapes")
    out = {k: v for k, v in inputs.items() if k != "shapes"}
    if shapes is not None and shapes.axes():
        out["axes"] = shapes.axes()
    return out


SPEC = StageSpec("export", __name__, libraries=("torch", "onnx", "onnxscript"), key_inputs=_key_inputs)
ONNX_FILE = "model.onnx"
INPUT_NAME = "input"
OUTPUT_NAME = "logits"


def onnx_from_module(
    model: nn.Module,
    sample_shape: tuple[int, ...] | None,
    path: Path,
    inputs: list[dict[str, Any]] | None = None,
    outputs: list[str] | None = None,
    dims: Sequence[tuple[str, int, int, list[tuple[str, int]]]] = (),
) -> dict[str, Any]:
    """Export a module with the dynamo exporter: eval mode, no grad, one shared dynamic batch, weights inside.

    Args:
        model: the trained module, taking its inputs positionally (``tasks.models.bind`` makes one).
        sample_shape: shape of one sample of a single float input named ``input`` (when ``inputs`` is None).
        path: where to write the .onnx file.
        inputs: name, dtype and sample shape of each input, in the order ``model`` takes them.
        outputs: names of the outputs, in the order ``model`` returns them (default ``logits``).
        dims: dynamic dimensions beyond the batch (``tasks.shapes.dim_groups``): name, min, max and the
            (input, axis) pairs sharing it; each becomes a symbolic dimension of the ONNX file.

    Returns:
        opset, IR version, input and output names, and ``dynamic_axes`` (input -> axis -> dimension name).

    Raises:
        ExportError: the exporter cannot handle the model, or the model fixes an axis declared dynamic
            (naming the layer and the operation that fixed it).
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
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    # One Dim object for every input: they share one batch axis (one TensorRT profile range); axes of one
    # dimension group share theirs (input_ids and attention_mask: one sequence length).
    per_input: list[dict[int, Any]] = [{0: batch} for _ in inputs]
    sizes = [list(s["shape"]) for s in inputs]
    index = {s["name"]: i for i, s in enumerate(inputs)}
    for name, lo, hi, members in dims:
        dim = torch.export.Dim(name, min=lo, max=hi)
        for inp, axis in members:
            per_input[index[inp]][axis] = dim
            # The example lies inside the range, and is not 1 (the exporter specialises size-1 dimensions).
            sizes[index[inp]][axis - 1] = max(min(sizes[index[inp]][axis - 1], hi), lo, min(2, hi))
    examples = tuple(torch.from_numpy(np.zeros((2, *size), dtype=np.dtype(s["dtype"]))) for s, size in zip(inputs, sizes))
    dynamic_shapes: Any = (tuple(per_input),) if takes_varargs(model) else tuple(per_input)
    declared = [d[0] for d in dims]
    refused: list[str] = []
    try:
        with torch.no_grad(), warnings.catch_warnings(), _declared_axes_stay_dynamic(declared) as seen:
            refused = seen
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                examples,
                str(path),
                dynamo=True,
                # Names are set afterwards (``_rename_values``): the exporter's own renaming can
                # collide with internal values (an output "embedding" beside an Embedding node's
                # "embedding" breaks single static assignment).
                dynamic_shapes=dynamic_shapes,
                # Default is a separate .onnx.data file; one file is what TensorRT users expect to ship.
                external_data=False,
                verbose=False,
            )
    except OSError:
        raise  # a full or failing disk is not the model's fault (the staging folder reports it)
    except Exception as exc:
        if refused:
            raise specialized_axis_error(model, examples, dynamic_shapes, inputs, dims) from exc
        raise export_error(exc) from exc
    proto = onnx.load(str(path), load_external_data=False)
    static = [(inp, axis) for _, _, _, members in dims for inp, axis in members
              if not proto.graph.input[index[inp]].type.tensor_type.shape.dim[axis].dim_param]
    if static:
        raise specialized_axis_error(model, examples, dynamic_shapes, inputs, dims)
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
    # The symbolic dimensions carry the names users see in the ONNX file (Netron, TensorRT's log).
    dynamic_axes: dict[str, dict[int, str]] = {}
    for name, _, _, members in dims:
        for inp, axis in members:
            proto.graph.input[index[inp]].type.tensor_type.shape.dim[axis].dim_param = name
            dynamic_axes.setdefault(inp, {})[axis] = name
    onnx.save(proto, str(path))
    # torch.export may turn a length limit into a runtime assertion (positions up to 512) that the
    # ONNX file drops: run the file at both ends of every range, so the limit is named here.
    if dims and (failure := _fails_at_range_ends(path, inputs, dims)) is not None:
        raise specialized_axis_error(model, examples, dynamic_shapes, inputs, dims, runtime=failure)
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    return {
        "opset": opset,
        "ir_version": proto.ir_version,
        "inputs": [i.name for i in proto.graph.input],
        "outputs": [o.name for o in proto.graph.output],
        "producer": f"{proto.producer_name} {proto.producer_version}",
        "dynamic_axes": dynamic_axes,
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
def _fails_at_range_ends(path: Path, inputs: Sequence[Mapping[str, Any]], dims: Sequence[tuple[str, int, int, list[tuple[str, int]]]]) -> str | None:
    """Run the ONNX file in ONNX Runtime on one sample of zeros at the smallest and the largest size of
    every dynamic dimension; returns what failed (shape and ONNX Runtime's message), or None."""
    import numpy as np
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 4
    so.intra_op_num_threads = 1
    try:
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception:  # noqa: BLE001 - the validate stage names a file ONNX Runtime cannot load
        return None
    for k in (1, 2):  # the min, then the max of every dimension
        sizes = {s["name"]: list(s["shape"]) for s in inputs}
        for _, lo, hi, members in dims:
            for inp, axis in members:
                sizes[inp][axis - 1] = (lo, hi)[k - 1]
        feed = {s["name"]: np.zeros((1, *sizes[s["name"]]), dtype=np.dtype(s["dtype"])) for s in inputs}
        try:
            sess.run(None, feed)
        except Exception as exc:  # noqa: BLE001 - ONNX Runtime's untyped errors
            shown = ",".join(f"{n}:1x{'x'.join(map(str, d))}" for n, d in sizes.items())
            return f"the exported file fails at {shown} in ONNX Runtime ({one_line(str(exc).split('Status Message:')[-1], 160)})"
    return None


#: serialises the exporter's shape-refinement patch (``_declared_axes_stay_dynamic``) between threads
_REFINE_LOCK = threading.Lock()


@contextlib.contextmanager
def _declared_axes_stay_dynamic(names: Sequence[str]) -> Iterator[list[str]]:
    """Stop the exporter from silently fixing a declared dynamic axis.

    When torch.export finds that the model fixes a dynamic dimension, ``torch.onnx.export`` re-exports
    with the dimension refined to the suggested constant, and the ONNX file comes out static without a
    word. For the dimensions in ``names`` the refinement is refused here (the batch keeps the
    exporter's behaviour: the validate stage names a static batch); the list yielded collects the
    refused messages.
    """
    if not names:
        yield []
        return
    import torch.export.dynamic_shapes as dynamic_shapes

    pattern = re.compile(r"\b(" + "|".join(map(re.escape, names)) + r")\b")
    refused: list[str] = []
    with _REFINE_LOCK:
        original = dynamic_shapes.refine_dynamic_shapes_from_suggested_fixes

        def refine(msg: str, shapes: Any) -> Any:
            if pattern.search(msg):
                refused.append(msg)
                raise RuntimeError("a dynamic axis declared by the shape profile was specialized")
            return original(msg, shapes)

        dynamic_shapes.refine_dynamic_shapes_from_suggested_fixes = refine
        # The strict capture then logs the refused guard with a traceback at ERROR: the error names it.
        guards_log = logging.getLogger("torch._guards")
        level = guards_log.level
        guards_log.setLevel(logging.CRITICAL)
        try:
            yield refused
        finally:
            dynamic_shapes.refine_dynamic_shapes_from_suggested_fixes = original
            guards_log.setLevel(level)


def specialized_axis_error(
    model: Any, examples: Any, dynamic_shapes: Any, inputs: Sequence[Mapping[str, Any]],
    dims: Sequence[tuple[str, int, int, list[tuple[str, int]]]], runtime: str | None = None,
) -> ExportError:
    """Name what fixed or limited a dynamic axis: trace the model again with torch.export (guards, not
    runtime assertions) and read its shape guards.

    Args:
        runtime: what failed when the exported file ran (when the export itself passed).

    Returns:
        An ExportError naming the input and axis, the layer (its name in the model and its class), the
        source line, the operation and the guard, with the fix.
    """
    import torch
    import torch.fx.experimental._config as fx_config

    from tasks.diagnose import shape_log

    violation = ""
    with shape_log(model) as log_events:
        try:
            with torch.no_grad(), warnings.catch_warnings(), fx_config.patch(backed_size_oblivious=True):  # type: ignore[attr-defined]
                warnings.simplefilter("ignore")
                torch.export.export(model, examples, dynamic_shapes=dynamic_shapes, strict=False)
        except Exception as exc:  # noqa: BLE001 - torch.export's UserError, or anything the model raises
            violation = plain(str(exc))
    events = [(e.message, e.module, e.where) for e in log_events]
    names = [s["name"] for s in inputs]
    ranges = {(inp, axis): (name, lo, hi) for name, lo, hi, members in dims for inp, axis in members}
    # Symbols torch.export made for each (input, axis): "create_symbol s70 = 12 for L['args'][0].size()[1] ..."
    symbols: dict[str, tuple[str, int]] = {}
    for msg, _, _ in events:
        m = re.match(r"create_symbol (\w+) = \d+ for L\[(?:'args'\]\[(\d+)|'(\w+)')\]\.size\(\)\[(\d+)\]", msg)
        if m:
            inp = names[int(m.group(2))] if m.group(2) is not None and int(m.group(2)) < len(names) else (m.group(3) or "")
            symbols[m.group(1)] = (inp, int(m.group(4)))
    declared = {s for s, at in symbols.items() if at in ranges}
    # The culprit: the last guard on a declared symbol before torch.export fixed that symbol to a number,
    # else (a limit, no fixing) the first guard that is more than the axes' own equality or a 0/1 check.
    trivial = re.compile(r"^(Eq\(s\d+, s\d+\)|Ne\(s\d+, [01]\)|s\d+ [<>]=? [012])$")
    fixed: dict[str, int] = {}
    culprit = None
    last: dict[str, tuple[str, Any, Any]] = {}
    first = None
    for msg, mod, where in events:
        syms = set(re.findall(r"\bs\d+\b", msg)) & declared
        if "[guard added]" in msg and "[guard suppressed]" not in msg and syms:
            expr = re.search(r"eval (.+?) \[guard added\]", msg)
            if expr and trivial.match(expr.group(1).strip()):
                continue
            for sym in syms:
                last[sym] = (msg, mod, where)
            first = first or (msg, mod, where)
        elif (m := re.match(r"set_replacement (\w+) = (-?\d+)\b", msg)) and m.group(1) in declared:
            fixed[m.group(1)] = int(m.group(2))
            culprit = culprit or last.get(m.group(1))
    culprit = culprit or first
    fix = ("make that layer independent of the length (pool or mask over the axis instead of flattening it; "
           "positions for the longest length), or lower --max-shapes to what the model supports, or keep the axis static "
           "(the dataset's length in --min/--opt/--max-shapes)")
    if culprit is None:
        inp, axis = next(iter(ranges))
        name, lo, hi = ranges[(inp, axis)]
        return ExportError(
            got=f"{inp} axis {axis} declared dynamic ({lo}..{hi}) but fixed by the model ({one_line(runtime or violation, 300) or 'the exported file has it static'})",
            expected=f"a model that runs for every {inp} length from {lo} to {hi}", because="the model's code fixes that length", fix=fix,
            summary=f"export: the model fixes {inp} axis {axis} (declared {lo}..{hi}); make it length-independent or narrow --max-shapes",
        )
    msg, mod, where = culprit
    syms = [s for s in re.findall(r"\bs\d+\b", msg) if s in declared]
    inp, axis = symbols[syms[0]]
    name, lo, hi = ranges[(inp, axis)]
    expr = re.search(r"eval (.+?) \[guard added\]", msg)
    guard = re.sub(r"\bs\d+\b", lambda m: f"{symbols[m.group(0)][0]}[{symbols[m.group(0)][1]}]" if m.group(0) in symbols else m.group(0), expr.group(1) if expr else msg)
    op = re.search(r"\bin (\w+)\)", msg)
    operation = op.group(1).removeprefix("meta_") if op else "an operation"
    layer = (f"layer '{mod[0].removeprefix('model.')}' ({mod[1]})" if mod[0] not in ("", "model") else f"forward of {mod[1]}") if mod else "the model"
    line = f" at {Path(where[0]).name}:{where[1]} ({one_line(where[2], 90)})" if where else ""
    what = f"fixes it to {fixed[syms[0]]}" if syms[0] in fixed else f"requires {guard}"
    return ExportError(
        got=f"{inp} axis {axis} declared dynamic ({lo}..{hi}), but {layer}{line} {what}: operation {operation}, guard {guard}",
        expected=f"a model that runs for every {inp} length from {lo} to {hi}",
        because=f"{operation} in {layer} depends on the length (torch.export guard {guard}), so the ONNX file "
        + (f"cannot run every length: {runtime}" if runtime else "would fix it"),
        fix=fix,
        summary=f"export: {layer}{' at ' + Path(where[0]).name + ':' + str(where[1]) if where else ''} {'fixes' if syms[0] in fixed else 'limits'} "
        f"{inp} axis {axis} (declared {lo}..{hi}, operation {operation}); make it length-independent",
    )


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


def _strip_stack_traces(proto: Any) -> None:
    # The exporter records each node's Python stack trace, i.e. absolute paths of this machine
    # (site-packages, the user's home): they have no place in a file that ships.
    for nodes in [proto.graph.node, *(f.node for f in proto.functions)]:
        for node in nodes:
            keep = [p for p in node.metadata_props if p.key != "pkg.torch.onnx.stack_trace"]
            if len(keep) != len(node.metadata_props):
                del node.metadata_props[:]
                node.metadata_props.extend(keep)


def onnx_from_checkpoint(checkpoint: ArtifactRef, store: Store, refresh: bool = False, shapes: ShapeProfile | None = None) -> ArtifactRef:
    """Export the trained model of a ``train`` artifact.

    Args:
        checkpoint: the ``train`` artifact.
        store: the artifact store.
        refresh: export again even if an intact artifact exists.
        shapes: the shape profile; its dynamic axes beyond the batch are exported dynamic (None: the batch only).

    Returns:
        The ``export`` artifact with ``model.onnx``; meta has opset, IR version, tensor names and the
        dynamic axes (input -> axis -> symbolic dimension).

    Raises:
        ExportError: the exporter cannot handle the model, or the model fixes a declared dynamic axis.
        ConfigError: the shapes do not fit the dataset's inputs.
    """

    def make(out: Path) -> dict[str, Any]:
        from tasks.shapes import export_dims
        from tasks.inference import module_from_checkpoint

        model = module_from_checkpoint(checkpoint)
        shape = tuple(checkpoint.meta["sample_shape"])
        inputs = checkpoint.meta.get("inputs") or [{"name": INPUT_NAME, "dtype": "float32", "shape": list(shape)}]
        outputs = list(checkpoint.meta.get("outputs") or [OUTPUT_NAME])
        dims = export_dims(shapes, inputs)
        meta = onnx_from_module(model, shape, out / ONNX_FILE, inputs=inputs, outputs=outputs, dims=dims)
        task_shape = (checkpoint.meta.get("outputs") or {}).get(checkpoint.meta.get("logits_output"))
        meta.update(
            sample_shape=list(shape), num_classes=checkpoint.meta["num_classes"], precision="fp32",
            input_specs=inputs, logits_output=checkpoint.meta.get("logits_output"), task=checkpoint.meta.get("task", "classification"),
            # the width validate checks the logits against; a regression output's width is y's, not checked there
            logits_width=None if checkpoint.meta.get("task") == "regression" else (task_shape or [None, checkpoint.meta["num_classes"]])[-1],
        )
        log.info("export: opset %s, IR %s, %s -> %s%s", meta["opset"], meta["ir_version"], meta["inputs"], meta["outputs"],
                 f", dynamic axes {meta['dynamic_axes']}" if meta["dynamic_axes"] else "")
        return meta

    inputs: dict[str, Any] = {"checkpoint": checkpoint}
    if shapes is not None:
        inputs["shapes"] = shapes
    return run_stage(SPEC, inputs, store, refresh, make)
