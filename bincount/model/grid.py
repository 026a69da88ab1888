"""Hyperparameter grids: a JSON file of defaults plus a list of points.

    {"defaults": {"arch": "efficientnet_lite0", "epochs": 4, ...},
     "points": [{"name": "lr1e-3", "lr": 0.001}, {"name": "lr3e-4", "lr": 0.0003}],
     "select": {"ensemble": 2, "tta": true}}

Each point is the defaults updated by the point, validated into a
:class:`TrainConfig`, so a typo fails before any training starts. ``select``
(optional, :class:`SelectConfig`) says what the join makes of the trained points, and
``search`` (optional, bincount.model.search) adds trials drawn from ranges to the points.
"""

from __future__ import annotations

from dataclasses import asdict, fields
from typing import Annotated, Literal

from pydantic import Field
from pydantic.dataclasses import dataclass

from bincount.model.architectures import get_arch
from bincount.model.metadata import DECISIONS
from bincount.validation import STRICT, ConfigError, build

Positive = Annotated[float, Field(gt=0)]
NonNegative = Annotated[float, Field(ge=0)]
Fraction = Annotated[float, Field(ge=0, lt=1)]  # of a whole that must keep some of itself


# A pydantic dataclass: checked for type and range when built (``"pretrained": "false"``,
# ``"epochs": 1.5`` and ``"lr": NaN`` are refused), and still a dataclass (fields, asdict, replace).
@dataclass(frozen=True, config=STRICT)
class TrainConfig:
    name: Annotated[str, Field(min_length=1)]
    arch: str = "efficientnet_lite0"
    pretrained: bool = True
    lr: Positive = 1e-3
    batch_size: Annotated[int, Field(ge=1)] = 32
    epochs: Annotated[int, Field(ge=1)] = 4
    image_size: Annotated[int, Field(ge=16)] = 224
    freeze_backbone: bool = False
    weight_decay: NonNegative = 0.05
    label_smoothing: Fraction = 0.1
    warmup_fraction: Fraction = 0.1  # of the one-cycle schedule; 1 would leave no steps to anneal
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast where supported, else fp32
    # The stem and this many first blocks keep their ImageNet weights: early
    # layers see edges, not counts, and skipping their backward pass is the
    # cheapest speed-up there is at high resolution.
    frozen_blocks: Annotated[int, Field(ge=0)] = 0
    # Adds this times the squared error of the expected count (softmax-weighted)
    # to the cross-entropy: a prediction of 4 for a 5 then costs less than a 1.
    count_loss_weight: NonNegative = 0.0
    # Weight the cross-entropy by inverse class frequency.
    class_balanced: bool = False
    # Also train on transposed photos (with the flips: all eight symmetries of the
    # square). A bin photographed from above holds as many items either way round.
    transpose: bool = False
    # The pretrained body learns at lr times this; the new head at lr.
    backbone_lr_factor: Positive = 1.0

    def __post_init__(self):
        arch = get_arch(self.arch)
        if self.frozen_blocks and arch.blocks is None:
            raise ValueError(f"grid point {self.name!r}: {self.arch} has no known blocks to freeze; "
                             "set frozen_blocks to 0")

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True, config=STRICT)
class SelectConfig:
    # The served model averages the softmax of this many best grid points
    # (by validation accuracy, among those at the best point's image size).
    ensemble: Annotated[int, Field(ge=1)] = 1
    # ...and of the four flips of each photo (test-time augmentation).
    tta: bool = False
    # How a softmax becomes a count: "argmax" (the likeliest count) or
    # "expected" (the count nearest the softmax's expected value, which uses
    # that counts are ordered: when the mass sits on 3 and 4, it answers near them).
    decision: str = "argmax"

    def __post_init__(self):
        if self.decision not in DECISIONS:
            raise ValueError(f"select.decision must be one of {DECISIONS}, got {self.decision!r}")


GRID_KEYS = {"defaults", "points", "search", "select", "description"}


