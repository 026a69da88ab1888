"""Checks of the settings every SageMaker config has, so a mistake is caught before
anything trains rather than in the SageMaker API after it."""

from __future__ import annotations

import re

# The example configs hold REPLACE-ME values where the user's own must go.
PLACEHOLDER = "REPLACE"
ROLE_ARN_RE = re.compile(r"^arn:aws[a-z-]*:iam::\d{12}:role/.+")


def check_not_placeholder(value, name: str) -> None:
    """``name`` says which setting, as the message's subject (e.g. "bucket in the deploy config")."""
    if isinstance(value, str) and PLACEHOLDER in value:
        raise ValueError(f"{name} is still the example's placeholder: {value!r}")


def check_role_arn(value, key: str) -> None:
    if not ROLE_ARN_RE.match(str(value)):
        raise ValueError(f"{key} {value!r} is not an IAM role ARN "
                         "(arn:aws:iam::<account>:role/<name>, a role SageMaker may assume)")


def check_bucket_name(value, prefix_key: str) -> None:
    """The bucket alone; a path inside it belongs in the setting ``prefix_key``."""
    if str(value).startswith("s3://") or "/" in str(value):
        raise ValueError(f"bucket {value!r}: give the bare bucket name; put any path in {prefix_key!r}")
