"""Where bin images come from.

A *source* is anything laid out like the public bucket ``s3://aft-vbi-pds``::

    <root>/bin-images/<id>.jpg
    <root>/metadata/<id>.json

It can be the public bucket itself (anonymous access), any ``s3://`` URL on an
S3-compatible endpoint (``AWS_ENDPOINT_URL``), a local folder, or ``synthetic``
(generated images written to a local folder). Everything downstream reads
through :class:`Source`, so real and test data share one code path.
"""

from __future__ import annotations

import os
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterator

from bincount.aws.clients import MAX_ATTEMPTS, client_config
from bincount.data.layout import METADATA_DIR, PUBLIC_BUCKET

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
        paginator = self.client.get_paginator("list_objects_v2")
        pages = paginator.paginate(Bucket=self.bucket, Prefix=f"{self.prefix}{METADATA_DIR}/")
        iterator = iter(pages)
        while (page := self._call(next, iterator, None)) is not None:
            for obj in page.get("Contents", []):
                name = obj["Key"].rsplit("/", 1)[-1]
                if name.endswith(".json"):
                    yield name[: -len(".json")]

    def check(self) -> None:
        self._call(self.client.list_objects_v2, Bucket=self.bucket, Prefix=f"{self.prefix}{METADATA_DIR}/",
                   MaxKeys=1)


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
    the cache folder, then reads it back like any local mirror.
    """
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
            f"--source {spec!r} is neither an s3:// URL, 'synthetic', nor an existing folder."
        )
    return LocalSource(path.resolve())
