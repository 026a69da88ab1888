"""The network, how it trains, and how it answers.

    architectures  one record per architecture: builder, head, mean/std, early blocks
    grid           hyperparameter grids: TrainConfig, SelectConfig
    train          one grid point, start to finish (one process, or data-parallel)
    distributed    torch.distributed set-up and sharding for data-parallel training
    selection      the join: ranking grid points, choosing the served ensemble
    metrics        how a model is scored
"""
