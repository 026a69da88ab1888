"""Inventory audit: the flag rule, the threshold, the report, the CLI and AuditFlow."""

import base64
import io
import json
import random
import re
import subprocess
import sys

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
    assert audit.chunks_of(["a", "b", "a", "c"], 2) == [["a", "b"], ["c"]] and audit.chunks_of([], 5) == [[]]


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


# --- what a failure keeps: scored chunks, the report set, only shown thumbnails ---

class CountingPredictor:
    """The real predictor, counting the chunks it scores; it raises on the ``fail_at``-th (from 1)."""

    def __init__(self, predictor, fail_at: int | None = None):
        self.predictor, self.fail_at, self.calls = predictor, fail_at, 0
        self.classes = predictor.classes

    def predict_bytes(self, images, **kwargs):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError(f"scoring chunk {self.calls} failed")
        return self.predictor.predict_bytes(images, **kwargs)


@pytest.fixture
def twelve_bins(tmp_path, synthetic_jpegs):
    """12 bins recorded as 1 or 5, alternately, with real JPEGs: whatever a model says, half disagree."""
    files = {}
    for i in range(12):
        count = 1 if i % 2 else 5
        files[f"bin-images/t{i:02d}.jpg"] = synthetic_jpegs[1 + i % 5]
        files[f"metadata/t{i:02d}.json"] = metadata(count)
    return write_tree(tmp_path / "source", files), [f"t{i:02d}" for i in range(12)]


def report_fields(source: str) -> dict:
    return dict(threshold=audit.Threshold(value=0.0, target_precision=0.9, reached=True, precision=1.0, recall=1.0),
                model_run="BinCountFlow/1", source=source, classes=CLASSES)


def test_an_audit_that_fails_midway_keeps_its_scored_chunks_and_a_rerun_continues(twelve_bins, tiny_model, tmp_path,
                                                                                   capsys):
    from bincount.data.sources import LocalSource
    from bincount.model.predictor import load_predictor

    folder, ids = twelve_bins
    source, predictor = LocalSource(folder), load_predictor(*tiny_model)
    out = tmp_path / "report"
    chunks = audit.ScoredChunks(out, model_run="BinCountFlow/1", threshold=0.0, source=str(folder), classes=CLASSES)
    options = dict(chunk_size=4, workers=2, progress=False)  # 3 chunks

    failing = CountingPredictor(predictor, fail_at=2)
    with pytest.raises(RuntimeError, match="scoring chunk 2 failed"):
        combine(audit.score_chunks(source, failing, 0.0, ids, chunks=chunks, **options), **report_fields(str(folder)))
    assert [p.name.split("-")[1] for p in sorted(chunks.dir.iterdir())] == ["00000"]  # the first chunk, kept
    capsys.readouterr()

    counting = CountingPredictor(predictor)
    report = combine(audit.score_chunks(source, counting, 0.0, ids, chunks=chunks, **options),
                     **report_fields(str(folder)))
    assert "reusing 1 of 3 chunks already scored" in capsys.readouterr().out
    assert counting.calls == 2  # the two chunks not saved, and only those
    fresh = combine(audit.score_chunks(source, predictor, 0.0, ids, **options), **report_fields(str(folder)))
    assert report.rows == fresh.rows and [r["id"] for r in report.rows] == ids
    assert report.thumbnails == fresh.thumbnails

    # other arguments never reuse these rows
    assert audit.ScoredChunks(out, model_run="BinCountFlow/1", threshold=0.5, source=str(folder),
                              classes=CLASSES).dir != chunks.dir
    # a damaged chunk is scored again, not trusted
    first = next(chunks.dir.glob("chunk-00000-*.json"))
    first.write_text('{"ids": ')
    counting = CountingPredictor(predictor)
    again = combine(audit.score_chunks(source, counting, 0.0, ids, chunks=chunks, **options),
                    **report_fields(str(folder)))
    assert counting.calls == 1 and again.rows == fresh.rows and "is damaged" in capsys.readouterr().out

    audit.write_report(report, out)
    chunks.clear()  # once the report is written, the work goes
    assert sorted(p.name for p in out.iterdir()) == ["audit.csv", "audit.html", "summary.json"]


WRITE_WITH_A_SIZE_LIMIT = """
import pickle, resource, signal, sys
from bincount import audit
report = pickle.loads(open(sys.argv[1], "rb").read())
audit.to_csv(report.rows)  # imports pandas before the limit
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[3]), resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
try:
    audit.write_report(report, sys.argv[2])
except OSError as e:
    print("write failed:", e)
    sys.exit(3)
"""