def select_config(grid: dict) -> SelectConfig:
    select = grid.get("select", {})
    if not isinstance(select, dict):
        raise ConfigError(f"grid: select must be an object {{...}}, got {select!r}")
    unknown = set(select) - {f.name for f in fields(SelectConfig)}
    if unknown:
        raise ConfigError(f"select: unknown keys {sorted(unknown)}; known: ensemble, tta, decision")
    return build(SelectConfig, select, "grid select")


def trial_config(defaults: dict, values: dict, where: str) -> TrainConfig:
    """A search trial's settings: the grid's defaults updated by its values (and its name)."""
    return build(TrainConfig, {"name": "trial", **defaults, **values}, where)


def grid_search(grid: dict):
    """The grid's ``search`` block, checked (a :class:`bincount.model.search.Search`), or None."""
    from bincount.model.search import parse_search

    if "search" not in grid:
        return None
    defaults = grid.get("defaults", {})
    return parse_search(grid["search"], {f.name for f in fields(TrainConfig)} - {"name"},
                        lambda values, where: trial_config(defaults, values, where))


def fixed_points(grid: dict) -> list[TrainConfig]:
    """The grid's points written out by hand, each validated with the defaults."""
    unknown = set(grid) - GRID_KEYS
    if unknown:
        raise ConfigError(f"grid: unknown top-level keys {sorted(unknown)}; known: {sorted(GRID_KEYS)}")
    select_config(grid)  # validated here too, so start fails on a typo before anything trains
    known = {f.name for f in fields(TrainConfig)}
    defaults = grid.get("defaults", {})
    points = grid.get("points", [])
    if not isinstance(defaults, dict):
        raise ConfigError(f"grid: defaults must be an object {{...}}, got {defaults!r}")
    if not points and "search" not in grid:
        raise ConfigError("the grid has no points: expected {\"points\": [{...}, ...]} or a \"search\" block")
    if not isinstance(points, list) or not all(isinstance(p, dict) for p in points):
        raise ConfigError("grid: points must be a list of objects [{...}, ...]")
    configs = []
    for i, point in enumerate(points):
        merged = {**defaults, **point}
        merged.setdefault("name", f"point{i}")
        unknown = set(merged) - known
        if unknown:
            raise ConfigError(f"grid point {merged['name']!r}: unknown keys {sorted(unknown)}; "
                              f"known: {sorted(known)}")
        configs.append(build(TrainConfig, merged, f"grid point {merged['name']!r}"))
    return configs


def plan_grid(grid: dict) -> list[dict]:
    """What the train foreach trains, one item per task: the fixed points, then the search's trials.

    Each item is ``{"name", "config", "trial", "params"}``: a fixed point has its config and no
    trial; a trial of a random or quasi-random search has its drawn values (``params``) and its
    config; a trial of an adaptive search (tpe) has neither yet: it draws them when it starts.
    A search handed to SageMaker's tuner adds its trials after the tuning job has run them
    (bincount.sagemaker.tuning.tuning_trials, which also names each trial's ``job``).
    """
    from bincount.model.search import expand_trials

    items = [{"name": c.name, "config": c.as_dict(), "trial": None, "params": None} for c in fixed_points(grid)]
    search = grid_search(grid)
    if search is not None and search.tuner is None:  # a tuner's trials are known once it has run them
        drawn = expand_trials(search) if search.expanded else [None] * search.trials
        defaults = grid.get("defaults", {})
        for index, params in enumerate(drawn):
            name = search.trial_name(index)
            config = None if params is None else trial_config(defaults, {**params, "name": name},
                                                              f"search trial {name!r}").as_dict()
            items.append({"name": name, "config": config, "trial": index, "params": params})
    names = [item["name"] for item in items]
    if len(set(names)) != len(names):
        raise ConfigError(f"grid point names must be unique (a search's trials are named "
                          f"<prefix>-00, ...): {names}")
    return items


def expand_grid(grid: dict) -> list[TrainConfig]:
    """Every grid point whose settings are known before training: the fixed points and the trials of a
    random or quasi-random search (an adaptive search's trials draw theirs as they start)."""
    return [TrainConfig(**item["config"]) for item in plan_grid(grid) if item["config"] is not None]
