"""Stage ``validate``: prove an ONNX file is well formed *and* runs.

``onnx.checker`` passes files that cannot run (an initializer reshaped to the wrong shape, an opset the
runtime does not know, a truncated external-data file), so after the checker and strict shape
inference this also loads the file in ONNX Runtime and runs one real batch.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from tasks.artifacts import ArtifactRef
from tasks.errors import OnnxValidationError
from tasks.stage import StageSpec, run_stage

log = logging.getLogger("trtflow.validate")

SPEC = StageSpec("validate", modules=("validate.py",), libraries=("onnx", "onnxruntime", "numpy"))
REPORT = "validation.json"


def _fail(check: str, path: Path, detail: str, fix: str) -> OnnxValidationError:
    return OnnxValidationError(
        got=f"check '{check}' failing for {path.name}: {detail}",
        expected="an ONNX file that passes every check",
        because=f"the '{check}' check found the problem above",
        fix=fix,
    )


def check_onnx(path: Path, sample: np.ndarray, num_classes: int) -> dict[str, Any]:
    """Run every check on one ONNX file.

    Args:
        path: the ONNX file.
        sample: a real batch (N, C, H, W) float32, N >= 2, to run through ONNX Runtime.
        num_classes: expected size of the output's last axis.

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
    if len(inputs) != 1:
        raise _fail("signature", path, f"{len(inputs)} graph inputs", "export a model with exactly one image input")
    dims = inputs[0].type.tensor_type.shape.dim
    if not dims or not dims[0].dim_param:
        raise _fail("dynamic batch", path, f"batch axis of input '{inputs[0].name}' is static", "export with a dynamic batch dimension")
    report["checks"]["dynamic batch"] = f"passed (axis 0 of '{inputs[0].name}' is '{dims[0].dim_param}')"

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    try:
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise _fail("onnxruntime load", path, str(exc).splitlines()[0][:400], "use an opset and operators ONNX Runtime supports") from exc
    report["checks"]["onnxruntime load"] = f"passed (onnxruntime {ort.__version__})"

    name = sess.get_inputs()[0].name
    for n in sorted({1, len(sample)}):
        try:
            (out,) = sess.run(None, {name: sample[:n]})
        except Exception as exc:
            raise _fail("inference", path, f"batch {n}: {str(exc).splitlines()[0][:400]}", regen) from exc
        if out.shape != (n, num_classes):
            raise _fail("output shape", path, f"{out.shape} for batch {n}, expected {(n, num_classes)}", regen)
        if not np.isfinite(out).all():
            raise _fail("finite outputs", path, f"NaN or inf in outputs for batch {n}", "check the weights (training may have diverged)")
    report["checks"]["inference"] = f"passed (batches 1 and {len(sample)}, outputs (N, {num_classes}), finite)"
    report["opset"] = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    report["inputs"] = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in proto.graph.input}
    report["outputs"] = {o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in proto.graph.output}
    return report


def validated_onnx(model: ArtifactRef, data: ArtifactRef, artifacts_dir: Path, refresh: bool = False) -> ArtifactRef:
    """Validate the ONNX file of an ``export`` or ``precision`` artifact on a real batch.

    Returns:
        The ``validate`` artifact holding ``validation.json``.

    Raises:
        OnnxValidationError: a check failed.
    """

    def make(out: Path) -> dict[str, Any]:
        from tasks.data import load_splits

        x_val = load_splits(data)["x_val"][:8]
        report = check_onnx(model.path("model.onnx"), x_val, int(data.meta["num_classes"]))
        report["precision"] = model.meta.get("precision", "fp32")
        (out / REPORT).write_text(json.dumps(report, indent=2))
        log.info("validate: %s %s passed %d checks", model.stage, report["precision"], len(report["checks"]))
        return {"model_digest": model.digest, **report}

    return run_stage(SPEC, {"model": model, "data": data}, artifacts_dir, refresh, make)
