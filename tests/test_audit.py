"""Inventory audit: the flag rule, the threshold, the report, the CLI and AuditFlow."""

import base64
import io
import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bincount import audit
from bincount.audit import AuditPart, combine, flag_score, is_flagged, p_record_wrong

from conftest import DATASTORE, REPO, metadata, write_tree

CLASSES = [1, 2, 3, 4, 5]


def prediction(probabilities: list[float]) -> dict:
    best = max(range(len(probabilities)), key=probabilities.__getitem__)
    return {"count": CLASSES[best], "probabilities": {str(c): p for c, p in zip(CLASSES, probabilities)}}


# --- unit: flag rule and threshold -------------------------------------------

def test_flag_rule_needs_disagreement_and_confidence():
    sure_three = prediction([0.01, 0.02, 0.94, 0.02, 0.01])
    assert p_record_wrong(sure_three["probabilities"], 5) == pytest.approx(0.99)
    assert is_flagged(sure_three, 5, threshold=0.9)
    assert not is_flagged(sure_three, 3, threshold=0.0)  # agrees with the record: never flagged
    hesitant = prediction([0.1, 0.35, 0.4, 0.1, 0.05])  # says 3, but 2 is close
    assert p_record_wrong(hesitant["probabilities"], 2) == pytest.approx(0.65)
    assert is_flagged(hesitant, 2, threshold=0.6) and not is_flagged(hesitant, 2, threshold=0.7)
    # p(count != expected) is high, yet the expected count is still the model's best guess
    flat = prediction([0.175, 0.175, 0.3, 0.175, 0.175])
    assert p_record_wrong(flat["probabilities"], 3) == pytest.approx(0.7)
    assert not is_flagged(flat, 3, threshold=0.6) and flag_score(flat, 3) == 0.0


def test_threshold_is_the_lowest_that_reaches_the_target():
    scores = [0.95, 0.9, 0.8, 0.7, 0.6, 0.55, 0.0, 0.0]
    altered = [True, True, False, True, True, False, True, False]
    # precision from the top: 1, 1, 2/3, 3/4, 4/5, 4/6
    assert audit.choose_threshold(scores, altered, target_precision=0.9) == (0.9, 1.0, 0.4, True)
    value, precision, recall, reached = audit.choose_threshold(scores, altered, target_precision=0.75)
    assert (value, reached) == (0.6, True)  # not 0.9, where precision first dips below the target
    assert precision == pytest.approx(0.8) and recall == pytest.approx(0.8)


def test_threshold_falls_back_to_the_most_precise_and_says_so():
    value, precision, _, reached = audit.choose_threshold([0.9, 0.8, 0.7], [False, True, False],
                                                          target_precision=0.9)
    assert (value, reached) == (0.8, False) and precision == pytest.approx(0.5)
    assert audit.choose_threshold([0.0, 0.0], [True, False]) == (1.0, None, 0.0, False)


def test_simulated_records_alter_every_bin_by_each_shift_within_the_classes():
    index, expected, altered, weight = audit.simulate_records([1, 5, 3], CLASSES)
    assert list(zip(index, expected, altered, weight)) == [
        (0, 1, False, 1), (0, 2, True, 0.5), (0, 3, True, 0.5),
        (1, 5, False, 1), (1, 3, True, 0.5), (1, 4, True, 0.5),
        (2, 3, False, 1), (2, 1, True, 0.25), (2, 2, True, 0.25), (2, 4, True, 0.25), (2, 5, True, 0.25)]


def test_threshold_from_predictions_of_a_model_that_is_always_right():
    labels = [1, 2, 3, 4, 5] * 6
    predictions = [prediction([0.9 if c == label else 0.025 for c in CLASSES]) for label in labels]
    t = audit.threshold_from_predictions(labels, predictions, CLASSES)
    # every altered record has p_record_wrong 0.975 and no true record is ever flagged
    assert t.value == pytest.approx(0.975) and t.reached and t.precision == 1.0 and t.recall == 1.0
    assert (t.n_bins, t.n_records, t.n_altered, t.n_flagged, t.flagged_weight) == (30, 114, 84, 84, 30)
    assert t.precision_interval == [pytest.approx(0.8865, abs=1e-4), 1.0]  # 30 bins of 30: Wilson 95%
    assert audit.wilson_interval(2, 2) == [pytest.approx(0.3424, abs=1e-4), 1.0]  # 2 of 2 proves little


