"""Stratified train/validation/test split, disjoint by bin id."""

from __future__ import annotations

SPLITS = ("train", "val", "test")


def split_ids(ids: list[str], labels: list[int], *, val_fraction: float = 0.15,
              test_fraction: float = 0.15, seed: int = 0):
    """Return a DataFrame ``id, label, split`` stratified by count.

    Deterministic for a seed. A bin id appears once, so the splits cannot
    share a photo; ids are de-duplicated first in case a listing repeats one.
    """
    import pandas as pd
    from sklearn.model_selection import train_test_split

    if not 0 < val_fraction < 1 or not 0 < test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise ValueError("val and test fractions must each be in (0, 1) and sum to less than 1")
    table = pd.DataFrame({"id": ids, "label": labels}).drop_duplicates("id").reset_index(drop=True)
    counts = table["label"].value_counts()
    # stratify needs at least 2 of a class in each cut; tiny classes are
    # still split, just not stratified (a clear warning beats a crash).
    stratify = table["label"] if counts.min() >= 3 else None
    if stratify is None:
        print(f"split: some class has fewer than 3 bins ({counts.to_dict()}); splitting without stratification")
    rest, test = train_test_split(table, test_size=test_fraction, random_state=seed, stratify=stratify)
    stratify_rest = rest["label"] if stratify is not None else None
    train, val = train_test_split(rest, test_size=val_fraction / (1 - test_fraction),
                                  random_state=seed, stratify=stratify_rest)
    table.loc[train.index, "split"] = "train"
    table.loc[val.index, "split"] = "val"
    table.loc[test.index, "split"] = "test"
    return table


def split_counts(table):
    """Class counts per split: rows are counts, columns train/val/test."""
    return (table.pivot_table(index="label", columns="split", values="id", aggfunc="count", fill_value=0)
            .reindex(columns=list(SPLITS), fill_value=0))
