import io
import time
from dataclasses import replace

import pytest

from bincount.model.grid import SelectConfig, TrainConfig
from bincount.model.metrics import count_metrics
from bincount.model.selection import choose_best, choose_members, choose_model, combined_accuracy, results_table
from bincount.model.train import FAIL_ENV, TrainResult, make_loss, param_groups, train_on_split

from conftest import write_shards


@pytest.fixture(scope="module")
def synthetic_split():
    from bincount.data.fetch import fetch_subset
    from bincount.data.shards import MemorySink
    from bincount.data.sources import open_source
    from bincount.data.split import split_ids

    source = open_source("synthetic", classes=[1, 2, 3, 4, 5], seed=0, synthetic_per_class=60)
    photos = MemorySink()
    subset = fetch_subset(source, classes=[1, 2, 3, 4, 5], per_class=60, progress=False, sink=photos)
    return photos.images, split_ids(subset.ids, subset.labels, seed=0)


CFG = TrainConfig(name="t", arch="resnet18", pretrained=False, batch_size=16, epochs=6, image_size=96,
                  lr=1e-3, label_smoothing=0.0)


def test_training_learns_synthetic_counts_and_keeps_curves(synthetic_split):
    import torch

    images, table = synthetic_split
    result = train_on_split(CFG, images, table, [1, 2, 3, 4, 5], seed=0, progress=False)
    assert [row["epoch"] for row in result.history] == list(range(1, 7))
    assert {"train_loss", "train_accuracy", "val_loss", "val_accuracy"} <= set(result.history[0])
    best = result.history[result.best_epoch - 1]
    assert result.val_accuracy == best["val_accuracy"] == max(r["val_accuracy"] for r in result.history)
    assert result.val_accuracy > 0.4  # chance is 0.2
    state = torch.load(io.BytesIO(result.state_dict), weights_only=True)
    assert "fc.weight" in state
    # the best epoch's validation softmax, per photo in split order, alone and over four flips
    n_val = (table["split"] == "val").sum()
    for probabilities in (result.val_probabilities, result.val_probabilities_tta):
        assert len(probabilities) == n_val and all(abs(sum(p) - 1) < 1e-4 for p in probabilities)
    labels = [[1, 2, 3, 4, 5].index(v) for v in table[table["split"] == "val"]["label"]]
    assert combined_accuracy([result], labels, tta=False) == pytest.approx(result.val_accuracy)


def test_a_split_too_big_for_the_cache_streams_from_shards_and_learns(synthetic_split, tmp_path):
    import torch

    from bincount.data.shards import Photos

    images, table = synthetic_split
    shards, index = write_shards(tmp_path, images, dict(zip(table["id"], table["label"])),
                                 max_bytes=40 * max(map(len, images.values())))
    photos = Photos(shards, index)
    assert len(shards.shards) >= 5
    cfg = TrainConfig(name="streamed", arch="resnet18", pretrained=False, batch_size=16, epochs=4, image_size=64,
                      lr=1e-3, label_smoothing=0.0)

    def train(cache_bytes: int, seed: int = 0):
        return train_on_split(cfg, photos, table, [1, 2, 3, 4, 5], seed=seed, progress=False,
                              cache_bytes=cache_bytes, workers=2)

    streamed, again = train(0), train(0)
    assert streamed.state_dict == again.state_dict  # deterministic for a seed, through worker processes
    n_val = (table["split"] == "val").sum()
    probabilities = torch.tensor(streamed.val_probabilities)
    assert probabilities.shape == (n_val, 5) and torch.allclose(probabilities.sum(1), torch.ones(n_val), atol=1e-4)
    # the validation softmax comes back in split order however the shards were read: the
    # accuracy recomputed from it in that order is the one training measured
    labels = [[1, 2, 3, 4, 5].index(v) for v in table[table["split"] == "val"]["label"]]
    assert combined_accuracy([streamed], labels, tta=False) == pytest.approx(streamed.val_accuracy)
    assert streamed.val_accuracy > 0.3  # it learns: chance is 0.2


def test_injected_failure_stops_the_named_point(synthetic_split, monkeypatch):
    images, table = synthetic_split
    monkeypatch.setenv(FAIL_ENV, "t")
    with pytest.raises(RuntimeError, match="on purpose after epoch 1"):
        train_on_split(CFG, images, table, [1, 2, 3, 4, 5], progress=False)


