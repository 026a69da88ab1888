"""The one inference handler, in the SageMaker PyTorch serving contract.

``model_fn``, ``input_fn``, ``predict_fn`` and ``output_fn`` are what
SageMaker's PyTorch container calls; the local endpoint (bincount.serve), the
flow's evaluate step and ``bincount predict`` call the same functions, so an
answer never depends on where the model runs.

A model folder holds ``model.pt`` (the weights, loaded with
``weights_only=True`` so no pickled code runs: one state_dict, or
``{"members": [state_dict, ...]}`` for an ensemble) and ``model.json``
(architecture, classes, image size, run id; ``members`` lists each ensemble
member's architecture; ``tta`` asks for flip test-time augmentation;
``decision`` is how the probabilities become a count, see ``decide``).

An answer's probabilities are the mean softmax over members and, with ``tta``,
over the four flips of the photo (flips never change a count).

Requests: one image (``image/jpeg``, ``image/png``, ``application/x-image``), or
``application/json`` ``{"instances": [{"b64": "..."}, ...]}`` (a bare list of
base64 strings also works). Response: ``{"predictions": [{"count", "probabilities",
"run_id"}, ...]}``.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

IMAGE_TYPES = {"image/jpeg", "image/png", "application/x-image"}
JSON_TYPE = "application/json"
# Far above a bin photo (about 480x430), far below what exhausts memory.
MAX_IMAGE_PIXELS = 40_000_000
MAX_BATCH = 64


class RequestError(ValueError):
    """A bad request: the message says what was wrong; ``status`` is its HTTP code."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def flip_views(batch) -> list:
    """The batch and its horizontal, vertical and double flips: four views, one count."""
    return [batch, batch.flip(3), batch.flip(2), batch.flip(2, 3)]


def mean_probabilities(models: list, normalizers: list, images, *, tta: bool, device: str):
    """Mean softmax of every member over every view of a uint8 batch, as float32 on the CPU."""
    import torch

    total = 0
    for model, normalize in zip(models, normalizers):
        batch = normalize(images).to(device).contiguous(memory_format=torch.channels_last)
        for view in (flip_views(batch) if tta else [batch]):
            total = total + torch.softmax(model(view).float(), 1)
    return (total / (len(models) * (4 if tta else 1))).cpu()


def decide(probabilities: list[float], classes: list[int], decision: str = "argmax") -> int:
    """The index of the answered count: the likeliest, or the one nearest the expected count."""
    if decision == "expected":
        expected = sum(p * c for p, c in zip(probabilities, classes))
        return min(range(len(classes)), key=lambda k: abs(classes[k] - expected))
    return max(range(len(probabilities)), key=probabilities.__getitem__)


def members_of(meta: dict) -> list[dict]:
    """Each ensemble member's description; a single model is an ensemble of one."""
    return meta.get("members") or [{"arch": meta["arch"]}]


@dataclass
class Predictor:
    models: list
    meta: dict
    device: str

    @property
    def classes(self) -> list[int]:
        return self.meta["classes"]

    @property
    def tta(self) -> bool:
        return bool(self.meta.get("tta"))

    @cached_property
    def _normalizers(self) -> list:
        from bincount.images import normalizer
        from bincount.models import get_arch

        return [normalizer(get_arch(m["arch"]).mean, get_arch(m["arch"]).std) for m in members_of(self.meta)]

    def prepare(self, raws: list[bytes]):
        """Encoded images -> uint8 tensor (N, 3, size, size), ready for ``predict_tensors``.

        Kept apart from the forward pass so that a server can decode each
        request on its own and still put many requests through the model at once.
        """
        import torch

        from bincount.images import decode

        return torch.stack([decode(r, self.meta["image_size"]) for r in raws])

    def predict_tensors(self, images, batch_size: int = 32) -> list[dict]:
        """Counts and per-count probabilities for a uint8 batch from ``prepare``."""
        import torch

        out = []
        with torch.inference_mode():
            for start in range(0, len(images), batch_size):
                probabilities = mean_probabilities(self.models, self._normalizers, images[start:start + batch_size],
                                                   tta=self.tta, device=self.device)
                for p in probabilities.tolist():
                    best = decide(p, self.classes, self.meta.get("decision", "argmax"))
                    out.append({"count": self.classes[best],
                                "probabilities": {str(c): round(q, 6) for c, q in zip(self.classes, p)},
                                "run_id": self.meta.get("run_id")})
        return out

    def predict_bytes(self, raws: list[bytes], batch_size: int = 32) -> list[dict]:
        """Counts and per-count probabilities for encoded images."""
        out = []
        for start in range(0, len(raws), batch_size):  # decode per chunk: memory stays bounded
            out.extend(self.predict_tensors(self.prepare(raws[start:start + batch_size]), batch_size))
        return out


