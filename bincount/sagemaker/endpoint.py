"""Deploying a packaged model to a SageMaker real-time endpoint (boto3 only).

The ``sagemaker`` target of the flow's deploy step::

    upload model.tar.gz -> CreateModel -> CreateEndpointConfig
        -> CreateEndpoint (new name) or UpdateEndpoint (existing name)
        -> wait for InService -> smoke-test through sagemaker-runtime

Every run gets its own Model and EndpointConfig; an existing endpoint is moved
to the new config with UpdateEndpoint, which SageMaker does without downtime
(and rolls back on failure), instead of being deleted and re-created. Old
models and configs are left in place, so going back is one UpdateEndpoint.

A deployment that fails once the endpoint has started to change (the wait
fails or times out, invoking fails, the smoke test disagrees) never stays in
production: an updated endpoint is moved back to its previous config and
waited for; a newly created one is deleted. Either way the error names the
failed config, what serves now and the cause. The failed Model and
EndpointConfig are kept: they cost nothing, show what was deployed, and
SageMaker advises against deleting a config while an endpoint operation on it
may still be running. If going back fails too, the error says so and gives
the AWS CLI command that finishes the job.

Settings come from a JSON file given to the flow as ``--config deploy PATH``
(see ``flows/deploy/sagemaker.example.json``); :meth:`SageMakerTarget.from_config`
checks it before anything is trained.

Data capture: with ``capture_s3_uri`` set, the endpoint config carries a
``DataCaptureConfig``: SageMaker then writes ``capture_percent`` % of the requests
(``capture_mode``: the requests, the answers, or both) under
``<capture_s3_uri>/<endpoint_name>/AllTraffic/yyyy/mm/dd/hh/``, JSON and CSV bodies as
text and photos as base64, the format the local endpoint's ``--capture-dir`` writes
(bincount.data.captures), which ``bincount monitor`` and the audit read.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import time
from dataclasses import field, fields
from datetime import datetime, timezone
from functools import partial
from typing import Annotated, Callable, Literal, Mapping

from pydantic import Field
from pydantic import dataclasses as checked

from bincount.aws.clients import default_region, session
from bincount.aws import containers
from bincount.aws.errors import AwsError, aws_call
from bincount.aws.settings import check_bucket_name, check_not_placeholder, check_role_arn
from bincount.data.captures import CSV_CONTENT_TYPES, JSON_CONTENT_TYPES
from bincount.model.metadata import ModelMeta
from bincount.serving.endpoint import EndpointError
from bincount.validation import STRICT, build

EXAMPLE_CONFIG = "flows/deploy/sagemaker.example.json"
REQUIRED_KEYS = ("role_arn", "bucket")

READ_TIMEOUT_S = 60  # an invocation of a cold endpoint can take a while

# SageMaker resource names: ^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}
NAME_MAX = 63
NAME_RE = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}$")

# What each capture_mode asks SageMaker to capture (DataCaptureConfig.CaptureOptions).
CAPTURE_OPTIONS = {"input": ["Input"], "output": ["Output"], "both": ["Input", "Output"]}
S3_URI_RE = re.compile(r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?$")

IN_PROGRESS = {"Creating", "Updating", "SystemUpdating", "RollingBack"}
FAILED = {"Failed", "UpdateRollbackFailed", "OutOfService", "Deleting"}


class SageMakerDeployError(EndpointError, AwsError):
    """Deployment to SageMaker failed; the message says where and what to do."""


# Checked for type and range when built (a pydantic dataclass); what the values mean, in from_config.
@checked.dataclass(frozen=True, config=STRICT)
class SageMakerTarget:
    role_arn: str
    bucket: str
    prefix: str = "bincount/models"
    endpoint_name: str = "bincount"
    instance_type: str = "ml.m5.large"
    instance_count: Annotated[int, Field(ge=1)] = 1
    image_uri: str = ""  # empty: the AWS PyTorch inference container for region and instance type
    framework_version: str = ""  # of that container; empty: the newest the SDK lists, not newer than torch here
    region: str = field(default_factory=default_region)
    wait_timeout_s: Annotated[float, Field(gt=0)] = 1800
    # image/jpeg is how clients call the endpoint; application/json sends the
    # same image base64-encoded ({"instances": [{"b64": ...}]}), which the
    # handler also accepts, for servers that cannot take binary bodies (moto).
    smoke_content_type: Literal["image/jpeg", "application/json"] = "image/jpeg"
    # Data capture (DataCaptureConfig): where (empty: off), what share of requests (SageMaker takes a
    # whole percentage), and which side of each: the request, the answer or both.
    capture_s3_uri: str = ""
    capture_percent: Annotated[int, Field(ge=0, le=100)] = 100
    capture_mode: Literal["input", "output", "both"] = "both"

    def __post_init__(self):
        if not NAME_RE.match(self.endpoint_name):
            raise ValueError(f"endpoint_name {self.endpoint_name!r}: up to {NAME_MAX} letters, digits and "
                             "hyphens, starting with a letter or digit")
        if self.capture_s3_uri and not S3_URI_RE.match(self.capture_s3_uri):
            raise ValueError(f"capture_s3_uri {self.capture_s3_uri!r}: expected s3://bucket/prefix, or empty for "
                             "no data capture")
        object.__setattr__(self, "capture_s3_uri", self.capture_s3_uri.rstrip("/"))
        if not self.image_uri:  # frozen: fill the default the only way allowed
            object.__setattr__(self, "image_uri", containers.image_uri("inference", self.region, self.instance_type,
                                                                       self.framework_version))
        object.__setattr__(self, "prefix", self.prefix.strip("/"))

    @classmethod
    def from_config(cls, config: Mapping) -> "SageMakerTarget":
        """Check a deploy config (a dict from JSON) and build the target; ValueError says what to fix."""
        config = {k: v for k, v in dict(config or {}).items() if v is not None}  # null: use the default
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(config) - set(known))
        if unknown:
            raise ValueError(f"unknown key(s) {unknown} in the SageMaker deploy config; known keys: {known}")
        missing = [k for k in REQUIRED_KEYS if not config.get(k)]
        if missing:
            raise ValueError(
                f"--deploy-target sagemaker needs {' and '.join(missing)} in the deploy config. Put them in a "
                f"JSON file (copy {EXAMPLE_CONFIG}) and pass it to the flow as `--config deploy PATH`.")
        for key, value in config.items():
            check_not_placeholder(value, f"{key} in the deploy config")
        target = build(cls, config, "the SageMaker deploy config")
        check_role_arn(target.role_arn, "role_arn")
        check_bucket_name(target.bucket, "prefix")
        return target


# --- names and clients ---------------------------------------------------------

def resource_name(endpoint_name: str, run_id: str, stamp: str | None = None) -> str:
    """A SageMaker-legal name for a run's Model and EndpointConfig: endpoint, run id, timestamp.

    The stamp makes names unique per deployment attempt, so a retried deploy
    step does not collide with the Model it created before failing. When the
    name is too long the endpoint part is cut first, then the run id's head
    (scheduler run ids keep their unique part at the end); never the stamp.
    """
    def clean(text: str) -> str:
        return re.sub(r"[^a-zA-Z0-9]+", "-", text).strip("-")

    stamp = stamp or datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S-%f")[:-3]
    run = clean(run_id)[-(NAME_MAX - len(stamp) - 2):].strip("-")  # leaves room for the hyphens
    room = NAME_MAX - len(stamp) - len(run) - 2
    head = clean(endpoint_name)[:room].strip("-") if room > 0 else ""
    return "-".join(part for part in (head, run, stamp) if part)


def make_clients(region: str) -> dict:
    """The deployment's boto3 clients, with bincount's bounded timeouts and retries."""
    aws = session(region, read_timeout_s=READ_TIMEOUT_S)
    return {name: aws.client(name) for name in ("s3", "sagemaker", "sagemaker-runtime")}


_aws_call = partial(aws_call, error_type=SageMakerDeployError)


# --- the steps -------------------------------------------------------------------

def upload_package(s3, package: bytes, bucket: str, key: str) -> str:
    _aws_call(f"uploading the model package to s3://{bucket}/{key}", s3.put_object,
              Bucket=bucket, Key=key, Body=package, ContentType="application/gzip")
    return f"s3://{bucket}/{key}"


def create_model(sagemaker, name: str, target: SageMakerTarget, model_data_url: str) -> None:
    # The PyTorch container runs code/inference.py from the extracted package;
    # SAGEMAKER_SUBMIT_DIRECTORY points it there instead of at an S3 source tarball.
    environment = {"SAGEMAKER_PROGRAM": "inference.py", "SAGEMAKER_SUBMIT_DIRECTORY": "/opt/ml/model/code",
                   "SAGEMAKER_CONTAINER_LOG_LEVEL": "20", "SAGEMAKER_REGION": target.region}
    _aws_call(f"creating SageMaker model {name}", sagemaker.create_model, ModelName=name,
              PrimaryContainer={"Image": target.image_uri, "ModelDataUrl": model_data_url,
                                "Environment": environment},
              ExecutionRoleArn=target.role_arn)


def data_capture_config(target: SageMakerTarget) -> dict | None:
    """CreateEndpointConfig's DataCaptureConfig for ``target``, or None when it captures nothing.

    The content-type header lists are bincount's JSON and CSV types, so SageMaker keeps those
    bodies as text (encoding JSON/CSV) and base64-encodes photos, as the local endpoint does.
    """
    if not target.capture_s3_uri:
        return None
    return {"EnableCapture": True, "InitialSamplingPercentage": target.capture_percent,
            "DestinationS3Uri": target.capture_s3_uri,
            "CaptureOptions": [{"CaptureMode": mode} for mode in CAPTURE_OPTIONS[target.capture_mode]],
            "CaptureContentTypeHeader": {"JsonContentTypes": list(JSON_CONTENT_TYPES),
                                         "CsvContentTypes": list(CSV_CONTENT_TYPES)}}


def create_endpoint_config(sagemaker, name: str, model_name: str, target: SageMakerTarget) -> None:
    capture = data_capture_config(target)
    _aws_call(f"creating endpoint config {name}", sagemaker.create_endpoint_config, EndpointConfigName=name,
              ProductionVariants=[{"VariantName": "AllTraffic", "ModelName": model_name,
                                   "InstanceType": target.instance_type,
                                   "InitialInstanceCount": target.instance_count}],
              **({"DataCaptureConfig": capture} if capture else {}))


def describe_endpoint(sagemaker, name: str) -> dict | None:
    """The endpoint's description, or None if there is no endpoint by that name."""
    from botocore.exceptions import ClientError

    try:
        return _aws_call(f"looking up endpoint {name}", sagemaker.describe_endpoint, EndpointName=name)
    except SageMakerDeployError as e:
        cause = e.__cause__
        # SageMaker answers ValidationException "Could not find endpoint" for a missing one.
        if isinstance(cause, ClientError) and "could not find" in str(cause).lower():
            return None
        raise


