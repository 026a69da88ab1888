"""Data capture and monitoring: the local endpoint's capture, SageMaker's DataCaptureConfig (moto),
``bincount monitor`` and MonitorFlow, and the audit of captured photos.

Real parts throughout: the endpoint is the local endpoint subprocess over HTTP, S3 and SageMaker
are the moto server on loopback, the photos are real JPEGs, the reference is a real flow run.
"""

from __future__ import annotations

import base64
import json
import math
import random
import re
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import requests
from serving_helpers import wait_until

from bincount.data.captures import CUSTOM_ATTRIBUTES_HEADER, INFERENCE_ID_HEADER
from bincount.data.sources import iter_captures, open_captures
from bincount.monitor import Settings, build_report, read_traffic, render_html
from bincount.serving.capture import CaptureWriter
from bincount.serving.endpoint import start_local_endpoint
from bincount.serving.package import build_package

from conftest import DATASTORE, REPO, card_text, upload_tree

CLASSES = [1, 2, 3, 4, 5]
# SageMaker's capture key: <endpoint>/<variant>/yyyy/mm/dd/hh/<mm>-<ss>-<ms>-<uuid>.jsonl
CAPTURE_KEY = re.compile(r"^local/AllTraffic/\d{4}/\d{2}/\d{2}/\d{2}/\d{2}-\d{2}-\d{3}-[0-9a-f]{32}\.jsonl$")


@pytest.fixture(scope="module")
def package(tiny_model) -> bytes:
    return build_package(*tiny_model)


def capture_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def records(folder: Path) -> list[dict]:
    return [json.loads(line) for path in capture_files(folder) for line in path.read_text().splitlines()]


def post(url: str, body: bytes, content_type: str = "image/jpeg", accept: str = "application/json",
         **headers) -> requests.Response:
    return requests.post(f"{url}/invocations", data=body, timeout=30,
                         headers={"Content-Type": content_type, "Accept": accept, **headers})


# --- the local endpoint's capture ---------------------------------------------------

