"""Reading runs back through the Metaflow Client."""

from __future__ import annotations

from collections.abc import Mapping

from bincount import FLOW_NAME
from bincount.model.metadata import ModelMeta


class RunNotFound(LookupError):
    pass


def get_run(run_id: str | None = None, flow: str = FLOW_NAME):
    """A run by id, or the latest successful one (any user's)."""
    from metaflow import Flow, Run, namespace
    from metaflow.exception import MetaflowNotFound

    namespace(None)
    if run_id and "/" in run_id:
        raise RunNotFound(f"{run_id!r} is not a run id: give the id alone (the number after {flow}/)")
    try:
        if run_id:
            return Run(f"{flow}/{run_id}")
        run = Flow(flow).latest_successful_run
    except MetaflowNotFound as e:
        raise RunNotFound(f"no {flow} run {run_id or '(any successful)'} in this datastore: {e}") from None
    if run is None:
        raise RunNotFound(f"no successful {flow} run yet: run `python flows/bin_flow.py run` first")
    return run


def model_of(run) -> tuple[bytes, ModelMeta]:
    """The chosen model's weights (state_dict bytes) and metadata."""
    data = run.data
    if "model_state" not in data:
        raise RunNotFound(f"run {run.pathspec} has no chosen model (did it get past join?)")
    return data.model_state, ModelMeta.from_dict(data.model_meta, where=f"{run.pathspec} model_meta")


def photos_in(artifacts) -> Mapping[str, bytes]:
    """The photos by id of anything with a run's artifacts as attributes (a step's ``self``, a
    Client run's ``data``), read from its shards (``bincount.data.shards.Photos``); runs made
    before shards kept them in an ``images`` artifact, which is returned as it is."""
    from bincount.data.shards import Photos

    if hasattr(artifacts, "shards"):
        return Photos(artifacts.shards, artifacts.subset)
    return artifacts.images


def photos_of(run) -> Mapping[str, bytes]:
    """A Client run's photos by id: :func:`photos_in` its data."""
    return photos_in(run.data)


def split_rows(run, split: str) -> tuple[list[str], list[int]]:
    """The ids and counts of one split (train, val or test) of a run, in split-table order."""
    table = run.data.split_table
    rows = table[table["split"] == split]
    return list(rows["id"]), [int(x) for x in rows["label"]]


def predictor_of(run):
    from bincount.model.predictor import load_predictor

    state, meta = model_of(run)
    return load_predictor(state, meta)
