"""model.json as one typed record: written in one place, checked wherever a model is loaded."""

import io
import json
import tarfile

import pytest

from bincount.model.metadata import FORMAT_VERSION, Member, ModelMeta, ModelMetaError

FULL = {"arch": "efficientnet_lite0", "image_size": 224, "classes": [1, 2, 3, 4, 5],
        "members": [{"arch": "efficientnet_lite0", "grid_point": "a"}, {"arch": "resnet18", "grid_point": "b"}],
        "grid_point": "a", "tta": True, "decision": "expected", "val_accuracy": 0.31, "flow": "BinCountFlow",
        "run_id": "17", "version": FORMAT_VERSION}


def test_the_record_round_trips_through_its_json_form():
    meta = ModelMeta.from_dict(FULL)
    assert meta.members == (Member("efficientnet_lite0", "a"), Member("resnet18", "b"))
    assert meta.tta and meta.decision == "expected" and meta.run_id == "17"
    assert ModelMeta.from_dict(json.loads(meta.to_json())) == meta
    assert meta.to_dict() == FULL


def test_a_file_written_before_the_version_field_reads_as_version_1():
    old = {k: v for k, v in FULL.items() if k != "version"}
    assert ModelMeta.from_dict(old).version == 1
    # the smallest model.json bincount ever wrote: one member of arch
    minimal = ModelMeta.from_dict({"arch": "resnet18", "image_size": 64, "classes": [1, 2]})
    assert minimal.members == (Member("resnet18"),) and minimal.decision == "argmax" and not minimal.tta


@pytest.mark.parametrize("change, message", [
    ({"colour": "red"}, r"unknown fields \['colour'\]"),
    ({"arch": None}, "arch must be an architecture name"),
    ({"image_size": "224"}, "image_size must be a positive integer"),
    ({"classes": []}, "classes must be a non-empty list"),
    ({"tta": "yes"}, "tta must be true or false"),
    ({"decision": "median"}, "decision must be one of"),
    ({"version": FORMAT_VERSION + 1}, "a newer bincount wrote it"),
    ({"members": [{"arch": "resnet18", "weights": "x"}]}, "each of members must be"),
])
def test_a_bad_field_is_named(change, message):
    with pytest.raises(ModelMetaError, match=message):
        ModelMeta.from_dict({**FULL, **change})


@pytest.mark.parametrize("field", ["arch", "image_size", "classes"])
def test_a_missing_field_is_named(field):
    with pytest.raises(ModelMetaError, match=rf"missing fields \['{field}'\]"):
        ModelMeta.from_dict({k: v for k, v in FULL.items() if k != field})


def repack(package: bytes, meta_text: str) -> bytes:
    """The same model.tar.gz with another model.json."""
    out = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(package)) as src, tarfile.open(fileobj=out, mode="w:gz") as dst:
        for member in src.getmembers():
            data = src.extractfile(member).read() if member.isfile() else None
            if member.name == "model.json":
                data = meta_text.encode()
                member.size = len(data)
            dst.addfile(member, io.BytesIO(data) if data is not None else None)
    return out.getvalue()


def test_loading_a_package_checks_its_model_json(tiny_model, tmp_path):
    from bincount.serving.handler import model_fn
    from bincount.serving.package import build_package, extract_package

    package = build_package(*tiny_model)
    written = json.loads(tarfile.open(fileobj=io.BytesIO(package)).extractfile("model.json").read())
    assert written["version"] == FORMAT_VERSION and written["classes"] == [1, 2, 3, 4, 5]
    bad = {**written, "clases": written["classes"]}
    del bad["classes"]
    folder = extract_package(repack(package, json.dumps(bad)), tmp_path / "bad")
    with pytest.raises(ModelMetaError, match=r"model.json: unknown fields \['clases'\]"):
        model_fn(str(folder))
    folder = extract_package(repack(package, "{not json"), tmp_path / "garbled")
    with pytest.raises(ModelMetaError, match="cannot read model metadata"):
        model_fn(str(folder))
