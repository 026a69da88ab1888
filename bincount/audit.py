"""Inventory audit: find bins whose photo disagrees with their record.

For every bin of a source the model predicts a count; the bin's record (its
metadata's ``EXPECTED_QUANTITY``) says what the count should be. A bin is
**flagged** when the model is confident the record is wrong::

    predicted != expected  and  p_record_wrong >= threshold
    where p_record_wrong = 1 - p(expected)

the model's probability that the count is anything but the recorded one. (Once
``predicted != expected``, ``p(expected) <= p(predicted)`` and the two sum to at
most 1, so ``p_record_wrong`` is then at least 0.5: thresholds live in [0.5, 1].)

**The threshold** is chosen on the model run's validation split, whose labels
are right and whose photos the model did not train on. Each validation bin
gives one true record and altered ones: its count shifted by each of -2, -1,
+1, +2 that stays within the model's classes. Every shift is enumerated rather
than one drawn at random: the threshold is then the expectation over the
random draw, with no seed to change it (with one seeded draw per bin, the
threshold of the synthetic test run moved between 0.90 and 0.97 with the
seed). Altered records are weighted so that a bin's altered records together
weigh as much as its true one: half the records are wrong (``prevalence``).
Scoring every record with the flag rule gives a weighted precision-recall
curve (scikit-learn's ``precision_recall_curve``) at finding the altered
records; the threshold is the lowest one whose precision is at least the
target (default 90%). If no threshold reaches the target, the one with the
highest precision is used (the lowest of those) and the report says the target
was not reached. The precision holds for a mix where half the records are
wrong; where wrong records are rarer it is lower. Its 95% Wilson interval
(counting each bin once) shows how much the estimate can be trusted.

Counts outside the model's classes (0 or 7 for a 1-5 model) cannot be judged:
such bins are listed as *not judged* with the reason, and so are bins a source
knows have no record by design (``Source.not_judged_reason``: a captured photo
whose request gave no ``expected_quantity``, with ``--source capture:PATH``). Unusable objects
(missing or malformed metadata, missing or non-image photos) are listed as
*bad* with the reason ``fetch_subset`` gave. Nothing is dropped silently.

**What a failure keeps.** Bins are scored a chunk (``chunks_of``) at a time, and
each scored chunk is saved under ``<out>/.audit-work/<key>/`` (the key: model
run, threshold, source and classes; each file named for its chunk's ids), so a
failure (the source going down, the machine stopping) loses at most the chunk
in progress: a rerun with the same arguments reuses every chunk it finds and
says how many. The report set (``audit.csv``, ``audit.html``, ``summary.json``)
is written to temporary files first and then moved into place, so a failure
while writing leaves the previous set whole; the work folder goes once the new
set is in place. Only the thumbnails the HTML shows (the ``MAX_THUMBNAILS``
most confident flagged bins) are kept. ``flows/audit_flow.py`` scores chunks
in a foreach: there ``resume`` keeps the chunks already scored.

The CLI (``bincount audit``) and ``flows/audit_flow.py`` are thin callers of
the functions here; both read data through ``open_source``/``fetch_subset`` and
score with ``bincount.model.predictor``, like everything else.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import heapq
import html
import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath

from bincount.data.fetch import DEFAULT_WORKERS, describe_classes, fetch_subset, read_file_list
from bincount.data.shards import MemorySink
from bincount.data.sources import Source

DEFAULT_TARGET_PRECISION = 0.9
DEFAULT_SHIFTS = (-2, -1, 1, 2)
DEFAULT_CHUNK_SIZE = 500
MAX_THUMBNAILS = 1000  # flagged bins shown with a photo in the HTML (most confident first); all are in the CSV
THUMBNAIL_PX = 160
CSV_COLUMNS = ["id", "expected", "predicted", "p_predicted", "p_record_wrong", "flagged", "status", "reason"]
JUDGED, NOT_JUDGED, BAD = "judged", "not judged", "bad"
WORK_DIR = ".audit-work"  # under the report's folder: the chunks scored so far, until the report is written
REPORT_FILES = {"csv": "audit.csv", "html": "audit.html", "summary": "summary.json"}


# --- which bins --------------------------------------------------------------

def read_ids(path: str | Path) -> list[str]:
    """Bin ids from a Udacity ``file_list.json`` or a text file with one id per line.

    In a text file, blank lines and lines starting with ``#`` are ignored, and
    ``metadata/<id>.json`` or ``bin-images/<id>.jpg`` lines are read as ``<id>``.
    Ids stay strings ('00526' and '526' are different bins).
    """
    text = Path(path).read_text()
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict):
        return read_file_list(path)
    if parsed is not None and not isinstance(parsed, (int, float)):
        # bare numbers parse as JSON too: a one-id text file is still a text file
        raise ValueError(f"{path}: expected a file_list.json object or one bin id per line")
    ids = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name = PurePosixPath(line).name
        ids.append(PurePosixPath(name).stem if name.endswith((".json", ".jpg")) else name)
    return ids


def chunks_of(ids: list[str], size: int) -> list[list[str]]:
    """``ids`` in consecutive pieces of at most ``size`` (at least one piece, maybe empty).

    A repeated id is kept once (its first place), so no bin is audited twice.
    """
    if size < 1:
        raise ValueError(f"chunk size must be at least 1, got {size}")
    ids = list(dict.fromkeys(ids))
    return [ids[i:i + size] for i in range(0, len(ids), size)] or [[]]


# --- the flag rule -----------------------------------------------------------

def p_record_wrong(probabilities: dict[str, float], expected: int) -> float:
    """The model's probability that the count is not ``expected``."""
    return round(1.0 - float(probabilities[str(expected)]), 6)  # probabilities come rounded to 6 places


