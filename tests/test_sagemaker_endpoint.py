"""The SageMaker deploy target against a real moto server over HTTP (no boto3 mocks).

What moto 5.2.5 does and does not do, and how these tests deal with it:
- CreateModel / CreateEndpointConfig / CreateEndpoint / DescribeEndpoint /
  DeleteEndpoint work; endpoints are InService at once; any role ARN is
  accepted (no IAM check).
- InvokeEndpoint answers a canned body ``b"body"`` unless results are queued
  at /moto-api/static/sagemaker/endpoint-results (how a test makes the smoke
  test disagree). It does not check that the endpoint exists, and it caches
  each answer by request body across all endpoints (it does not read the
  endpoint name from the path), so a test that queues an answer sends an image
  moto has not seen. Binary (non-UTF-8) request bodies make the server fail
  with 500, so smoke tests here send JSON (base64).
- UpdateEndpoint is not implemented (500, NotImplementedError), endpoints never
  pass through Creating/Updating, nothing is refused while an operation is in
  progress, and creating an endpoint or model under an existing name silently
  overwrites it, where SageMaker refuses. Tests of updates, slow or failing
  containers and rollbacks therefore run against a second moto server that adds
  those, as SageMaker documents them (see MOTO_WITH_UPDATE_ENDPOINT).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import requests

from bincount.aws.containers import image_uri
from bincount.sagemaker.endpoint import (NAME_RE, SageMakerDeployError, SageMakerTarget, deploy_to_sagemaker,
                                         make_clients, resource_name, smoke_test_sagemaker, wait_in_service)
from bincount.serving.package import build_package

from conftest import free_port, wait_for_port

EXAMPLE = Path(__file__).resolve().parents[1] / "flows" / "deploy" / "sagemaker.example.json"
ROLE = "arn:aws:iam::123456789012:role/bincount-tests"
BUCKET = "bincount-deploy-tests"

# moto's server made to behave like SageMaker where the deploy code depends on it:
# - UpdateEndpoint added. CreateEndpoint / UpdateEndpoint leave the endpoint
#   Creating / Updating; each DescribeEndpoint answers, then moves it on by how
#   the model's container behaves, which the fake reads from the image tag (see
#   CONTAINER_TAGS). On SageMaker the endpoint shows the new config while Updating.
# - UpdateEndpoint and DeleteEndpoint are refused while an operation is in
#   progress, and CreateModel / CreateEndpointConfig / CreateEndpoint refuse
#   names that exist, as SageMaker does.
MOTO_WITH_UPDATE_ENDPOINT = r'''
import sys
import time
from moto.core.responses import ActionResult
from moto.core.utils import utcnow
from moto.sagemaker import models, responses
from moto.sagemaker.exceptions import ValidationError

Backend = models.SageMakerModelBackend
IN_PROGRESS = {"Creating", "Updating"}
SLOW_S = 2.0  # how long a ":slow" container takes to become healthy
UNHEALTHY = "The primary container for production variant AllTraffic did not pass the ping health check."

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

def refuse_in_progress(endpoint):
    if endpoint.endpoint_status in IN_PROGRESS:
        raise ValidationError(message=f"Cannot update in-progress endpoint \"{endpoint.arn}\".")

def container(self, config_name):
    model = self.describe_endpoint_config(config_name)["ProductionVariants"][0]["ModelName"]
    return self._models[model].primary_container["Image"].rsplit(":", 1)[-1]

def point_at(self, endpoint, config_name):
    endpoint.endpoint_config_name = config_name
    variants = self.describe_endpoint_config(config_name)["ProductionVariants"]
    endpoint.production_variants = endpoint._process_production_variants(variants)
    endpoint.last_modified_time = utcnow()

def start(self, endpoint, status, config_name, previous):
    point_at(self, endpoint, config_name)
    endpoint.endpoint_status, endpoint.failure_reason = status, None
    endpoint.pending = {"previous": previous, "since": time.monotonic()}

def advance(self, endpoint):
    pending = getattr(endpoint, "pending", None)
    tag = container(self, endpoint.endpoint_config_name) if pending else None
    if pending is None or tag == "never" or (tag == "slow" and time.monotonic() - pending["since"] < SLOW_S):
        return
    endpoint.pending, endpoint.endpoint_status = None, "InService"
    if tag == "crash":
        endpoint.failure_reason = UNHEALTHY
        if pending["previous"] is None:
            endpoint.endpoint_status = "Failed"
        else:  # SageMaker rolls a failed update back by itself
            point_at(self, endpoint, pending["previous"])

original_create_endpoint = Backend.create_endpoint
def create_endpoint(self, endpoint_name, endpoint_config_name, tags):
    endpoint = original_create_endpoint(self, endpoint_name, endpoint_config_name, tags)
    start(self, endpoint, "Creating", endpoint_config_name, None)
    return endpoint

def update_endpoint(self, endpoint_name, endpoint_config_name):
    endpoint = self.endpoints.get(endpoint_name)
    if endpoint is None:
        raise ValidationError(message=f"Could not find endpoint '{endpoint_name}'.")
    refuse_in_progress(endpoint)
    start(self, endpoint, "Updating", endpoint_config_name, endpoint.endpoint_config_name)
    return endpoint

original_describe = Backend.describe_endpoint
def describe_endpoint(self, endpoint_name):
    answer = original_describe(self, endpoint_name)
    advance(self, self.endpoints[endpoint_name])
    return answer

original_delete = Backend.delete_endpoint
def delete_endpoint(self, endpoint_name):
    if endpoint_name in self.endpoints:
        refuse_in_progress(self.endpoints[endpoint_name])
    original_delete(self, endpoint_name)

def update_endpoint_action(self):
    endpoint = self.sagemaker_backend.update_endpoint(self._get_param("EndpointName"),
                                                      self._get_param("EndpointConfigName"))
    return ActionResult({"EndpointArn": endpoint.arn})

Backend.create_endpoint = create_endpoint
Backend.update_endpoint = update_endpoint
Backend.describe_endpoint = describe_endpoint
Backend.delete_endpoint = delete_endpoint
responses.SageMakerResponse.update_endpoint = update_endpoint_action

from moto.server import main
main(sys.argv[1:])
'''

# How a model's container behaves on the fake server above, by image tag.
CONTAINER_TAGS = {
    "slow": "healthy 2 s after the create/update started (a wait of 0.3 s times out)",
    "never": "never healthy: the endpoint stays Creating/Updating (SageMaker gives up only after a long while)",
    "crash": "fails its health check: a created endpoint ends Failed, an update is rolled back by SageMaker",
}


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
    assert model["PrimaryContainer"]["Image"] == image_uri("inference", "us-east-1", "ml.m5.large")
    assert "763104351884.dkr.ecr.us-east-1.amazonaws.com/pytorch-inference:" in model["PrimaryContainer"]["Image"]
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


# --- a failed deployment never stays in production ---------------------------------

def image(tag: str) -> str:
    assert tag in CONTAINER_TAGS
    return f"123456789012.dkr.ecr.us-east-1.amazonaws.com/bincount:{tag}"


def new_image() -> dict[str, bytes]:
    """One image moto has not seen: it caches an answer per request body, across all endpoints."""
    return {"bin-1": b"\xff\xd8" + uuid.uuid4().bytes}


def prediction(count: int) -> dict:
    return {"count": count, "probabilities": {str(count): 0.9, "5": 0.1}}


def queue_answers(moto_url: str, *predictions: dict) -> None:
    """Make moto answer the next new invocations with our handler's JSON for ``predictions``."""
    results = [{"Body": json.dumps({"predictions": [p]}), "ContentType": "application/json"} for p in predictions]
    queued = requests.post(f"{moto_url}/moto-api/static/sagemaker/endpoint-results", json={"results": results},
                           timeout=10)
    assert queued.status_code == 201


