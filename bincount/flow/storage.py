"""Where a run keeps what is not an artifact: its photo shards and its training checkpoints.

Both live in the run's own storage, next to its artifacts. With ``--datastore s3`` that is
under the datastore's S3 root, so a train task on Batch, Kubernetes or SageMaker reads the
shards where they already are and checkpoints where a retry on another machine finds them;
with the local datastore it is a folder beside ``.metaflow``. Either way the folder is
scoped to the run that wrote it. Later steps (and ``resume``, which clones the fetch step's
artifacts) find the shards through the ``shards`` artifact rather than by recomputing this;
a resumed train step looks for checkpoints in its own run first, then in the run it resumes.

These folders sit beside the datastore's own tree rather than inside a run's folder,
because Metaflow reads every folder of a run as a step.
"""

from __future__ import annotations

import os

from bincount.data.blobs import join

SHARDS_DIR = "bincount-shards"
CHECKPOINTS_DIR = "bincount-checkpoints"
SEARCH_DIR = "bincount-search"  # a search's trial records (bincount.model.trials.TrialStore)


def datastore_root(flow) -> tuple[str, str]:
    """The running task's datastore type ("local", "s3", ...) and root.

    Metaflow has no public accessor for these inside a step; ``flow._datastore`` is the
    task's datastore, and its ``TYPE`` and storage root are what ``--datastore`` chose.
    """
    datastore = flow._datastore
    return datastore.TYPE, datastore._storage_impl.datastore_root


def run_root(flow, what: str, flow_name: str, run_id: str) -> str:
    """The folder or ``s3://`` prefix for ``what`` (SHARDS_DIR, CHECKPOINTS_DIR, SEARCH_DIR) of run ``run_id``."""
    kind, root = datastore_root(flow)
    if kind == "local":
        return os.path.join(os.path.dirname(os.path.abspath(root)), f".{what}", flow_name, run_id)
    return f"{root.rstrip('/')}/{what}/{flow_name}/{run_id}"


def shard_root(flow, flow_name: str, run_id: str) -> str:
    """The folder or ``s3://`` prefix for the shards of run ``run_id``."""
    return run_root(flow, SHARDS_DIR, flow_name, run_id)


def checkpoints_for(flow, current, grid_point: str):
    """Where the grid point ``grid_point`` of the running task checkpoints, and, in a resumed run,
    where the run it resumes left that grid point's last checkpoint."""
    from bincount.model.checkpoint import Checkpoints

    def folder(run_id: str) -> str:
        return join(run_root(flow, CHECKPOINTS_DIR, current.flow_name, run_id), current.step_name, grid_point)

    origin = current.origin_run_id
    return Checkpoints(folder(current.run_id), resume_from=folder(origin) if origin else None)


def discard_checkpoints(flow, current) -> int:
    """Delete the running run's training checkpoints; the number of files removed.

    A checkpoint only lets a failed or killed train task go on where it stopped. Once the join
    has gathered every grid point, each train task has ended and its best weights are an
    artifact, and a ``resume`` clones those tasks rather than training them again: the
    checkpoints are dead weight (with Adam's moments, about four times the model, per point).
    The checkpoints of the run this one resumed are that run's, and stay."""
    from bincount.data.blobs import remove_tree

    return remove_tree(run_root(flow, CHECKPOINTS_DIR, current.flow_name, current.run_id))


def trials_for(flow, current, warm: list[dict] = ()):
    """The trial records of the running task's search: this run's, the resumed run's (a resume clones
    finished trials without rerunning them), and ``warm``, records from a --warm-start run."""
    from bincount.model.search import TrialRecord
    from bincount.model.trials import TrialStore

    def folder(run_id: str) -> str:
        return join(run_root(flow, SEARCH_DIR, current.flow_name, run_id), current.step_name)

    origin = current.origin_run_id
    return TrialStore(folder(current.run_id), resume_from=folder(origin) if origin else None,
                      warm=tuple(TrialRecord.from_dict(r) for r in warm))