def create_or_update_endpoint(sagemaker, name: str, config_name: str) -> tuple[str, str | None]:
    """Point endpoint ``name`` at ``config_name``: ('created', None) or ('updated', the config it had)."""
    existing = describe_endpoint(sagemaker, name)
    if existing is None:
        _aws_call(f"creating endpoint {name}", sagemaker.create_endpoint, EndpointName=name,
                  EndpointConfigName=config_name)
        return "created", None
    try:
        _aws_call(f"updating endpoint {name} (now {existing.get('EndpointStatus')}, config "
                  f"{existing.get('EndpointConfigName')})", sagemaker.update_endpoint, EndpointName=name,
                  EndpointConfigName=config_name)
    except SageMakerDeployError as e:
        raise SageMakerDeployError(f"{e}. An endpoint that is still Creating/Updating cannot be updated: wait "
                                   "and deploy again; a Failed one must be deleted first "
                                   f"(aws sagemaker delete-endpoint --endpoint-name {name}).") from e.__cause__
    return "updated", existing.get("EndpointConfigName")


def wait_in_service(describe: Callable[[], dict], config_name: str, *, timeout_s: float, poll_s: float,
                    log: Callable[[str], None] = print) -> dict:
    """Poll until the endpoint serves ``config_name``; raise on failure or timeout.

    A failed *update* does not end in Failed: SageMaker rolls back and the
    endpoint is InService again on the previous config. So success means
    InService on the new config; InService on the old one after the update
    was seen in progress means it was rolled back.
    """
    deadline = time.monotonic() + timeout_s
    last_status, seen_progress = None, False
    while True:
        endpoint = describe()
        status, current = endpoint.get("EndpointStatus"), endpoint.get("EndpointConfigName")
        if status != last_status:
            log(f"endpoint {endpoint.get('EndpointName')}: {status}")
            last_status = status
        seen_progress |= status in IN_PROGRESS
        reason = endpoint.get("FailureReason") or "no FailureReason given"
        if status == "InService" and current == config_name:
            return endpoint
        if status in FAILED:
            raise SageMakerDeployError(f"endpoint {endpoint.get('EndpointName')} is {status}: {reason}. "
                                       f"Logs: CloudWatch /aws/sagemaker/Endpoints/{endpoint.get('EndpointName')}")
        if status == "InService" and seen_progress:
            raise SageMakerDeployError(f"the update of endpoint {endpoint.get('EndpointName')} to {config_name} "
                                       f"was rolled back; it still serves {current}: {reason}")
        if time.monotonic() >= deadline:
            raise SageMakerDeployError(f"endpoint {endpoint.get('EndpointName')} not InService on {config_name} "
                                       f"after {timeout_s:g} s (status {status})")
        time.sleep(poll_s)


