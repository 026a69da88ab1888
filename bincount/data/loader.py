"""Photos into uint8 tensors through a torch DataLoader: worker processes read and decode.

Two ways, chosen per split by how much memory the decoded photos would take:

* **cached** (:func:`decode_photos`): the split is decoded once, by the loader's
  workers, into one tensor in the order asked for; each epoch then costs only
  augmentation and the network. This is how every run trained before shards, and
  with the same decode it gives the same tensor, so the same weights.
* **streamed** (:class:`StreamedPhotos`): each epoch reads the shards again, in an
  order shuffled for (seed, epoch), through a shuffle buffer, decoding in the
  workers as it goes. Memory holds a few batches per worker, whatever the number of
  photos; the workers keep the network fed as long as decoding keeps up.

Photos come from any mapping of id to bytes: a run's shards
(:class:`bincount.data.shards.Photos`), read a shard at a time, or a plain dict.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import random
from collections.abc import Mapping, Sequence

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from bincount.data.images import decode
from bincount.data.progress import progress_bar
from bincount.data.shards import Photos, read_photos

# Decoded photos (training and validation together) a train task may keep in memory before
# it streams them instead: 512 MiB is about 3,500 photos at 224 px, four times the default
# run's 850, and small beside the 0.7-1 GB that torch and the model take anyway.
DEFAULT_CACHE_BYTES = 512 * 2**20
SHUFFLE_BUFFER = 2000  # photos per worker; a shard of 256 MB holds about 4,000
INITIAL_BUFFER = 100  # photos a worker holds before its first comes out
PLAIN_CHUNK = 64  # photos per unit of work when the photos are a dict, not shards
DECODE_BATCH = 32  # photos per batch a decoding worker hands back


def default_workers() -> int:
    """Loader processes: one per core this process may use, at most 4 (decoding a bin photo
    takes about 4 ms; four cores feed several hundred photos a second)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(4, cores))


def streaming_workers(device: str) -> int:
    """Loader processes for streaming while ``device`` trains. On a CPU they take cores from
    training itself, and one decodes far faster (about 300 photos/s) than the network trains
    (10-20 there): one is enough; measured, two gave 0.71x of training from memory, one 0.88x."""
    return 1 if device == "cpu" else default_workers()


def decoded_bytes(n: int, image_size: int) -> int:
    return n * 3 * image_size * image_size


