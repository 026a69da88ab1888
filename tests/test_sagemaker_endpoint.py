"""The SageMaker deploy target against a real moto server over HTTP (no boto3 mocks).

What moto 5.2.5 does and does not do, and how these tests deal with it:
- CreateModel / CreateEndpointConfig / CreateEndpoint / DescribeEndpoint work;
  endpoints are InService at once; any role ARN is accepted (no IAM check).
- InvokeEndpoint answers a canned body ``b"body"`` unless results are queued
  at /moto-api/static/sagemaker/endpoint-results; binary (non-UTF-8) request
  bodies make the server fail with 500, so smoke tests here send JSON (base64).
- UpdateEndpoint is not implemented (500, NotImplementedError), and creating
  an endpoint or model under an existing name silently overwrites it, where
  SageMaker refuses. The update test therefore runs against a second moto
  server with UpdateEndpoint added and those name checks made strict, as in
  SageMaker (see MOTO_WITH_UPDATE_ENDPOINT).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import requests

from bincount.sagemaker.endpoint import (NAME_RE, SageMakerDeployError, SageMakerTarget, deploy_to_sagemaker,
                                         make_clients, resource_name, smoke_test_sagemaker, wait_in_service)
from bincount.serving.package import build_package

from conftest import free_port, wait_for_port

EXAMPLE = Path(__file__).resolve().parents[1] / "flows" / "deploy" / "sagemaker.example.json"
ROLE = "arn:aws:iam::123456789012:role/bincount-tests"
BUCKET = "bincount-deploy-tests"

# moto's server with UpdateEndpoint added, behaving as SageMaker documents it
# (Updating, then InService on the new config), and with CreateModel /
# CreateEndpointConfig / CreateEndpoint refusing names that exist, as SageMaker does.
MOTO_WITH_UPDATE_ENDPOINT = r'''
import sys
from moto.core.responses import ActionResult
from moto.core.utils import utcnow
from moto.sagemaker import models, responses
from moto.sagemaker.exceptions import ValidationError

Backend = models.SageMakerModelBackend

def refuse_existing(method, registry, argument, what):
    original = getattr(Backend, method)
    def create(self, *args, **kwargs):
        name = kwargs[argument] if argument in kwargs else args[0]
        if name in getattr(self, registry):
            raise ValidationError(message=f'Cannot create already existing {what} "{name}".')
        return original(self, *args, **kwargs)
    setattr(Backend, method, create)

refuse_existing("create_model", "_models", "model_name", "model")
refuse_existing("create_endpoint_config", "endpoint_configs", "endpoint_config_name", "endpoint configuration")
refuse_existing("create_endpoint", "endpoints", "endpoint_name", "endpoint")

def update_endpoint(self, endpoint_name, endpoint_config_name):
    endpoint = self.endpoints.get(endpoint_name)
    if endpoint is None:
        raise ValidationError(message=f"Could not find endpoint '{endpoint_name}'.")
    config = self.describe_endpoint_config(endpoint_config_name)
    endpoint.endpoint_config_name = endpoint_config_name
    endpoint.production_variants = endpoint._process_production_variants(config["ProductionVariants"])
    endpoint.endpoint_status = "Updating"  # the next describe finishes the update
    endpoint.last_modified_time = utcnow()
    return endpoint

original_describe = Backend.describe_endpoint
def describe_endpoint(self, endpoint_name):
    answer = original_describe(self, endpoint_name)
    endpoint = self.endpoints[endpoint_name]
    if endpoint.endpoint_status == "Updating":
        endpoint.endpoint_status = "InService"
    return answer

def update_endpoint_action(self):
    endpoint = self.sagemaker_backend.update_endpoint(self._get_param("EndpointName"),
                                                      self._get_param("EndpointConfigName"))
    return ActionResult({"EndpointArn": endpoint.arn})

Backend.update_endpoint = update_endpoint
Backend.describe_endpoint = describe_endpoint
responses.SageMakerResponse.update_endpoint = update_endpoint_action

from moto.server import main
main(sys.argv[1:])
'''


@pytest.fixture(scope="module")
def moto_with_update(s3_endpoint):  # s3_endpoint: for its dummy credentials
    port = free_port()
    process = subprocess.Popen([sys.executable, "-c", MOTO_WITH_UPDATE_ENDPOINT, "-H", "127.0.0.1", "-p", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, process)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(10)


def point_at(url: str, monkeypatch) -> dict:
    """Send every boto3 client to ``url``; make the bucket; return clients."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", url)
    clients = make_clients("us-east-1")
    existing = [b["Name"] for b in clients["s3"].list_buckets().get("Buckets", [])]
    if BUCKET not in existing:
        clients["s3"].create_bucket(Bucket=BUCKET)
    return clients