def flag_score(prediction: dict, expected: int) -> float:
    """``p_record_wrong`` when the model predicts another count, else 0 (never flagged)."""
    if prediction["count"] == expected:
        return 0.0
    return p_record_wrong(prediction["probabilities"], expected)


def is_flagged(prediction: dict, expected: int, threshold: float) -> bool:
    """The flag rule: predicted != expected and p_record_wrong >= threshold."""
    return prediction["count"] != expected and p_record_wrong(prediction["probabilities"], expected) >= threshold


# --- choosing the threshold --------------------------------------------------

@dataclass
class Threshold:
    """The flag threshold and how it did on simulated records."""

    value: float
    target_precision: float
    reached: bool  # some threshold had precision >= target
    precision: float | None  # at ``value``, on the simulated records (None: nothing was ever flagged)
    recall: float | None
    n_bins: int = 0  # validation bins
    n_records: int = 0  # simulated records (each bin: one true, up to four altered)
    n_altered: int = 0
    n_flagged: int = 0  # simulated records flagged at ``value``
    flagged_weight: float = 0.0  # the same in bins (an altered record weighs 1/its bin's altered records)
    precision_interval: list[float] | None = None  # 95% Wilson interval, n = flagged_weight
    prevalence: float = 0.5  # share of altered records the precision assumes
    run: str | None = None  # the model run whose validation split chose it
    note: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def wilson_interval(successes: float, n: float, z: float = 1.96) -> list[float] | None:
    """The Wilson score interval of a proportion (95% for z=1.96); None when n is 0."""
    if n <= 0:
        return None
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / (1 + z * z / n)
    return [round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4)]


def simulate_records(labels: list[int], classes: list[int], *, shifts: tuple[int, ...] = DEFAULT_SHIFTS
                     ) -> tuple[list[int], list[int], list[bool], list[float]]:
    """Records for bins whose true counts are ``labels``: each bin as is, and altered by each shift.

    Returns (bin index, recorded count, altered?, weight) lists. A true record
    weighs 1; a bin's altered records (its count plus each of ``shifts`` that
    stays within ``classes``) share a weight of 1.
    """
    allowed = set(classes)
    index, expected, altered, weight = [], [], [], []
    for i, label in enumerate(labels):
        options = [label + s for s in shifts if label + s in allowed]
        for recorded, is_altered, w in [(label, False, 1.0)] + [(o, True, 1 / len(options)) for o in options]:
            index.append(i), expected.append(recorded), altered.append(is_altered), weight.append(w)
    return index, expected, altered, weight


