"""Stage ``train``: train the PyTorch model on the training split.

Deterministic: the seed fixes initialisation and shuffling, and the thread count (which changes the
floating-point reductions, hence the weights) is set and recorded.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tasks.artifacts import ArtifactRef
from tasks.config import TrainConfig
from tasks.data import load_splits
from tasks.errors import ArtifactError, ModelCollapseError, ModelError
from tasks.stage import StageSpec, run_stage

if TYPE_CHECKING:
    from torch import nn

log = logging.getLogger("trtflow.train")

SPEC = StageSpec("train", modules=("train.py", "models.py", "metrics.py"), libraries=("torch", "numpy"))
CHECKPOINT = "model.pt"
HISTORY = "history.json"
METRICS = "metrics.json"
#: the latest train stage's validation metrics, kept even when the collapse gate fails the stage
METRICS_REPORT = "train-metrics.json"


def predict_logits(model: nn.Module, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Run the model in eval mode without gradients, batch by batch."""
    import torch

    model.eval()
    outs = []
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            outs.append(model(torch.from_numpy(x[i : i + batch_size])).numpy())
    return np.concatenate(outs)


def _check_output(model: nn.Module, sample: np.ndarray, num_classes: int, model_path: str) -> None:
    import torch

    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.from_numpy(sample[:2]))
    except Exception as exc:
        raise ModelError(
            got=f"{type(exc).__name__}: {exc} for input of shape {tuple(sample[:2].shape)}",
            expected=f"{model_path} to accept N×{'×'.join(map(str, sample.shape[1:]))} images",
            because="the model's layers do not fit the dataset's image shape (channels or size)",
            fix="use a dataset whose images fit the model, or a model made for these images",
        ) from exc
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, num_classes):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ModelError(
            got=f"output {shape}",
            expected=f"logits of shape (N, {num_classes})",
            because=f"the dataset has {num_classes} classes (labels 0..{num_classes - 1})",
            fix="make the model return one logit per class as a single tensor",
        )


