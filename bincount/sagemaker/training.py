"""Train one grid point as a SageMaker training job (SageMaker Python SDK v3 ``ModelTrainer``).

The ``sagemaker`` engine of the train step (see bincount.flow.compute)::

    write the branch's channel (train + val photos, split.csv) -> upload it to S3
    -> ModelTrainer: bincount's source with a train.py entry script, the PyTorch
       training container, instances (spot optional), hyperparameters, the channel
    -> wait: print each status change and the job's log lines, give up at the limit
    -> download model.tar.gz, unpack it, load the TrainResult

Everything the job needs travels through S3: the photos come from the flow's
artifacts (not from any disk), and bincount's code is copied from the installed
package into the job's ``code`` channel with a ``requirements.txt`` of the few
packages the AWS PyTorch container lacks (torch itself is the container's: a
second torch would be gigabytes and could mismatch its CUDA).

S3 layout, one folder per branch (``<base>`` is the cleaned ``job_prefix``)::

    s3://<bucket>/<s3_prefix>/<base>/input/train/split.csv, shards/shard-NNNNNN.tar   (shards/: see below)
    s3://<bucket>/<s3_prefix>/<base>/<job name>/input/code/         bincount/, train.py, requirements.txt
    s3://<bucket>/<s3_prefix>/<base>/<job name>/input/sm_drivers/   the SDK's container drivers
    s3://<bucket>/<s3_prefix>/<base>/<job name>/output/model.tar.gz

Where the run's shards already sit in S3 (``--datastore s3``), nothing of them is
uploaded again: the train channel holds only ``split.csv`` and the job reads the run's
shard prefix as a second channel, ``shards`` (so the job's role needs read access to the
datastore's bucket). With the local datastore the branch's train and validation photos
are written into new shards under ``input/train/shards/`` and uploaded once.

Settings come from the ``sagemaker`` block of the compute config;
:func:`settings_from_config` checks them before anything is trained.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import tarfile
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from functools import partial
from pathlib import Path
from typing import Annotated, Callable, Literal, Mapping

from pydantic import Field
from pydantic import dataclasses as checked

from bincount.aws.clients import default_region, session
from bincount.aws import containers
from bincount.aws.containers import TRAINING_REQUIREMENTS as CONTAINER_REQUIREMENTS
from bincount.aws.containers import requirements_txt
from bincount.aws.errors import AwsError, aws_call
from bincount.aws.settings import check_bucket_name, check_not_placeholder, check_role_arn
from bincount.model.grid import TrainConfig
from bincount.model.train import TrainResult
from bincount.sagemaker.training_job import (CHANNEL, CHECKPOINT_DIR_ENV, CHECKPOINT_LOCAL_PATH, SHARDS_CHANNEL,
                                             TrainingJobError, encode_hyperparameters, load_result, write_channel)
from bincount.serving.package import extract_archive
from bincount.validation import STRICT, build

READ_TIMEOUT_S = 60
UPLOAD_WORKERS = 16

ENTRY_SCRIPT = "train.py"
ENTRY_SCRIPT_TEXT = '''"""SageMaker runs this file; the training code is the bincount package beside it."""
import sys

from bincount.sagemaker.training_job import main

sys.exit(main())
'''

# SageMaker names: ^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}. The SDK appends -YYYYmmddHHMMSS
# (15 characters) to the base name and cuts at 63, so the base keeps to 48.
NAME_BASE_MAX = 48
MAX_RUNTIME_LIMIT_S = 28 * 24 * 3600  # SageMaker's own ceiling
# How long after MaxRuntime (or MaxWait for spot) the launcher still waits: SageMaker
# stops the job itself at its limit, but provisioning, downloading the data and
# uploading the model are not counted in it.
WAIT_MARGIN_S = 3600
DESCRIBE_FAILURES_TOLERATED = 5  # consecutive; a network blip must not abandon a running job
TERMINAL = {"Completed", "Failed", "Stopped"}
EXAMPLE_KEYS_HINT = "the 'sagemaker' block of the compute config"


class SageMakerTrainingError(AwsError):
    """A SageMaker training job could not be launched, failed, or left no usable model."""


# --- settings ----------------------------------------------------------------------------

# Checked for type when built (a pydantic dataclass: "true" is not a bool, 1.5 not a count);
# the values' meaning in _check_values.
@checked.dataclass(frozen=True, config=STRICT)
class SageMakerTrainingSettings:
    role: str  # the IAM role the job runs as (arn:aws:iam::<account>:role/<name>)
    bucket: str  # channel data, code and model.tar.gz go here
    s3_prefix: str = "bincount/training"
    region: str = field(default_factory=default_region)
    instance_type: str = "ml.g5.xlarge"
    instance_count: Annotated[int, Field(ge=1)] = 1
    image_uri: str = ""  # empty: the AWS PyTorch training container for region and instance type
    framework_version: str = ""  # of that container; empty: the newest the SDK lists, not newer than torch here
    distributed: Literal["auto", "torchrun", "none"] = "auto"  # auto: torchrun when instance_count > 1;
    # torchrun: also one multi-GPU instance
    use_spot: bool = False
    max_runtime_s: Annotated[int, Field(ge=1, le=MAX_RUNTIME_LIMIT_S)] = 4 * 3600
    max_wait_s: int | None = None  # spot only (runtime plus waiting for capacity); default 2 x max_runtime_s
    volume_size_gb: Annotated[int, Field(ge=1)] = 30
    install_requirements: bool = True  # pip install requirements.txt in the container (needs PyPI access)
    stream_logs: bool = True  # print the job's CloudWatch log lines while waiting

    def __post_init__(self):  # frozen: fill the defaults the only way allowed
        if not re.match(r"^ml\.[a-z0-9-]+\.[a-z0-9]+$", self.instance_type):
            raise ValueError(f"instance_type {self.instance_type!r} is not a SageMaker instance type "
                             "(like ml.g5.xlarge)")
        if not self.image_uri:
            object.__setattr__(self, "image_uri", containers.image_uri("training", self.region, self.instance_type,
                                                                       self.framework_version))
        if self.use_spot and self.max_wait_s is None:
            object.__setattr__(self, "max_wait_s", min(2 * self.max_runtime_s, MAX_RUNTIME_LIMIT_S))
        object.__setattr__(self, "s3_prefix", self.s3_prefix.strip("/"))

    @property
    def torchrun(self) -> bool:
        return self.distributed == "torchrun" or (self.distributed == "auto" and self.instance_count > 1)

    @property
    def wait_limit_s(self) -> int:
        """How long the launcher waits for the job before stopping it."""
        return (self.max_wait_s if self.use_spot else self.max_runtime_s) + WAIT_MARGIN_S


def settings_from_config(config: Mapping | SageMakerTrainingSettings | None) -> SageMakerTrainingSettings:
    """Check the SageMaker training settings (a dict from JSON) and build them; ValueError says what to fix."""
    if isinstance(config, SageMakerTrainingSettings):
        return config
    config = {k: v for k, v in dict(config or {}).items() if v is not None}  # null: use the default
    unknown = sorted(set(config) - {f.name for f in fields(SageMakerTrainingSettings)})
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in the SageMaker training settings; known keys: "
                         f"{[f.name for f in fields(SageMakerTrainingSettings)]}")
    missing = [k for k in ("role", "bucket") if not config.get(k)]
    if missing:
        raise ValueError(f"SageMaker training needs {' and '.join(missing)} in {EXAMPLE_KEYS_HINT}")
    for key, value in config.items():
        check_not_placeholder(value, f"SageMaker training setting {key}")
    settings = build(SageMakerTrainingSettings, config, "SageMaker training settings")
    _check_values(config)
    return settings


def _check_values(config: dict) -> None:
    """Catch mistakes here, before anything trains, rather than in the SageMaker API after it."""
    check_role_arn(config["role"], "role")
    check_bucket_name(config["bucket"], "s3_prefix")
    if config.get("distributed") == "none" and config.get("instance_count", 1) > 1:
        raise ValueError("instance_count > 1 with distributed 'none' would train the same model on every "
                         "instance; use distributed 'auto' or 'torchrun'")
    runtime = config.get("max_runtime_s", SageMakerTrainingSettings.max_runtime_s)
    if "max_wait_s" in config:
        if not config.get("use_spot"):
            raise ValueError("max_wait_s applies only to spot training: set use_spot true, or drop max_wait_s")
        if not runtime <= config["max_wait_s"] <= MAX_RUNTIME_LIMIT_S:
            raise ValueError(f"max_wait_s must be at least max_runtime_s ({runtime}) and at most "
                             f"{MAX_RUNTIME_LIMIT_S}, got {config['max_wait_s']}")


# --- AWS plumbing ----------------------------------------------------------------------------

def aws_session(region: str):
    """A boto3 session for the job; the SDK's clients from it get its timeouts and a
    connection pool as large as the upload's workers."""
    return session(region, read_timeout_s=READ_TIMEOUT_S, max_pool_connections=UPLOAD_WORKERS)