def ensemble_state(states: list[bytes]) -> bytes:
    """Several members' state_dict bytes -> one ``model.pt`` (a lone member stays a plain state_dict)."""
    import torch

    if len(states) == 1:
        return states[0]
    buf = io.BytesIO()
    torch.save({"members": [torch.load(io.BytesIO(s), map_location="cpu", weights_only=True) for s in states]}, buf)
    return buf.getvalue()


def load_predictor(state_dict: bytes | str | Path, meta: dict, device: str | None = None) -> Predictor:
    import torch

    from bincount.models import create_model

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    source = io.BytesIO(state_dict) if isinstance(state_dict, bytes) else state_dict
    state = torch.load(source, map_location="cpu", weights_only=True)
    states = state["members"] if "members" in state else [state]
    members = members_of(meta)
    if len(states) != len(members):
        raise ValueError(f"model.pt holds {len(states)} members but model.json describes {len(members)}")
    models = []
    for member, member_state in zip(members, states):
        model = create_model(member["arch"], num_classes=len(meta["classes"]), pretrained=False,
                             image_size=meta["image_size"])
        model.load_state_dict(member_state)
        models.append(model.to(device).to(memory_format=torch.channels_last).eval())
    return Predictor(models=models, meta=meta, device=device)


# --- SageMaker PyTorch serving contract -------------------------------------

def model_fn(model_dir: str) -> Predictor:
    model_dir = Path(model_dir)
    meta = json.loads((model_dir / "model.json").read_text())
    return load_predictor(model_dir / "model.pt", meta)


def _checked_image(raw: bytes, what: str) -> bytes:
    """``raw`` if it is a complete, readable image of at most MAX_IMAGE_PIXELS, else RequestError.

    The size is checked from the header, before any pixel is decoded. (Not by
    turning PIL's DecompressionBombWarning into an error: warnings.catch_warnings
    changes process-wide state and is not safe with concurrent requests.)
    """
    from PIL import Image, UnidentifiedImageError

    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS  # PIL itself refuses above twice this, at open
    try:
        with Image.open(io.BytesIO(raw)) as image:
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise Image.DecompressionBombError(f"{image.width}x{image.height}")
            # A JPEG is checked at 1/8 scale: libjpeg still reads every byte (so a
            # truncated or corrupt file fails as at full size) but skips most of
            # the work; the pixels are decoded properly later. Other formats: no-op.
            image.draft(image.mode, (1, 1))
            image.load()
    except UnidentifiedImageError:
        raise RequestError(f"{what} is not an image (JPEG or PNG expected)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise RequestError(f"{what} has too many pixels (limit {MAX_IMAGE_PIXELS})", 413) from None
    except Exception as e:  # noqa: BLE001 - only untrusted bytes are parsed here: any failure is theirs
        raise RequestError(f"{what} could not be decoded: {e}") from None
    return raw


def input_fn(request_body: bytes, request_content_type: str) -> list[bytes]:
    content_type = (request_content_type or "").split(";")[0].strip().lower()
    if isinstance(request_body, str):
        request_body = request_body.encode()
    if content_type in IMAGE_TYPES:
        return [_checked_image(request_body, "the request body")]
    if content_type != JSON_TYPE:
        raise RequestError(f"unsupported content type {request_content_type!r}; send one of "
                           f"{sorted(IMAGE_TYPES | {JSON_TYPE})}", 415)
    try:
        payload = json.loads(request_body)
    except (ValueError, RecursionError) as e:  # also: bad UTF-8, over-long integers, deep nesting
        raise RequestError(f"malformed JSON: {e}") from None
    instances = payload.get("instances") if isinstance(payload, dict) else payload
    if not isinstance(instances, list) or not instances:
        raise RequestError('expected {"instances": [{"b64": "<base64 image>"}, ...]} with at least one image')
    if len(instances) > MAX_BATCH:
        raise RequestError(f"at most {MAX_BATCH} images per request, got {len(instances)}", 413)
    images = []
    for i, item in enumerate(instances):
        encoded = item.get("b64") if isinstance(item, dict) else item
        if not isinstance(encoded, str):
            raise RequestError(f"instance {i}: expected a base64 string or {{\"b64\": ...}}")
        try:
            raw = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise RequestError(f"instance {i}: not valid base64") from None
        images.append(_checked_image(raw, f"instance {i}"))
    return images


def predict_fn(input_data: list[bytes], model: Predictor) -> list[dict]:
    return model.predict_bytes(input_data)


def check_accept(accept: str | None) -> str:
    """The response type for an Accept header, or RequestError 406.

    A server can call this before running the model, so a request it cannot
    answer costs no forward pass.
    """
    wanted = {part.split(";")[0].strip().lower() for part in (accept or JSON_TYPE).split(",")}
    if not wanted & {JSON_TYPE, "application/*", "*/*"}:
        raise RequestError(f"can only answer {JSON_TYPE}, not {accept!r}", 406)
    return JSON_TYPE


def output_fn(prediction: list[dict], accept: str = JSON_TYPE) -> str:
    check_accept(accept)
    return json.dumps({"predictions": prediction})