def test_the_local_endpoint_captures_answered_requests_as_sagemaker_does(package, synthetic_jpegs, tmp_path,
                                                                         monkeypatch):
    capture = tmp_path / "capture"
    monkeypatch.setenv("BINCOUNT_CAPTURE_DIR", str(capture))  # read by the server subprocess, as its option is
    monkeypatch.setenv("BINCOUNT_MAX_BATCH_SIZE", "1")  # no batch timing at start-up
    answers = {}
    with start_local_endpoint(package) as endpoint:
        for count, raw in synthetic_jpegs.items():
            answer = post(endpoint.url, raw, **{CUSTOM_ATTRIBUTES_HEADER: f"expected_quantity={count}",
                                                INFERENCE_ID_HEADER: f"bin-{count}"})
            assert answer.status_code == 200
            answers[f"bin-{count}"] = answer.json()["predictions"][0]
        two = json.dumps({"instances": [{"b64": base64.b64encode(synthetic_jpegs[c]).decode()} for c in (2, 3)]})
        csv_answer = post(endpoint.url, two.encode(), "application/json", accept="text/csv")
        assert csv_answer.status_code == 200
        assert post(endpoint.url, b"not a photo").status_code == 400  # refused: nothing to capture
        log = endpoint.log()
    assert f"capturing 100% of answered requests (requests and answers) to {capture}" in log

    # Stopped: every file is in place, named and laid out as SageMaker names and lays them out.
    names = [p.relative_to(capture).as_posix() for p in capture_files(capture)]
    assert names and all(CAPTURE_KEY.match(n) for n in names), names
    lines = records(capture)
    assert len(lines) == 6  # 5 photos and the JSON request; the refused request is not captured
    for line in lines:
        assert set(line) == {"captureData", "eventMetadata", "eventVersion"} and line["eventVersion"] == "0"
        assert set(line["captureData"]) == {"endpointInput", "endpointOutput"}
        assert line["captureData"]["endpointInput"]["mode"] == "INPUT"
        assert line["captureData"]["endpointOutput"]["mode"] == "OUTPUT"
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", line["eventMetadata"]["inferenceTime"])
    by_id = {line["eventMetadata"].get("inferenceId"): line for line in lines}
    one = by_id["bin-3"]
    assert one["eventMetadata"]["customAttributes"] == ["expected_quantity=3"]
    assert one["captureData"]["endpointInput"]["observedContentType"] == "image/jpeg"
    assert one["captureData"]["endpointInput"]["encoding"] == "BASE64"
    assert base64.b64decode(one["captureData"]["endpointInput"]["data"]) == synthetic_jpegs[3]  # as sent
    assert one["captureData"]["endpointOutput"]["encoding"] == "JSON"  # text, as SageMaker keeps JSON
    assert json.loads(one["captureData"]["endpointOutput"]["data"])["predictions"][0] == answers["bin-3"]
    batch = by_id[None]  # no inference id was sent: none recorded
    assert set(batch["eventMetadata"]) == {"eventId", "inferenceTime"}
    assert batch["captureData"]["endpointInput"]["encoding"] == "JSON"
    assert json.loads(batch["captureData"]["endpointInput"]["data"]) == json.loads(two)
    assert batch["captureData"]["endpointOutput"]["observedContentType"].startswith("text/csv")
    assert batch["captureData"]["endpointOutput"]["encoding"] == "CSV"
    assert batch["captureData"]["endpointOutput"]["data"] == csv_answer.text

    # The monitor reads it back: every photo, its answer, its expected count.
    traffic = read_traffic(iter_captures(open_captures(capture), progress=False), CLASSES)
    assert traffic.problems == [] and traffic.events == 6 and len(traffic.rows) == 7
    rows = {row["inference_id"] or row["id"]: row for row in traffic.rows}
    for bin_id, answer in answers.items():
        assert rows[bin_id]["predicted"] == answer["count"]
        assert rows[bin_id]["confidence"] == pytest.approx(max(answer["probabilities"].values()))
        assert rows[bin_id]["expected"] == int(bin_id[-1]) and rows[bin_id]["answered_by"] == "test-run"
    csv_rows = [row for row in traffic.rows if row["inference_id"] is None]
    assert [row["id"].rsplit(":", 1)[1] for row in csv_rows] == ["0", "1"]  # photo n of the request
    assert [row["predicted"] for row in csv_rows] == [int(line.split(",")[0]) for line in csv_answer.text.split()]


def test_sampling_is_honoured_and_a_failing_capture_never_fails_a_request(package, synthetic_jpegs, tmp_path,
                                                                           monkeypatch):
    capture, seed = tmp_path / "capture", 7
    for name, value in {"BINCOUNT_CAPTURE_DIR": capture, "BINCOUNT_CAPTURE_PERCENT": 50,
                        "BINCOUNT_CAPTURE_SEED": seed, "BINCOUNT_MAX_BATCH_SIZE": 1}.items():
        monkeypatch.setenv(name, str(value))
    draws = random.Random(seed)
    sampled = [draws.random() * 100 < 50 for _ in range(46)]  # the writer's draws, one per answered request
    assert any(sampled[:6]), "the seed must sample a request while capture is broken"
    photos = list(synthetic_jpegs.values())
    with start_local_endpoint(package, workdir=tmp_path / "work") as endpoint:
        # The capture folder is gone, a file in its place: nothing can be written there.
        capture.rmdir()
        capture.write_text("not a folder")
        for i in range(6):
            answer = post(endpoint.url, photos[i % 5], **{INFERENCE_ID_HEADER: f"broken-{i}"})
            assert answer.status_code == 200 and answer.json()["predictions"][0]["run_id"] == "test-run"
        assert wait_until(lambda: "capture failed" in endpoint.log(), 20), endpoint.log()[-2000:]
        assert "NotADirectoryError" in endpoint.log()
        # Repaired: capture goes on, sampling as before.
        capture.unlink()
        capture.mkdir()
        for i in range(40):
            assert post(endpoint.url, photos[i % 5], **{INFERENCE_ID_HEADER: f"ok-{i}"}).status_code == 200
        assert endpoint.process.poll() is None
    captured = [line["eventMetadata"]["inferenceId"] for line in records(capture)]
    assert captured == [f"ok-{i}" for i in range(40) if sampled[6 + i]]  # exactly the sampled ones, in order
    assert 10 <= len(captured) <= 30  # and about half


