"""Benchmark: how well the inventory audit finds records that were altered on purpose.

Takes a BinCountFlow run (``--run``) and its **test split**: photos the model
never trained on and whose threshold was not chosen on them (the threshold
comes from the validation split, as ``bincount audit`` does). For each seed:

1. the test bins are written to a temporary folder in the bucket layout (the
   photo bytes the run fetched; each bin's original metadata from ``--data``
   when present, else a minimal record);
2. ``--altered-fraction`` of them (default 30%, chosen with the seed) get their
   ``EXPECTED_QUANTITY`` shifted by -2, -1, +1 or +2, staying within the model's
   classes;
3. the folder is audited with the same code as ``bincount audit``
   (``open_source`` -> ``fetch_subset`` -> ``bincount.model.predictor`` -> the flag
   rule at the chosen threshold);
4. flagged bins are compared with the altered ones: precision = altered among
   flagged, recall = flagged among altered.

Also printed, from the same predictions: the same scores for the rule without
a threshold (flag every disagreement), and pooled precision/recall at a few
fixed thresholds, so the chosen operating point can be seen on its curve.

    METAFLOW_DATASTORE_SYSROOT_LOCAL=/tmp/abidrun2 METAFLOW_USER=dev \\
        .venv/bin/python benchmarks/audit.py --run 1795277212359906
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHIFTS = (-2, -1, 1, 2)
CURVE = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)


def default_data() -> Path:
    return Path(os.environ.get("BINCOUNT_ABID_SAMPLE", REPO.parent / "shared" / "abid-sample"))


def write_folder(root: Path, ids, labels, images, classes, *, fraction: float, seed: int, data: Path | None):
    """The bins in the bucket layout, ``fraction`` of records altered; returns {id: (true, recorded)}."""
    from bincount.data.layout import image_key, metadata_key

    rng = random.Random(seed)
    altered = set(rng.sample(list(ids), round(fraction * len(ids))))
    records = {}
    for bin_id, label in zip(ids, labels):
        recorded = label
        if bin_id in altered:
            recorded = rng.choice([label + s for s in SHIFTS if label + s in classes])
        original = data / metadata_key(bin_id) if data else None
        meta = json.loads(original.read_text()) if original and original.is_file() else {}
        meta["EXPECTED_QUANTITY"] = recorded
        for key, body in ((image_key(bin_id), images[bin_id]), (metadata_key(bin_id), json.dumps(meta).encode())):
            (root / key).parent.mkdir(parents=True, exist_ok=True)
            (root / key).write_bytes(body)
        records[bin_id] = (label, recorded)
    return records


def scores(flagged: set, altered: set, n: int) -> dict:
    tp, fp = len(flagged & altered), len(flagged - altered)
    fn = len(altered - flagged)
    return {"precision": tp / (tp + fp) if tp + fp else None, "recall": tp / (tp + fn) if tp + fn else None,
            "tp": tp, "fp": fp, "fn": fn, "tn": n - tp - fp - fn, "flagged": tp + fp}


def fmt(x) -> str:
    return "  n/a" if x is None else f"{x:5.1%}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a BinCountFlow run id (trained on abid-sample)")
    parser.add_argument("--data", type=Path, default=default_data(),
                        help="the sample's folder, for the bins' original metadata (default: %(default)s)")
    parser.add_argument("--altered-fraction", type=float, default=0.3, help="share of records altered")
    parser.add_argument("--seeds", default="0,1,2", help="alteration seeds, one audit each (default: %(default)s)")
    parser.add_argument("--target-precision", type=float, default=0.9)
    parser.add_argument("--out", type=Path, help="keep each seed's report (audit.csv/html) under this folder")
    args = parser.parse_args(argv)

    from bincount import audit
    from bincount.data.shards import read_photos
    from bincount.data.sources import LocalSource
    from bincount.flow.runs import photos_of, predictor_of

    started = time.monotonic()
    run = audit.choose_model_run(args.run)
    predictor = predictor_of(run)
    classes = predictor.classes
    threshold = audit.threshold_for_run(run, predictor, target_precision=args.target_precision)
    table = run.data.split_table
    test = table[table["split"] == "test"]
    ids, labels = [str(i) for i in test["id"]], [int(x) for x in test["label"]]
    images = dict(read_photos(photos_of(run), ids))  # the test photos, from the run's shards
    data = args.data if (args.data / "metadata").is_dir() else None
    test_predictions = run.data.test_predictions

    print(f"run {run.pathspec}: {predictor.meta.arch} {predictor.meta.image_size} px, classes {classes}, "
          f"device {predictor.device}")
    print(f"threshold {threshold.value:.4f} from {threshold.n_bins} validation bins ({threshold.n_records} "
          f"records, half altered): precision {fmt(threshold.precision)}, recall {fmt(threshold.recall)}, "
          f"{threshold.n_flagged} records flagged ({threshold.flagged_weight:g} bins' worth; precision 95% "
          f"interval {threshold.precision_interval}); "
          f"{threshold.note}")
    print(f"test split: {len(ids)} bins; {args.altered_fraction:.0%} of records altered by +-1 or +-2 per seed; "
          f"metadata from {data or 'minimal records'}")
    print()
    print(f"{'seed':>4} {'altered':>7} {'flagged':>7} {'TP':>3} {'FP':>3} {'FN':>3} {'precision':>9} "
          f"{'recall':>6}   | no threshold (any disagreement): {'flagged':>7} {'precision':>9} {'recall':>6}")
    pooled, pooled_any, curve_points = [], [], []
    accuracy = mismatched = None
    for seed in (int(s) for s in args.seeds.split(",")):
        with tempfile.TemporaryDirectory(prefix="bincount-audit-bench-") as tmp:
            records = write_folder(Path(tmp), ids, labels, images, classes, fraction=args.altered_fraction,
                                   seed=seed, data=data)
            part = audit.score_bins(LocalSource(Path(tmp)), predictor, threshold.value, progress=False)
            if args.out:
                report = audit.combine([part], threshold=threshold, model_run=run.pathspec,
                                       source=f"test split of {run.pathspec}, seed {seed}", classes=classes)
                audit.write_report(report, args.out / f"seed{seed}")
        rows = {r["id"]: r for r in part.rows}
        assert set(rows) == set(ids) and all(r["status"] == "judged" for r in rows.values()), "lost bins"
        if accuracy is None:  # the same photos every seed: check the predictions once
            accuracy = sum(rows[i]["predicted"] == label for i, label in zip(ids, labels)) / len(ids)
            mismatched = sum(rows[i]["predicted"] != test_predictions[i]["count"] for i in ids)
        altered = {i for i, (true, recorded) in records.items() if true != recorded}
        flagged = {i for i, r in rows.items() if r["flagged"]}
        disagree = {i for i, r in rows.items() if r["predicted"] != r["expected"]}
        s, a = scores(flagged, altered, len(ids)), scores(disagree, altered, len(ids))
        pooled.append(s), pooled_any.append(a)
        curve_points.append((rows, altered))
        print(f"{seed:>4} {len(altered):>7} {s['flagged']:>7} {s['tp']:>3} {s['fp']:>3} {s['fn']:>3} "
              f"{fmt(s['precision']):>9} {fmt(s['recall']):>6}   | {'':>33} {a['flagged']:>7} "
              f"{fmt(a['precision']):>9} {fmt(a['recall']):>6}")

    def total(parts):
        tp, fp, fn = (sum(p[k] for p in parts) for k in ("tp", "fp", "fn"))
        return tp, fp, fn, (tp / (tp + fp) if tp + fp else None), (tp / (tp + fn) if tp + fn else None)

    tp, fp, fn, precision, recall = total(pooled)
    _, _, _, any_precision, any_recall = total(pooled_any)
    n_altered = tp + fn
    print(f"{'all':>4} {n_altered:>7} {tp + fp:>7} {tp:>3} {fp:>3} {fn:>3} {fmt(precision):>9} {fmt(recall):>6}"
          f"   | {'':>33} {sum(a['flagged'] for a in pooled_any):>7} {fmt(any_precision):>9} {fmt(any_recall):>6}")
    print()
    print("pooled over seeds, precision / recall if the threshold were:")
    for t in CURVE:
        got = [scores({i for i, r in rows.items() if r["predicted"] != r["expected"] and r["p_record_wrong"] >= t},
                      altered, len(rows)) for rows, altered in curve_points]  # the flag rule at t
        _, _, _, p, r = total(got)
        print(f"  {t:.2f}: {fmt(p)} / {fmt(r)}  ({sum(g['flagged'] for g in got)} flagged)")
    print()
    print(f"test accuracy of the audit's predictions {accuracy:.1%}; they differ from the run's evaluate step on "
          f"{mismatched} of {len(ids)} bins; {time.monotonic() - started:.0f} s")
    print(json.dumps({"run": run.pathspec, "threshold": round(threshold.value, 4),
                      "validation_precision": threshold.precision, "validation_recall": threshold.recall,
                      "test_bins_per_seed": len(ids), "seeds": len(pooled), "altered": n_altered,
                      "flagged": tp + fp, "tp": tp, "fp": fp, "fn": fn, "precision": precision, "recall": recall}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
