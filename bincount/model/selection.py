"""Choosing among the grid's trained models (the flow's join).

The join ranks the grid points by validation accuracy and serves the best one,
or, if the grid asks for it, the mean of the best few (an ensemble), with or
without flip test-time augmentation. Every member was scored on the same
validation photos, so the join can report what the combination scores there.
"""

from __future__ import annotations

from dataclasses import dataclass

from bincount.model.metadata import Member, ModelMeta
from bincount.model.predictor import decide, ensemble_state


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
             "device": r.device, "stopped_after": r.stopped_after} for r in sorted(results, key=rank_key)]
    return pd.DataFrame(rows)


@dataclass
class Choice:
    members: list  # TrainResults, best first
    state: bytes  # model.pt for bincount.model.predictor.load_predictor
    meta: ModelMeta  # model.json
    val_accuracy: float  # of the served combination (members, TTA) on the validation split


def choose_members(results: list, ensemble: int = 1) -> list:
    """The best ``ensemble`` grid points that share the best point's image size
    (members must take the same decoded photo)."""
    ranked = sorted(results, key=rank_key)
    size = ranked[0].config["image_size"]
    return [r for r in ranked if r.config["image_size"] == size][:ensemble]


def combined_accuracy(members: list, val_labels: list[int], *, tta: bool, classes: list[int] | None = None,
                      decision: str = "argmax") -> float:
    """Validation accuracy of the members' mean softmax, answered as the endpoint would
    (``val_labels`` are class indices; ``classes`` the counts they stand for)."""
    import numpy as np

    probabilities = np.mean([r.val_probabilities_tta if tta else r.val_probabilities for r in members], axis=0)
    classes = classes or list(range(probabilities.shape[1]))
    answers = [decide(p, classes, decision) for p in probabilities.tolist()]
    return float(np.mean(np.asarray(answers) == np.asarray(val_labels)))


def choose_model(results: list, select, val_labels: list[int], classes: list[int] | None = None, *,
                 flow: str | None = None, run_id: str | None = None) -> Choice:
    """What the join serves, per the grid's ``select`` (a :class:`bincount.model.grid.SelectConfig`),
    with the model's metadata. ``classes`` default to the output indices."""
    members = choose_members(results, select.ensemble)
    best = members[0]
    accuracy = combined_accuracy(members, val_labels, tta=select.tta, classes=classes, decision=select.decision)
    meta = ModelMeta(arch=best.config["arch"], image_size=best.config["image_size"],
                     classes=classes or list(range(len(best.val_probabilities[0]))),
                     members=tuple(Member(r.config["arch"], r.config["name"]) for r in members),
                     grid_point=best.config["name"], tta=select.tta, decision=select.decision,
                     val_accuracy=accuracy, flow=flow, run_id=run_id)
    return Choice(members=members, state=ensemble_state([r.state_dict for r in members]), meta=meta,
                  val_accuracy=accuracy)