_aws_call = partial(aws_call, error_type=SageMakerTrainingError)


def split_s3_uri(uri: str) -> tuple[str, str]:
    match = re.match(r"^s3://([^/]+)/(.+)$", uri)
    if not match:
        raise SageMakerTrainingError(f"not an s3://bucket/key URI: {uri!r}")
    return match.group(1), match.group(2)


def upload_folder(s3, folder: Path, bucket: str, prefix: str, *, workers: int = UPLOAD_WORKERS) -> str:
    """Put every file under ``folder`` at s3://bucket/prefix/<relative path>, in parallel;
    return the prefix's URI (with a trailing slash: SageMaker's S3Prefix channel)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())

    def put(path: Path) -> None:
        key = f"{prefix}/{path.relative_to(folder).as_posix()}"
        _aws_call(f"uploading s3://{bucket}/{key}", s3.put_object, Bucket=bucket, Key=key, Body=path.read_bytes())

    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(put, path) for path in files]
        try:
            for future in as_completed(futures):
                future.result()
        except BaseException:
            # Fail fast: an unreachable S3 would otherwise time out once per remaining file.
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    return f"s3://{bucket}/{prefix}/"


def shards_in_s3(photos: Mapping[str, bytes]) -> str | None:
    """The S3 prefix (with a trailing slash: an S3Prefix channel matches keys by prefix, and
    run 12's must not take run 120's) of ``photos`` that already sit in shards there; else None."""
    from bincount.data.shards import Photos

    if isinstance(photos, Photos) and photos.shards.on_s3:
        return photos.shards.root.rstrip("/") + "/"
    return None


def job_base_name(job_prefix: str) -> str:
    """A SageMaker-legal base for the job's name that leaves room for the SDK's timestamp.
    Too long: its head and a hash of the whole, so two long prefixes stay distinct."""
    clean = re.sub(r"[^a-zA-Z0-9]+", "-", job_prefix).strip("-") or "bincount"
    if len(clean) <= NAME_BASE_MAX:
        return clean
    digest = hashlib.sha256(clean.encode()).hexdigest()[:8]
    return f"{clean[:NAME_BASE_MAX - 9].rstrip('-')}-{digest}"


# --- the job ---------------------------------------------------------------------------------

def build_source_dir(dest: Path, *, install_requirements: bool = True) -> Path:
    """What the job's ``code`` channel holds: the installed bincount package (Python files
    only), the entry script, and requirements.txt. Copied from the package this process
    imports, so it is the code of this run, wherever the step runs."""
    from bincount.serving.package import library_files

    for name, path in library_files():
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dest / name)
    (dest / ENTRY_SCRIPT).write_text(ENTRY_SCRIPT_TEXT)
    if install_requirements:
        (dest / "requirements.txt").write_text(requirements_txt(CONTAINER_REQUIREMENTS))
    return dest


@dataclass
class LaunchedJob:
    name: str
    channel_uri: str
    shards_uri: str | None  # the run's own shard prefix, where the job read it in place; None: in channel_uri
    checkpoint_uri: str  # where the job checkpoints each epoch (SageMaker's checkpoint_s3_uri)
    output_path: str
    settings: SageMakerTrainingSettings


@dataclass
class TrainingJobOutcome:
    result: TrainResult
    job_name: str
    job_arn: str
    model_artifacts: str
    channel_uri: str
    training_seconds: int | None  # what SageMaker counted; billable is less with spot
    billable_seconds: int | None

    def describe(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "result"}


def make_trainer(settings: SageMakerTrainingSettings, session, *, base: str, branch: str, source_dir: Path,
                 hyperparameters: dict[str, str], checkpoint_uri: str | None):
    """The ModelTrainer for one branch (nothing is sent until ``train``). ``checkpoint_uri`` None: no
    checkpoints (a tuning job's trials share one job definition, so they could only share one folder)."""
    from sagemaker.core.helper.session_helper import Session
    from sagemaker.core.training.configs import (CheckpointConfig, Compute, OutputDataConfig, SourceCode,
                                                 StoppingCondition)
    from sagemaker.train import ModelTrainer
    from sagemaker.train.distributed import Torchrun

    stopping = {"max_runtime_in_seconds": settings.max_runtime_s}
    if settings.use_spot:
        stopping["max_wait_time_in_seconds"] = settings.max_wait_s
    return ModelTrainer(
        sagemaker_session=Session(boto_session=session, default_bucket=settings.bucket),
        role=settings.role,
        base_job_name=base,
        # The SDK stages code and its drivers at <input_s3_key_prefix>/<job name>/input/: the branch's folder.
        input_s3_key_prefix=branch,
        training_image=settings.image_uri,
        source_code=SourceCode(source_dir=str(source_dir), entry_script=ENTRY_SCRIPT,
                               requirements="requirements.txt" if settings.install_requirements else None),
        distributed=Torchrun() if settings.torchrun else None,
        compute=Compute(instance_type=settings.instance_type, instance_count=settings.instance_count,
                        volume_size_in_gb=settings.volume_size_gb,
                        enable_managed_spot_training=settings.use_spot),
        stopping_condition=StoppingCondition(**stopping),
        output_data_config=OutputDataConfig(s3_output_path=f"s3://{settings.bucket}/{branch}",
                                            compression_type="GZIP"),
        hyperparameters=hyperparameters,
        # SageMaker copies checkpoint_uri into local_path when a job (re)starts, and what is
        # written there back to S3: a job restarted after a spot interruption goes on from its
        # last epoch. The entry point learns the folder from the environment.
        checkpoint_config=CheckpointConfig(s3_uri=checkpoint_uri, local_path=CHECKPOINT_LOCAL_PATH)
        if checkpoint_uri else None,
        environment={"PYTHONUNBUFFERED": "1",  # log lines reach CloudWatch as they are printed
                     **({CHECKPOINT_DIR_ENV: CHECKPOINT_LOCAL_PATH} if checkpoint_uri else {})},
    )


def job_checkpoints(checkpoints, settings: SageMakerTrainingSettings, branch: str,
                    log: Callable[[str], None] = print) -> str:
    """The S3 folder the job checkpoints to: the flow's own checkpoint folder where that is on S3
    (the S3 datastore), else one beside the branch's channel. Both stay the same when the train
    step is retried, so a retried job goes on from the last epoch; where the flow's checkpoints
    hold a state the job's folder lacks (a ``resume``, or a retry that trained locally), it is
    copied there first, so that the job starts from it."""
    from bincount.data.blobs import is_s3, join, read_blob, write_blob
    from bincount.model.checkpoint import CHECKPOINT_FILE

    uri = checkpoints.folder if checkpoints is not None and is_s3(checkpoints.folder) else \
        f"s3://{settings.bucket}/{branch}/checkpoints"
    if checkpoints is not None and read_blob(join(uri, CHECKPOINT_FILE)) is None:
        for folder in (checkpoints.folder, checkpoints.resume_from):
            raw = read_blob(join(folder, CHECKPOINT_FILE)) if folder and folder != uri else None
            if raw is not None:
                write_blob(join(uri, CHECKPOINT_FILE), raw)
                log(f"the job starts from the checkpoint in {folder}")
                break
    return uri


@dataclass
class StagedJob:
    """A branch's channel in S3 and the ModelTrainer that will train on it (bincount's code staged)."""

    trainer: object  # sagemaker.train.ModelTrainer
    inputs: list  # its InputData channels
    base: str  # the cleaned job_prefix: the jobs' base name
    channel_uri: str
    shards_uri: str | None
    checkpoint_uri: str | None


@contextmanager
def staged_job(cfg: TrainConfig, photos: Mapping[str, bytes], split_table, classes: list[int], *, seed: int,
               settings: SageMakerTrainingSettings, job_prefix: str, session, cache_bytes: int | None = None,
               checkpoints=None, checkpointed: bool = True, log: Callable[[str], None] = print):
    """Upload the branch's channel and build its ModelTrainer with ``cfg`` as the hyperparameters; the
    staged code lives as long as the block, in which the trainer (or a tuner over it) must start its job.
    ``checkpointed`` False: no checkpoint folder (a tuning job's trials share one job definition)."""
    from sagemaker.core.training.configs import InputData

    base = job_base_name(job_prefix)
    branch = f"{settings.s3_prefix}/{base}" if settings.s3_prefix else base
    shards_uri = shards_in_s3(photos)
    checkpoint_uri = job_checkpoints(checkpoints, settings, branch, log) if checkpointed else None
    with tempfile.TemporaryDirectory(prefix="bincount-sagemaker-") as tmp:
        channel = write_channel(photos, split_table, Path(tmp) / "channel", copy_shards=shards_uri is None)
        count = sum(1 for p in channel.rglob("*") if p.is_file())
        channel_uri = upload_folder(session.client("s3"), channel, settings.bucket, f"{branch}/input/{CHANNEL}")
        log(f"uploaded the {cfg.name} channel ({count} files) to {channel_uri}"
            + (f"; the job reads the run's shards where they are, {shards_uri}" if shards_uri else ""))
        inputs = [InputData(channel_name=CHANNEL, data_source=channel_uri)]
        if shards_uri:
            inputs.append(InputData(channel_name=SHARDS_CHANNEL, data_source=shards_uri))
        trainer = make_trainer(settings, session, base=base, branch=branch,
                               source_dir=build_source_dir(Path(tmp) / "code",
                                                           install_requirements=settings.install_requirements),
                               hyperparameters=encode_hyperparameters(cfg, seed=seed, classes=classes,
                                                                      cache_bytes=cache_bytes),
                               checkpoint_uri=checkpoint_uri)
        yield StagedJob(trainer=trainer, inputs=inputs, base=base, channel_uri=channel_uri, shards_uri=shards_uri,
                        checkpoint_uri=checkpoint_uri)


def launch_training_job(cfg: TrainConfig, photos: Mapping[str, bytes], split_table, classes: list[int], *,
                        seed: int, settings: SageMakerTrainingSettings, job_prefix: str, session=None,
                        cache_bytes: int | None = None, checkpoints=None,
                        log: Callable[[str], None] = print) -> LaunchedJob:
    """Upload the branch's channel and start its training job; return at once. ``checkpoints``
    (bincount.model.checkpoint.Checkpoints): the flow's for this grid point (see job_checkpoints)."""
    session = session or aws_session(settings.region)
    with staged_job(cfg, photos, split_table, classes, seed=seed, settings=settings, job_prefix=job_prefix,
                    session=session, cache_bytes=cache_bytes, checkpoints=checkpoints, log=log) as staged:
        trainer = staged.trainer
        # wait=False: the launcher waits itself, with a limit (the SDK's wait has none)
        _aws_call(f"creating the training job for {cfg.name}", trainer.train,
                  input_data_config=staged.inputs, wait=False, logs=False)
    job = trainer._latest_training_job  # the SDK's handle; its own docs read it this way
    if job is None:
        raise SageMakerTrainingError(f"ModelTrainer.train returned without a training job for {cfg.name}")
    log(f"started SageMaker training job {job.training_job_name} ({settings.instance_count} x "
        f"{settings.instance_type}{', spot' if settings.use_spot else ''}, image {settings.image_uri})")
    branch = f"{settings.s3_prefix}/{staged.base}" if settings.s3_prefix else staged.base
    return LaunchedJob(name=job.training_job_name, channel_uri=staged.channel_uri, shards_uri=staged.shards_uri,
                       checkpoint_uri=staged.checkpoint_uri, output_path=f"s3://{settings.bucket}/{branch}",
                       settings=settings)


class LogTail:
    """Print the job's CloudWatch log lines as they arrive (/aws/sagemaker/TrainingJobs,
    one stream per instance). Logs are a convenience: if they cannot be read (no
    permission), say so once and carry on."""

    GROUP = "/aws/sagemaker/TrainingJobs"
    MAX_PAGES = 20  # per stream per poll, so a chatty job cannot stall the status checks

    def __init__(self, logs_client, job_name: str, log: Callable[[str], None]):
        self.client, self.job_name, self.log = logs_client, job_name, log
        self.tokens: dict[str, str | None] = {}
        self.enabled = True

    def poll(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        if not self.enabled:
            return
        try:
            streams = self.client.describe_log_streams(logGroupName=self.GROUP,
                                                       logStreamNamePrefix=f"{self.job_name}/")["logStreams"]
            for stream in streams:
                self._read(stream["logStreamName"])
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") != "ResourceNotFoundException":  # no logs yet
                self._give_up(e)
        except BotoCoreError as e:
            self._give_up(e)

    def _read(self, stream: str) -> None:
        for _ in range(self.MAX_PAGES):
            token = self.tokens.get(stream)
            page = self.client.get_log_events(logGroupName=self.GROUP, logStreamName=stream, startFromHead=True,
                                              **({"nextToken": token} if token else {}))
            for event in page["events"]:
                self.log(f"[{stream.split('/', 1)[-1]}] {event['message'].rstrip()}")
            self.tokens[stream] = page.get("nextForwardToken")
            if not page["events"] or page.get("nextForwardToken") == token:
                return

    def _give_up(self, error: Exception) -> None:
        self.enabled = False
        self.log(f"not streaming the job's logs ({error}); they are in CloudWatch {self.GROUP}/{self.job_name}/")


def _status_line(job: dict) -> str:
    transitions = job.get("SecondaryStatusTransitions") or [{}]
    message = transitions[-1].get("StatusMessage")
    return (f"training job {job.get('TrainingJobName')}: {job.get('TrainingJobStatus')} "
            f"({job.get('SecondaryStatus')})" + (f": {message}" if message else ""))


def wait_for_job(describe: Callable[[], dict], *, timeout_s: float, poll_s: float,
                 log: Callable[[str], None] = print, on_poll: Callable[[], None] | None = None,
                 stop: Callable[[], None] | None = None) -> dict:
    """Poll until the job completes; print each change of status. Raise with the job's
    FailureReason if it fails or is stopped, and stop it (``stop``) if it outlives
    ``timeout_s`` or the wait is interrupted."""
    deadline = time.monotonic() + timeout_s
    last, failures = None, 0
    try:
        while True:
            try:
                job = describe()
                failures = 0
            except SageMakerTrainingError as e:
                failures += 1
                if failures > DESCRIBE_FAILURES_TOLERATED:
                    raise SageMakerTrainingError(f"{e} ({failures} times in a row); the job may still be "
                                                 "running: check the SageMaker console") from e
                log(f"could not check the job ({e}); trying again")
                job = None
            if job is not None:
                state = (job.get("TrainingJobStatus"), job.get("SecondaryStatus"))
                if state != last:
                    log(_status_line(job))
                    last = state
                if on_poll:
                    on_poll()
                if state[0] in TERMINAL:
                    return _finished(job)
            if time.monotonic() >= deadline:
                if stop:
                    stop()
                raise SageMakerTrainingError(f"training job still {last[0] if last else 'unknown'} after "
                                             f"{timeout_s:.0f} s (MaxRuntime/MaxWait plus {WAIT_MARGIN_S} s); "
                                             "asked SageMaker to stop it")
            time.sleep(poll_s)
    except KeyboardInterrupt:
        if stop:
            stop()
        raise


def _finished(job: dict) -> dict:
    name, status = job.get("TrainingJobName"), job.get("TrainingJobStatus")
    if status == "Completed":
        return job
    reason = job.get("FailureReason") or "no FailureReason given"
    raise SageMakerTrainingError(
        f"training job {name} {status} ({job.get('SecondaryStatus')}): {reason}. "
        f"Logs: CloudWatch {LogTail.GROUP}, streams {name}/*")


def collect_result(s3, model_artifacts: str, *, job_name: str = "") -> TrainResult:
    """Download the job's model.tar.gz, unpack it and load the TrainResult it holds."""
    bucket, key = split_s3_uri(model_artifacts)
    with tempfile.TemporaryDirectory(prefix="bincount-model-") as tmp:
        archive = Path(tmp) / "model.tar.gz"
        response = _aws_call(f"downloading {model_artifacts} (the model of training job {job_name})",
                             s3.get_object, Bucket=bucket, Key=key)
        with open(archive, "wb") as handle:
            for chunk in response["Body"].iter_chunks(1 << 20):
                handle.write(chunk)
        try:
            extract_archive(archive, Path(tmp) / "model")
            return load_result(Path(tmp) / "model")
        except (tarfile.TarError, TrainingJobError) as e:
            raise SageMakerTrainingError(f"{model_artifacts} of training job {job_name} holds no usable "
                                         f"bincount model: {e}") from e


def finish_training_job(launched: LaunchedJob, *, session=None, poll_s: float = 30,
                        log: Callable[[str], None] = print) -> TrainingJobOutcome:
    """Wait for a launched job (printing its status and logs) and bring its model back."""
    session = session or aws_session(launched.settings.region)
    sagemaker, s3 = session.client("sagemaker"), session.client("s3")
    name = launched.name
    tail = LogTail(session.client("logs"), name, log) if launched.settings.stream_logs else None

    def stop() -> None:
        try:
            _aws_call(f"stopping training job {name}", sagemaker.stop_training_job, TrainingJobName=name)
            log(f"asked SageMaker to stop training job {name}")
        except SageMakerTrainingError as e:
            log(f"could not stop training job {name} ({e}): stop it in the SageMaker console")

    job = wait_for_job(lambda: _aws_call(f"checking training job {name}", sagemaker.describe_training_job,
                                         TrainingJobName=name),
                       timeout_s=launched.settings.wait_limit_s, poll_s=poll_s, log=log,
                       on_poll=tail.poll if tail else None, stop=stop)
    if tail:
        tail.poll()  # the last lines, written after the final status change
    artifacts = (job.get("ModelArtifacts") or {}).get("S3ModelArtifacts")
    if not artifacts:
        raise SageMakerTrainingError(f"training job {name} completed without model artifacts")
    result = collect_result(s3, artifacts, job_name=name)
    log(f"training job {name}: best epoch {result.best_epoch}, val accuracy {result.val_accuracy:.3f} "
        f"(billable {job.get('BillableTimeInSeconds')} s of {job.get('TrainingTimeInSeconds')} s)")
    return TrainingJobOutcome(result=result, job_name=name, job_arn=job.get("TrainingJobArn", ""),
                              model_artifacts=artifacts, channel_uri=launched.channel_uri,
                              training_seconds=job.get("TrainingTimeInSeconds"),
                              billable_seconds=job.get("BillableTimeInSeconds"))


def adopt_training_job(job_name: str, settings, *, session=None, poll_s: float = 30,
                       log: Callable[[str], None] = print) -> TrainingJobOutcome:
    """A training job someone else started (a tuning job's trial): wait for it if it still runs, and
    bring its model back as :func:`finish_training_job` does for a job of our own."""
    settings = settings_from_config(settings)
    session = session or aws_session(settings.region)
    job = _aws_call(f"checking training job {job_name}", session.client("sagemaker").describe_training_job,
                    TrainingJobName=job_name)
    launched = LaunchedJob(name=job_name, channel_uri="", shards_uri=None, checkpoint_uri="",
                           output_path=(job.get("OutputDataConfig") or {}).get("S3OutputPath", ""), settings=settings)
    return finish_training_job(launched, session=session, poll_s=poll_s, log=log)


def run_training_job(cfg: TrainConfig, photos: Mapping[str, bytes], split_table, classes: list[int], *,
                     seed: int, settings: Mapping | SageMakerTrainingSettings, job_prefix: str, poll_s: float = 30,
                     cache_bytes: int | None = None, checkpoints=None,
                     log: Callable[[str], None] = print) -> TrainingJobOutcome:
    """Train one grid point as a SageMaker training job; the result and where the job left things."""
    settings = settings_from_config(settings)
    session = aws_session(settings.region)
    launched = launch_training_job(cfg, photos, split_table, classes, seed=seed, settings=settings,
                                   job_prefix=job_prefix, session=session, cache_bytes=cache_bytes,
                                   checkpoints=checkpoints, log=log)
    return finish_training_job(launched, session=session, poll_s=poll_s, log=log)


def train_on_sagemaker(cfg: TrainConfig, photos: Mapping[str, bytes], split_table, classes: list[int], *,
                       seed: int, settings: Mapping | SageMakerTrainingSettings, job_prefix: str,
                       poll_s: float = 30, cache_bytes: int | None = None, checkpoints=None,
                       log: Callable[[str], None] = print) -> TrainResult:
    """What ``bincount.model.train.train_on_split`` returns, trained by a SageMaker training job.

    ``job_prefix`` names the job and its S3 folder: make it unique per branch, e.g.
    ``f"bincount-{run_id}-{cfg.name}"``.
    """
    return run_training_job(cfg, photos, split_table, classes, seed=seed, settings=settings,
                            job_prefix=job_prefix, poll_s=poll_s, cache_bytes=cache_bytes, checkpoints=checkpoints,
                            log=log).result
