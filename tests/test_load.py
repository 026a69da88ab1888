"""The endpoint under load: thousands of mixed good and bad requests from
concurrent clients; a model that fails on some inputs; the micro-batcher alone.

Everything stays on 127.0.0.1 and is bounded in count and time.
"""

from __future__ import annotations

import asyncio
import collections
import io
import json
import re
import time

import pytest
import requests
from request_cases import Case, bad_cases, good_cases, problems, schedule, send_all
from serving_helpers import serve_in_thread

from bincount.serving import handler as inference
from bincount.serving.endpoint import start_local_endpoint
from bincount.serving.package import build_package
from bincount.serving.server import MicroBatcher, choose_batch_size, create_app, time_batch_sizes

N_REQUESTS = 2400
CLIENTS = 16
LOAD_DEADLINE_S = 150  # far above the ~20-40 s it takes on 2 shared cores: a hang, not slowness


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
