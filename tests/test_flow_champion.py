"""The champion gate, across real runs: per @project branch. Runs after test_flow.py (it adds runs
that would change which run is the latest)."""

import json
import os

import pytest
from metaflow import Run, default_namespace, get_namespace, namespace

from bincount.cli import main
from bincount.flow.champion import champion_tag, current_champion
from bincount.flow.runs import ProjectBranch, metaflow_namespace

from conftest import run_flow

pytestmark = pytest.mark.flow

TAG = champion_tag("local")
ME = os.environ["METAFLOW_USER"]
PROD, TEST = ProjectBranch("prod"), ProjectBranch("test.test")


def fresh(run):
    """The run read again: a Run object keeps the tags it was read with."""
    with metaflow_namespace(None):
        return Run(run.pathspec)


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
    mine = ProjectBranch.of_run(synthetic_run)
    assert mine == ProjectBranch(f"user.{ME}")  # a plain run is on the user's own project branch

    weak = run_flow(grid=weak_grid, source="synthetic", per_class=60)  # same seed: same test split
    assert weak.status == "successful", weak.output[-4000:]
    decision = weak.run.data.champion_decision
    assert decision["deploy"] is False and decision["reason"] == "less accurate than the champion"
    assert decision["champion_run"] == synthetic_run.pathspec and decision["branch"] == str(mine)
    assert decision["champion_accuracy"] == pytest.approx(synthetic_run.data.test_metrics["accuracy"])
    assert decision["new_accuracy"] < decision["champion_accuracy"]
    assert "model_package" not in weak.run.data and weak.run.data.deployment == {"target": "local"}
    assert current_champion("local", mine).id == synthetic_run.id

    forced = run_flow(grid=weak_grid, source="synthetic", per_class=60, force_deploy=True)
    assert forced.status == "successful", forced.output[-4000:]
    assert forced.run.data.champion_decision["reason"] == "forced"
    assert forced.run.data.deployment["replaced"] == synthetic_run.pathspec
    assert current_champion("local", mine).id == forced.run.id
    assert TAG not in fresh(synthetic_run).user_tags


# --- two branches of one project -------------------------------------------------

@pytest.fixture(scope="module")
def branch_runs(one_point_grid):
    """A production run (``--production``), then a colleague's run on the test branch ``test``
    (``--branch test``): same data, seed and grid, so the same test split and an equal model."""
    prod = run_flow(top={"production": True}, grid=one_point_grid, source="synthetic", per_class=30)
    assert prod.status == "successful", prod.output[-4000:]
    test = run_flow(top={"branch": "test"}, env={"METAFLOW_USER": "colleague"}, grid=one_point_grid,
                    source="synthetic", per_class=30)
    assert test.status == "successful", test.output[-4000:]
    return prod.run, test.run


def test_a_test_branch_run_never_takes_the_production_champions_tag(branch_runs):
    prod, test = branch_runs
    assert ProjectBranch.of_run(prod) == PROD and ProjectBranch.of_run(test) == TEST
    decision = prod.data.champion_decision
    assert decision["deploy"] and decision["reason"] == "no champion yet" and decision["branch"] == "bincount/prod"

    # At least as accurate as production's champion on the same test split: a global gate (the
    # old one) would have deployed it over production and moved the tag.
    assert test.data.test_metrics["accuracy"] >= prod.data.test_metrics["accuracy"]
    decision = test.data.champion_decision
    assert decision["branch"] == "bincount/test.test" and decision["champion_run"] is None
    assert decision["deploy"] and decision["reason"] == "no champion yet"
    assert test.data.deployment["replaced"] is None

    assert TAG in fresh(prod).user_tags and TAG in fresh(test).user_tags
    assert current_champion("local", PROD).id == prod.id
    assert current_champion("local", TEST).id == test.id


