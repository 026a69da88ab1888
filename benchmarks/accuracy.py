"""Benchmark: cross-validated accuracy of the default recipe against a frozen baseline.

On the photos of ``abid-sample`` whose record says 1-5 items, stratified
k-fold (default 3): each fold in turn is the test set, never seen in training.
The other folds are split 85/15 into train and validation, like the flow does.
On every fold, measured in the same run:

* **recipe**: every point of the grid (default: ``flows/grids/default.json``)
  is trained with ``bincount.model.train.train_model``, the join's
  ``bincount.model.selection.choose_model`` picks the served model (one point or an
  ensemble, with or without flip TTA) from validation accuracy, and the test
  fold is scored through ``bincount.model.predictor``, the endpoint's own forward pass.
* **baseline**: frozen ImageNet EfficientNet-Lite0 features (224 px, global
  average pool) and a logistic regression, as measured in ENVIRONMENT.md.

It prints per-fold and mean (± std over folds) accuracy, count RMSE and MAE,
per-class recall, training seconds and images/s, and writes them as JSON with
``--out``. ``--set key=value`` changes every grid point (an ablation: e.g.
``--set count_loss_weight=0``); ``--select key=value`` changes the join's
choice (``--select ensemble=1``); ``--folds-to-run 0`` runs one fold only.
``--train-fraction 0.25`` trains the recipe and the baseline on a stratified
quarter of each fold's training photos, the validation and test photos
unchanged: points of a learning curve, which say how much more data would buy.

Run: ``python benchmarks/accuracy.py`` (see ``--help``); about an hour on a
2-core CPU with the default grid. Photos come from ``--data`` /
``BINCOUNT_ABID_SAMPLE`` / ``../shared/abid-sample``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "abid-sample"
DEFAULT_GRID = REPO_ROOT / "flows" / "grids" / "default.json"
CLASSES = [1, 2, 3, 4, 5]
BASELINE_SIZE = 224


def _assignment(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def add_data_argument(parser: argparse.ArgumentParser) -> None:
    """--data: the abid-sample folder, for every benchmark that trains on it."""
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("BINCOUNT_ABID_SAMPLE", DEFAULT_DATA)),
                        help="abid-sample folder (bin-images/, metadata/)")


def add_protocol_arguments(parser: argparse.ArgumentParser) -> None:
    """--folds, --folds-to-run, --val-fraction, --seed: the cross-validation protocol (protocol_folds)."""
    parser.add_argument("--folds", type=int, default=3, help="k of the stratified k-fold")
    parser.add_argument("--folds-to-run", default="", help="comma-separated fold numbers (default: all)")
    parser.add_argument("--val-fraction", type=float, default=0.15, help="of the training folds, for validation")
    parser.add_argument("--seed", type=int, default=0, help="seeds the folds, the split and training")


def protocol_folds(y, args):
    """For each fold to run: (k, the other folds, their training and validation shares, the test fold),
    stratified by the labels ``y`` (a tensor) and seeded by ``args.seed``."""
    import numpy as np
    from sklearn.model_selection import StratifiedKFold, train_test_split

    folds = list(StratifiedKFold(args.folds, shuffle=True, random_state=args.seed).split(np.zeros(len(y)), y))
    wanted = [int(k) for k in args.folds_to_run.split(",")] if args.folds_to_run else range(args.folds)
    for k in wanted:
        rest, test_idx = folds[k]
        train_idx, val_idx = train_test_split(rest, test_size=args.val_fraction, random_state=args.seed,
                                              stratify=y[rest].numpy())
        yield k, rest, train_idx, val_idx, test_idx


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Stratified k-fold accuracy, RMSE and per-class recall on the 1-5 photos of abid-sample: "
                    "the grid's served model (as the flow's join chooses it) vs a frozen-backbone baseline.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_data_argument(parser)
    parser.add_argument("--grid", type=Path, default=DEFAULT_GRID, help="the recipe: a grid JSON file")
    add_protocol_arguments(parser)
    parser.add_argument("--set", dest="overrides", type=_assignment, action="append", default=[],
                        metavar="KEY=VALUE", help="override a training setting in every grid point")
    parser.add_argument("--select", dest="select", type=_assignment, action="append", default=[],
                        metavar="KEY=VALUE", help="override the grid's select (ensemble, tta, decision)")
    parser.add_argument("--train-fraction", type=float, default=1.0,
                        help="train on this stratified fraction of each fold's training photos (a learning curve); "
                             "validation and test photos stay whole")
    parser.add_argument("--no-baseline", action="store_true", help="skip the frozen-backbone baseline")
    parser.add_argument("--limit", type=int, default=0, help="use only the first N photos (a smoke test)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if not 0 < args.train_fraction <= 1:
        parser.error(f"--train-fraction must be in (0, 1], got {args.train_fraction}")
    return args


def load_dataset(data: Path) -> tuple[list[str], list[bytes], list[int]]:
    """Ids, photo bytes and counts of every readable bin whose record says 1-5 items."""
    if not (data / "metadata").is_dir():
        sys.exit(f"no abid-sample at {data}: pass --data or set BINCOUNT_ABID_SAMPLE")
    ids, raws, counts, skipped = [], [], [], 0
    for meta in sorted((data / "metadata").glob("*.json")):
        image = data / "bin-images" / f"{meta.stem}.jpg"
        try:
            count = json.loads(meta.read_text()).get("EXPECTED_QUANTITY")
        except ValueError:
            skipped += 1
            continue
        if count in CLASSES and image.exists():
            ids.append(meta.stem)
            raws.append(image.read_bytes())
            counts.append(count)
    print(f"{len(ids)} photos with counts 1-5 in {data} ({skipped} unreadable records skipped)")
    return ids, raws, counts


def scores(y_true: list[int], y_pred: list[int]) -> dict:
    from bincount.model.metrics import count_metrics

    m = count_metrics(y_true, y_pred, CLASSES)
    return {"accuracy": m["accuracy"], "rmse": m["rmse"], "mae": m["mae"],
            "recall": {c: m["per_class"][c]["recall"] for c in m["per_class"]}}


def run_recipe(configs, select, x, y, train_idx, val_idx, test_idx, seed: int) -> dict:
    """Train every grid point, choose as the join does, score the test fold through the handler."""
    from bincount.model.predictor import load_predictor
    from bincount.model.selection import choose_model
    from bincount.model.train import train_model

    started = time.perf_counter()
    results = [train_model(cfg, x[train_idx], y[train_idx], x[val_idx], y[val_idx], num_classes=len(CLASSES),
                           seed=seed, progress=False) for cfg in configs]
    train_seconds = time.perf_counter() - started
    images = sum(cfg.epochs for cfg in configs) * len(train_idx)
    choice = choose_model(results, select, y[val_idx].tolist(), CLASSES)
    predictor = load_predictor(choice.state, choice.meta)
    predictions = predictor.predict_tensors(x[test_idx])
    truth = [CLASSES[i] for i in y[test_idx].tolist()]
    out = scores(truth, [p["count"] for p in predictions])
    out["variants"] = serving_variants(predictor, x[test_idx], truth)
    out.update(served=[m.grid_point for m in choice.meta.members], tta=choice.meta.tta,
               train_photos=len(train_idx),
               val_accuracy=choice.val_accuracy, train_seconds=train_seconds,
               train_images_per_second=images / train_seconds,
               points={r.config["name"]: {"val_accuracy": r.val_accuracy, "best_epoch": r.best_epoch}
                       for r in results})
    return out


def serving_variants(predictor, x, truth: list[int]) -> dict:
    """Test scores of the same trained members served other ways: the best member alone or
    the ensemble, with or without flip TTA, answering the argmax or the expected count.
    Only inference differs, so these compare the join's choices without retraining."""
    import itertools

    import torch

    from bincount.model.predictor import decide

    chunks = [predictor.view_probabilities(x[start:start + 64], views=4) for start in range(0, len(x), 64)]
    per_member = [[torch.cat([chunk[m][v] for chunk in chunks]) for v in range(4)]  # [member][view] -> softmax
                  for m in range(len(predictor.models))]
    out = {}
    for members, tta, decision in itertools.product(("best", "ensemble"), (False, True), ("argmax", "expected")):
        chosen = per_member[:1] if members == "best" else per_member
        p = torch.stack([v for m in chosen for v in (m if tta else m[:1])]).mean(0)
        answers = [CLASSES[decide(row, CLASSES, decision)] for row in p.tolist()]
        out[f"{members}{' +tta' if tta else ''} {decision}"] = scores(truth, answers)
    return out


