"""The real flow, driven by metaflow.Runner on small data and read back through the Client."""

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from bincount.model.train import FAIL_ENV

from conftest import DATASTORE, TINY_GRID, free_port, resume_flow, run_flow, sample_files, upload_tree

pytestmark = pytest.mark.flow


def test_a_run_keeps_every_artifact_a_user_reads(synthetic_run):
    import torch

    data = synthetic_run.data
    assert data.class_counts == {1: 60, 2: 60, 3: 60, 4: 60, 5: 60}
    assert len(data.subset) == 300 and data.skipped.empty
    assert set(data.split_table["split"]) == {"train", "val", "test"}
    assert data.split_counts.loc[1].sum() == 60
    assert sorted(data.grid_results["name"]) == ["tiny-a", "tiny-b"]
    assert data.chosen == data.grid_results.iloc[0]["name"]
    # the tiny grid asks the join for an ensemble of both points with flip TTA
    assert data.ensemble == data.grid_results["name"].tolist() and data.model_meta["tta"]
    assert data.model_meta["decision"] == "expected"
    for history in data.grid_histories.values():
        assert len(history) == 6 and {"train_loss", "val_accuracy"} <= set(history[0])
    state = torch.load(io.BytesIO(data.model_state), weights_only=True)
    assert data.model_meta["run_id"] == synthetic_run.id and len(state["members"]) == 2
    assert all("fc.weight" in member for member in state["members"])
    metrics = data.test_metrics
    assert metrics["n"] == 45 and {"accuracy", "rmse", "mae", "per_class", "confusion_matrix"} <= set(metrics)
    assert metrics["accuracy"] > 0.3  # five classes: chance is 0.2
    deployment = data.deployment
    assert deployment["target"] == "local" and deployment["smoke_test"]["mismatches"] == []
    assert deployment["smoke_test"]["requests"] == 16 and len(data.model_package) == deployment["package_bytes"]
    # each branch's own curves are on its task too
    branches = {t.data.scores["config"]["name"]: t for t in synthetic_run["train"]}
    assert set(branches) == {"tiny-a", "tiny-b"} and len(branches["tiny-a"].data.history) == 6
    # the join deleted the points' checkpoints: both had ended, their best weights are artifacts
    assert "removed 2 training checkpoint(s)" in synthetic_run["join"].task.stdout
    assert not (DATASTORE / ".bincount-checkpoints" / "BinCountFlow" / synthetic_run.id).exists()


def test_a_run_s_photos_are_in_shards_that_its_index_describes(synthetic_run):
    from bincount.data.shards import ShardSet
    from bincount.flow.runs import photos_of

    data = synthetic_run.data
    shards = ShardSet.from_dict(data.shards)
    # beside the local datastore, in a folder of the run's own
    assert shards.root.endswith(f".bincount-shards/BinCountFlow/{synthetic_run.id}") and len(shards.shards) >= 3
    assert {"id", "label", "shard", "checksum"} <= set(data.subset.columns)
    assert set(data.subset["shard"]) == set(shards.shards)
    assert {s.split("-", 1)[0] for s in shards.shards} == {"part000", "part001"}  # one set per fetch task
    photos = photos_of(synthetic_run)
    read = dict(photos.read(data.subset["id"]))  # every photo, each checked against its checksum
    assert len(read) == 300 and all(raw[:2] == b"\xff\xd8" for raw in read.values())
    assert "images" not in data  # the photos themselves are in no artifact


def cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "bincount.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_cli_predict_and_evaluate_use_the_run(synthetic_run, synthetic_jpegs, tmp_path):
    image = tmp_path / "bin.jpg"
    image.write_bytes(synthetic_jpegs[3])
    (tmp_path / "junk.jpg").write_bytes(b"junk")
    out = cli("predict", str(image), str(tmp_path / "junk.jpg"), "--run", synthetic_run.id)
    assert out.returncode == 1  # one image could not be read, and says so
    assert "count=" in out.stdout and "junk.jpg: skipped" in out.stderr
    out = cli("evaluate", "--run", synthetic_run.id, "--source", "synthetic", "--quiet")
    assert out.returncode == 0, out.stderr
    metrics = json.loads(out.stdout)
    assert metrics["n"] == 120 and 0 <= metrics["accuracy"] <= 1 and metrics["run"].endswith(synthetic_run.id)