def test_threshold_weighs_each_bin_once_however_many_shifts_it_allows():
    # The model reads every bin as a sure 3: any record other than 3 has p_record_wrong 0.995.
    labels = [1, 3, 5]
    predictions = [prediction([0.005, 0.005, 0.98, 0.005, 0.005])] * 3
    t = audit.threshold_from_predictions(labels, predictions, CLASSES, target_precision=0.5)
    # flagged: true records of bins 1 and 5 (weight 2), altered records 1 -> 2 and 5 -> 4 (1/2 each)
    # and 3 -> 1, 2, 4, 5 (1/4 each): altered weight 2, precision 2 / 4 (unweighted it would be 6 / 8)
    assert t.value == pytest.approx(0.995) and t.precision == pytest.approx(0.5) and t.reached
    assert t.flagged_weight == pytest.approx(4) and t.recall == pytest.approx(2 / 3)
    t = audit.threshold_from_predictions(labels, predictions, CLASSES, target_precision=0.9)
    assert not t.reached and t.precision == pytest.approx(0.5) and "no threshold reached 90%" in t.note


# --- unit: scoring a folder, the CSV and the HTML ------------------------------

@pytest.fixture(scope="module")
def odd_folder(tmp_path_factory, synthetic_jpegs):
    files = {}
    for bin_id, count in {"ok-a": 2, "ok-b": 4, "zero": 0, "seven": 7}.items():
        files[f"bin-images/{bin_id}.jpg"] = synthetic_jpegs[min(max(count, 1), 5)]
        files[f"metadata/{bin_id}.json"] = metadata(count)
    files.update({"bin-images/text.jpg": b"not a photo", "metadata/text.json": metadata(3),
                  "bin-images/malformed.jpg": synthetic_jpegs[1], "metadata/malformed.json": b"{oops",
                  "bin-images/nometa.jpg": synthetic_jpegs[2]})
    return write_tree(tmp_path_factory.mktemp("odd"), files)


def test_counts_outside_the_classes_are_not_judged_and_bad_objects_are_listed(odd_folder, tiny_model):
    from bincount.data.sources import LocalSource
    from bincount.model.predictor import load_predictor

    predictor = load_predictor(*tiny_model)
    ids = ["ok-a", "zero", "text", "seven", "malformed", "nometa", "ok-b"]
    part = audit.score_bins(LocalSource(odd_folder), predictor, 0.0, candidate_ids=ids, workers=2, progress=False)
    rows = {r["id"]: r for r in part.rows}
    assert [r["id"] for r in part.rows] == ids  # every bin, in the order asked
    for bin_id, count in {"zero": 0, "seven": 7}.items():
        assert rows[bin_id]["status"] == "not judged" and rows[bin_id]["expected"] == count
        assert "outside the model's classes 1-5" in rows[bin_id]["reason"] and not rows[bin_id]["flagged"]
        assert rows[bin_id]["predicted"] is None
    for bin_id, reason in {"text": "not an image", "malformed": "malformed metadata",
                           "nometa": "metadata missing"}.items():
        assert rows[bin_id]["status"] == "bad" and reason in rows[bin_id]["reason"]
    for bin_id in ("ok-a", "ok-b"):
        r = rows[bin_id]
        assert r["status"] == "judged" and r["predicted"] in CLASSES and 0 < r["p_predicted"] <= 1
        assert r["flagged"] == (r["predicted"] != r["expected"])  # threshold 0: any disagreement
        assert (bin_id in part.thumbnails) == r["flagged"]


def test_ids_from_a_file_list_or_a_text_file(tmp_path):
    listing = tmp_path / "file_list.json"
    listing.write_text(json.dumps({"1": ["metadata/00526.json"], "3": ["metadata/526.json"]}))
    assert audit.read_ids(listing) == ["00526", "526"]
    text = tmp_path / "ids.txt"
    text.write_text("# wanted\n00526\n\nmetadata/00100.json\nbin-images/7.jpg\n")
    assert audit.read_ids(text) == ["00526", "00100", "7"]
    assert audit.shards(["a", "b", "a", "c"], 2) == [["a", "b"], ["c"]] and audit.shards([], 5) == [[]]


def report_of(rows, thumbnails):
    threshold = audit.Threshold(value=0.8, target_precision=0.9, reached=True, precision=0.92, recall=0.3,
                                n_bins=10, n_records=36, n_altered=26, n_flagged=4, flagged_weight=2.5,
                                precision_interval=[0.5, 1.0], run="BinCountFlow/1")
    return combine([AuditPart(rows, thumbnails)], threshold=threshold, model_run="BinCountFlow/1",
                   source="s3://aft-vbi-pds", classes=CLASSES)


