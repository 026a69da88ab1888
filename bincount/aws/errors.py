"""One clear message for a failed AWS call: what was being done, and what to check."""

from __future__ import annotations

import os
from typing import Callable


class AwsError(RuntimeError):
    """An AWS call failed: no credentials, an API error, or AWS could not be reached."""


def aws_error(what: str, exc: Exception, error_type: type[Exception] = AwsError) -> Exception:
    """The ``error_type`` to raise for botocore's ``exc`` (raise it ``from exc``)."""
    from botocore.exceptions import ClientError, NoCredentialsError

    if isinstance(exc, NoCredentialsError):
        return error_type(f"{what}: no AWS credentials found ({exc}). Configure them (aws configure, "
                          "AWS_PROFILE or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY).")
    if isinstance(exc, ClientError):
        details = exc.response.get("Error", {})
        message = str(details.get("Message") or exc)[:500]  # a proxy's HTML error page can be long
        return error_type(f"{what} failed: {details.get('Code')}: {message}")
    endpoint = os.environ.get("AWS_ENDPOINT_URL")  # connection refused, timeouts, DNS
    return error_type(f"{what}: cannot reach AWS ({exc})"
                      + (f"; AWS_ENDPOINT_URL is {endpoint}" if endpoint else "")
                      + ". Check the network and region.")


def aws_call(what: str, fn: Callable, *, error_type: type[Exception] = AwsError, **kwargs):
    """``fn(**kwargs)``, with botocore's errors raised as :func:`aws_error` (cause kept)."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        return fn(**kwargs)
    except (BotoCoreError, ClientError) as e:
        raise aws_error(what, e, error_type) from e
