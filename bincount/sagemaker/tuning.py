"""A grid's search handed to SageMaker's own tuner (SDK v3 ``HyperparameterTuner``).

With the sagemaker compute config and a ``"tuner"`` block in the grid's search::

    "search": {"space": {"lr": {"loguniform": [1e-5, 1e-2]}, "epochs": {"int": [5, 20]}},
               "trials": 20, "seed": 0,
               "tuner": {"max_parallel_jobs": 4, "strategy": "Bayesian", "early_stopping": true}}

the flow's split step uploads the training and validation photos once, and starts one
hyperparameter tuning job over the training job bincount already launches (the same
``ModelTrainer``: image, instances, code, the grid's defaults as static hyperparameters).
SageMaker reads each job's score from its log lines (:data:`METRIC_DEFINITIONS`, which match
the epoch lines ``fit`` prints and the entry point's last line, the best epoch's), chooses the
next values by its strategy, runs ``max_parallel_jobs`` at a time and, with early stopping,
stops jobs that trail the median. When the tuning job ends, every training job it ran comes
back as one train task of the flow (:func:`tuning_trials`), which brings back its model and
curves (``bincount.sagemaker.training.adopt_training_job``) like a job of its own, so the
join sees every trial as a grid result.

Tuned jobs share one job definition, so they cannot each have a checkpoint folder of their
own: they run without checkpoints (a spot interruption restarts a trial from its first epoch).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping

from bincount.sagemaker.training import (SageMakerTrainingError, _aws_call, aws_session, settings_from_config,
                                         staged_job)

OBJECTIVE = "validation:accuracy"
# SageMaker takes a metric's value from the first group of its regex, on every log line that
# matches. fit prints "<name> epoch 3/8: train loss 1.2 acc 0.5 | val loss 1.6 acc 0.30 | 70 img/s"
# after each epoch (what early stopping compares); the entry point's last line, "bincount training
# job: best epoch 3, val accuracy 0.304, ...", makes the final value the best epoch's, which is
# the weights the job keeps. tests/test_sagemaker_tuning.py checks both against real output.
METRIC_DEFINITIONS = [
    {"Name": OBJECTIVE, "Regex": r"val(?: loss \S+)? acc(?:uracy)? ([0-9]*\.?[0-9]+)"},
    {"Name": "validation:loss", "Regex": r"val loss ([0-9]*\.?[0-9]+(?:e[-+]?[0-9]+)?)"},
]
TUNING_TERMINAL = {"Completed", "Failed", "Stopped"}
TUNING_NAME_MAX = 32  # SageMaker's limit on a tuning job's name


def encode_value(value) -> str:
    """A categorical value as the tuner sends it: text, JSON-encoded where it is not a string."""
    return value if isinstance(value, str) else json.dumps(value)


def parameter_ranges(search) -> dict:
    """The search's space as the SDK's ranges: log-uniform is a logarithmic continuous range."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution
    from sagemaker.core.parameter import CategoricalParameter, ContinuousParameter, IntegerParameter

    ranges = {}
    for name, dist in search.distributions.items():
        if isinstance(dist, CategoricalDistribution):
            ranges[name] = CategoricalParameter([encode_value(v) for v in dist.choices])
        elif isinstance(dist, FloatDistribution):
            ranges[name] = ContinuousParameter(dist.low, dist.high,
                                               scaling_type="Logarithmic" if dist.log else "Linear")
        else:
            ranges[name] = IntegerParameter(dist.low, dist.high)
    return ranges


def decode_tuned(search, tuned: Mapping[str, str]) -> dict:
    """A training job's TunedHyperParameters (text) as the search's values (numbers, choices)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    values = {}
    for name, dist in search.distributions.items():
        text = str(tuned[name]).strip('"')
        if isinstance(dist, CategoricalDistribution):
            values[name] = next(c for c in dist.choices if encode_value(c).strip('"') == text)
        elif isinstance(dist, FloatDistribution):
            values[name] = float(text)
        else:
            values[name] = int(float(text))
    return values


def make_tuner(search, trainer, *, base: str):
    """The SDK's HyperparameterTuner for the search over ``trainer``'s job."""
    from sagemaker.train.tuner import HyperparameterTuner

    tuner = search.tuner
    return HyperparameterTuner(
        model_trainer=trainer, objective_metric_name=OBJECTIVE, objective_type="Maximize",
        metric_definitions=METRIC_DEFINITIONS, hyperparameter_ranges=parameter_ranges(search),
        strategy=tuner.strategy, max_jobs=search.trials, max_parallel_jobs=tuner.max_parallel_jobs,
        early_stopping_type="Auto" if tuner.early_stopping else "Off",
        random_seed=search.seed or None, base_tuning_job_name=base[:TUNING_NAME_MAX - 15])


def launch_tuning_job(search, base_cfg, photos: Mapping[str, bytes], split_table, classes: list[int], *, seed: int,
                      settings, job_prefix: str, session=None, cache_bytes: int | None = None,
                      log: Callable[[str], None] = print) -> str:
    """Upload the training and validation photos once and start the tuning job; return its name.
    ``base_cfg``: the grid's defaults as a TrainConfig (the static hyperparameters)."""
    settings = settings_from_config(settings)
    session = session or aws_session(settings.region)
    with staged_job(base_cfg, photos, split_table, classes, seed=seed, settings=settings, job_prefix=job_prefix,
                    session=session, cache_bytes=cache_bytes, checkpointed=False, log=log) as staged:
        tuner = make_tuner(search, staged.trainer, base=staged.base)
        _aws_call("creating the hyperparameter tuning job", tuner.tune, inputs=staged.inputs, wait=False)
    name = tuner.latest_tuning_job.hyper_parameter_tuning_job_name
    log(f"started SageMaker hyperparameter tuning job {name}: {search.trials} trials, "
        f"{search.tuner.max_parallel_jobs} at a time, {search.tuner.strategy}"
        f"{', early stopping' if search.tuner.early_stopping else ''}; photos in {staged.channel_uri}")
    return name


