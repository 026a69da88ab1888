"""Monitoring a served model from its captured traffic: what it predicts, how sure it is, whether that drifted.

``bincount monitor --capture PATH|s3://... --run ID`` (and ``flows/monitor_flow.py``) read the
requests an endpoint captured (the local endpoint's ``--capture-dir``, or a SageMaker endpoint's
``DataCaptureConfig`` destination: bincount.data.captures), and compare them with the model run:

- **The reference** is the run's test split: its photos were held out of training and drawn like
  the training photos, and the evaluate step kept the model's answers on them
  (``test_predictions``; recomputed from the run's photos for runs without it). The run's training
  split's counts are shown beside it, as what the model learnt from.
- **What was predicted**: each captured photo's count and confidence (the highest of its
  probabilities) come from the captured answer; where only requests were captured (capture mode
  ``input``) the run's model answers them again.
- **Drift** is judged twice, on all the captured photos and per time bucket (hour or day, UTC):

  * the distribution of predicted counts, by its population stability index against the
    reference's, PSI = sum over counts of (captured share - reference share) x ln(captured share /
    reference share), shares floored at 1e-4. The usual reading: under 0.1 no change, 0.1 to 0.2 a
    moderate one, **0.2 or more a significant one: drift** (``--psi-threshold``). With few photos
    PSI is noisy (with 45 reference and 40 captured photos over 5 counts, sampling alone gives
    about 0.2 on average), so a PSI over the threshold counts only where a chi-square test of the
    two count tables (scipy) also says the difference is not chance: p < ``--alpha`` (0.01);
  * the distribution of confidences, by a two-sample Kolmogorov-Smirnov test (scipy): **drift when
    p < alpha**. The KS statistic (the largest gap between the two cumulative distributions) is
    reported too.

  The overall verdict (exit status 1) is the test on all captured photos; buckets that drift on
  their own are marked in the report.
- **Worth relabelling**: the least confident captured photos, with thumbnails (``--relabel``, 50);
  every photo is in the CSV.

A capture line or file that cannot be read is skipped and listed, by file and line, in the report,
the summary and on stderr; never silently. Output, in ``--out``: ``monitor.html`` (self-contained:
charts and thumbnails inline), ``monitor.csv`` (one row per captured photo) and ``summary.json``,
written as a set (temporary files moved into place once all three are written).
"""

from __future__ import annotations

import base64
import csv
import heapq
import html
import io
import json
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bincount.data.captures import (CSV_CONTENT_TYPES, JSON_CONTENT_TYPES, BadCapture, CapturedEvent, CaptureProblem,
                                    expected_counts, media_type, photo_id, request_photos)

DEFAULT_BUCKET = "day"
BUCKETS = {"hour": ("h", "%Y-%m-%d %H:00"), "day": ("D", "%Y-%m-%d")}  # pandas frequency, label
DEFAULT_PSI_THRESHOLD = 0.2
DEFAULT_ALPHA = 0.01
DEFAULT_RELABEL = 50
PSI_FLOOR = 1e-4  # a count never predicted on one side would make PSI infinite
LOW_CONFIDENCE = 0.5  # each bucket reports the share of photos below this confidence
THUMBNAIL_PX = 128
MAX_PROBLEMS_SHOWN = 200  # in the HTML; all are in summary.json
REPORT_FILES = {"html": "monitor.html", "csv": "monitor.csv", "summary": "summary.json"}


@dataclass(frozen=True)
class Settings:
    bucket: str = DEFAULT_BUCKET
    psi_threshold: float = DEFAULT_PSI_THRESHOLD
    alpha: float = DEFAULT_ALPHA
    relabel: int = DEFAULT_RELABEL

    def __post_init__(self):
        if self.bucket not in BUCKETS:
            raise ValueError(f"bucket must be one of {sorted(BUCKETS)}, not {self.bucket!r}")
        if not self.psi_threshold > 0:
            raise ValueError(f"the PSI threshold must be above 0, got {self.psi_threshold}")
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha must be between 0 and 1, got {self.alpha}")
        if self.relabel < 0:
            raise ValueError(f"the number of photos to relabel must be 0 or more, got {self.relabel}")


