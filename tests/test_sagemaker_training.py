"""SageMaker training jobs for the train step (bincount.sagemaker.training_job, bincount.sagemaker.training).

- The entry point runs in a subprocess the way SageMaker's container runs it:
  the SDK's own container drivers (``sm_drivers``) turn the job's
  hyperparameters and channels into the SM_* environment and run ``train.py``
  from the ``code`` folder with the hyperparameters as arguments. Only the
  paths differ: ``/opt/ml`` is a temp folder (and requirements.txt is not
  pip-installed; the venv has those packages).
- The launch runs against in-process moto (``mock_aws``; ModelTrainer needs
  it there). moto records the job and answers Completed at once but runs no
  container, so the test plays the container: it runs the entry point on the
  code, drivers and data downloaded from the mock S3 and puts model.tar.gz
  where SageMaker would, then the launcher brings it back.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shlex
import subprocess
import sys
import tarfile
import uuid
from dataclasses import replace
from pathlib import Path

import pytest

from bincount.aws.containers import framework_version, image_uri
from bincount.data.shards import samples_in
from bincount.model.grid import TrainConfig
from bincount.model.train import TrainResult
from bincount.sagemaker.training import (CONTAINER_REQUIREMENTS, NAME_BASE_MAX, SageMakerTrainingError,
                                         SageMakerTrainingSettings, adopt_training_job, aws_session, build_source_dir, finish_training_job,
                                         job_base_name, launch_training_job, settings_from_config, train_on_sagemaker,
                                         wait_for_job)
from bincount.sagemaker.training_job import (TrainingJobError, encode_hyperparameters, hyperparameters_from_args,
                                             load_result, parse_hyperparameters, read_channel, save_result,
                                             write_channel)

REPO = Path(__file__).resolve().parents[1]
ROLE = "arn:aws:iam::123456789012:role/bincount-training-tests"
BUCKET = "bincount-training-tests"
REGION = "us-east-1"
CLASSES = [1, 2, 3]
# A grid point whose name is valid JSON: SageMaker's container decodes such values,
# so this checks that the name still arrives as the same string.
TINY = TrainConfig(name="1e-3", arch="resnet18", pretrained=False, epochs=2, image_size=64, batch_size=8,
                   lr=0.003, label_smoothing=0.0)
SEED = 3
SUBPROCESS_TIMEOUT_S = 600


@pytest.fixture(scope="module")
def tiny_data():
    """18 generated photos of 1-3 objects and a stratified split of them (train, val and test rows)."""
    from bincount.data.split import split_ids
    from bincount.data.synthetic import synthetic_bin

    ids = [f"syn{count}{i:02d}" for count in CLASSES for i in range(6)]
    images = {bin_id: synthetic_bin(int(bin_id[3]), seed=100 + n) for n, bin_id in enumerate(ids)}
    table = split_ids(ids, [int(i[3]) for i in ids], val_fraction=0.25, test_fraction=0.2, seed=0)
    assert set(table["split"]) == {"train", "val", "test"}
    return images, table


def sdk_drivers(dest: Path) -> Path:
    """The sm_drivers channel as ModelTrainer stages it for a script (not distributed) job:
    the SDK's container drivers plus sourcecode.json and distributed.json."""
    import shutil

    import sagemaker.train
    from sagemaker.core.training.configs import SourceCode

    shutil.copytree(Path(sagemaker.train.__file__).parent / "container_drivers", dest)
    source = SourceCode(source_dir="code", entry_script="train.py", requirements="requirements.txt")
    (dest / "sourcecode.json").write_text(json.dumps(source.model_dump()))
    (dest / "distributed.json").write_text("{}")
    return dest


# --- playing SageMaker's container ---------------------------------------------------------

# The container's sm_train.sh runs scripts/environment.py, which reads sourcecode.json and
# distributed.json from fixed /opt/ml paths; here they come from the temp folder instead.
SET_ENV = r'''
import json, sys
drivers, source_code_json, distributed_json, out, config = sys.argv[1:6]
sys.path.insert(0, drivers)
from common import utils
utils.read_source_code_json.__defaults__ = (source_code_json,)
utils.read_distributed_json.__defaults__ = (distributed_json,)
from scripts.environment import set_env
c = json.load(open(config))
set_env(c["resource_config"], c["input_data_config"], c["hyperparameters"], output_file=out)
'''


def container_environment(root: Path, drivers: Path, hyperparameters: dict[str, str], channels: list[str],
                          job_name: str, instance_type: str) -> dict[str, str]:
    """The SM_* variables the SDK's environment.py sets for this job, /opt/ml moved to ``root``."""
    opt_ml = root / "opt" / "ml"
    config = {"resource_config": {"current_host": "algo-1", "current_instance_type": instance_type,
                                  "hosts": ["algo-1"], "network_interface_name": "eth0"},
              "input_data_config": {c: {"TrainingInputMode": "File"} for c in channels},
              "hyperparameters": hyperparameters}  # as hyperparameters.json: the job's strings
    (root / "config.json").write_text(json.dumps(config))
    env_file = root / "sm_training.env"
    done = subprocess.run([sys.executable, "-c", SET_ENV, str(drivers), str(drivers / "sourcecode.json"),
                           str(drivers / "distributed.json"), str(env_file), str(root / "config.json")],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "TRAINING_JOB_NAME": job_name})
    assert done.returncode == 0, done.stdout + done.stderr
    env = {}
    for line in env_file.read_text().splitlines():
        _, assignment = shlex.split(line)
        key, _, value = assignment.partition("=")
        env[key] = value.replace("/opt/ml", str(opt_ml))
    return env


def container_base_env(root: Path) -> dict[str, str]:
    """This process's environment less what a container would not have: SM_* variables,
    PYTHONPATH, and the shared /tmp (a container has its own, so bincount's machine-wide
    training lock is not shared with trainings outside it)."""
    tmp = root / "tmp"
    tmp.mkdir(exist_ok=True)
    base = {k: v for k, v in os.environ.items() if not k.startswith("SM_") and k != "PYTHONPATH"}
    return {**base, "TMPDIR": str(tmp)}


