"""The package the flow builds, served by SageMaker's own PyTorch serving stack: the
sagemaker-pytorch-inference toolkit and TorchServe (Java), started as the container starts
them, with /opt/ml replaced by a folder (bincount.serving.toolkit).

The same requests as the load test (tests/request_cases.py) must get the same answers: real
and synthetic photos answered as in-process, every bad body a 4xx with bincount's message
(the toolkit's own error type carries it; its body then adds a traceback, as the real
container's does). Three answers are the toolkit's own and differ, each asserted below.

Skips, saying why, only where the toolkit or Java is not installed (scripts/setup.sh
installs both).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from request_cases import MAX_BODY, Case, b64, bad_cases, good_cases, problems, send_all

from bincount.serving import handler as inference
from bincount.serving import toolkit
from bincount.serving.endpoint import start_local_endpoint
from bincount.serving.package import build_package

from conftest import abid_sample_path

pytestmark = pytest.mark.skipif(toolkit.missing() is not None, reason=str(toolkit.missing()))

# TorchServe's own request limit (max_request_size, which the toolkit leaves at its default).
TORCHSERVE_MAX_REQUEST = 6_553_500


def first_line(text: str) -> str:
    """The toolkit's error body: the message, then the traceback."""
    return text.split("\n", 1)[0]


@pytest.fixture(scope="module")
def jpegs() -> list[bytes]:
    from bincount.data.synthetic import synthetic_bin

    return [synthetic_bin(count, seed=200 + seed) for seed in range(2) for count in (1, 2, 3, 4, 5)]


@pytest.fixture(scope="module")
def real_photos() -> list[bytes]:
    """A few real bin photos from ../shared/abid-sample, where it is."""
    sample = abid_sample_path()
    return [path.read_bytes() for path in sorted((sample / "bin-images").glob("*.jpg"))[:4]] if sample else []


@pytest.fixture(scope="module")
def expected(tiny_model, jpegs, real_photos) -> dict[bytes, dict]:
    predictor = inference.load_predictor(*tiny_model)
    return {raw: predictor.predict_bytes([raw])[0] for raw in jpegs + real_photos}


@pytest.fixture(scope="module")
def endpoint(tiny_model):
    with start_local_endpoint(build_package(*tiny_model), server="toolkit") as running:
        yield running


def test_photos_of_every_content_type_are_answered_as_in_process(endpoint, jpegs, real_photos, expected):
    """JPEG, PNG, JSON (base64), NPY (a photo's pixels, and a batch) in; JSON and CSV out."""
    cases = good_cases(jpegs)
    cases += [Case(f"real photo {i}", raw, {"Content-Type": "image/jpeg"}, 200, [raw])
              for i, raw in enumerate(real_photos)]
    outcomes, _ = send_all(endpoint.url, cases, clients=2, deadline_s=120)
    assert not problems(outcomes, expected, first_line), endpoint.log()[-3000:]
    assert {o.case.name for o in outcomes} >= {"npy image", "npy batch", "csv answer", "json instances"}
    log = endpoint.log()
    # the real stack served it, on loopback: TorchServe's frontend, with the toolkit's config and our model folder
    assert "org.pytorch.serve.ModelServer" in log and f"Inference address: {endpoint.url}" in log
    assert "sagemaker-ts.properties" in log and f"Initial Models: model={endpoint.model_dir}" in log


def test_every_bad_body_is_a_4xx_with_bincount_s_message(endpoint, jpegs, expected):
    differ = {"not utf-8", "GET invocations", "unknown path"}  # see the next test
    cases = [c for c in bad_cases(jpegs[0]) if c.name not in differ]
    outcomes, _ = send_all(endpoint.url, cases, clients=2, deadline_s=120)
    assert all(400 <= o.status < 500 for o in outcomes), [(o.case.name, o.status) for o in outcomes]
    assert not problems(outcomes, expected, first_line)
    assert requests.get(f"{endpoint.url}/ping", timeout=10).status_code == 200  # and it keeps serving


