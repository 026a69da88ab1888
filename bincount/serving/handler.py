"""The one inference handler, in the SageMaker PyTorch serving contract.

``model_fn``, ``input_fn``, ``predict_fn`` and ``output_fn`` are what
SageMaker's PyTorch container calls; the local endpoint (bincount.serving.server)
calls the same functions, and the forward pass behind ``predict_fn`` is the
:class:`bincount.model.predictor.Predictor` that the evaluate step and
``bincount predict`` use, so an answer never depends on where the model runs.

A model folder holds ``model.pt`` (the weights) and ``model.json`` (a
:class:`bincount.model.metadata.ModelMeta`: architecture, classes, image size,
ensemble members, flip TTA, decision rule, run id), checked when it is loaded.

Requests: one image (``image/jpeg``, ``image/png``, ``application/x-image``),
``application/json`` ``{"instances": [{"b64": "..."}, ...]}`` (a bare list of
base64 strings also works), or ``application/x-npy``: a decoded image as NumPy
writes it (``np.save``), uint8, height x width (greyscale) or height x width x
channels (1, 3 or 4, last), or a batch of them (N x height x width x channels).
SageMaker's PyTorch serving toolkit accepts JSON and NPY by default, so a client
written for it can send either. Responses (``Accept``): ``application/json``
``{"predictions": [{"count", "probabilities", "run_id"}, ...]}`` (the default), or
``text/csv``, a line per image without a header: the count, then the probability
of each count in the model's class order (``model.json``'s ``classes``).

Errors are :class:`RequestError`, with bincount's message and an HTTP status. Where
SageMaker's inference toolkit is installed (its containers, ``--deploy-target
local-toolkit``), RequestError is also the toolkit's own error type, so the toolkit
answers with that status instead of turning every exception into a 500.

Only JPEG and PNG are decoded, whatever else Pillow could read (another format
gets 415). An image may have at most MAX_IMAGE_PIXELS pixels and a request
MAX_REQUEST_PIXELS in all (413), both checked from the headers before any pixel
is decoded: a small body must not cost seconds of CPU. 16-bit greyscale PNGs are
scaled to 8 bits; other modes that would not decode to the right colours get 415.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import csv
import io
import json
from pathlib import Path

from bincount.data.captures import media_type
from bincount.model.metadata import ModelMeta
from bincount.model.predictor import Predictor, load_predictor

IMAGE_TYPES = {"image/jpeg", "image/png", "application/x-image"}
JSON_TYPE = "application/json"
NPY_TYPE = "application/x-npy"
CSV_TYPE = "text/csv"
FORMATS = ("JPEG", "PNG")  # what the endpoint documents; Image.open tries no other decoder
# A bin photo is about 0.2 Mpx (about 480x430) and the model sees 224x224 or less:
# 8 Mpx per image leaves 40x room (a 3264x2448 phone photo fits), and 16 Mpx per request
# admits 64 bin photos, the most a request may hold, while bounding a request's decoding
# to well under a second of CPU.
MAX_IMAGE_PIXELS = 8_000_000
MAX_REQUEST_PIXELS = 16_000_000
MAX_BATCH = 64
# Modes that Image.convert("RGB") turns into the right colours as they are.
PLAIN_MODES = {"1", "L", "LA", "P", "RGB", "RGBA", "CMYK"}
# 16-bit greyscale (PNG): convert("RGB") clips every value over 255, so all but the
# darkest pixels came out white. Scaled to 8 bits here instead.
WIDE_GREY_MODES = {"I;16", "I;16B", "I;16L", "I"}
# Other image formats, named in the 415 that refuses them (by their magic bytes: asking
# Pillow would run the very decoders that FORMATS keeps away from untrusted bytes).
OTHER_FORMATS = [
    ("GIF", lambda b: b[:6] in (b"GIF87a", b"GIF89a")),
    ("TIFF", lambda b: b[:4] in (b"II*\0", b"MM\0*")),
    ("BMP", lambda b: b[:2] == b"BM" and int.from_bytes(b[14:18], "little") in (12, 40, 52, 56, 64, 108, 124)),
    ("WebP", lambda b: b[:4] == b"RIFF" and b[8:12] == b"WEBP"),
    ("JPEG 2000", lambda b: b[:12] == b"\0\0\0\x0cjP  \r\n\x87\n" or b[:4] == b"\xff\x4f\xff\x51"),
    ("HEIF/AVIF", lambda b: b[4:8] == b"ftyp" and b[8:12] in (b"heic", b"heix", b"mif1", b"msf1", b"avif", b"avis")),
]


try:  # SageMaker's inference toolkit: its containers, and --deploy-target local-toolkit
    from sagemaker_inference.errors import GenericInferenceToolkitError as _ToolkitError
except ImportError:  # bincount's own server only
    class _ToolkitError(Exception):
        pass


class RequestError(ValueError, _ToolkitError):
    """A bad request: the message says what was wrong; ``status`` is its HTTP code.

    Also the toolkit's error type where it is installed: its Transformer answers any other
    exception with a 500, and this one with ``status_code`` and ``message``."""

    def __init__(self, message: str, status: int = 400):
        ValueError.__init__(self, message)
        self.status = self.status_code = status
        self.message = self.phrase = message

    def __str__(self) -> str:
        return self.message


# --- SageMaker PyTorch serving contract -------------------------------------

def model_fn(model_dir: str) -> Predictor:
    model_dir = Path(model_dir)
    return load_predictor(model_dir / "model.pt", ModelMeta.read(model_dir / "model.json"))


def input_fn(request_body: bytes, request_content_type: str) -> list[bytes]:
    return read_images(request_body, request_content_type)


def predict_fn(input_data: list[bytes], model: Predictor) -> list[dict]:
    return model.predict_bytes(input_data)


# What each Accept entry (parameters dropped) is answered with.
ANSWERS = {JSON_TYPE: JSON_TYPE, "application/*": JSON_TYPE, "*/*": JSON_TYPE, CSV_TYPE: CSV_TYPE, "text/*": CSV_TYPE}


def check_accept(accept: str | None) -> str:
    """The response type for an Accept header (the first entry bincount can answer; none:
    JSON), or RequestError 406.

    A server can call this before running the model, so a request it cannot
    answer costs no forward pass.
    """
    wanted = [media_type(part) for part in (accept or JSON_TYPE).split(",")]
    answer = next((ANSWERS[w] for w in wanted if w in ANSWERS), None)
    if answer is None:
        raise RequestError(f"can only answer {JSON_TYPE} or {CSV_TYPE}, not {accept!r}", 406)
    return answer


def output_fn(prediction: list[dict], accept: str = JSON_TYPE) -> str:
    if check_accept(accept) == CSV_TYPE:
        out = io.StringIO()
        csv.writer(out, lineterminator="\n").writerows(
            [p["count"], *p["probabilities"].values()] for p in prediction)
        return out.getvalue()
    return json.dumps({"predictions": prediction})


# --- Reading a request ---------------------------------------------------------------

def read_images(request_body: bytes, request_content_type: str, *, max_image_pixels: int = MAX_IMAGE_PIXELS,
                max_request_pixels: int = MAX_REQUEST_PIXELS) -> list:
    """A request's images, each checked to be a complete JPEG or PNG within the pixel limits,
    or RequestError. An image is returned as it came, except a 16-bit one: as an 8-bit PNG;
    an NPY request's images are uint8 arrays (height x width x channels), which
    bincount.data.images.decode takes as it takes encoded ones."""
    if media_type(request_content_type) == NPY_TYPE:
        return read_arrays(request_body, max_image_pixels=max_image_pixels, max_request_pixels=max_request_pixels)
    encoded = _encoded_images(request_body, request_content_type)
    with contextlib.ExitStack() as opened:
        # Every header first: a request over its budget is refused before any pixel is decoded.
        images = [opened.enter_context(_open(raw, what, max_image_pixels)) for what, raw in encoded]
        check_request_pixels(sum(image.width * image.height for image in images), max_request_pixels)
        return [_checked(image, raw, what) for image, (what, raw) in zip(images, encoded)]


def check_image_count(count: int) -> None:
    """RequestError 413 for a request of more than MAX_BATCH images, whatever carries them."""
    if count > MAX_BATCH:
        raise RequestError(f"at most {MAX_BATCH} images per request, got {count}", 413)


def check_request_pixels(total: int, max_request_pixels: int) -> None:
    """RequestError 413 for a request whose images have more than ``max_request_pixels`` in all."""
    if total > max_request_pixels:
        raise RequestError(f"the request's images have {total:,} pixels in all, over the limit of "
                           f"{max_request_pixels:,} per request: send fewer or smaller images", 413)


def _encoded_images(request_body: bytes, request_content_type: str) -> list[tuple[str, bytes]]:
    """(what to call it in an error, its bytes) for each image of a request."""
    content_type = media_type(request_content_type)
    if isinstance(request_body, str):
        request_body = request_body.encode()
    if content_type in IMAGE_TYPES:
        return [("the request body", request_body)]
    if content_type != JSON_TYPE:
        raise RequestError(f"unsupported content type {request_content_type!r}; send one of "
                           f"{sorted(IMAGE_TYPES | {JSON_TYPE, NPY_TYPE})}", 415)
    try:
        payload = json.loads(request_body)
    except (ValueError, RecursionError) as e:  # also: bad UTF-8, over-long integers, deep nesting
        raise RequestError(f"malformed JSON: {e}") from None
    instances = payload.get("instances") if isinstance(payload, dict) else payload
    if not isinstance(instances, list) or not instances:
        raise RequestError('expected {"instances": [{"b64": "<base64 image>"}, ...]} with at least one image')
    check_image_count(len(instances))
    images = []
    for i, item in enumerate(instances):
        encoded = item.get("b64") if isinstance(item, dict) else item
        if not isinstance(encoded, str):
            raise RequestError(f"instance {i}: expected a base64 string or {{\"b64\": ...}}")
        try:
            images.append((f"instance {i}", base64.b64decode(encoded, validate=True)))
        except (binascii.Error, ValueError):
            raise RequestError(f"instance {i}: not valid base64") from None
    return images


def _open(raw: bytes, what: str, max_image_pixels: int):
    """``raw`` opened as a JPEG or PNG, its header read and checked, no pixel decoded; or RequestError.

    The size is checked from the header. (Not by turning PIL's DecompressionBombWarning into
    an error: warnings.catch_warnings changes process-wide state and is not safe with
    concurrent requests.)
    """
    from PIL import Image, UnidentifiedImageError

    Image.MAX_IMAGE_PIXELS = max_image_pixels  # PIL itself refuses above twice this, at open
    too_many = RequestError(f"{what} has too many pixels (limit {max_image_pixels:,} per image)", 413)
    try:
        image = Image.open(io.BytesIO(raw), formats=FORMATS)
    except UnidentifiedImageError:
        other = next((name for name, matches in OTHER_FORMATS if matches(raw)), None)
        if other:
            raise RequestError(f"{what} is a {other} image: only JPEG and PNG are decoded", 415) from None
        raise RequestError(f"{what} is not an image (JPEG or PNG expected)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise too_many from None
    except Exception as e:  # noqa: BLE001 - only untrusted bytes are parsed here: any failure is theirs
        raise RequestError(f"{what} could not be decoded: {e}") from None
    if image.width * image.height > max_image_pixels:
        image.close()
        raise too_many
    if image.mode not in PLAIN_MODES | WIDE_GREY_MODES:
        image.close()
        raise RequestError(f"{what} is a {image.format} image of mode {image.mode}, which is not decoded: send "
                           "8-bit greyscale, palette, RGB(A) or CMYK, or 16-bit greyscale", 415)
    return image


def _checked(image, raw: bytes, what: str) -> bytes:
    """``raw`` once every byte of ``image`` decodes (as 8 bits if it was 16), or RequestError."""
    try:
        if image.mode in WIDE_GREY_MODES:
            image.load()
            return _eight_bit_png(image)
        # A JPEG is checked at 1/8 scale: libjpeg still reads every byte (so a truncated
        # or corrupt file fails as at full size) but skips most of the work; the pixels
        # are decoded properly later. Other formats: no-op.
        image.draft(image.mode, (1, 1))
        image.load()
    except Exception as e:  # noqa: BLE001 - only untrusted bytes are parsed here: any failure is theirs
        raise RequestError(f"{what} could not be decoded: {e}") from None
    return raw


def _eight_bit_png(image) -> bytes:
    """A 16-bit greyscale image as an 8-bit greyscale PNG, 0-65535 scaled to 0-255."""
    import numpy as np
    from PIL import Image

    wide = np.asarray(image).astype(np.float32)  # "I" holds 32-bit ints: clip to the 16 bits a PNG has
    out = io.BytesIO()
    Image.fromarray(np.rint(np.clip(wide, 0, 65535) / 257).astype(np.uint8)).save(out, format="PNG", compress_level=1)
    return out.getvalue()


def read_arrays(request_body: bytes, *, max_image_pixels: int = MAX_IMAGE_PIXELS,
                max_request_pixels: int = MAX_REQUEST_PIXELS) -> list:
    """The images of an ``application/x-npy`` body, as uint8 arrays (height x width x channels),
    or RequestError.

    Everything is checked from the NPY header before the data is read: ``np.load`` would first
    allocate whatever shape a header claims, so a 100-byte body could ask for gigabytes. Pickled
    (object) arrays are never loaded.
    """
    import numpy as np
    from numpy.lib import format as npy

    if isinstance(request_body, str):
        request_body = request_body.encode("latin-1")
    body = io.BytesIO(request_body)
    try:
        version = npy.read_magic(body)
        read_header = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
        shape, fortran_order, dtype = read_header(body)
    except (ValueError, EOFError) as e:
        raise RequestError(f"not an NPY array: {e}") from None
    if dtype != np.uint8:
        raise RequestError(f"the array's type is {dtype}; send uint8 pixels (0-255), as decoded from a JPEG or PNG")
    declared = tuple(shape)
    if len(shape) == 2:
        shape = (1, *shape, 1)
    elif len(shape) == 3:
        shape = (1, *shape)
    if len(shape) != 4 or shape[3] not in (1, 3, 4) or 0 in shape:
        raise RequestError(f"the array's shape is {declared}; send height x width, height x width x channels "
                           "or images x height x width x channels, with 1, 3 or 4 channels, last")
    count, height, width, channels = shape
    check_image_count(count)
    if height * width > max_image_pixels:
        raise RequestError(f"the array's images have {height * width:,} pixels each (limit {max_image_pixels:,} "
                           "per image)", 413)
    check_request_pixels(count * height * width, max_request_pixels)
    data = request_body[body.tell():]
    if len(data) != count * height * width * channels:
        raise RequestError(f"the array's header says {count * height * width * channels:,} bytes of pixels, "
                           f"the body has {len(data):,}")
    pixels = np.frombuffer(data, dtype=np.uint8).reshape(shape, order="F" if fortran_order else "C")
    return [image if channels > 1 else image[:, :, 0] for image in pixels]
