"""Classification metrics and the collapse gate, as pure numpy functions.

Shared by the train stage (validation report, collapse gate) and the verify stage (balanced accuracy
of engine and reference). No scikit-learn: the few formulas are spelled out, with scikit-learn's
conventions (balanced accuracy averages recall over the classes present in the labels; macro F1 over
the classes present in labels or predictions).
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
