"""Benchmark: training images/s of bincount's loop against a plain PyTorch loop.

Both train the same model (the default grid's first point: architecture,
resolution, batch size, ImageNet weights) on the same real bin photos for the
same number of epochs, in this process, one after the other, and take turns
over ``--rounds`` so that load from other processes weighs on each about
equally; each keeps its fastest round.

* **plain**: what a first fine-tune looks like. A ``Dataset`` that opens the
  JPEG with PIL, resizes and flips it every epoch, a ``DataLoader``, fp32,
  the default (NCHW) memory format, every layer training.
* **bincount**: ``bincount.model.train.train_model`` with the recipe as configured,
  after ``bincount.data.images.decode_all`` (decode and resize once per run: its
  time is counted, spread over the epochs as it is in a real run).

Two more rows take the recipe apart, so each speed-up is measured on its own:
the recipe with fp32 (no bf16 autocast) and with no frozen blocks. A last row
streams the photos from WebDataset shards every epoch (``bincount.data.loader``:
DataLoader worker processes read and decode while the model trains), as a train
task does when its photos exceed ``--cache-mb``; it is also printed as a ratio to
the in-memory recipe (the goal: at least 0.9x).
Validation is not timed in any row.

Run: ``python benchmarks/train_speed.py`` (see ``--help``). Photos come from
``--data`` / ``BINCOUNT_ABID_SAMPLE`` / ``../shared/abid-sample``.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/accuracy.py reads the photos
from accuracy import DEFAULT_GRID, add_data_argument  # noqa: E402 - found through the path above


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Training images/s of bincount's loop as a ratio to a plain loop (PIL decode and resize "
                    "every epoch, fp32, NCHW), same model, data and epochs, measured in the same run.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_data_argument(parser)
    parser.add_argument("--grid", type=Path, default=DEFAULT_GRID, help="grid whose first point is the recipe")
    parser.add_argument("--images", type=int, default=192, help="photos per epoch")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per timed run")
    parser.add_argument("--rounds", type=int, default=2, help="each loop runs this often; its fastest counts")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    return parser.parse_args(argv)


def load_photos(data: Path, n: int) -> tuple[list[bytes], list[int]]:
    """The first ``n`` readable photos with a count of 1-5, in id order, and their class indices."""
    from accuracy import CLASSES, load_dataset

    _, raws, counts = load_dataset(data)
    return raws[:n], [CLASSES.index(c) for c in counts[:n]]


def plain_loop(cfg, raws, labels, epochs: int) -> float:
    """Seconds for ``epochs`` epochs of a textbook fine-tune; returns wall time."""
    import torch
    from PIL import Image
    from torchvision.transforms import v2

    from bincount.model.architectures import create_model, get_arch

    arch = get_arch(cfg.arch)
    transform = v2.Compose([v2.Resize((cfg.image_size, cfg.image_size)), v2.RandomHorizontalFlip(),
                            v2.RandomVerticalFlip(), v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True),
                            v2.Normalize(list(arch.mean), list(arch.std))])

    class Photos(torch.utils.data.Dataset):
        def __len__(self):
            return len(raws)

        def __getitem__(self, i):
            with Image.open(io.BytesIO(raws[i])) as image:
                return transform(image.convert("RGB")), labels[i]

    torch.manual_seed(0)
    model = create_model(cfg.arch, num_classes=5, pretrained=cfg.pretrained, image_size=cfg.image_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    loader = torch.utils.data.DataLoader(Photos(), batch_size=cfg.batch_size, shuffle=True)
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    model.train()
    start = time.perf_counter()
    for _ in range(epochs):
        for x, y in loader:
            loss = criterion(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return time.perf_counter() - start


def bincount_loop(cfg, raws, labels, epochs: int) -> float:
    """Seconds for decode-once plus ``epochs`` training epochs of bincount.model.train (validation excluded)."""
    import torch

    from bincount.data.images import decode_all
    from bincount.model.train import train_model

    start = time.perf_counter()
    x = decode_all(raws, cfg.image_size, progress=False)
    decode_seconds = time.perf_counter() - start
    y = torch.tensor(labels)
    result = train_model(replace(cfg, epochs=epochs), x, y, x[:8], y[:8], num_classes=5, progress=False)
    return decode_seconds + sum(len(x) / row["train_images_per_second"] for row in result.history)


def streamed_loop(cfg, raws, labels, epochs: int, shard_dir: Path) -> float:
    """Seconds for ``epochs`` training epochs that stream the photos from shards (validation excluded)."""
    import torch

    from bincount.data.shards import Photos, write_shards
    from bincount.model.predictor import pick_device
    from bincount.model.train import CachedSplit, StreamedSplit, fit

    ids = [f"p{k:05d}" for k in range(len(raws))]
    # written once, outside the timing: fetch_subset's work
    photos = Photos(*write_shards(shard_dir, zip(ids, labels, raws)))
    y = torch.tensor(labels)
    val = CachedSplit(torch.zeros((8, 3, cfg.image_size, cfg.image_size), dtype=torch.uint8), y[:8])
    try:
        result = fit(replace(cfg, epochs=epochs), StreamedSplit(photos, ids, y, cfg.image_size, seed=0,
                                                                device=pick_device()),
                     val, num_classes=5, progress=False)
    finally:
        shutil.rmtree(shard_dir, ignore_errors=True)
    return sum(len(ids) / row["train_images_per_second"] for row in result.history)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from bincount.model.grid import expand_grid

    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = expand_grid(json.loads(args.grid.read_text()))[0]
    raws, labels = load_photos(args.data, args.images)
    n = len(raws) * args.epochs
    print(f"recipe: {recipe.name} ({recipe.arch}, {recipe.image_size} px, batch {recipe.batch_size}, "
          f"frozen_blocks {recipe.frozen_blocks}, precision {recipe.precision}); {len(raws)} photos x "
          f"{args.epochs} epochs; torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    loops = {
        "plain (PIL every epoch, fp32, NCHW)": lambda: plain_loop(recipe, raws, labels, args.epochs),
        "bincount, fp32, no frozen blocks": lambda: bincount_loop(
            replace(recipe, precision="fp32", frozen_blocks=0), raws, labels, args.epochs),
        "bincount, no frozen blocks": lambda: bincount_loop(replace(recipe, frozen_blocks=0), raws, labels,
                                                            args.epochs),
        "bincount (the recipe)": lambda: bincount_loop(recipe, raws, labels, args.epochs),
        "bincount, streamed from shards": lambda: streamed_loop(recipe, raws, labels, args.epochs,
                                                                Path(tempfile.mkdtemp(prefix="bincount-speed-"))),
    }
    best = dict.fromkeys(loops, float("inf"))
    for round_ in range(1, args.rounds + 1):
        for name, loop in loops.items():
            seconds = loop()
            best[name] = min(best[name], seconds)
            print(f"  round {round_}: {name}: {n / seconds:.1f} images/s", flush=True)
    baseline = n / best[next(iter(loops))]
    print(f"\n{'loop':40s} {'images/s':>9s} {'vs plain':>9s}")
    for name, seconds in best.items():
        print(f"{name:40s} {n / seconds:9.1f} {n / seconds / baseline:8.2f}x")
    streamed, cached = best["bincount, streamed from shards"], best["bincount (the recipe)"]
    print(f"\nstreamed from shards vs in memory: {cached / streamed:.2f}x (goal: at least 0.9x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
