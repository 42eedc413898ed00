"""Pure metric functions and the collapse gate rule, on hand-made label arrays."""

import numpy as np
import pytest

from tasks.config import CollapseGate
from tasks.metrics import balanced_accuracy, classification_metrics, collapse_findings, confusion_matrix


def test_confusion_matrix_rows_are_truth_columns_predictions():
    cm = confusion_matrix(np.array([0, 0, 1, 2]), np.array([0, 1, 1, 1]), 3)
    assert cm.tolist() == [[1, 1, 0], [0, 1, 0], [0, 1, 0]]


def test_confusion_matrix_rejects_length_mismatch():
    with pytest.raises(ValueError, match="2 labels and 3 predictions"):
        confusion_matrix(np.array([0, 1]), np.array([0, 1, 1]), 2)


def test_per_class_precision_recall_f1_by_hand():
    # class 0: 4 samples, 3 right; class 1: 2 samples, both right; class 2: 2 samples, none right.
    y = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    p = np.array([0, 0, 0, 1, 1, 1, 0, 1])
    m = classification_metrics(y, p, 3)
    c0, c1, c2 = m["per_class"]
    assert (c0["support"], c0["predicted"]) == (4, 4)
    assert c0["precision"] == pytest.approx(3 / 4) and c0["recall"] == pytest.approx(3 / 4)
    assert c1["precision"] == pytest.approx(2 / 4) and c1["recall"] == pytest.approx(1.0)
    assert c1["f1"] == pytest.approx(2 * 0.5 * 1.0 / 1.5)
    # Never predicted: precision is undefined (None), recall and F1 are 0.
    assert c2["precision"] is None and c2["recall"] == 0.0 and c2["f1"] == 0.0
    assert m["accuracy"] == pytest.approx(5 / 8)
    assert m["balanced_accuracy"] == pytest.approx((3 / 4 + 1 + 0) / 3)
    assert m["macro_f1"] == pytest.approx((0.75 + 2 / 3 + 0) / 3)
    assert m["label_counts"] == [4, 2, 2] and m["prediction_counts"] == [4, 4, 0]


def test_most_predicted_share_against_true_share():
    y = np.array([0, 1, 1, 2, 2, 2, 2, 2, 2, 2])
    p = np.array([1, 1, 1, 1, 1, 1, 1, 2, 2, 0])
    top = classification_metrics(y, p, 3)["most_predicted"]
    assert top == {"class": 1, "predicted_share": pytest.approx(0.7), "true_share": pytest.approx(0.2)}


def test_balanced_accuracy_of_a_constant_answer_is_chance():
    y = np.repeat(np.arange(4), [70, 10, 10, 10])
    assert balanced_accuracy(y, np.zeros_like(y), 4) == pytest.approx(0.25)
    # ... even though its plain accuracy looks good.
    assert classification_metrics(y, np.zeros_like(y), 4)["accuracy"] == pytest.approx(0.7)


def test_absent_class_is_left_out_of_balanced_accuracy_and_macro_f1():
    y, p = np.array([0, 0, 1, 1]), np.array([0, 0, 1, 1])
    m = classification_metrics(y, p, 3)  # class 2 neither in labels nor predictions
    assert m["balanced_accuracy"] == 1.0 and m["macro_f1"] == 1.0
    assert m["per_class"][2] == {"class": 2, "support": 0, "predicted": 0, "precision": None, "recall": None, "f1": None}


# --- the collapse gate rule -----------------------------------------------------------------------


def _balanced_labels(n_per_class=20, classes=10):
    return np.repeat(np.arange(classes), n_per_class)


def test_collapsed_predictions_trip_both_rules():
    y = _balanced_labels()
    found = collapse_findings(classification_metrics(y, np.zeros_like(y), 10), CollapseGate())
    assert len(found) == 2
    assert "class 0 receives 100.0% of the validation predictions but is 10.0% of the validation labels" in found[0]
    assert "balanced accuracy 0.100 is below chance 0.100" in found[1]


def test_partial_collapse_trips_the_share_rule_alone():
    # 85% of predictions go to class 0; classes 1 and 2 keep some recall, so balanced accuracy
    # (1 + 1 + 0.5) / 10 = 0.25 clears chance + 0.1 = 0.2.
    y = _balanced_labels()
    p = np.zeros_like(y)
    keep = np.flatnonzero(y != 0)[:30]
    p[keep] = y[keep]
    m = classification_metrics(y, p, 10)
    assert m["balanced_accuracy"] == pytest.approx(0.25)
    found = collapse_findings(m, CollapseGate())
    assert len(found) == 1 and "receives 85.0%" in found[0]


def test_good_model_on_legitimately_imbalanced_labels_passes():
    # 90% of the labels are class 0 and the model predicts it 90% of the time, mostly correctly.
    y = np.repeat([0, 1], [180, 20])
    p = y.copy()
    p[:5], p[180:185] = 1, 0  # a few errors each way
    m = classification_metrics(y, p, 2)
    assert m["most_predicted"]["predicted_share"] == pytest.approx(0.9)
    assert collapse_findings(m, CollapseGate()) == []


def test_collapse_onto_a_truly_dominant_class_is_caught_by_balanced_accuracy():
    # The share rule cannot fire (90% true share + 20% margin > 100%); balanced accuracy 0.5 < 0.6 does.
    y = np.repeat([0, 1], [180, 20])
    found = collapse_findings(classification_metrics(y, np.zeros_like(y), 2), CollapseGate())
    assert len(found) == 1 and "balanced accuracy 0.500 is below chance 0.500" in found[0]


def test_gate_thresholds_and_switch():
    y = _balanced_labels()
    m = classification_metrics(y, np.zeros_like(y), 10)
    assert collapse_findings(m, CollapseGate(enabled=False)) == []
    lax = CollapseGate(max_majority_prediction_share=1.0, min_balanced_accuracy_over_chance=0.0)
    assert collapse_findings(m, lax) == []  # a share above 100% or a recall below chance cannot happen here
