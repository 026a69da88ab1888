"""Live progress in a log: complete lines while a stage runs, read back through Metaflow's log capture."""

import gc
import json
import re
import sys
import threading
import time

import pytest

from bincount.data.progress import INTERVAL_ENV, log_interval, progress_bar

from conftest import run_flow

# "fetching: 1200/4000 img, 35.20 img/s, 00:34 elapsed, ~01:20 left" (and ", loss=..." when a stage sets it)
LINE = re.compile(r"^(?P<desc>.+): (?P<n>\d+)(?:/(?P<total>\d+))? (?P<unit>\w+), (?:[\d.]+|\?) (?P=unit)/s, "
                  r"\d\d:\d\d elapsed(?:, ~(?:\d\d:\d\d|\?) left)?(?:, .*)?$")


class Recorder:
    """A stderr that is not a terminal (as in a Metaflow task) and notes when each write arrives."""

    def __init__(self):
        self.writes: list[tuple[float, str]] = []

    def write(self, text: str) -> int:
        self.writes.append((time.monotonic(), text))
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False

    @property
    def text(self) -> str:
        return "".join(text for _, text in self.writes)


def log_stderr(monkeypatch) -> Recorder:
    """Called in the test itself: pytest puts its own sys.stderr back between fixture set-up and the test."""
    recorder = Recorder()
    monkeypatch.setattr(sys, "stderr", recorder)
    return recorder


def test_a_log_gets_one_complete_line_per_interval_and_one_at_close(monkeypatch):
    interval = 0.2
    monkeypatch.setenv(INTERVAL_ENV, str(interval))
    stderr = log_stderr(monkeypatch)
    started = time.monotonic()
    for _ in progress_bar(range(40), desc="fetching", unit=" img"):
        time.sleep(0.02)
    elapsed = time.monotonic() - started

    assert "\r" not in stderr.text
    # every write is one whole line: Metaflow's capture never waits for the rest of one
    assert all(text.endswith("\n") and text.count("\n") == 1 for _, text in stderr.writes)
    lines = [text.rstrip("\n") for _, text in stderr.writes]
    for line in lines:
        match = LINE.match(line)
        assert match and match["desc"] == "fetching" and match["unit"] == "img" and match["total"] == "40", line
    assert lines[-1].startswith("fetching: 40/40 img, ") and re.search(r"[\d.]+ img/s", lines[-1])
    assert re.search(r"[1-9][\d.]* img/s", lines[-2])  # a rate once the stage is under way
    # at most one line an interval (plus the first, at the start, and the last, at close) ...
    times = [t for t, _ in stderr.writes]
    assert all(b - a >= interval * 0.9 for a, b in zip(times[:-2], times[1:-1]))
    assert len(lines) <= elapsed / interval + 2
    # ... and not fewer: 40 x 20 ms is about 4 intervals
    assert len(lines) >= 4


def test_a_single_long_iteration_still_gets_a_line_every_interval(monkeypatch):
    """tqdm alone prints only when it is updated: a 1.2 s step at a 0.2 s interval would print nothing."""
    interval = 0.2
    monkeypatch.setenv(INTERVAL_ENV, str(interval))
    stderr = log_stderr(monkeypatch)
    bar = progress_bar(range(3), desc="tiny epoch 1", unit=" batch", leave=False)
    for i in bar:
        bar.set_postfix(loss="1.234", refresh=False)
        time.sleep(1.2 if i == 1 else 0.05)
    lines = [text.rstrip("\n") for _, text in stderr.writes]
    times = [t for t, _ in stderr.writes]
    assert all(LINE.match(line) for line in lines), lines
    assert max(b - a for a, b in zip(times, times[1:])) < 3 * interval
    during = [line for line in lines if line.startswith("tiny epoch 1: 1/3 batch")]  # the long batch
    assert len(during) >= 3
    # the rate counts the time of the batch under way: it falls while the bar waits
    rates = [float(re.search(r", ([\d.]+) batch/s", line)[1]) for line in during]
    assert rates == sorted(rates, reverse=True) and rates[-1] < rates[0] / 2, during
    assert lines[-1].startswith("tiny epoch 1: 3/3 batch") and lines[-1].endswith("loss=1.234")  # leave=False too


def test_a_stage_of_unknown_length_says_how_far_it_got(monkeypatch):
    monkeypatch.setenv(INTERVAL_ENV, "5")
    stderr = log_stderr(monkeypatch)
    with progress_bar(desc="listing", unit=" ids") as bar:
        bar.update(1200)
    assert stderr.text.splitlines()[-1].startswith("listing: 1200 ids, ")
    assert all(LINE.match(line) for line in stderr.text.splitlines())