def train_model(
    splits: dict[str, np.ndarray], cfg: TrainConfig, num_classes: int, progress: bool | None = None
) -> tuple[nn.Module, list[dict[str, float]]]:
    """Train a fresh model.

    Args:
        splits: arrays x_train, y_train, x_val, y_val.
        cfg: model factory, optimiser settings and ``balance`` (loss weights or oversampling).
        num_classes: number of classes (size of the logits).
        progress: show a progress bar (None: only on a terminal).

    Returns:
        The trained model (eval mode) and per-epoch metrics (train_loss, train_acc, val_loss, val_acc, seconds).

    Raises:
        ModelError: the model cannot be built or does not fit the data.
    """
    import torch
    from tqdm import tqdm

    from tasks.models import model_from_path

    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    x_tr, y_tr = splits["x_train"], splits["y_train"]
    x_val, y_val = splits["x_val"], splits["y_val"]
    model = model_from_path(cfg.model, num_classes=num_classes, in_channels=int(x_tr.shape[1]))
    _check_output(model, x_tr, num_classes, cfg.model)

    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    counts = np.bincount(y_tr, minlength=num_classes).astype(np.float64)
    # Validation loss stays unweighted, so it is comparable between balance settings.
    eval_loss_fn = torch.nn.CrossEntropyLoss()
    loss_fn = eval_loss_fn
    if cfg.balance == "class_weight":
        # N / (classes * count): every class carries the same total weight; an absent class gets 0
        # (it is never a target, and 1/0 would poison the loss).
        present = counts > 0
        w = np.where(present, len(y_tr) / (present.sum() * np.maximum(counts, 1)), 0.0)
        loss_fn = torch.nn.CrossEntropyLoss(weight=torch.tensor(w, dtype=torch.float32))
    sample_weights = torch.from_numpy(1.0 / counts[y_tr]) if cfg.balance == "oversample" else None
    gen = torch.Generator().manual_seed(cfg.seed)
    xt, yt = torch.from_numpy(x_tr), torch.from_numpy(y_tr)
    history: list[dict[str, float]] = []
    steps = (len(x_tr) + cfg.batch_size - 1) // cfg.batch_size
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.perf_counter()
        model.train()
        if sample_weights is None:
            perm = torch.randperm(len(xt), generator=gen)
        else:
            # Same number of draws as samples, so an epoch costs the same; minority samples repeat.
            perm = torch.multinomial(sample_weights, len(xt), replacement=True, generator=gen)
        total, correct, loss_sum = 0, 0, 0.0
        bar = tqdm(range(steps), desc=f"epoch {epoch}/{cfg.epochs}", leave=False, disable=None if progress is None else not progress)
        for s in bar:
            idx = perm[s * cfg.batch_size : (s + 1) * cfg.batch_size]
            logits = model(xt[idx])
            loss = loss_fn(logits, yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            loss_sum += loss.item() * len(idx)
            correct += int((logits.argmax(1) == yt[idx]).sum())
            total += len(idx)
            bar.set_postfix(loss=f"{loss_sum / total:.4f}")
        if not np.isfinite(loss_sum):
            raise ModelError(
                got=f"a non-finite training loss in epoch {epoch}",
                expected="a finite loss",
                because="the optimisation diverged",
                fix="lower --lr",
            )
        val_logits = predict_logits(model, x_val)
        val_loss = float(eval_loss_fn(torch.from_numpy(val_logits), torch.from_numpy(y_val)))
        row = {
            "epoch": epoch,
            "train_loss": loss_sum / total,
            "train_acc": correct / total,
            "val_loss": val_loss,
            "val_acc": float((val_logits.argmax(1) == y_val).mean()),
            "seconds": time.perf_counter() - t0,
        }
        history.append(row)
        log.info(
            "epoch %d/%d  train loss %.4f acc %.4f  val loss %.4f acc %.4f  (%.1fs)",
            epoch, cfg.epochs, row["train_loss"], row["train_acc"], row["val_loss"], row["val_acc"], row["seconds"],
        )
    model.eval()
    return model, history


def validation_metrics(splits: dict[str, np.ndarray], val_logits: np.ndarray, num_classes: int) -> dict[str, Any]:
    """Classification metrics of the model on the validation split, with the training label counts.

    Args:
        splits: arrays y_train and y_val.
        val_logits: the model's logits on x_val.
        num_classes: number of classes.

    Returns:
        ``tasks.metrics.classification_metrics`` on validation plus ``train_label_counts`` and
        ``train_majority_share`` (so a report shows how skewed the training labels were).
    """
    from tasks.metrics import classification_metrics

    out = classification_metrics(splits["y_val"], val_logits.argmax(1), num_classes)
    train_counts = np.bincount(splits["y_train"], minlength=num_classes)
    out["train_label_counts"] = train_counts.tolist()
    out["train_majority_share"] = float(train_counts.max() / max(1, train_counts.sum()))
    return out


def _collapse_error(findings: list[str], metrics: dict[str, Any], cfg: TrainConfig, report: Path) -> ModelCollapseError:
    counts = metrics["train_label_counts"]
    top = int(np.argmax(counts))
    because = (
        f"class {top} is {metrics['train_majority_share']:.0%} of the training labels ({counts[top]} of {sum(counts)}), "
        f"and with balance={cfg.balance} the loss is lowest by predicting it almost always"
    )
    others = [b for b in ("class_weight", "oversample") if b != cfg.balance]
    fix = "retrain with " + " or ".join(f"--balance {b}" for b in others) + " (train.balance)"
    if cfg.balance != "none":
        fix += ", more --epochs or a lower --lr"
    fix += "; or fix the label distribution of the dataset"
    return ModelCollapseError(findings, str(report), because=because, fix=fix)


def module_from_checkpoint(ref: ArtifactRef) -> nn.Module:
    """Rebuild the trained model from a ``train`` artifact (digest checked, ``weights_only`` load)."""
    import pickle

    import torch

    from tasks.models import model_from_path

    ref.verify()
    try:
        ckpt = torch.load(ref.path(CHECKPOINT), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ArtifactError(
            got=f"{ref.path(CHECKPOINT)} holding objects other than tensors and plain containers",
            expected="a checkpoint written by trtflow (state_dict and plain metadata)",
            because="checkpoints load with weights_only=True, so a file that would run code when unpickled is refused",
            fix="delete the artifact folder and run the same command again (it retrains)",
        ) from exc
    model = model_from_path(ckpt["model"], num_classes=ckpt["num_classes"], in_channels=ckpt["in_channels"])
    model.load_state_dict(ckpt["state_dict"])
    return model.eval()


def checkpoint_from_splits(data: ArtifactRef, cfg: TrainConfig, artifacts_dir: Path, refresh: bool = False) -> ArtifactRef:
    """Train the model on the ``data`` artifact and store the checkpoint with its config.

    Args:
        data: the ``data`` artifact.
        cfg: training settings.
        artifacts_dir: root of the artifact store.
        refresh: retrain even if an intact checkpoint exists.

    Returns:
        The ``train`` artifact: ``model.pt`` (state_dict, factory, shapes, config), ``history.json`` and
        ``metrics.json`` (validation metrics, also in ``meta["validation_metrics"]``).

    Raises:
        ModelError: the model cannot be built or does not fit the data.
        ModelCollapseError: the collapse gate tripped (``cfg.collapse_gate``); nothing is stored except
            ``<artifacts_dir>/reports/train-metrics.json``, the evidence.
    """
    import json

    from tasks.artifacts import write_json_atomic
    from tasks.metrics import collapse_findings

    def make(out: Path) -> dict[str, Any]:
        import torch

        splits = load_splits(data)
        num_classes = int(data.meta["num_classes"])
        model, history = train_model(splits, cfg, num_classes)
        metrics = validation_metrics(splits, predict_logits(model, splits["x_val"]), num_classes)
        findings = collapse_findings(metrics, cfg.collapse_gate)
        report_path = Path(artifacts_dir) / "reports" / METRICS_REPORT
        # Written before the gate raises, so a failed run keeps its evidence.
        write_json_atomic(
            report_path,
            {"passed": not findings, "findings": findings, "balance": cfg.balance,
             "collapse_gate": cfg.collapse_gate.model_dump(), "validation_metrics": metrics},
        )
        log.info(
            "train: validation balanced accuracy %.4f, macro F1 %.4f, class %d gets %.1f%% of predictions (%.1f%% of labels)",
            metrics["balanced_accuracy"], metrics["macro_f1"], metrics["most_predicted"]["class"],
            100 * metrics["most_predicted"]["predicted_share"], 100 * metrics["most_predicted"]["true_share"],
        )
        if findings:
            raise _collapse_error(findings, metrics, cfg, report_path)
        meta: dict[str, Any] = {
            "config": cfg.model_dump(mode="json"),
            "num_classes": num_classes,
            "in_channels": int(splits["x_train"].shape[1]),
            "sample_shape": data.meta["sample_shape"],
            "torch_threads": torch.get_num_threads(),
            "final": history[-1],
            "epoch_seconds": [row["seconds"] for row in history],
            "validation_metrics": metrics,
        }
        torch.save(
            {
                "state_dict": model.state_dict(),
                "model": cfg.model,
                "num_classes": num_classes,
                "in_channels": meta["in_channels"],
                "config": meta["config"],
            },
            out / CHECKPOINT,
        )
        # Wall times vary run to run: they stay in the manifest's meta, out of the artifact's digest,
        # so a deterministic retrain reproduces the same content address and downstream stays cached.
        stable = [{k: v for k, v in row.items() if k != "seconds"} for row in history]
        (out / HISTORY).write_text(json.dumps(stable, indent=2))
        (out / METRICS).write_text(json.dumps(metrics, indent=2))
        return meta

    return run_stage(SPEC, {"data": data, "cfg": cfg}, artifacts_dir, refresh, make)