def wait_settled(describe: Callable[[], dict], *, timeout_s: float, poll_s: float,
                 log: Callable[[str], None] = print) -> dict:
    """Poll until the endpoint is no longer Creating/Updating/...; raise on timeout.

    SageMaker refuses UpdateEndpoint and DeleteEndpoint while an operation is in
    progress ("Cannot update in-progress endpoint"), so undoing a deployment
    starts by waiting this out.
    """
    deadline = time.monotonic() + timeout_s
    last_status = None
    while True:
        endpoint = describe()
        status = endpoint.get("EndpointStatus")
        if status not in IN_PROGRESS:
            return endpoint
        if status != last_status:
            log(f"endpoint {endpoint.get('EndpointName')}: {status}, waiting for it to finish")
            last_status = status
        if time.monotonic() >= deadline:
            raise SageMakerDeployError(f"endpoint {endpoint.get('EndpointName')} still {status} on "
                                       f"{endpoint.get('EndpointConfigName')} after {timeout_s:g} s")
        time.sleep(poll_s)


def _request_body(raw: bytes, content_type: str) -> bytes:
    if content_type == "application/json":
        return json.dumps({"instances": [{"b64": base64.b64encode(raw).decode()}]}).encode()
    return raw


def _our_prediction(body: bytes) -> dict | None:
    """The first prediction if ``body`` is our handler's response JSON, else None."""
    try:
        prediction = json.loads(body)["predictions"][0]
        return prediction if {"count", "probabilities"} <= set(prediction) else None
    except (ValueError, KeyError, IndexError, TypeError):
        return None


