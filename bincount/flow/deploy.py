"""Deploy targets and promotion.

``deploy`` sends a packaged model to ``local`` or ``local-toolkit`` (bincount's server or
SageMaker's serving toolkit, here: bincount.serving.endpoint) or ``sagemaker``
(bincount.sagemaker.endpoint) and refuses an endpoint that disagrees
with the in-process predictions. ``promote`` is the flow's whole deploy step: the
champion gate, the package, the deployment and the champion tag, as one decision.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from bincount.data.shards import read_photos
from bincount.flow.champion import ChampionDecision
from bincount.flow.runs import ProjectBranch
from bincount.model.metadata import ModelMeta
from bincount.serving.endpoint import EndpointError, deploy_local


def deploy(target: str, package: bytes, meta: ModelMeta | dict, images: dict[str, bytes], expected: dict[str, dict],
           config: dict | None = None) -> dict:
    """Deploy ``package`` to ``target`` (``local``, ``local-toolkit`` or ``sagemaker``) and smoke-test it.

    Raises EndpointError when the endpoint answers differently from the
    in-process predictions in ``expected``.
    """
    if target == "sagemaker":
        from bincount.sagemaker.endpoint import SageMakerTarget, deploy_to_sagemaker

        report = deploy_to_sagemaker(package, meta, SageMakerTarget.from_config(config or {}),
                                     smoke_images=images, expected=expected)
    elif target in ("local", "local-toolkit"):
        report = deploy_local(package, images, expected, server="toolkit" if target == "local-toolkit" else "bincount")
    else:
        raise ValueError(f"unknown deploy target {target!r}")
    if report["smoke_test"]["mismatches"]:
        raise EndpointError(f"the {target} endpoint disagreed with in-process predictions: "
                            f"{report['smoke_test']['mismatches'][:3]}")
    return report


SMOKE_TEST_IMAGES = 16


@dataclass(frozen=True)
class Promotion:
    """What the deploy step decided and did."""

    target: str
    decision: ChampionDecision | None  # the champion gate's; None when the target is "none"
    deployment: dict  # {"target": ...}, and once deployed the target's report and "replaced"
    package: bytes | None = None  # model.tar.gz, when it was deployed


def promote(target: str, *, run_id: str, state: bytes, meta: ModelMeta | dict, photos: Mapping[str, bytes],
            test_ids: list[str], test_labels: list[int], test_predictions: Mapping[str, dict], new_accuracy: float,
            force: bool = False, config: dict | None = None, branch: ProjectBranch | None = None) -> Promotion:
    """Deploy a run's model to ``target`` if it beats the target's champion on the run's own
    test split (``test_ids`` and ``test_labels`` in the same order, their photos in ``photos``,
    streamed), smoke-test the endpoint
    against ``test_predictions`` (the in-process answers), and crown the run.

    The champion is that of ``branch``, by default the run's own project branch (``@project``:
    ``--production``, ``--branch``, else the user's), so a run only ever replaces its own
    branch's champion."""
    from bincount.flow.champion import branch_of, crown, gate
    from bincount.serving.package import build_package

    if target == "none":
        return Promotion(target, None, {"target": target})
    meta = ModelMeta.from_dict(meta)
    branch = branch or branch_of(run_id)
    decision = gate(target, run_id=run_id, classes=meta.classes, new_accuracy=new_accuracy,
                    photos=photos, test_ids=test_ids, test_labels=test_labels, force=force, branch=branch)
    print(f"champion gate: {decision.to_dict()}")
    if not decision.deploy:
        return Promotion(target, decision, {"target": target})
    package = build_package(state, meta)
    ids = list(test_predictions)[:SMOKE_TEST_IMAGES]
    report = deploy(target, package, meta, dict(read_photos(photos, ids)), {i: test_predictions[i] for i in ids},
                    config)
    deployment = {"target": target, **report, "replaced": crown(run_id, target, branch=branch)}
    print(f"deployed to {target}: {deployment['smoke_test']}")
    return Promotion(target, decision, deployment, package)
