"""The flow's side of a hyperparameter search: the trials a train task draws from and records to,
and the trials of an earlier run that a ``--warm-start`` learns from."""

from __future__ import annotations

from bincount.flow.runs import RunNotFound, get_run


def trial_settings(flow, current, compute) -> dict:
    """Keyword arguments of :func:`bincount.model.trials.grid_point` for the running train task."""
    from bincount.flow.storage import trials_for
    from bincount.model.grid import grid_search
    from bincount.model.train import machine_lock

    grid = flow.grid.to_dict()
    search = grid_search(grid)
    return {"defaults": grid.get("defaults", {}), "search": search,
            "store": trials_for(flow, current, flow.warm_trials) if search else None,
            "run_id": current.run_id,
            # On one machine an adaptive trial draws once it holds the training lock: after the trials
            # before it have finished. A SageMaker job trains elsewhere, so no lock there.
            "lock": None if compute.compute == "sagemaker" else machine_lock}


def warm_trials(grid: dict, compute, warm_start: str) -> list[dict]:
    """Check that the grid's search can run with this compute config and ``--warm-start``; return
    the trials of run ``warm_start``'s search (its join's ``search_trials``) that lie in this
    search's space, as records, for every trial to learn from."""
    from bincount.model.grid import grid_search
    from bincount.model.search import TrialRecord, fitting

    search = grid_search(grid)
    if search is not None and search.tuner and compute.compute != "sagemaker":
        raise ValueError("the grid's search has a tuner block, which runs SageMaker's tuner: use it with the "
                         "sagemaker compute config (--config compute ...), or remove the block")
    if search is not None and search.early_stopping and compute.compute == "sagemaker":
        raise ValueError("the grid's search stops trials early, which runs in the training process; with "
                         "the sagemaker compute config remove search.early_stopping")
    if not warm_start:
        return []
    if search is None:
        raise ValueError(f"--warm-start {warm_start}: the grid has no search block to warm-start")
    run = get_run(warm_start)
    try:
        records = run["join"].task.data.search_trials
    except (KeyError, AttributeError):
        raise RunNotFound(f"--warm-start {warm_start}: run {run.pathspec} has no search_trials (it searched "
                          "nothing, or did not reach its join)") from None
    records = [TrialRecord.from_dict({**r, "run_id": r.get("run_id") or warm_start}) for r in records]
    kept = fitting(records, search)
    print(f"warm start: {len(kept)} of the {len(records)} trials of run {warm_start} lie in this search's space "
          "and inform its trials", flush=True)
    return [r.to_dict() for r in kept]


def tuned_trials(flow, current) -> list[dict]:
    """Where the grid's search has a tuner block: run it as a SageMaker tuning job on the run's
    training and validation photos, and return its trials as train foreach items; else nothing."""
    from bincount.flow.compute import ComputeConfig
    from bincount.flow.runs import photos_in
    from bincount.model.grid import grid_search

    grid = flow.grid.to_dict()
    search = grid_search(grid)
    if search is None or search.tuner is None:
        return []
    from bincount.sagemaker.tuning import tune_on_sagemaker

    compute = ComputeConfig.from_dict(flow.compute.to_dict())
    return tune_on_sagemaker(search, grid.get("defaults", {}), photos_in(flow), flow.split_table, flow.class_list,
                             seed=flow.seed, settings=compute.sagemaker_settings(),
                             job_prefix=f"{current.flow_name}-{current.run_id}-tune",
                             cache_bytes=int(flow.cache_mb * 2**20))