def invoke_sagemaker(runtime, endpoint_name: str, raw: bytes, content_type: str = "image/jpeg") -> dict:
    """One photo to a SageMaker endpoint through InvokeEndpoint (``runtime``: a sagemaker-runtime
    client); its prediction, as ``bincount.serving.endpoint.invoke`` gives a local endpoint's.
    ``content_type`` application/json sends the photo base64 in our JSON request body."""
    response = _aws_call(f"invoking SageMaker endpoint {endpoint_name}", runtime.invoke_endpoint,
                         EndpointName=endpoint_name, Body=_request_body(raw, content_type),
                         ContentType=content_type, Accept="application/json")
    body = response["Body"].read()
    prediction = _our_prediction(body)
    if prediction is None:
        raise SageMakerDeployError(f"SageMaker endpoint {endpoint_name} answered, but not with a bincount "
                                   f"prediction: {body[:200]!r}")
    return prediction


def _compare(bin_id: str, answer: dict, want: dict) -> dict | None:
    """A mismatch record, or None when the endpoint agrees with the in-process prediction."""
    close = all(abs(answer["probabilities"].get(k, -1) - v) < 1e-3 for k, v in want["probabilities"].items())
    if answer["count"] == want["count"] and close:
        return None
    return {"id": bin_id, "endpoint": answer, "in_process": want}


