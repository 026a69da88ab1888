import time

import pytest

from bincount.data.sources import LocalSource, MissingObject, S3Source, SourceUnreachable, open_source

from conftest import upload_tree


def test_local_source_reads_and_lists(tmp_path):
    (tmp_path / "metadata").mkdir()
    (tmp_path / "metadata" / "00526.json").write_text("{}")
    (tmp_path / "metadata" / "526.json").write_text("{}")
    source = open_source(str(tmp_path))
    assert isinstance(source, LocalSource)
    # Ids are strings: '00526' and '526' are different bins.
    assert sorted(source.list_ids()) == ["00526", "526"]
    assert source.read("metadata/526.json") == b"{}"
    with pytest.raises(MissingObject, match="bin-images/526.jpg"):
        source.read("bin-images/526.jpg")


def test_local_folder_without_layout_is_rejected(tmp_path):
    with pytest.raises(SourceUnreachable, match="no metadata/ folder"):
        open_source(str(tmp_path)).check()
    with pytest.raises(SourceUnreachable, match="neither an s3:// URL"):
        open_source(str(tmp_path / "nope"))


def test_s3_source_on_a_real_server(s3_client, s3_endpoint, monkeypatch):
    upload_tree(s3_client, "src-test", "abid", {"metadata/7.json": b'{"EXPECTED_QUANTITY": 1}',
                                                 "bin-images/7.jpg": b"jpeg"})
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    source = open_source("s3://src-test/abid")
    assert isinstance(source, S3Source)
    source.check()
    assert list(source.list_ids()) == ["7"]
    assert source.read("bin-images/7.jpg") == b"jpeg"
    with pytest.raises(MissingObject):
        source.read("bin-images/8.jpg")


def test_unreachable_endpoint_fails_fast_with_advice(monkeypatch):
    from conftest import free_port

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    started = time.monotonic()
    with pytest.raises(SourceUnreachable) as error:
        open_source("s3://aft-vbi-pds").check()
    assert time.monotonic() - started < 60
    message = str(error.value)
    assert "s3://aft-vbi-pds" in message and "--source synthetic" in message


def test_synthetic_source_is_a_local_mirror():
    source = open_source("synthetic", classes=[0, 1], seed=3, synthetic_per_class=4)
    ids = list(source.list_ids())
    assert len(ids) == 8
    assert source.read(f"bin-images/{ids[0]}.jpg")[:2] == b"\xff\xd8"  # a JPEG
