"""What a served model is: ``model.json``, as one typed record.

The join writes it (through :func:`bincount.model.selection.choose_model`), the flow keeps
it as the ``model_meta`` artifact (its :meth:`ModelMeta.to_dict`), the package carries it as
``model.json``, and everything that loads a model reads it back through
:meth:`ModelMeta.from_dict`, which refuses a missing or unknown field with a message that
says which. Nothing else reads the dict by key.

Version 1 is what bincount has always written; a file from before the ``version`` field
existed has the same fields and reads as version 1.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path

FORMAT_VERSION = 1
# How a softmax becomes a count: "argmax" (the likeliest count) or "expected" (the count
# nearest the softmax's expected value, which uses that counts are ordered).
DECISIONS = ("argmax", "expected")


class ModelMetaError(ValueError):
    """A model.json that bincount cannot serve; the message says which field and why."""


@dataclass(frozen=True)
class Member:
    """One network of the served ensemble."""

    arch: str
    grid_point: str | None = None


@dataclass(frozen=True)
class ModelMeta:
    arch: str  # the best member's architecture
    image_size: int  # every member takes photos resized to this square
    classes: list[int]  # the counts, in the order of the network's outputs
    members: tuple[Member, ...] = ()  # best first; empty means one member of ``arch``
    grid_point: str | None = None  # the best member's grid point
    tta: bool = False  # average over the four flips of each photo
    decision: str = "argmax"  # see DECISIONS
    val_accuracy: float | None = None  # of the served combination, on the validation split
    flow: str | None = None
    run_id: str | None = None
    version: int = FORMAT_VERSION

    def __post_init__(self):
        members = tuple(m if isinstance(m, Member) else _member(m) for m in self.members)
        object.__setattr__(self, "members", members or (Member(self.arch, self.grid_point),))
        object.__setattr__(self, "classes", list(self.classes))
        problems = []
        if not isinstance(self.arch, str) or not self.arch:
            problems.append(f"arch must be an architecture name, got {self.arch!r}")
        if isinstance(self.image_size, bool) or not isinstance(self.image_size, int) or self.image_size <= 0:
            problems.append(f"image_size must be a positive integer, got {self.image_size!r}")
        if not self.classes or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0
                                       for c in self.classes):
            problems.append(f"classes must be a non-empty list of counts, got {self.classes!r}")
        if not isinstance(self.tta, bool):
            problems.append(f"tta must be true or false, got {self.tta!r}")
        if self.decision not in DECISIONS:
            problems.append(f"decision must be one of {DECISIONS}, got {self.decision!r}")
        if not isinstance(self.version, int) or not 1 <= self.version <= FORMAT_VERSION:
            problems.append(f"version {self.version!r} is not one this bincount reads (1 to {FORMAT_VERSION}); "
                            "a newer bincount wrote it")
        if problems:
            raise ModelMetaError("model.json: " + "; ".join(problems))

    @classmethod
    def from_dict(cls, d: dict, *, where: str = "model.json") -> "ModelMeta":
        if isinstance(d, ModelMeta):
            return d
        if not isinstance(d, dict):
            raise ModelMetaError(f"{where}: expected a JSON object, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ModelMetaError(f"{where}: unknown fields {unknown}; known: {sorted(known)}")
        missing = sorted(f.name for f in fields(cls) if f.name not in d and f.default is MISSING)
        if missing:
            raise ModelMetaError(f"{where}: missing fields {missing}")
        try:
            return cls(**d)
        except ModelMetaError as e:
            raise ModelMetaError(str(e).replace("model.json", where, 1)) from None

    def to_dict(self) -> dict:
        """The JSON form: model.json, and the flow's ``model_meta`` artifact."""
        d = asdict(self)
        d["members"] = [asdict(m) for m in self.members]
        return d

    @classmethod
    def read(cls, path: str | Path) -> "ModelMeta":
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ModelMetaError(f"{path}: cannot read model metadata: {e}") from None
        return cls.from_dict(raw, where=str(path))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def _member(d) -> Member:
    if not isinstance(d, dict) or "arch" not in d or set(d) - {"arch", "grid_point"}:
        raise ModelMetaError(f"model.json: each of members must be {{\"arch\": ..., \"grid_point\": ...}}, got {d!r}")
    return Member(**d)
