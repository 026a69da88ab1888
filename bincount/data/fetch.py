"""Choosing and downloading a class-balanced subset of bins.

Each candidate bin's metadata is read for its label, then its photo is
downloaded and decoded once to prove it is an image. Anything unusable (a
missing or malformed metadata file, a label outside the classes, a missing,
truncated or non-image photo, an id that names no file, an object the source
fails to deliver) is skipped and recorded by id with the reason: whatever one
object raises is that object's reason, never the end of the fetch. Only a
source that fails as a whole (:class:`SourceUnreachable`) ends it.
Downloads run in a thread pool: each is a network round trip, so threads
overlap the latency that a sequential loop would pay once per object. Each
kept photo goes straight to a sink (``bincount.data.shards``: a shard writer
for a run, a dict for small work), so memory holds the index, not the photos.
"""

from __future__ import annotations

import io
import json
import random
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from bincount.data.layout import image_key, metadata_key
from bincount.data.sources import MissingObject, Source, SourceUnreachable, UnreadableObject, describe_error

DEFAULT_WORKERS = 32
MAX_QUANTITY = 2**31 - 1  # any real count is far below; a bigger one is no count (nor fits a table's Int64)


class BadInput(ValueError):
    """One object is unusable; the message says why."""


def parse_classes(spec: str) -> list[int]:
    """``"1-5"`` -> [1, 2, 3, 4, 5]; ``"0-5"``; or a comma list ``"1,3,5"``."""
    try:
        if "-" in spec:
            lo, hi = (int(x) for x in spec.split("-", 1))
            classes = list(range(lo, hi + 1))
        else:
            classes = sorted({int(x) for x in spec.split(",") if x.strip()})
    except ValueError:
        raise ValueError(f"--classes {spec!r}: expected a range like 1-5 or a list like 1,2,3") from None
    if not classes or min(classes) < 0:
        raise ValueError(f"--classes {spec!r}: expected non-negative counts, lowest first")
    return classes


def describe_classes(classes: list[int]) -> str:
    contiguous = classes == list(range(classes[0], classes[-1] + 1))
    return f"{classes[0]}-{classes[-1]}" if contiguous else ",".join(map(str, classes))


def read_file_list(path: str | Path) -> list[str]:
    """Bin ids from a Udacity ``file_list.json`` ({"1": ["metadata/<id>.json", ...], ...})."""
    with open(path) as f:
        listing = json.load(f)
    if not isinstance(listing, dict) or not all(isinstance(v, list) for v in listing.values()):
        raise ValueError(f"{path}: expected a JSON object of count -> list of metadata paths")
    for count, keys in listing.items():
        for key in keys:
            if not isinstance(key, str):  # a file list is written by a program: a wrong one is wrong throughout
                raise ValueError(f"{path}: entry {key!r} under {count!r} is not a string "
                                 "(expected a path such as 'metadata/<id>.json')")
    # Ids are strings: '00526' and '526' are different bins, so never int() them.
    return [PurePosixPath(key).stem for keys in listing.values() for key in keys]


def unusable_id(bin_id) -> str | None:
    """Why ``bin_id`` cannot name a bin's files (it would name another place, or none), else None.

    An id comes from a listing or a file list that one bad line must not end: such an id is that
    bin's skip reason, like any bad object.
    """
    if not isinstance(bin_id, str) or not bin_id:
        return f"unusable id {bin_id!r}: not a non-empty string"
    if bin_id in {".", ".."} or "/" in bin_id or "\\" in bin_id:
        return f"unusable id {bin_id!r}: a path, not a file name"
    if any(ord(c) < 32 or ord(c) == 127 for c in bin_id):
        return f"unusable id {bin_id!r}: has control characters"
    return None


