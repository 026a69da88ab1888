import json

import pytest

from bincount.data.fetch import BadInput, check_image, fetch_subset, parse_classes, parse_label, read_file_list
from bincount.data.sources import open_source

from conftest import metadata, write_tree


@pytest.mark.parametrize("spec,expected", [("1-5", [1, 2, 3, 4, 5]), ("0-5", [0, 1, 2, 3, 4, 5]),
                                           ("1,3,5", [1, 3, 5])])
def test_parse_classes(spec, expected):
    assert parse_classes(spec) == expected


@pytest.mark.parametrize("spec", ["one-five", "", "-1-3"])
def test_parse_classes_rejects_nonsense(spec):
    with pytest.raises(ValueError, match="--classes"):
        parse_classes(spec)


def test_read_file_list_keeps_ids_as_strings(tmp_path):
    path = tmp_path / "list.json"
    path.write_text(json.dumps({"1": ["metadata/00526.json"], "2": ["data/metadata/526.json"]}))
    assert read_file_list(path) == ["00526", "526"]


@pytest.mark.parametrize("entry", [7, None, ["metadata/1.json"], {"path": "metadata/1.json"}])
def test_read_file_list_refuses_an_entry_that_is_not_a_string_and_names_it(tmp_path, entry):
    path = tmp_path / "list.json"
    path.write_text(json.dumps({"1": ["metadata/00526.json"], "2": ["metadata/9.json", entry]}))
    with pytest.raises(ValueError, match="is not a string") as error:
        read_file_list(path)
    assert repr(entry) in str(error.value) and "'2'" in str(error.value) and str(path) in str(error.value)


@pytest.mark.parametrize("raw,reason", [(b"{", "malformed metadata"), (b"[]", "no integer"),
                                        (b'{"EXPECTED_QUANTITY": "3"}', "no integer"),
                                        (b'{"EXPECTED_QUANTITY": true}', "no integer")])
def test_parse_label_rejects_bad_metadata(raw, reason):
    with pytest.raises(BadInput, match=reason):
        parse_label(raw)


def test_check_image(synthetic_jpegs):
    assert check_image(synthetic_jpegs[3]) == (160, 144)
    with pytest.raises(BadInput, match="unreadable image"):
        check_image(synthetic_jpegs[3][:400])
    with pytest.raises(BadInput, match="not an image"):
        check_image(b"hello")


def test_bad_objects_are_skipped_and_reported_by_id(tmp_path, abid_sample, abid_ids, bad_objects):
    from conftest import sample_files

    files, reasons = bad_objects
    good = [i for c in (1, 2, 3) for i in abid_ids[c][:2]]
    root = write_tree(tmp_path, {**sample_files(abid_sample, good), **files})
    subset = fetch_subset(open_source(str(root)), classes=[1, 2, 3, 4, 5], per_class=None,
                          candidate_ids=good + list(reasons), progress=False)
    assert sorted(subset.ids) == sorted(good)
    skipped = dict(subset.skipped)
    assert set(skipped) == set(reasons)
    for bin_id, reason in reasons.items():
        assert reason in skipped[bin_id]
    assert subset.out_of_class == {"bad-toomany": 9}  # the record a model of 1-5 cannot judge


def test_subset_is_balanced_and_deterministic_for_a_seed(tmp_path, synthetic_jpegs):
    files = {}
    for count in (0, 1, 2):
        for i in range(10):
            files[f"bin-images/c{count}-{i}.jpg"] = synthetic_jpegs[max(count, 1)]
            files[f"metadata/c{count}-{i}.json"] = metadata(count)
    source = open_source(str(write_tree(tmp_path, files)))
    first = fetch_subset(source, classes=[0, 1, 2], per_class=4, seed=1, progress=False)
    again = fetch_subset(source, classes=[0, 1, 2], per_class=4, seed=1, progress=False)
    other = fetch_subset(source, classes=[0, 1, 2], per_class=4, seed=2, progress=False)
    assert first.class_counts() == {0: 4, 1: 4, 2: 4}
    assert first.ids == again.ids
    assert first.ids != other.ids


def test_a_bad_image_is_replaced_by_the_next_of_its_class(tmp_path, synthetic_jpegs):
    files = {"bin-images/a.jpg": b"junk", "metadata/a.json": metadata(1),
             "bin-images/b.jpg": synthetic_jpegs[1][:300], "metadata/b.json": metadata(1),
             "bin-images/c.jpg": synthetic_jpegs[1], "metadata/c.json": metadata(1)}
    source = open_source(str(write_tree(tmp_path, files)))
    for seed in range(4):  # whatever order the seed visits them in
        subset = fetch_subset(source, classes=[1], per_class=1, seed=seed, progress=False)
        assert subset.ids == ["c"]
        assert {i for i, _ in subset.skipped} <= {"a", "b"}


@pytest.mark.parametrize("per_class", [3, None])
def test_a_fetch_cut_in_chunks_chooses_and_reports_what_one_fetch_does(tmp_path, synthetic_jpegs, per_class):
    from bincount.data.fetch import candidate_order, chunks, merge_parts

    files = {}
    for i in range(40):  # counts 0-3; every fifth bin is broken one way or another
        count = i % 4
        files[f"bin-images/b{i:02d}.jpg"] = synthetic_jpegs[max(count, 1)] if i % 5 else synthetic_jpegs[1][:300]
        files[f"metadata/b{i:02d}.json"] = b"{" if i % 7 == 3 else metadata(count)
    source = open_source(str(write_tree(tmp_path, files)))
    one = fetch_subset(source, classes=[1, 2, 3], per_class=per_class, seed=5, progress=False, workers=4)
    assert one.skipped and one.out_of_class  # the case has bad bins and counts outside the classes
    order = candidate_order(source, seed=5, progress=False)
    for n in (2, 3, 8):
        parts = [fetch_subset(source, classes=[1, 2, 3], per_class=per_class, candidate_ids=c["ids"], ordered=True,
                              offset=c["offset"], progress=False, workers=4) for c in chunks(order, n)]
        merged = merge_parts(parts, classes=[1, 2, 3], per_class=per_class)
        assert (merged.ids, merged.labels, merged.skipped, merged.out_of_class) == (
            one.ids, one.labels, one.skipped, one.out_of_class), n
        assert merged.dropped == sum(len(p.ids) for p in parts) - len(one.ids)