def run_container(root: Path, *, code: Path, drivers: Path, hyperparameters: dict[str, str], job_name: str,
                  instance_type: str = "ml.m5.xlarge") -> tuple[subprocess.CompletedProcess, dict]:
    """Run the job as sm_train.sh does: the environment, then, in the code folder, the SDK's
    basic script driver, which runs the entry script with the hyperparameters as arguments."""
    channels = sorted(p.name for p in (root / "opt" / "ml" / "input" / "data").iterdir())
    env = container_environment(root, drivers, hyperparameters, channels, job_name, instance_type)
    (root / "opt" / "ml" / "model").mkdir(parents=True, exist_ok=True)
    (root / "opt" / "ml" / "output" / "data").mkdir(parents=True, exist_ok=True)
    done = subprocess.run([sys.executable, str(drivers / "distributed_drivers" / "basic_script_driver.py")],
                          cwd=code, env={**container_base_env(root), **env, "TRAINING_JOB_NAME": job_name},
                          capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S)
    return done, env


def data_dir(root: Path, channel: str) -> Path:
    return root / "opt" / "ml" / "input" / "data" / channel


def check_trained(result: TrainResult, cfg: TrainConfig, n_val: int) -> None:
    import torch

    from bincount.model.architectures import create_model

    assert result.config == cfg.as_dict()
    assert [row["epoch"] for row in result.history] == list(range(1, cfg.epochs + 1))
    assert 1 <= result.best_epoch <= cfg.epochs and 0 <= result.val_accuracy <= 1
    model = create_model(cfg.arch, num_classes=len(CLASSES), image_size=cfg.image_size)
    model.load_state_dict(torch.load(io.BytesIO(result.state_dict), weights_only=True))
    assert len(result.val_probabilities) == len(result.val_probabilities_tta) == n_val
    assert all(len(p) == len(CLASSES) and abs(sum(p) - 1) < 1e-3 for p in result.val_probabilities)


# --- the entry point, as SageMaker runs it ---------------------------------------------------

def test_entry_point_trains_as_sagemaker_runs_it(tmp_path, tiny_data):
    images, table = tiny_data
    write_channel(images, table, data_dir(tmp_path, "train"))
    code = build_source_dir(data_dir(tmp_path, "code"))
    # cache_bytes=0: the flow's --cache-mb reaches the job, which streams its photos from the shards
    hyperparameters = encode_hyperparameters(TINY, seed=SEED, classes=CLASSES, cache_bytes=0)

    drivers = sdk_drivers(data_dir(tmp_path, "sm_drivers"))
    done, env = run_container(tmp_path, code=code, drivers=drivers, hyperparameters=hyperparameters,
                              job_name="bincount-entry-test")
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    # What the script was given: SageMaker's variables, and the hyperparameters as --key value.
    assert env["SM_CHANNEL_TRAIN"] == str(data_dir(tmp_path, "train"))
    assert json.loads(env["SM_HPS"])["name"] == "1e-3"
    assert "--epochs 2" in done.stdout and "train.py" in done.stdout
    assert "streaming them from the shards" in done.stdout + done.stderr

    model_dir = Path(env["SM_MODEL_DIR"])
    assert sorted(p.name for p in model_dir.iterdir()) == ["model.pt", "result.json"]
    result = load_result(model_dir)
    check_trained(result, TINY, n_val=int((table["split"] == "val").sum()))
    assert json.loads((model_dir / "result.json").read_text())["job"] == {
        "classes": CLASSES, "seed": SEED, "training_job_name": "bincount-entry-test"}
    with open(Path(env["SM_OUTPUT_DATA_DIR"]) / "history.csv") as handle:
        assert [int(row["epoch"]) for row in csv.DictReader(handle)] == [1, 2]


def test_entry_point_goes_on_from_the_checkpoint_in_its_checkpoint_folder(tmp_path, tiny_data, monkeypatch):
    """A job SageMaker restarts finds /opt/ml/checkpoints holding its last epoch (restored from
    checkpoint_s3_uri): it trains only the epochs after it, and ends as a job that never stopped."""
    from bincount.model.checkpoint import Checkpoints
    from bincount.model.train import FAIL_ENV, train_on_split

    images, table = tiny_data
    channel = write_channel(images, table, data_dir(tmp_path, "train"))
    photos, split = read_channel(channel)
    folder = tmp_path / "opt" / "ml" / "checkpoints"
    # The job's first life: epoch 1 checkpointed, then the machine is lost.
    monkeypatch.setenv(FAIL_ENV, f"{TINY.name}:1")
    with pytest.raises(RuntimeError, match="on purpose after epoch 1"):
        train_on_split(TINY, photos, split, CLASSES, seed=SEED, cache_bytes=0, progress=False,
                       checkpoints=Checkpoints(str(folder)))
    monkeypatch.delenv(FAIL_ENV)
    uninterrupted = train_on_split(TINY, photos, split, CLASSES, seed=SEED, cache_bytes=0, progress=False)

    monkeypatch.setenv("BINCOUNT_CHECKPOINT_DIR", str(folder))  # as the launcher sets it in the job
    code = build_source_dir(data_dir(tmp_path, "code"))
    done, env = run_container(tmp_path, code=code, drivers=sdk_drivers(data_dir(tmp_path, "sm_drivers")),
                              hyperparameters=encode_hyperparameters(TINY, seed=SEED, classes=CLASSES, cache_bytes=0),
                              job_name="bincount-restarted")
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert f"continuing from the checkpoint after epoch 1 of {TINY.epochs}" in done.stdout
    assert f"{TINY.name} epoch 1/" not in done.stdout  # epoch 1 was not trained again
    result = load_result(Path(env["SM_MODEL_DIR"]))
    assert [row["epoch"] for row in result.history] == [1, 2]
    assert result.state_dict == uninterrupted.state_dict
    assert Checkpoints(str(folder)).load()["epoch"] == TINY.epochs  # the last epoch, for SageMaker to sync


def entry(tmp_path: Path, env: dict[str, str], args: list[str] = ()) -> subprocess.CompletedProcess:
    code = build_source_dir(tmp_path / "code")
    return subprocess.run([sys.executable, "train.py", *args], cwd=code, env={**container_base_env(tmp_path), **env},
                          capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S)


