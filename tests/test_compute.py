"""Where the train step runs: the compute Config, and the flow on Metaflow's S3 datastore."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from bincount.flow.compute import ComputeConfig
from bincount.model.train import FAIL_ENV

from conftest import DATASTORE, FLOW, REPO, resume_flow, run_flow

EXAMPLES = REPO / "flows" / "compute"


def test_compute_config_defaults_to_local_and_passes_the_engine_block_through():
    assert ComputeConfig.from_dict({}).compute == "local"
    cfg = ComputeConfig.from_dict(json.loads((EXAMPLES / "batch.example.json").read_text()))
    assert cfg.steps == ("train",)
    assert cfg.decorator_kwargs() == {"cpu": 8, "gpu": 1, "memory": 60000, "image": cfg.image,
                                      "queue": "bincount-gpu", "shared_memory": 8192}


@pytest.mark.parametrize("config, message", [
    ({"compute": "lambda"}, "compute = 'lambda': input should be 'local', 'batch', 'kubernetes' or 'sagemaker'"),
    ({"compute": "batch", "gpus": 1}, "unknown key 'gpus'"),
    ({"compute": "batch", "kubernetes": {"namespace": "ml"}}, "'compute' is 'batch'"),
    ({"compute": "batch", "steps": "train"}, "steps = 'train': input should be a valid list"),
    ({"compute": "batch", "gpu": "one"}, "gpu = 'one': input should be a valid integer"),
    ({"compute": "batch", "gpu": 1.5}, "gpu = 1.5: input should be a valid integer"),
    ({"compute": "batch", "memory": -1}, "memory = -1: input should be greater than or equal to 0"),
    ({"compute": "batch", "batch": ["queue"]}, "batch = ['queue']: input should be a valid dictionary"),
    ({"compute": "sagemaker", "steps": ["train", "evaluate"]}, "must be [\"train\"]"),
])
def test_compute_config_rejects_what_would_fail_later(config, message):
    with pytest.raises(ValueError) as error:
        ComputeConfig.from_dict(config)
    assert message in str(error.value)


def show(config_path, *, datastore_s3: bool = True) -> subprocess.CompletedProcess:
    """`python bin_flow.py [--datastore s3] --config compute PATH show`: parses the flow, applies
    the compute config and checks every decorator's arguments; touches no cloud service."""
    env = {**os.environ, "METAFLOW_DATASTORE_SYSROOT_S3": "s3://compute-show/metaflow"}
    top = ["--datastore", "s3"] if datastore_s3 else []
    return subprocess.run([sys.executable, str(FLOW), *top, "--config", "compute", str(config_path), "show"],
                          cwd=DATASTORE, env=env, capture_output=True, text=True, timeout=120)


def decorators_by_step(show_output: str) -> dict[str, list[str]]:
    """Step name -> the decorators `show` lists above it."""
    steps, pending = {}, []
    for line in show_output.splitlines():
        if re.fullmatch(r"@\w+", line.strip()):
            pending.append(line.strip())
        elif line.startswith("Step "):
            steps[line.split()[1]], pending = pending, []
    return steps


@pytest.mark.parametrize("engine", ["batch", "kubernetes"])
def test_remote_compute_decorates_the_train_step_only(engine):
    shown = show(EXAMPLES / f"{engine}.example.json")
    assert shown.returncode == 0, shown.stderr
    decorators = decorators_by_step(shown.stdout)
    assert f"@{engine}" in decorators["train"]
    assert all(f"@{engine}" not in d for step, d in decorators.items() if step != "train")


def test_default_compute_adds_no_decorator_and_needs_no_s3():
    shown = show(EXAMPLES / "batch.example.json").stdout  # a control: the parser does see decorators
    assert "@batch" in shown
    default = subprocess.run([sys.executable, str(FLOW), "show"], cwd=DATASTORE, capture_output=True,
                             text=True, timeout=120)
    assert default.returncode == 0 and "@batch" not in default.stdout and "@kubernetes" not in default.stdout


def test_a_misspelt_decorator_argument_fails_before_anything_runs(tmp_path):
    config = tmp_path / "compute.json"
    config.write_text(json.dumps({"compute": "batch", "batch": {"queue": "gpu", "gpus": 1}}))
    shown = show(config)
    assert shown.returncode != 0
    assert "does not support the attribute 'gpus'" in shown.stdout + shown.stderr


def test_a_step_that_does_not_exist_is_named(tmp_path):
    config = tmp_path / "compute.json"
    config.write_text(json.dumps({"compute": "kubernetes", "steps": ["train", "trian"]}))
    shown = show(config)
    assert shown.returncode != 0 and "no step named ['trian']" in shown.stdout + shown.stderr