# --- the reference: the run's test split ----------------------------------------------

@dataclass
class Reference:
    """The model run's answers on its test split, and its training split's counts."""

    run: str  # pathspec
    run_id: str
    classes: list[int]
    counts: list[int]  # predicted counts of the test photos
    confidences: list[float]
    train_labels: list[int]

    def describe(self) -> dict:
        return {"run": self.run, "classes": self.classes, "test_photos": len(self.counts),
                "train_photos": len(self.train_labels)}


def confidence(prediction: dict) -> float:
    """How sure an answer is: its highest probability (whatever count the decision rule chose)."""
    return float(max(prediction["probabilities"].values()))


def reference_from_predictions(run: str, run_id: str, classes: list[int], test_predictions: Iterable[dict],
                               train_labels: Iterable[int]) -> Reference:
    predictions = list(test_predictions)
    if not predictions:
        raise ValueError(f"run {run} has no test predictions to compare captured traffic with")
    return Reference(run=run, run_id=str(run_id), classes=list(classes), counts=[int(p["count"]) for p in predictions],
                     confidences=[confidence(p) for p in predictions], train_labels=[int(x) for x in train_labels])


def reference_of(run, predictor=None) -> Reference:
    """The reference of a BinCountFlow run (a Client Run): its kept test predictions, or, for a run
    that kept none, its model's answers on its test photos (``predictor``, default the run's)."""
    from bincount.flow.runs import photos_in, predictor_of, split_rows
    from bincount.model.metadata import ModelMeta

    data = run.data
    test_ids, _ = split_rows(run, "test")
    _, train_labels = split_rows(run, "train")
    if "test_predictions" in data:
        kept = data.test_predictions
        predictions = [kept[i] for i in test_ids]
    else:
        predictions = (predictor or predictor_of(run)).predict_photos(photos_in(data), test_ids)
    classes = ModelMeta.from_dict(data.model_meta).classes
    return reference_from_predictions(run.pathspec, run.id, classes, predictions, train_labels)


# --- captured traffic ---------------------------------------------------------------

def response_predictions(payload, classes: list[int]) -> list[dict]:
    """The predictions of a captured answer: bincount's JSON, or its CSV (count, then each class's
    probability in ``classes`` order); BadCapture if it is neither."""
    media = media_type(payload.content_type)
    try:
        text = payload.body.decode("utf-8")
        if media in JSON_CONTENT_TYPES:
            predictions = json.loads(text)["predictions"]
            out = [{"count": int(p["count"]), "run_id": p.get("run_id"),
                    "probabilities": {str(k): float(v) for k, v in p["probabilities"].items()}} for p in predictions]
        elif media in CSV_CONTENT_TYPES:
            out = []
            for row in csv.reader(io.StringIO(text)):
                if len(row) != 1 + len(classes):
                    raise BadCapture(f"a CSV answer has {len(row)} columns; the run's {len(classes)} classes "
                                     f"need {1 + len(classes)}")
                out.append({"count": int(row[0]), "run_id": None,
                            "probabilities": {str(c): float(v) for c, v in zip(classes, row[1:])}})
        else:
            raise BadCapture(f"the answer's content type {payload.content_type!r} is not bincount's JSON or CSV")
    except BadCapture:
        raise
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
        raise BadCapture(f"the captured answer is not bincount's predictions ({type(e).__name__}: {e})") from None
    if not out or any(not p["probabilities"] for p in out):
        raise BadCapture("the captured answer holds no predictions")
    return out


@dataclass
class Traffic:
    """What the captures held: one row per photo, the problems, and the least confident photos."""

    rows: list[dict] = field(default_factory=list)
    problems: list[CaptureProblem] = field(default_factory=list)
    photos: dict[str, bytes] = field(default_factory=dict)  # only the ``keep`` least confident
    events: int = 0