@pytest.mark.parametrize("case, message", [
    ("no channel variable", "SM_CHANNEL_TRAIN is not set"),
    ("empty channel", "split.csv not found"),
    ("shard missing", "1 shard\\(s\\) listed in .*split.csv are not in"),
    ("unknown hyperparameter", "unknown hyperparameter\\(s\\) \\['learning_rate'\\]"),
])
def test_entry_point_bad_input_fails_clearly(tmp_path, tiny_data, case, message):
    import re

    images, table = tiny_data
    channel = tmp_path / "channel"
    channel.mkdir()
    if case in ("shard missing", "unknown hyperparameter"):
        write_channel(images, table, channel)
    if case == "shard missing":
        next((channel / "shards").iterdir()).unlink()
    hyperparameters = {k: json.loads(v) if v.startswith(("[", "{")) else v
                       for k, v in encode_hyperparameters(TINY, seed=SEED, classes=CLASSES).items()}
    if case == "unknown hyperparameter":
        hyperparameters["learning_rate"] = 0.1
    failure = tmp_path / "failure"
    env = {"SM_HPS": json.dumps(hyperparameters), "SM_MODEL_DIR": str(tmp_path / "model"),
           "SM_OUTPUT_FAILURE": str(failure), **({} if case == "no channel variable" else
                                                 {"SM_CHANNEL_TRAIN": str(channel)})}
    done = entry(tmp_path, env)
    assert done.returncode == 2, done.stdout + done.stderr
    assert re.search(message, done.stderr), done.stderr
    assert "Traceback" not in done.stderr  # an input error is a message, not a crash
    assert re.search(message, failure.read_text())  # what SageMaker shows as FailureReason
    assert not (tmp_path / "model" / "model.pt").exists()


# --- hyperparameters, channel and result formats ------------------------------------------------

def test_hyperparameters_survive_both_ways_sagemaker_passes_them():
    from sagemaker.train.container_drivers.common.utils import hyperparameters_to_cli_args, safe_deserialize

    cfg = replace(TINY, name="tiny-a", pretrained=True, frozen_blocks=2, precision="fp32")
    stored = encode_hyperparameters(cfg, seed=7, classes=[0, 1, 2, 3])
    assert stored["pretrained"] == "true" and stored["classes"] == "[0, 1, 2, 3]" and stored["name"] == "tiny-a"
    # SM_HPS: environment.py decodes each stored string once.
    sm_hps = {k: safe_deserialize(v) for k, v in stored.items()}
    assert parse_hyperparameters(json.loads(json.dumps(sm_hps))) == (cfg, 7, [0, 1, 2, 3])
    # The command line: the basic script and torchrun drivers print each value again.
    argv = hyperparameters_to_cli_args(sm_hps)
    assert parse_hyperparameters(hyperparameters_from_args(argv)) == (cfg, 7, [0, 1, 2, 3])
    # A name that is valid JSON is sent quoted and comes back as the same string through SM_HPS.
    odd = encode_hyperparameters(replace(cfg, name="1e-3"), seed=7, classes=[1])
    assert odd["name"] == '"1e-3"'
    assert parse_hyperparameters({k: safe_deserialize(v) for k, v in odd.items()})[0].name == "1e-3"


def test_hyperparameters_by_hand_and_their_errors():
    cfg, seed, classes = parse_hyperparameters(hyperparameters_from_args(
        ["--name", "a", "--arch=resnet18", "--pretrained", "false", "--epochs", "3", "--lr", "1e-4",
         "--classes", "1,2,3"]))
    assert (cfg.arch, cfg.pretrained, cfg.epochs, cfg.lr, seed, classes) == ("resnet18", False, 3, 1e-4, 0, [1, 2, 3])
    for raw, match in [({"name": "a"}, "missing hyperparameter.*classes"),
                       ({"name": "a", "classes": "[1]", "epochs": "2.5"}, "epochs: expected a whole number"),
                       ({"name": "a", "classes": "[1]", "pretrained": "yes"}, "pretrained: expected true or false"),
                       ({"name": "a", "classes": "[1]", "lr": "fast"}, "lr: expected a number"),
                       ({"name": "a", "classes": "[1, 1]"}, "repeats a count"),
                       ({"name": "a", "classes": "[1]", "arch": "vgg"}, "unknown architecture"),
                       ({"name": "a", "classes": "[1]", "sagemaker_program": "x"}, None)]:
        if match is None:
            parse_hyperparameters(raw)  # the platform's own keys are ignored
            continue
        with pytest.raises(TrainingJobError, match=match):
            parse_hyperparameters(raw)
    with pytest.raises(TrainingJobError, match="unexpected argument 'a'"):
        hyperparameters_from_args(["--name", "x", "a"])


def test_channel_keeps_train_and_val_rows_in_order_and_never_test(tmp_path, tiny_data):
    images, table = tiny_data
    write_channel(images, table, tmp_path)
    got_images, got_table = read_channel(tmp_path)
    want = table[table["split"] != "test"].reset_index(drop=True)
    assert got_table[["id", "label", "split"]].to_dict("list") == {
        "id": list(want["id"]), "label": [int(v) for v in want["label"]], "split": list(want["split"])}
    assert dict(got_images.read(want["id"])) == {i: images[i] for i in want["id"]}
    test_ids = set(table.loc[table["split"] == "test", "id"])
    in_shards = {bin_id for shard in got_images.shards.shards for bin_id, _, _ in got_images.shards.samples(shard)}
    assert in_shards == set(want["id"]) and not in_shards & test_ids
    with pytest.raises(TrainingJobError, match="have no photo"):
        write_channel({}, table, tmp_path / "other")


def test_result_round_trips_exactly(tmp_path, tiny_model):
    state, _ = tiny_model
    result = TrainResult(config=TINY.as_dict(), state_dict=state, history=[{"epoch": 1, "val_loss": 0.1 + 0.2}],
                         best_epoch=1, val_accuracy=1 / 3, val_loss=float("inf"), train_seconds=1.5,
                         images_per_second=2.25, device="cuda", val_probabilities=[[0.1, 0.9]],
                         val_probabilities_tta=[[0.2, 0.8]])
    assert load_result(save_result(result, tmp_path)) == result
    (tmp_path / "model.pt").unlink()
    with pytest.raises(TrainingJobError, match="has no model.pt"):
        load_result(tmp_path)


