"""Hyperparameter search: ranges drawn into trials, adaptive draws, early stopping, trial records."""

import json
import math

import pytest

from bincount.model.grid import TrainConfig, expand_grid, grid_search, plan_grid
from bincount.model.search import EarlyStopping, TrialRecord, expand_trials, should_stop, suggest
from bincount.model.trials import TrialStore, grid_point
from bincount.validation import ConfigError

SPACE = {"lr": {"loguniform": [1e-5, 1e-2]}, "frozen_blocks": {"int": [0, 5]},
         "label_smoothing": {"uniform": [0.0, 0.2]}, "batch_size": {"choice": [32, 64, 128]}}
DEFAULTS = {"arch": "efficientnet_lite0", "epochs": 4}


def search(**block):
    return grid_search({"defaults": DEFAULTS, "search": {"space": SPACE, "trials": 16, **block}})


@pytest.mark.parametrize("strategy", ["random", "quasi-random"])
def test_each_range_kind_is_drawn_within_its_range(strategy):
    trials = expand_trials(search(strategy=strategy, seed=3))
    assert len(trials) == 16
    for t in trials:
        assert 1e-5 <= t["lr"] <= 1e-2 and isinstance(t["lr"], float)
        assert t["frozen_blocks"] in range(6) and isinstance(t["frozen_blocks"], int)
        assert 0.0 <= t["label_smoothing"] <= 0.2
        assert t["batch_size"] in (32, 64, 128)
    # log-uniform: the draws spread over the decades, not bunched in the top one as a uniform draw would be
    decades = {math.floor(math.log10(t["lr"])) for t in trials}
    assert len(decades) >= 3, sorted(t["lr"] for t in trials)
    assert len({t["batch_size"] for t in trials}) == 3 and len({t["frozen_blocks"] for t in trials}) >= 4


@pytest.mark.parametrize("strategy", ["random", "quasi-random"])
def test_a_seed_draws_the_same_trials_and_another_seed_others(strategy):
    assert expand_trials(search(strategy=strategy, seed=7)) == expand_trials(search(strategy=strategy, seed=7))
    assert expand_trials(search(strategy=strategy, seed=7)) != expand_trials(search(strategy=strategy, seed=8))


def test_quasi_random_covers_a_range_more_evenly_than_random():
    """Sobol points fill the unit interval with smaller gaps than independent draws (the reason to use them)."""
    def widest_gap(strategy, seed):
        xs = sorted(t["label_smoothing"] / 0.2 for t in expand_trials(search(strategy=strategy, seed=seed)))
        return max(b - a for a, b in zip([0.0, *xs], [*xs, 1.0]))

    assert (sum(widest_gap("quasi-random", s) for s in range(5))
            < sum(widest_gap("random", s) for s in range(5)))


def test_fixed_points_keep_working_beside_a_search():
    grid = {"defaults": {**DEFAULTS, "pretrained": False},
            "points": [{"name": "recipe", "lr": 0.001}],
            "search": {"space": {"lr": {"loguniform": [1e-4, 1e-2]}}, "trials": 3, "strategy": "random"}}
    items = plan_grid(grid)
    assert [i["name"] for i in items] == ["recipe", "trial-00", "trial-01", "trial-02"]
    assert items[0] == {"name": "recipe", "config": TrainConfig(name="recipe", pretrained=False,
                                                                 **DEFAULTS, lr=0.001).as_dict(),
                        "trial": None, "params": None}
    assert [c.name for c in expand_grid(grid)] == ["recipe", "trial-00", "trial-01", "trial-02"]
    assert all(c.epochs == 4 and c.lr == i["params"]["lr"] for c, i in zip(expand_grid(grid)[1:], items[1:]))
    # an adaptive search's trials draw their values when they start: nothing up front
    grid["search"]["strategy"] = "tpe"
    assert [(i["config"], i["params"]) for i in plan_grid(grid)[1:]] == [(None, None)] * 3
    assert [c.name for c in expand_grid(grid)] == ["recipe"]
    # a search alone is a grid
    assert len(plan_grid({"defaults": DEFAULTS, "search": grid["search"]})) == 3