def _predictions_of(event: CapturedEvent, photos: list[bytes] | None, classes: list[int],
                    predict: Callable[[list[bytes]], list[dict]] | None) -> tuple[list[dict], str]:
    if event.response is not None:
        predictions, by = response_predictions(event.response, classes), "endpoint"
    elif photos is not None and predict is not None:
        predictions, by = predict(photos), "recomputed"
    else:
        raise BadCapture("neither the answer nor a photo was captured")
    if photos is not None and len(photos) != len(predictions):
        raise BadCapture(f"the request has {len(photos)} photos but the answer {len(predictions)} predictions")
    return predictions, by


def read_traffic(items: Iterable[CapturedEvent | CaptureProblem], classes: list[int], *,
                 predict: Callable[[list[bytes]], list[dict]] | None = None,
                 keep: int = DEFAULT_RELABEL) -> Traffic:
    """Rows for every captured photo in ``items`` (bincount.data.sources.iter_captures), keeping only
    the photos of the ``keep`` least confident in memory. ``predict`` answers requests captured
    without their answer."""
    traffic, seen = Traffic(), set()
    kept: list[tuple[float, str, bytes]] = []  # a heap whose top is the most confident kept photo
    for item in items:
        if isinstance(item, CaptureProblem):
            traffic.problems.append(item)
            continue
        if item.event_id in seen:
            traffic.problems.append(CaptureProblem(item.file, item.line, f"eventId {item.event_id!r} captured "
                                                                         "twice: kept the first"))
            continue
        try:
            photos = request_photos(item.request) if item.request is not None else None
            predictions, by = _predictions_of(item, photos, classes, predict)
        except BadCapture as e:
            traffic.problems.append(CaptureProblem(item.file, item.line, str(e)))
            continue
        seen.add(item.event_id)
        traffic.events += 1
        expected = expected_counts(item.custom_attributes, len(predictions))
        for i, prediction in enumerate(predictions):
            row = {"id": photo_id(item, i, len(predictions)), "event_id": item.event_id,
                   "time": item.time.isoformat(), "predicted": prediction["count"],
                   "confidence": confidence(prediction),
                   **{f"p_{c}": prediction["probabilities"].get(str(c)) for c in classes},
                   "expected": None if isinstance(expected, str) else expected[i],
                   "inference_id": item.inference_id, "answered_by": prediction.get("run_id"), "predicted_by": by,
                   "file": item.file, "line": item.line}
            traffic.rows.append(row)
            if photos is not None and keep:
                heapq.heappush(kept, (-row["confidence"], row["id"], photos[i]))
                if len(kept) > keep:
                    heapq.heappop(kept)
    traffic.photos = {photo: raw for _, photo, raw in kept}
    return traffic


# --- drift ----------------------------------------------------------------------------

def shares(counts: Iterable[int], classes: list[int]) -> list[float]:
    """The share of each class among ``counts`` (counts outside ``classes`` are not in any share)."""
    import pandas as pd

    counts = pd.Series(list(counts), dtype="int64")
    if counts.empty:
        return [0.0] * len(classes)
    return counts.value_counts().reindex(classes, fill_value=0).div(len(counts)).tolist()


def psi(reference: list[float], current: list[float], floor: float = PSI_FLOOR) -> float:
    """Population stability index of ``current`` shares against ``reference`` shares: the symmetric
    Kullback-Leibler divergence, sum (c - r) ln(c / r), shares floored at ``floor``."""
    import numpy as np
    from scipy.special import rel_entr

    r = np.clip(np.asarray(reference, dtype=float), floor, None)
    c = np.clip(np.asarray(current, dtype=float), floor, None)
    return float(np.sum(rel_entr(c, r) + rel_entr(r, c)))