def parse_label(raw: bytes) -> int:
    try:
        meta = json.loads(raw)
    except RecursionError:  # '[[[[...' deeper than the interpreter's stack
        raise BadInput("malformed metadata: nested too deeply") from None
    except ValueError as e:  # not UTF-8, not JSON, or an integer too long to convert (int_max_str_digits)
        raise BadInput(f"malformed metadata: {describe_error(e)}") from None
    quantity = meta.get("EXPECTED_QUANTITY") if isinstance(meta, dict) else None
    if isinstance(quantity, bool) or not isinstance(quantity, int):
        raise BadInput(f"metadata has no integer EXPECTED_QUANTITY (got {_short(repr(quantity))})")
    if abs(quantity) > MAX_QUANTITY:
        raise BadInput(f"metadata EXPECTED_QUANTITY is not a plausible count ({_short(str(quantity))})")
    return quantity


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def check_image(raw: bytes) -> tuple[int, int]:
    """Decode the whole image once; return (width, height) or raise BadInput."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(raw)) as image:
            image.load()  # a full decode: a truncated JPEG fails here, not in training
            return image.size
    except UnidentifiedImageError:
        raise BadInput("not an image") from None
    except Image.DecompressionBombError as e:  # not an OSError: caught by name
        raise BadInput(f"unreadable image: decompression bomb: {e}") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise BadInput(f"unreadable image: {e}") from None
    except Exception as e:  # noqa: BLE001 - whatever a decoder raises on one photo is that photo's reason
        raise BadInput(f"unreadable image: {describe_error(e)}") from None


@dataclass
class Subset:
    """What fetch_subset chose: ids, labels, where the sink put each photo, and what it skipped."""

    ids: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    sizes: list[tuple[int, int]] = field(default_factory=list)
    stored: list[dict] = field(default_factory=list)  # per kept bin, what the sink said (shard, checksum)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (id, reason)
    out_of_class: dict[str, int] = field(default_factory=dict)  # skipped for their count: id -> count
    # Where each kept and each skipped bin stood in the order candidates were visited, and the
    # skipped bin's count where it had one: what merge_parts needs to combine chunks.
    positions: list[int] = field(default_factory=list)
    skipped_at: list[tuple[int, int | None]] = field(default_factory=list)
    dropped: int = 0  # photos stored but left out by merge_parts (their class was full earlier)

    def table(self):
        import pandas as pd

        table = pd.DataFrame({"id": self.ids, "label": self.labels,
                              "width": [w for w, _ in self.sizes], "height": [h for _, h in self.sizes]})
        return pd.concat([table, pd.DataFrame(self.stored, index=table.index)], axis=1)

    def skipped_table(self):
        import pandas as pd

        return pd.DataFrame(self.skipped, columns=["id", "reason"])

    def class_counts(self) -> dict[int, int]:
        from collections import Counter

        return dict(sorted(Counter(self.labels).items()))


def _read_object(source: Source, key: str, missing: str) -> bytes | str:
    """The object's bytes, or why not. Only a source failing as a whole raises."""
    try:
        return source.read(key)
    except MissingObject:
        return missing
    except UnreadableObject as e:
        return str(e)
    except SourceUnreachable:
        raise
    except Exception as e:  # noqa: BLE001 - one object's failure, whatever its type, is its skip reason
        return f"cannot read {key}: {describe_error(e)}"


def _read_label(source: Source, bin_id: str) -> int | str:
    raw = _read_object(source, metadata_key(bin_id), "metadata missing")
    if isinstance(raw, str):
        return raw
    try:
        return parse_label(raw)
    except BadInput as e:
        return str(e)
    except Exception as e:  # noqa: BLE001 - as above: parsing one object never ends the fetch
        return f"malformed metadata: {describe_error(e)}"


def _read_image(source: Source, bin_id: str) -> tuple[bytes, tuple[int, int]] | str:
    raw = _read_object(source, image_key(bin_id), "image missing")
    if isinstance(raw, str):
        return raw
    try:
        return raw, check_image(raw)
    except BadInput as e:
        return str(e)


