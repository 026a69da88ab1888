"""Grid points that still failed after their retries: kept, reported, and left out of the join.

A train step that fails is retried (``@retry``, from the compute config), and each retry goes on
from the point's last checkpoint. Once the retries are spent, :func:`kept_after_retries` keeps the
failure in an artifact (``FAILURE_VAR``) and lets the step end, like Metaflow's ``@catch``, so one
bad point (an out-of-memory setting, a spot machine lost once too often) does not sink the grid.
The join keeps the points that trained, names the failed ones with their errors (an artifact, the
log and the cards), and fails only when no point trained.

With ``--require-all-points`` nothing is kept: the failure fails the step and the run, and a plain
``resume`` trains that point again from its last checkpoint. That choice is made per run, which is
why this is not ``@catch`` itself: a decorator is fixed when the flow is read, a run's parameters
are not known then.
"""

from __future__ import annotations

import traceback
from contextlib import contextmanager
from dataclasses import asdict, dataclass

FAILURE_VAR = "train_failure"  # the train step's artifact: None where the point trained


class GridFailed(RuntimeError):
    """No grid point trained, or one failed where every point was required."""


@dataclass(frozen=True)
class FailedPoint:
    name: str
    error: str  # the exception's type and message
    config: dict

    def to_dict(self) -> dict:
        return asdict(self)


@contextmanager
def kept_after_retries(flow, *, attempt: int, retries: int, require_all: bool):
    """Run the body; if it raises on the last attempt (``attempt``, counted from 0, equal to
    ``retries``), keep the error in ``flow.<FAILURE_VAR>`` and return normally, unless
    ``require_all``. On earlier attempts the error propagates, for ``@retry`` to try again."""
    setattr(flow, FAILURE_VAR, None)
    try:
        yield
    except Exception as e:  # noqa: BLE001 - whatever failed this point, the others may still be fine
        if require_all or attempt < retries:
            raise
        trace = traceback.format_exc()
        print(trace, flush=True)
        print(f"this grid point failed on its last attempt ({attempt + 1} of {retries + 1}); the run goes on "
              "without it (--require-all-points makes such a failure fail the run)", flush=True)
        setattr(flow, FAILURE_VAR, {"error": f"{type(e).__name__}: {' '.join(str(e).split())}", "traceback": trace})


def sort_outcomes(inputs) -> tuple[list, list[FailedPoint]]:
    """The join's inputs as (TrainResults of the points that trained, the points that failed)."""
    from bincount.model.train import TrainResult

    trained, failed = [], []
    for branch in inputs:
        failure = getattr(branch, FAILURE_VAR, None)
        if failure is None:
            trained.append(TrainResult.from_artifacts(branch))
        else:
            # an adaptive trial that failed before drawing its values has no config yet
            failed.append(FailedPoint(name=branch.input["name"], error=failure["error"],
                                      config=dict(branch.input["config"] or {})))
    return trained, failed


def check_outcomes(trained: list, failed: list[FailedPoint], *, require_all: bool) -> None:
    """Raise GridFailed when the run cannot go on, naming every failed point and its error."""
    listed = "; ".join(f"{f.name}: {f.error}" for f in failed)
    if not trained:
        raise GridFailed(f"no grid point trained: {listed}")
    if failed and require_all:  # kept_after_retries raises instead; this guards runs that bypass it
        raise GridFailed(f"{len(failed)} grid point(s) failed and --require-all-points is set: {listed}")