def test_cli_serve_starts_the_latest_run(synthetic_run, synthetic_jpegs, tmp_path):
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "bincount.cli", "serve", "--port", str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              env={**os.environ, "TMPDIR": str(tmp_path)})
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                ping = requests.get(f"http://127.0.0.1:{port}/ping", timeout=2)
                break
            except requests.ConnectionError:
                assert server.poll() is None, server.stdout.read().decode()
                time.sleep(0.5)
        # other tests' runs may be newer than synthetic_run: the newest successful one of this user
        from metaflow import Flow

        latest = max((run for run in Flow("BinCountFlow").runs() if run.successful), key=lambda run: int(run.id))
        assert ping.json()["run_id"] == latest.id
        answer = requests.post(f"http://127.0.0.1:{port}/invocations", data=synthetic_jpegs[2],
                               headers={"Content-Type": "image/jpeg"}, timeout=30).json()
        assert answer["predictions"][0]["run_id"] == latest.id
        # the package's folder went once the model was loaded: a server that is killed leaves nothing
        assert not list(tmp_path.glob("bincount-serve-*"))
    finally:
        server.terminate()
        server.wait(10)


def test_real_photos_from_s3_with_bad_objects_reported_by_id(s3_client, s3_endpoint, abid_sample, abid_ids,
                                                             bad_objects, tmp_path, one_point_grid):
    files, reasons = bad_objects
    good = {c: abid_ids[c][:8] for c in (1, 2, 3, 4, 5)}
    upload_tree(s3_client, "abid-flow", "mirror",
                {**sample_files(abid_sample, [i for ids in good.values() for i in ids]), **files})
    file_list = tmp_path / "file_list.json"
    listing = {str(c): [f"metadata/{i}.json" for i in ids] for c, ids in good.items()}
    listing["3"] += [f"metadata/{i}.json" for i in reasons]
    file_list.write_text(json.dumps(listing))
    env = {"AWS_ENDPOINT_URL": s3_endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    # three fetch tasks: the report gathered from them is the one a single download makes
    running = run_flow(env=env, grid=one_point_grid, source="s3://abid-flow/mirror", file_list=str(file_list),
                       deploy_target="none", fetch_tasks=3)
    assert running.status == "successful", running.output[-4000:]
    data = running.run.data
    assert sorted(data.subset["id"]) == sorted(i for ids in good.values() for i in ids)
    skipped = dict(zip(data.skipped["id"], data.skipped["reason"]))
    assert set(skipped) == set(reasons)
    for bin_id, reason in reasons.items():
        assert reason in skipped[bin_id]
    assert data.deployment == {"target": "none"} and data.test_metrics["n"] == 6


def test_resume_reruns_only_the_failed_branch_from_its_last_checkpoint(tmp_path):
    """With --require-all-points a point that fails after its retry fails the run; `resume` trains it
    again from its last checkpoint. Also the one flow run with empty bins: --classes 0-5."""
    # One task at a time, so tiny-a has finished (and is cloned by the resume) before tiny-b fails:
    # Metaflow stops every running task when one fails.
    grid = json.loads(TINY_GRID.read_text())
    grid["defaults"]["epochs"] = 3
    (tmp_path / "grid.json").write_text(json.dumps(grid))
    failed = run_flow(env={FAIL_ENV: "tiny-b"}, grid=tmp_path / "grid.json", source="synthetic", per_class=30,
                      classes="0-5", deploy_target="none", max_workers=1, require_all_points=True)
    assert failed.status == "failed"
    # attempt 1 fails after epoch 1; the retry goes on from its checkpoint and fails after epoch 2
    assert "failing on purpose after epoch 1" in failed.output and "failing on purpose after epoch 2" in failed.output
    assert "failing on purpose after epoch 3" not in failed.output  # no third attempt
    assert "tiny-b: continuing from the checkpoint after epoch 1 of 3" in failed.output
    resumed = resume_flow(failed.run.id)
    assert resumed.status == "successful", resumed.output[-4000:]
    assert "tiny-b: continuing from the checkpoint after epoch 2 of 3" in resumed.output
    assert "tiny-b epoch 2/3" not in resumed.output and "tiny-b epoch 3/3" in resumed.output
    run = resumed.run
    origin = failed.run.pathspec
    assert run["split"].task.origin_pathspec.startswith(origin)
    by_name = {t.data.scores["config"]["name"]: t for t in run["train"]}
    assert by_name["tiny-a"].origin_pathspec.startswith(origin)  # finished before: cloned
    assert by_name["tiny-b"].origin_pathspec is None  # failed before: trained again
    assert run.data.chosen in {"tiny-a", "tiny-b"}
    assert run.data.class_counts == {c: 30 for c in range(6)}
    assert run.data.model_meta["classes"] == [0, 1, 2, 3, 4, 5] and len(run.data.test_metrics["per_class"]) == 6
    # the resumed run reads the shards the first run wrote; it writes none of its own
    assert run.data.shards == failed.run["gather_subset"].task.data.shards
    assert run.data.shards["root"].endswith(failed.run.id)
    assert not Path(run.data.shards["root"].replace(failed.run.id, run.id)).exists()


def test_unreachable_bucket_fails_fast_with_advice():
    started = time.monotonic()
    running = run_flow(env={"AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"}, deploy_target="none")
    assert running.status == "failed"
    assert time.monotonic() - started < 90  # 60 s for the source, the rest is Metaflow start-up
    output = running.output
    assert "Cannot reach the data source 's3://aft-vbi-pds'" in output and "--source synthetic" in output


def sagemaker_config(tmp_path, **settings):
    path = tmp_path / "deploy.json"
    path.write_text(json.dumps(settings))
    return path


def test_sagemaker_target_creates_an_endpoint_on_a_real_server(s3_client, s3_endpoint, tmp_path, one_point_grid):
    s3_client.create_bucket(Bucket="flow-models")
    # moto answers invoke_endpoint with a canned body and fails on non-UTF-8
    # bodies, so the smoke test sends base64 JSON and records answers as unverified.
    config = sagemaker_config(tmp_path, role_arn="arn:aws:iam::123456789012:role/bincount-flow-test",
                              bucket="flow-models", endpoint_name="flow-test",
                              smoke_content_type="application/json")
    env = {"AWS_ENDPOINT_URL": s3_endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}
    running = run_flow(env=env, deploy_config=config, grid=one_point_grid, source="synthetic", per_class=30,
                       deploy_target="sagemaker")
    assert running.status == "successful", running.output[-4000:]
    deployment = running.run.data.deployment
    assert deployment["target"] == "sagemaker" and deployment["action"] == "created"
    assert deployment["model_data_url"].startswith("s3://flow-models/bincount/models/")
    bucket, key = deployment["model_data_url"][len("s3://"):].split("/", 1)
    assert s3_client.get_object(Bucket=bucket, Key=key)["Body"].read() == running.run.data.model_package
    assert "champion:sagemaker" in running.run.user_tags


def test_sagemaker_target_without_settings_fails_before_training():
    """No deploy config at all: the start step stops the run. (A config missing a key never starts
    a run: see test_cli's bad-config test.)"""
    started = time.monotonic()
    running = run_flow(source="synthetic", deploy_target="sagemaker")
    assert running.status == "failed" and "role_arn" in running.output
    assert [step.id for step in running.run] == ["start"]
    assert time.monotonic() - started < 60
