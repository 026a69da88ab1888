"""The requests the endpoint tests send: good bodies of every content type, bad bodies of
every kind, sending them from concurrent clients, and checking the answers against
in-process predictions. Shared by the load test (bincount's server) and the serving
toolkit test (SageMaker's), which must answer the same requests alike."""

from __future__ import annotations

import base64
import io
import json
import random
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import requests

MAX_BODY = 10 * 1024 * 1024  # bincount.serving.server's default, which start_local_endpoint uses
OVERSIZED_EVERY = 400  # 11 MB each: a few are enough


# --- Request bodies ------------------------------------------------------------

def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def png_of(jpeg: bytes) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.open(io.BytesIO(jpeg)).save(buf, format="PNG")
    return buf.getvalue()


def pixels_of(jpeg: bytes):
    """The photo as a client decodes it before sending NPY: height x width x 3, uint8."""
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))


def npy(array) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=True)  # allow: a bad case sends a pickled array on purpose
    return buf.getvalue()


def npy_declaring(shape: tuple) -> bytes:
    """An NPY header claiming ``shape`` of uint8, with no pixels after it."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "|u1", "fortran_order": False, "shape": shape})
    return buf.getvalue()


def png_declaring(width: int, height: int) -> bytes:
    """A valid-looking PNG of a few dozen bytes whose header declares width x height pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


@dataclass
class Case:
    name: str
    body: bytes | None
    headers: dict
    status: int
    images: list[bytes] = field(default_factory=list)  # good cases: the images, in answer order
    message: str = ""  # bad cases: part of the error message
    method: str = "POST"
    path: str = "/invocations"


def good_cases(jpegs: list[bytes]) -> list[Case]:
    cases = []
    for i, jpeg in enumerate(jpegs):
        content_type = ["image/jpeg", "application/x-image", "image/jpeg; q=1"][i % 3]
        cases.append(Case(f"jpeg {i}", jpeg, {"Content-Type": content_type}, 200, [jpeg]))
    for i, jpeg in enumerate(jpegs[:4]):
        cases.append(Case(f"png {i}", png_of(jpeg), {"Content-Type": "image/png"}, 200, [jpeg]))
    batch = jpegs[3:7]
    cases.append(Case("json instances", json.dumps({"instances": [{"b64": b64(r)} for r in batch]}).encode(),
                      {"Content-Type": "application/json; charset=utf-8"}, 200, batch))
    cases.append(Case("json bare list", json.dumps([b64(r) for r in jpegs[:2]]).encode(),
                      {"Content-Type": "application/json", "Accept": "*/*"}, 200, jpegs[:2]))
    # NPY: a photo's pixels answer as its file does; a batch is one array (same-sized photos)
    as_npy = {"Content-Type": "application/x-npy"}
    cases.append(Case("npy image", npy(pixels_of(jpegs[0])), as_npy, 200, [jpegs[0]]))
    cases.append(Case("npy batch", npy(np.stack([pixels_of(r) for r in jpegs[5:8]])), as_npy, 200, jpegs[5:8]))
    cases.append(Case("csv answer", jpegs[1], {"Content-Type": "image/jpeg", "Accept": "text/csv"}, 200, [jpegs[1]]))
    cases.append(Case("npy as csv", npy(pixels_of(jpegs[2])), {**as_npy, "Accept": "text/csv"}, 200, [jpegs[2]]))
    return cases


