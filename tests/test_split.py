import pytest

from bincount.data.split import split_counts, split_ids


def labelled(n_per_class=20, classes=(1, 2, 3, 4, 5)):
    ids = [f"{c}-{i:03d}" for c in classes for i in range(n_per_class)]
    return ids, [int(i.split("-")[0]) for i in ids]


def test_split_is_stratified_disjoint_and_deterministic():
    ids, labels = labelled()
    table = split_ids(ids, labels, val_fraction=0.2, test_fraction=0.2, seed=7)
    assert table["id"].is_unique and len(table) == 100
    counts = split_counts(table)
    assert list(counts.columns) == ["train", "val", "test"]
    assert (counts["val"] == 4).all() and (counts["test"] == 4).all() and (counts["train"] == 12).all()
    assert table.equals(split_ids(ids, labels, val_fraction=0.2, test_fraction=0.2, seed=7))
    assert not table.equals(split_ids(ids, labels, val_fraction=0.2, test_fraction=0.2, seed=8))


def test_repeated_ids_land_in_one_split_only():
    ids, labels = labelled(10)
    table = split_ids(ids + ids[:5], labels + labels[:5], seed=0)
    assert table["id"].is_unique and len(table) == len(ids)


def test_fractions_are_checked():
    ids, labels = labelled()
    with pytest.raises(ValueError, match="fractions"):
        split_ids(ids, labels, val_fraction=0.5, test_fraction=0.5)
