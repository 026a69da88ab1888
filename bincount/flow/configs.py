"""The flow's Configs, checked as Metaflow reads them: ``Config(..., parser=...)``.

A bad grid, compute or deploy config then stops ``run`` before the first task starts,
with one line that names the key, the value and what is allowed (bincount.validation),
rather than a traceback from the start step, or a train step an hour later. Each parser
returns the JSON object it was given, unchanged, so the run's config is what the user wrote.
"""

from __future__ import annotations

from typing import Callable

from metaflow.exception import MetaflowException

from bincount.validation import json_object


def _checked(text: str, what: str, check: Callable[[dict], object]) -> dict:
    try:
        config = json_object(text, what)
        check(config)
    except ValueError as e:  # Metaflow prints its own exception as a message, not a traceback
        raise MetaflowException(str(e)) from None
    return config


def parse_grid(text: str) -> dict:
    from bincount.model.grid import expand_grid

    return _checked(text, "grid", expand_grid)


def parse_compute(text: str) -> dict:
    from bincount.flow.compute import ComputeConfig

    # describe() builds the engine's own settings too (a SageMaker job's role, bucket, instance type)
    return _checked(text, "compute config", lambda config: ComputeConfig.from_dict(config).describe())


def parse_deploy(text: str) -> dict:
    """Empty (the default) unless ``--deploy-target sagemaker``, which the start step requires; what is
    given is checked whatever the target, so a typo never waits for the day it is used."""
    def check(config: dict) -> None:
        if config:
            from bincount.sagemaker.endpoint import SageMakerTarget

            SageMakerTarget.from_config(config)

    return _checked(text, "deploy config", check)
