"""Hyperparameter search: a space of ranges sampled into trials, and a rule that stops hopeless ones.

A grid's ``search`` block, beside (or instead of) its fixed points::

    "search": {"space": {"lr": {"loguniform": [1e-5, 1e-2]},
                         "frozen_blocks": {"int": [0, 5]},
                         "label_smoothing": {"uniform": [0.0, 0.2]},
                         "batch_size": {"choice": [32, 64, 128]}},
               "trials": 12, "strategy": "tpe", "seed": 0,
               "early_stopping": {"rule": "median", "warmup_epochs": 2}}

Each trial is the grid's defaults updated by its sampled values, validated like a fixed point
(bincount.model.grid, which reads this block: this module knows ranges, not training settings).
The samplers and the stopping rule are Optuna's (``RandomSampler``, ``QMCSampler``,
``TPESampler``, ``MedianPruner``); bincount keeps the trials themselves, as small JSON
records (:class:`TrialRecord`) in the run's own storage, and rebuilds an in-memory Optuna
study from them whenever it asks for a trial's values or whether to stop it. So the trials
of one search can run as separate tasks, on separate machines, with no database between them.

Strategies:

- ``random`` and ``quasi-random`` (scrambled Sobol): every trial's values are drawn when the
  flow starts, the same for the same seed, and expanded into the train foreach like fixed points.
- ``tpe`` (Optuna's tree-structured Parzen estimator): a trial draws its values when it starts
  training, from every trial finished before it (and from a warm start's). The first
  ``startup_trials`` are drawn at random, like a first batch; after that each draw models the
  scores so far. Trials still running count as scoring badly where they are (``constant_liar``),
  so trials that start together do not all draw the same values.

With a ``tuner`` block (and the sagemaker compute config) SageMaker's own tuner draws and
stops the trials instead: bincount.sagemaker.tuning.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Annotated, Literal

from pydantic import Field
from pydantic.dataclasses import dataclass as checked

from bincount.validation import STRICT, ConfigError, build

RANGE_KINDS = ("loguniform", "uniform", "int", "choice")
STRATEGIES = ("random", "quasi-random", "tpe")
EXPANDED = ("random", "quasi-random")  # drawn when the flow starts; tpe draws as trials start


@checked(frozen=True, config=STRICT)
class EarlyStopping:
    """Stop a trial after an epoch where its best validation accuracy so far is below the median of
    the finished trials' at the same epoch (Optuna's MedianPruner): its weights so far are kept and
    it competes in the join like any trial; its remaining epochs go to more promising ones."""

    rule: Literal["median"] = "median"
    warmup_epochs: Annotated[int, Field(ge=1)] = 1  # no trial stops before it has trained this many epochs
    min_trials: Annotated[int, Field(ge=1)] = 3  # nothing stops until this many trials have finished


@checked(frozen=True, config=STRICT)
class TunerConfig:
    """Hand the search to SageMaker's own tuner (bincount.sagemaker.tuning; the sagemaker compute config)."""

    max_parallel_jobs: Annotated[int, Field(ge=1)] = 2
    strategy: Literal["Bayesian", "Random", "Hyperband"] = "Bayesian"
    early_stopping: bool = False  # SageMaker's "Auto": it stops jobs that trail the median
    max_runtime_s: Annotated[int, Field(ge=60)] | None = None  # the whole tuning job


@checked(frozen=True, config=STRICT)
class SearchFile:
    """The ``search`` block as written (its space and early_stopping are checked on their own)."""

    space: dict
    trials: Annotated[int, Field(ge=1, le=10_000)]
    strategy: Literal["random", "quasi-random", "tpe"] = "quasi-random"
    seed: int = 0
    startup_trials: Annotated[int, Field(ge=1)] | None = None  # tpe: drawn at random before it models
    early_stopping: dict | None = None
    prefix: Annotated[str, Field(min_length=1)] = "trial"  # trials are named <prefix>-00, <prefix>-01, ...
    tuner: dict | None = None


