"""How a model is scored: accuracy, count errors and per-class quality."""

from __future__ import annotations


def count_metrics(y_true: list[int], y_pred: list[int], classes: list[int]) -> dict:
    """Accuracy, RMSE and MAE of the count, per-class P/R/F1 and the confusion matrix."""
    import numpy as np
    from sklearn.metrics import (accuracy_score, confusion_matrix, mean_absolute_error, mean_squared_error,
                                 precision_recall_fscore_support)

    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=classes, zero_division=0)
    return {
        "n": len(y_true),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "rmse": float(np.sqrt(mean_squared_error(y_true, y_pred))),
        "mae": float(mean_absolute_error(y_true, y_pred)),
        "per_class": {str(c): {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
                      for c, p, r, f, s in zip(classes, precision, recall, f1, support)},
        "classes": list(classes),
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=classes).tolist(),
    }