def choose_threshold(scores, altered, *, target_precision: float = DEFAULT_TARGET_PRECISION,
                     sample_weight=None) -> tuple[float, float | None, float | None, bool]:
    """The lowest threshold on ``scores`` (flag when score >= threshold) with precision >= target.

    ``scores`` are flag scores (0 = never flagged); ``altered`` says which
    records are wrong. Returns (threshold, precision, recall, reached). If no
    threshold reaches the target, the one with the highest precision (the
    lowest such) is returned with ``reached`` False. If no record can be
    flagged at all, (1.0, None, 0.0, False).
    """
    import numpy as np
    from sklearn.metrics import precision_recall_curve

    scores = np.asarray(scores, dtype=float)
    altered = np.asarray(altered, dtype=bool)
    if not (scores > 0).any() or not altered.any():
        return 1.0, None, 0.0, False
    precision, recall, thresholds = precision_recall_curve(altered, scores, sample_weight=sample_weight)
    precision, recall = precision[:-1], recall[:-1]  # the last point has no threshold
    usable = thresholds > 0  # a threshold of 0 would flag bins the model agrees with
    precision, recall, thresholds = precision[usable], recall[usable], thresholds[usable]
    ok = np.flatnonzero(precision >= target_precision - 1e-12)
    reached = ok.size > 0
    # thresholds ascend: the first index is the lowest threshold
    i = int(ok[0]) if reached else int(np.flatnonzero(precision == precision.max())[0])
    return float(thresholds[i]), float(precision[i]), float(recall[i]), reached


def threshold_from_predictions(labels: list[int], predictions: list[dict], classes: list[int], *,
                               target_precision: float = DEFAULT_TARGET_PRECISION,
                               prevalence: float = 0.5, run: str | None = None) -> Threshold:
    """Choose the threshold from predictions on bins whose ``labels`` are right."""
    if not 0 < target_precision <= 1:
        raise ValueError(f"target precision must be in (0, 1], got {target_precision}")
    if not 0 < prevalence < 1:
        raise ValueError(f"prevalence must be in (0, 1), got {prevalence}")
    index, expected, altered, weight = simulate_records(labels, classes)
    scores = [flag_score(predictions[i], e) for i, e in zip(index, expected)]
    weights = [w * (prevalence if a else 1 - prevalence) for w, a in zip(weight, altered)]
    value, precision, recall, reached = choose_threshold(scores, altered, target_precision=target_precision,
                                                         sample_weight=weights)
    if reached:
        note = f"the lowest threshold with precision >= {target_precision:.0%} on simulated records"
    elif precision is None:
        note = "the model never disagreed with a record: nothing can be flagged (threshold set to 1)"
    else:
        note = (f"no threshold reached {target_precision:.0%} precision on simulated records; "
                f"using the most precise one ({precision:.0%})")
    flagged = [s > 0 and s >= value for s in scores]
    # in bins: each bin counts once however many altered records it gave (at prevalence 0.5)
    flagged_weight = sum(w for w, f in zip(weight, flagged) if f)
    interval = wilson_interval(sum(w for w, f, a in zip(weight, flagged, altered) if f and a), flagged_weight)
    precision, recall = (None if x is None else round(x, 6) for x in (precision, recall))
    return Threshold(value=value, target_precision=target_precision, reached=reached, precision=precision,
                     recall=recall, n_bins=len(labels), n_records=len(altered), n_altered=sum(altered),
                     n_flagged=sum(flagged), flagged_weight=round(flagged_weight, 4), precision_interval=interval,
                     prevalence=prevalence, run=run, note=note)


def validation_set(run) -> tuple[Mapping[str, bytes], list[str], list[int]]:
    """The photos, ids and (correct) counts of a BinCountFlow run's validation split."""
    from bincount.flow.runs import photos_of, split_rows

    ids, labels = split_rows(run, "val")
    if not ids:
        raise ValueError(f"run {run.pathspec} has no validation bins to choose a threshold on")
    return photos_of(run), ids, labels


def threshold_for_run(run, predictor, *, target_precision: float = DEFAULT_TARGET_PRECISION,
                      prevalence: float = 0.5) -> Threshold:
    """Score ``run``'s validation split with ``predictor`` and choose the threshold."""
    photos, ids, labels = validation_set(run)
    predictions = predictor.predict_photos(photos, ids)
    return threshold_from_predictions(labels, predictions, predictor.classes, target_precision=target_precision,
                                      prevalence=prevalence, run=run.pathspec)


