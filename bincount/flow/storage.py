"""Where a run keeps its photo shards: in the run's own storage, next to its artifacts.

With ``--datastore s3`` that is under the datastore's S3 root, so a train task on
Batch, Kubernetes or SageMaker reads the shards where they already are; with the
local datastore it is a folder beside ``.metaflow``. Either way the folder is
scoped to the run that fetched the photos, and later steps (and ``resume``, which
clones the fetch step's artifacts) find it through the ``shards`` artifact rather
than by recomputing it, so a resumed run reads the shards of the run it resumes.

The shards sit beside the datastore's own tree rather than inside a run's folder,
because Metaflow reads every folder of a run as a step.
"""

from __future__ import annotations

import os

SHARDS_DIR = "bincount-shards"


def datastore_root(flow) -> tuple[str, str]:
    """The running task's datastore type ("local", "s3", ...) and root.

    Metaflow has no public accessor for these inside a step; ``flow._datastore`` is the
    task's datastore, and its ``TYPE`` and storage root are what ``--datastore`` chose.
    """
    datastore = flow._datastore
    return datastore.TYPE, datastore._storage_impl.datastore_root


def shard_root(flow, flow_name: str, run_id: str) -> str:
    """The folder or ``s3://`` prefix for the shards of run ``run_id``."""
    kind, root = datastore_root(flow)
    if kind == "local":
        return os.path.join(os.path.dirname(os.path.abspath(root)), f".{SHARDS_DIR}", flow_name, run_id)
    return f"{root.rstrip('/')}/{SHARDS_DIR}/{flow_name}/{run_id}"
