"""The champion gate: deploy a new model only if it is at least as good.

The model currently deployed to a target is the one whose run carries the tag
``champion:<target>`` (Metaflow run tags, so the Client and the UI show it).
A new run's model is compared with it on the new run's own test split, which
the champion never trained on, and deploys only when its accuracy is at least
the champion's, unless forced. The decision, with both scores, is returned for
the flow to keep as an artifact.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass

from bincount import FLOW_NAME


@dataclass(frozen=True)
class ChampionDecision:
    deploy: bool
    reason: str
    forced: bool
    target: str
    new_accuracy: float
    champion_run: str | None = None  # the champion's pathspec, if the target has one
    champion_accuracy: float | None = None  # on the new run's test split; None if not comparable

    def to_dict(self) -> dict:
        """The flow's ``champion_decision`` artifact."""
        return asdict(self)


def champion_tag(target: str) -> str:
    return f"champion:{target}"


def current_champion(target: str, *, flow: str = FLOW_NAME, exclude_run_id: str | None = None):
    """The newest run tagged champion for ``target``, or None."""
    from metaflow import Flow, namespace
    from metaflow.exception import MetaflowNotFound

    namespace(None)  # a champion deployed by a teammate counts too
    try:
        runs = Flow(flow).runs(champion_tag(target))
    except MetaflowNotFound:
        return None
    return next((run for run in runs if run.id != exclude_run_id), None)


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
         force: bool = False) -> ChampionDecision:
    """Score the current champion on this run's test split (``test_ids``, their photos streamed
    from ``photos``) and decide."""
    from bincount.flow.runs import model_of, predictor_of
    from bincount.model.metrics import count_metrics

    champion = current_champion(target, exclude_run_id=run_id)
    champion_accuracy, note = None, ""
    if champion is not None:
        _, champion_meta = model_of(champion)
        if champion_meta.classes != classes:
            note = f"; the champion counts {champion_meta.classes}, this run {classes}: not comparable"
            if not force:
                return ChampionDecision(deploy=False, reason="champion not comparable" + note, forced=False,
                                        target=target, new_accuracy=new_accuracy, champion_run=champion.pathspec)
        else:
            predictions = predictor_of(champion).predict_photos(photos, test_ids)
            champion_accuracy = count_metrics(test_labels, [p["count"] for p in predictions], classes)["accuracy"]
    deploy, reason = decide(new_accuracy, champion_accuracy, force=force)
    return ChampionDecision(deploy=deploy, reason=reason + note, forced=force, target=target,
                            new_accuracy=new_accuracy, champion_run=champion.pathspec if champion else None,
                            champion_accuracy=champion_accuracy)


def crown(run_id: str, target: str, *, flow: str = FLOW_NAME) -> str | None:
    """Tag ``run_id`` as the champion for ``target``; untag the previous one."""
    from metaflow import Run, namespace

    namespace(None)
    previous = current_champion(target, flow=flow, exclude_run_id=run_id)
    Run(f"{flow}/{run_id}").add_tag(champion_tag(target))
    if previous is not None:
        previous.remove_tag(champion_tag(target))
    return previous.pathspec if previous else None