def choose_model_run(run_id: str | None = None, *, champion: str | None = None, branch=None):
    """The model run: ``run_id``'s; else the run tagged ``champion:<champion>`` on ``branch`` (a
    ``bincount.flow.runs.ProjectBranch``; default the caller's own); else the latest successful
    run on ``branch``, or without one, of the caller's own namespace. The caller's Metaflow
    namespace is left as it was. ``bincount.flow.run_choice.choose_run`` also says why."""
    from bincount.flow.run_choice import choose_run

    return choose_run(run_id, champion=champion, branch=branch).run


# --- scoring bins ------------------------------------------------------------

@dataclass
class AuditPart:
    """What scoring some bins gave: one row per bin, and thumbnails of the flagged ones."""

    rows: list[dict] = field(default_factory=list)
    thumbnails: dict[str, str] = field(default_factory=dict)  # id -> data: URI


def thumbnail_uri(raw: bytes, size: int = THUMBNAIL_PX) -> str:
    """A small JPEG of the photo as a ``data:`` URI (no external file or URL)."""
    from bincount.data.images import thumbnail

    return "data:image/jpeg;base64," + base64.b64encode(thumbnail(raw, size)).decode("ascii")


def _row(bin_id, status, *, expected=None, predicted=None, p_predicted=None, p_wrong=None, flagged=False,
         reason="") -> dict:
    return {"id": bin_id, "expected": expected, "predicted": predicted, "p_predicted": p_predicted,
            "p_record_wrong": p_wrong, "flagged": flagged, "status": status, "reason": reason}


def score_bins(source: Source, predictor, threshold: float, *, candidate_ids: list[str] | None = None,
               workers: int = DEFAULT_WORKERS, progress: bool = True, batch_size: int = 32) -> AuditPart:
    """Audit ``candidate_ids`` (default: every bin ``source`` lists) with the flag rule.

    Rows come in the order of ``candidate_ids`` (or the source's listing).
    """
    classes = predictor.classes
    if candidate_ids is None:
        candidate_ids = list(source.list_ids())
    order = list(dict.fromkeys(candidate_ids))
    photos = MemorySink()  # one chunk's photos: an audit is scored a chunk at a time
    subset = fetch_subset(source, classes=classes, per_class=None, candidate_ids=order, workers=workers,
                          progress=progress, sink=photos)
    rows: dict[str, dict] = {}
    # fetch_subset skips counts outside the classes like any bad object, and
    # keeps those counts apart: they are records the model cannot judge.
    for bin_id, reason in subset.skipped:
        count = subset.out_of_class.get(bin_id)
        unrecorded = source.not_judged_reason(bin_id)  # a captured photo sent without a count, say
        if count is not None:
            rows[bin_id] = _row(bin_id, NOT_JUDGED, expected=count,
                                reason=f"expected count {count} is outside the model's classes "
                                       f"{describe_classes(classes)}")
        elif unrecorded:
            rows[bin_id] = _row(bin_id, NOT_JUDGED, reason=unrecorded)
        else:
            rows[bin_id] = _row(bin_id, BAD, reason=reason)
    part = AuditPart()
    predictions = predictor.predict_bytes([photos.images[i] for i in subset.ids], batch_size=batch_size)
    for bin_id, expected, prediction in zip(subset.ids, subset.labels, predictions):
        predicted = prediction["count"]
        flagged = is_flagged(prediction, expected, threshold)
        rows[bin_id] = _row(bin_id, JUDGED, expected=expected, predicted=predicted,
                            p_predicted=float(prediction["probabilities"][str(predicted)]),
                            p_wrong=p_record_wrong(prediction["probabilities"], expected), flagged=flagged)
    part.rows = [rows[i] for i in order if i in rows]
    # Only the flagged bins the report can show get a thumbnail: no other chunk can push these out
    # of the report's top MAX_THUMBNAILS unless it pushes them out of this chunk's too.
    for row in shown(part.rows):
        try:
            part.thumbnails[row["id"]] = thumbnail_uri(photos.images[row["id"]])
        except Exception:  # noqa: BLE001 - the photo decoded once already; without a thumbnail the row stands
            pass
    return part


