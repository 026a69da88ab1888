"""The champion gate, across real runs. Runs after test_flow.py (it adds runs
that would change which run is the latest)."""

import json

import pytest

from bincount.flow.champion import champion_tag, current_champion

from conftest import run_flow

pytestmark = pytest.mark.flow

TAG = champion_tag("local")


@pytest.fixture(scope="module")
def weak_grid(tmp_path_factory):
    """One epoch at a learning rate too small to learn anything."""
    path = tmp_path_factory.mktemp("grids") / "weak.json"
    path.write_text(json.dumps({"defaults": {"arch": "resnet18", "pretrained": False, "batch_size": 16,
                                             "epochs": 1, "image_size": 96, "lr": 1e-7},
                                "points": [{"name": "weak"}]}))
    return path


def test_a_worse_model_is_not_deployed_unless_forced(synthetic_run, weak_grid):
    assert TAG in synthetic_run.user_tags  # the first deployed run became the champion

    weak = run_flow(grid=weak_grid, source="synthetic", per_class=60)  # same seed: same test split
    assert weak.status == "successful", weak.output[-4000:]
    decision = weak.run.data.champion_decision
    assert decision["deploy"] is False and decision["reason"] == "less accurate than the champion"
    assert decision["champion_run"] == synthetic_run.pathspec
    assert decision["champion_accuracy"] == pytest.approx(synthetic_run.data.test_metrics["accuracy"])
    assert decision["new_accuracy"] < decision["champion_accuracy"]
    assert "model_package" not in weak.run.data and weak.run.data.deployment == {"target": "local"}
    assert current_champion("local").id == synthetic_run.id

    forced = run_flow(grid=weak_grid, source="synthetic", per_class=60, force_deploy=True)
    assert forced.status == "successful", forced.output[-4000:]
    assert forced.run.data.champion_decision["reason"] == "forced"
    assert forced.run.data.deployment["replaced"] == synthetic_run.pathspec
    assert current_champion("local").id == forced.run.id
    from metaflow import Run

    assert TAG not in Run(synthetic_run.pathspec).user_tags  # a fresh read: tags changed since
