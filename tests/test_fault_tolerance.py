"""Long runs that survive: a grid point killed mid-run or failing goes on from its last checkpoint,
and one that still fails after its retries does not sink the run.

Each test drives the real flow (tiny grid, synthetic photos) and reads it back through the Client.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from bincount.model.train import FAIL_ENV, HANG_ENV

from conftest import DATASTORE, FLOW, TINY_GRID, card_text, resume_flow, run_flow

pytestmark = pytest.mark.flow


def start_flow(env: dict, *args: str) -> subprocess.Popen:
    """The flow as a user starts it, in a process group of its own (so that all of it can be killed)."""
    return subprocess.Popen([sys.executable, str(FLOW), "--config", "grid", str(TINY_GRID), "run", *args],
                            cwd=DATASTORE, env={**os.environ, **env}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def wait_for(process: subprocess.Popen, text: str, timeout_s: float = 600) -> list[str]:
    """The process's output lines up to the first that holds ``text``."""
    lines, deadline = [], time.monotonic() + timeout_s
    for line in process.stdout:
        lines.append(line)
        if text in line:
            return lines
        assert time.monotonic() < deadline, "".join(lines[-40:])
    raise AssertionError(f"the flow ended before printing {text!r}:\n" + "".join(lines[-40:]))


def task_of(run, grid_point: str):
    """The train task that trained ``grid_point``."""
    return next(t for t in run["train"] if t.data.scores["config"]["name"] == grid_point)


def test_a_run_killed_mid_training_resumes_from_the_last_checkpoint(synthetic_run):
    """kill -9 of the whole run while tiny-b is in its third epoch; `resume` goes on from the
    checkpoint after epoch 2, trains only epochs 3-6, and ends with the weights of a run that was
    never killed (synthetic_run: the same photos, split and seed). The card the killed task left
    shows the curves as far as they got."""
    from metaflow import Run
    from metaflow.cards import get_cards

    process = start_flow({HANG_ENV: "tiny-b:2"}, "--source", "synthetic", "--per-class", "60", "--shard-mb", "0.25",
                         "--fetch-tasks", "2", "--deploy-target", "none", "--max-workers", "1")
    try:
        lines = wait_for(process, f"{HANG_ENV}: tiny-b hangs in epoch 3")
        run_id = next(line.split("run-id ")[1].split(")")[0] for line in lines if "run-id " in line)
        killed = Run(f"BinCountFlow/{run_id}")
        # tiny-a finished first (one task at a time); tiny-b's task is still running and has no artifacts.
        [tiny_b_running] = [t for t in killed["train"] if not t.finished]
        # Its card was redrawn while it trained (after epoch 1, then at most every 10 s: tiny epochs
        # take seconds). Each redraw is a process of its own, so give it a moment.
        deadline, shown = time.monotonic() + 30, ""
        while not re.search(r"training, epoch [12] of 6", shown) and time.monotonic() < deadline:
            time.sleep(1)
            shown = " ".join(card_text(card.get()) for card in get_cards(tiny_b_running))
        assert re.search(r"training, epoch [12] of 6", shown) and "Learning curves so far: tiny-b" in shown
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(30)
    assert not Run(f"BinCountFlow/{run_id}").finished

    resumed = resume_flow(run_id)
    assert resumed.status == "successful", resumed.output[-4000:]
    tiny_b = task_of(resumed.run, "tiny-b")
    log = tiny_b.stdout
    assert "tiny-b: continuing from the checkpoint after epoch 2 of 6" in log
    assert "tiny-b epoch 3/6" in log and "tiny-b epoch 2/6" not in log  # fewer epochs than a fresh run
    assert [row["epoch"] for row in tiny_b.data.history] == [1, 2, 3, 4, 5, 6]
    never_killed = task_of(synthetic_run, "tiny-b")
    assert tiny_b.data.state_dict == never_killed.data.state_dict
    assert tiny_b.data.scores["val_accuracy"] == never_killed.data.scores["val_accuracy"]


def test_a_point_that_fails_after_its_retry_leaves_the_run_to_the_others(quick_grid):
    """tiny-b fails on both attempts (the default one retry); the run completes on tiny-a and names
    tiny-b, with its error, in an artifact, the join's log and both of its cards."""
    from metaflow.cards import get_cards

    running = run_flow(env={FAIL_ENV: "tiny-b"}, grid=quick_grid, source="synthetic", per_class=30,
                       deploy_target="none")
    assert running.status == "successful", running.output[-4000:]
    data = running.run.data
    assert list(data.grid_results["name"]) == ["tiny-a"] and data.chosen == "tiny-a"
    assert data.ensemble == ["tiny-a"]  # the ensemble of two is what is left of it
    [failed] = data.failed_points
    assert failed["name"] == "tiny-b" and failed["error"].startswith("RuntimeError: BINCOUNT_FAIL_TRAIN=tiny-b")
    assert "grid point tiny-b failed after its retries: RuntimeError" in running.output
    join = running.run["join"].task
    shown = [card_text(card.get()) for card in get_cards(join)]
    assert len(shown) == 2 and all("Failed grid points (1)" in text and "tiny-b" in text for text in shown)