@pytest.mark.skipif(sys.platform == "win32", reason="RLIMIT_FSIZE is POSIX")
def test_a_failure_while_writing_the_report_leaves_the_previous_set_whole(sample_report, tmp_path):
    import dataclasses
    import os
    import pickle

    out = tmp_path / "report"
    audit.write_report(sample_report, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    # the next report: other rows, another model run, a bigger page (more photos)
    rows = [dict(r, p_record_wrong=0.99) if r["flagged"] else r for r in sample_report.rows]
    rows += [audit._row(f"n{i}", "judged", expected=1, predicted=3, p_predicted=0.9, p_wrong=0.95, flagged=True)
             for i in range(6)]
    thumbnails = {**sample_report.thumbnails, **{f"n{i}": sample_report.thumbnails["b1"] for i in range(6)}}
    new = dataclasses.replace(sample_report, rows=rows, thumbnails=thumbnails, model_run="BinCountFlow/2")
    sizes = {"csv": len(audit.to_csv(new.rows)), "html": len(audit.render_html(new).encode()),
             "summary": len(json.dumps(new.summary(), indent=2)) + 1}
    limit = max(sizes["csv"], sizes["summary"]) + 64
    assert sizes["html"] > 2 * limit  # the page is the file that cannot be written
    (tmp_path / "new.pickle").write_bytes(pickle.dumps(new))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "PYTHONDONTWRITEBYTECODE": "1"}
    done = subprocess.run([sys.executable, "-c", WRITE_WITH_A_SIZE_LIMIT, str(tmp_path / "new.pickle"), str(out),
                           str(limit)], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 3 and "write failed" in done.stdout, done.stdout + done.stderr
    after = {p.name: p.read_bytes() for p in out.iterdir()}
    assert after == before  # the whole old set, and no temporary left behind
    audit.write_report(new, out)  # with room, the new set replaces it
    assert json.loads((out / "summary.json").read_text())["model_run"] == "BinCountFlow/2"
    assert sorted(p.name for p in out.iterdir()) == ["audit.csv", "audit.html", "summary.json"]


def test_only_the_thumbnails_shown_are_kept(monkeypatch, synthetic_jpegs):
    monkeypatch.setattr(audit, "MAX_THUMBNAILS", 2)
    uri = audit.thumbnail_uri(synthetic_jpegs[2])

    def part(confidences: dict[str, float]) -> AuditPart:
        rows = [audit._row(i, "judged", expected=1, predicted=2, p_predicted=p, p_wrong=p, flagged=True)
                for i, p in confidences.items()]
        return AuditPart(rows, {i: uri for i in confidences})

    report = combine([part({"a": 0.9, "b": 0.95}), part({"c": 0.97, "d": 0.6}), part({"e": 0.8})],
                     **report_fields("s3://x"))
    assert set(report.thumbnails) == {"c", "b"}  # the two most confident of all parts
    assert len(report.flagged()) == 5 and audit.render_html(report).count("<img") == 2


def test_score_bins_makes_thumbnails_only_for_the_bins_shown(twelve_bins, tiny_model, monkeypatch):
    from bincount.data.sources import LocalSource
    from bincount.model.predictor import load_predictor

    monkeypatch.setattr(audit, "MAX_THUMBNAILS", 2)
    folder, ids = twelve_bins
    part = audit.score_bins(LocalSource(folder), load_predictor(*tiny_model), 0.0, candidate_ids=ids, workers=2,
                            progress=False)
    flagged = sorted((r for r in part.rows if r["flagged"]), key=lambda r: (-r["p_record_wrong"], r["id"]))
    assert len(flagged) >= 6  # a record of 1 and one of 5 cannot both agree with one photo's count
    assert set(part.thumbnails) == {r["id"] for r in flagged[:2]}


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
def test_the_model_run_is_the_given_one_else_my_branchs_champion_else_my_latest(synthetic_run):
    from bincount.flow.champion import current_champion
    from bincount.flow.runs import ProjectBranch, get_run

    assert audit.choose_model_run(synthetic_run.id).pathspec == synthetic_run.pathspec
    champion = current_champion("local", ProjectBranch.of_run(synthetic_run))
    assert champion is not None and audit.choose_model_run(champion="local").pathspec == champion.pathspec
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
