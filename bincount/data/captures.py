"""Captured endpoint traffic: SageMaker's data-capture format, built and read back.

A SageMaker endpoint with a ``DataCaptureConfig`` writes every sampled request, with its
answer, as one JSON object a line (JSON Lines)::

    {"captureData": {"endpointInput":  {"observedContentType": "image/jpeg", "mode": "INPUT",
                                        "data": "<base64>", "encoding": "BASE64"},
                     "endpointOutput": {"observedContentType": "application/json", "mode": "OUTPUT",
                                        "data": "{\\"predictions\\": ...}", "encoding": "JSON"}},
     "eventMetadata": {"eventId": "<uuid>", "inferenceId": "<the caller's InferenceId>",
                       "customAttributes": ["<the X-Amzn-SageMaker-Custom-Attributes value>"],
                       "inferenceTime": "2024-05-01T13:45:27Z"},
     "eventVersion": "0"}

in files laid out by the hour the requests were answered::

    <destination>/<endpoint-name>/<variant-name>/yyyy/mm/dd/hh/<mm>-<ss>-<ms>-<uuid>.jsonl

What was confirmed, and where (public sources read through the project's search tools):

- The record's fields and the two ``mode`` values: the SageMaker Python SDK's model-monitoring
  guide and AWS's "Capture data from real-time endpoint" page show captured lines with
  ``captureData.endpointInput/endpointOutput`` {``observedContentType``, ``mode`` INPUT/OUTPUT,
  ``data``, ``encoding``}, ``eventMetadata`` {``eventId``, ``inferenceTime``} and ``eventVersion``
  "0"; ``encoding`` is ``CSV`` or ``JSON`` (the text as it came) for the content types named in
  the config's ``CaptureContentTypeHeader``, ``BASE64`` otherwise (the API reference of
  DataCaptureConfig: "If no headers are specified SageMaker AI will by default base64 encode").
- ``eventMetadata.inferenceId``: Model Monitor's ground-truth merge examples map captured
  ``inferenceId`` to ``eventId``; present only when the caller passed an InferenceId.
- ``eventMetadata.customAttributes``: a *list* holding the request's custom-attributes header
  value (aws-samples/amazon-sagemaker-data-quality-monitor-custom-preprocessing: its README shows
  ``"customAttributes": ["{\\"testIndicator\\": \\"true\\", ...}"]`` and its preprocessor reads
  ``event_metadata.custom_attribute[0]``); present only when the request carried one.
- The path layout: ``s3://{destination-bucket-prefix}/{endpoint-name}/{variant-name}/yyyy/mm/dd/hh/
  filename.jsonl`` (SDK guide and AWS docs); file names like ``32-18-648-<uuid>.jsonl`` (minute,
  second, millisecond, uuid) appear in a test that reads real capture keys.

The local endpoint writes exactly this (bincount.serving.capture), so one reader serves both.
:func:`parse_file` skips what it cannot use and says where: a malformed line by file and line
number, a file that is not text by name; nothing is dropped unreported. Finding and reading the
files (a folder or an S3 prefix, recursively) is bincount.data.sources' job (``open_captures``,
``iter_captures``). Files whose name starts with ``.`` are files still being written (the local
writer renames a file into place once it is complete) and are not read.

Bins: a request's photos are what the audit and the monitor look at. ``request_photos`` decodes
a captured request body the way the endpoint accepts it (one image; JSON ``instances`` of base64;
an NPY array, re-encoded as PNG). Only requests the endpoint answered are captured, so the body
was valid when it came; this layer cannot import the serving handler, hence its own small reader.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone

EVENT_VERSION = "0"
INPUT, OUTPUT = "INPUT", "OUTPUT"
BASE64, JSON_ENCODING, CSV_ENCODING = "BASE64", "JSON", "CSV"
# The CaptureContentTypeHeader bincount gives SageMaker, and what the local writer does alike:
# JSON and CSV bodies kept as text (readable in the file), everything else (photos) base64.
JSON_CONTENT_TYPES = ("application/json",)
CSV_CONTENT_TYPES = ("text/csv",)
VARIANT = "AllTraffic"  # the one production variant bincount deploys
SUFFIX = ".jsonl"
# Request headers SageMaker's runtime passes to the container, and records in eventMetadata.
CUSTOM_ATTRIBUTES_HEADER = "X-Amzn-SageMaker-Custom-Attributes"
INFERENCE_ID_HEADER = "X-Amzn-SageMaker-Inference-Id"
# The custom attribute that carries a bin's recorded count, for the audit: "expected_quantity=3"
# (one photo), or one count per photo "expected_quantity=3|1|4"; attributes are comma-separated
# key=value pairs, as SageMaker's own containers use them ("tfs-model-name=m,tfs-method=predict").
EXPECTED_QUANTITY = "expected_quantity"
IMAGE_TYPES = ("image/jpeg", "image/png", "application/x-image")
NPY_TYPE = "application/x-npy"
MAX_ID_CHARS = 200


class BadCapture(ValueError):
    """One captured line (or file) is unusable; the message says why."""


# --- building records -------------------------------------------------------------

def media_type(content_type: str | None) -> str:
    return (content_type or "").split(";")[0].strip().lower()


def encode_payload(body: bytes, content_type: str, mode: str) -> dict:
    """``endpointInput`` / ``endpointOutput`` for ``body`` as SageMaker encodes it: the text of a
    JSON or CSV body, base64 of anything else (or of a JSON/CSV body that is not UTF-8)."""
    media = media_type(content_type)
    encoding = JSON_ENCODING if media in JSON_CONTENT_TYPES else CSV_ENCODING if media in CSV_CONTENT_TYPES else None
    if encoding:
        try:
            return {"observedContentType": content_type, "mode": mode, "data": body.decode("utf-8"),
                    "encoding": encoding}
        except UnicodeDecodeError:
            pass
    return {"observedContentType": content_type, "mode": mode, "data": base64.b64encode(body).decode("ascii"),
            "encoding": BASE64}


def format_time(when: datetime) -> str:
    """``inferenceTime`` as SageMaker writes it: UTC, to the second, with a Z."""
    return when.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def capture_record(*, event_id: str, inference_time: datetime, request: tuple[bytes, str] | None,
                   response: tuple[bytes, str] | None, inference_id: str | None = None,
                   custom_attributes: str | None = None) -> dict:
    """One captured request as SageMaker writes it; ``request``/``response`` are (body, content
    type), None where that side is not captured (capture mode input or output only)."""
    data = {}
    if request is not None:
        data["endpointInput"] = encode_payload(*request, INPUT)
    if response is not None:
        data["endpointOutput"] = encode_payload(*response, OUTPUT)
    metadata = {"eventId": event_id}
    if inference_id:
        metadata["inferenceId"] = inference_id
    if custom_attributes is not None:
        metadata["customAttributes"] = [custom_attributes]
    metadata["inferenceTime"] = format_time(inference_time)
    return {"captureData": data, "eventMetadata": metadata, "eventVersion": EVENT_VERSION}


def capture_file_key(endpoint_name: str, opened_at: datetime, unique: str, variant: str = VARIANT) -> str:
    """Where a capture file goes under the destination: by endpoint, variant and UTC hour."""
    t = opened_at.astimezone(timezone.utc)
    return (f"{endpoint_name}/{variant}/{t:%Y/%m/%d/%H}/{t:%M-%S}-{t.microsecond // 1000:03d}-{unique}{SUFFIX}")


# --- reading records --------------------------------------------------------------

@dataclass(frozen=True)
class Payload:
    content_type: str
    body: bytes


@dataclass(frozen=True)
class CapturedEvent:
    """One captured request: when, who asked (ids, custom attributes), what came in and went out."""

    event_id: str
    time: datetime  # UTC
    request: Payload | None
    response: Payload | None
    inference_id: str | None = None
    custom_attributes: str | None = None
    file: str = ""
    line: int = 0


@dataclass(frozen=True)
class CaptureProblem:
    """What was skipped, by file and line (0: the whole file), and why."""

    file: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.file}{f' line {self.line}' if self.line else ''}: {self.reason}"

    def to_dict(self) -> dict:
        return {"file": self.file, "line": self.line, "reason": self.reason}


def _part(data: dict, key: str, mode: str) -> Payload | None:
    part = data.get(key)
    if part is None:
        return None
    if not isinstance(part, dict):
        raise BadCapture(f"captureData.{key} is not an object")
    if part.get("mode", mode) != mode:
        raise BadCapture(f"captureData.{key}.mode is {part.get('mode')!r}, not {mode!r}")
    content_type, text, encoding = part.get("observedContentType"), part.get("data"), part.get("encoding")
    if not isinstance(content_type, str) or not isinstance(text, str):
        raise BadCapture(f"captureData.{key} needs observedContentType and data as strings")
    if encoding == BASE64:
        try:
            body = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise BadCapture(f"captureData.{key}.data is not valid base64") from None
    elif encoding in (JSON_ENCODING, CSV_ENCODING):
        body = text.encode("utf-8")
    else:
        raise BadCapture(f"captureData.{key}.encoding {encoding!r} is none of BASE64, JSON, CSV")
    return Payload(content_type, body)


def parse_time(text) -> datetime:
    """``inferenceTime``: ISO 8601, with a Z or an offset (no zone: UTC)."""
    if not isinstance(text, str):
        raise BadCapture(f"eventMetadata.inferenceTime {text!r} is not a string")
    try:  # fromisoformat takes "Z" only from Python 3.11
        when = datetime.fromisoformat(re.sub(r"Z$", "+00:00", text.strip()))
    except ValueError:
        raise BadCapture(f"eventMetadata.inferenceTime {text!r} is not an ISO 8601 time") from None
    return when.replace(tzinfo=timezone.utc) if when.tzinfo is None else when.astimezone(timezone.utc)


def _custom_attributes(value) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return ",".join(value) if value else None
    raise BadCapture("eventMetadata.customAttributes is neither a list of strings nor a string")


def parse_line(text: str, *, file: str = "", line: int = 0) -> CapturedEvent:
    """One captured line, or BadCapture saying what is wrong with it."""
    try:
        record = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise BadCapture(f"not JSON ({str(e)[:120]})") from None
    if not isinstance(record, dict):
        raise BadCapture("not a JSON object")
    data, metadata = record.get("captureData"), record.get("eventMetadata")
    if not isinstance(data, dict) or not isinstance(metadata, dict):
        raise BadCapture("no captureData or eventMetadata object")
    request, response = _part(data, "endpointInput", INPUT), _part(data, "endpointOutput", OUTPUT)
    if request is None and response is None:
        raise BadCapture("captureData has neither endpointInput nor endpointOutput")
    event_id = metadata.get("eventId")
    if not isinstance(event_id, str) or not event_id.strip():
        raise BadCapture("eventMetadata.eventId is missing or empty")
    inference_id = metadata.get("inferenceId")
    if inference_id is not None and not isinstance(inference_id, str):
        raise BadCapture("eventMetadata.inferenceId is not a string")
    return CapturedEvent(event_id=event_id.strip(), time=parse_time(metadata.get("inferenceTime")),
                         request=request, response=response, inference_id=inference_id,
                         custom_attributes=_custom_attributes(metadata.get("customAttributes")),
                         file=file, line=line)


def is_capture_file(name: str) -> bool:
    """A complete capture file: ``*.jsonl``, not hidden (a hidden one is still being written)."""
    return name.endswith(SUFFIX) and not name.rsplit("/", 1)[-1].startswith(".")


def parse_file(name: str, raw: bytes) -> Iterator[CapturedEvent | CaptureProblem]:
    """Each line of one capture file: its event, or the problem with it (blank lines are nothing)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        yield CaptureProblem(name, 0, f"not UTF-8 text ({e.reason} at byte {e.start}): not a capture file")
        return
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield parse_line(line, file=name, line=number)
        except BadCapture as e:
            yield CaptureProblem(name, number, str(e))