@pytest.mark.parametrize("block, message", [
    ({"space": {"lrate": {"uniform": [0, 1]}}}, "unknown hyperparameters.*lrate"),
    ({"space": {"name": {"choice": ["a"]}}}, "unknown hyperparameters.*name"),
    ({"space": {}}, "space is empty"),
    ({"space": {"lr": {"normal": [0, 1]}}}, "expected one of"),
    ({"space": {"lr": {"uniform": [0.1, 0.01]}}}, "low < high"),
    ({"space": {"lr": {"loguniform": [0, 0.01]}}}, "loguniform needs low > 0"),
    ({"space": {"lr": {"uniform": [0.1]}}}, r"uniform needs \[low, high\]"),
    ({"space": {"epochs": {"int": [1.5, 4]}}}, "two integers"),
    ({"space": {"epochs": {"uniform": [2, 8]}}}, "epochs = 2.0: input should be a valid integer"),
    ({"space": {"epochs": {"int": [0, 8]}}}, "epochs = 0: input should be greater than or equal to 1"),
    ({"space": {"batch_size": {"choice": []}}}, "non-empty list"),
    ({"space": {"batch_size": {"choice": [32, 32]}}}, "must differ"),
    ({"space": {"arch": {"choice": ["resnet18", "resnet1000"]}}}, "unknown architecture"),
    ({"trials": 0}, "trials = 0"),
    ({"strategy": "grid"}, "strategy = 'grid'"),
    ({"seeed": 1}, "unknown key 'seeed'"),
    ({"early_stopping": {"rule": "mean"}}, "rule = 'mean'"),
    ({"early_stopping": {"warmup_epochs": 0}}, "warmup_epochs = 0"),
    ({"startup_trials": "4"}, "startup_trials = '4'"),
])
def test_a_bad_search_block_fails_with_a_line_that_names_it(block, message):
    grid = {"defaults": {"pretrained": False},
            "search": {"space": {"lr": {"loguniform": [1e-4, 1e-2]}}, "trials": 4, **block}}
    with pytest.raises(ConfigError, match=message) as error:
        plan_grid(grid)
    assert "\n" not in str(error.value)


def test_trial_names_must_not_clash_with_fixed_points():
    grid = {"defaults": {"pretrained": False}, "points": [{"name": "trial-00"}],
            "search": {"space": {"lr": {"uniform": [1e-4, 1e-2]}}, "trials": 2, "strategy": "random"}}
    with pytest.raises(ConfigError, match="unique"):
        plan_grid(grid)
    grid["search"]["prefix"] = "lr"
    assert [i["name"] for i in plan_grid(grid)] == ["trial-00", "lr-00", "lr-01"]


def records(scores: dict[float, float], status="complete") -> list[TrialRecord]:
    """Finished trials: learning rate -> validation accuracy (a flat curve of two epochs)."""
    return [TrialRecord(name=f"t{i}", index=i, params={"lr": lr}, status=status, value=acc, curve=[acc, acc])
            for i, (lr, acc) in enumerate(scores.items())]


LR_ONLY = {"space": {"lr": {"loguniform": [1e-5, 1e-1]}}, "trials": 12, "strategy": "tpe", "startup_trials": 4}


def test_the_adaptive_strategy_draws_from_the_scores_of_the_trials_before():
    tpe = grid_search({"search": LR_ONLY})
    first_batch = [1e-5, 1e-4, 1e-3, 1e-2, 3e-2, 1e-1]
    low_wins = records({lr: 0.9 - 0.1 * k for k, lr in enumerate(first_batch)})
    high_wins = records({lr: 0.4 + 0.1 * k for k, lr in enumerate(first_batch)})
    # the same records, the same draw: trial 6's values depend on the records and the seed alone
    assert suggest(tpe, 6, low_wins) == suggest(tpe, 6, low_wins)
    drawn_low = [suggest(tpe, i, low_wins)[0]["lr"] for i in range(6, 12)]
    drawn_high = [suggest(tpe, i, high_wins)[0]["lr"] for i in range(6, 12)]
    # the second batch follows the first batch's scores: towards the low rates when they scored best
    assert sorted(drawn_low)[3] < 1e-3 < sorted(drawn_high)[2], (drawn_low, drawn_high)
    assert suggest(tpe, 6, low_wins)[1] == 6  # it says how many finished trials it learnt from
    # before startup_trials have finished, it draws at random: the scores do not matter yet
    assert suggest(tpe, 2, low_wins[:2]) == suggest(tpe, 2, high_wins[:2])