# --- drift -----------------------------------------------------------------------------

START = datetime(2024, 5, 1, 10, 0, tzinfo=timezone.utc)


def capture_answers(folder: Path, photos: list[bytes], predictor, *, attributes: list[str | None] | None = None,
                    endpoint: str = "bincount", start: datetime = START, hours: float = 3.0) -> Path:
    """Each photo answered by ``predictor`` and captured by the real writer, spread over ``hours``
    (the writer's clock is the only thing not real: the requests are placed in time)."""
    from bincount.serving.handler import output_fn

    answers = predictor.predict_bytes(photos)
    step = timedelta(hours=hours) / len(photos)
    times = iter(start + k * step for k in range(len(photos)))
    writer = CaptureWriter(folder, endpoint_name=endpoint, clock=lambda: next(times))
    for k, (raw, answer) in enumerate(zip(photos, answers)):
        attribute = attributes[k] if attributes else None
        headers = {CUSTOM_ATTRIBUTES_HEADER: attribute} if attribute else {}
        assert writer.record(request_body=raw, request_type="image/jpeg", response_body=output_fn([answer]).encode(),
                             response_type="application/json", headers=headers)
    writer.close()
    assert writer.stats["captured"] == len(photos) and not writer.stats["failed"]
    return folder


def fresh_bins(counts, per_count: int, seed: int) -> list[bytes]:
    """New synthetic photos (seeds no run has seen), drawn as the run's own photos were."""
    from bincount.data.synthetic import synthetic_bin

    return [synthetic_bin(count, seed=seed + count * 1000 + i) for count in counts for i in range(per_count)]


@pytest.fixture(scope="module")
def traffic_folders(synthetic_run, tmp_path_factory):
    """Captured traffic answered by the synthetic run's model: drawn like its photos (12 of each
    count), and shifted (only photos of one count), each spread over three hours."""
    from bincount.flow.runs import predictor_of

    predictor = predictor_of(synthetic_run)
    unshifted = capture_answers(tmp_path_factory.mktemp("unshifted"), fresh_bins(CLASSES, 12, 8_000_000), predictor)
    shifted = capture_answers(tmp_path_factory.mktemp("shifted"), fresh_bins([1], 40, 9_000_000), predictor)
    return unshifted, shifted


@pytest.mark.flow
def test_drift_is_found_in_shifted_traffic_and_not_in_traffic_drawn_like_the_reference(synthetic_run,
                                                                                       traffic_folders):
    from bincount.monitor import reference_of

    reference = reference_of(synthetic_run)
    assert reference.run == synthetic_run.pathspec and len(reference.counts) == 45 and reference.classes == CLASSES
    settings = Settings(bucket="hour", relabel=10)
    unshifted, shifted = (build_report(read_traffic(iter_captures(open_captures(folder), progress=False), CLASSES,
                                                    keep=10), reference, settings, capture=str(folder))
                          for folder in traffic_folders)

    assert not unshifted.drift, unshifted.overall
    assert unshifted.overall["counts"]["psi"] < 0.2 or unshifted.overall["counts"]["chi2_p"] >= 0.01
    assert shifted.drift and shifted.overall["counts"]["drift"], shifted.overall
    assert shifted.overall["counts"]["psi"] > 1 and shifted.overall["counts"]["chi2_p"] < 1e-6
    # Over time: three hourly buckets, each judged on its own.
    assert unshifted.buckets["bucket"].tolist() == ["2024-05-01 10:00", "2024-05-01 11:00", "2024-05-01 12:00"]
    assert unshifted.buckets["photos"].sum() == 60 and shifted.buckets["drift"].all()
    assert set(unshifted.table.columns) >= {"id", "time", "bucket", "predicted", "confidence", "p_1", "p_5"}
    # The least confident first, each with a thumbnail.
    relabel = unshifted.relabel()
    assert len(relabel) == 10 and relabel["confidence"].is_monotonic_increasing
    assert relabel["confidence"].max() <= unshifted.table["confidence"].nsmallest(11).max()
    assert set(unshifted.thumbnails) == set(relabel["id"])