# --- what a captured request holds ----------------------------------------------------

def attributes(custom_attributes: str | None) -> dict[str, str]:
    """``key=value`` pairs of a custom-attributes header (comma-separated; other text ignored)."""
    pairs = {}
    for part in (custom_attributes or "").split(","):
        key, sep, value = part.partition("=")
        if sep and key.strip():
            pairs[key.strip().lower()] = value.strip()
    return pairs


def expected_counts(custom_attributes: str | None, photos: int) -> list[int | None] | str:
    """Each photo's recorded count from ``expected_quantity`` (None: not given), or why it cannot be read."""
    value = attributes(custom_attributes).get(EXPECTED_QUANTITY)
    if value is None or value == "":
        return [None] * photos
    parts = [p.strip() for p in value.split("|")]
    if not all(re.fullmatch(r"\d{1,9}", p) for p in parts):
        return f"{EXPECTED_QUANTITY}={value!r} is not a count (or counts separated by '|')"
    if len(parts) != photos:
        return f"{EXPECTED_QUANTITY}={value!r} gives {len(parts)} counts for {photos} photos"
    return [int(p) for p in parts]


def request_photos(payload: Payload) -> list[bytes]:
    """The photos of a captured request body, as image files (an NPY array becomes a PNG); BadCapture if none."""
    media = media_type(payload.content_type)
    if media in IMAGE_TYPES:
        return [payload.body]
    if media in JSON_CONTENT_TYPES:
        return _json_photos(payload.body)
    if media == NPY_TYPE:
        return _npy_photos(payload.body)
    raise BadCapture(f"request content type {payload.content_type!r} holds no photo bincount reads")


