"""Settings checked on arrival, for type and range, with one-line errors.

The grid, compute and deploy configs are JSON a person wrote. Each is checked by a
pydantic model (strict: ``"false"`` is not a bool, ``1.5`` not an int, NaN not a
number; unknown keys refused) when the flow starts, before any download. pydantic's
own report is several lines per error; :func:`build` turns it into the one line a
command-line user reads: where, the key, the value given and what is allowed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, TypeVar

from pydantic import ConfigDict, ValidationError

# strict: no coercion from strings or floats; forbid: a misspelt key is an error, not a default;
# no inf/nan: a learning rate of NaN trains nothing and says nothing.
STRICT = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)

T = TypeVar("T")


class ConfigError(ValueError):
    """A setting has the wrong type or is out of range; the message names it."""


def describe(error: ValidationError, where: str) -> str:
    """pydantic's errors as one line: ``where: key = value: what is allowed; ...``."""
    parts = []
    for e in error.errors():
        key = ".".join(str(part) for part in e["loc"]) or "(the whole object)"
        if e["type"] in ("unexpected_keyword_argument", "extra_forbidden"):
            parts.append(f"unknown key {key!r}")
        elif e["type"] in ("missing_argument", "missing"):
            parts.append(f"{key} is required")
        elif e["type"] == "value_error":  # raised by the model's own check (__post_init__): its message
            detail = str(e.get("ctx", {}).get("error", e["msg"]))
            parts.append(f"{key}: {detail}" if e["loc"] else detail)
        else:
            message = e["msg"][0].lower() + e["msg"][1:]
            parts.append(f"{key} = {_short(e.get('input'))}: {message}")
    return f"{where}: " + "; ".join(parts)


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def build(cls: type[T], values: Mapping, where: str) -> T:
    """``cls(**values)`` (a pydantic dataclass), its errors raised as one :class:`ConfigError`."""
    try:
        return cls(**values)
    except ValidationError as e:
        raise ConfigError(describe(e, where)) from None


def json_object(text: str, what: str) -> dict:
    """A config file's text as a JSON object, or a ConfigError that says where it broke."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{what}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{what}: expected a JSON object {{...}}, got {type(value).__name__}")
    return value
