"""Photos in shards: WebDataset tar files of bounded size, in a local folder or under an S3 prefix.

A run's photos are written once, as they arrive, into ``shard-000000.tar``,
``shard-000001.tar``, ... (each closed when it reaches ``max_bytes``), and are
read back by streaming whole shards: the access pattern S3 and local disks
are fastest at, and the one that keeps memory flat in the number of photos.
What stays in memory, and in the run's artifacts, is the index: one row per
photo with its id, label, shard and checksum.

The format is WebDataset's (a plain POSIX tar; one sample is the files that share
a key), written with ``webdataset.TarWriter`` and read with its tar iterators, so
any WebDataset reader, ``tar tf`` or a shell can open a shard. Sample keys are
the photo's position in the run (``000000042``) rather than its bin id, because
WebDataset splits a key from its extension at the first dot and an id may hold
one; the id travels in the sample as ``<key>.id``. Each sample is the original
bytes (``.jpg``) and the label (``.cls``): why originals rather than resized
copies is measured in ``benchmarks/shard_formats.py``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from bincount.data.blobs import s3_client, split_s3

SHARD_PATTERN = "shard-%06d.tar"
# AWS recommends objects of 100 MB to 1 GB for training reads from S3; a quarter of a
# gigabyte is about 4,000 bin photos and downloads in seconds on a training machine.
DEFAULT_SHARD_BYTES = 256 * 2**20


class ShardError(RuntimeError):
    """A shard is missing, unreadable, or does not hold what the index says."""


def checksum(raw: bytes) -> str:
    return hashlib.blake2b(raw, digest_size=16).hexdigest()


@dataclass(frozen=True)
class ShardSet:
    """Where a set of photos lives: a root (folder or ``s3://bucket/prefix``) and its shards,
    in write order. Plain data, so a run keeps it as an artifact (``to_dict``)."""

    root: str
    shards: tuple[str, ...] = ()

    @property
    def on_s3(self) -> bool:
        return self.root.startswith("s3://")

    def url(self, shard: str) -> str:
        return f"{self.root.rstrip('/')}/{shard}"

    def to_dict(self) -> dict:
        return {"root": self.root, "shards": list(self.shards)}

    @classmethod
    def from_dict(cls, data: Mapping) -> "ShardSet":
        return cls(root=str(data["root"]), shards=tuple(data["shards"]))

    def open(self, shard: str):
        """A readable binary stream of one whole shard."""
        if shard not in self.shards:
            raise ShardError(f"{shard} is not one of the shards under {self.root}")
        if not self.on_s3:
            try:
                return open(os.path.join(self.root, shard), "rb")
            except OSError as e:
                raise ShardError(f"cannot open shard {self.url(shard)}: {e}") from None
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, prefix = split_s3(self.url(shard))
        try:
            return s3_client().get_object(Bucket=bucket, Key=prefix)["Body"]
        except (BotoCoreError, ClientError) as e:
            raise ShardError(f"cannot read shard {self.url(shard)}: {e}") from None

    def samples(self, shard: str) -> Iterator[tuple[str, int, bytes]]:
        """(id, label, photo bytes) of every sample in one shard, in write order."""
        with self.open(shard) as stream:
            yield from samples_in(stream, self.url(shard))


def samples_in(stream, url: str = "<stream>") -> Iterator[tuple[str, int, bytes]]:
    """(id, label, photo bytes) of every sample in a shard read from a binary ``stream``."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    try:  # (tarfile_samples would open ``url`` itself; the expander reads the stream given)
        for sample in group_by_keys(tar_file_expander([{"url": url, "stream": stream}])):
            yield sample["id"].decode(), int(sample["cls"]), sample["jpg"]
    except (OSError, tarfile.TarError, KeyError, ValueError) as e:
        raise ShardError(f"shard {url} is unreadable: {e!r}") from None


def _tar_bytes(sample: dict[str, bytes]) -> int:
    """What a sample adds to a tar: a 512-byte header and the data padded to 512 per member."""
    return sum(512 + -(-len(data) // 512) * 512 for key, data in sample.items() if key != "__key__")


class ShardSink:
    """Write photos into bounded shards as they arrive; ``close()`` returns the ShardSet.

    A shard is closed before the photo that would take it past ``max_bytes`` (counting tar
    headers and padding, which webdataset's own ShardWriter leaves out), so no shard is
    larger unless a single photo is. On S3 each shard is written to a local temporary file
    and uploaded when it is closed, so at most one shard sits on the local disk at a time.
    """

    def __init__(self, root: str | os.PathLike, *, max_bytes: int = DEFAULT_SHARD_BYTES, prefix: str = ""):
        self.root = str(root)
        self.max_bytes = max_bytes
        self.prefix = prefix  # before each shard's name, so that several writers can share a root
        self._s3 = self.root.startswith("s3://")
        self._local = Path(tempfile.mkdtemp(prefix="bincount-shards-")) if self._s3 else Path(self.root)
        self._local.mkdir(parents=True, exist_ok=True)
        self._shards: list[str] = []
        self._count = 0
        self._writer = None  # the open shard's webdataset.TarWriter; opened with its first photo
        self._size = 0  # bytes in the open shard

    def _open(self) -> None:
        import webdataset as wds

        name = self.prefix + SHARD_PATTERN % len(self._shards)
        # A fixed mtime: the same photos make the same shard bytes, and each member needs no
        # extended header for a fractional time (about 1 KiB a sample otherwise).
        self._writer = wds.TarWriter(str(self._local / name), encoder=False, mtime=0)
        self._shards.append(name)
        self._size = 0

    def _finish(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        self._writer = None
        name = self._shards[-1]
        if self._s3:
            bucket, key = split_s3(f"{self.root.rstrip('/')}/{name}")
            s3_client().upload_file(str(self._local / name), bucket, key)
            os.remove(self._local / name)

    def add(self, bin_id: str, label: int, raw: bytes) -> dict:
        """Write one photo; return its index entry (shard, checksum)."""
        sample = {"__key__": f"{self._count:09d}", "id": bin_id.encode(), "cls": str(int(label)).encode(),
                  "jpg": raw}
        size = _tar_bytes(sample)
        if self._writer is not None and self._size + size > self.max_bytes:
            self._finish()
        if self._writer is None:
            self._open()
        self._writer.write(sample)
        self._size += size
        self._count += 1
        return {"shard": self._shards[-1], "checksum": checksum(raw)}

    def close(self) -> ShardSet:
        self._finish()
        if self._s3:
            shutil.rmtree(self._local, ignore_errors=True)
        return ShardSet(self.root, tuple(self._shards))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if exc[0] is not None and self._s3:  # a failed write leaves nothing local behind
            shutil.rmtree(self._local, ignore_errors=True)


def write_shards(root: str | os.PathLike, samples: Iterable[tuple[str, int, bytes]], *,
                 max_bytes: int = DEFAULT_SHARD_BYTES):
    """Write (id, label, photo bytes) samples into shards under ``root``; return their ShardSet
    and an index (a DataFrame: id, label, shard, checksum) for :class:`Photos`."""
    import pandas as pd

    rows = []
    with ShardSink(root, max_bytes=max_bytes) as sink:
        for bin_id, label, raw in samples:
            rows.append({"id": bin_id, "label": label, **sink.add(bin_id, label, raw)})
        shards = sink.close()
    return shards, pd.DataFrame(rows, columns=["id", "label", "shard", "checksum"])


@dataclass
class MemorySink:
    """Keep photos in a dict instead: for work that is small by construction (one audit
    chunk, a handful of smoke-test photos)."""

    images: dict[str, bytes] = field(default_factory=dict)

    def add(self, bin_id: str, label: int, raw: bytes) -> dict:
        self.images[bin_id] = raw
        return {}


class Photos(Mapping):
    """A run's photos by id, read from its shards: what ``images`` used to be.

    A Mapping, so ``photos[bin_id]`` works, but each lookup streams a shard: for many
    photos use :meth:`read`, which visits each shard that holds one of them once.
    ``index`` is a table with columns ``id``, ``shard`` and ``checksum`` (the run's
    ``subset`` artifact); every photo read is checked against its checksum.
    """

    def __init__(self, shards: ShardSet | Mapping, index):
        self.shards = shards if isinstance(shards, ShardSet) else ShardSet.from_dict(shards)
        self._rows = {row.id: (row.shard, row.checksum) for row in index[["id", "shard", "checksum"]].itertuples()}

    def __getitem__(self, bin_id: str) -> bytes:
        if bin_id not in self._rows:
            raise KeyError(bin_id)
        return next(raw for _, raw in self.read([bin_id]))

    def __iter__(self):
        return iter(self._rows)

    def __len__(self) -> int:
        return len(self._rows)

    def shard_of(self, bin_id: str) -> str:
        return self._rows[bin_id][0]

    def checksum_of(self, bin_id: str) -> str:
        return self._rows[bin_id][1]

    def by_shard(self, ids: Iterable[str]) -> dict[str, set[str]]:
        """The shards that hold ``ids``, in write order, each with the ids wanted from it."""
        wanted: dict[str, set[str]] = {}
        for bin_id in ids:
            if bin_id not in self._rows:
                raise KeyError(f"photo {bin_id!r} is not in this run's index")
            wanted.setdefault(self._rows[bin_id][0], set()).add(bin_id)
        order = {name: i for i, name in enumerate(self.shards.shards)}
        return dict(sorted(wanted.items(), key=lambda item: order.get(item[0], len(order))))

    def read_shard(self, shard: str, ids: set[str]) -> Iterator[tuple[str, bytes]]:
        """(id, bytes) of the wanted ``ids`` in one shard, checked against the index."""
        found = 0
        for bin_id, _, raw in self.shards.samples(shard):
            if bin_id not in ids:
                continue
            if checksum(raw) != self._rows[bin_id][1]:
                raise ShardError(f"photo {bin_id} in {self.shards.url(shard)} does not match its checksum")
            found += 1
            yield bin_id, raw
        if found != len(ids):
            raise ShardError(f"{self.shards.url(shard)} lacks {len(ids) - found} of the photos the index puts "
                             f"there")

    def read(self, ids: Iterable[str]) -> Iterator[tuple[str, bytes]]:
        """(id, bytes) of every photo in ``ids``, shard by shard (not in the order of ``ids``)."""
        for shard, wanted in self.by_shard(ids).items():
            yield from self.read_shard(shard, wanted)


def read_photos(photos: Mapping[str, bytes], ids: Iterable[str]) -> Iterator[tuple[str, bytes]]:
    """(id, bytes) for ``ids`` from any mapping of photos: shard by shard for :class:`Photos`,
    in the order of ``ids`` for a plain dict."""
    if isinstance(photos, Photos):
        return photos.read(ids)
    return ((i, photos[i]) for i in ids)
