"""The one forward pass: members, normalisation, flips, device and precision in one place.

Training's validation, the join's ensemble, the evaluate step, the endpoint, the audit and
the accuracy benchmark all get their softmax from a :class:`Predictor`, so a count never
depends on which of them asked.

An answer's probabilities are the mean softmax over the members and, with ``tta``, over
the four flips of the photo (flips never change a count). ``decide`` turns them into a
count. Weights are loaded with ``weights_only=True``, so no pickled code runs: ``model.pt``
is one state_dict, or ``{"members": [state_dict, ...]}`` for an ensemble.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from bincount.model.metadata import ModelMeta

VIEWS = 4  # the photo, and its horizontal, vertical and double flips


def pick_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def autocast_dtype(precision: str, device: str):
    """bf16 where the hardware does it natively (doubles CPU throughput there); None: fp32."""
    import torch

    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if torch.cpu._is_avx512_bf16_supported() else None


def autocast(device: str, dtype):
    """Mixed precision for a forward pass: ``dtype`` from ``autocast_dtype``, or None for fp32."""
    import torch

    return torch.autocast(device, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def flip_views(batch) -> list:
    """The batch and its horizontal, vertical and double flips: four views, one count."""
    return [batch, batch.flip(3), batch.flip(2), batch.flip(2, 3)]


def decide(probabilities: list[float], classes: list[int], decision: str = "argmax") -> int:
    """The index of the answered count: the likeliest, or the one nearest the expected count."""
    if decision == "expected":
        expected = sum(p * c for p, c in zip(probabilities, classes))
        return min(range(len(classes)), key=lambda k: abs(classes[k] - expected))
    return max(range(len(probabilities)), key=probabilities.__getitem__)


@dataclass
class Predictor:
    models: list  # the members, best first, on ``device``, in eval mode
    meta: ModelMeta
    device: str
    dtype: object = None  # autocast dtype (torch.bfloat16), or None for fp32
    _normalizers: list = field(init=False, repr=False)

    def __post_init__(self):
        from bincount.data.images import normalizer
        from bincount.model.architectures import get_arch

        if len(self.models) != len(self.meta.members):
            raise ValueError(f"{len(self.models)} networks but the metadata describes {len(self.meta.members)}")
        archs = [get_arch(m.arch) for m in self.meta.members]
        self._normalizers = [normalizer(a.mean, a.std) for a in archs]

    @classmethod
    def of_network(cls, model, *, arch: str, image_size: int, num_classes: int, device: str,
                   dtype=None) -> "Predictor":
        """A predictor around one network being trained (its classes are the output indices).
        Puts the network in eval mode: the next training epoch's ``model.train()`` undoes it."""
        model.eval()
        meta = ModelMeta(arch=arch, image_size=image_size, classes=list(range(num_classes)))
        return cls(models=[model], meta=meta, device=device, dtype=dtype)

    @property
    def classes(self) -> list[int]:
        return self.meta.classes

    @property
    def tta(self) -> bool:
        return self.meta.tta

    @contextmanager
    def _forward(self):
        import torch

        with torch.inference_mode(), autocast(self.device, self.dtype):
            yield

    def _inputs(self, k: int, images):
        import torch

        return self._normalizers[k](images).to(self.device).contiguous(memory_format=torch.channels_last)

    def logits(self, images):
        """The first member's logits (float32, on the device) for a uint8 batch, no flips:
        what training's validation loss is computed from."""
        with self._forward():
            return self.models[0](self._inputs(0, images)).float()

    def view_probabilities(self, images, *, views: int | None = None) -> list[list]:
        """Softmax per member and per view, ``[member][view] -> (N, classes)`` float32 on the CPU,
        for a uint8 batch. ``views``: 1 (the photo) or 4 (and its flips); default by ``tta``."""
        import torch

        views = views or (VIEWS if self.tta else 1)
        out = []
        with self._forward():
            for k, model in enumerate(self.models):
                batch = self._inputs(k, images)
                out.append([torch.softmax(model(v).float(), 1).cpu() for v in flip_views(batch)[:views]])
        return out

    def probabilities(self, images):
        """Mean softmax over every member and view of a uint8 batch: (N, classes) float32 on the CPU."""
        import torch

        views = flip_views if self.tta else (lambda batch: [batch])
        total = 0
        with self._forward():
            for k, model in enumerate(self.models):
                for view in views(self._inputs(k, images)):
                    total = total + torch.softmax(model(view).float(), 1)
        return (total / (len(self.models) * (VIEWS if self.tta else 1))).cpu()

    def prepare(self, raws: list[bytes]):
        """Encoded images -> uint8 tensor (N, 3, size, size), ready for ``predict_tensors``.

        Kept apart from the forward pass so that a server can decode each
        request on its own and still put many requests through the model at once.
        """
        import torch

        from bincount.data.images import decode

        return torch.stack([decode(r, self.meta.image_size) for r in raws])

    def answer(self, probabilities: list[float]) -> dict:
        """One photo's answer from its probabilities: the count, per-count probabilities, run id."""
        best = decide(probabilities, self.classes, self.meta.decision)
        return {"count": self.classes[best],
                "probabilities": {str(c): round(q, 6) for c, q in zip(self.classes, probabilities)},
                "run_id": self.meta.run_id}

    def predict_tensors(self, images, batch_size: int = 32) -> list[dict]:
        """Counts and per-count probabilities for a uint8 batch from ``prepare``."""
        out = []
        for start in range(0, len(images), batch_size):
            out.extend(self.answer(p) for p in self.probabilities(images[start:start + batch_size]).tolist())
        return out

    def predict_bytes(self, raws: list[bytes], batch_size: int = 32) -> list[dict]:
        """Counts and per-count probabilities for encoded images."""
        out = []
        for start in range(0, len(raws), batch_size):  # decode per chunk: memory stays bounded
            out.extend(self.predict_tensors(self.prepare(raws[start:start + batch_size]), batch_size))
        return out

    def predict_stream(self, photos: Iterable[tuple[str, bytes]], batch_size: int = 32,
                       progress: bool = False, total: int | None = None) -> Iterator[tuple[str, dict]]:
        """(id, answer) for each (id, encoded image) of ``photos``, a batch at a time: memory
        stays one batch however many photos stream through."""
        import itertools

        from bincount.data.progress import progress_bar

        bar = progress_bar(total=total, desc="predicting", unit=" img", disable=not progress)
        photos = iter(photos)
        while batch := list(itertools.islice(photos, batch_size)):
            ids, raws = zip(*batch)
            yield from zip(ids, self.predict_bytes(list(raws), batch_size))
            bar.update(len(batch))
        bar.close()

    def predict_photos(self, photos: Mapping[str, bytes], ids: Iterable[str], batch_size: int = 32,
                       progress: bool = False) -> list[dict]:
        """Answers for ``ids``, in their order, their photos streamed from ``photos`` (a run's
        shards are read a shard at a time, not in the order of ``ids``)."""
        from bincount.data.shards import read_photos

        ids = list(ids)
        answers = dict(self.predict_stream(read_photos(photos, ids), batch_size, progress=progress, total=len(ids)))
        return [answers[i] for i in ids]