def smoke_test_sagemaker(runtime, endpoint_name: str, images: Mapping[str, bytes], expected: Mapping[str, dict],
                         content_type: str = "image/jpeg") -> dict:
    """Invoke the endpoint once per image; compare answers that are our JSON with ``expected``.

    An answer that is not our response JSON (moto's canned body), or one with
    no expected prediction, is recorded as unverified rather than failing:
    the request worked, but nothing proves the model answered it.
    """
    import numpy as np

    latencies, verified, unverified, mismatches = [], [], [], []
    for bin_id, raw in images.items():
        t0 = time.perf_counter()
        response = _aws_call(f"invoking endpoint {endpoint_name} with {bin_id}", runtime.invoke_endpoint,
                             EndpointName=endpoint_name, Body=_request_body(raw, content_type),
                             ContentType=content_type, Accept="application/json")
        body = response["Body"].read()
        latencies.append((time.perf_counter() - t0) * 1000)
        answer = _our_prediction(body)
        if answer is None or bin_id not in expected:
            why = "no expected prediction" if answer else f"not our response JSON: {body[:80]!r}"
            unverified.append({"id": bin_id, "reason": why})
        elif (mismatch := _compare(bin_id, answer, expected[bin_id])) is not None:
            mismatches.append(mismatch)
        else:
            verified.append(bin_id)
    stats = {f"latency_ms_{k}": (float(f(latencies)) if latencies else None)
             for k, f in (("p50", lambda x: np.percentile(x, 50)), ("p95", lambda x: np.percentile(x, 95)),
                          ("mean", np.mean))}
    summary = (f"{len(verified)} of {len(latencies)} answers matched in-process predictions, "
               f"{len(mismatches)} disagreed, {len(unverified)} unverified")
    return {"requests": len(latencies), "content_type": content_type, "verified": verified,
            "unverified": unverified, "mismatches": mismatches, "summary": summary, **stats}


def check_smoke_test(endpoint_name: str, report: dict) -> None:
    """Raise when the endpoint's answers disagree with the in-process predictions."""
    if report["mismatches"]:
        raise SageMakerDeployError(f"the smoke test of endpoint {endpoint_name} failed: {report['summary']}; "
                                   f"first disagreements: {report['mismatches'][:3]}")


# --- undoing a failed deployment --------------------------------------------------

