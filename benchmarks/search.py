"""Benchmark: does a hyperparameter search beat the default recipe on photos it never saw?

The protocol of ``benchmarks/accuracy.py``: the 1-5 photos of ``abid-sample``, stratified
k-fold (default 3); each fold in turn is the test set, the rest split 85/15 into train and
validation. On every fold, in the same run:

* **recipe**: the default grid (``--recipe``, ``flows/grids/default.json``), trained and chosen
  as the flow's join chooses (accuracy.py's ``run_recipe``).
* **search**: the search grid (``--grid``, ``flows/grids/search.json``): its trials run one after
  another through the flow's own code (``bincount.model.trials.grid_point``: values drawn by its
  strategy, early stopping, trial records), then the join's choice among them.

Both choose on the validation split and are scored once on the test fold, so the search's winner
is judged on photos the search never saw. It prints each fold's test accuracy for both, their
difference, and the verdict: does the search beat the recipe by more than the recipe's own
fold-to-fold spread (one standard deviation)?

Run: ``python benchmarks/search.py`` (see ``--help``). With the default grids that is 2 recipe
points and 12 trials of EfficientNet-Lite0 at 224 px per fold: hours on a GPU, days on a 2-core
CPU. ``--limit``, ``--folds-to-run`` and ``--set`` make a smoke test.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import (CLASSES, REPO_ROOT, _assignment, add_data_argument, add_protocol_arguments,  # noqa: E402
                      load_dataset, protocol_folds, run_recipe, scores)

DEFAULT_SEARCH = REPO_ROOT / "flows" / "grids" / "search.json"
DEFAULT_RECIPE = REPO_ROOT / "flows" / "grids" / "default.json"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Stratified k-fold test accuracy of a search grid's chosen model against the default recipe's, "
                    "on the 1-5 photos of abid-sample.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_data_argument(parser)
    parser.add_argument("--grid", type=Path, default=DEFAULT_SEARCH, help="the search: a grid JSON with a search block")
    parser.add_argument("--recipe", type=Path, default=DEFAULT_RECIPE, help="what it must beat: a grid JSON")
    add_protocol_arguments(parser)
    parser.add_argument("--trials", type=int, default=0, help="override the search's trial count")
    parser.add_argument("--set", dest="overrides", type=_assignment, action="append", default=[],
                        metavar="KEY=VALUE", help="override a default of both grids (e.g. image_size=128)")
    parser.add_argument("--limit", type=int, default=0, help="use only the first N photos (a smoke test)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    return parser.parse_args(argv)


def with_overrides(grid: dict, overrides: dict, trials: int = 0) -> dict:
    grid = {**grid, "defaults": {**grid.get("defaults", {}), **overrides}}
    if trials and "search" in grid:
        grid["search"] = {**grid["search"], "trials": trials}
    return grid


def run_search(grid: dict, x, y, train_idx, val_idx, test_idx, seed: int, records: Path) -> dict:
    """Every trial of the grid's search in turn, as the flow's train tasks run them on one machine;
    then the join's choice among them, scored on the test fold."""
    from bincount.model.grid import grid_search, plan_grid, select_config
    from bincount.model.predictor import load_predictor
    from bincount.model.selection import choose_model
    from bincount.model.train import CachedSplit, fit
    from bincount.model.trials import TrialStore, grid_point

    search = grid_search(grid)
    store = TrialStore(str(records))
    train, val = CachedSplit(x[train_idx], y[train_idx]), CachedSplit(x[val_idx], y[val_idx])
    started, results = time.perf_counter(), []
    for item in plan_grid(grid):
        with grid_point(item, defaults=grid.get("defaults", {}), search=search, store=store) as point:
            result = fit(point.config, train, val, num_classes=len(CLASSES), seed=seed, progress=False,
                         should_stop=point.stopping)
            point.finish(result)
        results.append(result)
        print(f"    {point.config.name} {point.record.params if point.record else ''}: val {result.val_accuracy:.3f}"
              + (f", stopped after epoch {result.stopped_after}" if result.stopped_after else ""), flush=True)
    train_seconds = time.perf_counter() - started
    choice = choose_model(results, select_config(grid), y[val_idx].tolist(), CLASSES)
    predictions = load_predictor(choice.state, choice.meta).predict_tensors(x[test_idx])
    out = scores([CLASSES[i] for i in y[test_idx].tolist()], [p["count"] for p in predictions])
    out.update(served=[m.grid_point for m in choice.meta.members], val_accuracy=choice.val_accuracy,
               train_seconds=train_seconds, epochs_trained=sum(len(r.history) for r in results),
               trials=[r.to_dict() for r in store.records().values()])
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from bincount.data.images import decode_all
    from bincount.model.grid import expand_grid, grid_search, select_config

    overrides = dict(args.overrides)
    search_grid = with_overrides(json.loads(args.grid.read_text()), overrides, args.trials)
    recipe_grid = with_overrides(json.loads(args.recipe.read_text()), overrides)
    search = grid_search(search_grid)
    if search is None:
        sys.exit(f"{args.grid} has no search block")
    recipe = expand_grid(recipe_grid)
    sizes = {c.image_size for c in recipe} | {search_grid["defaults"].get("image_size", 224)}
    if len(sizes) != 1 or "image_size" in search.space:
        sys.exit(f"the recipe and the search must share one image size (this benchmark decodes once): {sorted(sizes)}")
    size = sizes.pop()
    print(f"search: {search.strategy}, {search.trials} trials over {list(search.space)}; "
          f"recipe: {[c.name for c in recipe]}; {size} px; overrides {overrides}")

    ids, raws, counts = load_dataset(args.data)
    if args.limit:
        ids, raws, counts = ids[:args.limit], raws[:args.limit], counts[:args.limit]
    y = torch.tensor([CLASSES.index(c) for c in counts])
    x = decode_all(raws, size, desc=f"decoding at {size} px")
    results = {"recipe": [], "search": []}
    with tempfile.TemporaryDirectory(prefix="bincount-search-") as work:
        for k, _, train_idx, val_idx, test_idx in protocol_folds(y, args):
            print(f"fold {k}: {len(train_idx)} train, {len(val_idx)} validation, {len(test_idx)} test photos")
            base = run_recipe(recipe, select_config(recipe_grid), x, y, train_idx, val_idx, test_idx, args.seed)
            found = run_search(search_grid, x, y, train_idx, val_idx, test_idx, args.seed, Path(work) / f"fold{k}")
            results["recipe"].append(base)
            results["search"].append(found)
            print(f"fold {k}: recipe test accuracy {base['accuracy']:.3f} (val {base['val_accuracy']:.3f}, "
                  f"{base['train_seconds'] / 60:.1f} min) | search {found['accuracy']:.3f} (val "
                  f"{found['val_accuracy']:.3f}, served {'+'.join(found['served'])}, {found['train_seconds'] / 60:.1f} "
                  f"min, {found['epochs_trained']} epochs) | difference {found['accuracy'] - base['accuracy']:+.3f}",
                  flush=True)
            write(args, results, None)
    summary = summarize(results)
    print(f"\nrecipe {summary['recipe_mean']:.3f} ± {summary['recipe_std']:.3f} (fold-to-fold), search "
          f"{summary['search_mean']:.3f} ± {summary['search_std']:.3f}; search - recipe {summary['difference_mean']:+.3f} "
          f"({summary['search_over_recipe']:.3f}x); beats the recipe by more than its spread: {summary['beats']}")
    write(args, results, summary)
    return 0


def summarize(results: dict) -> dict:
    import numpy as np

    recipe = np.array([f["accuracy"] for f in results["recipe"]])
    search = np.array([f["accuracy"] for f in results["search"]])
    difference = search - recipe
    spread = float(recipe.std(ddof=1)) if len(recipe) > 1 else 0.0
    return {"recipe_mean": float(recipe.mean()), "recipe_std": spread, "search_mean": float(search.mean()),
            "search_std": float(search.std(ddof=1)) if len(search) > 1 else 0.0,
            "difference_mean": float(difference.mean()), "search_over_recipe": float(search.mean() / recipe.mean()),
            "beats": bool(difference.mean() > spread), "folds": len(recipe)}


def write(args, results: dict, summary: dict | None) -> None:
    if args.out:
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                        "summary": summary, "folds": results}, indent=2, default=str))


if __name__ == "__main__":
    raise SystemExit(main())