@pytest.fixture
def sample_report(synthetic_jpegs):
    rows = [
        audit._row("b1", "judged", expected=2, predicted=4, p_predicted=0.9, p_wrong=0.95, flagged=True),
        audit._row("b2", "judged", expected=3, predicted=3, p_predicted=0.7, p_wrong=0.3),
        audit._row("b<3>", "judged", expected=1, predicted=5, p_predicted=0.85, p_wrong=0.9, flagged=True),
        audit._row("b4", "judged", expected=1, predicted=2, p_predicted=0.5, p_wrong=0.6),
        audit._row("b5", "not judged", expected=7, reason="expected count 7 is outside the model's classes 1-5"),
        audit._row("b6", "bad", reason="not an image"),
    ]
    thumbnails = {"b1": audit.thumbnail_uri(synthetic_jpegs[4]), "b<3>": audit.thumbnail_uri(synthetic_jpegs[5])}
    return report_of(rows, thumbnails)


def test_csv_has_one_row_per_bin_with_the_columns(sample_report):
    import pandas as pd

    text = audit.to_csv(sample_report.rows)
    assert text.splitlines()[0] == "id,expected,predicted,p_predicted,p_record_wrong,flagged,status,reason"
    assert text.splitlines()[5].startswith("b5,7,,,,False,not judged,")  # counts stay integers
    table = pd.read_csv(io.StringIO(text), dtype={"id": str})
    assert list(table["id"]) == ["b1", "b2", "b<3>", "b4", "b5", "b6"]
    assert list(table["flagged"]) == [True, False, True, False, False, False]
    assert table.loc[0, "p_record_wrong"] == pytest.approx(0.95)


def test_html_is_self_contained_with_thumbnails_of_flagged_bins(sample_report):
    page = audit.render_html(sample_report)
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.I)
    assert "http://" not in page and "https://" not in page and "<link" not in page and "<script" not in page
    images = re.findall(r'<img src="(data:image/jpeg;base64,[A-Za-z0-9+/=]+)" alt="bin ([^"]+)"', page)
    assert sorted(alt for _, alt in images) == sorted(["b1", "b&lt;3&gt;"])  # flagged only, ids escaped
    assert page.count("<img") == 2
    from PIL import Image

    with Image.open(io.BytesIO(base64.b64decode(images[0][0].split(",", 1)[1]))) as thumb:
        assert thumb.format == "JPEG" and max(thumb.size) <= audit.THUMBNAIL_PX
    # most confident first, with expected, predicted and confidence
    assert page.index('alt="bin b1"') < page.index('alt="bin b&lt;3&gt;"')
    assert re.search(r"b1</td><td class=num>2</td><td class=num>4</td><td class=num>90.0%", page)
    summary = page[:page.index("<h2>")]
    assert "0.800" in summary and "92.0%" in summary and "30.0%" in summary and "2 flagged" in summary
    assert "expected count 7 is outside" in page and "not an image" in page


# --- end to end: a folder with altered records, the CLI and AuditFlow ----------

SHIFTS = (-2, -1, 1, 2)


@pytest.fixture(scope="module")
def audit_folder(tmp_path_factory):
    """Fresh synthetic bins (seeds the run never saw); half of the in-class records altered.

    Returns (folder, altered ids, unaltered ids, not-judged ids, bad ids).
    """
    from bincount.data.synthetic import synthetic_bin

    rng = random.Random(11)
    files, altered, unaltered = {}, set(), set()
    for count in CLASSES:
        for i in range(8):
            bin_id = f"aud{count}{i:02d}"
            files[f"bin-images/{bin_id}.jpg"] = synthetic_bin(count, seed=7_000_000 + count * 1000 + i)
            recorded = count
            if i % 2 == 0:
                recorded = rng.choice([count + s for s in SHIFTS if count + s in CLASSES])
                altered.add(bin_id)
            else:
                unaltered.add(bin_id)
            files[f"metadata/{bin_id}.json"] = metadata(recorded)
    files.update({"bin-images/zero.jpg": synthetic_bin(1, seed=1), "metadata/zero.json": metadata(0),
                  "bin-images/seven.jpg": synthetic_bin(5, seed=2), "metadata/seven.json": metadata(7),
                  "bin-images/junk.jpg": b"junk", "metadata/junk.json": metadata(2)})
    folder = write_tree(tmp_path_factory.mktemp("audit-source"), files)
    return folder, altered, unaltered, {"zero", "seven"}, {"junk"}


def read_csv(path):
    import pandas as pd

    return pd.read_csv(path, dtype={"id": str})