def frozen_features(x):
    """Globally pooled ImageNet EfficientNet-Lite0 features of uint8 photos."""
    import torch

    from bincount.data.images import normalizer
    from bincount.model.architectures import create_model, get_arch

    arch = get_arch("efficientnet_lite0")
    model = create_model("efficientnet_lite0", num_classes=len(CLASSES), pretrained=True,
                         image_size=BASELINE_SIZE).eval()
    norm = normalizer(arch.mean, arch.std)
    out = []
    with torch.inference_mode():
        for start in range(0, len(x), 64):
            features = model.extract_features(norm(x[start:start + 64]))
            out.append(features.mean((2, 3)))
    return torch.cat(out).numpy()


def run_baseline(features, y, train_idx, test_idx) -> dict:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    started = time.perf_counter()
    head = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000, C=0.1))
    head.fit(features[train_idx], y[train_idx])
    out = scores([CLASSES[i] for i in y[test_idx]], [CLASSES[i] for i in head.predict(features[test_idx])])
    out["train_seconds"] = time.perf_counter() - started
    return out


def summarize(name: str, folds: list[dict]) -> dict:
    import numpy as np

    summary = {}
    for key in ("accuracy", "rmse", "mae", "train_seconds", "train_images_per_second"):
        values = [f[key] for f in folds if key in f]
        if values:
            summary[key] = {"mean": float(np.mean(values)), "std": float(np.std(values))}
    summary["recall"] = {c: float(np.mean([f["recall"][c] for f in folds])) for c in folds[0]["recall"]}
    if "variants" in folds[0]:
        summary["variants"] = {v: {k: float(np.mean([f["variants"][v][k] for f in folds])) for k in ("accuracy", "rmse")}
                               for v in folds[0]["variants"]}
    recall = " ".join(f"{c}:{r:.2f}" for c, r in summary["recall"].items())
    print(f"{name:9s} accuracy {summary['accuracy']['mean']:.3f} ± {summary['accuracy']['std']:.3f}   "
          f"RMSE {summary['rmse']['mean']:.3f} ± {summary['rmse']['std']:.3f}   "
          f"MAE {summary['mae']['mean']:.3f}   recall {recall}   "
          f"train {summary['train_seconds']['mean'] / 60:.1f} min/fold"
          + (f" at {summary['train_images_per_second']['mean']:.1f} images/s"
             if "train_images_per_second" in summary else ""))
    for variant, v in summary.get("variants", {}).items():
        print(f"    served as {variant:24s} accuracy {v['accuracy']:.3f}  RMSE {v['rmse']:.3f}")
    return summary


