"""Stage ``train``: train the PyTorch model on the training split.

Deterministic: the seed fixes initialisation and shuffling, and the thread count (which changes the
floating-point reductions, hence the weights) is set and recorded.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tasks.artifacts import ArtifactRef, sha256_file
from tasks.config import TrainConfig
from tasks.errors import ModelCollapseError, ModelError
from tasks.inference import CHECKPOINT, eval_batch, predict_split
from tasks.progress import Progress
from tasks.stage import StageSpec, run_stage
from tasks.store import Store, as_store

if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger("trtflow.train")

def _key_inputs(inputs: Mapping[str, Any]) -> Mapping[str, Any]:
    # User weights enter the key by content: a changed weights file re-runs from here. (The model's
    # source enters through cfg.model: tasks.stage hashes the factory's code.)
    cfg: TrainConfig = inputs["cfg"]
    if cfg.weights is None:
        return inputs
    path = Path(cfg.weights).expanduser()
    digest = sha256_file(path) if path.is_file() else "missing"
    return {**inputs, "cfg": cfg.model_copy(update={"weights": None}), "weights": {"file": path.name, "digest": digest}}


SPEC = StageSpec("train", __name__, libraries=("torch", "numpy", "scikit-learn"), key_inputs=_key_inputs)
HISTORY = "history.json"
METRICS = "metrics.json"
#: the latest train stage's validation metrics, kept even when the collapse gate fails the stage
METRICS_REPORT = "train-metrics.json"


@dataclass
class Prepared:
    """A model built, loaded and tried on one real batch, before any training.

    Attributes:
        model: the user's module (not bound).
        kwargs: the keyword arguments its factory got.
        binding: dataset input -> forward parameter (see ``tasks.models.input_binding``).
        outputs: output name -> shape on the trial batch, in output order.
        logits: the task's output (class logits, or a regression's prediction), or None (no labels).
    """

    model: nn.Module
    kwargs: dict[str, Any]
    binding: dict[str, str | None]
    outputs: dict[str, list[int]]
    logits: str | None


def _trial_error(exc: Exception, feed: Mapping[str, np.ndarray], model_path: str) -> ModelError:
    desc = ", ".join(f"{k} {a.dtype} N×{'×'.join(map(str, a.shape[1:]))}" for k, a in feed.items())
    text = str(exc)
    floats = [k for k, a in feed.items() if np.issubdtype(a.dtype, np.floating)]
    ints = [k for k, a in feed.items() if not np.issubdtype(a.dtype, np.floating)]
    index_words = ("Long", "Int", "indices", "index", "Embedding", "embedding")
    if floats and any(w in text for w in index_words):
        because = f"an input that holds ids or indices arrived as float ({', '.join(floats)})"
        fix = "save id and index inputs as integers, e.g. numpy.savez(path, input_ids=ids.astype(numpy.int64), ...)"
    elif ints and any(w in text for w in ("Float", "float", "dtype", "scalar type", "same dtype")):
        because = f"an integer input reached a layer that computes in float ({', '.join(ints)})"
        fix = "save inputs that hold values (pixels, features) as float32; keep integers for ids and masks"
    else:
        because = "the model's layers do not fit the dataset's inputs (channels, sizes, features or names)"
        fix = "use a dataset whose inputs fit the model, or a model made for these inputs (--model, --model-kwargs)"
    return ModelError(
        got=f"{type(exc).__name__}: {text.strip().splitlines()[0][:300] if text.strip() else ''} on one real batch (the trial batch of {len(next(iter(feed.values())))} samples: {desc})",
        expected=f"{model_path} to accept the dataset's inputs",
        because=because,
        fix=fix,
    )


def _hard_coded_batch_error(exc: Exception, size: int, trial: int, model_path: str) -> ModelError:
    text = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
    return ModelError(
        got=f"{type(exc).__name__}: {text} on the trial batch of {trial} samples, while a batch of {size} runs",
        expected=f"{model_path} to accept any batch size (engines run batches of 1 up to the profile's max)",
        because=f"forward hard-codes the batch size {size} (e.g. x.view({size}, -1), torch.zeros(1, {size}, hidden))",
        fix="take the batch size from the input: x.view(x.size(0), -1) or x.flatten(1), torch.zeros(1, x.size(0), hidden)",
        summary=f"the model hard-codes a batch size of {size}: the trial batch of {trial} samples fails; use x.size(0), e.g. x.view(x.size(0), -1)",
    )


def choose_logits(outputs: Mapping[str, Sequence[int]], num_classes: int | None, requested: str | None) -> str | None:
    """The output that task metrics judge: ``requested``, else the first shaped (N, num_classes).

    Raises:
        ModelError: no such output, or none fits the labels.
    """
    shown = ", ".join(f"{k} (N, {', '.join(map(str, s[1:]))})" if len(s) > 1 else f"{k} (N,)" for k, s in outputs.items())
    if requested is not None:
        if requested not in outputs:
            raise ModelError(got=f"--logits-output '{requested}'", expected=f"one of the model's outputs: {shown}", because="task metrics are computed on that output", fix="pass one of those names to --logits-output")
        s = outputs[requested]
        if num_classes is not None and (len(s) != 2 or s[1] < num_classes):
            raise ModelError(got=f"output '{requested}' of shape (N, {', '.join(map(str, s[1:]))})", expected=f"logits of shape (N, K) with K >= {num_classes}", because=f"the labels go up to {num_classes - 1} and index the logits", fix="name the output that holds the class logits with --logits-output")
        return requested
    if num_classes is None:
        return None
    for k, s in outputs.items():
        if len(s) == 2 and s[1] == num_classes:
            return k
    raise ModelError(
        got=f"output {shown}" if len(outputs) == 1 else f"outputs {shown}",
        expected=f"logits of shape (N, {num_classes})",
        because=f"the dataset has {num_classes} classes (labels 0..{num_classes - 1})",
        fix="make the model return one logit per class (its factory gets num_classes), or name the logits output with --logits-output",
    )


def choose_prediction(outputs: Mapping[str, Sequence[int]], target_shape: Sequence[int], requested: str | None) -> str:
    """The output a regression judges: ``requested``, else the first shaped like y (N×K; N or N×1 for y of shape N).

    Raises:
        ModelError: no such output, or none fits the targets.
    """
    want = [int(d) for d in target_shape]
    fits = (lambda s: list(s[1:]) in ([], [1])) if not want else (lambda s: list(s[1:]) == want)
    shown = ", ".join(f"{k} (N{''.join(f'×{d}' for d in s[1:])})" for k, s in outputs.items())
    y_shape = "N" + "".join(f"×{d}" for d in want)
    if requested is not None:
        if requested not in outputs:
            raise ModelError(got=f"--logits-output '{requested}'", expected=f"one of the model's outputs: {shown}", because="regression metrics are computed on that output", fix="pass one of those names to --logits-output")
        if not fits(outputs[requested]):
            raise ModelError(got=f"output '{requested}' of shape N{''.join(f'×{d}' for d in outputs[requested][1:])}", expected=f"predictions shaped like y ({y_shape})", because="each prediction is compared with its target", fix="name the output that predicts y with --logits-output")
        return requested
    for k, shape in outputs.items():
        if fits(shape):
            return k
    raise ModelError(
        got=f"output {shown}" if len(outputs) == 1 else f"outputs {shown}",
        expected=f"a prediction shaped like y ({y_shape}{' or N×1' if not want else ''})",
        because="the dataset holds regression targets (float y), and one output must predict them",
        fix="make the model return one value per target (its factory gets num_outputs), name that output with --logits-output, "
        "or pass --task classification if y holds class labels",
    )


def prepare_model(data: ArtifactRef, cfg: TrainConfig) -> Prepared:
    """Build the model for the dataset, load the weights, and run one real batch through it.

    Every check here runs before any training: the factory's arguments, the weights, the match of the
    dataset's inputs with ``forward``'s parameters, and every output against the dataset.

    Raises:
        ModelError: naming the problem and the fix.
    """
    import torch

    from tasks.data import input_specs, split_inputs
    from tasks.models import DEFAULT_MODEL, build_model, input_binding, load_weights, output_names

    specs = input_specs(data)
    num_classes = data.meta.get("num_classes")
    regression = data.meta.get("task") == "regression"
    labelled = bool(data.meta.get("has_labels", num_classes is not None))
    num_outputs = int(np.prod(data.meta.get("target_shape") or [1])) if regression else None
    if cfg.model == DEFAULT_MODEL and (len(specs) != 1 or not np.issubdtype(np.dtype(specs[0]["dtype"]), np.floating)):
        raise ModelError(
            got=f"the default model for inputs {[(s['name'], s['dtype']) for s in specs]}",
            expected="one float input for the default model (an MLP for vectors and sequences, a CNN for images)",
            because="the default model cannot know what ids, masks or several inputs mean",
            fix="pass your model with --model package.module:callable",
        )
    if not labelled and cfg.model == DEFAULT_MODEL:
        raise ModelError(got="the default model with a dataset without labels", expected="--model and --weights", because="without labels there is nothing to train the default model on", fix="add labels y to the dataset, or pass --model and --weights")
    torch.manual_seed(cfg.seed)
    model, kwargs = build_model(cfg.model, specs[0]["shape"], num_classes, cfg.model_kwargs, num_outputs)
    binding = input_binding(model, [s["name"] for s in specs])
    n = min(2, int(data.meta["sizes"]["train"]))
    feed = split_inputs(data, "train", slice(0, n))
    if cfg.weights is not None:
        try:
            load_weights(model, Path(cfg.weights))
        except ModelError:
            raise
        except RuntimeError as exc:  # load_state_dict's own message, e.g. for a lazy module
            raise ModelError(got=f"weights {Path(cfg.weights).name}: {str(exc).splitlines()[0][:300]}", expected="weights that fit the model", because="torch refused to load them", fix="pass the --model the weights were trained with, and its arguments with --model-kwargs") from exc
    try:
        flat = output_names(model, binding, feed)
    except ModelError:
        raise
    except Exception as exc:
        from tasks.diagnose import hard_coded_batch

        if (size := hard_coded_batch(model, binding, feed, str(exc), extra=(cfg.batch_size,))) is not None:
            raise _hard_coded_batch_error(exc, size, n, cfg.model) from exc
        raise _trial_error(exc, feed, cfg.model) from exc
    outputs: dict[str, list[int]] = {}
    for name, value in flat:
        if not isinstance(value, torch.Tensor):
            raise ModelError(got=f"output '{name}' of type {type(value).__name__}", expected="tensors only (a tensor, or a tuple / dict of tensors)", because="only tensors can be exported and verified", fix="return tensors from forward")
        if value.ndim == 0 or value.shape[0] != n:
            raise ModelError(got=f"output '{name}' of shape {tuple(value.shape)} for a batch of {n}", expected=f"a batch axis first ({n}, ...)", because="every output is compared sample by sample", fix="return one row per sample from forward (do not reduce over the batch)")
        if name in outputs:
            raise ModelError(got=f"two outputs named '{name}'", expected="unique output names", because="outputs are exported and verified by name", fix="rename one of them")
        outputs[name] = [int(d) for d in value.shape]
    if not outputs:
        raise ModelError(got="a forward that returns no tensor", expected="at least one output", because="there is nothing to export", fix="return the model's outputs from forward")
    if len({name.lower() for name in outputs} | {s["name"].lower() for s in specs}) < len(outputs) + len(specs):
        clash = sorted({name for name in outputs} & {s["name"] for s in specs})
        raise ModelError(got=f"outputs named like inputs ({clash})", expected="distinct input and output names", because="an ONNX graph names every tensor once", fix="rename the dataset input or the output")
    if regression and labelled:
        logits: str | None = choose_prediction(outputs, data.meta.get("target_shape") or [], cfg.logits_output)
    else:
        logits = choose_logits(outputs, num_classes, cfg.logits_output)
    return Prepared(model=model, kwargs=kwargs, binding=binding, outputs=outputs, logits=logits)


#: what a run holds besides the model and the data: torch, ONNX Runtime, Prefect (measured ~0.6 GiB)
BASELINE_BYTES = 700 << 20


def memory_plan(data: ArtifactRef, cfg: TrainConfig, prepared: Prepared, available: int | None = None) -> dict[str, Any]:
    """Estimate the run's peak memory before training, and refuse a run that cannot fit.

    The estimate adds the process baseline (``BASELINE_BYTES``), the dataset's bytes held in memory
    (none for memory-mapped formats: the page cache holds what is read), the training state (weights,
    gradients, Adam's two moments), one training batch (inputs, and every layer's activations kept
    for the backward pass, measured on the trial batch) and the reference outputs verification keeps.

    Returns:
        The plan (bytes per part, the total, what is available, the largest batch that fits).

    Raises:
        ConfigError: the estimate exceeds the available memory; names a batch size that fits, or the
            memory-mapped format.
    """
    import torch

    from tasks.data import sample_bytes, source_of, split_inputs, split_size
    from tasks.datasource import NPY_FIX, available_memory
    from tasks.errors import ConfigError
    from tasks.models import output_names

    model = prepared.model
    from torch.nn.parameter import is_lazy

    # A lazy layer that the trial batch did not reach has no size yet: it counts once it has one.
    state = sum(p.numel() * p.element_size() for p in model.parameters() if not is_lazy(p)) * (4 if cfg.epochs_to_run else 1)
    acts = [0]

    def count(_m: Any, _i: Any, out: Any) -> None:
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                acts[0] += t.numel() * t.element_size()

    n = min(2, split_size(data, "train"))
    hooks = [m.register_forward_hook(count) for m in model.modules() if not list(m.children())]
    try:
        output_names(model, prepared.binding, split_inputs(data, "train", slice(0, n)))
    finally:
        for h in hooks:
            h.remove()
    per_sample_act = acts[0] / max(n, 1)
    sample = sample_bytes(data)
    batch = cfg.batch_size if cfg.epochs_to_run else 0
    per_train_sample = 3 * per_sample_act + 2 * sample  # forward kept, gradients, the batch and its tensor
    micro = micro_batch(batch, per_train_sample, cfg.step_memory_mib, prepared.model) if batch else 0
    train_batch = micro * per_train_sample
    eval_rows = eval_batch(data)
    eval_bytes = eval_rows * (per_sample_act + sample)
    outputs = 2 * split_size(data, "test") * sum(int(np.prod(s[1:])) * 4 for s in prepared.outputs.values())
    src = source_of(data)
    total = BASELINE_BYTES + src.resident_bytes + state + max(train_batch, eval_bytes) + outputs
    free = available if available is not None else available_memory() + src.resident_bytes  # the data is already in
    fixed = BASELINE_BYTES + src.resident_bytes + state + outputs + eval_bytes
    fits = int(max(0, (0.9 * free - fixed) // max(per_train_sample, 1)))
    plan = {
        "baseline": BASELINE_BYTES, "resident_data": src.resident_bytes, "training_state": state, "train_batch": int(train_batch),
        "micro_batch": micro,
        "eval_batch": int(eval_bytes), "eval_rows": eval_rows, "reference_outputs": outputs, "total": int(total), "available": int(free),
        "largest_batch_that_fits": fits, "data_format": src.kind,
        # every layer's output for one sample: what the engine batch is fitted with (tasks.engine.batch_for_memory)
        "activation_per_sample": int(per_sample_act),
    }
    gib = 1 << 30
    log.info("memory plan: about %.2f GiB at peak of %.2f GiB available (%s)", total / gib, free / gib, ", ".join(f"{k} {v / gib:.2f}" for k, v in plan.items() if isinstance(v, int) and k not in ("largest_batch_that_fits", "eval_rows", "total", "available", "activation_per_sample", "micro_batch")))
    if micro and micro < batch:
        log.info(
            "train: each batch of %d runs as micro-batches of at most %d (gradient accumulation): one sample's "
            "training step takes about %.1f MiB, and --step-memory-mib is %d", batch, micro, per_train_sample / (1 << 20), cfg.step_memory_mib,
        )
    if total > 0.9 * free:
        fixes = []
        if batch and fits >= 1:
            fixes.append(f"--batch-size {min(fits, batch - 1)}" if micro == batch else f"--step-memory-mib {max(1, int(fits * per_train_sample) >> 20)}")
        if src.resident_bytes > 0.2 * free and src.kind != "digits":
            fixes.append(NPY_FIX)
        raise ConfigError(
            got=f"an estimated peak of {total / gib:.2f} GiB (data held in memory {src.resident_bytes / gib:.2f}, training step of {micro} rows {train_batch / gib:.2f}, model state {state / gib:.2f})",
            expected=f"at most 90% of the {free / gib:.2f} GiB available",
            because="the run would be killed by the system's out-of-memory killer part way through",
            fix=" or ".join(fixes) if fixes else "free memory, or use a smaller model",
        )
    return plan


def has_batch_norm(model: nn.Module) -> bool:
    """Whether the model normalizes by batch statistics in training (one row per pass is then undefined)."""
    import torch

    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


def micro_batch(batch: int, per_sample: float, budget_mib: int, model: nn.Module | None = None) -> int:
    """Rows per forward/backward pass so that one step's activations stay within ``budget_mib``.

    Args:
        batch: the training batch size.
        per_sample: estimated bytes one sample's training step takes.
        budget_mib: the budget (0: no limit).
        model: with BatchNorm layers a micro-batch keeps at least 2 rows (statistics of one sample
            are undefined in training mode).

    Returns:
        ``batch`` when it fits (or no budget is set), else the largest row count that fits, at least 1.
    """
    if not budget_mib or batch * per_sample <= budget_mib << 20:
        return batch
    least = 2 if model is not None and has_batch_norm(model) else 1
    return int(min(batch, max(least, (budget_mib << 20) // max(int(per_sample), 1))))


def regression_loss(pred: torch.Tensor, target: torch.Tensor, inv_var: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Mean squared error in units of each target's training variance: each of K targets weighs the
    same whatever its scale, and 1.0 is what predicting the mean scores (so the loss reads as 1 - R²).

    Args:
        pred: N×K (or N, N×1 for one target) predictions.
        target: the targets, N×K or N.
        inv_var: K values, 1 / the training variance of each target.
        reduction: ``mean`` over samples, or ``sum`` (each sample's mean over its targets, summed).
    """
    err = ((pred.reshape(len(pred), -1) - target.reshape(len(target), -1)) ** 2 * inv_var).mean(1)
    return err.mean() if reduction == "mean" else err.sum()


