"""The one inference handler, in the SageMaker PyTorch serving contract.

``model_fn``, ``input_fn``, ``predict_fn`` and ``output_fn`` are what
SageMaker's PyTorch container calls; the local endpoint (bincount.serving.server)
calls the same functions, and the forward pass behind ``predict_fn`` is the
:class:`bincount.model.predictor.Predictor` that the evaluate step and
``bincount predict`` use, so an answer never depends on where the model runs.

A model folder holds ``model.pt`` (the weights) and ``model.json`` (a
:class:`bincount.model.metadata.ModelMeta`: architecture, classes, image size,
ensemble members, flip TTA, decision rule, run id), checked when it is loaded.

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
from pathlib import Path

from bincount.model.metadata import ModelMeta
from bincount.model.predictor import Predictor, load_predictor

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


# --- SageMaker PyTorch serving contract -------------------------------------

def model_fn(model_dir: str) -> Predictor:
    model_dir = Path(model_dir)
    return load_predictor(model_dir / "model.pt", ModelMeta.read(model_dir / "model.json"))


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
