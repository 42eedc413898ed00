"""Classification and regression metrics, the collapse gate and the "learnt nothing" gate.

Shared by the train stage (validation report, gates) and the verify stage (balanced accuracy, R² of
engine and reference). The classification formulas are spelled out in numpy, with scikit-learn's
conventions (balanced accuracy averages recall over the classes present in the labels; macro F1 over
the classes present in labels or predictions); regression uses ``sklearn.metrics`` itself.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from tasks.config import CollapseGate


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Count (true class, predicted class) pairs.

    Args:
        y_true: true class per sample, ints in 0..num_classes-1.
        y_pred: predicted class per sample, same length.
        num_classes: number of classes.

    Returns:
        An int64 (num_classes, num_classes) matrix; row = true class, column = predicted class.

    Raises:
        ValueError: lengths differ or a label is outside [0, num_classes).
    """
    t = np.asarray(y_true, dtype=np.int64).ravel()
    p = np.asarray(y_pred, dtype=np.int64).ravel()
    if t.shape != p.shape:
        raise ValueError(f"got {t.size} labels and {p.size} predictions, expected the same number of each")
    if t.size and (min(t.min(), p.min()) < 0 or max(t.max(), p.max()) >= num_classes):
        raise ValueError(f"got labels outside [0, {num_classes}), expected class indices")
    return np.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> float:
    """Mean recall over the classes present in ``y_true`` (1/num_classes for a one-class answer).

    Returns:
        The balanced accuracy in [0, 1]; NaN for empty input.
    """
    cm = confusion_matrix(y_true, y_pred, num_classes)
    support = cm.sum(1)
    present = support > 0
    if not present.any():
        return float("nan")
    return float(np.mean(np.diag(cm)[present] / support[present]))


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> dict[str, Any]:
    """Accuracy, balanced accuracy, macro F1, per-class precision/recall and the most-predicted class.

    Args:
        y_true: true class per sample.
        y_pred: predicted class per sample.
        num_classes: number of classes (classes absent from both still get a per-class row).

    Returns:
        JSON-able dict: samples, num_classes, accuracy, balanced_accuracy, macro_f1,
        label_counts, prediction_counts, per_class (class, support, predicted, precision, recall, f1;
        None where undefined: precision of a never-predicted class, recall of an absent class) and
        most_predicted (class, predicted_share, true_share).
    """
    cm = confusion_matrix(y_true, y_pred, num_classes)
    n = int(cm.sum())
    support, predicted, tp = cm.sum(1), cm.sum(0), np.diag(cm)
    per_class = []
    f1s = []
    for c in range(num_classes):
        s, p, t = int(support[c]), int(predicted[c]), int(tp[c])
        # 2tp / (2tp + fp + fn) equals the harmonic mean of precision and recall, and is 0 (not
        # undefined) for a class that is present but never predicted.
        f1 = 2 * t / (s + p) if s + p else None
        if f1 is not None:
            f1s.append(f1)
        per_class.append(
            {
                "class": c,
                "support": s,
                "predicted": p,
                "precision": t / p if p else None,
                "recall": t / s if s else None,
                "f1": f1,
            }
        )
    k = int(np.argmax(predicted)) if n else 0
    return {
        "samples": n,
        "num_classes": num_classes,
        "accuracy": float(tp.sum() / n) if n else float("nan"),
        "balanced_accuracy": balanced_accuracy(y_true, y_pred, num_classes),
        "macro_f1": float(np.mean(f1s)) if f1s else float("nan"),
        "label_counts": support.tolist(),
        "prediction_counts": predicted.tolist(),
        "per_class": per_class,
        "most_predicted": {
            "class": k,
            "predicted_share": float(predicted[k] / n) if n else float("nan"),
            "true_share": float(support[k] / n) if n else float("nan"),
        },
    }