def backward_batch(
    bound: nn.Module, at: int, data: ArtifactRef, idx: torch.Tensor, labels: torch.Tensor, loss_fn: nn.CrossEntropyLoss, micro: int | None = None,
    inv_var: torch.Tensor | None = None,
) -> tuple[float, int]:
    """Forward and backward one training batch; gradients accumulate on the model's parameters.

    Only the batch's rows are read (from a memory map for large data). With ``micro`` smaller than
    the batch, it runs as micro-batches of at most ``micro`` rows: the batch's mean loss is a sum over
    micro-batches, each divided by the whole batch's weight, so the gradients add up to the unsplit
    batch's while only one micro-batch's activations are alive at a time.

    Args:
        bound: the bound model (``tasks.models.bind``); ``at`` indexes its logits output.
        data: the ``data`` artifact; ``idx`` are rows of its train split, ``labels`` the split's labels.
        loss_fn: the (mean-reduced, possibly class-weighted) cross-entropy.
        micro: rows per pass (None: the whole batch at once).
        inv_var: regression: 1 / each target's training variance; the loss is then ``regression_loss``
            (``labels`` are float targets, and no prediction counts as correct).

    Returns:
        The batch's mean loss and the number of correct top-1 predictions (0 for regression).
    """
    import torch

    from tasks.data import split_inputs

    if micro is None or micro >= len(idx):
        feed = split_inputs(data, "train", idx.numpy())
        logits = bound(*(torch.from_numpy(a) for a in feed.values()))[at]
        loss = loss_fn(logits, labels[idx]) if inv_var is None else regression_loss(logits, labels[idx], inv_var)
        loss.backward()
        return loss.item(), int((logits.argmax(1) == labels[idx]).sum()) if inv_var is None else 0
    weight = loss_fn.weight
    denom = float(weight[labels[idx]].sum()) if weight is not None and inv_var is None else float(len(idx))
    total, correct = 0.0, 0
    parts = -(-len(idx) // micro)
    if micro >= 2 and len(idx) // parts < 2:
        parts = max(1, len(idx) // 2)  # no part of one row: BatchNorm cannot train on it (micro_batch keeps 2 for it)
    for part in torch.tensor_split(idx, parts):
        feed = split_inputs(data, "train", part.numpy())
        logits = bound(*(torch.from_numpy(a) for a in feed.values()))[at]
        if inv_var is None:
            loss = torch.nn.functional.cross_entropy(logits, labels[part], weight=weight, reduction="sum") / denom
        else:
            loss = regression_loss(logits, labels[part], inv_var, reduction="sum") / denom
        loss.backward()
        total += loss.item()
        correct += int((logits.argmax(1) == labels[part]).sum()) if inv_var is None else 0
        del logits, loss  # this micro-batch's activations go before the next one's
    return total, correct


def train_model(
    data: ArtifactRef, cfg: TrainConfig, prepared: Prepared, progress: bool | None = None, micro: int | None = None
) -> tuple[nn.Module, list[dict[str, float]]]:
    """Train a prepared model on the training split (``cfg.epochs_to_run`` epochs; 0 trains nothing).

    Args:
        data: the ``data`` artifact (its train and val splits; mini-batches are taken row by row).
        cfg: optimiser settings and ``balance`` (loss weights or oversampling).
        prepared: the model and its logits output (see ``prepare_model``).
        progress: show a progress bar (None: only on a terminal).
        micro: rows per forward/backward pass (``micro_batch``; None: the whole batch at once). A
            smaller value splits each batch and adds up the gradients before the optimizer step.

    Returns:
        The trained model (eval mode, not bound) and per-epoch metrics (train_loss, train_acc,
        val_loss, val_acc, seconds).

    Raises:
        ModelError: the optimisation diverged, or training was asked for without labels.
    """
    import torch

    from tasks.data import split_labels
    from tasks.models import bind

    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    model = prepared.model
    epochs = cfg.epochs_to_run
    if epochs == 0:
        return model.eval(), []
    num_classes = data.meta.get("num_classes")
    regression = data.meta.get("task") == "regression"
    y_tr, y_val = split_labels(data, "train"), split_labels(data, "val")
    if y_tr is None or y_val is None or (num_classes is None and not regression) or prepared.logits is None:
        raise ModelError(got=f"--epochs {epochs} with a dataset without labels", expected="labels y to train on", because="training minimises the loss against the labels", fix="add labels y to the dataset, or pass --weights without --epochs to convert the model as it is")
    bound = bind(model, prepared.binding)
    at = list(prepared.outputs).index(prepared.logits)
    batch_norm = has_batch_norm(model)

    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    if regression:
        return _train_regression(model, bound, at, data, cfg, y_tr, y_val, opt, batch_norm, progress, micro)
    counts = np.bincount(y_tr, minlength=num_classes).astype(np.float64)
    # Validation loss stays unweighted, so it is comparable between balance settings.
    eval_loss_fn = torch.nn.CrossEntropyLoss()
    loss_fn = eval_loss_fn
    if cfg.balance == "class_weight":
        # N / (classes * count): every class carries the same total weight; an absent class gets 0
        # (it is never a target, and 1/0 would poison the loss).
        present = counts > 0
        w = np.where(present, len(y_tr) / (present.sum() * np.maximum(counts, 1)), 0.0)
        w = np.pad(w, (0, max(0, prepared.outputs[prepared.logits][1] - num_classes)))
        loss_fn = torch.nn.CrossEntropyLoss(weight=torch.tensor(w, dtype=torch.float32))
    sample_weights = torch.from_numpy(1.0 / counts[y_tr]) if cfg.balance == "oversample" else None
    gen = torch.Generator().manual_seed(cfg.seed)
    yt = torch.from_numpy(np.array(y_tr))
    n_tr = len(y_tr)
    history: list[dict[str, float]] = []
    steps = (n_tr + cfg.batch_size - 1) // cfg.batch_size
    meter = Progress("train", total=epochs * steps, unit="batch", logger=log, bar=progress)
    with meter:
        for epoch in range(1, epochs + 1):
            t0 = time.perf_counter()
            model.train()
            if sample_weights is None:
                perm = torch.randperm(n_tr, generator=gen)
            else:
                # Same number of draws as samples, so an epoch costs the same; minority samples repeat.
                perm = torch.multinomial(sample_weights, n_tr, replacement=True, generator=gen)
            total, correct, loss_sum = 0, 0, 0.0
            for s in range(steps):
                idx = perm[s * cfg.batch_size : (s + 1) * cfg.batch_size]
                if batch_norm and len(idx) == 1 and total:
                    meter.update()
                    continue  # BatchNorm cannot train on a single sample
                opt.zero_grad()
                loss_value, right = backward_batch(bound, at, data, idx, yt, loss_fn, micro)
                opt.step()
                loss_sum += loss_value * len(idx)
                correct += right
                total += len(idx)
                meter.update(samples=len(idx), epoch=epoch, loss=loss_sum / total)
            if not np.isfinite(loss_sum):
                raise ModelError(
                    got=f"a non-finite training loss in epoch {epoch}",
                    expected="a finite loss",
                    because="the optimisation diverged",
                    fix="lower --lr",
                )
            val_logits = predict_split(bound, data, "val")[at]
            val_loss = float(eval_loss_fn(torch.from_numpy(val_logits), torch.from_numpy(np.array(y_val))))
            row = {
                "epoch": epoch,
                "train_loss": loss_sum / total,
                "train_acc": correct / total,
                "val_loss": val_loss,
                "val_acc": float((val_logits.argmax(1) == y_val).mean()),
                "seconds": time.perf_counter() - t0,
            }
            history.append(row)
            # One line per epoch (Prefect's run log, the UI's progress): loss, accuracy, samples/s, ETA.
            meter.milestone(
                f"epoch {epoch}/{epochs}",
                loss=round(row["train_loss"], 4), acc=round(row["train_acc"], 4),
                val_loss=round(row["val_loss"], 4), val_acc=round(row["val_acc"], 4),
            )
    model.eval()
    return model, history


def _train_regression(
    model: nn.Module, bound: nn.Module, at: int, data: ArtifactRef, cfg: TrainConfig, y_tr: np.ndarray, y_val: np.ndarray,
    opt: Any, batch_norm: bool, progress: bool | None, micro: int | None,
) -> tuple[nn.Module, list[dict[str, float]]]:
    """``train_model`` for regression targets: ``regression_loss`` (MSE over each target's variance),
    plain shuffling (``balance`` is about classes), validation loss and R² per epoch."""
    import torch

    from tasks.errors import ConfigError
    from tasks.metrics import regression_metrics

    if cfg.balance != "none":
        raise ConfigError(got=f"--balance {cfg.balance} with regression targets", expected="--balance none", because="balancing weighs classes, and regression targets have none", fix="drop --balance, or pass --task classification if y holds class labels")
    flat = y_tr.reshape(len(y_tr), -1).astype(np.float64)
    inv_var = torch.tensor(1.0 / np.maximum(flat.var(0), 1e-12), dtype=torch.float32)
    gen = torch.Generator().manual_seed(cfg.seed)
    yt = torch.from_numpy(np.array(y_tr, dtype=np.float32))
    n_tr = len(y_tr)
    history: list[dict[str, float]] = []
    steps = (n_tr + cfg.batch_size - 1) // cfg.batch_size
    meter = Progress("train", total=cfg.epochs_to_run * steps, unit="batch", logger=log, bar=progress)
    with meter:
        for epoch in range(1, cfg.epochs_to_run + 1):
            t0 = time.perf_counter()
            model.train()
            perm = torch.randperm(n_tr, generator=gen)
            total, loss_sum = 0, 0.0
            for s in range(steps):
                idx = perm[s * cfg.batch_size : (s + 1) * cfg.batch_size]
                if batch_norm and len(idx) == 1 and total:
                    meter.update()
                    continue  # BatchNorm cannot train on a single sample
                opt.zero_grad()
                loss_value, _ = backward_batch(bound, at, data, idx, yt, torch.nn.CrossEntropyLoss(), micro, inv_var=inv_var)
                opt.step()
                loss_sum += loss_value * len(idx)
                total += len(idx)
                meter.update(samples=len(idx), epoch=epoch, loss=loss_sum / total)
            if not np.isfinite(loss_sum):
                raise ModelError(got=f"a non-finite training loss in epoch {epoch}", expected="a finite loss", because="the optimisation diverged", fix="lower --lr")
            pred = predict_split(bound, data, "val")[at]
            val_loss = float(regression_loss(torch.from_numpy(pred), torch.from_numpy(np.array(y_val)), inv_var))
            row = {"epoch": epoch, "train_loss": loss_sum / total, "val_loss": val_loss, "val_r2": regression_metrics(y_val, pred)["r2"], "seconds": time.perf_counter() - t0}
            history.append(row)
            meter.milestone(f"epoch {epoch}/{cfg.epochs_to_run}", loss=round(row["train_loss"], 4), val_loss=round(val_loss, 4), val_r2=round(row["val_r2"], 4))
    model.eval()
    return model, history


def _learnt_nothing_error(findings: list[str], metrics: dict[str, Any], data: ArtifactRef, report: str) -> ModelCollapseError:
    """Explain a regression that learnt nothing by the evidence: constant predictions, targets far from
    0 in units of their spread (slow to learn from a zero start), or no signal found."""
    from tasks.errors import LearntNothingError

    stats = data.meta.get("target_stats") or {}
    mean, std = np.asarray(stats.get("mean") or [0.0]), np.asarray(stats.get("std") or [1.0])
    r2 = metrics["r2"]
    off = max(metrics["per_target"], key=lambda t: abs(t["mean_error"]) / max(t["target_std"], 1e-12))
    if metrics["prediction_std"] <= 1e-6 * max(float(std.max()), 1e-12):
        because = f"its predictions do not vary with the inputs (std {metrics['prediction_std']:.3g} against the targets' {float(std.max()):.3g}): the model ignores x, or its output is saturated"
        fix = "make forward's output depend on its inputs (a constant or detached head learns only the mean), then train again"
        summary = f"the regressor learnt nothing (validation R² {r2:.3f}): its predictions are constant; make its output depend on x"
    elif abs(off["mean_error"]) > 0.5 * off["target_std"]:
        because = (f"its predictions are off by {off['mean_error']:+.4g} on average (target {off['target']}: mean {float(mean[min(off['target'], len(mean) - 1)]):.4g}, "
                   f"spread {off['target_std']:.4g}): a model starting near 0 needs very many steps to reach targets far from 0")
        fix = "standardise y before saving (y = (y - mean) / std; undo it on the engine's outputs), or train longer (--epochs) with a higher --lr"
        summary = f"the regressor learnt nothing (validation R² {r2:.3f}, predictions off by {off['mean_error']:+.3g}); standardise y ((y - mean) / std) or raise --epochs"
    else:
        because = f"the validation R² is {r2:.3f}: the model predicts no better than the mean of y"
        fix = "train longer (--epochs), change --lr, or check that x predicts y (targets shuffled or misaligned, inputs constant or unscaled)"
        summary = f"the regressor learnt nothing (validation R² {r2:.3f}, the mean of y scores 0); raise --epochs, change --lr, or check the data"
    return LearntNothingError(findings, str(report), because=because, fix=fix, summary=summary)


def validation_metrics(y_train: np.ndarray, y_val: np.ndarray, val_logits: np.ndarray, num_classes: int) -> dict[str, Any]:
    """Classification metrics of the model on the validation split, with the training label counts.

    Args:
        y_train: training labels.
        y_val: validation labels.
        val_logits: the model's logits on the validation inputs.
        num_classes: number of classes (the logits may have more columns than the labels use).

    Returns:
        ``tasks.metrics.classification_metrics`` on validation plus ``train_label_counts`` and
        ``train_majority_share`` (so a report shows how skewed the training labels were).
    """
    from tasks.metrics import classification_metrics

    k = max(num_classes, int(val_logits.shape[1]))
    out = classification_metrics(y_val, val_logits.argmax(1), k)
    train_counts = np.bincount(y_train, minlength=k)
    out["train_label_counts"] = train_counts.tolist()
    out["train_majority_share"] = float(train_counts.max() / max(1, train_counts.sum()))
    return out


#: a class holding more than this multiple of its fair share (1/classes) of the training labels is a majority
SKEW_FACTOR = 1.5


def _collapse_error(findings: list[str], metrics: dict[str, Any], cfg: TrainConfig, report: str) -> ModelCollapseError:
    """Explain a tripped collapse gate by the evidence: skewed labels, or no signal learnt at all.

    Imbalance is blamed only when the training labels are skewed; balanced labels with a balanced
    accuracy near chance mean the model learnt nothing (too few epochs, a too high learning rate, or
    data without signal), which no re-balancing fixes.
    """
    counts = metrics["train_label_counts"]
    present = sum(1 for c in counts if c) or 1
    share = metrics["train_majority_share"]
    top = int(np.argmax(counts))
    bal, chance = metrics["balanced_accuracy"], 1.0 / max(1, metrics["num_classes"])
    predicted = metrics["most_predicted"]
    if share <= SKEW_FACTOR / present:
        because = (
            f"the training labels are balanced (largest class {share:.0%} of {present} classes) and the validation "
            f"balanced accuracy {bal:.2f} is near chance ({chance:.2f}): the model learnt no signal"
        )
        fix = "train longer (--epochs), lower --lr, or check that x predicts y (labels shuffled or misaligned, constant or unscaled inputs)"
        summary = f"the model learnt nothing (balanced accuracy {bal:.2f}, chance {chance:.2f}, labels balanced); raise --epochs, lower --lr, or check the data"
        return ModelCollapseError(findings, str(report), because=because, fix=fix, summary=summary)
    because = (
        f"class {top} is {share:.0%} of the training labels ({counts[top]} of {sum(counts)}), "
        f"and with balance={cfg.balance} the loss is lowest by predicting it almost always"
    )
    others = [b for b in ("class_weight", "oversample") if b != cfg.balance]
    fix = "retrain with " + " or ".join(f"--balance {b}" for b in others)
    if cfg.balance != "none":
        fix += ", more --epochs or a lower --lr"
    fix += "; or fix the label distribution of the dataset"
    summary = (
        f"the model collapsed onto class {predicted['class']} ({predicted['predicted_share']:.0%} of predictions), "
        f"class {top} is {share:.0%} of the training labels; retrain with --balance {others[0]}"
    )
    return ModelCollapseError(findings, str(report), because=because, fix=fix, summary=summary)


def checkpoint_from_splits(data: ArtifactRef, cfg: TrainConfig, store: Store, refresh: bool = False) -> ArtifactRef:
    """Train the model on the ``data`` artifact (or load the user's weights) and store the checkpoint.

    With ``cfg.weights`` (and not ``cfg.fine_tune``) nothing is trained: this stage loads the weights,
    and its key holds their digest. Validation metrics and the collapse gate judge the model either
    way (when the dataset has labels).

    Args:
        data: the ``data`` artifact.
        cfg: training settings.
        store: the artifact store.
        refresh: retrain even if an intact checkpoint exists.

    Returns:
        The ``train`` artifact: ``model.pt`` (state_dict, factory and its arguments, input binding,
        output names), ``history.json`` and ``metrics.json`` (validation metrics, also in
        ``meta["validation_metrics"]``; empty without labels).

    Raises:
        ModelError: the model cannot be built, does not fit the data, or the weights do not fit it.
        ModelCollapseError: the collapse gate tripped (``cfg.collapse_gate``); nothing is stored except
            the store's side file ``reports/train-metrics.json``, the evidence.
    """
    import json

    from tasks.data import split_labels
    from tasks.metrics import collapse_findings, learnt_nothing_findings, regression_metrics
    from tasks.models import bind

    store = as_store(store)
    report_name = f"reports/{METRICS_REPORT}"

    def make(out: Path) -> dict[str, Any]:
        import torch

        torch.set_num_threads(cfg.threads)
        num_classes = data.meta.get("num_classes")
        labelled = bool(data.meta.get("has_labels", num_classes is not None))
        regression = data.meta.get("task") == "regression"
        if not labelled and cfg.weights is None:
            raise ModelError(
                got="a dataset without labels y and no --weights",
                expected="labels to train on, or trained weights to convert",
                because="training needs labels; without them trtflow can only convert a model that is already trained",
                fix="add labels y to the dataset, or pass --weights FILE (and --model) to convert your trained model",
            )
        if not labelled and cfg.epochs_to_run:
            raise ModelError(got=f"--epochs {cfg.epochs} (fine-tuning) with a dataset without labels", expected="labels y to train on", because="training minimises the cross-entropy against the labels", fix="add labels y to the dataset, or drop --epochs to convert the weights as they are")
        prepared = prepare_model(data, cfg)
        plan = memory_plan(data, cfg, prepared)
        model, history = train_model(data, cfg, prepared, micro=plan["micro_batch"] or None)
        metrics: dict[str, Any] = {}
        if num_classes is not None and prepared.logits is not None and not regression:
            y_tr, y_val = split_labels(data, "train"), split_labels(data, "val")
            assert y_tr is not None and y_val is not None
            at = list(prepared.outputs).index(prepared.logits)
            val_logits = predict_split(bind(model, prepared.binding), data, "val")[at]
            metrics = validation_metrics(y_tr, y_val, val_logits, int(num_classes))
            findings = collapse_findings(metrics, cfg.collapse_gate)
            report_path = store.where(report_name)
            # Written before the gate raises, so a failed run keeps its evidence.
            store.put(report_name, json.dumps(
                {"passed": not findings, "findings": findings, "balance": cfg.balance, "trained_epochs": len(history),
                 "collapse_gate": cfg.collapse_gate.model_dump(), "validation_metrics": metrics}, indent=2, default=str,
            ).encode())
            log.info(
                "train: validation balanced accuracy %.4f, macro F1 %.4f, class %d gets %.1f%% of predictions (%.1f%% of labels)",
                metrics["balanced_accuracy"], metrics["macro_f1"], metrics["most_predicted"]["class"],
                100 * metrics["most_predicted"]["predicted_share"], 100 * metrics["most_predicted"]["true_share"],
            )
            if findings:
                raise _collapse_error(findings, metrics, cfg, report_path)
        if regression and labelled and prepared.logits is not None:
            y_tr, y_val = split_labels(data, "train"), split_labels(data, "val")
            assert y_tr is not None and y_val is not None
            at = list(prepared.outputs).index(prepared.logits)
            metrics = regression_metrics(y_val, predict_split(bind(model, prepared.binding), data, "val")[at], y_tr)
            findings = learnt_nothing_findings(metrics, cfg.collapse_gate)
            report_path = store.where(report_name)
            store.put(report_name, json.dumps(
                {"passed": not findings, "findings": findings, "task": "regression", "trained_epochs": len(history),
                 "collapse_gate": cfg.collapse_gate.model_dump(), "validation_metrics": metrics}, indent=2, default=str,
            ).encode())
            log.info("train: validation R² %.4f, MAE %.4g, RMSE %.4g (predicting the training mean: R² %.4f)", metrics["r2"], metrics["mae"], metrics["rmse"], metrics.get("r2_of_train_mean", float("nan")))
            if findings:
                raise _learnt_nothing_error(findings, metrics, data, report_path)
        final = history[-1] if history else {"epoch": 0, **({"val_r2": metrics.get("r2")} if regression else {"val_acc": metrics.get("accuracy")})}
        config = cfg.model_dump(mode="json")
        if cfg.weights is not None:
            config["weights"] = Path(cfg.weights).name  # the digest identifies it; a full path would leak this machine's folders
        meta: dict[str, Any] = {
            "config": config,
            "mode": "train" if history and cfg.weights is None else ("fine-tune" if history else "load"),
            "weights_digest": (_key_inputs({"cfg": cfg}).get("weights") or {}).get("digest"),
            "num_classes": num_classes,
            "model_kwargs": prepared.kwargs,
            "inputs": data.meta.get("inputs"),
            "outputs": prepared.outputs,
            "logits_output": prepared.logits,
            "task": data.meta.get("task") or "classification",
            # Outputs the loss never read: trtflow trained only the task's output (a second head keeps its init).
            "untrained_outputs": [k for k in prepared.outputs if k != prepared.logits] if history and prepared.logits else [],
            "sample_shape": data.meta["sample_shape"],
            "torch_threads": torch.get_num_threads(),
            "final": final,
            "epoch_seconds": [row["seconds"] for row in history],
            "validation_metrics": metrics,
            "memory_plan": plan,
        }
        torch.save(
            {
                "state_dict": model.state_dict(),
                "model": cfg.model,
                "model_kwargs": prepared.kwargs,
                "binding": prepared.binding,
                "outputs": list(prepared.outputs),
                "logits_output": prepared.logits,
                "num_classes": num_classes,
                "config": meta["config"],
            },
            out / CHECKPOINT,
        )
        # Wall times vary run to run: they stay in the manifest's meta, out of the artifact's digest,
        # so a deterministic retrain reproduces the same content address and downstream stays cached.
        stable = [{k: v for k, v in row.items() if k != "seconds"} for row in history]
        (out / HISTORY).write_text(json.dumps(stable, indent=2))
        (out / METRICS).write_text(json.dumps(metrics, indent=2))
        log.info("train: %s %s (%d epochs), outputs %s, %s %s", meta["mode"], cfg.model, len(history), prepared.outputs, "prediction" if regression else "logits", prepared.logits)
        if meta["untrained_outputs"]:
            log.warning("train: output(s) %s not trained: the loss used only '%s'; they are verified against PyTorch but never scored", meta["untrained_outputs"], prepared.logits)
        return meta

    return run_stage(SPEC, {"data": data, "cfg": cfg}, store, refresh, make)