@pytest.mark.parametrize("cached", [True, False], ids=["cached", "streamed"])
def test_a_fit_that_fails_goes_on_from_its_checkpoint_and_ends_as_one_that_never_stopped(
        synthetic_split, monkeypatch, tmp_path, cached, capsys):
    """Epoch 2 is checkpointed, then the point fails; training again with the same checkpoints
    starts at epoch 3 and ends with the weights, curves and validation softmax of a run that
    never failed (same seed, CPU): the optimizer, schedule and every generator came back."""
    from bincount.model.checkpoint import Checkpoints

    images, table = synthetic_split
    cfg = TrainConfig(name="t", arch="resnet18", pretrained=False, batch_size=16, epochs=4, image_size=64,
                      lr=1e-3, label_smoothing=0.05)
    # Streamed in this process (no loader workers): worker processes are test_a_split_too_big_for_the_cache's.
    options = dict(progress=False, seed=3, cache_bytes=None if cached else 0, workers=1 if cached else 0)
    uninterrupted = train_on_split(cfg, images, table, [1, 2, 3, 4, 5], **options)

    checkpoints = Checkpoints(str(tmp_path / "t"))
    monkeypatch.setenv(FAIL_ENV, "t:2")
    with pytest.raises(RuntimeError, match="on purpose after epoch 2"):
        train_on_split(cfg, images, table, [1, 2, 3, 4, 5], checkpoints=checkpoints, **options)
    assert checkpoints.load()["epoch"] == 2
    capsys.readouterr()
    seen = []
    resumed = train_on_split(cfg, images, table, [1, 2, 3, 4, 5], checkpoints=checkpoints,
                             on_epoch=lambda r: seen.append(len(r.history)), **options)
    assert "continuing from the checkpoint after epoch 2 of 4" in capsys.readouterr().out
    assert seen == [3, 4]  # only epochs 3 and 4 were trained again
    assert resumed.state_dict == uninterrupted.state_dict
    assert resumed.best_epoch == uninterrupted.best_epoch
    assert [(r["epoch"], r["train_loss"], r["val_accuracy"]) for r in resumed.history] == \
        [(r["epoch"], r["train_loss"], r["val_accuracy"]) for r in uninterrupted.history]
    assert resumed.val_probabilities == uninterrupted.val_probabilities


@pytest.mark.parametrize("where", ["folder", "s3"])
def test_a_run_s_checkpoints_go_as_one_tree_and_nothing_beside_them(where, tmp_path, request, monkeypatch):
    """What the join calls once every grid point has ended (bincount.flow.storage.discard_checkpoints):
    every object under the run's checkpoint folder goes, a run whose id starts the same stays."""
    from bincount.data.blobs import join, list_blobs, remove_tree, write_blob

    if where == "s3":
        monkeypatch.setenv("AWS_ENDPOINT_URL", request.getfixturevalue("s3_endpoint"))
        request.getfixturevalue("s3_client").create_bucket(Bucket="checkpoints")
        root = "s3://checkpoints/bincount-checkpoints/BinCountFlow"
    else:
        root = str(tmp_path / "bincount-checkpoints" / "BinCountFlow")
    for point in ("tiny-a", "tiny-b"):
        write_blob(join(root, "17", "train", point, "checkpoint.pt"), b"state")
    write_blob(join(root, "170", "train", "tiny-a", "checkpoint.pt"), b"another run's state")

    assert remove_tree(join(root, "17")) == 2
    assert list_blobs(join(root, "17", "train", "tiny-a")) == []
    assert list_blobs(join(root, "170", "train", "tiny-a")) == [join(root, "170", "train", "tiny-a", "checkpoint.pt")]
    assert remove_tree(join(root, "17")) == 0  # already gone: nothing to do, no error


def test_a_checkpoint_of_other_settings_is_refused(synthetic_split, tmp_path):
    from bincount.model.checkpoint import CheckpointMismatch, Checkpoints

    images, table = synthetic_split
    checkpoints = Checkpoints(str(tmp_path / "t"))
    cfg = TrainConfig(name="t", arch="resnet18", pretrained=False, batch_size=16, epochs=1, image_size=64)
    train_on_split(cfg, images, table, [1, 2, 3, 4, 5], checkpoints=checkpoints, progress=False)
    with pytest.raises(CheckpointMismatch, match=r"other settings \(\['lr'\] differ\)"):
        train_on_split(replace(cfg, lr=0.1), images, table, [1, 2, 3, 4, 5], checkpoints=checkpoints,
                       progress=False)


def test_a_time_limit_stops_training_as_a_timeout(synthetic_split):
    from bincount.model.train import TrainingTimeout

    images, table = synthetic_split
    cfg = TrainConfig(name="t", arch="resnet18", pretrained=False, batch_size=16, epochs=50, image_size=64)
    with pytest.raises(TrainingTimeout, match="training t took longer than its limit of 2 s"):
        train_on_split(cfg, images, table, [1, 2, 3, 4, 5], progress=False, timeout_s=2)