# --- the launch, against moto -------------------------------------------------------------------

@pytest.fixture
def aws(monkeypatch):
    """In-process moto with dummy credentials; a bucket; a session as the launcher makes one."""
    from moto import mock_aws

    for key in ("AWS_ENDPOINT_URL", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("SAGEMAKER_VALIDATE_ROLE", "false")  # no IAM policy simulation in moto
    with mock_aws():
        session = aws_session(REGION)
        session.client("s3").create_bucket(Bucket=BUCKET)
        yield session


def settings(**overrides) -> SageMakerTrainingSettings:
    return settings_from_config({"role": ROLE, "bucket": BUCKET, "region": REGION, **overrides})


def objects(s3, prefix: str) -> dict[str, bytes]:
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
            for o in page.get("Contents", [])]
    return {k[len(prefix):]: s3.get_object(Bucket=BUCKET, Key=k)["Body"].read() for k in keys}


def test_launch_configures_the_job_and_uploads_only_train_and_val(aws, tiny_data):
    images, table = tiny_data
    sm, s3 = aws.client("sagemaker"), aws.client("s3")
    tuned = settings(instance_type="ml.g5.2xlarge", instance_count=2, use_spot=True, max_runtime_s=1800,
                     max_wait_s=3600, volume_size_gb=50, s3_prefix="/jobs/bincount/")
    prefix = f"bincount-{uuid.uuid4().hex[:6]}/{TINY.name}"
    lines, sent = [], []
    # moto keeps no Environment on the job it records, so read the request as boto3 sends it.
    aws.events.register("provide-client-params.sagemaker.CreateTrainingJob",
                        lambda params, **_: sent.append(params))
    launched = launch_training_job(TINY, images, table, CLASSES, seed=SEED, settings=tuned, job_prefix=prefix,
                                   session=aws, cache_bytes=64 * 2**20, log=lines.append)

    job = sm.describe_training_job(TrainingJobName=launched.name)
    base = job_base_name(prefix)
    assert launched.name.startswith(base + "-") and len(launched.name) <= 63
    assert job["AlgorithmSpecification"]["TrainingImage"] == image_uri("training", "us-east-1", "ml.g5.2xlarge")
    assert "763104351884.dkr.ecr.us-east-1.amazonaws.com/pytorch-training:" in job["AlgorithmSpecification"]["TrainingImage"]
    assert job["ResourceConfig"] == {"InstanceType": "ml.g5.2xlarge", "InstanceCount": 2, "VolumeSizeInGB": 50}
    assert job["EnableManagedSpotTraining"] is True
    assert job["StoppingCondition"] == {"MaxRuntimeInSeconds": 1800, "MaxWaitTimeInSeconds": 3600}
    assert job["HyperParameters"] == encode_hyperparameters(TINY, seed=SEED, classes=CLASSES, cache_bytes=64 * 2**20)
    assert job["HyperParameters"]["cache_bytes"] == str(64 * 2**20)  # the flow's --cache-mb
    assert job["RoleArn"] == ROLE
    branch = f"jobs/bincount/{base}"
    channels = {c["ChannelName"]: c["DataSource"]["S3DataSource"]["S3Uri"] for c in job["InputDataConfig"]}
    assert channels == {"train": f"s3://{BUCKET}/{branch}/input/train/",
                        "code": f"s3://{BUCKET}/{branch}/{launched.name}/input/code",
                        "sm_drivers": f"s3://{BUCKET}/{branch}/{launched.name}/input/sm_drivers"}
    assert job["OutputDataConfig"]["S3OutputPath"] == f"s3://{BUCKET}/{branch}"
    assert launched.channel_uri == channels["train"]
    # Checkpoints: SageMaker syncs /opt/ml/checkpoints with a folder that stays the same when the
    # train step is retried (the branch's), so a restarted or retried job goes on from its last epoch.
    assert job["CheckpointConfig"] == {"S3Uri": f"s3://{BUCKET}/{branch}/checkpoints",
                                       "LocalPath": "/opt/ml/checkpoints"}
    assert len(sent) == 1 and sent[0]["Environment"]["BINCOUNT_CHECKPOINT_DIR"] == "/opt/ml/checkpoints"
    assert launched.checkpoint_uri == job["CheckpointConfig"]["S3Uri"]

    # The channel: split.csv and shards of the train/val photos, byte for byte; nothing of the test split.
    uploaded = objects(s3, f"{branch}/input/train/")
    kept = table[table["split"] != "test"]
    assert "split.csv" in uploaded and all(k == "split.csv" or k.startswith("shards/shard-") for k in uploaded)
    rows = list(csv.reader(io.StringIO(uploaded["split.csv"].decode())))
    assert rows[0] == ["id", "label", "split", "shard", "checksum"]
    assert [r[:3] for r in rows[1:]] == [[i, str(label), s] for i, label, s in
                                         zip(kept["id"], kept["label"], kept["split"])]
    in_shards = {}
    for key, body in uploaded.items():
        if key != "split.csv":
            in_shards.update({bin_id: raw for bin_id, _, raw in samples_in(io.BytesIO(body), key)})
    assert in_shards == {i: images[i] for i in kept["id"]}

    # The code: bincount itself, the entry script and what the container must pip install;
    # two instances run it under torchrun.
    code = objects(s3, f"{branch}/{launched.name}/input/code/")
    assert {"train.py", "requirements.txt", "bincount/sagemaker/training_job.py", "bincount/model/train.py"} <= set(code)
    assert not any("__pycache__" in k for k in code)
    assert code["requirements.txt"].decode().split() == list(CONTAINER_REQUIREMENTS)
    drivers = objects(s3, f"{branch}/{launched.name}/input/sm_drivers/")
    assert json.loads(drivers["sourcecode.json"])["entry_script"] == "train.py"
    assert json.loads(drivers["distributed.json"]) != {} and b"torchrun_driver.py" in drivers["sm_train.sh"]
    assert any("started SageMaker training job" in line and "spot" in line for line in lines)


