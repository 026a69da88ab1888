"""Champions per @project branch, and lookups that leave the caller's namespace alone, on real
Metaflow runs of a two-step flow (seconds each): one made before @project (no project tags),
then runs on the production branch, a test branch, the user's own branch and a colleague's.

The same rules inside BinCountFlow's deploy step are tested in test_flow_champion.py."""

import os
import textwrap

import pytest
from metaflow import Run, default_namespace, get_namespace, namespace

from bincount.flow.champion import champion_tag, crown, current_champion
from bincount.flow.run_choice import choose_run
from bincount.flow.runs import ProjectBranch, RunNotFound, get_run, metaflow_namespace

from conftest import DATASTORE

FLOW_NAME = "ScopeFlow"
TAG = champion_tag("local")
ME = os.environ["METAFLOW_USER"]

STEPS = """
    @step
    def start(self):
        self.next(self.end)

    @step
    def end(self):
        pass
"""
# The same flow before and after it gained @project: one flow name in the datastore.
LEGACY = f"from metaflow import FlowSpec, step\n\n\nclass {FLOW_NAME}(FlowSpec):{STEPS}"
PROJECT = (f"from metaflow import FlowSpec, project, step\n\n\n@project(name=\"bincount\")\n"
           f"class {FLOW_NAME}(FlowSpec):{STEPS}")
FOOTER = f"\n\nif __name__ == \"__main__\":\n    {FLOW_NAME}()\n"


def run_scope_flow(path, top=None, env=None):
    from metaflow import Runner

    with Runner(str(path), show_output=False, cwd=str(DATASTORE), env=env or {}, **(top or {})).run() as running:
        assert running.status == "successful", running.stdout + running.stderr
        return running.run


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Oldest first: a pre-@project run that an old global crown made champion:local, then one
    run on each of the production branch, the test branch ``test``, my own branch and a
    colleague's own branch."""
    folder = tmp_path_factory.mktemp("scope")
    (folder / "legacy_flow.py").write_text(textwrap.dedent(LEGACY) + FOOTER)
    (folder / "project_flow.py").write_text(textwrap.dedent(PROJECT) + FOOTER)
    legacy = run_scope_flow(folder / "legacy_flow.py")
    legacy.add_tag(TAG)  # what the old, global crown() did
    project = folder / "project_flow.py"
    return {"legacy": legacy, "prod": run_scope_flow(project, top={"production": True}),
            "test": run_scope_flow(project, top={"branch": "test"}), "mine": run_scope_flow(project),
            "colleague": run_scope_flow(project, env={"METAFLOW_USER": "colleague"})}


def tagged(run) -> bool:
    with metaflow_namespace(None):
        return TAG in Run(run.pathspec).user_tags  # a fresh read: a Run object keeps the tags it was read with


def test_branch_names_are_metaflows(runs):
    """The names the CLI builds from --production/--branch are those Metaflow gives the runs."""
    assert ProjectBranch.of_run(runs["prod"]) == ProjectBranch.from_options(production=True) == ProjectBranch("prod")
    assert ProjectBranch.of_run(runs["test"]) == ProjectBranch.from_options(branch="test") == ProjectBranch("test.test")
    assert ProjectBranch.of_run(runs["mine"]) == ProjectBranch.from_options() == ProjectBranch(f"user.{ME}")
    assert ProjectBranch.of_run(runs["colleague"]) == ProjectBranch("user.colleague")
    assert ProjectBranch.of_run(runs["legacy"]) == ProjectBranch("prod")  # made before @project
    with pytest.raises(ValueError, match="--branch 'Bad-Name'"):
        ProjectBranch.from_options(branch="Bad-Name")


def test_a_branch_sees_and_replaces_only_its_own_champion(runs):
    prod, test, mine = ProjectBranch("prod"), ProjectBranch("test.test"), ProjectBranch(f"user.{ME}")
    # The pre-@project champion is the production branch's, and no other branch's.
    assert current_champion("local", prod, flow=FLOW_NAME).id == runs["legacy"].id
    assert current_champion("local", test, flow=FLOW_NAME) is None
    assert current_champion("local", mine, flow=FLOW_NAME) is None

    # A test-branch run (and a user's own) becomes its branch's champion; production keeps its.
    assert crown(runs["test"].id, "local", flow=FLOW_NAME) is None
    assert crown(runs["mine"].id, "local", flow=FLOW_NAME) is None
    assert tagged(runs["legacy"]) and current_champion("local", prod, flow=FLOW_NAME).id == runs["legacy"].id
    assert current_champion("local", test, flow=FLOW_NAME).id == runs["test"].id
    with pytest.raises(ValueError, match="is on project branch bincount/test.test, not bincount/prod"):
        crown(runs["test"].id, "local", flow=FLOW_NAME, branch=prod)
    assert tagged(runs["legacy"]) and tagged(runs["test"])  # the refused crown changed nothing

    # A production run takes the tag from the pre-@project champion; the other branches keep theirs.
    assert crown(runs["prod"].id, "local", flow=FLOW_NAME) == runs["legacy"].pathspec
    assert not tagged(runs["legacy"]) and tagged(runs["prod"])
    assert current_champion("local", prod, flow=FLOW_NAME).id == runs["prod"].id
    assert tagged(runs["test"]) and tagged(runs["mine"])