def _read_bin(source: Source, bin_id: str, wanted: set[int], need: dict[int, int]):
    """(label or reason, (bytes, size) or reason, or None when not downloaded)."""
    if (reason := unusable_id(bin_id)) is not None:
        return reason, None
    label = _read_label(source, bin_id)
    # ``need`` is read while the caller updates it: a stale value costs at most
    # a wasted download, never a wrong choice (the caller decides, in order).
    if isinstance(label, str) or label not in wanted or need[label] <= 0:
        return label, None
    return label, _read_image(source, bin_id)


def candidate_order(source: Source, candidate_ids: list[str] | None = None, *, seed: int = 0,
                    progress: bool = True) -> list[str]:
    """The order in which bins are visited: ``candidate_ids`` (a file list) or every bin the
    source lists, duplicates dropped, shuffled by ``seed``."""
    from bincount.data.progress import progress_bar

    source.check()
    if candidate_ids is None:
        candidate_ids = list(progress_bar(source.list_ids(), desc="listing", unit=" ids", disable=not progress))
    # Duplicates in a listing would put one bin in two splits: keep the first.
    candidates = list(dict.fromkeys(candidate_ids))
    random.Random(seed).shuffle(candidates)
    return candidates


def chunks(order: list[str], n: int) -> list[dict]:
    """``order`` cut into ``n`` contiguous chunks (fewer if there are fewer ids), each with the
    position of its first id: the work of one fetch task each."""
    n = max(1, min(n, len(order)))
    size = -(-len(order) // n) if order else 0
    return [{"index": k, "offset": k * size, "ids": order[k * size:(k + 1) * size]} for k in range(n)]


def fetch_subset(source: Source, *, classes: list[int], per_class: int | None,
                 candidate_ids: list[str] | None = None, seed: int = 0,
                 workers: int = DEFAULT_WORKERS, progress: bool = True, sink=None, ordered: bool = False,
                 offset: int = 0) -> Subset:
    """Choose up to ``per_class`` bins of each class and download them into ``sink``.

    Candidates are ``candidate_ids`` (a file list) or every bin the source
    lists, visited in an order shuffled by ``seed`` (:func:`candidate_order`; with
    ``ordered``, ``candidate_ids`` is that order already); the first usable bins of
    each class in that order are kept, so the choice is deterministic for a
    seed. ``per_class=None`` keeps every usable candidate. Bad bins are reported until
    every class is full. ``sink.add(id, label, bytes)`` stores each kept photo as it is
    chosen, in that order, and returns what the index should record about it; the
    default is a :class:`bincount.data.shards.MemorySink`.

    One chunk of a longer order (``offset``: the position of its first id) can be fetched
    on its own, by one task of many; :func:`merge_parts` then combines the chunks into the
    subset one task would have chosen from the whole order.
    """
    from bincount.data.progress import progress_bar
    from bincount.data.shards import MemorySink

    sink = MemorySink() if sink is None else sink
    if ordered:
        source.check()
        candidates = list(candidate_ids or [])
    else:
        candidates = candidate_order(source, candidate_ids, seed=seed, progress=progress)

    wanted = set(classes)
    need = {c: per_class if per_class is not None else len(candidates) for c in classes}
    subset = Subset()
    bar = progress_bar(total=min(sum(need.values()), len(candidates)), desc="fetching", unit=" img",
                       disable=not progress)
    # A sliding window of per-bin tasks (metadata, then photo) keeps every
    # worker busy; results are taken strictly in candidate order, so which
    # bins are kept never depends on thread timing.
    window = max(4 * workers, 1)
    pending: deque = deque()
    remaining = enumerate(candidates, start=offset)
    pool = ThreadPoolExecutor(max_workers=workers)

    def refill():
        while len(pending) < window and any(n > 0 for n in need.values()):
            position, bin_id = next(remaining, (None, None))
            if bin_id is None:
                return
            pending.append((position, bin_id, pool.submit(_read_bin, source, bin_id, wanted, need)))

    try:
        refill()
        while pending and any(n > 0 for n in need.values()):  # every class full: the rest is not needed
            position, bin_id, future = pending.popleft()
            label, got = future.result()
            refill()
            if isinstance(label, str):
                subset.skipped.append((bin_id, label))
                subset.skipped_at.append((position, None))
            elif label not in wanted:
                subset.skipped.append((bin_id, f"label {label} outside classes {describe_classes(classes)}"))
                subset.skipped_at.append((position, label))
                subset.out_of_class[bin_id] = label
            elif need[label] > 0:
                got = got or _read_image(source, bin_id)  # not prefetched: its class looked full then
                if isinstance(got, str):
                    subset.skipped.append((bin_id, got))
                    subset.skipped_at.append((position, label))
                    continue
                need[label] -= 1
                raw, size = got
                subset.ids.append(bin_id)
                subset.labels.append(label)
                subset.sizes.append(size)
                subset.positions.append(position)
                subset.stored.append(sink.add(bin_id, label, raw))
                bar.update(1)
    finally:
        # Not needed after all, or the source failed as a whole: bins not yet started are not read
        # (each would wait out its own retries against a source known to be down).
        for _, _, future in pending:
            future.cancel()
        pool.shutdown(wait=True, cancel_futures=True)
    bar.close()
    if progress and not ordered:  # a chunk's shortfall is not the subset's: see merge_parts
        report_shortfall(subset, classes=classes, per_class=per_class)
    return subset


def report_shortfall(subset: Subset, *, classes: list[int], per_class: int | None) -> None:
    from collections import Counter

    have = Counter(subset.labels)
    short = {c: per_class - have[c] for c in classes if per_class is not None and have[c] < per_class}
    if short:
        print(f"fetch_subset: the source ran out of usable bins for classes {short} (missing count shown)")


def merge_parts(parts: list[Subset], *, classes: list[int], per_class: int | None) -> Subset:
    """The subset one :func:`fetch_subset` over the whole order would have chosen, from chunks
    of it fetched apart (each with up to ``per_class`` of each class of its own).

    Walks every kept and skipped bin of every part in candidate order with one quota per
    class, exactly as a single fetch does: a kept bin of a class already full is dropped
    (its photo stays in its shard, outside the index), a photo that failed in a class
    already full is not reported (one fetch would not have downloaded it), and the walk
    stops where every class is full. Nothing a chunk left unvisited was needed: the chunk
    stopped only once it held ``per_class`` of every class, and so did the whole order.
    """
    wanted = set(classes)
    need = {c: per_class if per_class is not None else float("inf") for c in classes}
    kept = [(pos, 0, p, k) for p, part in enumerate(parts) for k, pos in enumerate(part.positions)]
    skipped = [(pos, 1, p, k) for p, part in enumerate(parts) for k, (pos, _) in enumerate(part.skipped_at)]
    merged = Subset()
    for _, kind, p, k in sorted(kept + skipped):
        if not any(n > 0 for n in need.values()):
            break
        part = parts[p]
        if kind == 0:
            label = part.labels[k]
            if need[label] <= 0:
                continue
            need[label] -= 1
            merged.ids.append(part.ids[k])
            merged.labels.append(label)
            merged.sizes.append(part.sizes[k])
            merged.stored.append(part.stored[k])
            merged.positions.append(part.positions[k])
            continue
        bin_id, reason = part.skipped[k]
        position, label = part.skipped_at[k]
        if label in wanted and need[label] <= 0:
            continue
        merged.skipped.append((bin_id, reason))
        merged.skipped_at.append((position, label))
        if bin_id in part.out_of_class:
            merged.out_of_class[bin_id] = part.out_of_class[bin_id]
    merged.dropped = len(kept) - len(merged.ids)
    return merged