def download(s3, uri: str, dest: Path) -> Path:
    prefix = uri.split(f"s3://{BUCKET}/", 1)[1].rstrip("/") + "/"
    for key, body in objects(s3, prefix).items():
        (dest / key).parent.mkdir(parents=True, exist_ok=True)
        (dest / key).write_bytes(body)
    return dest


def test_launched_job_trains_from_s3_and_its_model_comes_back(aws, tiny_data, tmp_path):
    images, table = tiny_data
    sm, s3 = aws.client("sagemaker"), aws.client("s3")
    launched = launch_training_job(TINY, images, table, CLASSES, seed=SEED,
                                   settings=settings(instance_type="ml.m5.xlarge"),
                                   job_prefix=f"bincount-{uuid.uuid4().hex[:6]}", session=aws, log=lambda _: None)
    job = sm.describe_training_job(TrainingJobName=launched.name)
    assert job["AlgorithmSpecification"]["TrainingImage"] == image_uri("training", "us-east-1", "ml.m5.xlarge")
    assert f"/pytorch-training:{framework_version('training')}-cpu-py3" in job["AlgorithmSpecification"]["TrainingImage"]

    # Play the container: its channels are what the job uploaded, its hyperparameters what it stores.
    for channel in job["InputDataConfig"]:
        download(s3, channel["DataSource"]["S3DataSource"]["S3Uri"], data_dir(tmp_path, channel["ChannelName"]))
    done, env = run_container(tmp_path, code=data_dir(tmp_path, "code"), drivers=data_dir(tmp_path, "sm_drivers"),
                              hyperparameters=job["HyperParameters"], job_name=launched.name)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    model_dir = Path(env["SM_MODEL_DIR"])
    archive = tmp_path / "model.tar.gz"  # SageMaker tars the model folder's contents
    with tarfile.open(archive, "w:gz") as tar:
        for path in model_dir.iterdir():
            tar.add(path, arcname=path.name)
    artifacts = job["ModelArtifacts"]["S3ModelArtifacts"]
    assert artifacts == f"{launched.output_path}/{launched.name}/output/model.tar.gz"
    s3.put_object(Bucket=BUCKET, Key=artifacts.split(f"s3://{BUCKET}/")[1], Body=archive.read_bytes())

    lines = []
    outcome = finish_training_job(launched, session=aws, poll_s=0, log=lines.append)
    assert outcome.result == load_result(model_dir)
    check_trained(outcome.result, TINY, n_val=int((table["split"] == "val").sum()))
    assert (outcome.job_name, outcome.model_artifacts, outcome.channel_uri) == \
        (launched.name, artifacts, launched.channel_uri)
    assert lines[0].startswith(f"training job {launched.name}: Completed")
    # A job someone else started (a tuning job's trial) comes back the same way, by its name alone.
    adopted = adopt_training_job(launched.name, settings(instance_type="ml.m5.xlarge"), session=aws, poll_s=0,
                                 log=lambda _: None)
    assert adopted.result == outcome.result and adopted.model_artifacts == artifacts

    # What SageMaker's tuner reads from this job's log: each epoch's validation accuracy (what its early
    # stopping compares), and last the best epoch's (the job's final objective value, the weights it keeps).
    from bincount.sagemaker.tuning import METRIC_DEFINITIONS, OBJECTIVE

    regex = {m["Name"]: re.compile(m["Regex"]) for m in METRIC_DEFINITIONS}
    log = done.stdout + done.stderr
    accuracies = [float(m.group(1)) for m in regex[OBJECTIVE].finditer(log)]
    epochs = [round(row["val_accuracy"], 3) for row in outcome.result.history]
    assert accuracies[:len(epochs)] == epochs and len(accuracies) == len(epochs) + 1
    assert accuracies[-1] == round(outcome.result.val_accuracy, 3)
    losses = [float(m.group(1)) for m in regex["validation:loss"].finditer(log)]
    assert losses == [round(row["val_loss"], 3) for row in outcome.result.history]


def test_run_shards_already_in_s3_are_read_in_place_not_uploaded_again(aws, tiny_data, tmp_path):
    """With --datastore s3 a run's shards already sit in S3: the job gets their prefix as a channel
    of its own, the train channel holds only split.csv, and the container trains from those shards."""
    from bincount.data.shards import Photos
    from bincount.data.shards import write_shards as write

    images, table = tiny_data
    sm, s3 = aws.client("sagemaker"), aws.client("s3")
    labels = {i: int(label) for i, label in zip(table["id"], table["label"])}
    root = f"s3://{BUCKET}/metaflow/bincount-shards/BinCountFlow/12"
    # Run 120's prefix starts with run 12's: none of its shards may reach run 12's job.
    write(f"{root}0", ((i, labels[i], images[i]) for i in list(images)[:3]))
    shards, index = write(root, ((i, labels[i], images[i]) for i in table["id"]), max_bytes=16 * 1024)
    assert len(shards.shards) >= 3
    launched = launch_training_job(TINY, Photos(shards, index), table, CLASSES, seed=SEED,
                                   settings=settings(instance_type="ml.m5.xlarge"),
                                   job_prefix=f"bincount-{uuid.uuid4().hex[:6]}", session=aws, log=lambda _: None)

    job = sm.describe_training_job(TrainingJobName=launched.name)
    channels = {c["ChannelName"]: c["DataSource"]["S3DataSource"]["S3Uri"] for c in job["InputDataConfig"]}
    assert channels["shards"] == launched.shards_uri == f"{root}/"
    uploaded = objects(s3, channels["train"].split(f"s3://{BUCKET}/", 1)[1])
    assert list(uploaded) == ["split.csv"]  # no photo uploaded twice
    rows = list(csv.DictReader(io.StringIO(uploaded["split.csv"].decode())))
    kept = table[table["split"] != "test"]
    assert [r["id"] for r in rows] == list(kept["id"])
    stored = index.set_index("id")
    assert all((r["shard"], r["checksum"]) == tuple(stored.loc[r["id"], ["shard", "checksum"]]) for r in rows)

    # Play the container with what the job's channels hold: it trains from the run's shards.
    for channel in job["InputDataConfig"]:
        download(s3, channel["DataSource"]["S3DataSource"]["S3Uri"], data_dir(tmp_path, channel["ChannelName"]))
    assert sorted(p.name for p in data_dir(tmp_path, "shards").iterdir()) == sorted(shards.shards)
    done, env = run_container(tmp_path, code=data_dir(tmp_path, "code"), drivers=data_dir(tmp_path, "sm_drivers"),
                              hyperparameters=job["HyperParameters"], job_name=launched.name)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert env["SM_CHANNEL_SHARDS"] == str(data_dir(tmp_path, "shards"))
    check_trained(load_result(Path(env["SM_MODEL_DIR"])), TINY, n_val=int((table["split"] == "val").sum()))