def _json_photos(body: bytes) -> list[bytes]:
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):
        raise BadCapture("the request's JSON body does not parse") from None
    instances = value.get("instances") if isinstance(value, dict) else value
    if not isinstance(instances, list) or not instances:
        raise BadCapture('the request\'s JSON body has no "instances"')
    photos = []
    for i, item in enumerate(instances):
        encoded = item.get("b64") if isinstance(item, dict) else item
        try:
            photos.append(base64.b64decode(encoded, validate=True))
        except (binascii.Error, ValueError, TypeError):
            raise BadCapture(f"instance {i} of the request is not base64") from None
    return photos


def _npy_photos(body: bytes) -> list[bytes]:
    import numpy as np
    from PIL import Image

    try:
        array = np.load(io.BytesIO(body), allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - whatever numpy says about bytes that are not an array
        raise BadCapture(f"the request's NPY body does not load: {e}") from None
    if array.dtype != np.uint8 or array.ndim not in (2, 3, 4):
        raise BadCapture(f"the request's NPY array is {array.dtype} {array.shape}, not uint8 images")
    images = array if array.ndim == 4 else array[None]
    out = []
    for image in images:
        buf = io.BytesIO()
        Image.fromarray(image[:, :, 0] if image.ndim == 3 and image.shape[2] == 1 else image).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def photo_id(event: CapturedEvent, index: int, photos: int) -> str:
    """A captured photo's id: the event's id, and ``:<n>`` for photo n of a request with several."""
    base = re.sub(r"[^A-Za-z0-9._-]", "_", event.event_id)[:MAX_ID_CHARS]
    return base if photos == 1 else f"{base}:{index}"
