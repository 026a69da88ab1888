"""bincount: count the items in warehouse bin photos.

The library behind ``flows/bin_flow.py``, in layers; a layer imports only the
layers listed above it, never one below (tests/test_layers.py checks):

    validation strict settings (pydantic): types and ranges, errors as one line
    aws        boto3 plumbing: client factory, errors, settings checks, container images
    data       sources, synthetic data, fetching, splitting, photos as tensors
    model      architectures, grids, training, ensembles, metrics
    serving    the inference handler, the local server and its data capture, model.tar.gz,
               local endpoints (bincount's server, or SageMaker's serving toolkit)
    sagemaker  SageMaker training jobs, tuning jobs and endpoints
    flow       the Metaflow glue: compute config, deploy targets, champion, runs, cards
    audit      flagging bins whose photo disagrees with their record
    monitor    captured traffic against a run: drift, least confident photos
    cli        the command line

Only ``flow`` (and ``audit``, ``monitor`` and ``cli`` above it) import Metaflow.
"""

__version__ = "0.2.0"  # 0.2: the library in layers (module paths changed)

# Metaflow's code package then carries this whole library with the flow, so a
# step on AWS Batch or Kubernetes imports the same bincount as the launching
# machine (its image needs only the third-party packages).
METAFLOW_PACKAGE_POLICY = "include"

FLOW_NAME = "BinCountFlow"
