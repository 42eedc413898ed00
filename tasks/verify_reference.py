"""The PyTorch reference of ``verify``: the trained model's outputs on the test split, computed once per process.

Every precision's engine is compared with the same outputs; the branches run concurrently, so one
caller computes them while the others wait. The cache holds only the current model's outputs (its
checkpoint, data and model code), at the dataset's lengths and at each shape point's.

    from tasks.verify_reference import reference_outputs
    reference = reference_outputs(checkpoint, data)   # output name -> read-only array
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from functools import partial
from typing import Any

import numpy as np

from tasks.artifacts import ArtifactRef
from tasks.progress import Progress

# The verify stage's logger: these lines are part of its run.
log = logging.getLogger("trtflow.verify")


#: PyTorch's test-split outputs of the latest (checkpoint, data) pair; see ``reference_outputs``
_REFERENCE: dict[tuple[str, ...], dict[str, np.ndarray]] = {}
_REFERENCE_LOCK = threading.Lock()


def reference_outputs(checkpoint: ArtifactRef, data: ArtifactRef) -> dict[str, np.ndarray]:
    """PyTorch's outputs (every one, by name) on the test split of ``data``, computed once per process.

    Every precision verifies against the same reference; the branches run concurrently, so the lock
    also makes the first caller compute it while the others wait, instead of all three loading the
    checkpoint and running the model (the largest part of a cold verify on 2 cores).

    Returns:
        Output name -> read-only array (shared between callers).
    """
    from tasks.data import split_size
    from tasks.inference import module_from_checkpoint, predict_split, torch_threads

    from tasks.code_digests import user_code
    from tasks.stage import factories_in

    # The model's code too: the same weights through an edited forward are another reference.
    key = (checkpoint.digest, data.digest, *(str(user_code(f).files) for f in factories_in({"checkpoint": checkpoint})))
    with _REFERENCE_LOCK:
        if key not in _REFERENCE:
            names = list(checkpoint.meta.get("outputs") or ["logits"])
            # The training's thread count, not whatever this process has: the reference must not depend
            # on which process (one that trained, or one that found the checkpoint cached) computes it.
            with Progress("verify reference (PyTorch)", total=split_size(data, "test"), unit="sample", logger=log) as meter, torch_threads(reference_threads(checkpoint)):
                arrays = predict_split(module_from_checkpoint(checkpoint), data, "test", progress=meter)
                meter.milestone("PyTorch outputs of the test split")
            for a in arrays:
                a.flags.writeable = False
            _REFERENCE.clear()  # only the current model's outputs are kept
            _REFERENCE[key] = dict(zip(names, arrays, strict=True))
        return _REFERENCE[key]


def reference_threads(checkpoint: ArtifactRef) -> int:
    """The torch thread count the PyTorch reference runs with: the one the checkpoint was trained with."""
    return int((checkpoint.meta.get("config") or {}).get("threads") or checkpoint.meta.get("torch_threads") or 1)


#: PyTorch's test-split outputs at other lengths than the dataset's, of the latest (checkpoint, data) pair
_REFERENCE_AT: dict[tuple[Any, ...], dict[str, np.ndarray]] = {}


def reference_outputs_at(checkpoint: ArtifactRef, data: ArtifactRef, point: Any, pad_values: Mapping[str, float]) -> dict[str, np.ndarray]:
    """PyTorch's outputs on the test split cut or padded to a shape point's lengths (``tasks.shapes``),
    computed once per process and point, as ``reference_outputs`` (which it is without lengths)."""
    from tasks.code_digests import user_code
    from tasks.data import split_size
    from tasks.shapes import fit_lengths
    from tasks.stage import factories_in
    from tasks.inference import module_from_checkpoint, predict_split, torch_threads

    if not point.lengths:
        return reference_outputs(checkpoint, data)
    model_key = (checkpoint.digest, data.digest, *(str(user_code(f).files) for f in factories_in({"checkpoint": checkpoint})))
    key = (*model_key, point.key()[1], tuple(sorted(pad_values.items())))
    with _REFERENCE_LOCK:
        if key not in _REFERENCE_AT:
            names = list(checkpoint.meta.get("outputs") or ["logits"])
            fit = partial(fit_lengths, lengths=point.lengths, pad_values=pad_values)
            with Progress(f"verify reference (PyTorch) at {point.text()}", total=split_size(data, "test"), unit="sample", logger=log) as meter, torch_threads(reference_threads(checkpoint)):
                arrays = predict_split(module_from_checkpoint(checkpoint), data, "test", progress=meter, fit=fit)
            for a in arrays:
                a.flags.writeable = False
            if any(k[: len(model_key)] != model_key for k in _REFERENCE_AT):
                _REFERENCE_AT.clear()  # only the current model's outputs are kept
            _REFERENCE_AT[key] = dict(zip(names, arrays, strict=True))
        return _REFERENCE_AT[key]