def compare_counts(reference: list[int], current: list[int], classes: list[int], *,
                   psi_threshold: float = DEFAULT_PSI_THRESHOLD, alpha: float = DEFAULT_ALPHA) -> dict:
    """PSI and a chi-square test of two sets of predicted counts; drift when PSI >= threshold and p < alpha."""
    import numpy as np
    from scipy.stats import chi2_contingency

    table = np.array([[list(reference).count(c) for c in classes], [list(current).count(c) for c in classes]])
    table = table[:, table.sum(0) > 0]  # a count neither side predicted tells nothing
    if table.shape[1] < 2 or (table.sum(1) == 0).any():
        p = 1.0
    else:
        p = float(chi2_contingency(table)[1])  # (statistic, p, dof, expected) on any scipy scikit-learn allows
    value = psi(shares(reference, classes), shares(current, classes))
    return {"psi": round(value, 6), "chi2_p": p, "drift": bool(value >= psi_threshold and p < alpha)}


def compare_confidences(reference: list[float], current: list[float], *, alpha: float = DEFAULT_ALPHA) -> dict:
    """A two-sample Kolmogorov-Smirnov test of two sets of confidences; drift when p < alpha."""
    import numpy as np
    from scipy.stats import ks_2samp

    if not len(reference) or not len(current):
        return {"ks": None, "ks_p": 1.0, "drift": False, "median": None}
    result = ks_2samp(reference, current)
    return {"ks": round(float(result.statistic), 6), "ks_p": float(result.pvalue), "drift": bool(result.pvalue < alpha),
            "median": float(np.median(current))}


def drift_of(reference: Reference, counts: list[int], confidences: list[float], settings: Settings) -> dict:
    by_count = compare_counts(reference.counts, counts, reference.classes, psi_threshold=settings.psi_threshold,
                              alpha=settings.alpha)
    by_confidence = compare_confidences(reference.confidences, confidences, alpha=settings.alpha)
    return {"photos": len(counts), "counts": by_count, "confidence": by_confidence,
            "drift": by_count["drift"] or by_confidence["drift"]}


def bucket_table(table, reference: Reference, settings: Settings):
    """One row per time bucket: photos, share of each predicted count, confidence, and drift on its own."""
    import pandas as pd

    freq, label = BUCKETS[settings.bucket]
    rows = []
    for start, part in table.groupby(pd.to_datetime(table["time"], utc=True).dt.floor(freq), sort=True):
        drift = drift_of(reference, part["predicted"].tolist(), part["confidence"].tolist(), settings)
        rows.append({"bucket": start.strftime(label), "photos": len(part),
                     **{f"share_{c}": s for c, s in zip(reference.classes,
                                                        shares(part["predicted"], reference.classes))},
                     "mean_confidence": float(part["confidence"].mean()),
                     f"share_below_{LOW_CONFIDENCE:g}": float((part["confidence"] < LOW_CONFIDENCE).mean()),
                     "psi": drift["counts"]["psi"], "chi2_p": drift["counts"]["chi2_p"],
                     "ks": drift["confidence"]["ks"], "ks_p": drift["confidence"]["ks_p"], "drift": drift["drift"]})
    return pd.DataFrame(rows)


# --- the report -----------------------------------------------------------------------

@dataclass
class MonitorReport:
    capture: str
    reference: Reference
    settings: Settings
    table: object  # pandas DataFrame: one row per captured photo
    buckets: object  # pandas DataFrame: one row per time bucket
    overall: dict  # drift_of all captured photos
    problems: list[CaptureProblem]
    events: int
    thumbnails: dict[str, str]  # id -> data: URI, for the photos worth relabelling

    @property
    def drift(self) -> bool:
        return bool(self.overall["drift"])

    def relabel(self):
        """The photos most worth relabelling: least confident first (then by time), ``settings.relabel`` of them."""
        return self.table.sort_values(["confidence", "time", "id"]).head(self.settings.relabel)

    def answered_by_others(self) -> dict[str, int]:
        """Captured answers made by another model run than the reference's, by run id."""
        others = self.table["answered_by"].dropna()
        others = others[others.astype(str) != self.reference.run_id]
        return {str(k): int(v) for k, v in others.value_counts().items()}

    def summary(self) -> dict:
        classes = self.reference.classes
        return {"capture": self.capture, "model_run": self.reference.run, "reference": self.reference.describe(),
                "settings": asdict(self.settings), "requests": self.events, "photos": len(self.table),
                "drift": self.drift, "overall": self.overall,
                "shares": {"train_labels": dict(zip(map(str, classes), shares(self.reference.train_labels, classes))),
                           "test_predicted": dict(zip(map(str, classes), shares(self.reference.counts, classes))),
                           "captured_predicted": dict(zip(map(str, classes),
                                                          shares(self.table["predicted"], classes)))},
                "buckets": json.loads(self.buckets.to_json(orient="records")),
                "answered_by_other_runs": self.answered_by_others(),
                "relabel": self.relabel()["id"].tolist(),
                "problems": [p.to_dict() for p in self.problems]}


