"""The endpoint under load: thousands of mixed good and bad requests from
concurrent clients; a model that fails on some inputs; the micro-batcher alone.

Everything stays on 127.0.0.1 and is bounded in count and time.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import io
import json
import random
import re
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pytest
import requests
from serving_helpers import serve_in_thread

from bincount.serving import handler as inference
from bincount.serving.endpoint import start_local_endpoint
from bincount.serving.package import build_package
from bincount.serving.server import MicroBatcher, choose_batch_size, create_app, time_batch_sizes

N_REQUESTS = 2400
CLIENTS = 16
LOAD_DEADLINE_S = 150  # far above the ~20-40 s it takes on 2 shared cores: a hang, not slowness
OVERSIZED_EVERY = 400  # 11 MB each: a few are enough
MAX_BODY = 10 * 1024 * 1024  # bincount.serving.server's default, which start_local_endpoint uses


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
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))


def npy(array) -> bytes:
    import numpy as np

    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=True)  # allow: a bad case sends a pickled array on purpose
    return buf.getvalue()


def npy_declaring(shape: tuple) -> bytes:
    """An NPY header claiming ``shape`` of uint8, with no pixels after it."""
    import numpy as np

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
    cases.append(Case("npy batch", npy(np_stack([pixels_of(r) for r in jpegs[5:8]])), as_npy, 200, jpegs[5:8]))
    cases.append(Case("csv answer", jpegs[1], {"Content-Type": "image/jpeg", "Accept": "text/csv"}, 200, [jpegs[1]]))
    cases.append(Case("npy as csv", npy(pixels_of(jpegs[2])), {**as_npy, "Accept": "text/csv"}, 200, [jpegs[2]]))
    return cases


def np_stack(arrays):
    import numpy as np

    return np.stack(arrays)


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
        Case("npy pickled", npy(np_array_of_objects()), npy_type, 400, message="type is object"),
        Case("npy truncated", npy(pixels_of(jpeg))[:-100], npy_type, 400, message="bytes of pixels"),
        Case("npy of text", b"this is not an array", npy_type, 400, message="not an NPY array"),
        Case("npy claiming 10 Gpx", npy_declaring((100_000, 100_000, 3)), npy_type, 413, message="pixels each"),
        Case("npy channels first", npy_declaring((3, 96, 96)), npy_type, 400, message="channels, last"),
        Case("GET invocations", None, {}, 405, method="GET"),
        Case("unknown path", jpeg, image, 404, path="/predict"),
    ]


def np_array_of_objects():
    import numpy as np

    return np.array([{"pickled": "object"}], dtype=object)


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


def problems(outcomes: list[Outcome], expected: dict[bytes, dict]) -> list[str]:
    """Everything wrong with the answers: wrong status, missing message, wrong count."""
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
            if o.case.message not in json.loads(o.text).get("error", ""):
                found.append(f"error message lacks {o.case.message!r}; {where}")
    return found


# --- Fixtures ------------------------------------------------------------------

@pytest.fixture(scope="module")
def jpegs() -> list[bytes]:
    from bincount.data.synthetic import synthetic_bin

    return [synthetic_bin(count, seed=100 + seed) for seed in range(3) for count in (1, 2, 3, 4, 5)]


@pytest.fixture(scope="module")
def expected(tiny_model, jpegs) -> dict[bytes, dict]:
    """In-process answers, one image per forward pass."""
    predictor = inference.load_predictor(*tiny_model)
    return {raw: predictor.predict_bytes([raw])[0] for raw in jpegs}


# --- The load test -------------------------------------------------------------

def test_endpoint_under_load_answers_good_and_bad_requests_correctly(tiny_model, jpegs, expected):
    cases = schedule(good_cases(jpegs), bad_cases(jpegs[0]), N_REQUESTS)
    with start_local_endpoint(build_package(*tiny_model)) as endpoint:
        outcomes, seconds = send_all(endpoint.url, cases, CLIENTS, LOAD_DEADLINE_S)
        ping = requests.get(f"{endpoint.url}/ping", timeout=5)
        alive = endpoint.process.poll() is None
        log = endpoint.log()

    statuses = collections.Counter(o.status for o in outcomes)
    print(f"\n{len(outcomes)} requests from {CLIENTS} clients in {seconds:.1f} s "
          f"({len(outcomes) / seconds:.0f}/s); statuses {dict(sorted(statuses.items()))}")
    assert not [o for o in outcomes if o.status >= 500], "5xx answers: " + log[-3000:]
    assert statuses[0] == 0, [o.text for o in outcomes if o.status == 0][:5]
    found = problems(outcomes, expected)
    assert not found, f"{len(found)} wrong answers, e.g. {found[:5]}"
    assert {c.name for c in bad_cases(jpegs[0])} <= {o.case.name for o in outcomes}, "a bad case was never sent"
    assert ping.status_code == 200 and alive
    assert "Traceback" not in log, log[-3000:]


# --- A model that fails ----------------------------------------------------------

class PoisonedModel:
    """Wraps a model: fails any batch that holds an all-white image; records batch sizes."""

    def __init__(self, model):
        self.model = model
        self.batch_sizes: list[int] = []

    def __call__(self, x):
        self.batch_sizes.append(len(x))
        if (x.flatten(1).amin(1) > 2.0).any():  # white, after ImageNet normalisation, is over 2.2
            raise RuntimeError("poisoned input")
        return self.model(x)


def white_jpeg() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (80, 60), (255, 255, 255)).save(buf, format="JPEG")
    return buf.getvalue()


def test_model_error_is_a_json_500_and_spares_the_batch_and_later_requests(tiny_model, jpegs, expected, caplog):
    predictor = inference.load_predictor(*tiny_model)
    model = PoisonedModel(predictor.models[0])
    predictor.models[0] = model
    app = create_app(predictor, max_batch_size=8, max_batch_delay_ms=20)
    image = {"Content-Type": "image/jpeg"}
    good = [Case(f"jpeg {i}", raw, image, 200, [raw]) for i, raw in enumerate(jpegs)]
    poison = Case("white", white_jpeg(), image, 500, message="internal error")
    cases = [poison if i % 6 == 0 else good[i % len(good)] for i in range(240)]

    with serve_in_thread(app) as (url, _):
        outcomes, _ = send_all(url, cases, clients=8, deadline_s=60)
        after = requests.post(f"{url}/invocations", data=jpegs[0], headers=image, timeout=10)
        ping = requests.get(f"{url}/ping", timeout=5)

    wrong = [f"{o.case.name}: {o.status} {o.text[:200]}" for o in outcomes if o.case is not poison
             and o.status != 200]
    assert not wrong, f"good requests failed (batched with a poisoned one?): {wrong[:5]}"
    assert not problems([o for o in outcomes if o.case is not poison], expected)
    logged = {r.args[0]: r for r in caplog.records if r.msg.startswith("internal error") and r.args}
    for o in outcomes:
        if o.case is poison:  # the client gets an id; the server's log has the cause under it
            assert o.status == 500, o.text
            incident = re.fullmatch(r"internal error \(id (\w+)\); the server's log has the details",
                                    json.loads(o.text)["error"])
            assert incident, o.text
            assert "poisoned input" in str(logged[incident[1]].exc_info[1])
    assert after.status_code == 200 and ping.status_code == 200
    assert max(model.batch_sizes) > 1, "concurrent requests never shared a forward pass"
    assert max(model.batch_sizes) <= 8


# --- The micro-batcher on its own -------------------------------------------------

def run_batcher(scenario, *, max_batch_size=4, max_delay_s=0.05, fail_on=None):
    """Run ``scenario(batcher)`` against a batcher whose forward echoes (batch index, item)."""
    batches: list[list] = []

    def forward(parts):
        items = [x for part in parts for x in part]
        if fail_on in items:
            raise ValueError(f"cannot take {fail_on}")
        batches.append(items)
        return [(len(batches) - 1, x) for x in items]

    async def main():
        batcher = MicroBatcher(forward, max_batch_size=max_batch_size, max_delay_s=max_delay_s)
        batcher.start()
        try:
            return await scenario(batcher)
        finally:
            await batcher.stop()

    return asyncio.run(main()), batches


def test_batcher_groups_concurrent_requests_without_splitting_or_mixing_them():
    jobs = [list(range(i * 10, i * 10 + 1 + i % 3)) for i in range(12)] + [list(range(200, 210))]

    async def scenario(batcher):
        return await asyncio.gather(*(batcher.submit(job) for job in jobs))

    answers, batches = run_batcher(scenario)
    for job, answer in zip(jobs, answers):
        assert [x for _, x in answer] == job  # its own items, in order
        assert len({b for b, _ in answer}) == 1  # from one forward pass: never split
    assert len(batches) < len(jobs)  # requests shared passes
    assert all(len(b) <= 4 for b in batches if 200 not in b)
    assert [200 + i for i in range(10)] in batches  # larger than max_batch_size: ran alone


def test_batcher_isolates_a_failing_request_and_keeps_working():
    async def scenario(batcher):
        first = await asyncio.gather(*(batcher.submit([x]) for x in (1, 2, 13, 4)), return_exceptions=True)
        return first, await batcher.submit([5])

    (first, later), _ = run_batcher(scenario, fail_on=13)
    assert isinstance(first[2], ValueError)
    assert [a[0][1] for i, a in enumerate(first) if i != 2] == [1, 2, 4]
    assert later[0][1] == 5


def test_batcher_waits_only_for_requests_on_their_way():
    async def lone(batcher):
        start = time.perf_counter()
        await batcher.submit([1])
        return time.perf_counter() - start

    waited, _ = run_batcher(lone, max_delay_s=2.0)
    assert waited < 0.5  # nothing else arriving: no wait for the 2 s delay

    async def with_latecomer(batcher):
        async def latecomer():
            with batcher.arriving():
                await asyncio.sleep(0.05)  # still being read and decoded
            return await batcher.submit([2])

        return await asyncio.gather(batcher.submit([1]), latecomer())

    answers, batches = run_batcher(with_latecomer, max_delay_s=2.0)
    assert batches == [[1, 2]]


@pytest.mark.parametrize("ms_per_image,chosen", [
    ({1: 10, 2: 6, 4: 4, 8: 3, 16: 2.5, 32: 2.4}, 16),  # keeps gaining; 16 is within 5% of 32
    ({1: 39, 2: 28, 4: 26, 8: 27, 16: 45, 32: 59}, 4),  # EfficientNet-Lite0 at 224 px on 2 CPU cores
    ({1: 5, 2: 7, 4: 9, 8: 12}, 1),  # batching never helps: 1 turns it off
])
def test_auto_batch_size_is_the_fastest_measured(ms_per_image, chosen):
    assert choose_batch_size({b: ms / 1000 for b, ms in ms_per_image.items()}) == chosen


def test_batch_sizes_are_timed_on_the_real_model(tiny_model):
    timings = time_batch_sizes(inference.load_predictor(*tiny_model), limit=8, rounds=1)
    assert list(timings) == [1, 2, 4, 8] and all(0 < t < 10 for t in timings.values())


def test_batch_sizes_stop_doubling_once_a_batch_is_slow(tiny_model, monkeypatch):
    import bincount.serving.server

    # An ensemble with TTA on a CPU: every batch counts as slow, so only the first size is timed.
    monkeypatch.setattr(bincount.serving.server, "MAX_TIMED_BATCH_S", 0.0)
    timings = time_batch_sizes(inference.load_predictor(*tiny_model), limit=8, rounds=1)
    assert list(timings) == [1]
