"""A grid point's training state after each epoch, so that a retry or a resume goes on from there.

At the bucket's scale a grid point trains for hours, often on spot capacity; without a
checkpoint every failure costs all of it. After each epoch :func:`bincount.model.train.fit`
saves everything the next epoch depends on: the weights, the optimizer and the schedule,
every random generator (torch's own, and each rank's shuffle and augmentation generators),
the curves so far and the best epoch's result. A fit that finds a checkpoint continues after
its epoch and, on a CPU, ends with the same weights as one that never stopped (the tests
check this).

A checkpoint is one object (``checkpoint.pt``, read with ``weights_only=True``) at a folder
or ``s3://`` prefix (bincount.data.blobs): the run's own storage in a flow
(bincount.flow.storage), ``/opt/ml/checkpoints`` in a SageMaker training job. It records the
grid point's settings; one written for other settings is refused, never continued.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from bincount.data.blobs import join, read_blob, write_blob

CHECKPOINT_FILE = "checkpoint.pt"
FORMAT = 1


class CheckpointMismatch(ValueError):
    """A checkpoint was written for other settings than the ones training now."""


@dataclass(frozen=True)
class Checkpoints:
    """Where one grid point's checkpoint goes (``folder``), and where else one may be found to
    start from (``resume_from``: the same grid point's folder in the run a ``resume`` continues)."""

    folder: str
    resume_from: str | None = None

    @property
    def url(self) -> str:
        return join(self.folder, CHECKPOINT_FILE)

    def load(self) -> dict | None:
        """The newest state saved for this grid point, or None: this folder's first (a retry of
        this task), else the one it resumes from."""
        import torch

        for folder in (self.folder, self.resume_from):
            raw = read_blob(join(folder, CHECKPOINT_FILE)) if folder else None
            if raw is not None:
                # on the CPU: a retry may land on a machine without the GPU it was saved from
                state = torch.load(io.BytesIO(raw), weights_only=True, map_location="cpu")
                state["source"] = join(folder, CHECKPOINT_FILE)
                return state
        return None

    def save(self, state: dict) -> None:
        import torch

        buffer = io.BytesIO()
        torch.save({**state, "format": FORMAT}, buffer)
        write_blob(self.url, buffer.getvalue())


def check_compatible(state: dict, config: dict, num_classes: int, world_size: int) -> None:
    """Refuse a checkpoint that was not written by this grid point with these settings, on as
    many processes (each has generators of its own)."""
    if state.get("format") != FORMAT:
        raise CheckpointMismatch(f"{state.get('source')}: checkpoint format {state.get('format')!r}, "
                                 f"this bincount reads {FORMAT}")
    if state["config"] != config or state["num_classes"] != num_classes:
        changed = sorted(k for k in set(state["config"]) | set(config) if state["config"].get(k) != config.get(k))
        raise CheckpointMismatch(f"{state.get('source')} was written for other settings ({changed or 'classes'} "
                                 "differ): remove it to train this grid point from scratch")
    if len(state["rng"]) != world_size:
        raise CheckpointMismatch(f"{state.get('source')} was written by {len(state['rng'])} training processes, "
                                 f"not {world_size}: train with as many, or remove it to start from scratch")
