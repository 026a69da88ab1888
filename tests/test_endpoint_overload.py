"""The endpoint under overload, with clients that leave, stall or send costly input.

Real HTTP on 127.0.0.1: uvicorn in a thread where a test needs to slow the model
down or look inside the app, the server's own process where it needs signals or
its log. Limits are set small so each effect shows in seconds; every wait has a
bound far above what the effect takes, so a slow machine is not a failure.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import re
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from serving_helpers import SlowModel, connect, read_until_closed, request_head, serve_in_thread, server_process

from bincount.serving import handler as inference
from bincount.serving.package import build_package, extract_package
from bincount.serving.server import Limits, create_app

JPEG = {"Content-Type": "image/jpeg"}


@pytest.fixture(scope="module")
def model_dir(tiny_model, tmp_path_factory):
    return extract_package(build_package(*tiny_model), tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    """The real server, in its own process, with its default limits; and its log."""
    log = tmp_path_factory.mktemp("server") / "server.log"
    with server_process(model_dir, log, "--max-batch-size", "4") as (url, process):
        yield url, process, log


def slow_predictor(tiny_model, delay_s: float):
    predictor = inference.load_predictor(*tiny_model)
    predictor.models[0] = SlowModel(predictor.models[0], delay_s)
    return predictor, predictor.models[0]


def encoded(image, format: str, **params) -> bytes:
    out = io.BytesIO()
    image.save(out, format=format, **params)
    return out.getvalue()


# --- A bounded queue ---------------------------------------------------------------

def test_a_full_queue_answers_503_with_retry_after_and_the_server_recovers(tiny_model, synthetic_jpegs):
    predictor, model = slow_predictor(tiny_model, 0.3)
    app = create_app(predictor, max_batch_size=2, limits=Limits(max_queue=3))
    start = threading.Barrier(16)

    def send(_):
        start.wait()
        return requests.post(f"{url}/invocations", data=synthetic_jpegs[2], headers=JPEG, timeout=120)

    with serve_in_thread(app) as (url, _):
        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(send, range(16)))
        after = requests.post(f"{url}/invocations", data=synthetic_jpegs[2], headers=JPEG, timeout=60)
        ping = requests.get(f"{url}/ping", timeout=10)

    statuses = [a.status_code for a in answers]
    assert set(statuses) <= {200, 503}, statuses
    busy = [a for a in answers if a.status_code == 503]
    assert busy and statuses.count(200) >= 3, statuses
    for answer in busy:
        assert answer.headers["Retry-After"] == "1" and "busy" in answer.json()["error"]
    assert app.state.stats["refused_busy"] == len(busy)
    assert model.images == statuses.count(200) + 1  # a refused request costs no forward pass
    assert after.status_code == 200 and ping.status_code == 200


# --- Clients that leave ---------------------------------------------------------------

def test_requests_of_clients_that_left_never_reach_the_model(tiny_model, synthetic_jpegs):
    # The case: clients give up while their requests wait behind a slow model. Half
    # leave as soon as they have sent, half after a second, when theirs sit in the queue.
    predictor, model = slow_predictor(tiny_model, 1.0)
    app = create_app(predictor, max_batch_size=2, limits=Limits(max_queue=100))
    raw = synthetic_jpegs[3]

    def abandon(i):
        with connect(url) as sock:
            sock.sendall(request_head("/invocations", "image/jpeg", len(raw)) + raw)
            time.sleep(0 if i % 2 else 1.0)

    with serve_in_thread(app) as (url, _):
        with ThreadPoolExecutor(30) as pool:
            list(pool.map(abandon, range(30)))
        time.sleep(0.3)
        answer = requests.post(f"{url}/invocations", data=raw, headers=JPEG, timeout=120)
        computed_when_answered = model.images

    assert answer.status_code == 200
    # Without the drop, all 30 went through the model first (15 passes, 15 s): here only
    # the passes that had started before their clients left (2 or 3), and the follow-up's.
    assert computed_when_answered <= 10, f"{computed_when_answered} images computed for 30 abandoned requests"
    assert app.state.stats["client_left"] >= 20, dict(app.state.stats)


def test_a_client_that_disconnects_mid_body_is_not_a_500(tiny_model, caplog):
    app = create_app(inference.load_predictor(*tiny_model), max_batch_size=2)
    uvicorn_log = logging.getLogger("uvicorn.error")  # uvicorn's own: it does not reach the root logger
    uvicorn_log.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="bincount.serving.server"):
            with serve_in_thread(app) as (url, _):
                with connect(url) as sock:
                    sock.sendall(request_head("/invocations", "image/jpeg", 100_000) + b"\xff\xd8" + b"\0" * 998)
                    time.sleep(1.0)  # the server is reading the body by now
                deadline = time.monotonic() + 30
                while not app.state.stats["client_left"] and time.monotonic() < deadline:
                    time.sleep(0.1)
                ping = requests.get(f"{url}/ping", timeout=10)
    finally:
        uvicorn_log.removeHandler(caplog.handler)
    assert app.state.stats["client_left"] == 1 and ping.status_code == 200
    assert any("client disconnected" in r.getMessage() and r.levelno == logging.INFO for r in caplog.records)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info], caplog.text


# --- Timeouts and the connection limit ---------------------------------------------------

def test_idle_and_slow_sockets_are_closed_by_the_header_and_body_timeouts(tiny_model, synthetic_jpegs):
    predictor = inference.load_predictor(*tiny_model)
    app = create_app(predictor, max_batch_size=2, limits=Limits(header_timeout_s=1, body_timeout_s=2))
    with serve_in_thread(app) as (url, _):
        # A connection that never sends a byte.
        with connect(url) as idle:
            _, idle_closed_after = read_until_closed(idle, 20)

        # A request head sent a byte at a time: each byte would cancel uvicorn's own timer.
        def drip():
            with connect(url) as trickle:
                for byte in b"POST /invocations HTTP/1.1\r\nHost: x\r\nX-Padding: " + b"a" * 30:
                    try:
                        trickle.sendall(bytes([byte]))
                    except OSError:
                        return time.monotonic()
                    time.sleep(0.2)
            return None

        started = time.monotonic()
        with ThreadPoolExecutor(1) as pool:
            dripped = pool.submit(drip)
            with connect(url) as other:  # meanwhile the server still answers others
                other.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
                assert other.recv(4096).startswith(b"HTTP/1.1 200")
            cut = dripped.result(timeout=120)

        # A body that stops part way.
        with connect(url) as slow_body:
            slow_body.sendall(request_head("/invocations", "image/jpeg", 100_000) + synthetic_jpegs[1][:500])
            answer, body_closed_after = read_until_closed(slow_body, 20)
        after = requests.post(f"{url}/invocations", data=synthetic_jpegs[1], headers=JPEG, timeout=60)

    assert idle_closed_after is not None and idle_closed_after < 10, "an idle connection stayed open"
    assert cut is not None and cut - started < 10, "a request head trickling in kept its connection open"
    assert body_closed_after is not None and body_closed_after < 10, "a stalled body kept its connection open"
    assert answer.startswith(b"HTTP/1.1 408"), answer[:300]
    assert b"did not arrive within 2 s" in answer
    assert after.status_code == 200


def test_past_the_connection_limit_the_server_answers_503(tiny_model):
    predictor = inference.load_predictor(*tiny_model)
    app = create_app(predictor, max_batch_size=2, limits=Limits(max_connections=4, header_timeout_s=30))
    with serve_in_thread(app) as (url, _):
        assert requests.get(f"{url}/ping", timeout=10).status_code == 200
        held = [connect(url) for _ in range(4)]
        time.sleep(0.5)  # accepted by the server's loop
        crowded = requests.get(f"{url}/ping", timeout=10)
        for sock in held:
            sock.close()
        time.sleep(0.5)
        freed = requests.get(f"{url}/ping", timeout=10)
    assert crowded.status_code == 503
    assert freed.status_code == 200


# --- Shutting down ---------------------------------------------------------------------

def test_sigterm_during_a_slow_upload_stops_accepting_and_exits_within_the_shutdown_timeout(model_dir, tmp_path):
    args = ["--max-batch-size", "2", "--shutdown-timeout-s", "4", "--body-timeout-s", "300",
            "--header-timeout-s", "300"]
    log = tmp_path / "server.log"
    with server_process(model_dir, log, *args) as (url, process):
        with connect(url) as upload:
            upload.sendall(request_head("/invocations", "image/jpeg", 1_000_000) + b"\xff\xd8" + b"\0" * 1000)
            time.sleep(1.0)
            start = time.monotonic()
            process.send_signal(signal.SIGTERM)
            refused_while_running = False
            while process.poll() is None and time.monotonic() - start < 30:
                try:
                    connect(url, timeout=1).close()
                except ConnectionRefusedError:
                    refused_while_running = process.poll() is None
                    break
                time.sleep(0.05)
            try:
                process.wait(30)  # the bound is 4 s: 30 is for a slow machine
            except subprocess.TimeoutExpired:
                pytest.fail("the server was still running 30 s after SIGTERM, waiting for a slow upload")
            took = time.monotonic() - start
            answer, closed_after = read_until_closed(upload, 5)
    assert refused_while_running, "new connections were still accepted after SIGTERM"
    assert took < 25, f"exited {took:.1f} s after SIGTERM"
    # The upload was cut off with an answer that says why, not uvicorn's bare 500 and a traceback.
    assert answer.startswith(b"HTTP/1.1 503") and b"shutting down" in answer, answer
    assert "Traceback" not in log.read_text(), log.read_text()


def test_on_shutdown_a_request_being_computed_is_still_answered(tiny_model, synthetic_jpegs):
    predictor, model = slow_predictor(tiny_model, 1.5)
    app = create_app(predictor, max_batch_size=2, limits=Limits(shutdown_timeout_s=20))
    with serve_in_thread(app) as (url, server):
        with ThreadPoolExecutor(1) as pool:
            answer = pool.submit(requests.post, f"{url}/invocations", data=synthetic_jpegs[4], headers=JPEG,
                                 timeout=60)
            assert model.computing.wait(60)
            server.should_exit = True  # what uvicorn's SIGTERM handler does
            assert answer.result().status_code == 200
        server.thread.join(30)
        assert not server.thread.is_alive()


# --- Errors ---------------------------------------------------------------------------

class Broken:
    """A network whose forward pass fails with a message that must not reach the client."""

    def __call__(self, x):
        raise RuntimeError("CUDA out of memory at /opt/secret/weights.pt")


def test_a_500_says_internal_error_and_an_id_and_the_log_has_the_detail(tiny_model, synthetic_jpegs, caplog):
    predictor = inference.load_predictor(*tiny_model)
    predictor.models[0] = Broken()
    app = create_app(predictor, max_batch_size=2)
    with caplog.at_level(logging.ERROR, logger="bincount.serving.server"):
        with serve_in_thread(app) as (url, _):
            answer = requests.post(f"{url}/invocations", data=synthetic_jpegs[1], headers=JPEG, timeout=60)
            ping = requests.get(f"{url}/ping", timeout=10)
    assert answer.status_code == 500 and ping.status_code == 200
    message = answer.json()["error"]
    assert "secret" not in answer.text and "RuntimeError" not in answer.text
    incident = re.fullmatch(r"internal error \(id ([0-9a-f]{12})\); the server's log has the details", message)
    assert incident, message
    [record] = [r for r in caplog.records if r.msg.startswith("internal error") and r.args == (incident[1],)]
    assert "/opt/secret/weights.pt" in str(record.exc_info[1]) and record.exc_info[2] is not None


# --- Costly and unusual input --------------------------------------------------------------

def test_an_image_over_the_per_image_pixel_cap_gets_413(server):
    from PIL import Image

    url, _, _ = server
    big = encoded(Image.new("RGB", (3000, 3000), (90, 90, 90)), "JPEG")  # 9 Mpx in about 100 KB
    answer = requests.post(f"{url}/invocations", data=big, headers=JPEG, timeout=60)
    assert answer.status_code == 413, answer.text
    assert "too many pixels (limit 8,000,000 per image)" in answer.json()["error"]


def test_a_request_over_the_total_pixel_budget_gets_413_and_64_bin_photos_fit(server):
    from PIL import Image

    url, _, _ = server

    def as_json(images):
        return json.dumps({"instances": [base64.b64encode(i).decode() for i in images]})

    large = encoded(Image.new("RGB", (2500, 2500), (10, 120, 30)), "JPEG")  # 6.25 Mpx each: 3 are over 16
    answer = requests.post(f"{url}/invocations", data=as_json([large] * 3), timeout=60,
                           headers={"Content-Type": "application/json"})
    assert answer.status_code == 413, answer.text
    assert "18,750,000 pixels in all, over the limit of 16,000,000 per request" in answer.json()["error"]

    bin_photo = encoded(Image.new("RGB", (480, 430), (200, 180, 40)), "JPEG")  # the size of a real one
    answer = requests.post(f"{url}/invocations", data=as_json([bin_photo] * 64), timeout=120,
                           headers={"Content-Type": "application/json"})
    assert answer.status_code == 200 and len(answer.json()["predictions"]) == 64


@pytest.mark.parametrize("format", ["GIF", "TIFF", "BMP", "WEBP"])
def test_image_formats_other_than_jpeg_and_png_get_415(server, format):
    from PIL import Image

    url, _, _ = server
    body = encoded(Image.new("RGB", (60, 40), (200, 10, 10)), format)
    name = {"WEBP": "WebP"}.get(format, format)
    for content_type in ["image/png", "application/x-image"]:
        answer = requests.post(f"{url}/invocations", data=body, headers={"Content-Type": content_type}, timeout=60)
        assert answer.status_code == 415, answer.text
        assert answer.json()["error"] == f"the request body is a {name} image: only JPEG and PNG are decoded"
    answer = requests.post(f"{url}/invocations", data=json.dumps([base64.b64encode(body).decode()]), timeout=60,
                           headers={"Content-Type": "application/json"})
    assert answer.status_code == 415 and f"instance 0 is a {name} image" in answer.json()["error"]


def sixteen_bit_gradient():
    """A 16-bit greyscale PNG, and the same image scaled to 8 bits as an 8-bit PNG."""
    import numpy as np
    from PIL import Image

    wide = (np.arange(90 * 120, dtype=np.uint32).reshape(90, 120) * 6).astype(np.uint16)  # 0 to 64794
    narrow = np.rint(wide / 257).astype(np.uint8)
    return encoded(Image.fromarray(wide), "PNG"), encoded(Image.fromarray(narrow), "PNG"), narrow


def test_a_16_bit_png_decodes_to_its_8_bit_values():
    import numpy as np
    from PIL import Image

    wide, _, narrow = sixteen_bit_gradient()
    assert Image.open(io.BytesIO(wide)).mode == "I;16"
    [decoded] = inference.input_fn(wide, "image/png")
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(decoded)).convert("L")), narrow)


def test_the_endpoint_answers_a_16_bit_png_as_its_8_bit_twin(server):
    url, _, _ = server
    wide, narrow, _ = sixteen_bit_gradient()
    answers = [requests.post(f"{url}/invocations", data=body, headers={"Content-Type": "image/png"}, timeout=60)
               for body in (wide, narrow)]
    assert [a.status_code for a in answers] == [200, 200], [a.text for a in answers]
    got, want = (a.json()["predictions"][0]["probabilities"] for a in answers)
    assert got == pytest.approx(want, abs=1e-4)


def test_limits_come_from_the_environment_as_well_as_the_command_line(monkeypatch):
    import argparse

    from bincount.serving.server import add_server_arguments, limits_from_arguments

    monkeypatch.setenv("BINCOUNT_MAX_QUEUE", "7")
    monkeypatch.setenv("BINCOUNT_BODY_TIMEOUT_S", "2.5")
    parser = argparse.ArgumentParser()
    add_server_arguments(parser)
    limits = limits_from_arguments(parser.parse_args(["--max-image-pixels", "1000"]), parser)
    assert (limits.max_queue, limits.body_timeout_s, limits.max_image_pixels) == (7, 2.5, 1000)
    assert limits.max_request_pixels == Limits().max_request_pixels
    monkeypatch.setenv("BINCOUNT_MAX_CONNECTIONS", "many")
    with pytest.raises(SystemExit):
        add_server_arguments(argparse.ArgumentParser())