def collapse_findings(metrics: dict[str, Any], gate: CollapseGate) -> list[str]:
    """Apply the collapse gate (rule in ``tasks.config.CollapseGate``) to ``classification_metrics``.

    Args:
        metrics: output of ``classification_metrics`` on the validation split.
        gate: the thresholds.

    Returns:
        One sentence per tripped rule; empty when the model passes or the gate is off.
    """
    if not gate.enabled or not metrics["samples"]:
        return []
    found = []
    top = metrics["most_predicted"]
    k, p, t = top["class"], top["predicted_share"], top["true_share"]
    share_limit = max(gate.max_majority_prediction_share, t + gate.majority_share_margin)
    if p > share_limit:
        found.append(
            f"class {k} receives {p:.1%} of the validation predictions but is {t:.1%} of the validation labels "
            f"(limit {share_limit:.1%} = max(max_majority_prediction_share {gate.max_majority_prediction_share:.0%}, "
            f"true share {t:.1%} + majority_share_margin {gate.majority_share_margin:.0%}))"
        )
    chance = 1.0 / metrics["num_classes"]
    floor = chance + gate.min_balanced_accuracy_over_chance
    bal = metrics["balanced_accuracy"]
    # NaN (no labels) fails too: a model that cannot be judged must not ship.
    if not bal >= floor:
        found.append(
            f"balanced accuracy {bal:.3f} is below chance {chance:.3f} + min_balanced_accuracy_over_chance "
            f"{gate.min_balanced_accuracy_over_chance:.3f} = {floor:.3f}"
        )
    return found


def regression_metrics(y_true: np.ndarray, y_pred: np.ndarray, y_train: np.ndarray | None = None) -> dict[str, Any]:
    """MAE, RMSE and R² of predictions (``sklearn.metrics``), overall and per target, and how much the
    predictions vary.

    Args:
        y_true: targets, N or N×K.
        y_pred: predictions of the same number of values per sample (N×1 matches N).
        y_train: training targets: adds the R² of always predicting their mean (the baseline the gate
            compares with, about 0).

    Returns:
        JSON-able dict: samples, targets, mae, rmse, r2 (mean over targets), per_target (mae, rmse,
        r2, target_std, prediction_std, mean_error: the predictions' bias), prediction_std (smallest
        over targets) and, with ``y_train``, r2_of_train_mean.
    """
    from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score

    t = np.asarray(y_true, dtype=np.float64).reshape(len(y_true), -1)
    p = np.asarray(y_pred, dtype=np.float64).reshape(len(y_pred), -1)
    per = [
        {
            "target": k,
            "mae": float(mean_absolute_error(t[:, k], p[:, k])),
            "rmse": float(np.sqrt(mean_squared_error(t[:, k], p[:, k]))),
            "r2": float(r2_score(t[:, k], p[:, k])) if len(t) > 1 else float("nan"),
            "target_std": float(t[:, k].std()),
            "prediction_std": float(p[:, k].std()),
            "mean_error": float((p[:, k] - t[:, k]).mean()),
        }
        for k in range(t.shape[1])
    ]
    out: dict[str, Any] = {
        "samples": int(len(t)),
        "targets": int(t.shape[1]),
        "mae": float(mean_absolute_error(t, p)),
        "rmse": float(np.sqrt(mean_squared_error(t, p))),
        "r2": float(np.mean([r["r2"] for r in per])),
        "per_target": per,
        "prediction_std": float(min(r["prediction_std"] for r in per)),
    }
    if y_train is not None:
        mean = np.asarray(y_train, dtype=np.float64).reshape(len(y_train), -1).mean(0)
        out["r2_of_train_mean"] = float(r2_score(t, np.broadcast_to(mean, t.shape), multioutput="uniform_average")) if len(t) > 1 else float("nan")
    return out


def learnt_nothing_findings(metrics: dict[str, Any], gate: CollapseGate) -> list[str]:
    """Apply the regression gate to ``regression_metrics``: R² at or below ``gate.min_r2`` means the
    model predicts no better than the mean of y (R² 0), so it learnt nothing about its inputs.

    Returns:
        One sentence per finding; empty when the model passes or the gate is off.
    """
    if not gate.enabled or not metrics["samples"]:
        return []
    r2 = metrics["r2"]
    found = []
    # NaN (too few samples) fails too: a model that cannot be judged must not ship.
    if not r2 > gate.min_r2:
        found.append(f"validation R² {r2:.3f} is at or below min_r2 {gate.min_r2:g} (0: always predicting the mean of y)")
    return found
