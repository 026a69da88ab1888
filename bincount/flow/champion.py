"""The champion gate: deploy a new model only if it is at least as good.

The model currently deployed to a target is the one whose run carries the tag
``champion:<target>`` (Metaflow run tags, so the Client and the UI show it).
A new run's model is compared with it on the new run's own test split, which
the champion never trained on, and deploys only when its accuracy is at least
the champion's, unless forced. The decision, with both scores, is returned for
the flow to keep as an artifact.

Champions are per project branch (``@project(name="bincount")`` on the flows):
a run on branch B is compared with, and replaces, only the champion among B's
runs (:class:`bincount.flow.runs.ProjectBranch`), so a test branch
(``--branch``) or a user's own branch never takes the production champion's
tag, and only ``--production`` runs replace the production champion. Runs made
before ``@project`` count as production runs: the first production run is
gated against the old global champion and takes its tag.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass

from bincount import FLOW_NAME
from bincount.flow.runs import ProjectBranch, metaflow_namespace, runs_of


@dataclass(frozen=True)
class ChampionDecision:
    deploy: bool
    reason: str
    forced: bool
    target: str
    new_accuracy: float
    champion_run: str | None = None  # the champion's pathspec, if the target has one
    champion_accuracy: float | None = None  # on the new run's test split; None if not comparable
    branch: str | None = None  # the project branch (project/branch) whose champion the run was gated against

    def to_dict(self) -> dict:
        """The flow's ``champion_decision`` artifact."""
        return asdict(self)


def champion_tag(target: str) -> str:
    return f"champion:{target}"


def current_champion(target: str, branch: ProjectBranch, *, flow: str = FLOW_NAME,
                     exclude_run_id: str | None = None):
    """The newest run on ``branch`` tagged champion for ``target`` (whoever made it), or None."""
    return next((run for run in runs_of(branch, flow, champion_tag(target)) if run.id != exclude_run_id), None)


def branch_of(run_id: str, *, flow: str = FLOW_NAME) -> ProjectBranch:
    """The project branch of run ``run_id``: from ``metaflow.current`` inside that run's own
    tasks (what ``@project`` set from ``--branch``/``--production``), else from the run's tags."""
    from metaflow import Run, current

    if current.is_running_flow and current.run_id == run_id and getattr(current, "project_name", None):
        return ProjectBranch(current.branch_name, current.project_name)
    with metaflow_namespace(None):
        return ProjectBranch.of_run(Run(f"{flow}/{run_id}"))


def decide(new_accuracy: float, champion_accuracy: float | None, *, force: bool) -> tuple[bool, str]:
    if force:
        return True, "forced"
    if champion_accuracy is None:
        return True, "no champion yet"
    if new_accuracy >= champion_accuracy:
        return True, "at least as accurate as the champion"
    return False, "less accurate than the champion"


def gate(target: str, *, run_id: str, classes: list[int], new_accuracy: float,
         photos: Mapping[str, bytes], test_ids: list[str], test_labels: list[int],
         force: bool = False, branch: ProjectBranch | None = None) -> ChampionDecision:
    """Score the current champion of ``branch`` (default: run ``run_id``'s own) on this run's test
    split (``test_ids``, their photos streamed from ``photos``) and decide."""
    from bincount.flow.runs import model_of, predictor_of
    from bincount.model.metrics import count_metrics

    branch = branch or branch_of(run_id)
    champion = current_champion(target, branch, exclude_run_id=run_id)
    champion_accuracy, note = None, ""
    if champion is not None:
        _, champion_meta = model_of(champion)
        if champion_meta.classes != classes:
            note = f"; the champion counts {champion_meta.classes}, this run {classes}: not comparable"
            if not force:
                return ChampionDecision(deploy=False, reason="champion not comparable" + note, forced=False,
                                        target=target, new_accuracy=new_accuracy, champion_run=champion.pathspec,
                                        branch=str(branch))
        else:
            predictions = predictor_of(champion).predict_photos(photos, test_ids)
            champion_accuracy = count_metrics(test_labels, [p["count"] for p in predictions], classes)["accuracy"]
    deploy, reason = decide(new_accuracy, champion_accuracy, force=force)
    return ChampionDecision(deploy=deploy, reason=reason + note, forced=force, target=target,
                            new_accuracy=new_accuracy, champion_run=champion.pathspec if champion else None,
                            champion_accuracy=champion_accuracy, branch=str(branch))


def crown(run_id: str, target: str, *, flow: str = FLOW_NAME, branch: ProjectBranch | None = None) -> str | None:
    """Tag ``run_id`` as the champion for ``target`` on ``branch`` (default: the run's own) and
    untag that branch's previous champion; other branches' champions keep their tags."""
    from metaflow import Run

    branch = branch or branch_of(run_id, flow=flow)
    previous = current_champion(target, branch, flow=flow, exclude_run_id=run_id)
    with metaflow_namespace(None):  # the run may be a teammate's (crowned from outside the flow)
        run = Run(f"{flow}/{run_id}")
    if not branch.holds(run):
        raise ValueError(f"run {run.pathspec} is on project branch {ProjectBranch.of_run(run)}, not {branch}: "
                         f"it cannot be {branch}'s champion")
    run.add_tag(champion_tag(target))
    if previous is not None:
        previous.remove_tag(champion_tag(target))
    return previous.pathspec if previous else None