def config_of(sm, endpoint_name: str, run_id: str) -> str:
    """The name of the endpoint config that ``run_id``'s deployment created."""
    configs = sm.list_endpoint_configs(NameContains=f"{endpoint_name}-{run_id}-")["EndpointConfigs"]
    assert len(configs) == 1, configs
    return configs[0]["EndpointConfigName"]


def endpoint_now(sm, name: str) -> tuple[str, str]:
    endpoint = sm.describe_endpoint(EndpointName=name)
    return endpoint["EndpointStatus"], endpoint["EndpointConfigName"]


def deploy_twice(url: str, monkeypatch, package, second: dict | None = None, **kwargs) -> tuple[dict, dict, str]:
    """Deploy run-1 (healthy), then run-2 to the same endpoint with ``second`` target settings and ``kwargs``.

    Returns the clients, run-1's report and the message of the error run-2 must raise.
    """
    clients = point_at(url, monkeypatch)
    pkg, meta = package
    first_target = target()
    first = deploy_to_sagemaker(pkg, {**meta, "run_id": "run-1"}, first_target, poll_s=0.05, log=lambda _: None)
    second_target = target(endpoint_name=first_target.endpoint_name, **(second or {}))
    own_clients = {"sagemaker_client": clients["sagemaker"], "s3_client": clients["s3"],
                   "runtime_client": clients["sagemaker-runtime"]}
    with pytest.raises(SageMakerDeployError) as error:
        deploy_to_sagemaker(pkg + b"v2", {**meta, "run_id": "run-2"}, second_target, poll_s=0.05,
                            **{"log": lambda _: None, **own_clients, **kwargs})
    return clients, first, str(error.value)