@dataclass(frozen=True)
class Search:
    """A checked search block: the space as Optuna distributions, and how to draw from it."""

    space: dict  # hyperparameter -> its range as written ({"loguniform": [lo, hi]}, ...)
    trials: int
    strategy: str
    seed: int
    startup_trials: int
    early_stopping: EarlyStopping | None
    prefix: str
    tuner: TunerConfig | None = None

    @property
    def distributions(self) -> dict:
        return {name: distribution(name, spec) for name, spec in self.space.items()}

    @property
    def expanded(self) -> bool:
        return self.strategy in EXPANDED and self.tuner is None

    def trial_name(self, index: int) -> str:
        return f"{self.prefix}-{index:0{max(2, len(str(self.trials - 1)))}d}"

    def log_scaled(self) -> set[str]:
        """The hyperparameters searched on a log scale (their charts' axes are too)."""
        return {name for name, spec in self.space.items() if "loguniform" in spec}


def distribution(name: str, spec):
    """One range of the space as an Optuna distribution; a ConfigError names what is wrong with it."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    where = f"search space {name!r}"
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in RANGE_KINDS:
        raise ConfigError(f"{where}: expected one of {{\"loguniform\": [low, high]}}, {{\"uniform\": [low, high]}}, "
                          f"{{\"int\": [low, high]}} or {{\"choice\": [a, b, ...]}}, got {json.dumps(spec)}")
    kind, args = next(iter(spec.items()))
    if kind == "choice":
        if not isinstance(args, list) or not args:
            raise ConfigError(f"{where}: choice needs a non-empty list of values, got {json.dumps(args)}")
        if not all(v is None or isinstance(v, (bool, int, float, str)) for v in args):
            raise ConfigError(f"{where}: choice values must be numbers, strings, true/false or null")
        if len({json.dumps(v) for v in args}) != len(args):
            raise ConfigError(f"{where}: choice values must differ, got {json.dumps(args)}")
        return CategoricalDistribution(tuple(args))
    number = int if kind == "int" else (int, float)
    if (not isinstance(args, list) or len(args) != 2
            or not all(isinstance(v, number) and not isinstance(v, bool) for v in args)):
        what = "two integers" if kind == "int" else "two numbers"
        raise ConfigError(f"{where}: {kind} needs [low, high], {what}, got {json.dumps(args)}")
    low, high = args
    if not (math.isfinite(low) and math.isfinite(high)) or not low < high:
        raise ConfigError(f"{where}: {kind} needs low < high, got [{low}, {high}]")
    if kind == "int":
        return IntDistribution(low, high)
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"{where}: loguniform needs low > 0, got {low}")
    return FloatDistribution(float(low), float(high), log=kind == "loguniform")


def parse_search(block, searchable: set[str], check: Callable[[dict, str], object]) -> Search:
    """The grid's ``search`` block, checked: its keys and types, each range (``searchable`` names the
    training keys a range may be given for), and, through ``check(values, where)`` (which raises for
    values that make no valid trial with the grid's defaults), both ends of every range and every choice."""
    if not isinstance(block, dict):
        raise ConfigError(f"grid: search must be an object {{...}}, got {block!r}")
    f = build(SearchFile, block, "grid search")
    if not f.space:
        raise ConfigError("grid search: space is empty; name at least one hyperparameter and its range")
    unknown = sorted(set(f.space) - set(searchable))
    if unknown:
        raise ConfigError(f"grid search space: unknown hyperparameters {unknown}; known: {sorted(searchable)}")
    stopping = (build(EarlyStopping, f.early_stopping, "grid search early_stopping")
                if f.early_stopping is not None else None)
    tuner = build(TunerConfig, f.tuner, "grid search tuner") if f.tuner is not None else None
    local_only = sorted({"strategy", "startup_trials", "early_stopping"} & set(block))
    if tuner is not None and local_only:
        raise ConfigError(f"grid search: {local_only} are bincount's own search settings; with a tuner block "
                          "SageMaker's tuner draws and stops the trials (tuner.strategy, tuner.early_stopping)")
    search = Search(space=dict(f.space), trials=f.trials, strategy=f.strategy, seed=f.seed,
                    startup_trials=f.startup_trials or max(2, min(10, f.trials // 3)),
                    early_stopping=stopping, prefix=f.prefix, tuner=tuner)
    for name, dist in search.distributions.items():
        for value in _extremes(dist):
            check({name: value}, f"search space {name!r} at {value!r}")
    return search


def _extremes(dist) -> list:
    from optuna.distributions import CategoricalDistribution

    return list(dist.choices) if isinstance(dist, CategoricalDistribution) else [dist.low, dist.high]


# --- drawing values -----------------------------------------------------------------

def _quiet_optuna():
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # it logs every trial at INFO
    return optuna


def _sampler(search: Search, seed: int):
    optuna = _quiet_optuna()
    if search.strategy == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if search.strategy == "quasi-random":
        # Optuna's QMC draws its first trial at random (it learns the space from it), then Sobol points.
        with warnings.catch_warnings():  # "experimental" since Optuna 3.0, and our tests pin what it does
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.QMCSampler(qmc_type="sobol", scramble=True, seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=search.startup_trials, constant_liar=True,
                                      multivariate=True)


def expand_trials(search: Search) -> list[dict]:
    """Every trial's values, for the strategies drawn up front: the same for the same seed."""
    optuna = _quiet_optuna()
    study = optuna.create_study(direction="maximize", sampler=_sampler(search, search.seed))
    return [study.ask(search.distributions).params for _ in range(search.trials)]


# --- the trials of a search, as records ----------------------------------------------

STATUSES = ("running", "complete", "stopped", "failed")


@dataclass
class TrialRecord:
    """What the search keeps of one trial (a JSON object in the run's storage, and in the join's
    ``search_trials`` artifact): its values, its validation curve and how it ended."""

    name: str
    index: int
    params: dict
    status: str = "running"  # running, complete, stopped (early), failed
    value: float | None = None  # best validation accuracy
    curve: list = field(default_factory=list)  # validation accuracy after each epoch
    informed_by: int = 0  # finished trials the sampler saw when it drew these values (tpe)
    run_id: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrialRecord":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    @property
    def finished(self) -> bool:
        return self.status in ("complete", "stopped")


def _frozen(record: TrialRecord, distributions: dict):
    """``record`` as an Optuna trial of this space, or None where it does not fit it (a warm start
    from another space, a failed trial)."""
    from optuna.trial import TrialState, create_trial

    if set(record.params) != set(distributions) or record.status == "failed":
        return None
    best, so_far = -math.inf, {}
    for epoch, accuracy in enumerate(record.curve, start=1):  # stopping compares bests so far
        best = max(best, accuracy)
        so_far[epoch] = best
    state = {"running": TrialState.RUNNING, "complete": TrialState.COMPLETE, "stopped": TrialState.PRUNED}
    try:  # create_trial checks that every value lies in its range
        return create_trial(params=record.params, distributions=distributions, state=state[record.status],
                            value=record.value if record.status == "complete" else None,
                            intermediate_values=so_far)
    except ValueError:
        return None


def fitting(records: list[TrialRecord], search: Search) -> list[TrialRecord]:
    """The records whose values lie in this search's space (what a warm start can learn from)."""
    distributions = search.distributions
    return [r for r in records if _frozen(r, distributions) is not None]


def _study(search: Search, history: list[TrialRecord], *, sampler=None, pruner=None):
    optuna = _quiet_optuna()
    study = optuna.create_study(direction="maximize", sampler=sampler, pruner=pruner)
    distributions = search.distributions
    for record in sorted(history, key=lambda r: (r.run_id or "", r.index)):  # the same study for the same records
        trial = _frozen(record, distributions)
        if trial is not None:
            study.add_trial(trial)
    return study


def suggest(search: Search, index: int, history: list[TrialRecord]) -> tuple[dict, int]:
    """The values of trial ``index`` of an adaptive search, given the trials recorded so far
    (finished, running, and a warm start's), and how many finished trials informed them. The same
    records give the same values: each trial's sampler is seeded by the search seed and its index."""
    study = _study(search, history, sampler=_sampler(search, search.seed * 100_003 + index))
    trial = study.ask(search.distributions)
    return trial.params, sum(1 for r in history if r.finished)


def should_stop(rule: EarlyStopping, search: Search, params: dict, curve: list[float],
                history: list[TrialRecord]) -> bool:
    """Whether a trial with these values and this validation curve so far (accuracy per epoch) should
    stop, judged against the finished trials in ``history`` (Optuna's MedianPruner)."""
    optuna = _quiet_optuna()
    pruner = optuna.pruners.MedianPruner(n_startup_trials=rule.min_trials, n_warmup_steps=rule.warmup_epochs)
    study = _study(search, [r for r in history if r.finished], pruner=pruner)
    study.enqueue_trial(params)
    trial = study.ask(search.distributions)
    best = -math.inf
    for epoch, accuracy in enumerate(curve, start=1):
        best = max(best, accuracy)  # judged on its best so far, as the join judges it
        trial.report(best, epoch)
    return trial.should_prune()