def test_no_line_comes_after_the_last_one_even_from_a_bar_dropped_without_close(monkeypatch):
    monkeypatch.setenv(INTERVAL_ENV, "0.05")
    stderr = log_stderr(monkeypatch)
    closed = progress_bar(total=10, desc="closed", unit=" img")
    closed.update(3)
    closed.close()
    dropped = progress_bar(total=10, desc="dropped", unit=" img")
    dropped.update(4)
    del dropped  # its heartbeat holds it weakly: the last reference is gone, tqdm closes it
    gc.collect()
    for thread in threading.enumerate():
        if thread.name.startswith("progress: "):
            thread.join(2)
    written = len(stderr.writes)
    time.sleep(0.3)  # six intervals
    assert len(stderr.writes) == written
    lines = stderr.text.splitlines()
    assert lines[-1].startswith("dropped: 4/10 img, ")
    assert [line for line in lines if line.startswith("closed: ")][-1].startswith("closed: 3/10 img, ")
    assert not any(t.name.startswith("progress: ") for t in threading.enumerate())


def test_the_interval_defaults_to_30_s_and_a_bad_override_is_one_clear_error(monkeypatch):
    monkeypatch.delenv(INTERVAL_ENV, raising=False)
    assert log_interval() == 30
    for bad in ("abc", "0", "-1", "nan"):
        monkeypatch.setenv(INTERVAL_ENV, bad)
        with pytest.raises(ValueError, match=f"{INTERVAL_ENV}=.*above 0"):
            progress_bar(range(3))


def test_a_terminal_still_gets_a_bar_redrawn_in_place(monkeypatch):
    class Terminal(Recorder):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    for _ in progress_bar(range(3), desc="fetching", unit=" img", mininterval=0):
        pass
    assert "\r" in terminal.text and "100%|" in terminal.text


@pytest.mark.flow
def test_a_training_task_log_shows_each_epoch_when_it_ends(tmp_path):
    """A real run: the train task's log, with the timestamps Metaflow gave each line as it read it."""
    epochs = 3
    grid = tmp_path / "live.json"
    # Sized so that an epoch takes a few seconds on 2 CPU cores: 1 s progress lines fall inside every epoch.
    grid.write_text(json.dumps({"defaults": {"arch": "resnet18", "pretrained": False, "batch_size": 8,
                                             "epochs": epochs, "image_size": 96, "lr": 0.001},
                                "points": [{"name": "live"}]}))
    running = run_flow(env={INTERVAL_ENV: "1"}, grid=grid, source="synthetic", per_class=30, deploy_target="none")
    # Only the train task is under test here; the steps after it are other tests' business.
    assert "train" in running.run and running.run["train"].task.successful, running.output[-4000:]
    task = running.run["train"].task
    stdout = list(task.loglines("stdout"))
    stderr = list(task.loglines("stderr"))
    assert not any("\r" in line for _, line in stdout + stderr)

    epoch_lines = [(t, line) for t, line in stdout if re.match(rf"live epoch \d+/{epochs}:", line)]
    assert [line.split("/")[0] for _, line in epoch_lines] == [f"live epoch {k}" for k in range(1, epochs + 1)]
    # Each epoch line was read when its epoch ended, not with the others when the task ended:
    # consecutive ones are about an epoch apart.
    epoch_seconds = [row["epoch_seconds"] for row in task.data.history]
    for (before, _), (after, _), seconds in zip(epoch_lines, epoch_lines[1:], epoch_seconds[1:]):
        assert (after - before).total_seconds() >= 0.5 * seconds, (epoch_lines, epoch_seconds)

    progress = [(t, line) for t, line in stderr if line.startswith("live epoch ")]
    assert all(LINE.match(line) for _, line in progress), progress
    assert any(re.search(r"[1-9][\d.]* batch/s", line) for _, line in progress)
    for k, (epoch_line_at, _) in enumerate(epoch_lines, start=1):
        # While an epoch trains its bar writes a line every second (1 s interval; the heartbeat covers a slow batch),
        # each read by Metaflow as it came; between bars other work (validation, checkpoints) is not measured.
        bar = [t for t, line in progress if line.startswith(f"live epoch {k}: ")]
        assert len(bar) >= 2, progress  # the first, as it starts, and the last
        gaps = [(b - a).total_seconds() for a, b in zip(bar, bar[1:])]
        assert max(gaps) <= 3, (k, gaps)
        assert bar[-1] <= epoch_line_at
        assert any(re.match(rf"live epoch {k}: (\d+)/\1 batch", line) for _, line in progress)  # the last line
    assert len(progress) > 2 * epochs, progress  # and lines while the epochs ran