def target(**overrides) -> SageMakerTarget:
    config = {"role_arn": ROLE, "bucket": BUCKET, "endpoint_name": f"bincount-{uuid.uuid4().hex[:8]}",
              "region": "us-east-1", "smoke_content_type": "application/json", "wait_timeout_s": 30}
    return SageMakerTarget.from_config({**config, **overrides})


@pytest.fixture(scope="module")
def package(tiny_model) -> tuple[bytes, dict]:
    state, meta = tiny_model
    return build_package(state, meta), meta


def test_first_deploy_creates_model_config_and_endpoint(s3_endpoint, monkeypatch, package, synthetic_jpegs):
    clients = point_at(s3_endpoint, monkeypatch)
    pkg, meta = package
    meta = {**meta, "run_id": "1732200000123456"}
    tgt = target(instance_type="ml.c5.xlarge", instance_count=2, prefix="/models/bincount/")
    images = {"bin-1": synthetic_jpegs[1], "bin-2": synthetic_jpegs[2]}
    report = deploy_to_sagemaker(pkg, meta, tgt, smoke_images=images, expected={}, poll_s=0.05, log=lambda _: None)

    assert report["action"] == "created" and report["target"] == "sagemaker"
    key = "models/bincount/1732200000123456/model.tar.gz"
    assert report["model_data_url"] == f"s3://{BUCKET}/{key}"
    assert clients["s3"].get_object(Bucket=BUCKET, Key=key)["Body"].read() == pkg

    sm = clients["sagemaker"]
    model = sm.describe_model(ModelName=report["model_name"])
    assert model["PrimaryContainer"]["Image"] == \
        "763104351884.dkr.ecr.us-east-1.amazonaws.com/pytorch-inference:2.6.0-cpu-py312"
    assert model["PrimaryContainer"]["ModelDataUrl"] == report["model_data_url"]
    assert model["PrimaryContainer"]["Environment"]["SAGEMAKER_PROGRAM"] == "inference.py"
    assert model["PrimaryContainer"]["Environment"]["SAGEMAKER_SUBMIT_DIRECTORY"] == "/opt/ml/model/code"
    assert model["ExecutionRoleArn"] == ROLE
    assert "1732200000123456" in report["model_name"] and NAME_RE.match(report["model_name"])

    variant, = sm.describe_endpoint_config(EndpointConfigName=report["endpoint_config_name"])["ProductionVariants"]
    assert variant == {"VariantName": "AllTraffic", "ModelName": report["model_name"],
                       "InstanceType": "ml.c5.xlarge", "InitialInstanceCount": 2}
    endpoint = sm.describe_endpoint(EndpointName=tgt.endpoint_name)
    assert endpoint["EndpointConfigName"] == report["endpoint_config_name"]
    assert endpoint["EndpointStatus"] == "InService" and report["endpoint_arn"] == endpoint["EndpointArn"]

    smoke = report["smoke_test"]  # moto answers b"body": requests worked, nothing verified
    assert smoke["requests"] == 2 and smoke["verified"] == [] and smoke["mismatches"] == []
    assert [u["id"] for u in smoke["unverified"]] == ["bin-1", "bin-2"]
    assert smoke["latency_ms_p50"] > 0