def test_the_drift_statistics_and_their_thresholds():
    from bincount.monitor import compare_confidences, compare_counts, psi

    assert psi([0.2] * 5, [0.2] * 5) == 0
    assert psi([0.5, 0.5], [0.9, 0.1]) == pytest.approx(0.4 * math.log(0.9 / 0.5) + -0.4 * math.log(0.1 / 0.5))
    same = compare_counts([1, 2, 3, 4, 5] * 10, [1, 2, 3, 4, 5] * 10, CLASSES)
    assert same == {"psi": 0.0, "chi2_p": 1.0, "drift": False}
    # A large PSI from a handful of photos is noise: the chi-square test holds it back.
    few = compare_counts([1, 2, 3, 4, 5] * 9, [1, 1, 2], CLASSES)
    assert few["psi"] > 0.2 and few["chi2_p"] > 0.01 and not few["drift"]
    many = compare_counts([1, 2, 3, 4, 5] * 9, [1] * 30 + [2] * 10, CLASSES)
    assert many["drift"]
    assert not compare_confidences([0.5, 0.6, 0.7] * 10, [0.55, 0.65, 0.7] * 10)["drift"]
    assert compare_confidences([0.5, 0.6, 0.7] * 10, [0.95, 0.99, 0.97] * 10)["drift"]
    with pytest.raises(ValueError, match="bucket must be one of"):
        Settings(bucket="week")


# --- bad captures are reported, never dropped silently ------------------------------------

def test_bad_capture_lines_and_files_are_reported_by_file_and_line(tiny_model, synthetic_jpegs, tmp_path):
    from bincount.data.captures import capture_record
    from bincount.model.predictor import load_predictor

    folder = capture_answers(tmp_path / "capture", [synthetic_jpegs[2], synthetic_jpegs[4]],
                             load_predictor(*tiny_model), endpoint="local")
    good = records(folder)[0]
    answer = good["captureData"]["endpointOutput"]["data"]
    when = datetime(2024, 5, 1, 12, tzinfo=timezone.utc)

    def line(**changes) -> str:
        record = capture_record(event_id=changes.pop("event_id", "e-1"), inference_time=when,
                                request=(synthetic_jpegs[1], "image/jpeg"), response=(answer.encode(), "application/json"))
        for path, value in changes.items():
            *parents, leaf = path.split("__")
            target = record
            for parent in parents:
                target = target[parent]
            if value is None:
                del target[leaf]
            else:
                target[leaf] = value
        return json.dumps(record)

    bad = folder / "local" / "AllTraffic" / "2024" / "05" / "01" / "12" / "00-00-000-bad.jsonl"
    bad.parent.mkdir(parents=True)
    bad.write_text("\n".join([
        line(event_id="fine-1"),
        "{not json",
        line(event_id="fine-1"),  # the same event twice
        line(eventMetadata=None),
        line(captureData__endpointInput__data="***"),
        line(captureData__endpointInput__mode="OUTPUT"),
        line(captureData__endpointOutput__data='{"answer": 42}', event_id="e-2"),
        "",  # a blank line is nothing, not a problem
        line(captureData__endpointOutput=None, captureData__endpointInput__observedContentType="text/plain",
             event_id="e-3"),
        line(eventMetadata__inferenceTime="yesterday"),
    ]) + "\n")
    (bad.parent / "00-00-001-binary.jsonl").write_bytes(b"\xff\xfe\x00binary")
    (bad.parent / ".00-00-002-still-being-written.jsonl.partial").write_text("{half a li")  # in progress: not read

    traffic = read_traffic(iter_captures(open_captures(folder), progress=False), CLASSES)
    name = bad.relative_to(folder).as_posix()
    binary = name.replace("000-bad", "001-binary")
    found = {(p.file, p.line): p.reason for p in traffic.problems}
    assert set(found) == {(name, 2), (name, 3), (name, 4), (name, 5), (name, 6), (name, 7), (name, 9), (name, 10),
                          (binary, 0)}, found
    assert found[(name, 2)].startswith("not JSON")
    assert "captured twice" in found[(name, 3)]
    assert "no captureData or eventMetadata" in found[(name, 4)]
    assert "not valid base64" in found[(name, 5)]
    assert "mode is 'OUTPUT', not 'INPUT'" in found[(name, 6)]
    assert "not bincount's predictions" in found[(name, 7)]
    assert "holds no photo" in found[(name, 9)]
    assert "not an ISO 8601 time" in found[(name, 10)]
    assert "not UTF-8" in found[(binary, 0)]
    assert len(traffic.rows) == 3  # the two good files' photos and the first fine line
    report = build_report(traffic, _flat_reference(), Settings(), capture=str(folder))
    page = render_html(report)
    assert f"{name}</td><td class=num>7</td>" in page and "Skipped capture lines and files (9)" in page
    assert [p["line"] for p in report.summary()["problems"]] == [2, 3, 4, 5, 6, 7, 9, 10, 0]