def test_library_calls_leave_the_notebooks_namespace_alone(branch_runs):
    from bincount import audit
    from bincount.flow.run_choice import choose_run
    from bincount.flow.runs import get_run, predictor_of

    prod, _ = branch_runs
    namespace("user:someone")  # what a notebook might have chosen
    try:
        run = get_run(prod.id)
        assert get_namespace() == "user:someone"
        assert get_run().id and get_namespace() == "user:someone"
        assert current_champion("local", PROD).id == prod.id and get_namespace() == "user:someone"
        assert choose_run(champion="local", branch=PROD).run.id == prod.id and get_namespace() == "user:someone"
        assert audit.choose_model_run(champion="local", branch=PROD).id == prod.id
        assert get_namespace() == "user:someone"
        assert audit.choose_model_run(prod.id).id == prod.id and get_namespace() == "user:someone"
        assert audit.validation_set(run)[1] and get_namespace() == "user:someone"
        assert audit.threshold_for_run(run, predictor_of(run)).run == prod.pathspec
        assert get_namespace() == "user:someone"
    finally:
        default_namespace()


# --- the CLI picks a run and says which ------------------------------------------

def cli(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def image(tmp_path, synthetic_jpegs):
    path = tmp_path / "bin.jpg"
    path.write_bytes(synthetic_jpegs[2])
    return str(path)


def test_cli_champion_picks_the_branchs_tagged_run_and_says_so(branch_runs, capsys, image):
    prod, test = branch_runs
    code, out, err = cli(capsys, "predict", "--champion", "local", "--production", "--json", image)
    assert code == 0, err
    assert err == f"bincount: using run {prod.pathspec}: tagged champion:local on project branch bincount/prod\n"
    assert json.loads(out)[image]["count"] in range(1, 6)  # stdout stays JSON

    code, out, err = cli(capsys, "predict", "--champion", "local", "--branch", "test", image)
    assert code == 0 and err.startswith(f"bincount: using run {test.pathspec}: tagged champion:local on project "
                                        "branch bincount/test.test\n"), err


def test_cli_default_is_the_latest_run_of_my_own_namespace(branch_runs, capsys, image):
    """The colleague's test-branch run is the newest run of all; mine is the production run."""
    prod, test = branch_runs
    assert int(test.id) > int(prod.id)
    code, out, err = cli(capsys, "predict", image)
    assert code == 0, err
    assert err == (f"bincount: using run {prod.pathspec}: the latest successful run in your namespace user:{ME} "
                   "(choose another with --run ID or --champion TARGET)\n")
    assert out.startswith(f"{image}\tcount=")


def test_cli_evaluate_serve_and_audit_say_which_run(branch_runs, capsys, monkeypatch, tmp_path):
    import bincount.serving.server

    prod, test = branch_runs
    code, out, err = cli(capsys, "evaluate", "--run", test.id, "--source", "synthetic", "--per-class", "2", "--quiet")
    assert code == 0, err
    assert err == f"bincount: using run {test.pathspec}: given by --run\n"
    assert json.loads(out)["run"] == test.pathspec

    served = []
    monkeypatch.setattr(bincount.serving.server, "serve_with_arguments", lambda predictor, *a: served.append(predictor))
    code, out, err = cli(capsys, "serve", "--champion", "local", "--production")
    assert code == 0, err
    assert out == f"bincount: using run {prod.pathspec}: tagged champion:local on project branch bincount/prod\n"
    assert served and served[0].meta.run_id == prod.id

    ids = tmp_path / "ids.txt"
    ids.write_text("no-such-bin\n")
    code, out, err = cli(capsys, "audit", "--source", "synthetic", "--ids", str(ids), "--champion", "local",
                         "--branch", "test", "--out", str(tmp_path / "report"), "--quiet")
    assert code == 0, err
    assert out.splitlines()[0] == (f"bincount: using run {test.pathspec}: tagged champion:local on project branch "
                                   "bincount/test.test")
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert summary["model_run"] == test.pathspec


def test_cli_a_branch_without_that_champion_is_one_line(branch_runs, capsys, image):
    code, _, err = cli(capsys, "predict", "--champion", "sagemaker", "--production", image)
    assert code == 2
    assert err == "bincount: no BinCountFlow run is tagged champion:sagemaker on project branch bincount/prod\n"
