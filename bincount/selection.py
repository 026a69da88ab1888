"""Choosing among the grid's trained models (the flow's join)."""

from __future__ import annotations


def rank_key(result) -> tuple[float, float]:
    """Best validation accuracy first; ties go to the lower validation loss."""
    return (-result.val_accuracy, result.val_loss)


def choose_best(results: list):
    return min(results, key=rank_key)


def results_table(results: list):
    """One row per grid point: its hyperparameters and scores, best first."""
    import pandas as pd

    rows = [{**r.config, "best_epoch": r.best_epoch, "val_accuracy": r.val_accuracy, "val_loss": r.val_loss,
             "train_seconds": r.train_seconds, "train_images_per_second": r.images_per_second,
             "device": r.device} for r in sorted(results, key=rank_key)]
    return pd.DataFrame(rows)
