"""Where bin images come from.

A *source* is anything laid out like the public bucket ``s3://aft-vbi-pds``::

    <root>/bin-images/<id>.jpg
    <root>/metadata/<id>.json

It can be the public bucket itself (anonymous access), any ``s3://`` URL on an
S3-compatible endpoint (``AWS_ENDPOINT_URL``), a local folder, ``synthetic``
(generated images written to a local folder), or ``capture:PATH``: the photos of
requests an endpoint captured (:class:`CaptureSource`). Everything downstream reads
through :class:`Source`, so real and test data share one code path.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterator

from bincount.aws.clients import MAX_ATTEMPTS, client_config
from bincount.data.captures import (CUSTOM_ATTRIBUTES_HEADER, EXPECTED_QUANTITY, SUFFIX, BadCapture, CapturedEvent,
                                    CaptureProblem, expected_counts, is_capture_file, parse_file, photo_id,
                                    request_photos)
from bincount.data.layout import IMAGE_DIR, METADATA_DIR, PUBLIC_BUCKET, image_key, metadata_key

READ_TIMEOUT_S = 20  # one photo or one listing page; longer is a stalled endpoint
# botocore's standard mode waits rand(0, 1) * min(0.05 s * 2 ** i, 20 s) before retry i of a transient
# error; a body read that failed is retried the same way.
RETRY_BASE_S = 0.05
RETRY_MAX_S = 20
# This many reads in a row from one folder of a source failing (each after its retries) is the source
# failing, not its objects: see S3Source.read.
FAILURE_STREAK = 20


class SourceUnreachable(RuntimeError):
    """The source could not be reached at all (as opposed to one bad object)."""


class MissingObject(KeyError):
    """One object is not in the source."""

    def __str__(self) -> str:  # KeyError quotes its argument; we want plain text
        return str(self.args[0]) if self.args else "missing object"


class UnreadableObject(OSError):
    """One object is there (or may be) but could not be read."""

    def __init__(self, key: str, why: str):
        super().__init__(key, why)
        self.key, self.why = key, why

    def __str__(self) -> str:
        return f"cannot read {self.key}: {self.why}"


def unreachable_message(source: str, error: BaseException) -> str:
    return (
        f"Cannot reach the data source {source!r}: {error}. "
        "Check the network (and AWS_ENDPOINT_URL if you set one), or run offline "
        "with a local mirror in the bucket layout (--source /path/to/mirror) "
        "or with generated data (--source synthetic)."
    )


class Source:
    """Read access to a bucket-layout source. Subclasses implement the I/O."""

    url: str

    def read(self, key: str) -> bytes:
        raise NotImplementedError

    def list_ids(self) -> Iterator[str]:
        """Bin ids that have a metadata file, in the source's listing order."""
        raise NotImplementedError

    def check(self) -> None:
        """Raise :class:`SourceUnreachable` with a clear message if unusable."""
        raise NotImplementedError

    def not_judged_reason(self, bin_id: str) -> str | None:
        """Why a bin has no record to judge it against, where the source knows it has none by design
        (a captured photo whose request gave no expected count); None: a bin whose record is missing
        or broken is a bad object, as usual."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"


@dataclass
class LocalSource(Source):
    root: Path

    @property
    def url(self) -> str:  # type: ignore[override]
        return str(self.root)

    def read(self, key: str) -> bytes:
        parts = PurePosixPath(key).parts
        if not parts or key.startswith("/") or ".." in parts or "\0" in key:
            # keys are built from ids; one that names a place outside the root is not read from anywhere
            raise UnreadableObject(repr(key), "not a key inside the source folder")
        path = self.root / key
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise MissingObject(f"{key} not found in {self.root}") from None
        except IsADirectoryError:
            raise UnreadableObject(key, "a folder, not a file") from None
        except OSError as e:  # a name too long for the file system, a permission, a bad disk: this object only
            raise UnreadableObject(key, e.strerror or str(e)) from None

    def list_ids(self) -> Iterator[str]:
        # A folder named <id>.json is listed like a file: reading it then says "is a folder", by id,
        # rather than the bin vanishing from the listing unreported.
        for path in sorted((self.root / METADATA_DIR).glob("*.json")):
            yield path.stem

    def check(self) -> None:
        if not (self.root / METADATA_DIR).is_dir():
            raise SourceUnreachable(
                f"{self.root} is not a source in the bucket layout: "
                f"it has no {METADATA_DIR}/ folder."
            )


class S3Source(Source):
    """A bucket (and optional prefix) on AWS S3 or an S3-compatible endpoint.

    ``read_timeout_s`` and ``max_attempts`` (retries after the first try, botocore's meaning) bound
    every request and every body read; tests lower them to stay fast.
    """

    def __init__(self, url: str, *, max_pool_connections: int = 32, endpoint_url: str | None = None,
                 read_timeout_s: float = READ_TIMEOUT_S, max_attempts: int = MAX_ATTEMPTS):
        import boto3
        from botocore.config import Config

        self.url = url.rstrip("/")
        bucket_and_prefix = self.url[len("s3://"):]
        self.bucket, _, prefix = bucket_and_prefix.partition("/")
        self.prefix = f"{prefix}/" if prefix else ""
        self.max_attempts = max_attempts
        self._streaks: dict[str, int] = {}  # folder -> reads in a row that failed
        self._lock = threading.Lock()
        session = boto3.Session()
        # The public dataset is read anonymously; a private bucket (or a test
        # server) is read with whatever credentials boto3 finds.
        anonymous = self.url.startswith(PUBLIC_BUCKET) or session.get_credentials() is None
        config = client_config(read_timeout_s=read_timeout_s, max_pool_connections=max_pool_connections,
                               unsigned=anonymous)
        if max_attempts != MAX_ATTEMPTS:
            config = config.merge(Config(retries={"max_attempts": max_attempts, "mode": "standard"}))
        # boto3 itself honours AWS_ENDPOINT_URL; the argument is for callers
        # that point at a server explicitly.
        self.client = session.client("s3", config=config, endpoint_url=endpoint_url,
                                     region_name=session.region_name or "us-east-1")

    def _call(self, fn, *args, **kwargs):
        """A listing call: any failure of it is the source's, not one object's."""
        from botocore.exceptions import ClientError
        from botocore.exceptions import ConnectionError as BotoConnectionError
        from botocore.exceptions import ReadTimeoutError

        try:
            return fn(*args, **kwargs)
        except (BotoConnectionError, ReadTimeoutError, ClientError) as e:
            raise SourceUnreachable(unreachable_message(self.url, e)) from e

    def read(self, key: str) -> bytes:
        """The object's bytes; :class:`MissingObject` if it is not there; :class:`UnreadableObject`
        if this object failed after its retries; :class:`SourceUnreachable` if the source did.

        Where the line falls between one object and the whole source:

        - No connection could be made (refused, connect timeout), after botocore's retries: the
          source is down, whatever the key. Skipping would turn an outage into one skip per bin,
          each costing the whole retry time: fail now, as ``check()`` does.
        - An answer came, but an error (403, a 503 SlowDown still there after botocore's retries,
          a 500), or a body that stalled or was cut, still so after our retries: this object is
          unreadable and the fetch skips it by id. One forbidden or throttled key must not end
          hours of work.
        - Unless reads keep failing: ``FAILURE_STREAK`` reads in a row from one folder
          (``bin-images/`` or ``metadata/``) with no read from it succeeding in between is a source
          that refuses everything there (wrong credentials, a bucket policy, an endpoint that
          stalls every answer), so it too ends the fetch, fast, with the last error.
        """
        from botocore.exceptions import ClientError
        from botocore.exceptions import ConnectionError as BotoConnectionError

        for attempt in range(self.max_attempts + 1):
            try:
                # botocore has retried the request itself: errors from it are final
                body = self.client.get_object(Bucket=self.bucket, Key=self.prefix + key)["Body"]
            except ClientError as e:
                error = e.response.get("Error", {})
                if error.get("Code") in {"NoSuchKey", "404", "NotFound"}:
                    self._succeeded(key)  # the source answered: the object is just not there
                    raise MissingObject(f"{key} not found in {self.url}") from None
                status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
                raise self._failed(key, f"{status} {error.get('Code')}: {error.get('Message')}") from None
            except BotoConnectionError as e:
                raise SourceUnreachable(unreachable_message(self.url, e)) from e
            except Exception as e:  # noqa: BLE001 - a read timeout or a dropped connection, after retries
                raise self._failed(key, describe_error(e)) from None
            try:
                data = self._read_body(body)
            except Exception as e:  # noqa: BLE001 - botocore does not retry body reads: we do
                if attempt == self.max_attempts:
                    raise self._failed(key, f"{describe_error(e)} (after {attempt + 1} tries)") from None
                time.sleep(random.random() * min(RETRY_BASE_S * 2 ** attempt, RETRY_MAX_S))
                continue
            self._succeeded(key)
            return data
        raise AssertionError("unreachable")  # the loop returns or raises

    @staticmethod
    def _read_body(body) -> bytes:
        try:
            return body.read()  # checks the length against Content-Length: a cut body raises
        finally:
            body.close()

    def _succeeded(self, key: str) -> None:
        with self._lock:
            self._streaks[key.split("/", 1)[0]] = 0

    def _failed(self, key: str, why: str) -> Exception:
        """The error to raise for ``key`` failing: the object's, or the source's when failures persist."""
        folder = key.split("/", 1)[0]
        with self._lock:
            self._streaks[folder] = streak = self._streaks.get(folder, 0) + 1
        if streak >= FAILURE_STREAK:
            return SourceUnreachable(
                f"Reading from {self.url} failed for {streak} objects in a row under {folder}/, none read "
                f"in between (the last: {key}: {why}): the source, not one object, is failing. Check "
                "credentials and bucket permissions, the network (and AWS_ENDPOINT_URL if you set one), "
                "or run from a local mirror (--source /path/to/mirror) or generated data (--source synthetic).")
        return UnreadableObject(key, why)

    def list_ids(self) -> Iterator[str]:
        for key in self.list_keys(f"{METADATA_DIR}/"):
            name = key.rsplit("/", 1)[-1]
            if name.endswith(".json"):
                yield name[: -len(".json")]

    def list_keys(self, under: str = "") -> Iterator[str]:
        """Every key below the source's prefix and then ``under``, recursively, relative to the
        prefix (what :meth:`read` takes). A failed listing is the source's failure."""
        paginator = self.client.get_paginator("list_objects_v2")
        iterator = iter(paginator.paginate(Bucket=self.bucket, Prefix=f"{self.prefix}{under}"))
        while (page := self._call(next, iterator, None)) is not None:
            for obj in page.get("Contents", []):
                yield obj["Key"][len(self.prefix):]

    def check(self) -> None:
        self._call(self.client.list_objects_v2, Bucket=self.bucket, Prefix=f"{self.prefix}{METADATA_DIR}/",
                   MaxKeys=1)


# --- captured endpoint traffic ----------------------------------------------------

class CaptureError(ValueError):
    """The capture location as a whole cannot be read (not there, nothing in it)."""


class CaptureFiles:
    """The capture files under a local folder or an S3 prefix, read recursively."""

    url: str

    def names(self) -> list[str]:
        """Every complete capture file, in name order (for a SageMaker layout: by endpoint, then time)."""
        raise NotImplementedError

    def read(self, name: str) -> bytes:
        raise NotImplementedError


class LocalCaptureFiles(CaptureFiles):
    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser()
        self.url = str(self.root)
        if not self.root.is_dir():
            raise CaptureError(f"--capture {self.url!r}: no such folder (give the folder the endpoint captures to, "
                               "as --capture-dir, or an s3:// prefix)")

    def names(self) -> list[str]:
        return sorted(p.relative_to(self.root).as_posix() for p in self.root.rglob(f"*{SUFFIX}")
                      if p.is_file() and is_capture_file(p.name))

    def read(self, name: str) -> bytes:
        return (self.root / name).read_bytes()


class S3CaptureFiles(CaptureFiles):
    """An S3 prefix (SageMaker's DestinationS3Uri, or below it), through :class:`S3Source`:
    bounded timeouts and retries; AWS_ENDPOINT_URL for an S3-compatible server."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self._source = S3Source(self.url)

    def names(self) -> list[str]:
        return sorted(key for key in self._source.list_keys() if is_capture_file(key))

    def read(self, name: str) -> bytes:
        return self._source.read(name)


def open_captures(spec: str) -> CaptureFiles:
    """A ``--capture`` value: ``s3://bucket/prefix`` or a local folder."""
    spec = str(spec)
    return S3CaptureFiles(spec) if spec.startswith("s3://") else LocalCaptureFiles(spec)


def iter_captures(files: CaptureFiles, *, progress: bool = True) -> Iterator[CapturedEvent | CaptureProblem]:
    """Every captured event under ``files``, file by file (one file in memory at a time), and a
    CaptureProblem for each line or file skipped."""
    from bincount.data.progress import progress_bar

    names = files.names()
    for name in progress_bar(names, desc="reading captures", unit=" files", disable=not progress):
        try:
            raw = files.read(name)
        except SourceUnreachable:
            raise
        except Exception as e:  # noqa: BLE001 - one file that cannot be read is that file's problem
            yield CaptureProblem(name, 0, f"cannot read: {describe_error(e)}")
            continue
        yield from parse_file(name, raw)


CAPTURE_PREFIX = "capture:"


class CaptureSource(Source):
    """The photos of the requests an endpoint captured (``capture:PATH``; PATH is the folder the
    local endpoint captures to or an ``s3://`` prefix SageMaker captures to), as a bin source: each
    photo is a bin, named by its request's eventId (``<eventId>:<n>`` for photo n of a request with
    several), whose record is the request's ``expected_quantity`` custom attribute
    (bincount.data.captures.expected_counts).

    A photo whose request gave no expected count has nothing to be judged against: the audit lists
    it as *not judged* with that reason (:meth:`not_judged_reason`), never as bad and never dropped.
    Capture lines or files that cannot be read are printed, by file and line, and kept in ``problems``.

    On first use every capture file is read once, and its photos and records are written into a
    temporary folder in the bucket layout (under the cache folder, removed with this object), which
    is then read like any local mirror: photos are spooled to disk rather than held in memory.
    """

    def __init__(self, spec: str, *, progress: bool = True):
        self.spec = spec
        self.url = f"{CAPTURE_PREFIX}{spec}"
        self.progress = progress
        self.problems: list[CaptureProblem] = []
        self._not_judged: dict[str, str] = {}
        self._ids: list[str] = []
        self._local: LocalSource | None = None
        self._lock = threading.Lock()

    def _spooled(self) -> LocalSource:
        with self._lock:  # fetch_subset reads from many threads
            if self._local is None:
                self._local = self._spool()
            return self._local

    def _spool(self) -> LocalSource:
        try:
            files = open_captures(self.spec)
            if not files.names():
                raise CaptureError(f"no capture files (*.jsonl) under {files.url}")
        except CaptureError as e:
            raise SourceUnreachable(f"{self.url}: {e}") from None
        cache = default_cache_dir()
        cache.mkdir(parents=True, exist_ok=True)
        root = Path(tempfile.mkdtemp(prefix="captured-", dir=cache))
        weakref.finalize(self, shutil.rmtree, str(root), True)
        (root / IMAGE_DIR).mkdir()
        (root / METADATA_DIR).mkdir()
        for item in iter_captures(files, progress=self.progress):
            self._add(root, item)
        return LocalSource(root)

    def _add(self, root: Path, item: CapturedEvent | CaptureProblem) -> None:
        def problem(found) -> None:
            self.problems.append(found)
            print(f"capture: skipped {found}", file=sys.stderr)

        if isinstance(item, CaptureProblem):
            return problem(item)
        if item.request is None:
            return problem(CaptureProblem(item.file, item.line, "the request was not captured (capture mode "
                                                                "output only): no photo"))
        try:
            photos = request_photos(item.request)
        except BadCapture as e:
            return problem(CaptureProblem(item.file, item.line, str(e)))
        expected = expected_counts(item.custom_attributes, len(photos))
        for i, raw in enumerate(photos):
            bin_id = photo_id(item, i, len(photos))
            if (root / metadata_key(bin_id)).exists():
                problem(CaptureProblem(item.file, item.line, f"eventId {item.event_id!r} captured twice: kept the "
                                                             "first"))
                continue
            record = {"capture": {"eventId": item.event_id, "inferenceId": item.inference_id,
                                  "inferenceTime": item.time.isoformat(), "customAttributes": item.custom_attributes,
                                  "file": item.file, "line": item.line}}
            if isinstance(expected, str):
                self._not_judged[bin_id] = expected
            elif expected[i] is None:
                self._not_judged[bin_id] = f"no {EXPECTED_QUANTITY} in the request's {CUSTOM_ATTRIBUTES_HEADER}"
            else:
                record["EXPECTED_QUANTITY"] = expected[i]
            (root / image_key(bin_id)).write_bytes(raw)
            (root / metadata_key(bin_id)).write_text(json.dumps(record))
            self._ids.append(bin_id)

    def read(self, key: str) -> bytes:
        return self._spooled().read(key)

    def list_ids(self) -> Iterator[str]:
        self._spooled()
        yield from list(self._ids)  # in capture order: by file, then line

    def check(self) -> None:
        self._spooled()

    def not_judged_reason(self, bin_id: str) -> str | None:
        return self._not_judged.get(bin_id)


def describe_error(error: BaseException) -> str:
    """One line naming the error's type, for a skip reason: messages alone can be empty or vague."""
    text = " ".join(str(error).split())
    if len(text) > 300:
        text = text[:300] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def default_cache_dir() -> Path:
    return Path(os.environ.get("BINCOUNT_CACHE", Path.home() / ".cache" / "bincount"))


def open_source(spec: str, *, classes: list[int] | None = None, seed: int = 0,
                max_pool_connections: int = 32, synthetic_per_class: int | None = None) -> Source:
    """Turn a ``--source`` value into a :class:`Source`.

    ``synthetic`` generates a labelled set (deterministic for ``seed``) under
    the cache folder, then reads it back like any local mirror. ``capture:PATH``
    reads the photos of captured endpoint requests (:class:`CaptureSource`).
    """
    if spec.startswith(CAPTURE_PREFIX):
        return CaptureSource(spec[len(CAPTURE_PREFIX):])
    if spec == "synthetic":
        from bincount.data.synthetic import DEFAULT_PER_CLASS, write_synthetic_source

        classes = classes or [1, 2, 3, 4, 5]
        per_class = synthetic_per_class or DEFAULT_PER_CLASS
        name = f"seed{seed}-classes{'_'.join(map(str, classes))}-n{per_class}"
        root = write_synthetic_source(default_cache_dir() / "synthetic" / name, classes=classes, seed=seed,
                                      per_class=per_class)
        return LocalSource(root)
    if spec.startswith("s3://"):
        return S3Source(spec, max_pool_connections=max_pool_connections)
    path = Path(spec).expanduser()
    if not path.exists():
        raise SourceUnreachable(
            f"--source {spec!r} is neither an s3:// URL, 'synthetic', 'capture:PATH', nor an existing folder."
        )
    return LocalSource(path.resolve())
