"""Whole objects at a URL: a local path or ``s3://bucket/key``, written so that a reader
never sees half of one.

A run keeps what it writes outside Metaflow's artifacts (photo shards, training
checkpoints) in its own storage, which is a folder beside the local datastore or a
prefix under the S3 datastore's root (bincount.flow.storage). This module is the one
place that reads and writes there: locally through a temporary file renamed into
place, on S3 with one PUT (S3 makes an object visible only once it is whole).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

READ_TIMEOUT_S = 120  # one GET of a whole shard or checkpoint


def is_s3(url: str) -> bool:
    return str(url).startswith("s3://")


def split_s3(url: str) -> tuple[str, str]:
    """``s3://bucket/some/key`` -> ("bucket", "some/key")."""
    bucket, _, key = str(url).removeprefix("s3://").partition("/")
    return bucket, key.strip("/")


def join(root: str, *parts: str) -> str:
    """``root``/``parts``, for a folder or an s3:// prefix alike."""
    return "/".join([str(root).rstrip("/"), *parts]) if is_s3(root) else os.path.join(root, *parts)


def s3_client():
    import boto3

    from bincount.aws.clients import client_config

    # boto3 honours AWS_ENDPOINT_URL (an S3-compatible server); a run's storage sits beside its
    # Metaflow datastore, so where only Metaflow was pointed at such a server, follow it.
    endpoint = None
    if not (os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")):
        endpoint = os.environ.get("METAFLOW_S3_ENDPOINT_URL") or None
    return boto3.client("s3", endpoint_url=endpoint, config=client_config(read_timeout_s=READ_TIMEOUT_S))


def read_blob(url: str) -> bytes | None:
    """The object at ``url``, or None where there is none."""
    if not is_s3(url):
        try:
            return Path(url).read_bytes()
        except FileNotFoundError:
            return None
    from botocore.exceptions import ClientError

    bucket, key = split_s3(url)
    try:
        return s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()
    except ClientError as e:
        if e.response.get("Error", {}).get("Code") in {"NoSuchKey", "404", "NotFound"}:
            return None
        raise


def write_blob(url: str, data: bytes) -> None:
    """Put ``data`` at ``url``, replacing what was there only once all of it is written."""
    if is_s3(url):
        bucket, key = split_s3(url)
        s3_client().put_object(Bucket=bucket, Key=key, Body=data)
        return
    path = Path(url)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)  # a reader sees the old object or the new one, never a part
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def list_blobs(folder: str) -> list[str]:
    """The URLs of the objects directly in ``folder`` (a folder or an ``s3://`` prefix), sorted;
    none where it does not exist."""
    if not is_s3(folder):
        try:
            names = sorted(n for n in os.listdir(folder) if not n.startswith("."))  # not a write's temporary
        except FileNotFoundError:
            return []
        return [os.path.join(folder, n) for n in names if os.path.isfile(os.path.join(folder, n))]
    bucket, prefix = split_s3(folder)
    pages = s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/", Delimiter="/")
    return sorted(f"s3://{bucket}/{o['Key']}" for page in pages for o in page.get("Contents", []))


def remove_tree(folder: str) -> int:
    """Delete ``folder`` (a folder or an ``s3://`` prefix) and everything under it; the number of
    objects it held (0 where it does not exist)."""
    if not is_s3(folder):
        import shutil

        count = sum(len(files) for _, _, files in os.walk(folder))
        if os.path.isdir(folder):
            shutil.rmtree(folder)
        return count
    bucket, prefix = split_s3(folder)
    client = s3_client()
    count = 0
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/"):
        keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]  # at most 1,000: one DeleteObjects
        if keys:
            answer = client.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})
            if answer.get("Errors"):
                first = answer["Errors"][0]
                raise OSError(f"s3://{bucket}/{first['Key']}: could not delete ({first.get('Message')})")
            count += len(keys)
    return count