def restore_config(sagemaker, name: str, config_name: str, *, timeout_s: float, poll_s: float,
                   log: Callable[[str], None]) -> None:
    """Put endpoint ``name`` back on ``config_name`` and wait until it serves it again.

    ``timeout_s`` bounds each of the two waits: for an update still in
    progress to finish, and for the endpoint to be InService on ``config_name``.
    """
    def describe() -> dict:
        return _aws_call(f"looking up endpoint {name}", sagemaker.describe_endpoint, EndpointName=name)

    endpoint = wait_settled(describe, timeout_s=timeout_s, poll_s=poll_s, log=log)
    if endpoint.get("EndpointStatus") == "InService" and endpoint.get("EndpointConfigName") == config_name:
        log(f"endpoint {name} already serves {config_name} again (SageMaker rolled the update back)")
        return
    _aws_call(f"updating endpoint {name} back to {config_name}", sagemaker.update_endpoint, EndpointName=name,
              EndpointConfigName=config_name)
    wait_in_service(describe, config_name, timeout_s=timeout_s, poll_s=poll_s, log=log)


def roll_back(sagemaker, name: str, failed: str, previous: str, cause: Exception, *, timeout_s: float,
              poll_s: float, log: Callable[[str], None]) -> SageMakerDeployError:
    """Move endpoint ``name`` back to ``previous``; the error to raise says how that went."""
    log(f"deploying {failed} to endpoint {name} failed ({cause}); rolling back to {previous}")
    try:
        restore_config(sagemaker, name, previous, timeout_s=timeout_s, poll_s=poll_s, log=log)
    except Exception as failure:  # whatever went wrong, the message must say what serves and how to fix it
        return SageMakerDeployError(
            f"deploying endpoint config {failed} to endpoint {name} failed: {cause}. Rolling back to the previous "
            f"endpoint config {previous} failed too: {failure}. The endpoint may still serve {failed}. Restore it "
            f"once it is no longer Creating/Updating (aws sagemaker describe-endpoint --endpoint-name {name}): "
            f"aws sagemaker update-endpoint --endpoint-name {name} --endpoint-config-name {previous}")
    return SageMakerDeployError(
        f"deploying endpoint config {failed} to endpoint {name} failed: {cause}. Rolled back: endpoint {name} is "
        f"InService on its previous endpoint config {previous} again. Model and endpoint config {failed} are kept "
        "for inspection.")


def remove_new_endpoint(sagemaker, name: str, failed: str, cause: Exception, *, timeout_s: float, poll_s: float,
                        log: Callable[[str], None]) -> SageMakerDeployError:
    """Delete endpoint ``name``, created by a deployment that failed; the error to raise says how that went.

    It had never served anything else, so there is nothing to go back to, and
    a Failed or unchecked endpoint left in place costs money and blocks the
    next deployment (a Failed endpoint cannot be updated).
    """
    log(f"creating endpoint {name} with {failed} failed ({cause}); deleting the endpoint")
    kept = (f"Model and endpoint config {failed} are kept for inspection (aws sagemaker delete-endpoint-config "
            f"--endpoint-config-name {failed}; aws sagemaker delete-model --model-name {failed}).")
    try:
        wait_settled(lambda: _aws_call(f"looking up endpoint {name}", sagemaker.describe_endpoint, EndpointName=name),
                     timeout_s=timeout_s, poll_s=poll_s, log=log)
        _aws_call(f"deleting endpoint {name}", sagemaker.delete_endpoint, EndpointName=name)
    except Exception as failure:  # whatever went wrong, the message must say what is left and how to remove it
        return SageMakerDeployError(
            f"creating endpoint {name} with endpoint config {failed} failed: {cause}. Deleting the new endpoint "
            f"failed too: {failure}. It may still be running and costing money: once it is no longer Creating "
            f"(aws sagemaker describe-endpoint --endpoint-name {name}), delete it: "
            f"aws sagemaker delete-endpoint --endpoint-name {name}. {kept}")
    return SageMakerDeployError(
        f"creating endpoint {name} with endpoint config {failed} failed: {cause}. The new endpoint {name} was "
        f"deleted (it served nothing before). {kept}")


# --- the whole deployment -----------------------------------------------------