def test_captures_of_requests_only_answers_only_and_several_photos_a_request(tiny_model, synthetic_jpegs, tmp_path):
    from bincount.data.sources import open_source
    from bincount.model.predictor import load_predictor

    predictor = load_predictor(*tiny_model)
    two = json.dumps({"instances": [base64.b64encode(synthetic_jpegs[c]).decode() for c in (2, 3)]}).encode()
    answer = json.dumps({"predictions": predictor.predict_bytes([synthetic_jpegs[2], synthetic_jpegs[3]])}).encode()
    folders = {}
    for mode in ("input", "output"):
        writer = CaptureWriter(tmp_path / mode, mode=mode)
        writer.record(request_body=two, request_type="application/json", response_body=answer,
                      response_type="application/json", headers={CUSTOM_ATTRIBUTES_HEADER: "expected_quantity=2|3"})
        writer.close()
        folders[mode] = tmp_path / mode
    line, = records(folders["input"])
    assert set(line["captureData"]) == {"endpointInput"}
    # Requests only: the run's model answers them again.
    traffic = read_traffic(iter_captures(open_captures(folders["input"]), progress=False), CLASSES,
                           predict=predictor.predict_bytes)
    assert [(r["predicted_by"], r["expected"]) for r in traffic.rows] == [("recomputed", 2), ("recomputed", 3)]
    assert [r["predicted"] for r in traffic.rows] == [p["count"] for p in json.loads(answer)["predictions"]]
    assert set(traffic.photos) == {r["id"] for r in traffic.rows}
    # Answers only: counted and judged for drift, but there is no photo to show.
    traffic = read_traffic(iter_captures(open_captures(folders["output"]), progress=False), CLASSES)
    assert [(r["predicted_by"], r["expected"]) for r in traffic.rows] == [("endpoint", 2), ("endpoint", 3)]
    assert traffic.photos == {}
    # As an audit source: a bin per photo, each with its own record.
    source = open_source(f"capture:{folders['input']}")
    ids = list(source.list_ids())
    assert [i.rsplit(":", 1)[1] for i in ids] == ["0", "1"] and ids[0].split(":")[0] == line["eventMetadata"]["eventId"]
    assert [json.loads(source.read(f"metadata/{i}.json"))["EXPECTED_QUANTITY"] for i in ids] == [2, 3]
    assert source.read(f"bin-images/{ids[1]}.jpg") == synthetic_jpegs[3]
    assert source.not_judged_reason(ids[0]) is None
    answers_only = open_source(f"capture:{folders['output']}")
    assert list(answers_only.list_ids()) == []
    assert "capture mode output only" in str(answers_only.problems[0])