def build_report(traffic: Traffic, reference: Reference, settings: Settings = Settings(), *,
                 capture: str = "") -> MonitorReport:
    """The report on ``traffic`` against ``reference``; ValueError when nothing usable was captured."""
    import pandas as pd

    if not traffic.rows:
        first = f"; the first: {traffic.problems[0]}" if traffic.problems else ""
        raise ValueError(f"no usable captured predictions in {capture or 'the captures'} "
                         f"({len(traffic.problems)} lines or files skipped{first})")
    table = pd.DataFrame(traffic.rows)
    table["expected"] = table["expected"].astype("Int64")
    table.insert(2, "bucket", pd.to_datetime(table["time"], utc=True).dt.floor(BUCKETS[settings.bucket][0])
                 .dt.strftime(BUCKETS[settings.bucket][1]))
    table = table.sort_values(["time", "file", "line", "id"], kind="stable").reset_index(drop=True)
    overall = drift_of(reference, table["predicted"].tolist(), table["confidence"].tolist(), settings)
    report = MonitorReport(capture=capture, reference=reference, settings=settings, table=table,
                           buckets=bucket_table(table, reference, settings), overall=overall,
                           problems=list(traffic.problems), events=traffic.events, thumbnails={})
    from bincount.audit import thumbnail_uri

    for bin_id in report.relabel()["id"]:
        raw = traffic.photos.get(bin_id)
        if raw is not None:
            try:
                report.thumbnails[bin_id] = thumbnail_uri(raw, THUMBNAIL_PX)
            except Exception:  # noqa: BLE001 - the photo was answered once; without a thumbnail its row stands
                pass
    return report


def run_monitor(capture: str, run, settings: Settings = Settings(), *, progress: bool = True) -> MonitorReport:
    """Read the traffic captured under ``capture`` (a folder or an s3:// prefix) and report on it
    against ``run`` (a BinCountFlow Client Run); the run's model is loaded only if some requests
    were captured without their answers."""
    from bincount.data.sources import iter_captures, open_captures
    from bincount.flow.runs import predictor_of

    files = open_captures(capture)
    reference = reference_of(run)
    loaded = []

    def predict(photos: list[bytes]) -> list[dict]:
        if not loaded:
            loaded.append(predictor_of(run))
        return loaded[0].predict_bytes(photos)

    traffic = read_traffic(iter_captures(files, progress=progress), reference.classes, predict=predict,
                           keep=settings.relabel)
    return build_report(traffic, reference, settings, capture=capture)


# --- charts ---------------------------------------------------------------------------

