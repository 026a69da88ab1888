"""Reading runs back through the Metaflow Client, and choosing which run a command uses.

Metaflow's namespace is process-wide state: ``metaflow.namespace(None)`` in a library call
would change what a notebook that called it sees from then on. Every lookup here sets the
namespace it needs with :func:`metaflow_namespace`, which puts the caller's back. A Client
object keeps the namespace it was found in, so runs returned from inside the block stay
readable after it.

Which runs a lookup sees (the README's "Reading runs"):

- ``--run ID``: that run, whoever made it (an id names one run on purpose).
- ``--champion TARGET``: the run tagged ``champion:TARGET`` on one project branch
  (:class:`ProjectBranch`): by default the user's own branch (``user.<name>``, what a plain
  ``python flows/bin_flow.py run`` makes), with ``--production`` the production branch and
  with ``--branch NAME`` a test branch, named as Metaflow names them.
- neither: the latest successful run of the user's own namespace (``user:<name>``), or, with
  ``--branch``/``--production``, of that branch.

Runs made before the flows had ``@project`` carry no project tags; they count as runs of the
production branch ``prod`` (their champion tag was global, so it marked what was deployed).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

from bincount import FLOW_NAME
from bincount.model.metadata import ModelMeta

PROJECT = "bincount"  # the flows' @project(name=...)
PRODUCTION = "prod"  # Metaflow's branch name for --production without --branch
LEGACY_BRANCH = PRODUCTION  # the branch whose runs include those made before @project


class RunNotFound(LookupError):
    pass


@contextmanager
def metaflow_namespace(ns: str | None) -> Iterator[None]:
    """Use Metaflow namespace ``ns`` (None: every namespace) in the block, then restore the caller's."""
    import metaflow
    from metaflow.client import core
    from metaflow.exception import MetaflowUnknownUser

    try:
        saved = metaflow.get_namespace()
    except MetaflowUnknownUser:
        # No user name, so Metaflow has no default namespace yet: restore "not resolved" (its
        # sentinel False) rather than inventing one; an explicit namespace never needs a user.
        saved = False
    metaflow.namespace(ns)
    try:
        yield
    finally:
        if saved is False:
            core.current_namespace = False
        else:
            metaflow.namespace(saved)


def own_namespace() -> str:
    """The caller's own Metaflow namespace (``user:<name>``), the default scope of a command."""
    from metaflow.exception import MetaflowUnknownUser
    from metaflow.util import resolve_identity

    try:
        return resolve_identity()
    except MetaflowUnknownUser:
        raise RunNotFound("Metaflow does not know your user name, so there is no namespace of your own to read: "
                          "set METAFLOW_USER, or give --run ID") from None


@dataclass(frozen=True)
class ProjectBranch:
    """One branch of a Metaflow ``@project``: the runs that carry the system tags
    ``project:<project>`` and ``project_branch:<name>`` (Metaflow 2.19's project decorator
    adds both to every run). ``name`` is Metaflow's: ``prod`` or ``prod.<b>`` for
    ``--production [--branch b]``, ``test.<b>`` for ``--branch b``, ``user.<name>`` otherwise.
    Runs without any ``project:`` tag (made before ``@project``) belong to ``prod``."""

    name: str
    project: str = PROJECT

    @classmethod
    def from_options(cls, *, production: bool = False, branch: str | None = None,
                     project: str = PROJECT) -> ProjectBranch:
        """The branch a flow run with these top-level options (``--production``, ``--branch``)
        is on, named by Metaflow's own rule, so the names cannot drift apart."""
        from metaflow.exception import MetaflowException
        from metaflow.plugins.project_decorator import format_name
        from metaflow.util import get_username

        user = get_username()
        if not (production or branch or user or os.environ.get("METAFLOW_OWNER")):
            raise RunNotFound("Metaflow does not know your user name, so you have no project branch of your own: "
                              "set METAFLOW_USER, or give --production or --branch NAME")
        try:
            _, name = format_name(FLOW_NAME, project, production, branch, user)
        except MetaflowException as e:
            raise ValueError(f"--branch {branch!r}: {e.message}") from None
        return cls(name, project)

    @classmethod
    def of_run(cls, run) -> ProjectBranch:
        """The branch ``run`` (a Client Run) was made on; ``prod`` for a run made before @project."""
        tags = run.system_tags
        project = next((t.split(":", 1)[1] for t in tags if t.startswith("project:")), None)
        name = next((t.split(":", 1)[1] for t in tags if t.startswith("project_branch:")), None)
        if project is None or name is None:
            return cls(LEGACY_BRANCH)
        return cls(name, project)

    @property
    def is_production(self) -> bool:
        return self.name == PRODUCTION or self.name.startswith(PRODUCTION + ".")

    def holds(self, run) -> bool:
        """Whether ``run`` is one of this branch's runs."""
        tags = run.system_tags
        if any(t.startswith("project:") for t in tags):
            return f"project:{self.project}" in tags and f"project_branch:{self.name}" in tags
        return self.name == LEGACY_BRANCH and self.project == PROJECT  # made before @project

    def __str__(self) -> str:
        return f"{self.project}/{self.name}"