def deploy_to_sagemaker(package: bytes, meta: ModelMeta | dict, target: SageMakerTarget, *,
                        smoke_images: Mapping[str, bytes] | None = None, expected: Mapping[str, dict] | None = None,
                        sagemaker_client=None, s3_client=None, runtime_client=None, poll_s: float = 15,
                        rollback_timeout_s: float | None = None, log: Callable[[str], None] = print) -> dict:
    """Upload ``package``, serve it from ``target.endpoint_name``, smoke-test it; return a report.

    Any failure once the endpoint has started to change, a smoke test that
    disagrees with ``expected`` included, undoes the change (see the module
    docstring) and raises SageMakerDeployError. ``rollback_timeout_s``
    (default ``target.wait_timeout_s``) bounds each wait of the undoing.
    """
    run_id = str(ModelMeta.from_dict(meta).run_id or "")
    if not run_id:
        raise ValueError("meta has no run_id: it names the S3 key, the model and the endpoint config")
    clients = make_clients(target.region) if None in (sagemaker_client, s3_client, runtime_client) else {}
    sagemaker = sagemaker_client or clients["sagemaker"]
    s3 = s3_client or clients["s3"]
    runtime = runtime_client or clients["sagemaker-runtime"]

    key = f"{target.prefix}/{run_id}/model.tar.gz" if target.prefix else f"{run_id}/model.tar.gz"
    model_data_url = upload_package(s3, package, target.bucket, key)
    log(f"uploaded {len(package)} bytes to {model_data_url}")
    name = resource_name(target.endpoint_name, run_id)  # the Model and its EndpointConfig share it
    create_model(sagemaker, name, target, model_data_url)
    create_endpoint_config(sagemaker, name, name, target)
    action, previous = create_or_update_endpoint(sagemaker, target.endpoint_name, name)
    log(f"{'creating' if action == 'created' else 'updating'} endpoint {target.endpoint_name} with {name}")
    try:
        endpoint, report = _serve_and_check(sagemaker, runtime, target, name, smoke_images or {}, expected or {},
                                            poll_s=poll_s, log=log)
    except Exception as cause:  # any failure from here on: the endpoint must not keep serving `name`
        undo = dict(timeout_s=rollback_timeout_s or target.wait_timeout_s, poll_s=poll_s, log=log)
        if action == "updated":
            raise roll_back(sagemaker, target.endpoint_name, name, previous, cause, **undo) from cause
        raise remove_new_endpoint(sagemaker, target.endpoint_name, name, cause, **undo) from cause
    return {"target": "sagemaker", "endpoint_name": target.endpoint_name, "endpoint_arn": endpoint["EndpointArn"],
            "model_name": name, "endpoint_config_name": name, "model_data_url": model_data_url,
            "package_sha256": hashlib.sha256(package).hexdigest(), "package_bytes": len(package),
            # Going back: aws sagemaker update-endpoint --endpoint-config-name <previous>
            "action": action, "previous_endpoint_config_name": previous, "region": target.region,
            "image_uri": target.image_uri, "instance_type": target.instance_type,
            "instance_count": target.instance_count,
            # where `bincount monitor --capture` finds this endpoint's traffic (None: not captured)
            "capture": (f"{target.capture_s3_uri}/{target.endpoint_name}" if target.capture_s3_uri else None),
            "smoke_test": report}


def _serve_and_check(sagemaker, runtime, target: SageMakerTarget, config_name: str, images: Mapping[str, bytes],
                     expected: Mapping[str, dict], *, poll_s: float, log: Callable[[str], None]) -> tuple[dict, dict]:
    """Wait until the endpoint serves ``config_name``, smoke-test it; (its description, the smoke report)."""
    name = target.endpoint_name
    endpoint = wait_in_service(
        lambda: _aws_call(f"waiting for endpoint {name}", sagemaker.describe_endpoint, EndpointName=name),
        config_name, timeout_s=target.wait_timeout_s, poll_s=poll_s, log=log)
    report = smoke_test_sagemaker(runtime, name, images, expected, target.smoke_content_type)
    log(f"smoke test of {name}: {report['summary']}")
    check_smoke_test(name, report)
    return endpoint, report