def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def charts(report: MonitorReport) -> dict[str, bytes]:
    """The report's charts as PNGs: predicted counts against the reference, confidences, and both over time."""
    import numpy as np
    from matplotlib.figure import Figure

    classes, reference = report.reference.classes, report.reference
    out = {}
    fig = Figure(figsize=(6.5, 3.2), dpi=100, layout="constrained")
    ax = fig.subplots()
    x, width = np.arange(len(classes)), 0.27
    for k, (name, values) in enumerate([("training labels", shares(reference.train_labels, classes)),
                                        ("test split, predicted", shares(reference.counts, classes)),
                                        ("captured, predicted", shares(report.table["predicted"], classes))]):
        ax.bar(x + (k - 1) * width, values, width, label=name)
    ax.set_xticks(x, [str(c) for c in classes])
    ax.set(xlabel="count", ylabel="share of photos",
           title=f"Predicted counts: PSI {report.overall['counts']['psi']:.3f}")
    ax.legend(fontsize=8)
    out["counts"] = _png(fig)

    fig = Figure(figsize=(6.5, 3.2), dpi=100, layout="constrained")
    ax = fig.subplots()
    for name, values in (("test split", reference.confidences), ("captured", report.table["confidence"])):
        values = np.sort(np.asarray(values, dtype=float))
        ax.step(values, np.arange(1, len(values) + 1) / len(values), where="post", label=f"{name} ({len(values)})")
    ks = report.overall["confidence"]["ks"]
    ax.set(xlabel="confidence (highest probability)", ylabel="share of photos at or below",
           title="Confidence" + (f": KS {ks:.3f}, p {report.overall['confidence']['ks_p']:.2g}" if ks is not None else ""))
    ax.legend(fontsize=8)
    out["confidence"] = _png(fig)

    buckets = report.buckets
    fig = Figure(figsize=(6.5, 3.4), dpi=100, layout="constrained")
    ax = fig.subplots()
    bottom = np.zeros(len(buckets))
    for c in classes:
        values = buckets[f"share_{c}"].to_numpy()
        ax.bar(buckets["bucket"], values, bottom=bottom, label=f"count {c}")
        bottom += values
    ax.plot(buckets["bucket"], buckets["mean_confidence"], "ko-", label="mean confidence")
    ax.set(ylabel="share / confidence", ylim=(0, 1.05), title=f"By {report.settings.bucket} (UTC)")
    ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))  # beside the bars, not over them
    out["time"] = _png(fig)
    return out


# --- HTML, CSV, JSON --------------------------------------------------------------------

def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _num(value, digits: int = 3) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e-3 and value else f"{value:.{digits}f}"
    return str(value)


def verdict_line(report: MonitorReport) -> str:
    """One line: how much was read, the two tests and the verdict."""
    o, s = report.overall, report.settings
    counts, conf = o["counts"], o["confidence"]
    skipped = f" ({len(report.problems)} capture lines or files skipped)" if report.problems else ""
    ks = "" if conf["ks"] is None else f"confidence KS {conf['ks']:.3f} (p {conf['ks_p']:.2g})"
    return (f"{len(report.table)} captured photos in {report.events} requests{skipped}, {len(report.buckets)} "
            f"{s.bucket} bucket(s), against {len(report.reference.counts)} test photos of {report.reference.run}: "
            f"predicted counts PSI {counts['psi']:.3f} (chi-square p {counts['chi2_p']:.2g}), {ks}: "
            + ("DRIFT" if report.drift else "no drift")
            + f" (PSI >= {s.psi_threshold:g} with p < {s.alpha:g}, or KS p < {s.alpha:g})")