def test_a_job_starts_from_the_flows_last_checkpoint(aws, tiny_data, tmp_path):
    """A resumed run (or a retry that trained elsewhere) has a checkpoint the job's S3 folder lacks:
    the launcher puts it there, for SageMaker to restore into /opt/ml/checkpoints."""
    from bincount.data.blobs import read_blob, write_blob
    from bincount.model.checkpoint import Checkpoints

    images, table = tiny_data
    origin = tmp_path / "origin-run" / "train" / TINY.name
    write_blob(str(origin / "checkpoint.pt"), b"the state after epoch 1")
    checkpoints = Checkpoints(str(tmp_path / "this-run" / "train" / TINY.name), resume_from=str(origin))
    lines = []
    launched = launch_training_job(TINY, images, table, CLASSES, seed=SEED, settings=settings(),
                                   job_prefix=f"bincount-{uuid.uuid4().hex[:6]}", session=aws,
                                   checkpoints=checkpoints, log=lines.append)
    assert read_blob(f"{launched.checkpoint_uri}/checkpoint.pt") == b"the state after epoch 1"
    assert any(f"starts from the checkpoint in {origin}" in line for line in lines)


def test_failed_job_raises_its_name_and_failure_reason(aws, tiny_data):
    import time

    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.sagemaker.models import sagemaker_backends

    images, table = tiny_data
    launched = launch_training_job(TINY, images, table, CLASSES, seed=SEED, settings=settings(),
                                   job_prefix=f"bincount-{uuid.uuid4().hex[:6]}", session=aws, log=lambda _: None)
    job = sagemaker_backends[DEFAULT_ACCOUNT_ID][REGION].training_jobs[launched.name]
    job.training_job_status, job.secondary_status = "Failed", "Failed"
    job.failure_reason = "AlgorithmError: split.csv has counts [4] that are not among classes [1, 2, 3]"
    # The container's log, where SageMaker puts it: the launcher prints it while waiting.
    logs = aws.client("logs")
    stream = f"{launched.name}/algo-1-1700000000"
    logs.create_log_group(logGroupName="/aws/sagemaker/TrainingJobs")
    logs.create_log_stream(logGroupName="/aws/sagemaker/TrainingJobs", logStreamName=stream)
    logs.put_log_events(logGroupName="/aws/sagemaker/TrainingJobs", logStreamName=stream,
                        logEvents=[{"timestamp": int(time.time() * 1000) + i, "message": m}
                                   for i, m in enumerate(["bincount training job: 1e-3", "error: counts [4]"])])
    lines = []
    with pytest.raises(SageMakerTrainingError, match=f"training job {launched.name} Failed.*AlgorithmError: "
                                                     "split.csv has counts"):
        finish_training_job(launched, session=aws, poll_s=0, log=lines.append)
    assert lines == [f"training job {launched.name}: Failed (Failed): Preparing the instances for training",
                     "[algo-1-1700000000] bincount training job: 1e-3", "[algo-1-1700000000] error: counts [4]"]


def test_completed_job_without_a_model_is_a_clear_error(aws, tiny_data):
    images, table = tiny_data
    with pytest.raises(SageMakerTrainingError, match="downloading s3://.*/output/model.tar.gz.*NoSuchKey"):
        train_on_sagemaker(TINY, images, table, CLASSES, seed=SEED,
                           settings={"role": ROLE, "bucket": BUCKET, "region": REGION},
                           job_prefix=f"bincount-{uuid.uuid4().hex[:6]}", poll_s=0, log=lambda _: None)


def test_missing_bucket_fails_before_any_job(aws, tiny_data):
    images, table = tiny_data
    with pytest.raises(SageMakerTrainingError, match="uploading s3://no-such-bucket-here/.*NoSuchBucket"):
        launch_training_job(TINY, images, table, CLASSES, seed=SEED, settings=settings(bucket="no-such-bucket-here"),
                            job_prefix="bincount-x", session=aws, log=lambda _: None)
    assert aws.client("sagemaker").list_training_jobs()["TrainingJobSummaries"] == []


def test_unreachable_s3_fails_fast(tiny_data, monkeypatch, tmp_path):
    import time

    from conftest import free_port

    images, table = tiny_data
    closed = free_port()  # nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    start = time.monotonic()
    with pytest.raises(SageMakerTrainingError, match=f"uploading s3://{BUCKET}/.*cannot reach AWS.*127.0.0.1:{closed}"):
        launch_training_job(TINY, images, table, CLASSES, seed=SEED, settings=settings(), job_prefix="bincount-x",
                            log=lambda _: None)
    assert time.monotonic() - start < 60


# --- waiting ------------------------------------------------------------------------------------

def scripted(*states: tuple[str, str], reason: str | None = None, errors: int = 0):
    """A describe function: ``errors`` failures first, then (status, secondary) states, repeating the last."""
    states, calls = list(states), {"n": 0}

    def describe() -> dict:
        calls["n"] += 1
        if calls["n"] <= errors:
            raise SageMakerTrainingError("checking training job j: cannot reach AWS")
        status, secondary = states.pop(0) if len(states) > 1 else states[0]
        return {"TrainingJobName": "j", "TrainingJobStatus": status, "SecondaryStatus": secondary,
                **({"FailureReason": reason} if reason else {})}
    return describe


