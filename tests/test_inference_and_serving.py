"""The one handler, the model package, and the local endpoint over real HTTP."""

import base64
import io
import json

import pytest
import requests

from bincount import inference
from bincount.deploy import EndpointError, invoke, smoke_test, start_local_endpoint
from bincount.package import build_package, extract_package


@pytest.fixture(scope="module")
def package(tiny_model):
    return build_package(*tiny_model)


@pytest.fixture(scope="module")
def endpoint(package):
    with start_local_endpoint(package) as running:
        yield running


def png_bytes():
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (50, 40), (10, 200, 30)).save(buf, format="PNG")
    return buf.getvalue()


def test_package_has_the_sagemaker_layout_and_loads_without_pickle(package, tmp_path):
    import tarfile

    names = tarfile.open(fileobj=io.BytesIO(package)).getnames()
    assert {"model.pt", "model.json", "code/inference.py", "code/requirements.txt",
            "code/bincount/inference.py"} <= set(names)
    predictor = inference.model_fn(str(extract_package(package, tmp_path)))
    assert predictor.classes == [1, 2, 3, 4, 5]


def test_handler_answers_counts_with_probabilities(tiny_model, synthetic_jpegs):
    predictor = inference.load_predictor(*tiny_model)
    body = json.dumps({"instances": [{"b64": base64.b64encode(synthetic_jpegs[2]).decode()},
                                     base64.b64encode(png_bytes()).decode()]})
    images = inference.input_fn(body.encode(), "application/json")
    out = json.loads(inference.output_fn(inference.predict_fn(images, predictor), "application/json"))
    assert len(out["predictions"]) == 2
    for p in out["predictions"]:
        assert p["count"] in [1, 2, 3, 4, 5] and p["run_id"] == "test-run"
        assert sum(p["probabilities"].values()) == pytest.approx(1, abs=1e-4)
        assert p["count"] == int(max(p["probabilities"], key=p["probabilities"].get))


@pytest.mark.parametrize("body,content_type,status,message", [
    (b"not an image", "image/jpeg", 400, "not an image"),
    (b"x", "text/plain", 415, "unsupported content type"),
    (b"{", "application/json", 400, "malformed JSON"),
    (b'{"instances": []}', "application/json", 400, "at least one image"),
    (b'{"instances": ["@@@"]}', "application/json", 400, "not valid base64"),
])
def test_handler_rejects_bad_requests_clearly(body, content_type, status, message):
    with pytest.raises(inference.RequestError, match=message) as error:
        inference.input_fn(body, content_type)
    assert error.value.status == status


def test_endpoint_serves_the_package_like_in_process(endpoint, tiny_model, synthetic_jpegs):
    assert requests.get(f"{endpoint.url}/ping", timeout=5).json()["run_id"] == "test-run"
    predictor = inference.load_predictor(*tiny_model)
    expected = dict(zip(map(str, synthetic_jpegs), predictor.predict_bytes(list(synthetic_jpegs.values()))))
    report = smoke_test(endpoint.url, {str(k): v for k, v in synthetic_jpegs.items()}, expected)
    assert report["requests"] == 5 and report["mismatches"] == []
    assert report["latency_ms_p50"] > 0


def test_endpoint_answers_bad_input_with_4xx_and_keeps_serving(endpoint, synthetic_jpegs):
    truncated = synthetic_jpegs[3][:500]
    for body, content_type in [(b"hello", "image/jpeg"), (truncated, "image/jpeg"), (b"{", "application/json"),
                               (synthetic_jpegs[1], "video/mp4")]:
        response = requests.post(f"{endpoint.url}/invocations", data=body, headers={"Content-Type": content_type},
                                 timeout=10)
        assert 400 <= response.status_code < 500, response.text
        assert response.json()["error"]
    oversized = requests.post(f"{endpoint.url}/invocations", data=b"0" * (11 * 1024 * 1024),
                              headers={"Content-Type": "image/jpeg"}, timeout=30)
    assert oversized.status_code == 413
    assert requests.get(f"{endpoint.url}/ping", timeout=5).status_code == 200
    assert invoke(endpoint.url, synthetic_jpegs[4])["predictions"][0]["count"] in [1, 2, 3, 4, 5]


def test_unreachable_endpoint_is_a_clear_error():
    from conftest import free_port

    with pytest.raises(EndpointError, match="did not answer"):
        invoke(f"http://127.0.0.1:{free_port()}", b"x", timeout=5)