def test_second_deploy_updates_the_endpoint_in_place(moto_with_update, monkeypatch, package):
    clients = point_at(moto_with_update, monkeypatch)
    pkg, meta = package
    tgt = target()
    first = deploy_to_sagemaker(pkg, {**meta, "run_id": "run-1"}, tgt, poll_s=0.05, log=lambda _: None)
    seen = []
    second = deploy_to_sagemaker(pkg + b"v2", {**meta, "run_id": "run-2"}, tgt, poll_s=0.05, log=seen.append)

    assert (first["action"], second["action"]) == ("created", "updated")
    assert (first["previous_endpoint_config_name"], second["previous_endpoint_config_name"]) == \
        (None, first["endpoint_config_name"])
    sm = clients["sagemaker"]
    endpoint = sm.describe_endpoint(EndpointName=tgt.endpoint_name)
    assert endpoint["EndpointConfigName"] == second["endpoint_config_name"] != first["endpoint_config_name"]
    assert endpoint["EndpointArn"] == first["endpoint_arn"]  # the same endpoint, not a new one
    # Nothing of the first deployment was deleted: going back is one UpdateEndpoint.
    assert sm.describe_model(ModelName=first["model_name"])["PrimaryContainer"]["ModelDataUrl"] == \
        first["model_data_url"]
    sm.describe_endpoint_config(EndpointConfigName=first["endpoint_config_name"])
    assert clients["s3"].get_object(Bucket=BUCKET, Key="bincount/models/run-2/model.tar.gz")["Body"].read() == \
        pkg + b"v2"
    assert any("Updating" in line for line in seen) and any("InService" in line for line in seen)


def test_smoke_test_checks_answers_in_our_format(s3_endpoint, monkeypatch):
    clients = point_at(s3_endpoint, monkeypatch)

    def ours(count: int) -> dict:
        return {"Body": json.dumps({"predictions": [{"count": count, "probabilities": {"1": 0.2, "2": 0.8},
                                                     "run_id": "r"}]}), "ContentType": "application/json"}

    # moto hands queued answers to new requests in order; once empty, b"body".
    queued = requests.post(f"{s3_endpoint}/moto-api/static/sagemaker/endpoint-results",
                           json={"results": [ours(2), ours(1), ours(2)]}, timeout=10)
    assert queued.status_code == 201
    want = {"count": 2, "probabilities": {"1": 0.2, "2": 0.8}}
    images = {"agrees": b"\xff\xd8one", "disagrees": b"\xff\xd8two", "no-expectation": b"\xff\xd8three",
              "canned": b"\xff\xd8four"}
    report = smoke_test_sagemaker(clients["sagemaker-runtime"], f"smoke-{uuid.uuid4().hex[:8]}", images,
                                  {"agrees": want, "disagrees": want, "canned": want}, "application/json")
    assert report["verified"] == ["agrees"]
    assert [m["id"] for m in report["mismatches"]] == ["disagrees"]
    assert report["mismatches"][0]["endpoint"]["count"] == 1
    assert {u["id"]: u["reason"] for u in report["unverified"]} == {
        "no-expectation": "no expected prediction", "canned": "not our response JSON: b'body'"}
    assert report["requests"] == 4


def test_missing_bucket_is_a_clear_error(s3_endpoint, monkeypatch, package):
    point_at(s3_endpoint, monkeypatch)
    with pytest.raises(SageMakerDeployError, match="s3://no-such-bucket-here/.*NoSuchBucket"):
        deploy_to_sagemaker(package[0], package[1], target(bucket="no-such-bucket-here"), poll_s=0.05,
                            log=lambda _: None)


def test_unreachable_endpoint_fails_fast(s3_endpoint, monkeypatch, package):
    closed = free_port()  # nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed}")
    start = time.monotonic()
    with pytest.raises(SageMakerDeployError, match=f"cannot reach AWS.*127.0.0.1:{closed}"):
        deploy_to_sagemaker(package[0], package[1], target(), poll_s=0.05, log=lambda _: None)
    assert time.monotonic() - start < 60


# --- the config file ---------------------------------------------------------

def test_example_config_has_every_key_and_placeholders_are_refused():
    example = json.loads(EXAMPLE.read_text())
    assert set(example) == {f for f in SageMakerTarget.__dataclass_fields__}
    with pytest.raises(ValueError, match="placeholder"):
        SageMakerTarget.from_config(example)
    filled = SageMakerTarget.from_config({**example, "role_arn": ROLE, "bucket": "my-bucket", "region": "eu-west-1"})
    assert filled.image_uri == "763104351884.dkr.ecr.eu-west-1.amazonaws.com/pytorch-inference:2.6.0-cpu-py312"
    assert (filled.instance_count, filled.endpoint_name, filled.prefix) == (1, "bincount", "bincount/models")