def test_waiting_for_the_training_lock_does_not_count_against_the_time_limit(synthetic_split):
    """Grid points queue for one machine's training lock; the limit starts once a point holds it."""
    import threading

    from bincount.model.train import machine_lock

    images, table = synthetic_split
    held, release = threading.Event(), threading.Event()

    def hold_the_lock():  # another grid point training on this machine
        with machine_lock():
            held.set()
            release.wait(30)

    other = threading.Thread(target=hold_the_lock)
    other.start()
    assert held.wait(30)
    threading.Timer(5, release.set).start()
    started = time.monotonic()
    cfg = TrainConfig(name="t", arch="resnet18", pretrained=False, batch_size=16, epochs=1, image_size=32)
    try:
        trained = train_on_split(cfg, images, table, [1, 2, 3, 4, 5], progress=False, timeout_s=4)
    finally:
        release.set()
        other.join()
    assert time.monotonic() - started >= 5 and len(trained.history) == 1  # waited 5 s, limit 4 s: no timeout


def result(name, acc, loss, size=96, probabilities=()):
    return TrainResult(config={"name": name, "image_size": size}, state_dict=b"", val_accuracy=acc,
                       val_loss=loss, val_probabilities=list(probabilities))


def test_ensemble_members_are_the_best_points_at_the_best_points_image_size():
    results = [result("a", 0.5, 1.0), result("b", 0.7, 1.0, size=128), result("c", 0.6, 1.0),
               result("d", 0.55, 1.0, size=128)]
    assert [r.config["name"] for r in choose_members(results, 2)] == ["b", "d"]
    assert [r.config["name"] for r in choose_members(results, 1)] == ["b"]
    assert [r.config["name"] for r in choose_members(results, 9)] == ["b", "d"]


def test_an_ensemble_averages_its_members_softmax():
    # two members, each right on a different photo with low confidence: the mean is right on both
    a = result("a", 0.5, 1.0, probabilities=[[0.6, 0.4], [0.6, 0.4]])
    b = result("b", 0.5, 1.0, probabilities=[[0.3, 0.7], [0.0, 1.0]])
    assert combined_accuracy([a, b], [0, 1], tta=False) == 0.5
    assert combined_accuracy([a], [0, 1], tta=False) == 0.5


def test_the_expected_count_decision_answers_between_neighbours():
    from bincount.model.predictor import decide

    spread = [0.0, 0.0, 0.35, 0.3, 0.35]  # counts 1-5: argmax says 3 (first of the ties), the mass centres on 4
    assert decide(spread, [1, 2, 3, 4, 5]) == 2
    assert decide(spread, [1, 2, 3, 4, 5], "expected") == 3
    assert decide([0.5, 0.0, 0.5], [0, 1, 5], "expected") == 1  # expected 2.5: of counts 0, 1, 5, 1 is nearest
    # the join scores a combination with the decision the endpoint will use
    a = result("a", 0.5, 1.0, probabilities=[spread, [0.1, 0.8, 0.1, 0.0, 0.0]])
    assert combined_accuracy([a], [3, 1], tta=False, classes=[1, 2, 3, 4, 5], decision="expected") == 1.0
    assert combined_accuracy([a], [3, 1], tta=False, classes=[1, 2, 3, 4, 5]) == 0.5


def test_the_join_serves_an_ensemble_with_tta(synthetic_split):
    import torch

    from bincount.model.predictor import load_predictor

    images, table = synthetic_split
    tiny = TrainConfig(name="x", arch="resnet18", pretrained=False, batch_size=16, epochs=1, image_size=64)
    results = [train_on_split(tiny, images, table, [1, 2, 3, 4, 5], seed=s, progress=False) for s in (0, 1)]
    labels = [[1, 2, 3, 4, 5].index(v) for v in table[table["split"] == "val"]["label"]]
    for r, name in zip(results, "ab"):
        r.config["name"] = name
    choice = choose_model(results, SelectConfig(ensemble=2, tta=True), labels, [1, 2, 3, 4, 5])
    assert [m.grid_point for m in choice.meta.members] == [r.config["name"] for r in sorted(
        results, key=lambda r: (-r.val_accuracy, r.val_loss))]
    state = torch.load(io.BytesIO(choice.state), weights_only=True)
    assert len(state["members"]) == 2 and choice.meta.tta
    predictor = load_predictor(choice.state, choice.meta)
    # the served softmax is the mean over members and flips: the one the join scored on validation
    val = predictor.prepare([images[i] for i in table[table["split"] == "val"]["id"]])
    served = [[p["probabilities"][str(c)] for c in (1, 2, 3, 4, 5)] for p in predictor.predict_tensors(val)]
    expected = torch.tensor([r.val_probabilities_tta for r in results]).mean(0)
    assert torch.allclose(torch.tensor(served), expected, atol=0.02)  # bf16 in training, fp32 here
    # four-flip TTA makes the answer the same for a photo and its mirror image
    flipped = predictor.predict_tensors(val[:4].flip(3))
    assert [p["count"] for p in flipped] == [p["count"] for p in predictor.predict_tensors(val[:4])]


