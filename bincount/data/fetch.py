"""Choosing and downloading a class-balanced subset of bins.

Each candidate bin's metadata is read for its label, then its photo is
downloaded and decoded once to prove it is an image. Anything unusable (a
missing or malformed metadata file, a label outside the classes, a missing,
truncated or non-image photo) is skipped and recorded by id with the reason.
Downloads run in a thread pool: each is a network round trip, so threads
overlap the latency that a sequential loop would pay once per object.
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
from bincount.data.sources import MissingObject, Source

DEFAULT_WORKERS = 32


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
    # Ids are strings: '00526' and '526' are different bins, so never int() them.
    return [PurePosixPath(key).stem for keys in listing.values() for key in keys]


def parse_label(raw: bytes) -> int:
    try:
        meta = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadInput(f"malformed metadata: {e}") from None
    quantity = meta.get("EXPECTED_QUANTITY") if isinstance(meta, dict) else None
    if isinstance(quantity, bool) or not isinstance(quantity, int):
        raise BadInput(f"metadata has no integer EXPECTED_QUANTITY (got {quantity!r})")
    return quantity


def check_image(raw: bytes) -> tuple[int, int]:
    """Decode the whole image once; return (width, height) or raise BadInput."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(raw)) as image:
            image.load()  # a full decode: a truncated JPEG fails here, not in training
            return image.size
    except UnidentifiedImageError:
        raise BadInput("not an image") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise BadInput(f"unreadable image: {e}") from None


@dataclass
class Subset:
    """What fetch_subset chose: labels, photo bytes, and what it skipped."""

    ids: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    sizes: list[tuple[int, int]] = field(default_factory=list)
    images: dict[str, bytes] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (id, reason)
    out_of_class: dict[str, int] = field(default_factory=dict)  # skipped for their count: id -> count

    def table(self):
        import pandas as pd

        return pd.DataFrame({"id": self.ids, "label": self.labels,
                             "width": [w for w, _ in self.sizes], "height": [h for _, h in self.sizes]})

    def skipped_table(self):
        import pandas as pd

        return pd.DataFrame(self.skipped, columns=["id", "reason"])

    def class_counts(self) -> dict[int, int]:
        from collections import Counter

        return dict(sorted(Counter(self.labels).items()))


def _read_label(source: Source, bin_id: str) -> int | str:
    try:
        return parse_label(source.read(metadata_key(bin_id)))
    except MissingObject:
        return "metadata missing"
    except BadInput as e:
        return str(e)


def _read_image(source: Source, bin_id: str) -> tuple[bytes, tuple[int, int]] | str:
    try:
        raw = source.read(image_key(bin_id))
        return raw, check_image(raw)
    except MissingObject:
        return "image missing"
    except BadInput as e:
        return str(e)


def _read_bin(source: Source, bin_id: str, wanted: set[int], need: dict[int, int]):
    """(label or reason, (bytes, size) or reason, or None when not downloaded)."""
    label = _read_label(source, bin_id)
    # ``need`` is read while the caller updates it: a stale value costs at most
    # a wasted download, never a wrong choice (the caller decides, in order).
    if isinstance(label, str) or label not in wanted or need[label] <= 0:
        return label, None
    return label, _read_image(source, bin_id)


def fetch_subset(source: Source, *, classes: list[int], per_class: int | None,
                 candidate_ids: list[str] | None = None, seed: int = 0,
                 workers: int = DEFAULT_WORKERS, progress: bool = True) -> Subset:
    """Choose up to ``per_class`` bins of each class and download them.

    Candidates are ``candidate_ids`` (a file list) or every bin the source
    lists, visited in an order shuffled by ``seed``; the first usable bins of
    each class in that order are kept, so the choice is deterministic for a
    seed. ``per_class=None`` keeps every usable candidate.
    """
    from bincount.data.progress import progress_bar

    source.check()
    if candidate_ids is None:
        candidate_ids = list(progress_bar(source.list_ids(), desc="listing", unit=" ids", disable=not progress))
    # Duplicates in a listing would put one bin in two splits: keep the first.
    candidates = list(dict.fromkeys(candidate_ids))
    random.Random(seed).shuffle(candidates)

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
    remaining = iter(candidates)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        def refill():
            while len(pending) < window and any(n > 0 for n in need.values()):
                bin_id = next(remaining, None)
                if bin_id is None:
                    return
                pending.append((bin_id, pool.submit(_read_bin, source, bin_id, wanted, need)))

        refill()
        while pending:
            bin_id, future = pending.popleft()
            label, got = future.result()
            refill()
            if isinstance(label, str):
                subset.skipped.append((bin_id, label))
            elif label not in wanted:
                subset.skipped.append((bin_id, f"label {label} outside classes {describe_classes(classes)}"))
                subset.out_of_class[bin_id] = label
            elif need[label] > 0:
                got = got or _read_image(source, bin_id)  # not prefetched: its class looked full then
                if isinstance(got, str):
                    subset.skipped.append((bin_id, got))
                    continue
                need[label] -= 1
                raw, size = got
                subset.ids.append(bin_id)
                subset.labels.append(label)
                subset.sizes.append(size)
                subset.images[bin_id] = raw
                bar.update(1)
    bar.close()
    short = {c: n for c, n in need.items() if per_class is not None and n > 0}
    if short and progress:
        print(f"fetch_subset: the source ran out of usable bins for classes {short} (missing count shown)")
    return subset
