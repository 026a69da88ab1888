"""boto3 clients that fail fast.

An endpoint that does not answer must surface within a minute, not after botocore's
default of many long retries. Standard retry mode backs off exponentially with jitter;
5 s connects retried MAX_ATTEMPTS times (botocore counts retries after the first try)
stay under 60 s. Each caller picks its read timeout: how long one answer may take
depends on what it asks for.

boto3 itself honours AWS_ENDPOINT_URL (a local S3 or moto server), so nothing here
sets an endpoint.
"""

from __future__ import annotations

import os

CONNECT_TIMEOUT_S = 5
MAX_ATTEMPTS = 4


def default_region() -> str:
    return os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1"


def client_config(*, read_timeout_s: float, max_pool_connections: int | None = None, unsigned: bool = False):
    """A botocore Config with bounded timeouts and retries; ``unsigned`` for anonymous reads."""
    from botocore import UNSIGNED
    from botocore.config import Config

    # Only what is set: Config takes an option passed as None as a choice, not as its default.
    options = {"max_pool_connections": max_pool_connections} if max_pool_connections is not None else {}
    if unsigned:
        options["signature_version"] = UNSIGNED
    return Config(connect_timeout=CONNECT_TIMEOUT_S, read_timeout=read_timeout_s,
                  retries={"max_attempts": MAX_ATTEMPTS, "mode": "standard"}, **options)


def session(region: str | None, *, read_timeout_s: float, max_pool_connections: int | None = None):
    """A boto3 session whose every client has :func:`client_config`.

    Set as the botocore session's default client config rather than passed per client,
    so clients made by others from this session (the SageMaker SDK's) get it too;
    a client that passes its own Config merges it over this one.
    """
    import boto3
    import botocore.session

    core = botocore.session.get_session()
    core.set_default_client_config(client_config(read_timeout_s=read_timeout_s,
                                                 max_pool_connections=max_pool_connections))
    return boto3.Session(botocore_session=core, region_name=region)
