"""Where the train step runs, and how hard the steps try: a Metaflow Config that decorates
steps, not code edits.

    {"compute": "batch", "gpu": 1, "memory": 60000, "image": "<ecr>/bincount:latest",
     "batch": {"queue": "gpu-queue"}, "retries": 2, "timeouts_s": {"train": 43200}}

``compute`` is one of ``local`` (the default: nothing added), ``batch`` or
``kubernetes`` (Metaflow's ``@batch`` / ``@kubernetes`` on the steps named in
``steps``, by default only ``train``), or ``sagemaker`` (the train step itself
stays where the flow runs and launches one SageMaker training job per grid point;
see bincount.sagemaker.training). The engine's own block (``batch``,
``kubernetes`` or ``sagemaker``) passes through to its decorator or job settings
unchanged, so a misspelt argument fails when the flow is parsed (`show`, `run`),
not in the cloud.

``retries`` (default 1) puts ``@retry`` on the steps that download or train (fetch_subset,
train): a retried train step continues from its grid point's last checkpoint. ``timeouts_s``
bounds the steps that talk to the network or train, so that a hung call ends as a failure
(and a retry) rather than a stuck run: ``@timeout`` on fetch_subset, evaluate and deploy; the
train step's limit is applied by the training itself (bincount.model.train.time_limit), from
when it holds the machine's training lock, so that waiting for other grid points to train on
the same machine does not count against it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Annotated, Literal

from metaflow import FlowMutator
from pydantic import Field
from pydantic import dataclasses as checked

from bincount.validation import STRICT, ConfigError, build

ENGINES = ("local", "batch", "kubernetes", "sagemaker")
DECORATED = ("batch", "kubernetes")  # engines that are a Metaflow step decorator
Count = Annotated[int, Field(ge=0)]
Seconds = Annotated[int, Field(ge=1)]
RETRIED_STEPS = ("fetch_subset", "train")  # a failed attempt costs a download or an epoch, not the run


@checked.dataclass(frozen=True, config=STRICT)
class Timeouts:
    """Seconds each step may take before it fails (and is retried where it retries)."""

    fetch_subset: Seconds = 6 * 3600
    train: Seconds = 24 * 3600  # one grid point, from when it holds the training lock
    evaluate: Seconds = 2 * 3600
    deploy: Seconds = 2 * 3600  # a SageMaker endpoint takes minutes to create, and a rollback as long again


@checked.dataclass(frozen=True, config=STRICT)
class ComputeFile:
    """The compute config as written, checked for types and ranges; how its keys relate is
    checked in :meth:`ComputeConfig.from_dict`, and the engine's block by its engine."""

    compute: Literal["local", "batch", "kubernetes", "sagemaker"] = "local"
    steps: list[str] = field(default_factory=lambda: ["train"])
    cpu: Count | None = None
    gpu: Count | None = None
    memory: Count | None = None  # MB
    image: str | None = None
    batch: dict | None = None
    kubernetes: dict | None = None
    sagemaker: dict | None = None
    retries: Count = 1
    timeouts_s: dict | None = None  # step -> seconds (Timeouts)


@dataclass(frozen=True)
class ComputeConfig:
    compute: str = "local"
    steps: tuple[str, ...] = ("train",)
    cpu: int | None = None
    gpu: int | None = None
    memory: int | None = None  # MB
    image: str | None = None
    engine_settings: dict = field(default_factory=dict)  # the block named after the engine
    retries: int = 1
    timeouts: Timeouts = field(default_factory=Timeouts)

    @classmethod
    def from_dict(cls, d: Mapping | None) -> "ComputeConfig":
        f = build(ComputeFile, dict(d or {}), "compute config")
        engine = f.compute
        stray = [e for e in ENGINES[1:] if getattr(f, e) is not None and e != engine]
        if stray:
            raise ConfigError(f"compute config: block {stray} given but 'compute' is {engine!r}")
        if engine == "sagemaker" and f.steps != ["train"]:
            raise ConfigError("compute config: sagemaker runs training jobs, so 'steps' must be [\"train\"]")
        if engine == "sagemaker" and any(v is not None for v in (f.cpu, f.gpu, f.memory)):
            raise ConfigError("compute config: a SageMaker job's cores, GPUs and memory come from its "
                              "instance type: set sagemaker.instance_type (e.g. ml.g5.xlarge) instead")
        return cls(compute=engine, steps=tuple(f.steps), cpu=f.cpu, gpu=f.gpu, memory=f.memory, image=f.image,
                   engine_settings=dict(getattr(f, engine, None) or {}) if engine != "local" else {},
                   retries=f.retries, timeouts=build(Timeouts, f.timeouts_s or {}, "compute config timeouts_s"))

    def decorator_kwargs(self) -> dict:
        """Arguments of ``@batch`` / ``@kubernetes``: the common resources, then the engine's block."""
        common = {"cpu": self.cpu, "gpu": self.gpu, "memory": self.memory, "image": self.image}
        return {**{k: v for k, v in common.items() if v is not None}, **self.engine_settings}

    def sagemaker_settings(self):
        """The training jobs' settings, checked (a missing role or bucket fails here, before any training)."""
        from bincount.sagemaker.training import settings_from_config

        image = {"image_uri": self.image} if self.image else {}
        return settings_from_config({**image, **self.engine_settings})

    def describe(self) -> str:
        if self.compute == "local":
            return "local"
        if self.compute == "sagemaker":
            settings = self.sagemaker_settings()
            return (f"a SageMaker training job per grid point on {settings.instance_count} x "
                    f"{settings.instance_type}{' (spot)' if settings.use_spot else ''}")
        where = ", ".join(f"{k}={v}" for k, v in self.decorator_kwargs().items())
        return f"{self.compute} ({where}) for steps {list(self.steps)}"


