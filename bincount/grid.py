"""Hyperparameter grids: a JSON file of defaults plus a list of points.

    {"defaults": {"arch": "efficientnet_lite0", "epochs": 4, ...},
     "points": [{"name": "lr1e-3", "lr": 0.001}, {"name": "lr3e-4", "lr": 0.0003}]}

Each point is the defaults updated by the point, validated into a
:class:`TrainConfig`, so a typo fails before any training starts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from bincount.models import get_arch


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

    def __post_init__(self):
        get_arch(self.arch)
        if self.precision not in {"auto", "fp32", "bf16"}:
            raise ValueError(f"grid point {self.name!r}: precision must be auto, fp32 or bf16")
        for key in ("lr", "batch_size", "epochs", "image_size"):
            if getattr(self, key) <= 0:
                raise ValueError(f"grid point {self.name!r}: {key} must be positive")

    def as_dict(self) -> dict:
        return asdict(self)


def expand_grid(grid: dict) -> list[TrainConfig]:
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
