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
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from bincount.aws.clients import client_config
from bincount.data.layout import METADATA_DIR, PUBLIC_BUCKET

READ_TIMEOUT_S = 20  # one photo or one listing page; longer is a stalled endpoint


class SourceUnreachable(RuntimeError):
    """The source could not be reached at all (as opposed to one bad object)."""


class MissingObject(KeyError):
    """One object is not in the source."""

    def __str__(self) -> str:  # KeyError quotes its argument; we want plain text
        return str(self.args[0]) if self.args else "missing object"


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
        try:
            return (self.root / key).read_bytes()
        except FileNotFoundError:
            raise MissingObject(f"{key} not found in {self.root}") from None

    def list_ids(self) -> Iterator[str]:
        for path in sorted((self.root / METADATA_DIR).glob("*.json")):
            yield path.stem

    def check(self) -> None:
        if not (self.root / METADATA_DIR).is_dir():
            raise SourceUnreachable(
                f"{self.root} is not a source in the bucket layout: "
                f"it has no {METADATA_DIR}/ folder."
            )


class S3Source(Source):
    """A bucket (and optional prefix) on AWS S3 or an S3-compatible endpoint."""

    def __init__(self, url: str, *, max_pool_connections: int = 32, endpoint_url: str | None = None):
        import boto3

        self.url = url.rstrip("/")
        bucket_and_prefix = self.url[len("s3://"):]
        self.bucket, _, prefix = bucket_and_prefix.partition("/")
        self.prefix = f"{prefix}/" if prefix else ""
        session = boto3.Session()
        # The public dataset is read anonymously; a private bucket (or a test
        # server) is read with whatever credentials boto3 finds.
        anonymous = self.url.startswith(PUBLIC_BUCKET) or session.get_credentials() is None
        config = client_config(read_timeout_s=READ_TIMEOUT_S, max_pool_connections=max_pool_connections,
                               unsigned=anonymous)
        # boto3 itself honours AWS_ENDPOINT_URL; the argument is for callers
        # that point at a server explicitly.
        self.client = session.client("s3", config=config, endpoint_url=endpoint_url,
                                     region_name=session.region_name or "us-east-1")

    def _call(self, fn, *args, **kwargs):
        from botocore.exceptions import ConnectionError as BotoConnectionError
        from botocore.exceptions import ReadTimeoutError

        try:
            return fn(*args, **kwargs)
        except (BotoConnectionError, ReadTimeoutError) as e:
            raise SourceUnreachable(unreachable_message(self.url, e)) from e

    def read(self, key: str) -> bytes:
        from botocore.exceptions import ClientError

        def get() -> bytes:  # the body is streamed: its read can time out too
            return self.client.get_object(Bucket=self.bucket, Key=self.prefix + key)["Body"].read()

        try:
            return self._call(get)
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in {"NoSuchKey", "404", "NotFound"}:
                raise MissingObject(f"{key} not found in {self.url}") from None
            raise

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
        from botocore.exceptions import ClientError

        try:
            self._call(self.client.list_objects_v2, Bucket=self.bucket,
                       Prefix=f"{self.prefix}{METADATA_DIR}/", MaxKeys=1)
        except ClientError as e:
            raise SourceUnreachable(unreachable_message(self.url, e)) from e


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