def assert_rolled_back(clients, first: dict, message: str, cause: str) -> str:
    """The endpoint serves run-1's config again; the message names both configs and ``cause``."""
    sm, name = clients["sagemaker"], first["endpoint_name"]
    failed = config_of(sm, name, "run-2")
    assert endpoint_now(sm, name) == ("InService", first["endpoint_config_name"])
    assert re.search(f"deploying endpoint config {failed} to endpoint {name} failed: .*{cause}", message), message
    assert f"Rolled back: endpoint {name} is InService on its previous endpoint config " \
           f"{first['endpoint_config_name']} again" in message, message
    sm.describe_endpoint_config(EndpointConfigName=failed)  # kept for inspection, as the message says
    sm.describe_model(ModelName=failed)
    return failed


def test_a_disagreeing_smoke_test_rolls_the_update_back(moto_with_update, monkeypatch, package):
    queue_answers(moto_with_update, prediction(2))  # the endpoint counts 2 where the model in-process counts 1
    clients, first, message = deploy_twice(moto_with_update, monkeypatch, package,
                                           smoke_images=new_image(),
                                           expected={"bin-1": prediction(1)})
    assert_rolled_back(clients, first, message,
                       r"smoke test of endpoint \S+ failed: 0 of 1 answers matched.*'endpoint': \{'count': 2")


def test_a_failed_invocation_rolls_the_update_back(moto_with_update, monkeypatch, package):
    # A real fault: the runtime API (its own host on AWS) cannot be reached, while the control plane can.
    closed = free_port()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed}")
    unreachable = make_clients("us-east-1")["sagemaker-runtime"]
    clients, first, message = deploy_twice(moto_with_update, monkeypatch, package, runtime_client=unreachable,
                                           smoke_images=new_image(),
                                           expected={"bin-1": prediction(1)})
    assert_rolled_back(clients, first, message, f"invoking endpoint \\S+ with bin-1: cannot reach AWS.*{closed}")


def test_an_update_that_does_not_finish_in_time_is_rolled_back_once_it_settles(moto_with_update, monkeypatch,
                                                                               package):
    seen = []
    clients, first, message = deploy_twice(moto_with_update, monkeypatch, package,
                                           {"image_uri": image("slow"), "wait_timeout_s": 0.3},
                                           rollback_timeout_s=15, log=seen.append)
    failed = assert_rolled_back(clients, first, message, r"not InService on \S+ after 0.3 s \(status Updating\)")
    # SageMaker refuses to update an endpoint that is Updating: the rollback waited for the update to end.
    assert any(f"rolling back to {first['endpoint_config_name']}" in line for line in seen), seen
    assert any("Updating, waiting for it to finish" in line for line in seen), seen
    assert failed in message


def test_an_update_sagemaker_rolled_back_itself_is_reported_as_rolled_back(moto_with_update, monkeypatch, package):
    seen = []
    clients, first, message = deploy_twice(moto_with_update, monkeypatch, package, {"image_uri": image("crash")},
                                           log=seen.append)
    assert_rolled_back(clients, first, message, "was rolled back.*did not pass the ping health check")
    assert any("already serves" in line for line in seen), seen  # no second UpdateEndpoint was needed