@pytest.mark.parametrize("config, named", [
    ({"bucket": BUCKET}, ["role_arn"]),
    ({"role_arn": ROLE}, ["bucket"]),
    ({}, ["role_arn", "bucket"]),
    ({"role_arn": ROLE, "bucket": ""}, ["bucket"]),
])
def test_missing_required_keys_are_named_with_where_to_put_them(config, named):
    with pytest.raises(ValueError) as error:
        SageMakerTarget.from_config(config)
    message = str(error.value)
    assert all(key in message for key in named)
    assert "--config deploy" in message and "sagemaker.example.json" in message


@pytest.mark.parametrize("extra, match", [
    ({"instance_typ": "ml.m5.large"}, r"unknown key.*instance_typ.*known keys.*instance_type"),
    ({"instance_count": 0}, "instance_count"),
    ({"instance_count": "2"}, "instance_count"),
    ({"role_arn": "my-role"}, "not an IAM role ARN"),
    ({"bucket": "s3://bucket/path"}, "bare bucket name"),
    ({"endpoint_name": "bin_count"}, "endpoint_name"),
    ({"smoke_content_type": "image/png"}, "smoke_content_type"),
])
def test_bad_values_are_refused(extra, match):
    with pytest.raises(ValueError, match=match):
        SageMakerTarget.from_config({"role_arn": ROLE, "bucket": BUCKET, **extra})


def test_region_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("AWS_DEFAULT_REGION", "cn-north-1")
    tgt = SageMakerTarget.from_config({"role_arn": "arn:aws-cn:iam::123456789012:role/r", "bucket": "b-1"})
    assert tgt.region == "cn-north-1"
    assert tgt.image_uri == "727897471807.dkr.ecr.cn-north-1.amazonaws.com.cn/pytorch-inference:2.6.0-cpu-py312"


# --- names and waiting ---------------------------------------------------------

@pytest.mark.parametrize("endpoint, run_id", [("bincount", "1732200000123456"), ("e" * 63, "argo-bincountflow-x_y.z"),
                                               ("bincount", "r" * 90), ("a", "--")])
def test_resource_names_are_legal_and_keep_the_run_id_end(endpoint, run_id):
    name = resource_name(endpoint, run_id, stamp="20250101-000000-000")
    assert NAME_RE.match(name) and len(name) <= 63 and name.endswith("-20250101-000000-000")
    tail = run_id.replace("_", "-").replace(".", "-").strip("-")[-10:]
    assert tail in name
    assert resource_name(endpoint, run_id) != resource_name(endpoint, run_id, stamp="x")


def scripted(*states: tuple[str, str], reason: str | None = None):
    """A describe function that walks through (status, config) states, then repeats the last."""
    states = list(states)

    def describe() -> dict:
        status, config = states.pop(0) if len(states) > 1 else states[0]
        return {"EndpointName": "ep", "EndpointStatus": status, "EndpointConfigName": config,
                **({"FailureReason": reason} if reason else {})}
    return describe


def test_wait_returns_once_in_service_on_the_new_config():
    log = []
    describe = scripted(("InService", "old"), ("Updating", "new"), ("Updating", "new"), ("InService", "new"))
    assert wait_in_service(describe, "new", timeout_s=5, poll_s=0, log=log.append)["EndpointConfigName"] == "new"
    assert log == ["endpoint ep: InService", "endpoint ep: Updating", "endpoint ep: InService"]


def test_wait_fails_with_the_failure_reason():
    describe = scripted(("Creating", "new"), ("Failed", "new"), reason="CannotStartContainerError: boom")
    with pytest.raises(SageMakerDeployError, match="Failed: CannotStartContainerError: boom.*CloudWatch"):
        wait_in_service(describe, "new", timeout_s=5, poll_s=0, log=lambda _: None)


def test_wait_detects_a_rolled_back_update():
    describe = scripted(("Updating", "old"), ("RollingBack", "old"), ("InService", "old"), reason="health check")
    with pytest.raises(SageMakerDeployError, match="rolled back.*still serves old: health check"):
        wait_in_service(describe, "new", timeout_s=5, poll_s=0, log=lambda _: None)


def test_wait_times_out():
    start = time.monotonic()
    with pytest.raises(SageMakerDeployError, match="not InService on new after 0 s.*Creating"):
        wait_in_service(scripted(("Creating", "new")), "new", timeout_s=0.3, poll_s=0.05, log=lambda _: None)
    assert time.monotonic() - start < 5
