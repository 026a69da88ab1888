"""Benchmark: training images/s of 2 data-parallel CPU processes against 1, on the same photos.

The default grid's first point (``flows/grids/default.json``) trains on the first
``--limit`` real photos of abid-sample with counts 1-5 (stratified, seeded
train/validation split) for ``--epochs`` epochs, through
``bincount.model.train.train_on_split``, as a grid point trains in the flow:

* **1 process**: ``python benchmarks/ddp.py --worker ...``, with torch's default
  threads (every core).
* **2 processes**: the same worker launched by ``torchrun --standalone
  --nproc_per_node 2``; each process joins a gloo group, decodes and trains on
  its half of the photos under DistributedDataParallel, at half the batch each.
  ``OMP_NUM_THREADS`` is set to half the cores, so the two do not oversubscribe them.

Same split, seed and global batch in both. Both are CPU runs (CUDA hidden): this
measures what data parallelism gains on one machine's cores. It prints each run's
training images/s (optimizer steps only, all processes together), its seconds in
``train_model`` (training and each epoch's validation), its validation accuracy,
and the speed-up of 2 processes over 1 (a ratio from one run). Decoding is left
out: the 1-process run may wait for bincount's machine lock between decoding
and training, while another training on the machine holds it.

Run: ``python benchmarks/ddp.py`` (see ``--help``). Photos come from ``--data`` /
``BINCOUNT_ABID_SAMPLE`` / ``../shared/abid-sample``.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/accuracy.py reads the photos
from accuracy import DEFAULT_GRID, add_data_argument  # noqa: E402 - found through the path above


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Speed-up of data-parallel training with 2 CPU processes (torchrun, gloo, "
                    "DistributedDataParallel, each process reading its own half of the photos) over 1 process: "
                    "the default grid's first point on the same real photos, split and seed; training images/s, "
                    "time in train_model and validation accuracy of each. The 2 processes get half the cores each "
                    "(OMP_NUM_THREADS); the 1 process gets torch's default (every core).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_data_argument(parser)
    parser.add_argument("--grid", type=Path, default=DEFAULT_GRID, help="grid whose first point is the recipe")
    parser.add_argument("--limit", type=int, default=384, help="use the first N photos in id order (0: all)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per run (replaces the recipe's)")
    parser.add_argument("--val-fraction", type=float, default=0.15, help="of the photos, for validation")
    parser.add_argument("--seed", type=int, default=0, help="seeds the split and training")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)  # internal: one training run
    return parser.parse_args(argv)


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def write_job(folder: Path, args) -> dict:
    """Pickle the recipe, the photos and their split into ``folder`` for the workers; return a summary."""
    import pandas as pd
    from accuracy import CLASSES, load_dataset
    from sklearn.model_selection import train_test_split

    from bincount.model.grid import expand_grid

    recipe = replace(expand_grid(json.loads(args.grid.read_text()))[0], epochs=args.epochs)
    ids, raws, counts = (column[:args.limit or None] for column in load_dataset(args.data))
    # Stratify when every class can have a photo on both sides, as bincount.data.split does.
    stratify = counts if min(counts.count(c) for c in set(counts)) >= 2 else None
    _, val_ids = train_test_split(ids, test_size=args.val_fraction, random_state=args.seed, stratify=stratify)
    val_ids = set(val_ids)
    table = pd.DataFrame({"id": ids, "label": counts, "split": ["val" if i in val_ids else "train" for i in ids]})
    job = {"config": recipe.as_dict(), "images": dict(zip(ids, raws)), "table": table, "classes": CLASSES,
           "seed": args.seed}
    (folder / "job.pkl").write_bytes(pickle.dumps(job))
    return {"recipe": recipe, "train": len(ids) - len(val_ids), "val": len(val_ids)}


def worker(folder: Path) -> int:
    """One training process (of 1, or of 2 under torchrun); rank 0 writes the result."""
    import torch

    from bincount.model import distributed
    from bincount.model.grid import TrainConfig
    from bincount.model.train import train_on_split

    job = pickle.loads((folder / "job.pkl").read_bytes())
    result = train_on_split(TrainConfig(**job["config"]), job["images"], job["table"], job["classes"],
                            seed=job["seed"], progress=False)
    rank, world_size = distributed.world()
    if rank == 0:
        train_seconds = [row["epoch_seconds"] - row["val_seconds"] for row in result.history]
        images = sum(row["train_images_per_second"] * s for row, s in zip(result.history, train_seconds))
        summary = {"processes": world_size, "threads": torch.get_num_threads(), "train_seconds": result.train_seconds,
                   "train_images_per_second": images / sum(train_seconds), "val_accuracy": result.val_accuracy,
                   "best_epoch": result.best_epoch}
        (folder / f"result-{world_size}.json").write_text(json.dumps(summary))
    distributed.cleanup()
    return 0


def launch(folder: Path, processes: int, threads: int | None) -> dict:
    """Run the worker in ``processes`` processes (torchrun when more than one); its summary."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", str(folder)]
    if processes > 1:
        command[1:1] = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    subprocess.run(command, env=env, check=True)
    return json.loads((folder / f"result-{processes}.json").read_text())


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker(args.worker)
    threads_each = max(1, cores() // 2)
    with tempfile.TemporaryDirectory(prefix="bincount-ddp-") as tmp:
        folder = Path(tmp)
        job = write_job(folder, args)
        recipe = job["recipe"]
        print(f"recipe: {recipe.name} ({recipe.arch}, {recipe.image_size} px, global batch {recipe.batch_size}, "
              f"frozen_blocks {recipe.frozen_blocks}, precision {recipe.precision}); {job['train']} train and "
              f"{job['val']} validation photos x {args.epochs} epochs, seed {args.seed}; CPU, {cores()} cores",
              flush=True)
        print("1 process: torch's default threads", flush=True)
        one = launch(folder, 1, None)
        print(f"2 processes (torchrun, gloo): OMP_NUM_THREADS={threads_each} each, set by this benchmark so that "
              f"the two do not oversubscribe the {cores()} cores", flush=True)
        two = launch(folder, 2, threads_each)
    print(f"\n{'run':12s} {'threads':>9s} {'train images/s':>15s} {'train+val s':>12s} {'val accuracy':>13s} "
          f"{'best epoch':>11s}")
    for name, r in (("1 process", one), ("2 processes", two)):
        threads = f"{r['processes']}x{r['threads']}"
        print(f"{name:12s} {threads:>9s} {r['train_images_per_second']:15.1f} {r['train_seconds']:12.1f} "
              f"{r['val_accuracy']:13.3f} {r['best_epoch']:11d}")
    print(f"speed-up of 2 processes over 1: {two['train_images_per_second'] / one['train_images_per_second']:.2f}x "
          f"training images/s, {one['train_seconds'] / two['train_seconds']:.2f}x time in train_model (one run each)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
