"""Hyperparameter grids: a JSON file of defaults plus a list of points.

    {"defaults": {"arch": "efficientnet_lite0", "epochs": 4, ...},
     "points": [{"name": "lr1e-3", "lr": 0.001}, {"name": "lr3e-4", "lr": 0.0003}],
     "select": {"ensemble": 2, "tta": true}}

Each point is the defaults updated by the point, validated into a
:class:`TrainConfig`, so a typo fails before any training starts. ``select``
(optional, :class:`SelectConfig`) says what the join makes of the trained points.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from bincount.model.architectures import get_arch
from bincount.model.metadata import DECISIONS


@dataclass(frozen=True)
class TrainConfig:
    name: str
    arch: str = "efficientnet_lite0"
    pretrained: bool = True
    lr: float = 1e-3
    batch_size: int = 32
    epochs: int = 4
    image_size: int = 224
    freeze_backbone: bool = False
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    warmup_fraction: float = 0.1
    precision: str = "auto"  # auto: bf16 autocast where the CPU/GPU supports it, else fp32
    # The stem and this many first blocks keep their ImageNet weights: early
    # layers see edges, not counts, and skipping their backward pass is the
    # cheapest speed-up there is at high resolution.
    frozen_blocks: int = 0
    # Adds this times the squared error of the expected count (softmax-weighted)
    # to the cross-entropy: a prediction of 4 for a 5 then costs less than a 1.
    count_loss_weight: float = 0.0
    # Weight the cross-entropy by inverse class frequency.
    class_balanced: bool = False
    # Also train on transposed photos (with the flips: all eight symmetries of the
    # square). A bin photographed from above holds as many items either way round.
    transpose: bool = False
    # The pretrained body learns at lr times this; the new head at lr.
    backbone_lr_factor: float = 1.0

    def __post_init__(self):
        arch = get_arch(self.arch)
        if self.frozen_blocks and arch.blocks is None:
            raise ValueError(f"grid point {self.name!r}: {self.arch} has no known blocks to freeze; "
                             "set frozen_blocks to 0")
        if self.precision not in {"auto", "fp32", "bf16"}:
            raise ValueError(f"grid point {self.name!r}: precision must be auto, fp32 or bf16")
        for key in ("lr", "batch_size", "epochs", "image_size", "backbone_lr_factor"):
            if getattr(self, key) <= 0:
                raise ValueError(f"grid point {self.name!r}: {key} must be positive")
        for key in ("frozen_blocks", "count_loss_weight"):
            if getattr(self, key) < 0:
                raise ValueError(f"grid point {self.name!r}: {key} must not be negative")

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class SelectConfig:
    # The served model averages the softmax of this many best grid points
    # (by validation accuracy, among those at the best point's image size).
    ensemble: int = 1
    # ...and of the four flips of each photo (test-time augmentation).
    tta: bool = False
    # How a softmax becomes a count: "argmax" (the likeliest count) or
    # "expected" (the count nearest the softmax's expected value, which uses
    # that counts are ordered: when the mass sits on 3 and 4, it answers near them).
    decision: str = "argmax"

    def __post_init__(self):
        if not isinstance(self.ensemble, int) or self.ensemble < 1:
            raise ValueError(f"select.ensemble must be a positive integer, got {self.ensemble!r}")
        if not isinstance(self.tta, bool):
            raise ValueError(f"select.tta must be true or false, got {self.tta!r}")
        if self.decision not in DECISIONS:
            raise ValueError(f"select.decision must be one of {DECISIONS}, got {self.decision!r}")


GRID_KEYS = {"defaults", "points", "select", "description"}


def select_config(grid: dict) -> SelectConfig:
    select = grid.get("select", {})
    unknown = set(select) - {f.name for f in fields(SelectConfig)}
    if unknown:
        raise ValueError(f"select: unknown keys {sorted(unknown)}; known: ensemble, tta, decision")
    return SelectConfig(**select)


def expand_grid(grid: dict) -> list[TrainConfig]:
    unknown = set(grid) - GRID_KEYS
    if unknown:
        raise ValueError(f"grid: unknown top-level keys {sorted(unknown)}; known: {sorted(GRID_KEYS)}")
    select_config(grid)  # validated here too, so start fails on a typo before anything trains
    known = {f.name for f in fields(TrainConfig)}
    defaults = dict(grid.get("defaults", {}))
    points = grid.get("points")
    if not points:
        raise ValueError("the grid has no points: expected {\"points\": [{...}, ...]}")
    configs = []
    for i, point in enumerate(points):
        merged = {**defaults, **point}
        merged.setdefault("name", f"point{i}")
        unknown = set(merged) - known
        if unknown:
            raise ValueError(f"grid point {merged['name']!r}: unknown keys {sorted(unknown)}; "
                             f"known: {sorted(known)}")
        configs.append(TrainConfig(**merged))
    names = [c.name for c in configs]
    if len(set(names)) != len(names):
        raise ValueError(f"grid point names must be unique: {names}")
    return configs
