"""Stage ``validate``: prove an ONNX file is well formed *and* runs.

``onnx.checker`` passes files that cannot run (an initializer reshaped to the wrong shape, an opset the
runtime does not know, a truncated external-data file), so after the checker and strict shape
inference this also loads the file in ONNX Runtime and runs one real batch. A variant of a precision
ONNX Runtime's CPU provider has no kernels for (``PrecisionSpec.cpu_kernels``) is loaded and run as
its rounding emulation, the graph a CPU engine of it is (``tasks.emulation``).
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from tasks.artifacts import ArtifactRef
from tasks.errors import OnnxValidationError
from tasks.precisions import precision_spec
from tasks.stage import StageSpec, run_stage
from tasks.store import Store

log = logging.getLogger("trtflow.validate")

SPEC = StageSpec("validate", __name__, libraries=("onnx", "onnxruntime", "numpy"))
REPORT = "validation.json"


def _fail(check: str, path: Path, detail: str, fix: str) -> OnnxValidationError:
    return OnnxValidationError(
        got=f"check '{check}' failing for {path.name}: {detail}",
        expected="an ONNX file that passes every check",
        because=f"the '{check}' check found the problem above",
        fix=fix,
    )


def check_onnx(
    path: Path, sample: np.ndarray | Mapping[str, np.ndarray], num_classes: int | None, logits: str | None = None,
    dynamic_axes: Mapping[str, Mapping[Any, str]] | None = None, precision: str | None = None,
) -> dict[str, Any]:
    """Run every check on one ONNX file.

    Args:
        path: the ONNX file.
        sample: a real batch (N >= 2 samples), input name -> array; a bare array feeds a one-input model.
        num_classes: expected size of the logits output's last axis (None: not checked); the model's
            logits width, which may exceed the dataset's classes when ``--logits-output`` names a wider head.
        logits: name of the logits output (default: the first output, when ``num_classes`` is given).
        dynamic_axes: input -> axis -> symbolic dimension the export declared beyond the batch (a
            sequence length); each must still be symbolic in this file.
        precision: the file's precision (None: fp32); one without CPU kernels runs as its emulation.

    Returns:
        A report: check name -> detail, plus opset and tensor signatures.

    Raises:
        OnnxValidationError: naming the first check that failed and why.
    """
    import onnx
    import onnxruntime as ort

    report: dict[str, Any] = {"file": path.name, "checks": {}}
    regen = "re-run the stage that made it (--refresh export)"
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:  # ValidationError, InferenceError (full_check), DecodeError, OSError
        raise _fail("onnx.checker", path, str(exc).splitlines()[0][:400], regen) from exc
    report["checks"]["onnx.checker"] = "passed (full_check)"

    with tempfile.TemporaryDirectory() as tmp:
        try:
            onnx.shape_inference.infer_shapes_path(str(path), str(Path(tmp) / "inferred.onnx"), strict_mode=True)
        except Exception as exc:  # onnx raises InferenceError, a C++ exception type
            raise _fail("strict shape inference", path, str(exc).splitlines()[0][:400], regen) from exc
    report["checks"]["shape inference"] = "passed (strict)"

    proto = onnx.load(str(path), load_external_data=False)
    external = [t.name for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    if external:
        raise _fail("self-contained", path, f"{len(external)} initializer(s) stored in external files", "export with external_data=False")
    report["checks"]["self-contained"] = "passed (no external data)"

    inputs = list(proto.graph.input)
    if not isinstance(sample, Mapping):
        if len(inputs) != 1:
            raise _fail("signature", path, f"{len(inputs)} graph inputs", "export a model with exactly one input")
        sample = {inputs[0].name: sample}
    if sorted(i.name for i in inputs) != sorted(sample):
        raise _fail("signature", path, f"graph inputs {[i.name for i in inputs]}, dataset inputs {sorted(sample)}", "export the model with one input per dataset array, named alike")
    for inp in inputs:
        dims = inp.type.tensor_type.shape.dim
        if not dims or not dims[0].dim_param:
            raise _fail("dynamic batch", path, f"batch axis of input '{inp.name}' is static", "export with a dynamic batch dimension")
    report["checks"]["dynamic batch"] = "passed (axis 0 of " + ", ".join(f"'{i.name}' is '{i.type.tensor_type.shape.dim[0].dim_param}'" for i in inputs) + ")"
    if dynamic_axes:
        by_name = {i.name: i for i in inputs}
        for name, axes in dynamic_axes.items():
            for axis in axes:
                dims_of = by_name[name].type.tensor_type.shape.dim if name in by_name else []
                if int(axis) >= len(dims_of) or not dims_of[int(axis)].dim_param:
                    raise _fail("dynamic axes", path, f"axis {axis} of input '{name}' is static, but the shape profile declared it dynamic", regen)
        report["checks"]["dynamic axes"] = "passed (" + ", ".join(f"'{n}' axis {a} is '{d}'" for n, axes in dynamic_axes.items() for a, d in axes.items()) + ")"

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    runnable: str | bytes = str(path)
    how = ""
    spec = precision_spec(precision) if precision else None
    if spec is not None and not spec.cpu_kernels and spec.emulation is not None:
        from tasks.emulation import emulation_of

        # The rounding casts must survive: no graph optimizer for the emulation.
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        try:
            runnable = emulation_of(proto, spec.emulation.elem_type)[0].SerializeToString()
        except Exception as exc:  # noqa: BLE001 - NothingToEmulateError and onnx's own errors alike
            raise _fail("emulation", path, str(exc).splitlines()[0][:400], regen) from exc
        how = f", as its {spec.name} rounding emulation: ONNX Runtime's CPU provider has no {spec.name} kernels"
    try:
        sess = ort.InferenceSession(runnable, so, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise _fail("onnxruntime load", path, str(exc).splitlines()[0][:400], "use an opset and operators ONNX Runtime supports") from exc
    report["checks"]["onnxruntime load"] = f"passed (onnxruntime {ort.__version__}{how})"

    names = [o.name for o in sess.get_outputs()]
    if num_classes is not None and logits is None:
        logits = names[0]
    n_all = len(next(iter(sample.values())))
    for n in sorted({1, n_all}):
        try:
            outs = sess.run(None, {k: np.ascontiguousarray(v[:n]) for k, v in sample.items()})
        except Exception as exc:
            raise _fail("inference", path, f"batch {n}: {str(exc).splitlines()[0][:400]}", regen) from exc
        for name, out in zip(names, outs):
            if out.ndim == 0 or out.shape[0] != n:
                raise _fail("output shape", path, f"output '{name}' of shape {out.shape} for batch {n}, expected batch {n} first", regen)
            if name == logits and num_classes is not None and (out.ndim != 2 or out.shape[1] != num_classes):
                raise _fail("output shape", path, f"{out.shape} for batch {n}, expected {(n, num_classes)}", regen)
            if np.issubdtype(out.dtype, np.floating) and not np.isfinite(out).all():
                raise _fail("finite outputs", path, f"NaN or inf in output '{name}' for batch {n}", "check the weights (training may have diverged)")
    shapes = ", ".join(f"{k} (N, {', '.join(map(str, o.shape[1:]))})" for k, o in zip(names, outs))
    report["checks"]["inference"] = f"passed (batches 1 and {n_all}, outputs {shapes}, finite)"
    report["opset"] = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    report["inputs"] = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in proto.graph.input}
    report["outputs"] = {o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in proto.graph.output}
    return report


def validated_onnx(model: ArtifactRef, data: ArtifactRef, store: Store, refresh: bool = False) -> ArtifactRef:
    """Validate the ONNX file of an ``export`` or ``precision`` artifact on a real batch.

    Returns:
        The ``validate`` artifact holding ``validation.json``.

    Raises:
        OnnxValidationError: a check failed.
    """

    def make(out: Path) -> dict[str, Any]:
        from tasks.data import split_inputs, split_size

        sample = split_inputs(data, "val", slice(0, min(8, split_size(data, "val"))))
        width = model.meta.get("logits_width", data.meta.get("num_classes"))
        logits = model.meta.get("logits_output")
        report = check_onnx(model.path("model.onnx"), sample, width if logits or "logits_width" not in model.meta else None, logits, model.meta.get("dynamic_axes"),
                            model.meta.get("precision"))
        report["precision"] = model.meta.get("precision", "fp32")
        (out / REPORT).write_text(json.dumps(report, indent=2))
        log.info("validate: %s %s passed %d checks", model.stage, report["precision"], len(report["checks"]))
        return {"model_digest": model.digest, **report}

    return run_stage(SPEC, {"model": model, "data": data}, store, refresh, make)