def wait_for_tuning_job(sagemaker, name: str, *, timeout_s: float, poll_s: float = 60,
                        log: Callable[[str], None] = print) -> dict:
    """Poll the tuning job until it ends; print its job counts when they change; stop it at the limit."""
    deadline, last = time.monotonic() + timeout_s, None
    while True:
        job = _aws_call(f"checking tuning job {name}", sagemaker.describe_hyper_parameter_tuning_job,
                        HyperParameterTuningJobName=name)
        status = job.get("HyperParameterTuningJobStatus")
        counts = job.get("TrainingJobStatusCounters") or {}
        state = (status, tuple(sorted(counts.items())))
        if state != last:
            log(f"tuning job {name}: {status}, training jobs {dict(counts) or 'none yet'}")
            last = state
        if status in TUNING_TERMINAL:
            if status == "Failed":
                raise SageMakerTrainingError(f"tuning job {name} failed: {job.get('FailureReason', 'no reason given')}")
            return job
        if time.monotonic() >= deadline:
            _aws_call(f"stopping tuning job {name}", sagemaker.stop_hyper_parameter_tuning_job,
                      HyperParameterTuningJobName=name)
            raise SageMakerTrainingError(f"tuning job {name} still {status} after {timeout_s:.0f} s; asked "
                                         "SageMaker to stop it")
        time.sleep(poll_s)


def tuning_trials(sagemaker, name: str, search, defaults: dict) -> list[dict]:
    """Every training job of the tuning job as a train foreach item (bincount.model.grid.plan_grid's
    shape, plus ``job``): named ``<prefix>-NN`` in the order SageMaker started them, with the values
    the tuner gave it and the grid's defaults."""
    from bincount.model.grid import trial_config

    pages = sagemaker.get_paginator("list_training_jobs_for_hyper_parameter_tuning_job").paginate(
        HyperParameterTuningJobName=name)
    jobs = sorted((j for page in pages for j in page.get("TrainingJobSummaries", [])),
                  key=lambda j: (j.get("CreationTime") or 0, j["TrainingJobName"]))
    items = []
    for index, job in enumerate(jobs):
        trial = search.trial_name(index)
        params = decode_tuned(search, job.get("TunedHyperParameters") or {})
        config = trial_config(defaults, {**params, "name": trial}, f"tuning job {name} trial {trial}")
        items.append({"name": trial, "config": config.as_dict(), "trial": index, "params": params,
                      "job": job["TrainingJobName"], "job_status": job.get("TrainingJobStatus")})
    return items


def tune_on_sagemaker(search, defaults: dict, photos: Mapping[str, bytes], split_table, classes: list[int], *,
                      seed: int, settings, job_prefix: str, cache_bytes: int | None = None, poll_s: float = 60,
                      log: Callable[[str], None] = print) -> list[dict]:
    """Run the search as a SageMaker tuning job, wait for it, and return its trials as foreach items."""
    from bincount.model.grid import trial_config

    settings = settings_from_config(settings)
    session = aws_session(settings.region)
    base_cfg = trial_config(defaults, {"name": search.prefix}, "the grid's defaults")
    name = launch_tuning_job(search, base_cfg, photos, split_table, classes, seed=seed, settings=settings,
                             job_prefix=job_prefix, session=session, cache_bytes=cache_bytes, log=log)
    sagemaker = session.client("sagemaker")
    limit = search.tuner.max_runtime_s or settings.wait_limit_s * -(-search.trials // search.tuner.max_parallel_jobs)
    wait_for_tuning_job(sagemaker, name, timeout_s=limit, poll_s=poll_s, log=log)
    return tuning_trials(sagemaker, name, search, defaults)