def test_choosing_a_run_says_which_and_why(runs):
    # Default: the latest successful run of my own namespace, not the colleague's newer one; and not
    # an older run whose tags just changed (the local metadata then rewrites its created_at).
    runs["legacy"].add_tag("looked-at")
    runs["legacy"].remove_tag("looked-at")
    choice = choose_run(flow=FLOW_NAME)
    assert choice.run.id == runs["mine"].id
    assert choice.line() == (f"using run {FLOW_NAME}/{runs['mine'].id}: the latest successful run in your namespace "
                             f"user:{ME} (choose another with --run ID or --champion TARGET)")
    # A branch: its latest successful run, whoever made it.
    assert choose_run(branch=ProjectBranch("test.test"), flow=FLOW_NAME).run.id == runs["test"].id
    assert choose_run(branch=ProjectBranch("user.colleague"), flow=FLOW_NAME).run.id == runs["colleague"].id
    # An id: that run, whoever made it.
    choice = choose_run(runs["colleague"].id, flow=FLOW_NAME)
    assert choice.run.id == runs["colleague"].id and choice.why == "given by --run"
    with pytest.raises(ValueError, match="--run names one run"):
        choose_run(runs["mine"].id, champion="local", flow=FLOW_NAME)


def test_champion_lookup_is_per_branch_with_my_own_by_default(runs):
    crown(runs["prod"].id, "sagemaker", flow=FLOW_NAME)
    choice = choose_run(champion="sagemaker", branch=ProjectBranch("prod"), flow=FLOW_NAME)
    assert choice.run.id == runs["prod"].id
    assert choice.why == "tagged champion:sagemaker on project branch bincount/prod"
    # My own branch has no sagemaker champion: the production one is not borrowed, and the error says where it is.
    with pytest.raises(RunNotFound, match=f"on project branch bincount/user.{ME} .*add --production"):
        choose_run(champion="sagemaker", flow=FLOW_NAME)


def test_lookups_leave_the_callers_namespace_as_it_was(runs):
    """A notebook that chose a namespace keeps it, whatever the library reads in between."""
    namespace("user:someone")
    try:
        calls = {
            "get_run(id)": lambda: get_run(runs["colleague"].id, FLOW_NAME),
            "get_run()": lambda: get_run(None, FLOW_NAME),
            "current_champion": lambda: current_champion("local", ProjectBranch("test.test"), flow=FLOW_NAME),
            "crown": lambda: crown(runs["test"].id, "local", flow=FLOW_NAME),
            "choose_run(branch)": lambda: choose_run(branch=ProjectBranch("prod"), flow=FLOW_NAME),
            "choose_run(champion)": lambda: choose_run(champion="local", branch=ProjectBranch("prod"), flow=FLOW_NAME),
        }
        for name, call in calls.items():
            call()
            assert get_namespace() == "user:someone", name
        with pytest.raises(RunNotFound):
            choose_run(champion="none-such", flow=FLOW_NAME)
        assert get_namespace() == "user:someone"
    finally:
        default_namespace()


def test_a_namespace_never_resolved_stays_unresolved_without_a_user(runs, monkeypatch):
    """Without a user name Metaflow has no default namespace (it resolves one lazily); a lookup by
    id must neither need one nor leave one set, and the default choice says what to set."""
    from metaflow import metaflow_config
    from metaflow.client import core

    monkeypatch.setattr(metaflow_config, "USER", None)  # METAFLOW_USER, as Metaflow read it at import
    for name in ("SUDO_USER", "USERNAME", "USER", "METAFLOW_PRODUCTION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(core, "current_namespace", False)  # Metaflow's "not resolved yet"
    assert get_run(runs["mine"].id, FLOW_NAME).id == runs["mine"].id
    assert core.current_namespace is False
    with pytest.raises(RunNotFound, match="set METAFLOW_USER"):
        choose_run(flow=FLOW_NAME)
    with metaflow_namespace("user:x"):
        assert get_namespace() == "user:x"
    assert core.current_namespace is False