def ensemble_state(states: list[bytes]) -> bytes:
    """Several members' state_dict bytes -> one ``model.pt`` (a lone member stays a plain state_dict)."""
    import torch

    if len(states) == 1:
        return states[0]
    buf = io.BytesIO()
    torch.save({"members": [torch.load(io.BytesIO(s), map_location="cpu", weights_only=True) for s in states]}, buf)
    return buf.getvalue()


def load_predictor(state_dict: bytes | str | Path, meta: ModelMeta | dict, device: str | None = None) -> Predictor:
    """A predictor for ``model.pt`` (bytes or a path) described by ``meta`` (checked here)."""
    import torch

    from bincount.model.architectures import create_model

    meta = ModelMeta.from_dict(meta)
    device = device or pick_device()
    source = io.BytesIO(state_dict) if isinstance(state_dict, bytes) else state_dict
    state = torch.load(source, map_location="cpu", weights_only=True)
    states = state["members"] if "members" in state else [state]
    if len(states) != len(meta.members):
        raise ValueError(f"model.pt holds {len(states)} members but model.json describes {len(meta.members)}")
    models = []
    for member, member_state in zip(meta.members, states):
        model = create_model(member.arch, num_classes=len(meta.classes), pretrained=False,
                             image_size=meta.image_size)
        model.load_state_dict(member_state)
        models.append(model.to(device).to(memory_format=torch.channels_last).eval())
    return Predictor(models=models, meta=meta, device=device)
