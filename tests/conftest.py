"""Shared fixtures: a Metaflow datastore in a temp folder, a real S3 server on
loopback (moto), real bin photos from ../shared/abid-sample, small models."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest


def _import_metaflow_runner_without_its_typing_patch() -> None:
    """metaflow.Runner loads Metaflow's vendored copy of typing_extensions, which
    replaces ``typing._collect_parameters`` with one that only knows its own
    ``NoDefault`` sentinel. In a process that already loaded the real
    typing_extensions (pytest's plugins do), every TypeVar made by the real one
    then looks like it has a default, and a later ``import torch`` or
    ``import torchvision`` fails with "Type parameter ~_R without a default
    follows type parameter with a default". Import it once, then put the
    original back.
    """
    import typing

    original = typing._collect_parameters
    import metaflow._vendor.typing_extensions  # noqa: F401

    typing._collect_parameters = original

REPO = Path(__file__).resolve().parents[1]
FLOW = REPO / "flows" / "bin_flow.py"
TINY_GRID = REPO / "flows" / "grids" / "tiny.json"

# Metaflow reads its configuration when first imported, so the datastore and
# user are fixed here, before any test imports it. Every run of the suite gets
# its own datastore; cards and runs live in the same folder (ENVIRONMENT.md).
DATASTORE = Path(tempfile.mkdtemp(prefix="bincount-tests-"))
os.environ.setdefault("METAFLOW_USER", "tests")
os.environ["METAFLOW_DATASTORE_SYSROOT_LOCAL"] = str(DATASTORE)
os.environ["BINCOUNT_CACHE"] = str(DATASTORE / "cache")
# the Client's copies of artifacts (/tmp/metaflow_client by default: 400 MB a suite, never removed)
os.environ["METAFLOW_CLIENT_CACHE_PATH"] = str(DATASTORE / "client-cache")
os.environ.setdefault("BINCOUNT_ABID_SAMPLE", str(REPO.parent / "shared" / "abid-sample"))
_import_metaflow_runner_without_its_typing_patch()


def pytest_sessionfinish(session, exitstatus):
    """Remove the suite's datastore (runs, shards, checkpoints: gigabytes) unless asked to keep it
    for a look at what a failing test left (BINCOUNT_KEEP_TEST_DATASTORE=1)."""
    if os.environ.get("BINCOUNT_KEEP_TEST_DATASTORE") == "1":
        print(f"\nthe suite's datastore is kept in {DATASTORE}")
        return
    shutil.rmtree(DATASTORE, ignore_errors=True)


def abid_sample_path() -> Path | None:
    path = Path(os.environ["BINCOUNT_ABID_SAMPLE"])
    return path if (path / "metadata").is_dir() else None


@pytest.fixture(scope="session")
def abid_sample() -> Path:
    path = abid_sample_path()
    if path is None:
        pytest.skip(f"real bin photos not found at {os.environ['BINCOUNT_ABID_SAMPLE']} (set BINCOUNT_ABID_SAMPLE)")
    return path


@pytest.fixture(scope="session")
def abid_ids(abid_sample) -> dict[int, list[str]]:
    """The sample's 1-5 ids by class, in file-list order."""
    listing = json.loads((abid_sample / "file_list.json").read_text())
    return {int(k): [Path(p).stem for p in v] for k, v in listing.items()}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, timeout: float = 90) -> None:
    """Return once a server started as ``process`` accepts connections on ``port``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError("moto server did not start")
            time.sleep(0.2)


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 server (moto) on 127.0.0.1, with dummy credentials in the environment."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    try:
        wait_for_port(port, process)
        yield url
    finally:
        process.terminate()
        process.wait(10)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def s3_client(s3_endpoint):
    import boto3

    return boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")


def upload_tree(client, bucket: str, prefix: str, files: dict[str, bytes]) -> None:
    """Put ``files`` (key -> bytes) under s3://bucket/prefix/."""
    existing = [b["Name"] for b in client.list_buckets().get("Buckets", [])]
    if bucket not in existing:
        client.create_bucket(Bucket=bucket)
    for key, data in files.items():
        client.put_object(Bucket=bucket, Key=f"{prefix}/{key}" if prefix else key, Body=data)


def write_shards(root, photos: dict[str, bytes], labels: dict[str, int], max_bytes: int):
    """``photos`` in WebDataset shards under ``root`` (a folder or s3:// prefix): their ShardSet,
    and an index (id, label, shard, checksum) as a run's ``subset`` artifact holds it."""
    from bincount.data.shards import write_shards as write

    return write(root, ((i, labels[i], raw) for i, raw in photos.items()), max_bytes=max_bytes)


def write_tree(root: Path, files: dict[str, bytes]) -> Path:
    for key, data in files.items():
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        (root / key).write_bytes(data)
    return root


def metadata(count) -> bytes:
    return json.dumps({"EXPECTED_QUANTITY": count, "BIN_FCSKU_DATA": {}}).encode()