@pytest.mark.flow
def test_the_flow_runs_and_resumes_on_the_s3_datastore(s3_endpoint, s3_client, monkeypatch, quick_grid):
    """Every artifact goes through a real S3 server: a run whose second branch fails,
    then a resume that clones the rest, read back through the Client."""
    s3_client.create_bucket(Bucket="mf-datastore")
    env = {"METAFLOW_DATASTORE_SYSROOT_S3": "s3://mf-datastore/metaflow", "METAFLOW_S3_ENDPOINT_URL": s3_endpoint}
    top = {"datastore": "s3"}
    made = []
    try:
        # No deployment: the champion tag stays on the runs the champion tests made.
        # One task at a time: tiny-a finishes before tiny-b fails (see test_flow's resume test);
        # --require-all-points, or the join would go on with tiny-a alone.
        failed = run_flow(env={**env, FAIL_ENV: "tiny-b"}, top=top, grid=quick_grid, source="synthetic",
                          per_class=24, deploy_target="none", max_workers=1, require_all_points=True)
        made.append(failed.run)
        assert failed.status == "failed" and "failing on purpose" in failed.output
        resumed = resume_flow(failed.run.id, env=env, top=top)
        made.append(resumed.run)
        assert resumed.status == "successful", resumed.output[-4000:]
        check_s3_run(resumed.run, failed.run, s3_endpoint, env, s3_client, monkeypatch)
    finally:
        # The runs' metadata is local and their artifacts are on a server that stops with the
        # suite: forget them, so that `bincount serve` in later tests (the latest run of any
        # user) does not pick a run it cannot load.
        for run in made:
            shutil.rmtree(DATASTORE / ".metaflow" / run.parent.id / run.id)


def check_s3_run(run, failed_run, s3_endpoint, env, s3_client, monkeypatch):
    # This process reads the artifacts back from the same server: Metaflow's
    # config was read at import, so point its S3 client (and its s3op workers) there.
    import metaflow.metaflow_config as mf_config
    import torch

    monkeypatch.setitem(mf_config.DATATOOLS_CLIENT_PARAMS, "endpoint_url", s3_endpoint)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    by_name = {t.data.scores["config"]["name"]: t for t in run["train"]}
    assert by_name["tiny-a"].origin_pathspec.startswith(failed_run.pathspec)  # cloned from the failed run
    assert by_name["tiny-b"].origin_pathspec is None  # trained again
    for task in (by_name["tiny-b"], run["end"].task):  # tasks that ran in the resume (clones carry no ds-*)
        assert task.metadata_dict["ds-type"] == "s3" and task.metadata_dict["ds-root"] == "s3://mf-datastore/metaflow"
    data = run.data
    assert len(torch.load(io.BytesIO(data.model_state), weights_only=True)["members"]) == 2
    assert data.test_metrics["n"] == len(data.split_table.query("split == 'test'"))
    assert data.deployment == {"target": "none"}
    keys = [o["Key"] for page in s3_client.get_paginator("list_objects_v2").paginate(
        Bucket="mf-datastore", Prefix=f"metaflow/{run.parent.id}/") for o in page.get("Contents", [])]
    assert any("/data/" in k for k in keys)  # content-addressed artifacts live in the bucket
    # The photos: in shards under the datastore's root, written once by the first run, read by
    # the resumed one; no artifact of any step holds photo bytes.
    root = f"s3://mf-datastore/metaflow/bincount-shards/BinCountFlow/{failed_run.id}"
    assert data.shards["root"] == root
    shard_keys = [o["Key"] for o in s3_client.list_objects_v2(
        Bucket="mf-datastore", Prefix=f"metaflow/bincount-shards/BinCountFlow/{failed_run.id}/")["Contents"]]
    assert sorted(shard_keys) == sorted(f"{root[len('s3://mf-datastore/'):]}/{s}" for s in data.shards["shards"])
    for step in run:
        for task in step:
            for artifact in task:
                assert not holds_photo(artifact.data), f"{artifact.pathspec} holds photo bytes"
    # Checkpoints: the resumed run's tiny-b went on from the failed run's, which stays that run's;
    # the resumed run's own were deleted by its join.
    def checkpoints(run_id):
        prefix = f"metaflow/bincount-checkpoints/BinCountFlow/{run_id}/"
        return [o["Key"] for o in s3_client.list_objects_v2(Bucket="mf-datastore", Prefix=prefix).get("Contents", [])]

    assert checkpoints(failed_run.id) and not checkpoints(run.id)


def holds_photo(value, depth: int = 0) -> bool:
    """Whether ``value`` is JPEG bytes or a dict or list that holds some."""
    if isinstance(value, bytes):
        return value[:3] == b"\xff\xd8\xff"
    if depth < 3 and isinstance(value, dict):
        return any(holds_photo(v, depth + 1) for v in value.values())
    if depth < 3 and isinstance(value, (list, tuple)):
        return any(holds_photo(v, depth + 1) for v in value[:50])
    return False


def test_sagemaker_compute_is_checked_before_training():
    example = json.loads((EXAMPLES / "sagemaker.example.json").read_text())
    with pytest.raises(ValueError, match="REPLACE"):  # the example's placeholders must be filled in
        ComputeConfig.from_dict(example).describe()
    example["sagemaker"].update(role="arn:aws:iam::123456789012:role/training", bucket="models")
    assert ComputeConfig.from_dict(example).describe() == \
        "a SageMaker training job per grid point on 1 x ml.g5.xlarge (spot)"
    with pytest.raises(ValueError, match="instance_type"):
        ComputeConfig.from_dict({**example, "gpu": 1})
