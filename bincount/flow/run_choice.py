"""Which run a command uses: the one given by ``--run``, else a champion, else the latest.

Its own module because it needs both the run lookups (bincount.flow.runs) and the champion
lookup (bincount.flow.champion), which itself reads runs.
"""

from __future__ import annotations

from dataclasses import dataclass

from bincount import FLOW_NAME
from bincount.flow.champion import current_champion
from bincount.flow.runs import ProjectBranch, RunNotFound, get_run, latest_run_of, own_namespace


@dataclass(frozen=True)
class RunChoice:
    """The run a command uses, and why (said to the user in one line)."""

    run: object  # metaflow.Run
    why: str

    def line(self) -> str:
        return f"using run {self.run.pathspec}: {self.why}"


def choose_run(run_id: str | None = None, *, champion: str | None = None, branch: ProjectBranch | None = None,
               flow: str = FLOW_NAME) -> RunChoice:
    """The run named by ``run_id``; else the run tagged ``champion:<champion>`` on ``branch``
    (default: the caller's own branch, ``user.<name>``); else the latest successful run on
    ``branch``, or without one, of the caller's own namespace."""
    if run_id and (champion or branch):
        raise ValueError("--run names one run: give it without --champion, --branch or --production")
    if run_id:
        return RunChoice(get_run(run_id, flow), "given by --run")
    if champion:
        branch = branch or ProjectBranch.from_options()
        run = current_champion(champion, branch, flow=flow)
        if run is None:
            raise RunNotFound(f"no {flow} run is tagged champion:{champion} on project branch {branch}"
                              + ("" if branch.is_production else " (the production champion: add --production)"))
        return RunChoice(run, f"tagged champion:{champion} on project branch {branch}")
    if branch:
        return RunChoice(latest_run_of(branch, flow), f"the latest successful run on project branch {branch}")
    run = get_run(None, flow)
    return RunChoice(run, f"the latest successful run in your namespace {own_namespace()} "
                          "(choose another with --run ID or --champion TARGET)")