def bad_cases(jpeg: bytes) -> list[Case]:
    image, as_json = {"Content-Type": "image/jpeg"}, {"Content-Type": "application/json"}
    npy_type = {"Content-Type": "application/x-npy"}
    bomb = png_declaring(30_000, 30_000)
    return [
        Case("text as jpeg", b"this is not a photo", image, 400, message="not an image"),
        Case("empty body", b"", image, 400, message="not an image"),
        Case("truncated jpeg", jpeg[: len(jpeg) // 3], image, 400, message="could not be decoded"),
        Case("jpeg as video", jpeg, {"Content-Type": "video/mp4"}, 415, message="unsupported content type"),
        Case("no content type", jpeg, {}, 415, message="unsupported content type"),
        Case("decompression bomb", bomb, {"Content-Type": "image/png"}, 413, message="too many pixels"),
        Case("bomb in json", json.dumps({"instances": [b64(jpeg), b64(bomb)]}).encode(), as_json, 413,
             message="instance 1 has too many pixels"),
        Case("malformed json", b'{"instances": [', as_json, 400, message="malformed JSON"),
        Case("deeply nested json", b"[" * 50_000 + b"]" * 50_000, as_json, 400, message="malformed JSON"),
        Case("5000-digit number", b"9" * 5000, as_json, 400, message="malformed JSON"),
        Case("not utf-8", b'{"instances": ["\xff\xfe"]}', as_json, 400, message="malformed JSON"),
        Case("instances not a list", b'{"instances": "abc"}', as_json, 400, message="at least one image"),
        Case("wrong key", json.dumps({"images": [b64(jpeg)]}).encode(), as_json, 400, message="at least one image"),
        Case("b64 not a string", b'{"instances": [{"b64": 5}]}', as_json, 400, message="instance 0: expected"),
        Case("bad base64", b'{"instances": ["@@@"]}', as_json, 400, message="not valid base64"),
        Case("base64 of text", json.dumps([b64(b"hello")]).encode(), as_json, 400, message="instance 0 is not an image"),
        Case("65 images", json.dumps(["x"] * 65).encode(), as_json, 413, message="at most 64 images"),
        Case("wants html", jpeg, {"Content-Type": "image/jpeg", "Accept": "text/html"}, 406, message="can only answer"),
        Case("npy of floats", npy(pixels_of(jpeg) / 255.0), npy_type, 400, message="send uint8 pixels"),
        Case("npy pickled", npy(np.array([{"pickled": "object"}], dtype=object)), npy_type, 400, message="type is object"),
        Case("npy truncated", npy(pixels_of(jpeg))[:-100], npy_type, 400, message="bytes of pixels"),
        Case("npy of text", b"this is not an array", npy_type, 400, message="not an NPY array"),
        Case("npy claiming 10 Gpx", npy_declaring((100_000, 100_000, 3)), npy_type, 413, message="pixels each"),
        Case("npy channels first", npy_declaring((3, 96, 96)), npy_type, 400, message="channels, last"),
        Case("GET invocations", None, {}, 405, method="GET"),
        Case("unknown path", jpeg, image, 404, path="/predict"),
    ]


def oversized_case() -> Case:
    return Case("oversized body", b"0" * (MAX_BODY + 1), {"Content-Type": "image/jpeg"}, 413, message="limit")


def schedule(good: list[Case], bad: list[Case], n: int, seed: int = 0) -> list[Case]:
    """``n`` requests, a little over half good, in a fixed random order."""
    rng = random.Random(seed)
    cases = [oversized_case() if i % OVERSIZED_EVERY == OVERSIZED_EVERY - 1
             else rng.choice(good) if rng.random() < 0.55 else rng.choice(bad) for i in range(n)]
    rng.shuffle(cases)
    return cases


# --- Sending ---------------------------------------------------------------------

@dataclass
class Outcome:
    case: Case
    status: int  # 0: no answer
    text: str


def send_all(url: str, cases: list[Case], clients: int, deadline_s: float) -> tuple[list[Outcome], float]:
    """Send ``cases`` from ``clients`` threads, one kept-alive session each; stop sending after the deadline."""
    local = threading.local()
    deadline = time.monotonic() + deadline_s

    def send(case: Case) -> Outcome:
        if time.monotonic() > deadline:
            return Outcome(case, 0, "not sent: the deadline had passed")
        session = getattr(local, "session", None) or requests.Session()
        local.session = session
        try:
            response = session.request(case.method, url + case.path, data=case.body, headers=case.headers,
                                       timeout=30)
        except requests.RequestException as e:
            return Outcome(case, 0, f"no answer: {e}")
        return Outcome(case, response.status_code, response.text)

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        outcomes = list(pool.map(send, cases))
    return outcomes, time.perf_counter() - start


def answers_in(o: Outcome) -> list[dict]:
    """A 200's predictions, from JSON, or from CSV lines (count, then each count's probability in
    the model's class order) where the request asked for CSV."""
    if o.case.headers.get("Accept") != "text/csv":
        return json.loads(o.text)["predictions"]
    classes = [str(c) for c in range(1, 6)]  # the tiny model's
    rows = [line.split(",") for line in o.text.splitlines()]
    return [{"count": int(row[0]), "probabilities": dict(zip(classes, map(float, row[1:])))} for row in rows]


def json_error(text: str) -> str:
    """bincount's server: errors are {"error": message}."""
    return json.loads(text).get("error", "")


def problems(outcomes: list[Outcome], expected: dict[bytes, dict],
             error_of: Callable[[str], str] = json_error) -> list[str]:
    """Everything wrong with the answers: wrong status, missing message (``error_of`` finds it
    in an error's body), wrong count."""
    found = []
    for o in outcomes:
        where = f"{o.case.name}: {o.status} {o.text[:200]}"
        if o.status != o.case.status:
            found.append(f"expected {o.case.status}; {where}")
        elif o.status == 200:
            answers = answers_in(o)
            want = [expected[raw] for raw in o.case.images]
            if [a["count"] for a in answers] != [w["count"] for w in want] or any(
                    abs(a["probabilities"][k] - v) > 1e-3 for a, w in zip(answers, want)
                    for k, v in w["probabilities"].items()):
                found.append(f"answers differ from in-process {[w['count'] for w in want]}; {where}")
        elif o.case.path == "/invocations" and o.case.method == "POST":
            if o.case.message not in error_of(o.text):
                found.append(f"error message lacks {o.case.message!r}; {where}")
    return found