class compute_from_config(FlowMutator):
    """Decorate the steps named in a compute Config with ``@batch`` or ``@kubernetes``, and
    the flow's steps with the config's ``@retry`` and ``@timeout`` (those it has).

    Applied to the flow class as ``@compute_from_config("compute")``, naming the
    Config. It runs when Metaflow reads the configs, before any step runs, so a
    local run with the default config gets no decorator at all (``@batch`` in code
    would make every local run demand an S3 datastore).
    """

    def init(self, config_name: str = "compute"):
        self.config_name = config_name

    def pre_mutate(self, mutable_flow) -> None:
        from metaflow.exception import MetaflowException

        try:
            cfg = ComputeConfig.from_dict(getattr(mutable_flow, self.config_name).to_dict())
        except ValueError as e:  # Metaflow prints its own exceptions as a message, not a traceback
            raise MetaflowException(str(e)) from e
        steps = dict(mutable_flow.steps)
        missing = [s for s in cfg.steps if s not in steps]
        if missing:
            raise MetaflowException(f"compute config: no step named {missing}; the flow has {sorted(steps)}")
        for name in RETRIED_STEPS:
            if name in steps:
                steps[name].add_decorator("retry", deco_kwargs={"times": cfg.retries},
                                          duplicates=steps[name].OVERRIDE)
        for name, seconds in asdict(cfg.timeouts).items():
            if name in steps and name != "train":  # the train step's limit is the training's own: see above
                steps[name].add_decorator("timeout", deco_kwargs={"seconds": seconds},
                                          duplicates=steps[name].OVERRIDE)
        if cfg.compute not in DECORATED:
            return
        check_decorator_arguments(cfg.compute, cfg.decorator_kwargs())
        for name in cfg.steps:
            # OVERRIDE: the config wins over a decorator of the same engine already on the step.
            steps[name].add_decorator(cfg.compute, deco_kwargs=cfg.decorator_kwargs(),
                                      duplicates=steps[name].OVERRIDE)


def check_decorator_arguments(engine: str, kwargs: dict) -> None:
    """Raise Metaflow's own error for an argument ``@batch``/``@kubernetes`` does not have.

    ``MutableStep.add_decorator`` copies keyword arguments in without the check a
    decorator in code gets, so without this a typo would surface only when the
    task starts in the cloud (or never).
    """
    from metaflow.plugins import STEP_DECORATORS

    decorator = next(d for d in STEP_DECORATORS if d.name == engine)
    decorator(attributes=kwargs)


def train_branch(compute, cfg, photos: Mapping[str, bytes], split_table, classes: list[int], *, seed: int,
                 job_prefix: str, cache_bytes: int | None = None, checkpoints=None, on_epoch=None,
                 should_stop=None, job: str | None = None, log=print):
    """Train one grid point where the compute config says: in this process (local, and on
    Batch or Kubernetes, where this process already is the remote task, reading the run's
    shards from S3) or as a SageMaker job. ``cache_bytes``, ``checkpoints`` and ``on_epoch``:
    see ``train_on_split`` (a SageMaker job checkpoints to S3 itself, and starts from
    ``checkpoints``' last state); ``log`` takes a SageMaker job's status and log lines.
    ``should_stop``: early stopping, which runs in the training process, so not in a SageMaker job.
    ``job``: a SageMaker training job that already ran this point (a tuning job's trial): bring it back."""
    compute = compute if isinstance(compute, ComputeConfig) else ComputeConfig.from_dict(compute)
    if job is not None:
        from bincount.sagemaker.training import adopt_training_job

        return adopt_training_job(job, compute.sagemaker_settings(), log=log).result
    if compute.compute == "sagemaker":
        if should_stop is not None:
            raise ValueError("early stopping runs in the training process and a SageMaker job is another "
                             "machine: remove the search's early_stopping, or train locally, on Batch or Kubernetes")
        from bincount.sagemaker.training import train_on_sagemaker

        return train_on_sagemaker(cfg, photos, split_table, classes, seed=seed,
                                  settings=compute.sagemaker_settings(), job_prefix=job_prefix,
                                  cache_bytes=cache_bytes, checkpoints=checkpoints, log=log)
    from bincount.model.train import train_on_split

    return train_on_split(cfg, photos, split_table, classes, seed=seed, cache_bytes=cache_bytes,
                          checkpoints=checkpoints, timeout_s=compute.timeouts.train, on_epoch=on_epoch,
                          should_stop=should_stop)