def units_of(photos: Mapping[str, bytes], ids: Sequence[str], parts: int) -> list[tuple[str | None, list[str]]]:
    """``ids`` cut into units of work (shard, ids from it), at least ``parts`` of them where
    there are enough photos: a shard holding too many of the ids for one worker is cut in
    several units (each worker then streams the shard and keeps its own part)."""
    if isinstance(photos, Photos):
        by_shard = [(shard, sorted(wanted)) for shard, wanted in photos.by_shard(ids).items()]
        if len(by_shard) >= parts:
            return by_shard
        cut = -(-parts // max(len(by_shard), 1))
        return [(shard, wanted[k::cut]) for shard, wanted in by_shard for k in range(cut) if wanted[k::cut]]
    ids = list(ids)
    return [(None, ids[k:k + PLAIN_CHUNK]) for k in range(0, len(ids), PLAIN_CHUNK)]


def _read_unit(photos: Mapping[str, bytes], unit: tuple[str | None, list[str]]):
    shard, ids = unit
    if shard is None:
        return read_photos(photos, ids)
    return photos.read_shard(shard, set(ids))


def _worker_share(units: list):
    info = get_worker_info()
    return units if info is None else units[info.id::info.num_workers]


class _Decoded(IterableDataset):
    """(positions, uint8 batch) for the photos of ``ids``, each worker its share of the units.
    Batches, not single photos, cross from the workers: each crossing costs a shared-memory
    segment."""

    def __init__(self, photos, ids, image_size: int, workers: int):
        self.photos, self.image_size = photos, image_size
        self.position = {bin_id: k for k, bin_id in enumerate(ids)}
        self.units = units_of(photos, ids, max(workers, 1))

    def __iter__(self):
        positions, images = [], []
        for unit in _worker_share(self.units):
            for bin_id, raw in _read_unit(self.photos, unit):
                positions.append(self.position[bin_id])
                images.append(decode(raw, self.image_size))
                if len(images) == DECODE_BATCH:
                    yield torch.tensor(positions), torch.stack(images)
                    positions, images = [], []
        if images:
            yield torch.tensor(positions), torch.stack(images)


def decode_photos(photos: Mapping[str, bytes], ids: Sequence[str], image_size: int, *,
                  workers: int | None = None, progress: bool = True, desc: str = "decoding"):
    """The photos of ``ids`` decoded and resized into one uint8 tensor (N, 3, size, size), in
    the order of ``ids``, by ``workers`` loader processes (0: in this process)."""
    ids = list(ids)
    workers = default_workers() if workers is None else workers
    out = torch.empty((len(ids), 3, image_size, image_size), dtype=torch.uint8)
    if not ids:
        return out
    dataset = _Decoded(photos, ids, image_size, workers)
    loader = DataLoader(dataset, batch_size=None, num_workers=min(workers, len(dataset.units)))
    seen = 0
    with progress_bar(total=len(ids), desc=desc, unit=" img", disable=not progress) as bar:
        for positions, x in loader:
            out[positions] = x
            seen += len(positions)
            bar.update(len(positions))
    if seen != len(ids):
        raise RuntimeError(f"decoded {seen} of {len(ids)} photos")
    return out


class StreamedPhotos:
    """One split streamed from its photos every epoch, for splits too big to cache.

    ``batches(epoch, batch_size)`` yields (uint8 images, class indices, ids) batches. With
    ``shuffle`` (the default), the units of work are shuffled for (seed, epoch) and each worker
    passes its photos through a shuffle buffer seeded for (seed, epoch, worker): the same seed
    gives the same order, another seed another. Without it (validation), photos come unit by unit.

    The worker processes persist across epochs (one loader per batch size and order), told the
    epoch through shared memory: starting them and refilling their buffers every epoch cost
    training on 2 cores about a tenth of its speed.
    """

    def __init__(self, photos: Mapping[str, bytes], ids: Sequence[str], targets: Sequence[int], image_size: int, *,
                 seed: int = 0, workers: int | None = None, buffer: int = SHUFFLE_BUFFER, pin_memory: bool = False):
        self.photos, self.image_size, self.seed = photos, image_size, seed
        self.ids = list(ids)
        self.target = dict(zip(self.ids, targets))
        self.workers = default_workers() if workers is None else workers
        self.buffer, self.pin_memory = buffer, pin_memory
        self.units = units_of(photos, self.ids, max(self.workers, 1))
        self._loaders: dict[tuple[int, bool], tuple[DataLoader, _Epoch]] = {}

    def __len__(self) -> int:
        return len(self.ids)

    def batches(self, epoch: int, batch_size: int, *, shuffle: bool = True):
        loader, dataset = self._loader(batch_size, shuffle)
        dataset.epoch.value = epoch
        for x, y, ids in loader:
            yield x, torch.as_tensor(y, dtype=torch.long), ids

    def _loader(self, batch_size: int, shuffle: bool):
        if (batch_size, shuffle) not in self._loaders:
            dataset = _Epoch(self, shuffle)
            workers = min(self.workers, len(self.units))
            loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, pin_memory=self.pin_memory,
                                collate_fn=_collate, prefetch_factor=4 if workers else None,
                                persistent_workers=workers > 0)
            self._loaders[batch_size, shuffle] = loader, dataset
        return self._loaders[batch_size, shuffle]


class _Epoch(IterableDataset):
    """The epochs of a :class:`StreamedPhotos`: (uint8 tensor, class index, id) per photo, for
    the epoch in ``self.epoch`` (shared with the workers, so that they can persist)."""

    def __init__(self, stream: StreamedPhotos, shuffle: bool):
        self.stream, self.shuffle = stream, shuffle
        self.epoch = multiprocessing.Value("i", 0)

    def __iter__(self):
        s, epoch = self.stream, self.epoch.value
        units = list(s.units)
        if self.shuffle:
            random.Random(f"{s.seed}:{epoch}").shuffle(units)
        photos = (
            (decode(raw, s.image_size), s.target[bin_id], bin_id)
            for unit in _worker_share(units) for bin_id, raw in _read_unit(s.photos, unit))
        if not self.shuffle:
            yield from photos
            return
        info = get_worker_info()
        yield from _shuffled(photos, random.Random(f"{s.seed}:{epoch}:{info.id if info else 0}"), s.buffer)


def _shuffled(items, rng: random.Random, size: int, initial: int = INITIAL_BUFFER):
    """``items`` through a shuffle buffer of ``size``: the first comes out once ``initial`` are
    in, and the buffer grows by one more each step until it is full (WebDataset's scheme), so
    an epoch does not wait for a whole buffer to be decoded before its first batch."""
    buffer: list = []
    items = iter(items)
    for item in items:
        buffer.append(item)
        if len(buffer) < size:
            buffer.extend(itertools.islice(items, 1))
        if len(buffer) >= min(initial, size):
            k = rng.randrange(len(buffer))
            buffer[k], buffer[-1] = buffer[-1], buffer[k]
            yield buffer.pop()
    rng.shuffle(buffer)
    yield from buffer


def _collate(items):
    xs, ys, ids = zip(*items)
    return torch.stack(xs), list(ys), list(ids)