def render_html(report: MonitorReport, pngs: dict[str, bytes] | None = None) -> str:
    """A self-contained HTML page: no external stylesheet, script, font or image."""
    import pandas as pd

    e = html.escape
    pngs = charts(report) if pngs is None else pngs
    o, s = report.overall, report.settings
    classes = report.reference.classes
    verdict = ('<strong class=warn>drift</strong>' if report.drift else "<strong class=ok>no drift</strong>")
    out = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        f"<title>Monitor: {'drift' if report.drift else 'no drift'} in {len(report.table)} captured photos</title>",
        "<style>body{font-family:sans-serif;margin:1.5em;color:#222}table{border-collapse:collapse;margin:.5em 0}"
        "td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left;vertical-align:middle}"
        "th{background:#f2f2f2}.warn{color:#a40000}.ok{color:#1a6e1a}.num{text-align:right}img{display:block}"
        "</style></head><body>",
        "<h1>Captured traffic against its model run</h1>",
        "<table class=summary>",
        f"<tr><th>verdict</th><td>{verdict}</td></tr>",
        f"<tr><th>capture</th><td>{e(report.capture)}</td></tr>",
        f"<tr><th>model run (reference)</th><td>{e(report.reference.run)}: {len(report.reference.counts)} test "
        f"photos (its answers on them are the reference), {len(report.reference.train_labels)} training photos</td></tr>",
        f"<tr><th>captured</th><td>{len(report.table)} photos in {report.events} requests, "
        f"{len(report.buckets)} {s.bucket} bucket(s) (UTC); {len(report.problems)} capture lines or files "
        "skipped</td></tr>",
        f"<tr><th>predicted counts</th><td>PSI <strong>{o['counts']['psi']:.3f}</strong> (drift at &ge; "
        f"{s.psi_threshold:g}, and only if a chi-square test gives p &lt; {s.alpha:g}: p = "
        f"{_num(o['counts']['chi2_p'])}){' <strong class=warn>drift</strong>' if o['counts']['drift'] else ''}</td></tr>",
        f"<tr><th>confidence</th><td>Kolmogorov-Smirnov statistic {_num(o['confidence']['ks'])}, p = "
        f"{_num(o['confidence']['ks_p'])} (drift at p &lt; {s.alpha:g}); median {_num(o['confidence']['median'])}"
        f"{' <strong class=warn>drift</strong>' if o['confidence']['drift'] else ''}</td></tr>",
    ]
    others = report.answered_by_others()
    if others:
        out.append(f"<tr><th class=warn>other models</th><td>{sum(others.values())} captured answers came from "
                   f"other runs than {e(report.reference.run_id)}: {e(json.dumps(others))}</td></tr>")
    out.append("</table>")
    for name, alt in (("counts", "predicted counts"), ("confidence", "confidences"), ("time", "over time")):
        out.append(f'<img src="{_data_uri(pngs[name])}" alt="{alt}">')
    out.append(f"<h2>By {s.bucket}</h2><table><tr><th>{s.bucket} (UTC)</th><th>photos</th>"
               + "".join(f"<th>share {c}</th>" for c in classes)
               + f"<th>mean confidence</th><th>below {LOW_CONFIDENCE:g}</th><th>PSI</th><th>chi&sup2; p</th>"
                 "<th>KS</th><th>KS p</th><th>drift</th></tr>")
    for row in report.buckets.to_dict("records"):
        out.append(f"<tr><td>{e(row['bucket'])}</td><td class=num>{row['photos']}</td>"
                   + "".join(f"<td class=num>{row[f'share_{c}']:.2f}</td>" for c in classes)
                   + f"<td class=num>{row['mean_confidence']:.3f}</td>"
                     f"<td class=num>{row[f'share_below_{LOW_CONFIDENCE:g}']:.2f}</td>"
                     f"<td class=num>{_num(row['psi'])}</td><td class=num>{_num(row['chi2_p'])}</td>"
                     f"<td class=num>{_num(row['ks'])}</td><td class=num>{_num(row['ks_p'])}</td>"
                     f"<td>{'<strong class=warn>drift</strong>' if row['drift'] else ''}</td></tr>")
    out.append("</table>")
    relabel = report.relabel()
    out.append(f"<h2>Worth relabelling ({len(relabel)} least confident)</h2>")
    out.append("<table><tr><th>photo</th><th>id</th><th>time</th><th>predicted</th><th>confidence</th>"
               "<th>expected</th><th>inference id</th><th>file, line</th></tr>")
    for row in relabel.to_dict("records"):
        uri = report.thumbnails.get(row["id"])
        photo = f'<img src="{uri}" alt="photo {e(row["id"])}" width={THUMBNAIL_PX}>' if uri else ""
        expected = "" if pd.isna(row["expected"]) else row["expected"]
        out.append(f"<tr><td>{photo}</td><td>{e(row['id'])}</td><td>{e(row['time'])}</td>"
                   f"<td class=num>{row['predicted']}</td><td class=num>{row['confidence']:.3f}</td>"
                   f"<td class=num>{e(str(expected))}</td><td>{e(str(row['inference_id'] or ''))}</td>"
                   f"<td>{e(row['file'])}, {row['line']}</td></tr>")
    out.append("</table>")
    out.append(f"<h2>Skipped capture lines and files ({len(report.problems)})</h2>")
    if report.problems:
        out.append("<table><tr><th>file</th><th>line</th><th>reason</th></tr>")
        out.extend(f"<tr><td>{e(p.file)}</td><td class=num>{p.line or ''}</td><td>{e(p.reason)}</td></tr>"
                   for p in report.problems[:MAX_PROBLEMS_SHOWN])
        out.append("</table>")
        if len(report.problems) > MAX_PROBLEMS_SHOWN:
            out.append(f"<p>The first {MAX_PROBLEMS_SHOWN} are shown; all are in summary.json.</p>")
    else:
        out.append("<p>None.</p>")
    out.append("<p>Every captured photo, with its time, prediction and probabilities, is in "
               "<code>monitor.csv</code>.</p></body></html>\n")
    return "\n".join(out)