def test_running_and_failed_trials_inform_no_score():
    tpe = grid_search({"search": LR_ONLY})
    finished = records({1e-4: 0.5, 1e-3: 0.6, 1e-2: 0.4, 1e-1: 0.2})
    running = [TrialRecord(name="r", index=9, params={"lr": 1e-3})]
    failed = [TrialRecord(name="f", index=8, params={"lr": 1e-5}, status="failed")]
    assert suggest(tpe, 5, finished + failed) == suggest(tpe, 5, finished)
    assert suggest(tpe, 5, finished + running)[1] == 4


def test_early_stopping_stops_a_trial_below_the_median_of_the_finished_ones():
    space = grid_search({"search": LR_ONLY})
    finished = records({1e-4: 0.50, 1e-3: 0.60, 1e-2: 0.40})
    rule = EarlyStopping(warmup_epochs=1, min_trials=3)
    assert should_stop(rule, space, {"lr": 3e-5}, [0.30], finished)  # median after epoch 1 is 0.5
    assert not should_stop(rule, space, {"lr": 3e-5}, [0.55], finished)
    assert not should_stop(rule, space, {"lr": 3e-5}, [0.30, 0.55], finished)  # its best so far counts
    # not before its warm-up epochs, nor before min_trials trials have finished
    assert not should_stop(EarlyStopping(warmup_epochs=2, min_trials=3), space, {"lr": 3e-5}, [0.30], finished)
    assert not should_stop(EarlyStopping(warmup_epochs=1, min_trials=4), space, {"lr": 3e-5}, [0.30], finished)
    # stopped trials are no yardstick: with only them, nothing stops
    stopped = records({1e-4: 0.9, 1e-3: 0.9, 1e-2: 0.9}, status="stopped")
    assert not should_stop(rule, space, {"lr": 3e-5}, [0.30], stopped)


def test_a_warm_start_keeps_only_trials_in_this_search_s_space():
    from bincount.model.search import fitting

    space = grid_search({"search": LR_ONLY})
    kept = fitting(records({1e-3: 0.5, 5.0: 0.9}) + [TrialRecord("x", 9, {"lr": 1e-3, "epochs": 2}, "complete", 0.1)],
                   space)
    assert [r.params for r in kept] == [{"lr": 1e-3}]


class Result:
    """What grid_point's finish reads of a TrainResult."""

    def __init__(self, curve, stopped_after=0):
        self.history = [{"val_accuracy": v} for v in curve]
        self.val_accuracy = max(curve)
        self.stopped_after = stopped_after


def test_a_trial_records_its_values_and_outcome_and_a_retry_keeps_its_values(tmp_path):
    grid = {"defaults": {"pretrained": False, "epochs": 3}, "search": LR_ONLY}
    tpe = grid_search(grid)
    store = TrialStore(str(tmp_path / "run1"))
    item = plan_grid(grid)[5]
    with pytest.raises(RuntimeError), grid_point(item, defaults=grid["defaults"], search=tpe, store=store) as point:
        drawn = point.record.params
        assert point.config.name == "trial-05" and point.config.lr == drawn["lr"] and point.config.epochs == 3
        raise RuntimeError("out of memory")
    assert store.records()["trial-05"].status == "failed"
    # a retry of the task (same store) and a resumed run (the first run's store to resume from) keep the values
    for retry_store in (store, TrialStore(str(tmp_path / "run2"), resume_from=str(tmp_path / "run1"))):
        with grid_point(item, defaults=grid["defaults"], search=tpe, store=retry_store) as point:
            assert point.record.params == drawn
            point.finish(Result([0.3, 0.5], stopped_after=2))
        record = retry_store.records()["trial-05"]
        assert (record.status, record.value, record.curve) == ("stopped", 0.5, [0.3, 0.5])
    on_disk = json.loads((tmp_path / "run2" / "trial-05.json").read_text())
    assert on_disk["params"] == drawn and on_disk["status"] == "stopped"