def newest_first(runs) -> list:
    """``runs`` (Client Runs), the most recently started first.

    Not by ``created_at`` alone: Metaflow's local metadata (2.19) rewrites a run's record, its
    timestamp included, whenever a tag is added or removed, so a champion just untagged would look
    like the newest run. Local run ids are the start time in microseconds and the metadata service
    numbers runs in order, so numeric ids sort by age; other ids (Step Functions, Argo) fall back
    to ``created_at``, which the service does not rewrite."""
    runs = list(runs)
    if all(run.id.isdigit() for run in runs):
        return sorted(runs, key=lambda run: int(run.id), reverse=True)
    return sorted(runs, key=lambda run: run.created_at, reverse=True)


def runs_of(branch: ProjectBranch, flow: str = FLOW_NAME, *tags: str) -> Iterator:
    """``flow``'s runs on ``branch`` that carry every tag in ``tags``, newest first, whoever made them."""
    from metaflow import Flow
    from metaflow.exception import MetaflowNotFound

    with metaflow_namespace(None):
        try:
            runs = list(Flow(flow).runs(*tags))
        except MetaflowNotFound:
            return iter(())
    return (run for run in newest_first(runs) if branch.holds(run))


def get_run(run_id: str | None = None, flow: str = FLOW_NAME):
    """A run by id (whoever made it), or the latest successful run of the caller's own namespace."""
    from metaflow import Flow, Run
    from metaflow.exception import MetaflowNamespaceMismatch, MetaflowNotFound

    if run_id and "/" in run_id:
        raise RunNotFound(f"{run_id!r} is not a run id: give the id alone (the number after {flow}/)")
    if run_id:
        with metaflow_namespace(None):  # an id names one run on purpose, a teammate's too
            try:
                return Run(f"{flow}/{run_id}")
            except MetaflowNotFound as e:
                raise RunNotFound(f"no {flow} run {run_id} in this datastore: {e}") from None
    ns = own_namespace()
    with metaflow_namespace(ns):
        try:
            runs = list(Flow(flow))
        except (MetaflowNotFound, MetaflowNamespaceMismatch):
            runs = []
    run = next((r for r in newest_first(runs) if r.successful), None)
    if run is None:
        raise RunNotFound(f"no successful {flow} run in your namespace {ns}: run `python flows/bin_flow.py run` "
                          "first, or give --run ID, --champion TARGET or --branch/--production")
    return run


def latest_run_of(branch: ProjectBranch, flow: str = FLOW_NAME):
    """The latest successful run on ``branch``, whoever made it."""
    run = next((r for r in runs_of(branch, flow) if r.successful), None)
    if run is None:
        raise RunNotFound(f"no successful {flow} run on project branch {branch}")
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