def test_a_rollback_that_fails_says_what_serves_and_the_command_to_restore(moto_with_update, monkeypatch,
                                                                           package):
    clients, first, message = deploy_twice(moto_with_update, monkeypatch, package,
                                           {"image_uri": image("never"), "wait_timeout_s": 0.3},
                                           rollback_timeout_s=0.3)
    sm, name, previous = clients["sagemaker"], first["endpoint_name"], first["endpoint_config_name"]
    failed = config_of(sm, name, "run-2")
    assert endpoint_now(sm, name) == ("Updating", failed)  # what the message warns about
    assert f"deploying endpoint config {failed} to endpoint {name} failed: endpoint {name} not InService on " \
           f"{failed} after 0.3 s (status Updating)" in message, message
    assert f"Rolling back to the previous endpoint config {previous} failed too: endpoint {name} still Updating on " \
           f"{failed} after 0.3 s" in message, message
    assert f"The endpoint may still serve {failed}" in message
    assert message.endswith(f"aws sagemaker update-endpoint --endpoint-name {name} --endpoint-config-name {previous}")


def test_a_failed_first_deployment_deletes_the_endpoint_and_keeps_model_and_config(s3_endpoint, monkeypatch,
                                                                                   package):
    clients = point_at(s3_endpoint, monkeypatch)
    sm, tgt = clients["sagemaker"], target()
    queue_answers(s3_endpoint, prediction(3))
    with pytest.raises(SageMakerDeployError) as error:
        deploy_to_sagemaker(package[0], {**package[1], "run_id": "run-1"}, tgt,
                            smoke_images=new_image(), expected={"bin-1": prediction(1)},
                            poll_s=0.05, log=lambda _: None)
    message, name = str(error.value), tgt.endpoint_name
    failed = config_of(sm, name, "run-1")
    with pytest.raises(sm.exceptions.ClientError, match="Could not find endpoint"):
        sm.describe_endpoint(EndpointName=name)
    sm.describe_endpoint_config(EndpointConfigName=failed)  # kept, as the message says
    sm.describe_model(ModelName=failed)
    assert re.search(f"creating endpoint {name} with endpoint config {failed} failed: the smoke test of endpoint "
                     f"{name} failed: 0 of 1 answers matched", message), message
    assert f"The new endpoint {name} was deleted" in message
    assert f"aws sagemaker delete-model --model-name {failed}" in message


def test_a_first_deployment_that_cannot_be_deleted_says_how_to_delete_it(moto_with_update, monkeypatch, package):
    clients = point_at(moto_with_update, monkeypatch)
    sm, tgt = clients["sagemaker"], target(image_uri=image("never"), wait_timeout_s=0.3)
    with pytest.raises(SageMakerDeployError) as error:
        deploy_to_sagemaker(package[0], {**package[1], "run_id": "run-1"}, tgt, poll_s=0.05, rollback_timeout_s=0.3,
                            log=lambda _: None)
    message, name = str(error.value), tgt.endpoint_name
    failed = config_of(sm, name, "run-1")
    assert endpoint_now(sm, name) == ("Creating", failed)  # SageMaker refuses to delete it while Creating
    assert f"creating endpoint {name} with endpoint config {failed} failed: endpoint {name} not InService" in message
    assert f"Deleting the new endpoint failed too: endpoint {name} still Creating on {failed}" in message
    assert "It may still be running and costing money" in message
    assert f"aws sagemaker delete-endpoint --endpoint-name {name}." in message


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
    assert filled.image_uri == image_uri("inference", "eu-west-1", "ml.m5.large")
    assert filled.image_uri.startswith("763104351884.dkr.ecr.eu-west-1.amazonaws.com/pytorch-inference:")
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
    ({"instance_count": 0}, "instance_count = 0: input should be greater than or equal to 1"),
    ({"instance_count": "2"}, "instance_count = '2': input should be a valid integer"),
    ({"instance_count": 1.0}, "instance_count = 1.0: input should be a valid integer"),
    ({"wait_timeout_s": float("nan")}, "wait_timeout_s = nan: input should be a finite number"),
    ({"wait_timeout_s": -5}, "wait_timeout_s = -5: input should be greater than 0"),
    ({"role_arn": "my-role"}, "not an IAM role ARN"),
    ({"bucket": "s3://bucket/path"}, "bare bucket name"),
    ({"endpoint_name": "bin_count"}, "endpoint_name 'bin_count': up to 63 letters"),
    ({"smoke_content_type": "image/png"}, "smoke_content_type = 'image/png': input should be 'image/jpeg' or"),
])
def test_bad_values_are_refused(extra, match):
    with pytest.raises(ValueError, match=match):
        SageMakerTarget.from_config({"role_arn": ROLE, "bucket": BUCKET, **extra})