def _confidence(row: dict) -> tuple:
    """The report's order of flagged bins: most confident first, then by id."""
    return -row["p_record_wrong"], row["id"]


def shown(rows: Iterable[dict], limit: int | None = None) -> list[dict]:
    """The flagged rows the HTML shows with a photo: the ``limit`` (default ``MAX_THUMBNAILS``) most confident."""
    limit = MAX_THUMBNAILS if limit is None else limit
    return heapq.nsmallest(limit, (r for r in rows if r["flagged"]), key=_confidence)


# --- keeping what was scored ----------------------------------------------------

def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def _write_atomically(path: Path, text: str) -> None:
    temporary = _write_temporary(path, text)
    os.replace(temporary, path)


def _write_temporary(path: Path, text: str) -> Path:
    """``text`` in a new file beside ``path`` (same folder: same file system, so os.replace is atomic)."""
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with open(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
    return Path(name)


class ScoredChunks:
    """The chunks of one audit scored so far, one small JSON file each, under ``<out>/.audit-work/<key>/``.

    The key is everything a chunk's rows depend on besides its ids (model run, threshold, source,
    classes), so a rerun with other arguments never picks up rows that are not its own; a file's name
    carries its chunk's ids' hash, so other chunking never does either.
    """

    def __init__(self, out_dir: str | Path, *, model_run: str, threshold: float, source: str, classes: list[int]):
        key = _digest({"model_run": model_run, "threshold": repr(float(threshold)), "source": source,
                       "classes": list(classes), "format": 1})
        self.dir = Path(out_dir) / WORK_DIR / key

    def path(self, index: int, ids: list[str]) -> Path:
        return self.dir / f"chunk-{index:05d}-{_digest(ids)}.json"

    def has(self, index: int, ids: list[str]) -> bool:
        return self.path(index, ids).is_file()

    def load(self, index: int, ids: list[str]) -> AuditPart | None:
        """The saved part, or None when there is none or it cannot be trusted (then it is scored again)."""
        try:
            saved = json.loads(self.path(index, ids).read_text(encoding="utf-8"))
            if saved["ids"] != ids:
                return None
            return AuditPart(rows=saved["rows"], thumbnails=saved["thumbnails"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def save(self, index: int, ids: list[str], part: AuditPart) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        # atomically: a crash while saving leaves no half file to be trusted later
        _write_atomically(self.path(index, ids), json.dumps({"ids": ids, "rows": part.rows,
                                                              "thumbnails": part.thumbnails}))

    def clear(self) -> None:
        """Remove this audit's work (its report is written); the work folder too once it is empty."""
        shutil.rmtree(self.dir, ignore_errors=True)
        try:
            self.dir.parent.rmdir()
        except OSError:  # other audits' work is still there
            pass


def score_chunks(source: Source, predictor, threshold: float, ids: list[str], *, chunks: ScoredChunks | None = None,
                 chunk_size: int = DEFAULT_CHUNK_SIZE, workers: int = DEFAULT_WORKERS, progress: bool = True,
                 batch_size: int = 32) -> Iterator[AuditPart]:
    """Each chunk of ``ids`` scored (:func:`score_bins`), in order, one at a time (only one chunk's photos
    are in memory); with ``chunks``, each scored chunk is saved as it is done, and one saved by an
    earlier run with the same arguments is loaded instead of scored again."""
    pieces = chunks_of(ids, chunk_size)
    if chunks is not None:
        reused = sum(chunks.has(i, piece) for i, piece in enumerate(pieces))
        if reused:
            print(f"audit: reusing {reused} of {len(pieces)} chunks already scored (saved in {chunks.dir})")
    for i, piece in enumerate(pieces):
        saved = chunks is not None and chunks.has(i, piece)
        part = chunks.load(i, piece) if saved else None
        if part is None:
            if saved:
                print(f"audit: the saved chunk {chunks.path(i, piece).name} is damaged: scoring it again")
            part = score_bins(source, predictor, threshold, candidate_ids=piece, workers=workers,
                              progress=progress, batch_size=batch_size)
            if chunks is not None:
                chunks.save(i, piece, part)
        yield part


# --- the report --------------------------------------------------------------

@dataclass
class AuditReport:
    rows: list[dict]
    thumbnails: dict[str, str]
    threshold: Threshold
    model_run: str
    source: str
    classes: list[int]

    def flagged(self) -> list[dict]:
        """Flagged rows, most confident first."""
        return sorted((r for r in self.rows if r["flagged"]), key=_confidence)

    def summary(self) -> dict:
        by_status = {s: sum(r["status"] == s for r in self.rows) for s in (JUDGED, NOT_JUDGED, BAD)}
        return {"model_run": self.model_run, "source": self.source, "classes": self.classes,
                "bins": len(self.rows), "judged": by_status[JUDGED], "flagged": len(self.flagged()),
                "not_judged": by_status[NOT_JUDGED], "bad": by_status[BAD],
                "threshold": self.threshold.as_dict()}


def combine(parts: Iterable[AuditPart], **report_fields) -> AuditReport:
    """One report from the parts of a chunked audit, rows in chunk order.

    Thumbnails are kept only for the flagged bins the HTML shows (:func:`shown`), and pruned part by
    part: an audit with many flagged bins never holds more than about that many photos.
    """
    rows, thumbnails, top = [], {}, []
    for part in parts:
        rows.extend(part.rows)
        top = shown(top + [r for r in part.rows if r["flagged"]])
        thumbnails.update(part.thumbnails)
        thumbnails = {r["id"]: thumbnails[r["id"]] for r in top if r["id"] in thumbnails}
    return AuditReport(rows=rows, thumbnails=thumbnails, **report_fields)


def rows_table(rows: list[dict]):
    """The rows as a DataFrame with CSV_COLUMNS (nullable ints for counts)."""
    import pandas as pd

    table = pd.DataFrame(rows, columns=CSV_COLUMNS)
    for column in ("expected", "predicted"):
        table[column] = table[column].astype("Int64")
    for column in ("p_predicted", "p_record_wrong"):
        table[column] = table[column].astype(float).round(6)
    table["flagged"] = table["flagged"].astype(bool)
    table["id"] = table["id"].astype(str)
    return table


def to_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    rows_table(rows).to_csv(buf, index=False, quoting=csv.QUOTE_MINIMAL)
    return buf.getvalue()


def _pct(x) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def _interval(interval) -> str:
    return "" if interval is None else f"; precision 95% interval {interval[0]:.0%} to {interval[1]:.0%}"


def render_html(report: AuditReport, *, max_thumbnails: int | None = None) -> str:
    """A self-contained HTML page: no external stylesheet, script, font or image."""
    max_thumbnails = MAX_THUMBNAILS if max_thumbnails is None else max_thumbnails
    e = html.escape
    s = report.summary()
    t = report.threshold
    flagged = report.flagged()
    reached = ("" if t.reached else f" <strong class=warn>(target {t.target_precision:.0%} not reached)</strong>")
    out = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        f"<title>Inventory audit: {s['flagged']} flagged of {s['judged']}</title>",
        "<style>body{font-family:sans-serif;margin:1.5em;color:#222}table{border-collapse:collapse;margin:.5em 0}"
        "td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left;vertical-align:middle}"
        "th{background:#f2f2f2}.warn{color:#a40000}.num{text-align:right}img{display:block}</style>",
        "</head><body>",
        "<h1>Inventory audit</h1>",
        "<table class=summary>",
        f"<tr><th>model run</th><td>{e(s['model_run'])}</td></tr>",
        f"<tr><th>source</th><td>{e(s['source'])}</td></tr>",
        f"<tr><th>bins</th><td>{s['bins']}: {s['judged']} judged, <strong>{s['flagged']} flagged</strong>, "
        f"{s['not_judged']} not judged, {s['bad']} bad</td></tr>",
        f"<tr><th>flag rule</th><td>predicted &ne; expected and P(count &ne; expected) &ge; "
        f"<strong>{t.value:.3f}</strong></td></tr>",
        f"<tr><th>threshold chosen on</th><td>{t.n_bins} validation bins of {e(str(t.run))}, each with its true "
        f"record and its record altered by each of &plusmn;1 and &plusmn;2 within the classes "
        f"({t.n_records} records, altered ones weighted to half); {e(t.note)}</td></tr>",
        f"<tr><th>validation precision / recall</th><td>{_pct(t.precision)} / {_pct(t.recall)}{reached} "
        f"(at {t.prevalence:.0%} altered records; precision is lower where wrong records are rarer)</td></tr>",
        f"<tr><th>validation records flagged</th><td>{t.n_flagged} of {t.n_records} ({t.n_altered} altered; "
        f"{t.flagged_weight:g} bins' worth){_interval(t.precision_interval)}</td></tr>",
        "</table>",
        f"<h2>Flagged ({len(flagged)})</h2>",
    ]
    if flagged:
        with_photo = flagged[:max_thumbnails]
        if len(flagged) > len(with_photo):
            out.append(f"<p>The {len(with_photo)} most confident are shown with a photo; all are in the CSV.</p>")
        out.append("<table><tr><th>photo</th><th>id</th><th>expected</th><th>predicted</th>"
                   "<th>confidence in predicted</th><th>P(record wrong)</th></tr>")
        for i, r in enumerate(flagged):
            uri = report.thumbnails.get(r["id"]) if i < max_thumbnails else None
            photo = f'<img src="{uri}" alt="bin {e(r["id"])}" width={THUMBNAIL_PX}>' if uri else ""
            out.append(f"<tr><td>{photo}</td><td>{e(r['id'])}</td><td class=num>{r['expected']}</td>"
                       f"<td class=num>{r['predicted']}</td><td class=num>{r['p_predicted']:.1%}</td>"
                       f"<td class=num>{r['p_record_wrong']:.1%}</td></tr>")
        out.append("</table>")
    else:
        out.append("<p>Nothing flagged.</p>")
    for status, title in ((NOT_JUDGED, "Not judged"), (BAD, "Bad objects")):
        rows = [r for r in report.rows if r["status"] == status]
        out.append(f"<h2>{title} ({len(rows)})</h2>")
        if rows:
            out.append("<table><tr><th>id</th><th>expected</th><th>reason</th></tr>")
            out.extend(f"<tr><td>{e(r['id'])}</td><td>{'' if r['expected'] is None else r['expected']}</td>"
                       f"<td>{e(r['reason'])}</td></tr>" for r in rows)
            out.append("</table>")
    out.append("<p>Every bin, with its expected and predicted count, is in <code>audit.csv</code>.</p>")
    out.append("</body></html>\n")
    return "\n".join(out)


def write_report(report: AuditReport, out_dir: str | Path) -> dict[str, Path]:
    """Write audit.csv, audit.html and summary.json under ``out_dir``, as one set (:func:`write_set`)."""
    texts = {"csv": to_csv(report.rows), "html": render_html(report),
             "summary": json.dumps(report.summary(), indent=2) + "\n"}
    return write_set(out_dir, texts, REPORT_FILES)


def write_set(out_dir: str | Path, texts: dict[str, str], files: dict[str, str]) -> dict[str, Path]:
    """``texts[name]`` into ``out_dir/files[name]`` for every name, as one set; the paths by name.

    Every file is written in full to a temporary name beside its place first; only once all are
    written is each moved into place (``os.replace``, atomic on its own). A failure while
    rendering or writing (a full disk, an error) leaves the previous set as it was and no temporary
    behind. What remains is the moment between the first and the last rename, with no data left
    to write: only a crash of the machine or process in those microseconds could leave a new
    audit.csv beside an old summary.json. (A folder swapped by a symlink would close it, at the
    price of links in place of files, which copies and other systems handle badly.)
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {name: out_dir / file for name, file in files.items()}
    temporaries: dict[str, Path] = {}
    try:
        for name, text in texts.items():
            temporaries[name] = _write_temporary(paths[name], text)
        for name in list(temporaries):
            os.replace(temporaries.pop(name), paths[name])
    finally:
        for temporary in temporaries.values():
            temporary.unlink(missing_ok=True)
    return paths


def summary_line(report: AuditReport) -> str:
    s, t = report.summary(), report.threshold
    return (f"flagged {s['flagged']} of {s['judged']} judged bins ({s['not_judged']} not judged, {s['bad']} bad); "
            f"threshold {t.value:.3f}: validation precision {_pct(t.precision)}, recall {_pct(t.recall)} "
            f"({t.n_flagged} of {t.n_records} records flagged{_interval(t.precision_interval)})"
            + ("" if t.reached else f" (target {t.target_precision:.0%} not reached)"))
