"""PyTorch inference: the trained model of a ``train`` artifact, run on a split of the data.

What ``verify`` and ``profile`` compare the engines against, and what ``train`` judges its own model
with. Runs under a fixed thread count (``torch_threads``): float reductions split over another number
of threads may round differently, so whatever is stored is computed under the count its key holds.

    from tasks.inference import module_from_checkpoint, predict_split
    outputs = predict_split(module_from_checkpoint(checkpoint), data, "test")  # one array per output
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from tasks.artifacts import ArtifactRef
from tasks.errors import ArtifactError
from tasks.progress import Progress

if TYPE_CHECKING:
    import torch
    from torch import nn

#: the checkpoint file of a ``train`` artifact (state_dict and plain metadata)
CHECKPOINT = "model.pt"


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Run a block with ``torch.set_num_threads(threads)``, restoring the process's count after.

    Float reductions split over another number of threads may round differently: whatever is stored
    must be computed under a thread count its key holds.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _tensor(a: np.ndarray) -> torch.Tensor:
    import torch

    # Split arrays are shared read-only; a batch is small, so copy it rather than alias it.
    return torch.from_numpy(np.array(a, copy=True))


def predict_outputs(model: nn.Module, inputs: Mapping[str, np.ndarray], batch_size: int = 256) -> list[np.ndarray]:
    """Run a bound model (``tasks.models.bind``) in eval mode without gradients, batch by batch.

    Args:
        model: takes the inputs positionally in ``inputs``' order, returns a tuple of outputs.
        inputs: input name -> array (N samples each).
        batch_size: samples per forward pass.

    Returns:
        One array per output, in the model's output order.
    """
    import torch

    model.eval()
    n = len(next(iter(inputs.values())))
    chunks: list[list[np.ndarray]] = []
    with torch.no_grad():
        for i in range(0, n, batch_size):
            out = model(*(_tensor(a[i : i + batch_size]) for a in inputs.values()))
            out = out if isinstance(out, tuple) else (out,)
            if not chunks:
                chunks = [[] for _ in out]
            for c, o in zip(chunks, out):
                c.append(o.detach().numpy())
    return [np.concatenate(c) for c in chunks]


def eval_batch(data: ArtifactRef, limit: int = 256, budget: int = 256 << 20) -> int:
    """Rows per evaluation forward pass: up to ``limit``, fewer for large samples (``rows_for_memory``)."""
    from tasks.data import sample_bytes
    from tasks.sizing import rows_for_memory

    return rows_for_memory(sample_bytes(data), limit, budget)


def predict_split(
    model: nn.Module, data: ArtifactRef, split: str, batch_size: int | None = None, progress: Progress | None = None,
    fit: Any = None,
) -> list[np.ndarray]:
    """``predict_outputs`` over one split of a ``data`` artifact, reading ``batch_size`` rows at a time
    (default ``eval_batch``: bounded memory for large samples); ``progress`` counts the samples done;
    ``fit`` changes each batch of inputs first (``tasks.shapes.fit_lengths``: cut or pad to a length)."""
    from tasks.data import split_batches

    batch_size = batch_size or eval_batch(data)

    chunks: list[list[np.ndarray]] = []
    for _, feed in split_batches(data, split, batch_size):
        feed = fit(feed) if fit is not None else feed
        outs = predict_outputs(model, feed, batch_size)
        if progress is not None:
            rows = len(next(iter(feed.values())))
            progress.update(rows, samples=rows)
        if not chunks:
            chunks = [[] for _ in outs]
        for c, o in zip(chunks, outs):
            c.append(o)
    return [np.concatenate(c) for c in chunks]


def predict_logits(model: nn.Module, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """The first output of a one-input model on ``x`` (eval mode, no gradients)."""
    return predict_outputs(model, {"x": x}, batch_size)[0]


def load_checkpoint(ref: ArtifactRef) -> dict[str, Any]:
    """Read the checkpoint of a ``train`` artifact (digest checked, ``weights_only`` load)."""
    import pickle

    import torch

    ref.verify()
    try:
        return torch.load(ref.path(CHECKPOINT), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ArtifactError(
            got=f"{ref.path(CHECKPOINT)} holding objects other than tensors and plain containers",
            expected="a checkpoint written by trtflow (state_dict and plain metadata)",
            because="checkpoints load with weights_only=True, so a file that would run code when unpickled is refused",
            fix="delete the artifact folder and run the same command again (it retrains)",
        ) from exc


def module_from_checkpoint(ref: ArtifactRef) -> nn.Module:
    """Rebuild the model of a ``train`` artifact, bound to the dataset's inputs (eval mode).

    Returns:
        A module taking the dataset's inputs positionally (in dataset order) and returning a tuple of
        its outputs in the order of ``ref.meta["outputs"]`` (see ``tasks.models.bind``).
    """
    from tasks.models import bind, model_from_path

    ckpt = load_checkpoint(ref)
    model = model_from_path(ckpt["model"], ckpt["model_kwargs"])
    model.load_state_dict(ckpt["state_dict"])
    return bind(model, ckpt["binding"]).eval()