def _flat_reference():
    from bincount.monitor import reference_from_predictions

    uniform = {"count": 3, "probabilities": {str(c): 0.2 for c in CLASSES}}
    return reference_from_predictions("BinCountFlow/0", "0", CLASSES, [uniform] * 10, [1, 2, 3, 4, 5])


# --- SageMaker: DataCaptureConfig on the endpoint config, captures read from S3 (moto) ------

ROLE = "arn:aws:iam::123456789012:role/bincount-tests"


def test_the_sagemaker_endpoint_config_carries_the_capture_settings(s3_endpoint, monkeypatch, package, tiny_model,
                                                                    synthetic_jpegs, tmp_path):
    from bincount.model.predictor import load_predictor
    from bincount.sagemaker.endpoint import SageMakerTarget, deploy_to_sagemaker, make_clients

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    clients = make_clients("us-east-1")
    bucket = "bincount-capture-tests"
    upload_tree(clients["s3"], bucket, "", {"placeholder": b""})  # makes the bucket
    name = f"capture-{time.monotonic_ns() % 10**8}"
    base = {"role_arn": ROLE, "bucket": bucket, "region": "us-east-1", "smoke_content_type": "application/json",
            "wait_timeout_s": 30}
    target = SageMakerTarget.from_config({**base, "endpoint_name": name, "capture_s3_uri": f"s3://{bucket}/capture/",
                                          "capture_percent": 20, "capture_mode": "input"})
    report = deploy_to_sagemaker(package, {**tiny_model[1], "run_id": "17"}, target, poll_s=0.05,
                                 log=lambda _: None)
    config = clients["sagemaker"].describe_endpoint_config(EndpointConfigName=report["endpoint_config_name"])
    assert config["DataCaptureConfig"] == {
        "EnableCapture": True, "InitialSamplingPercentage": 20, "DestinationS3Uri": f"s3://{bucket}/capture",
        "CaptureOptions": [{"CaptureMode": "Input"}],
        "CaptureContentTypeHeader": {"JsonContentTypes": ["application/json"], "CsvContentTypes": ["text/csv"]}}
    assert report["capture"] == f"s3://{bucket}/capture/{name}"
    both = deploy_to_sagemaker(package, {**tiny_model[1], "run_id": "18"},
                               SageMakerTarget.from_config({**base, "endpoint_name": f"{name}-b",
                                                            "capture_s3_uri": f"s3://{bucket}/capture"}),
                               poll_s=0.05, log=lambda _: None)
    options = clients["sagemaker"].describe_endpoint_config(EndpointConfigName=both["endpoint_config_name"])
    assert options["DataCaptureConfig"]["CaptureOptions"] == [{"CaptureMode": "Input"}, {"CaptureMode": "Output"}]
    assert options["DataCaptureConfig"]["InitialSamplingPercentage"] == 100
    off = deploy_to_sagemaker(package, {**tiny_model[1], "run_id": "19"},
                              SageMakerTarget.from_config({**base, "endpoint_name": f"{name}-off"}), poll_s=0.05,
                              log=lambda _: None)
    assert not clients["sagemaker"].describe_endpoint_config(
        EndpointConfigName=off["endpoint_config_name"]).get("DataCaptureConfig")
    assert off["capture"] is None

    # What SageMaker would write there (the same format, under the endpoint's name) is read from S3,
    # recursively, and a bad file there is reported by its key.
    local = capture_answers(tmp_path / "capture", list(synthetic_jpegs.values()), load_predictor(*tiny_model),
                            endpoint=name)
    files = {p.relative_to(local).as_posix(): p.read_bytes() for p in capture_files(local)}
    files[f"{name}/AllTraffic/2024/05/01/12/00-00-000-bad.jsonl"] = b'{"captureData": {}}\n'
    upload_tree(clients["s3"], bucket, "capture", files)
    traffic = read_traffic(iter_captures(open_captures(report["capture"]), progress=False), CLASSES)
    # names are relative to the prefix read: <capture_s3_uri>/<endpoint> holds AllTraffic/...
    assert len(traffic.rows) == 5 and {r["file"] for r in traffic.rows} <= {k.split("/", 1)[1] for k in files}
    assert [(p.file, p.line) for p in traffic.problems] == [("AllTraffic/2024/05/01/12/00-00-000-bad.jsonl", 1)]