def test_best_is_highest_val_accuracy_then_lowest_loss():
    results = [result("a", 0.5, 1.0), result("b", 0.6, 1.2), result("c", 0.6, 1.1)]
    assert choose_best(results).config["name"] == "c"
    assert results_table(results)["name"].tolist() == ["c", "b", "a"]


def test_count_loss_charges_far_counts_more_than_near_ones():
    import torch

    cfg = TrainConfig(name="l", label_smoothing=0.0, count_loss_weight=1.0)
    loss = make_loss(cfg, torch.tensor([0, 1, 2, 3, 4]), 5)
    near, far = torch.full((1, 5), -9.0), torch.full((1, 5), -9.0)
    near[0, 3], far[0, 0] = 9.0, 9.0  # confident 4 vs confident 1, for a true 5
    target = torch.tensor([4])
    plain = make_loss(TrainConfig(name="p", label_smoothing=0.0), torch.tensor([0, 4]), 5)
    assert plain(near, target) == pytest.approx(plain(far, target).item())
    assert loss(far, target) > loss(near, target) + 8  # (4-0)^2 - (4-3)^2 = 15


def test_class_balanced_loss_weighs_rare_classes_up():
    import torch

    cfg = TrainConfig(name="b", label_smoothing=0.0, class_balanced=True)
    loss = make_loss(cfg, torch.tensor([0, 1, 1, 1]), 2)
    logits = torch.zeros(1, 2)
    assert loss(logits, torch.tensor([0])) == pytest.approx(loss(logits, torch.tensor([1])).item())
    # per-sample weights only show up against other samples in the batch
    both = loss(torch.tensor([[0.0, 5.0], [0.0, 5.0]]), torch.tensor([0, 1]))
    plain = make_loss(TrainConfig(name="p", label_smoothing=0.0), torch.tensor([0, 1, 1, 1]), 2)
    assert both > plain(torch.tensor([[0.0, 5.0], [0.0, 5.0]]), torch.tensor([0, 1]))


def test_the_pretrained_body_learns_slower_than_the_new_head():
    from bincount.model.architectures import create_model

    cfg = TrainConfig(name="d", arch="resnet18", pretrained=False, lr=1e-3, backbone_lr_factor=0.1, frozen_blocks=1)
    groups = param_groups(create_model("resnet18", num_classes=5, frozen_blocks=1), cfg)
    assert [g["lr"] for g in groups] == [1e-3, pytest.approx(1e-4)]
    assert len(groups[0]["params"]) == 2 and all(p.requires_grad for g in groups for p in g["params"])


def test_count_metrics():
    m = count_metrics([1, 2, 3, 3], [1, 3, 3, 5], [1, 2, 3, 4, 5])
    assert m["accuracy"] == 0.5
    assert m["mae"] == pytest.approx(0.75)
    assert m["rmse"] == pytest.approx((5 / 4) ** 0.5)
    assert m["per_class"]["3"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    assert m["confusion_matrix"][2] == [0, 0, 1, 0, 1]


def test_augmentation_only_flips_and_recolours_and_is_seeded():
    import torch

    from bincount.data.images import augment_batch

    x = torch.randint(0, 256, (16, 3, 32, 40), dtype=torch.uint8)
    flips_only = augment_batch(x, torch.Generator().manual_seed(0), jitter=0.0)
    for image, out in zip(x.float() / 255, flips_only):  # no crop, no resize: every item stays in the photo
        assert any(torch.allclose(out, v) for v in (image, image.flip(2), image.flip(1), image.flip(1, 2)))
    a, b = (augment_batch(x, torch.Generator().manual_seed(1)) for _ in range(2))
    assert torch.equal(a, b) and a.min() >= 0 and a.max() <= 1 and not torch.allclose(a, flips_only)


def test_transpose_augmentation_draws_all_eight_symmetries_of_a_square_photo():
    import torch

    from bincount.data.images import augment_batch

    image = torch.arange(3 * 8 * 8, dtype=torch.uint8).reshape(1, 3, 8, 8)
    x = image.repeat(64, 1, 1, 1)
    out = augment_batch(x, torch.Generator().manual_seed(0), jitter=0.0, transpose=True)
    f = image[0].float() / 255
    symmetries = [v for t in (f, f.transpose(1, 2)) for v in (t, t.flip(2), t.flip(1), t.flip(1, 2))]
    seen = {next(k for k, v in enumerate(symmetries) if torch.equal(o, v)) for o in out}  # each is one of them
    assert seen == set(range(8))