def to_csv(report: MonitorReport) -> str:
    buf = io.StringIO()
    report.table.to_csv(buf, index=False)
    return buf.getvalue()


def write_report(report: MonitorReport, out_dir: str | Path) -> dict[str, Path]:
    """monitor.html, monitor.csv and summary.json under ``out_dir``, as one set, as the audit
    writes its report (bincount.audit.write_set: a failure leaves the previous set whole)."""
    from bincount.audit import write_set

    texts = {"html": render_html(report), "csv": to_csv(report),
             "summary": json.dumps(report.summary(), indent=2, default=str) + "\n"}
    return write_set(out_dir, texts, REPORT_FILES)


# --- the flow's card --------------------------------------------------------------------

def card_components(report: MonitorReport) -> list:
    """The report as Metaflow card components (Markdown, tables, the charts, the photos to relabel)."""
    from metaflow.cards import Image, Markdown, Table

    pngs = charts(report)
    o, s = report.overall, report.settings
    relabel = report.relabel()
    components = [
        Markdown(f"# Captured traffic: {'**drift**' if report.drift else 'no drift'}\n\n{verdict_line(report)}"),
        Table([["predicted counts", "PSI", _num(o["counts"]["psi"]), f">= {s.psi_threshold:g} with chi-square p < "
                f"{s.alpha:g} (p = {_num(o['counts']['chi2_p'])})", "drift" if o["counts"]["drift"] else "no drift"],
               ["confidence", "KS", _num(o["confidence"]["ks"]), f"p < {s.alpha:g} (p = {_num(o['confidence']['ks_p'])})",
                "drift" if o["confidence"]["drift"] else "no drift"]],
              headers=["what", "statistic", "value", "drift when", "verdict"]),
        Image(pngs["counts"], label="Predicted counts: training labels, test split and captured"),
        Image(pngs["confidence"], label="Confidence: test split and captured"),
        Image(pngs["time"], label=f"By {s.bucket}"),
        Markdown(f"## By {s.bucket} (UTC)"),
        Table([[_num(v) if isinstance(v, float) else str(v) for v in row] for row in report.buckets.values.tolist()],
              headers=[str(c) for c in report.buckets.columns]),
        Markdown(f"## Worth relabelling ({len(relabel)} least confident)"),
    ]
    rows = []
    for row in relabel.to_dict("records"):
        uri = report.thumbnails.get(row["id"])
        photo = Image(base64.b64decode(uri.split(",", 1)[1]), label=row["id"]) if uri else ""
        rows.append([photo, row["id"], row["time"], str(row["predicted"]), f"{row['confidence']:.3f}",
                     f"{row['file']}, {row['line']}"])
    components.append(Table(rows or [[]], headers=["photo", "id", "time", "predicted", "confidence", "file, line"]))
    components.append(Markdown(f"## Skipped capture lines and files ({len(report.problems)})\n\n"
                               + ("\n".join(f"- `{p.file}` line {p.line}: {p.reason}"
                                            for p in report.problems[:MAX_PROBLEMS_SHOWN]) or "None.")))
    return components