def test_capture_settings_are_checked_like_the_others():
    from bincount.sagemaker.endpoint import SageMakerTarget

    base = {"role_arn": ROLE, "bucket": "b-1"}
    for extra, message in [({"capture_percent": 101}, "capture_percent = 101: input should be less than or equal"),
                           ({"capture_percent": 12.5}, "capture_percent = 12.5: input should be a valid integer"),
                           ({"capture_mode": "all"}, "capture_mode = 'all': input should be 'input', 'output' or"),
                           ({"capture_s3_uri": "bucket/capture"}, "capture_s3_uri 'bucket/capture': expected s3://"),
                           ({"capture_s3_uri": "s3://REPLACE-me/x"}, "placeholder")]:
        with pytest.raises(ValueError, match=re.escape(message)):
            SageMakerTarget.from_config({**base, **extra})


# --- bincount monitor, and MonitorFlow ------------------------------------------------------

@pytest.mark.parametrize("argv, wanted", [
    (["monitor", "--help"], ["--capture PATH", "--run ID", "--champion TARGET", "--production", "--branch NAME",
                             "user:<name>", "exit status: 0 no drift, 1 drift, 2 error"]),
    (["serve", "--help"], ["--capture-dir PATH", "--capture-percent P", "--capture-mode", "--capture-seed N",
                           "$BINCOUNT_CAPTURE_DIR"]),
    (["audit", "--help"], ["capture:PATH", "expected_quantity=N"]),
])
def test_the_new_options_are_in_the_help_as_plain_text(capsys, argv, wanted):
    from bincount.cli import main

    with pytest.raises(SystemExit) as done:
        main(argv)
    text = " ".join(capsys.readouterr().out.split())
    assert done.value.code == 0 and all(" ".join(w.split()) in text for w in wanted), text
    assert not re.search(r"``|:(class|func|meth|mod):", text)


@pytest.mark.flow
def test_monitor_cli_writes_the_report_and_exits_by_drift(synthetic_run, traffic_folders, tmp_path, capsys):
    from bincount.cli import main

    unshifted, shifted = traffic_folders
    (shifted / "broken.jsonl").write_text('{"captureData": 1}\n')
    try:
        out = tmp_path / "shifted"
        assert main(["monitor", "--capture", str(shifted), "--run", synthetic_run.id, "--out", str(out),
                     "--bucket", "hour", "--relabel", "5", "--quiet"]) == 1
        printed = capsys.readouterr()
        assert "DRIFT" in printed.out and f"BinCountFlow/{synthetic_run.id}" in printed.out
        assert "capture: skipped broken.jsonl line 1: no captureData or eventMetadata object" in printed.err
        summary = json.loads((out / "summary.json").read_text())
        assert summary["drift"] is True and summary["photos"] == 40 and summary["requests"] == 40
        assert summary["problems"] == [{"file": "broken.jsonl", "line": 1,
                                        "reason": "no captureData or eventMetadata object"}]
        assert len(summary["buckets"]) == 3 and len(summary["relabel"]) == 5
        table = (out / "monitor.csv").read_text().splitlines()
        assert len(table) == 41 and table[0].startswith("id,event_id,bucket,time,predicted,confidence,p_1,")
        page = (out / "monitor.html").read_text()
        assert page.count('<img src="data:image/jpeg;base64,') == 5  # the photos to relabel
        assert page.count('<img src="data:image/png;base64,') == 3  # the charts
        assert "http://" not in page and "https://" not in page
    finally:
        (shifted / "broken.jsonl").unlink()
    assert main(["monitor", "--capture", str(unshifted), "--run", synthetic_run.id, "--out", str(tmp_path / "same"),
                 "--quiet"]) == 0
    assert "no drift" in capsys.readouterr().out
    assert main(["monitor", "--capture", str(tmp_path / "nowhere"), "--run", synthetic_run.id]) == 2
    assert "no such folder" in capsys.readouterr().err
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.jsonl").write_text("junk\n")
    assert main(["monitor", "--capture", str(tmp_path / "junk"), "--run", synthetic_run.id, "--quiet",
                 "--out", str(tmp_path / "junk-report")]) == 2
    assert "no usable captured predictions" in capsys.readouterr().err