def test_region_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("AWS_DEFAULT_REGION", "cn-north-1")
    tgt = SageMakerTarget.from_config({"role_arn": "arn:aws-cn:iam::123456789012:role/r", "bucket": "b-1"})
    assert tgt.region == "cn-north-1"
    assert tgt.image_uri == image_uri("inference", "cn-north-1", "ml.m5.large")
    assert tgt.image_uri.startswith("727897471807.dkr.ecr.cn-north-1.amazonaws.com.cn/pytorch-inference:")


def test_the_endpoint_s_image_is_the_sdk_s_for_its_processor_and_the_serving_version():
    """Serving's image comes from the same lookup as training's (bincount.aws.containers), its own scope."""
    from sagemaker.core import image_uris

    from bincount.aws.containers import framework_version

    version = framework_version("inference")
    for instance_type, processor in (("ml.m5.large", "cpu"), ("ml.g4dn.xlarge", "gpu")):
        tgt = SageMakerTarget.from_config({"role_arn": ROLE, "bucket": BUCKET, "region": "eu-west-1",
                                           "instance_type": instance_type})
        assert tgt.image_uri == image_uris.retrieve(framework="pytorch", region="eu-west-1", version=version,
                                                    instance_type=instance_type, image_scope="inference")
        assert f"pytorch-inference:{version}-{processor}-" in tgt.image_uri
    with pytest.raises(ValueError, match="ml.inf1.xlarge.*no default inference image.*set image_uri"):
        SageMakerTarget.from_config({"role_arn": ROLE, "bucket": BUCKET, "instance_type": "ml.inf1.xlarge"})


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
    with pytest.raises(SageMakerDeployError, match=r"not InService on new after 0.3 s \(status Creating\)"):
        wait_in_service(scripted(("Creating", "new")), "new", timeout_s=0.3, poll_s=0.05, log=lambda _: None)
    assert time.monotonic() - start < 5


def test_predict_asks_a_sagemaker_endpoint_by_name_and_prints_as_for_a_url(s3_endpoint, monkeypatch, capsys,
                                                                           tmp_path, synthetic_jpegs):
    """`bincount predict --endpoint-name` goes through InvokeEndpoint (moto answers what a test queues:
    it runs no model, so this checks the request, the answer's parsing and the output, not a model)."""
    from bincount.cli import main

    point_at(s3_endpoint, monkeypatch)
    photo = tmp_path / "bin.jpg"
    photo.write_bytes(synthetic_jpegs[3] + uuid.uuid4().bytes)  # a body moto has not cached an answer for
    prediction = {"count": 3, "probabilities": {"1": 0.1, "2": 0.2, "3": 0.7}, "run_id": "r"}
    queued = requests.post(f"{s3_endpoint}/moto-api/static/sagemaker/endpoint-results", timeout=10,
                           json={"results": [{"Body": json.dumps({"predictions": [prediction]}),
                                              "ContentType": "application/json"}]})
    assert queued.status_code == 201
    assert main(["predict", str(photo), "--endpoint-name", "bincount-prod", "--region", "us-east-1",
                 "--content-type", "application/json", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {str(photo): prediction}
    # moto's canned answer when nothing is queued is not a prediction: one line that says so
    photo.write_bytes(synthetic_jpegs[3] + uuid.uuid4().bytes)
    assert main(["predict", str(photo), "--endpoint-name", "bincount-prod", "--content-type",
                 "application/json"]) == 2
    assert capsys.readouterr().err.strip() == (
        "bincount: SageMaker endpoint bincount-prod answered, but not with a bincount prediction: b'body'")
    with pytest.raises(SystemExit):  # one or the other
        main(["predict", str(photo), "--endpoint-name", "a", "--endpoint", "http://127.0.0.1:1"])