def test_trial_records_round_trip_through_s3(s3_endpoint, s3_client, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    s3_client.create_bucket(Bucket="search-records")
    store = TrialStore("s3://search-records/runs/7/train")
    for record in records({1e-3: 0.5, 1e-2: 0.6}):
        store.put(record)
    other = TrialStore("s3://search-records/runs/7/train-other")  # a sibling prefix is not this store
    other.put(TrialRecord("z", 0, {"lr": 1.0}))
    assert {n: r.value for n, r in store.records().items()} == {"t0": 0.5, "t1": 0.6}
    assert [r.name for r in store.history(exclude="t0")] == ["t1"]


def test_fit_stops_early_when_asked_and_keeps_the_best_epoch_so_far():
    import torch

    from bincount.model.train import CachedSplit, fit

    torch.manual_seed(0)
    x, y = torch.randint(0, 255, (32, 3, 32, 32), dtype=torch.uint8), torch.randint(0, 3, (32,))
    cfg = TrainConfig(name="t", arch="resnet18", pretrained=False, batch_size=16, epochs=4, image_size=32)
    asked = []
    result = fit(cfg, CachedSplit(x, y), CachedSplit(x[:16], y[:16]), num_classes=3, progress=False,
                 should_stop=lambda r: asked.append(len(r.history)) or len(r.history) == 2)
    assert asked == [1, 2] and result.stopped_after == 2 and len(result.history) == 2
    assert result.best_epoch in (1, 2) and result.state_dict and len(result.val_probabilities) == 16
    # never asked after the last epoch: a trial that ran every epoch did not stop
    full = fit(cfg, CachedSplit(x, y), CachedSplit(x[:16], y[:16]), num_classes=3, progress=False,
               should_stop=lambda r: asked.append(len(r.history)) or False)
    assert full.stopped_after == 0 and asked[2:] == [1, 2, 3]


# --- through the flow ---------------------------------------------------------------

def search_grid(tmp_path, name: str, search_block: dict):
    from conftest import TINY_GRID

    grid = json.loads(TINY_GRID.read_text())
    grid["defaults"].update(epochs=2, image_size=48)
    grid.pop("points")
    grid["search"] = search_block
    grid["select"] = {"ensemble": 2}
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(grid))
    return path, grid


@pytest.fixture(scope="module")
def random_search_run(tmp_path_factory):
    from conftest import run_flow

    block = {"space": {"lr": {"loguniform": [1e-4, 1e-2]}, "batch_size": {"choice": [8, 16]}},
             "trials": 4, "strategy": "random", "seed": 5, "early_stopping": {"warmup_epochs": 1, "min_trials": 2}}
    path, grid = search_grid(tmp_path_factory.mktemp("grids"), "random", block)
    finished = run_flow(grid=path, source="synthetic", per_class=16, deploy_target="none")
    assert finished.status == "successful", finished.output[-4000:]
    return finished, grid


@pytest.mark.flow
def test_a_random_search_runs_its_trials_as_grid_points_and_keeps_them(random_search_run, monkeypatch):
    from metaflow.cards import get_cards

    from bincount.model.grid import grid_search
    from conftest import DATASTORE, card_components, card_text

    finished, grid = random_search_run
    join = finished.run["join"].task.data
    drawn = expand_trials(grid_search(grid))  # what the seed draws, here and in the run
    names = [f"trial-0{i}" for i in range(4)]
    by_name = join.grid_results.set_index("name")
    assert sorted(by_name.index) == names
    for name, params in zip(names, drawn):
        assert by_name.loc[name, "lr"] == params["lr"] and by_name.loc[name, "batch_size"] == params["batch_size"]
    trials = {t["name"]: t for t in join.search_trials}
    assert sorted(trials) == names
    for name, params in zip(names, drawn):
        trial = trials[name]
        assert trial["params"] == params and trial["status"] in ("complete", "stopped")
        assert trial["curve"] == [row["val_accuracy"] for row in join.grid_histories[name]]
        assert trial["value"] == by_name.loc[name, "val_accuracy"]
        stopped = int(by_name.loc[name, "stopped_after"])
        assert (trial["status"] == "stopped") == (stopped > 0) and len(trial["curve"]) == (stopped or 2)
    assert join.chosen in names
    monkeypatch.chdir(DATASTORE)  # local cards live under the working directory's .metaflow
    html = get_cards(finished.run["join"].task, id="report")[0].get()
    text = card_text(html)
    assert "Search: random, 4 trials over lr" in text.replace("*", "")
    components = json.dumps(card_components(html))  # the charts, by their labels
    assert "Parallel coordinates of the hyperparameters" in components
    assert "Validation accuracy against each hyperparameter" in components