@pytest.mark.flow
def test_monitor_flow_keeps_the_report_and_shows_it_in_a_card(synthetic_run, traffic_folders, tmp_path):
    from metaflow import Runner
    from metaflow.cards import get_cards

    with Runner(str(REPO / "flows" / "monitor_flow.py"), show_output=False, cwd=str(DATASTORE)).run(
            capture=str(traffic_folders[1]), run=synthetic_run.id, bucket="hour", relabel=4,
            out=str(tmp_path / "report")) as running:
        assert running.status == "successful", (running.stdout + running.stderr)[-4000:]
        run = running.run
    data = run.data
    assert data.drift is True and data.model_run == synthetic_run.pathspec
    assert data.summary["photos"] == 40 and len(data.traffic) == 40 and len(data.buckets) == 3
    assert (tmp_path / "report" / "monitor.html").read_text() == data.report_html
    card, = get_cards(run["start"].task, id="report")
    shown = card_text(card.get())
    assert "drift" in shown and "PSI" in shown and "Worth relabelling (4 least confident)" in shown
    assert shown.count('"type": "image"') >= 3 + 4  # the charts and the photos to relabel


# --- the audit of captured photos -------------------------------------------------------------

@pytest.mark.flow
def test_an_audit_runs_on_captured_photos_and_lists_those_without_a_count_as_not_judged(synthetic_run, tmp_path):
    from bincount.cli import main
    from bincount.flow.runs import predictor_of

    photos = fresh_bins(CLASSES, 2, 9_500_000)  # 1, 1, 2, 2, ... 5, 5
    counts = [c for c in CLASSES for _ in range(2)]
    attributes = [f"expected_quantity={c}" for c in counts]
    attributes[0] = None  # no record at all
    attributes[1] = "bin=A-17"  # other attributes, but no count
    attributes[2] = "expected_quantity=lots"  # not a count
    attributes[9] = f"bin=B-2,expected_quantity={counts[9] - 3}"  # an altered record
    capture = capture_answers(tmp_path / "capture", photos, predictor_of(synthetic_run), attributes=attributes)
    events = [line["eventMetadata"]["eventId"] for line in records(capture)]

    out = tmp_path / "audit"
    code = main(["audit", "--source", f"capture:{capture}", "--run", synthetic_run.id, "--out", str(out), "--quiet"])
    assert code in (0, 1)
    import pandas as pd

    table = pd.read_csv(out / "audit.csv", dtype={"id": str}).set_index("id")
    assert list(table.index) == events  # every captured photo, in capture order: none dropped
    not_judged = table[table["status"] == "not judged"]
    assert list(not_judged.index) == events[:3]
    assert not_judged["reason"].str.contains("expected_quantity").all()
    assert "X-Amzn-SageMaker-Custom-Attributes" in not_judged["reason"].iloc[0]
    assert "is not a count" in not_judged["reason"].iloc[2]
    judged = table[table["status"] == "judged"]
    assert list(judged["expected"].astype(int)) == [counts[i] for i in range(3, 9)] + [counts[9] - 3]
    assert json.loads((out / "summary.json").read_text())["source"] == f"capture:{capture}"
