"""The one handler, the model package, and the local endpoint over real HTTP."""

import base64
import io
import json

import pytest
import requests

from bincount.serving import handler as inference
from bincount.serving.endpoint import EndpointError, invoke, smoke_test, start_local_endpoint
from bincount.serving.package import build_package, extract_package


@pytest.fixture(scope="module")
def package(tiny_model):
    return build_package(*tiny_model)


@pytest.fixture(scope="module")
def endpoint(package):
    with start_local_endpoint(package) as running:
        yield running


def png_bytes(format="PNG", size=(50, 40)):
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, (10, 200, 30)).save(buf, format=format)
    return buf.getvalue()


def test_package_has_the_sagemaker_layout_and_loads_without_pickle(package, tmp_path):
    import tarfile

    names = tarfile.open(fileobj=io.BytesIO(package)).getnames()
    assert {"model.pt", "model.json", "code/inference.py", "code/requirements.txt",
            "code/bincount/serving/handler.py"} <= set(names)
    predictor = inference.model_fn(str(extract_package(package, tmp_path)))
    assert predictor.classes == [1, 2, 3, 4, 5]


# Run in a fresh interpreter: its path holds the package's code/ folder and the third-party
# packages, never this checkout (no working directory, no PYTHONPATH, and the finder that an
# editable install of bincount adds is taken out), so a module missing from the package fails.
FRESH_INTERPRETER = """
import importlib, json, pkgutil, sys
code = sys.argv[1]
sys.meta_path[:] = [f for f in sys.meta_path if not type(f).__module__.startswith("__editable__")]
sys.path.insert(0, code)
import inference  # code/inference.py, as SageMaker's container imports it
predictor = inference.model_fn(sys.argv[2])
answer = inference.predict_fn(inference.input_fn(open(sys.argv[3], "rb").read(), "image/jpeg"), predictor)
import bincount
modules = [m.name for m in pkgutil.walk_packages(bincount.__path__, "bincount.")]
for name in modules:
    importlib.import_module(name)
files = sorted({m.__file__ for n, m in sys.modules.items() if n.split(".")[0] == "bincount"})
print(json.dumps({"answer": answer, "modules": modules, "files": files}))
"""


def test_the_package_serves_from_its_own_code_folder_alone(package, tiny_model, synthetic_jpegs, tmp_path):
    import subprocess
    import sys

    from bincount.serving.package import library_files

    model_dir = extract_package(package, tmp_path / "model")
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(synthetic_jpegs[3])
    out = subprocess.run([sys.executable, "-I", "-c", FRESH_INTERPRETER, str(model_dir / "code"), str(model_dir),
                          str(photo)], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert all(f.startswith(str(model_dir / "code")) for f in got["files"]), got["files"]
    # every module of the library travels: the package has every file this checkout has
    assert {f"code/{name}" for name, _ in library_files()} <= set(tarfile_names(package))
    assert len(got["modules"]) >= len([n for n, _ in library_files() if not n.endswith("__init__.py")])
    expected = inference.load_predictor(*tiny_model).predict_bytes([synthetic_jpegs[3]])
    assert got["answer"][0]["count"] == expected[0]["count"]
    assert got["answer"][0]["probabilities"] == pytest.approx(expected[0]["probabilities"], abs=1e-5)


def tarfile_names(package: bytes) -> list[str]:
    import tarfile

    return tarfile.open(fileobj=io.BytesIO(package)).getnames()


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
    (png_bytes("GIF"), "image/png", 415, "is a GIF image: only JPEG and PNG are decoded"),
    (png_bytes("JPEG", (4000, 2500)), "image/jpeg", 413, "too many pixels"),
    (json.dumps([base64.b64encode(png_bytes("JPEG", (2000, 2000))).decode()] * 5).encode(), "application/json",
     413, "20,000,000 pixels in all"),
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
