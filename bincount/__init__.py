"""bincount: count the items in warehouse bin photos.

The library behind ``flows/bin_flow.py``. Each module is one concern and can be
used without Metaflow:

    sources    where the data comes from (public bucket, S3-compatible, folder)
    synthetic  generated bin-like images in the bucket layout
    fetch      choosing and downloading a class-balanced subset
    split      stratified train/validation/test split
    images     how photos become tensors
    models     which network
    train      how it trains (one process, or data-parallel under torchrun)
    distributed  torch.distributed set-up and sharding for data-parallel training
    compute    where the train step runs: local, @batch, @kubernetes or SageMaker
    training_job  bincount's training entry point as SageMaker runs a script
    sagemaker_training  one SageMaker training job per grid point
    metrics    how it is scored
    inference  the one inference handler (SageMaker PyTorch serving contract)
    package    model.tar.gz as SageMaker expects it
    serve      the local HTTP endpoint
    deploy     starting, checking and stopping an endpoint
    champion   the champion gate: deploy only a model at least as good
    sagemaker_endpoint  the SageMaker deploy target
    audit      flagging bins whose photo disagrees with their record
    runs       reading runs back through the Metaflow Client
"""

__version__ = "0.1.0"

# Metaflow's code package then carries this whole library with the flow, so a
# step on AWS Batch or Kubernetes imports the same bincount as the launching
# machine (its image needs only the third-party packages).
METAFLOW_PACKAGE_POLICY = "include"

FLOW_NAME = "BinCountFlow"
