"""Checks that need no Prefect, run by ``trtflow run`` before the temporary server starts (seconds, not minutes).

The artifacts folder, the dataset's content (the data stage itself runs here), the model factory
(import, weights, build, one forward pass on two samples, export of the untrained model to ONNX) and
the backend: a bad input fails here in about two
seconds instead of after the server start and the training. What passed is remembered in
``<artifacts>/.preflight.json`` (by dataset file identity, the model's source as the cache keys see it,
``tasks.code_digests``), so an unchanged re-run skips the dataset and model checks.

    from flows.preflight import check_before_run
    check_before_run(config)     # raises the TrtflowError a stage would raise later
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import warnings
from pathlib import Path
from typing import Any

log = logging.getLogger("trtflow.preflight")

MEMO = ".preflight.json"
DEFAULT_MODEL = "tasks.models:default_model"


def _memo_key(config: Any) -> str:
    from tasks.code_digests import describe, project_code
    from tasks.datasource import identity

    ds = config.data.dataset
    weights = config.train.weights
    # The model's source (and what it imports) and these checks' own code, by content; the dataset and
    # the weights by file identity (path, size, mtime, ctime, inode).
    ident: list[Any] = [config.train.model_dump(mode="json"), config.data.model_dump(mode="json"), config.shapes.model_dump(mode="json"), describe(config.train.model), project_code(__name__)]
    for path in (ds, weights):
        if path is None:
            ident.append(None)
            continue
        try:
            ident.append(identity(Path(path).expanduser()))
        except OSError:
            ident.append("missing")
    return hashlib.sha256(json.dumps(ident, default=str).encode()).hexdigest()


def _remembered(root: Path, key: str) -> bool:
    try:
        return json.loads((root / MEMO).read_text()).get("key") == key
    except (OSError, ValueError, AttributeError):
        return False


def _remember(root: Path, key: str) -> None:
    try:
        (root / MEMO).write_text(json.dumps({"key": key}))
    except OSError:
        pass  # only a speed-up


def model_checks(data: Any, train: Any, shapes: Any = None) -> None:
    """Build the model as the train stage will, run two samples through it, export it untrained to ONNX
    (with the shape profile's dynamic axes: a model that fixes a declared length fails here).

    Args:
        data: the ``data`` artifact (the dataset checked and split).
        train: the run's TrainConfig.
        shapes: the run's ShapeProfile (None: the batch only).

    Raises:
        ModelError: the factory cannot build a fitting model. ExportError: it cannot become ONNX.
        ConfigError: the shapes do not fit the dataset's inputs.
    """
    from tasks.data import input_specs
    from tasks.export import onnx_from_module
    from tasks.models import bind
    from tasks.shapes import export_dims
    from tasks.train import prepare_model

    specs = input_specs(data)
    dims = export_dims(shapes, specs)
    prepared = prepare_model(data, train)
    inputs = [{"name": s["name"], "dtype": s["dtype"], "shape": list(s["shape"])} for s in specs]
    bound = bind(prepared.model, prepared.binding).eval()
    with tempfile.TemporaryDirectory(prefix="trtflow-preflight-") as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        onnx_from_module(bound, tuple(inputs[0]["shape"]), Path(tmp) / "untrained.onnx", inputs=inputs, outputs=list(prepared.outputs), dims=dims)
        check_batch_axis(bound, inputs, Path(tmp) / "untrained.onnx")


def check_batch_axis(bound: Any, inputs: list[dict[str, Any]], onnx_path: Path) -> None:
    """Refuse an export whose batch axis came out fixed: forward turned the batch size into a number.

    The exporter freezes the batch to the example's 2 when forward computes with it in Python
    (``int(x.shape[0])``); the engines would then take only batches of 2. The line is found by
    torch.export's guard log.

    Raises:
        ExportError: naming the line (when known), the cause and the fix.
    """
    import numpy as np
    import torch

    from tasks.diagnose import batch_frozen_at, static_batch_inputs
    from tasks.errors import ExportError

    static = static_batch_inputs(onnx_path)
    if not static:
        return
    examples = tuple(torch.from_numpy(np.zeros((2, *s["shape"]), dtype=np.dtype(s["dtype"]))) for s in inputs)
    where = batch_frozen_at(bound, examples)
    at = f" at {where}" if where else ""
    raise ExportError(
        got=f"an ONNX export with a fixed batch of 2 for input(s) {', '.join(static)}",
        expected="a dynamic batch axis (engines run batches of 1 up to the profile's max)",
        because=f"forward turns the batch size into a Python number{at}: int(x.shape[0]), .item() or the size in Python "
        "arithmetic make the exporter fix it to the example batch of 2",
        fix="keep it a tensor size: x.size(0) without int(), x.reshape(x.size(0), -1) or x.flatten(1), -1 in reshapes",
        summary=f"forward fixes the batch size to a number{at}; use x.size(0) without int(), or reshape(-1, ...)",
    )


def check_before_run(config: Any) -> Path:
    """Run every check that needs no Prefect server; returns the artifacts folder.

    The flow's own checks (``tasks.plan.plan_of``: folder, dataset file, factory, weights, labels, backend), then the
    data stage itself (every dataset check; its artifact is what the run then reuses), then the model
    built, tried on two samples and exported once untrained.

    Raises:
        ConfigError, DatasetError, ModelError, ExportError, BackendUnavailableError: what a stage
        would raise later, with the same message.
    """
    from flows.pipeline import GRAPH
    from tasks.data import splits_from_dataset
    from tasks.plan import plan_of

    store = plan_of(config, GRAPH).store
    # The memo is of this machine's files (by identity): it stays in the local folder, not the store.
    root = store.local
    key = _memo_key(config)
    if not _remembered(root, key):
        data = splits_from_dataset(config.data, store)
        # The default model on the bundled digits is known to build and export; anything else is tried.
        if config.train.model != DEFAULT_MODEL or config.data.dataset is not None or config.train.weights is not None:
            model_checks(data, config.train, config.shapes)
        _remember(root, key)
    return root