def check_report(table, folder_info):
    _, altered, unaltered, not_judged, bad = folder_info
    assert set(table["id"]) == altered | unaltered | not_judged | bad and len(table) == len(set(table["id"]))
    status = dict(zip(table["id"], table["status"]))
    assert {i for i, s in status.items() if s == "not judged"} == not_judged
    assert {i for i, s in status.items() if s == "bad"} == bad
    flagged = set(table.loc[table["flagged"], "id"])
    assert flagged <= altered | unaltered
    altered_rate = len(flagged & altered) / len(altered)
    unaltered_rate = len(flagged & unaltered) / len(unaltered)
    assert altered_rate > unaltered_rate, (altered_rate, unaltered_rate)
    return flagged


@pytest.fixture(scope="module")
def cli_audit(synthetic_run, audit_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli-audit")
    done = subprocess.run([sys.executable, "-m", "bincount.cli", "audit", "--source", str(audit_folder[0]),
                           "--run", synthetic_run.id, "--out", str(out), "--quiet"],
                          capture_output=True, text=True, timeout=300)
    return done, out


@pytest.mark.flow
def test_cli_audit_flags_altered_records_and_exits_1(cli_audit, audit_folder):
    done, out = cli_audit
    assert done.returncode == 1, done.stdout + done.stderr
    assert "flagged" in done.stdout and "threshold" in done.stdout
    flagged = check_report(read_csv(out / "audit.csv"), audit_folder)
    page = (out / "audit.html").read_text()
    assert page.count("<img") == len(flagged) and "https://" not in page and "http://" not in page
    summary = json.loads((out / "summary.json").read_text())
    assert summary["flagged"] == len(flagged) and summary["threshold"]["n_bins"] == 45
    assert 0.5 <= summary["threshold"]["value"] <= 1


@pytest.mark.flow
def test_cli_audit_exits_0_when_nothing_is_flagged_and_2_on_error(synthetic_run, audit_folder, tmp_path):
    from bincount.cli import main

    ids = tmp_path / "ids.txt"
    ids.write_text("zero\nseven\njunk\n")  # nothing here can be flagged
    assert main(["audit", "--source", str(audit_folder[0]), "--ids", str(ids), "--run", synthetic_run.id,
                 "--out", str(tmp_path / "out"), "--quiet"]) == 0
    assert set(read_csv(tmp_path / "out" / "audit.csv")["status"]) == {"not judged", "bad"}
    assert main(["audit", "--source", str(audit_folder[0]), "--run", "404", "--out", str(tmp_path)]) == 2
    assert main(["audit", "--source", str(tmp_path / "nowhere"), "--run", synthetic_run.id,
                 "--out", str(tmp_path)]) == 2


@pytest.mark.flow
def test_the_default_model_is_the_champion_else_the_latest_run(synthetic_run, monkeypatch):
    import bincount.flow.champion
    from bincount.flow.runs import get_run

    assert audit.choose_model_run(synthetic_run.id).pathspec == synthetic_run.pathspec
    champion = bincount.flow.champion.current_champion("local")
    assert champion is not None and audit.choose_model_run().pathspec == champion.pathspec
    monkeypatch.setattr(bincount.flow.champion, "current_champion", lambda target: None)
    assert audit.choose_model_run().pathspec == get_run().pathspec


@pytest.mark.flow
def test_audit_flow_shards_and_agrees_with_the_cli(synthetic_run, audit_folder, cli_audit, tmp_path):
    from metaflow import Runner

    out = tmp_path / "report"
    with Runner(str(REPO / "flows" / "audit_flow.py"), show_output=False, cwd=str(DATASTORE)).run(
            source=str(audit_folder[0]), run=synthetic_run.id, out=str(out), shard_size=25) as running:
        assert running.status == "successful", (running.stdout + running.stderr)[-4000:]
        run = running.run
    data = run.data
    assert data.model_run == synthetic_run.pathspec and data.n_ids == 43
    assert len(list(run["score"])) == 2  # 43 bins in shards of 25
    flagged = check_report(read_csv(out / "audit.csv"), audit_folder)
    assert set(data.flagged_ids) == flagged and data.summary["flagged"] == len(flagged)
    assert (out / "audit.csv").read_text() == data.report_csv
    assert (out / "audit.html").read_text() == data.report_html and data.report_html.count("<img") == len(flagged)
    # same model, threshold and data path as the CLI: the same verdicts
    cli = read_csv(cli_audit[1] / "audit.csv").set_index("id")
    flow = data.audit.set_index("id").loc[cli.index]
    for column in ("status", "flagged"):
        assert list(flow[column]) == list(cli[column])
    assert list(flow["predicted"].astype("float")) == pytest.approx(list(cli["predicted"]), nan_ok=True)
    assert data.threshold == json.loads((cli_audit[1] / "summary.json").read_text())["threshold"]