def test_wait_prints_each_status_change_and_returns_when_completed():
    lines, polled = [], []
    job = wait_for_job(scripted(("InProgress", "Starting"), ("InProgress", "Starting"), ("InProgress", "Training"),
                                ("Completed", "Completed")), timeout_s=5, poll_s=0, log=lines.append,
                       on_poll=lambda: polled.append(1))
    assert job["TrainingJobStatus"] == "Completed"
    assert lines == ["training job j: InProgress (Starting)", "training job j: InProgress (Training)",
                     "training job j: Completed (Completed)"]
    assert len(polled) == 4


def test_wait_raises_for_stopped_jobs_and_tolerates_network_blips():
    with pytest.raises(SageMakerTrainingError, match="j Stopped \\(MaxWaitTimeExceeded\\): no FailureReason"):
        wait_for_job(scripted(("Stopped", "MaxWaitTimeExceeded")), timeout_s=5, poll_s=0, log=lambda _: None)
    lines = []
    assert wait_for_job(scripted(("Completed", "Completed"), errors=2), timeout_s=5, poll_s=0,
                        log=lines.append)["TrainingJobStatus"] == "Completed"
    assert sum("trying again" in line for line in lines) == 2
    with pytest.raises(SageMakerTrainingError, match="cannot reach AWS \\(6 times in a row\\)"):
        wait_for_job(scripted(("Completed", "Completed"), errors=10), timeout_s=5, poll_s=0, log=lambda _: None)


def test_wait_stops_a_job_that_outlives_its_limit():
    stopped = []
    with pytest.raises(SageMakerTrainingError, match="still InProgress after 0 s.*asked SageMaker to stop it"):
        wait_for_job(scripted(("InProgress", "Training")), timeout_s=0.2, poll_s=0.05, log=lambda _: None,
                     stop=lambda: stopped.append(True))
    assert stopped == [True]


# --- settings -------------------------------------------------------------------------------------

def test_settings_defaults():
    s = settings_from_config({"role": ROLE, "bucket": BUCKET, "region": "eu-west-1"})
    assert (s.instance_type, s.instance_count, s.use_spot, s.max_wait_s, s.s3_prefix, s.torchrun) == \
        ("ml.g5.xlarge", 1, False, None, "bincount/training", False)
    assert s.image_uri.startswith("763104351884.dkr.ecr.eu-west-1.amazonaws.com/pytorch-training:")
    assert "-gpu-py3" in s.image_uri
    spot = settings_from_config({"role": ROLE, "bucket": BUCKET, "use_spot": True, "max_runtime_s": 600,
                                 "instance_count": 2})
    assert (spot.max_wait_s, spot.torchrun, spot.wait_limit_s) == (1200, True, 1200 + 3600)
    custom = settings_from_config({"role": ROLE, "bucket": BUCKET, "instance_type": "ml.trn1.2xlarge",
                                   "image_uri": "1.dkr.ecr.us-east-1.amazonaws.com/mine:1"})
    assert custom.image_uri == "1.dkr.ecr.us-east-1.amazonaws.com/mine:1"


@pytest.mark.parametrize("region, instance_type", [("us-east-1", "ml.g5.xlarge"), ("eu-west-1", "ml.m5.2xlarge"),
                                                   ("cn-north-1", "ml.p3.2xlarge"), ("af-south-1", "ml.c5.xlarge")])
def test_default_image_is_the_sdk_s_for_the_newest_version_not_newer_than_torch(region, instance_type):
    import torch
    from sagemaker.core import image_uris

    from bincount.aws.containers import framework_version

    version = framework_version("training")
    listed = [v for v in image_uris.list_versions("pytorch", "training") if v.count(".") == 2]
    minor = lambda v: tuple(int(p) for p in v.split("+")[0].split(".")[:2])  # noqa: E731
    assert minor(version) <= minor(torch.__version__)
    assert all(minor(v) > minor(torch.__version__) or minor(v) <= minor(version) for v in listed)  # the newest such
    want = image_uris.retrieve(framework="pytorch", region=region, version=version, instance_type=instance_type,
                               image_scope="training")
    got = settings_from_config({"role": ROLE, "bucket": BUCKET, "region": region, "instance_type": instance_type})
    processor = "gpu" if instance_type.startswith(("ml.g", "ml.p")) else "cpu"
    assert got.image_uri == want and f":{version}-{processor}-" in want
    older = settings_from_config({"role": ROLE, "bucket": BUCKET, "region": region, "instance_type": instance_type,
                                  "framework_version": "2.3.0"})
    assert older.image_uri == image_uris.retrieve(framework="pytorch", region=region, version="2.3.0",
                                                  instance_type=instance_type, image_scope="training")


@pytest.mark.parametrize("extra, match", [
    ({"instance_typ": "ml.g5.xlarge"}, r"unknown key.*instance_typ.*known keys.*instance_type"),
    ({"role": None}, "needs role"),
    ({"role": "my-role"}, "not an IAM role ARN"),
    ({"bucket": "s3://b/p"}, "bare bucket name"),
    ({"instance_count": 0}, "instance_count = 0: input should be greater than or equal to 1"),
    ({"instance_count": "2"}, "instance_count = '2': input should be a valid integer"),
    ({"use_spot": "yes"}, "use_spot = 'yes': input should be a valid boolean"),
    ({"instance_count": True}, "instance_count = True: input should be a valid integer"),
    ({"instance_type": "g5.xlarge"}, "not a SageMaker instance type"),
    ({"instance_type": "ml.trn1.2xlarge"}, "no default training image.*set image_uri"),
    ({"framework_version": "1.99.0"}, "no default training image for PyTorch 1.99.0.*Unsupported.*set image_uri"),
    ({"max_wait_s": 7200}, "max_wait_s applies only to spot"),
    ({"use_spot": True, "max_runtime_s": 3600, "max_wait_s": 60}, "at least max_runtime_s"),
    ({"max_runtime_s": 0}, "max_runtime_s = 0: input should be greater than or equal to 1"),
    ({"distributed": "mpi"}, "distributed = 'mpi': input should be 'auto', 'torchrun' or 'none'"),
    ({"distributed": "none", "instance_count": 2}, "train the same model on every instance"),
    ({"role": "arn:aws:iam::123456789012:role/REPLACE-ME"}, "placeholder"),
])
def test_bad_settings_are_refused(extra, match):
    with pytest.raises(ValueError, match=match):
        settings_from_config({"role": ROLE, "bucket": BUCKET, **extra})


