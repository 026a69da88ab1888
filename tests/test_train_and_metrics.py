import io

import pytest

from bincount.grid import TrainConfig
from bincount.metrics import count_metrics
from bincount.selection import choose_best, results_table
from bincount.train import FAIL_ENV, TrainResult, train_on_split


@pytest.fixture(scope="module")
def synthetic_split():
    from bincount.fetch import fetch_subset
    from bincount.sources import open_source
    from bincount.split import split_ids

    source = open_source("synthetic", classes=[1, 2, 3, 4, 5], seed=0, synthetic_per_class=60)
    subset = fetch_subset(source, classes=[1, 2, 3, 4, 5], per_class=60, progress=False)
    return subset.images, split_ids(subset.ids, subset.labels, seed=0)


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


def test_injected_failure_stops_the_named_point(synthetic_split, monkeypatch):
    images, table = synthetic_split
    monkeypatch.setenv(FAIL_ENV, "t")
    with pytest.raises(RuntimeError, match="on purpose after epoch 1"):
        train_on_split(CFG, images, table, [1, 2, 3, 4, 5], progress=False)


def result(name, acc, loss):
    return TrainResult(config={"name": name}, state_dict=b"", val_accuracy=acc, val_loss=loss)


def test_best_is_highest_val_accuracy_then_lowest_loss():
    results = [result("a", 0.5, 1.0), result("b", 0.6, 1.2), result("c", 0.6, 1.1)]
    assert choose_best(results).config["name"] == "c"
    assert results_table(results)["name"].tolist() == ["c", "b", "a"]


def test_count_metrics():
    m = count_metrics([1, 2, 3, 3], [1, 3, 3, 5], [1, 2, 3, 4, 5])
    assert m["accuracy"] == 0.5
    assert m["mae"] == pytest.approx(0.75)
    assert m["rmse"] == pytest.approx((5 / 4) ** 0.5)
    assert m["per_class"]["3"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    assert m["confusion_matrix"][2] == [0, 0, 1, 0, 1]