def test_where_the_toolkit_answers_otherwise_than_bincount_s_server(endpoint, jpegs):
    """What the real container does that bincount's server does not, so a client knows."""
    post = f"{endpoint.url}/invocations"
    # It decodes a JSON body as UTF-8 itself, before input_fn: bad UTF-8 is its own 500.
    bad_utf8 = requests.post(post, data=b'{"instances": ["\xff\xfe"]}', headers={"Content-Type": "application/json"},
                             timeout=30)
    assert bad_utf8.status_code == 500 and "codec can't decode" in bad_utf8.text
    # A body over TorchServe's own limit is refused by TorchServe, without a message.
    assert MAX_BODY > TORCHSERVE_MAX_REQUEST
    big = requests.post(post, data=b"0" * (TORCHSERVE_MAX_REQUEST + 1), headers={"Content-Type": "image/jpeg"},
                        timeout=30)
    assert big.status_code == 413
    # GET /invocations reaches the handler (no content type: 415) instead of a 405.
    assert requests.get(post, timeout=30).status_code == 415
    # A batch of base64 photos in JSON is still fine (one forward pass per request: no micro-batching).
    batch = requests.post(post, data=json.dumps([b64(r) for r in jpegs[:3]]), timeout=60,
                          headers={"Content-Type": "application/json"})
    assert batch.status_code == 200 and len(batch.json()["predictions"]) == 3


def test_a_run_s_package_passes_the_local_toolkit_deploy_target(synthetic_run, endpoint):
    """--deploy-target local-toolkit: the run's own model.tar.gz, smoke-tested against the
    evaluate step's in-process answers, as the deploy step does it (one TorchServe per machine:
    the module's endpoint is stopped first)."""
    from bincount.data.shards import read_photos
    from bincount.flow.deploy import deploy
    from bincount.flow.runs import photos_of

    endpoint.stop()
    data = synthetic_run.data
    ids = list(data.test_predictions)[:8]
    photos = dict(read_photos(photos_of(synthetic_run), ids))
    report = deploy("local-toolkit", data.model_package, data.model_meta, photos,
                    {i: data.test_predictions[i] for i in ids})
    assert report["server"] == "toolkit" and report["smoke_test"]["requests"] == 8
    assert report["smoke_test"]["mismatches"] == []


PARENT = """
import json, sys, time
from bincount.serving.endpoint import start_local_endpoint
endpoint = start_local_endpoint(open(sys.argv[1], "rb").read(), server="toolkit")
print(json.dumps({"group": endpoint.process.pid, "workdir": str(endpoint.model_dir.parent)}), flush=True)
time.sleep(600)
"""


def test_the_toolkit_endpoint_ends_with_the_process_that_started_it(endpoint, tiny_model, tmp_path):
    """kill -9 of the starting process: TorchServe's Java and Python workers go too (else the
    next toolkit endpoint on the machine could not start), and the work folder."""
    endpoint.stop()  # one TorchServe per machine
    package = tmp_path / "model.tar.gz"
    package.write_bytes(build_package(*tiny_model))
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(package)], stdout=subprocess.PIPE, text=True,
                              cwd=tmp_path, env=os.environ.copy())
    try:
        started = json.loads(parent.stdout.readline())
    finally:
        parent.kill()
        parent.wait()
    group, workdir = started["group"], Path(started["workdir"])
    deadline = time.monotonic() + toolkit.GRACE_S + 20
    while members(group) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = members(group)
    if left:
        os.killpg(group, signal.SIGKILL)
    assert not left, f"still running after the parent died: {left}"
    assert not workdir.exists()


def members(group: int) -> list[str]:
    """The command lines of the live processes in process group ``group``."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == group and fields[0] != "Z":
                found.append((stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()[:120])
        except (OSError, ValueError, IndexError):
            continue
    return found