def test_job_names_are_legal_and_distinct():
    import re

    long_a, long_b = "bincount-" + "x" * 80 + "-a", "bincount-" + "x" * 80 + "-b"
    for prefix in ("bincount-1732200000123456-tiny_a", long_a, "__", "run/7 point.b"):
        base = job_base_name(prefix)
        assert len(base) <= NAME_BASE_MAX and re.fullmatch(r"[a-zA-Z0-9](-*[a-zA-Z0-9])*", base)
    assert job_base_name(long_a) != job_base_name(long_b)
    assert job_base_name("run/7 point.b") == "run-7-point-b"


def test_container_requirements_are_the_project_pins():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    pins = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert set(CONTAINER_REQUIREMENTS) <= set(pins)


# --- the search handed to SageMaker's tuner (bincount.sagemaker.tuning) ------------------------

TUNED_SPACE = {"lr": {"loguniform": [1e-4, 1e-2]}, "epochs": {"int": [1, 3]}, "batch_size": {"choice": [8, 16]},
               "transpose": {"choice": [True, False]}}


def tuned_search(**tuner):
    from bincount.model.grid import grid_search

    return grid_search({"defaults": TINY.as_dict(), "search": {
        "space": TUNED_SPACE, "trials": 6, "seed": 3, "tuner": {"max_parallel_jobs": 3, "early_stopping": True, **tuner}}})


def test_a_search_becomes_a_sagemaker_tuning_job_over_the_same_training_job(aws, tiny_data):
    """What moto records of CreateHyperParameterTuningJob: moto runs no training job for it and lacks
    ListTrainingJobsForHyperParameterTuningJob, so bringing trials back is tested by its parts
    (decode_tuned here, adopt_training_job above) and not end to end."""
    from bincount.sagemaker.tuning import METRIC_DEFINITIONS, launch_tuning_job, wait_for_tuning_job

    images, table = tiny_data
    sm, s3 = aws.client("sagemaker"), aws.client("s3")
    lines = []
    name = launch_tuning_job(tuned_search(), TINY, images, table, CLASSES, seed=SEED, settings=settings(),
                             job_prefix=f"bincount-{uuid.uuid4().hex[:6]}-tune", session=aws, log=lines.append)
    job = sm.describe_hyper_parameter_tuning_job(HyperParameterTuningJobName=name)
    config = job["HyperParameterTuningJobConfig"]
    assert len(name) <= 32 and lines[-1].startswith(f"started SageMaker hyperparameter tuning job {name}: 6 trials")
    assert config["Strategy"] == "Bayesian" and config["TrainingJobEarlyStoppingType"] == "Auto"
    assert config["RandomSeed"] == 3
    assert config["ResourceLimits"] == {"MaxNumberOfTrainingJobs": 6, "MaxParallelTrainingJobs": 3}
    assert config["HyperParameterTuningJobObjective"] == {"Type": "Maximize", "MetricName": "validation:accuracy"}
    ranges = config["ParameterRanges"]
    assert ranges["ContinuousParameterRanges"] == [{"Name": "lr", "MinValue": "0.0001", "MaxValue": "0.01",
                                                    "ScalingType": "Logarithmic"}]
    assert [(r["Name"], r["MinValue"], r["MaxValue"]) for r in ranges["IntegerParameterRanges"]] == [("epochs", "1", "3")]
    assert {r["Name"]: r["Values"] for r in ranges["CategoricalParameterRanges"]} == {
        "batch_size": ["8", "16"], "transpose": ["true", "false"]}
    definition = job["TrainingJobDefinition"]
    assert definition["AlgorithmSpecification"]["MetricDefinitions"] == METRIC_DEFINITIONS
    static = definition["StaticHyperParameters"]
    # the grid's defaults are the static hyperparameters; what is searched is the tuner's to set
    assert not set(TUNED_SPACE) & set(static)
    assert static["arch"] == "resnet18" and static["image_size"] == "64" and static["classes"] == "[1, 2, 3]"
    assert "CheckpointConfig" not in definition  # one definition for every trial: no folder of its own
    channel = next(c for c in definition["InputDataConfig"] if c["ChannelName"] == "train")
    uploaded = objects(s3, channel["DataSource"]["S3DataSource"]["S3Uri"].split(f"s3://{BUCKET}/")[1])
    assert "split.csv" in uploaded and any(k.startswith("shards/") for k in uploaded)
    # moto answers Completed at once; the wait reports the job counts and returns
    waited = []
    assert wait_for_tuning_job(sm, name, timeout_s=5, poll_s=0, log=waited.append)[
        "HyperParameterTuningJobStatus"] == "Completed"
    assert waited[0].startswith(f"tuning job {name}: Completed, training jobs")


def test_a_tuning_job_s_values_come_back_as_the_search_s_values():
    from bincount.sagemaker.tuning import decode_tuned, encode_value

    search = tuned_search()
    # TunedHyperParameters as SageMaker returns them: text, categorical values as sent
    tuned = {"lr": "0.0031622776601683794", "epochs": "2", "batch_size": encode_value(16), "transpose": "true"}
    assert decode_tuned(search, tuned) == {"lr": 0.0031622776601683794, "epochs": 2, "batch_size": 16,
                                           "transpose": True}


@pytest.mark.parametrize("block, message", [
    ({"strategy": "tpe"}, "with a tuner block SageMaker's tuner draws"),
    ({"early_stopping": {}}, "with a tuner block"),
    ({"tuner": {"strategy": "Grid"}}, "strategy = 'Grid'"),
    ({"tuner": {"max_parallel_jobs": 0}}, "max_parallel_jobs = 0"),
    ({"tuner": {"early_stopping": "Auto"}}, "early_stopping = 'Auto'"),
])
def test_a_bad_tuner_block_is_refused(block, message):
    from bincount.model.grid import grid_search
    from bincount.validation import ConfigError

    with pytest.raises(ConfigError, match=message):
        grid_search({"defaults": TINY.as_dict(), "search": {"space": TUNED_SPACE, "trials": 4, "tuner": {}, **block}})