def main(argv=None) -> int:
    args = parse_args(argv)
    import numpy as np
    import torch
    from sklearn.model_selection import train_test_split

    from bincount.data.images import decode_all
    from bincount.model.grid import expand_grid, select_config

    grid = json.loads(args.grid.read_text())
    configs = [replace(cfg, **dict(args.overrides)) for cfg in expand_grid(grid)]
    select = replace(select_config(grid), **dict(args.select))
    sizes = {cfg.image_size for cfg in configs}
    if len(sizes) != 1:
        sys.exit(f"the grid mixes image sizes {sorted(sizes)}; this benchmark decodes one")
    size = sizes.pop()
    print(f"recipe: {[c.name for c in configs]} at {size} px, select {select}; overrides {dict(args.overrides)}")

    ids, raws, counts = load_dataset(args.data)
    if args.limit:
        ids, raws, counts = ids[:args.limit], raws[:args.limit], counts[:args.limit]
    y = torch.tensor([CLASSES.index(c) for c in counts])
    x = decode_all(raws, size, desc=f"decoding at {size} px")
    features = None
    if not args.no_baseline:
        features = frozen_features(x if size == BASELINE_SIZE else decode_all(raws, BASELINE_SIZE,
                                                                              desc=f"decoding at {BASELINE_SIZE} px"))
    results, wanted = {"recipe": [], "baseline": []}, []
    for k, rest, train_idx, val_idx, test_idx in protocol_folds(y, args):
        wanted.append(k)
        if args.train_fraction < 1:
            train_idx, _ = train_test_split(train_idx, train_size=args.train_fraction, random_state=args.seed,
                                            stratify=y[train_idx].numpy())
            rest = np.concatenate([train_idx, val_idx])  # the baseline has no use for a validation split
        fold = run_recipe(configs, select, x, y, train_idx, val_idx, test_idx, args.seed)
        results["recipe"].append(fold)
        line = f"fold {k} ({len(train_idx)} training photos): " \
               f"recipe accuracy {fold['accuracy']:.3f} RMSE {fold['rmse']:.3f} " \
               f"(served {'+'.join(fold['served'])}{' +TTA' if fold['tta'] else ''}, val {fold['val_accuracy']:.3f}, " \
               f"{fold['train_seconds'] / 60:.1f} min)"
        if features is not None:
            base = run_baseline(features, y.numpy(), rest, test_idx)
            results["baseline"].append(base)
            line += f" | baseline accuracy {base['accuracy']:.3f} RMSE {base['rmse']:.3f}"
        print(line, flush=True)
        for variant, v in fold["variants"].items():
            print(f"    served as {variant:24s} accuracy {v['accuracy']:.3f}  RMSE {v['rmse']:.3f}", flush=True)
        write(args, results, None)  # after every fold: an hour's run is not lost to an interruption
    print(f"\n{len(y)} photos, {args.folds}-fold stratified CV, folds run: {list(wanted)}")
    summary = {name: summarize(name, folds_) for name, folds_ in results.items() if folds_}
    write(args, results, summary)
    return 0


def write(args, results: dict, summary: dict | None) -> None:
    if args.out:
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                        "summary": summary, "folds": results}, indent=2))


if __name__ == "__main__":
    raise SystemExit(main())