@pytest.mark.flow
def test_an_adaptive_search_warm_starts_from_an_earlier_run_s_trials(random_search_run, tmp_path):
    from conftest import run_flow

    earlier, _ = random_search_run
    block = {"space": {"lr": {"loguniform": [1e-4, 1e-2]}, "batch_size": {"choice": [8, 16]}},
             "trials": 2, "strategy": "tpe", "startup_trials": 3, "prefix": "tpe"}
    path, _ = search_grid(tmp_path, "tpe", block)
    finished = run_flow(grid=path, source="synthetic", per_class=16, deploy_target="none",
                        warm_start=earlier.run.id)
    assert finished.status == "successful", finished.output[-4000:]
    assert f"warm start: 4 of the 4 trials of run {earlier.run.id}" in finished.output
    data = finished.run["join"].task.data
    assert len(data.warm_trials) == 4
    trials = sorted(data.search_trials, key=lambda t: t["informed_by"])
    # every trial learnt from the warm start's four; the second to draw from the first's score too
    assert [t["informed_by"] for t in trials] == [4, 5]
    assert sorted(t["name"] for t in trials) == ["tpe-00", "tpe-01"]


@pytest.mark.flow
def test_a_tuner_block_without_sagemaker_compute_fails_at_start(tmp_path):
    from conftest import run_flow

    block = {"space": {"lr": {"loguniform": [1e-4, 1e-2]}}, "trials": 2, "tuner": {"max_parallel_jobs": 2}}
    path, _ = search_grid(tmp_path, "tuner", block)
    finished = run_flow(grid=path, source="synthetic", per_class=4, deploy_target="none")
    assert finished.status == "failed"
    assert "has a tuner block, which runs SageMaker's tuner: use it with the sagemaker compute config" \
        in finished.output
    assert [step.id for step in finished.run] == ["start"]  # nothing fetched, nothing trained


def test_the_join_card_shows_each_trial_s_values_outcome_and_the_search():
    import pandas as pd

    from bincount.flow import cards

    results = pd.DataFrame([
        {"name": "trial-01", "lr": 3e-3, "batch_size": 16, "epochs": 4, "val_accuracy": 0.6, "val_loss": 1.0,
         "best_epoch": 4, "stopped_after": 0},
        {"name": "trial-00", "lr": 1e-4, "batch_size": 8, "epochs": 4, "val_accuracy": 0.4, "val_loss": 1.3,
         "best_epoch": 1, "stopped_after": 2},
        {"name": "trial-02", "lr": 1e-2, "batch_size": 8, "epochs": 4, "val_accuracy": 0.5, "val_loss": 1.2,
         "best_epoch": 3, "stopped_after": 0}])
    table = cards.grid_table(results, "trial-01")
    assert list(table["outcome"]) == ["every epoch", "stopped after epoch 2 of 4", "every epoch"]
    assert {"lr", "batch_size"} <= set(table.columns) and "epochs" not in table.columns  # what varies
    assert cards.parallel_coordinates(results, "trial-01", {"lr"}) is not None
    assert cards.parallel_coordinates(results[["name", "lr", "val_accuracy"]], "trial-01") is None  # one axis
    search = grid_search({"search": {**LR_ONLY, "early_stopping": {"warmup_epochs": 2}}})
    trials = [{"status": "complete"}, {"status": "stopped"}, {"status": "complete"}, {"status": "failed"}]
    text = cards.search_text(search, trials, [{"run_id": "17"}] * 5)
    assert "**tpe**, 12 trials over lr" in text and "2 trained every epoch, 1 stopped early" in text
    assert "1 failed" in text and "Warm-started from 5 trials of run 17" in text