@pytest.fixture(scope="session")
def bad_objects(abid_sample) -> tuple[dict[str, bytes], dict[str, str]]:
    """Bucket-layout objects that must be skipped, and the reason each should give.

    Built from a real photo: a JPEG cut in half, a text file named .jpg, a bin
    whose metadata is missing, one whose metadata is not JSON, and one whose
    count is outside 1-5.
    """
    real = next((abid_sample / "bin-images").glob("*.jpg")).read_bytes()
    files = {
        "bin-images/bad-truncated.jpg": real[: len(real) // 2], "metadata/bad-truncated.json": metadata(2),
        "bin-images/bad-text.jpg": b"this is not a photo\n", "metadata/bad-text.json": metadata(3),
        "bin-images/bad-nometa.jpg": real,
        "bin-images/bad-malformed.jpg": real, "metadata/bad-malformed.json": b'{"EXPECTED_QUANTITY": 3',
        "bin-images/bad-toomany.jpg": real, "metadata/bad-toomany.json": metadata(9),
    }
    reasons = {"bad-truncated": "unreadable image", "bad-text": "not an image", "bad-nometa": "metadata missing",
               "bad-malformed": "malformed metadata", "bad-toomany": "label 9 outside classes"}
    return files, reasons


def sample_files(abid_sample: Path, ids: list[str]) -> dict[str, bytes]:
    files = {}
    for bin_id in ids:
        files[f"bin-images/{bin_id}.jpg"] = (abid_sample / "bin-images" / f"{bin_id}.jpg").read_bytes()
        files[f"metadata/{bin_id}.json"] = (abid_sample / "metadata" / f"{bin_id}.json").read_bytes()
    return files


@dataclass
class FlowResult:
    status: str
    run: object  # metaflow.Run
    output: str  # stdout and stderr: the Runner deletes its log files on exit


def _finished(running) -> FlowResult:
    return FlowResult(running.status, running.run, running.stdout + running.stderr)


def _runner(env: dict | None, grid: Path | None, deploy_config: Path | None = None, top: dict | None = None):
    """``top``: options before the command, as ``python bin_flow.py --datastore s3 run``."""
    from metaflow import Runner

    configs = [(name, str(path)) for name, path in (("grid", grid), ("deploy", deploy_config)) if path]
    return Runner(str(FLOW), show_output=False, cwd=str(DATASTORE), env=env or {},
                  **({"config": configs} if configs else {}), **(top or {}))


def run_flow(*, env: dict | None = None, grid: Path = TINY_GRID, deploy_config: Path | None = None,
             top: dict | None = None, **params) -> FlowResult:
    """Run BinCountFlow through metaflow.Runner and wait for it to finish."""
    with _runner(env, grid, deploy_config, top).run(**params) as running:
        return _finished(running)


def resume_flow(origin_run_id: str, *, env: dict | None = None, top: dict | None = None) -> FlowResult:
    """Resume a run; configs cannot change on resume, so the origin's grid is used."""
    with _runner(env, None, top=top).resume(origin_run_id=origin_run_id) as running:
        return _finished(running)


@pytest.fixture(scope="session")
def quick_grid(tmp_path_factory) -> Path:
    """The tiny grid at two epochs, for flow tests about plumbing rather than learning."""
    grid = json.loads(TINY_GRID.read_text())
    grid["defaults"]["epochs"] = 2
    path = tmp_path_factory.mktemp("grids") / "quick.json"
    path.write_text(json.dumps(grid))
    return path


@pytest.fixture(scope="session")
def one_point_grid(tmp_path_factory) -> Path:
    """One point of the tiny grid, one epoch, no ensemble: for flow tests about what happens
    around training (deployment, fetching, project branches)."""
    grid = json.loads(TINY_GRID.read_text())
    grid["defaults"]["epochs"] = 1
    grid["points"] = grid["points"][:1]
    grid["select"] = {"ensemble": 1}
    path = tmp_path_factory.mktemp("grids") / "one_point.json"
    path.write_text(json.dumps(grid))
    return path


@pytest.fixture(scope="session")
def synthetic_run():
    """One real flow run on generated data, read back by many tests; its photos (about 1 MB),
    fetched by two tasks, span several shards."""
    running = run_flow(source="synthetic", per_class=60, shard_mb=0.25, fetch_tasks=2)
    assert running.status == "successful", running.output[-4000:]
    return running.run


@pytest.fixture(scope="session")
def tiny_model():
    """An untrained tiny model's weights and metadata, for handler and server tests."""
    from bincount.model.architectures import create_model
    from bincount.model.train import state_dict_bytes

    meta = {"arch": "resnet18", "image_size": 64, "classes": [1, 2, 3, 4, 5], "run_id": "test-run"}
    return state_dict_bytes(create_model("resnet18", num_classes=5, image_size=64)), meta


@pytest.fixture(scope="session")
def synthetic_jpegs() -> dict[int, bytes]:
    from bincount.data.synthetic import synthetic_bin

    return {count: synthetic_bin(count, seed=count) for count in (1, 2, 3, 4, 5)}


def card_components(html: str) -> list[dict]:
    """A Metaflow card's components, decoded from the base64 JSON the default card template embeds."""
    match = re.search(r'window\.__MF_DATA__\["[^"]*"\] = "([A-Za-z0-9+/=]*)"', html)
    assert match, "no card data in the HTML"
    return json.loads(base64.b64decode(match.group(1)))["components"]


def card_text(html: str) -> str:
    """What a card shows, as text to search: a bincount_sortable_table card's HTML as it is, a
    default-template card's components as JSON."""
    return json.dumps(card_components(html)) if "window.__MF_DATA__" in html else html
