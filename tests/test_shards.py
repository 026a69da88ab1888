"""Photos in shards (bincount.data.shards) and read back through the loader (bincount.data.loader)."""

from __future__ import annotations

import tarfile

import pytest

from bincount.data.fetch import fetch_subset
from bincount.data.shards import MemorySink, Photos, ShardError, ShardSet, ShardSink, samples_in
from bincount.data.sources import open_source

from conftest import write_shards


@pytest.fixture(scope="module")
def synthetic():
    """60 generated bins, their photos and labels."""
    source = open_source("synthetic", classes=[1, 2, 3], seed=0, synthetic_per_class=20)
    photos = MemorySink()
    subset = fetch_subset(source, classes=[1, 2, 3], per_class=20, progress=False, sink=photos)
    return photos.images, dict(zip(subset.ids, subset.labels))


def test_shards_hold_the_source_bytes_and_agree_with_the_index(tmp_path, synthetic):
    photos, labels = synthetic
    largest = max(map(len, photos.values()))
    shards, index = write_shards(tmp_path, photos, labels, max_bytes=6 * largest)
    assert len(shards.shards) >= 5
    read = Photos(shards, index)
    assert dict(read.read(list(photos))) == photos  # every photo, byte for byte
    for name in shards.shards:
        in_shard = list(shards.samples(name))
        # the index says which shard holds each photo, and with which label
        assert {i for i, _, _ in in_shard} == set(index.loc[index["shard"] == name, "id"])
        assert all(labels[i] == label for i, label, _ in in_shard)
        # bounded: max_bytes of samples, and the tar's end-of-archive padding (to a 10 KiB record)
        assert (tmp_path / name).stat().st_size <= 6 * largest + tarfile.RECORDSIZE
        with tarfile.open(tmp_path / name) as tar:  # a plain tar that any tool reads
            assert {m.name.split(".", 1)[1] for m in tar.getmembers()} == {"id", "cls", "jpg"}
    some = list(photos)[7:12]
    assert dict(read.read(some)) == {i: photos[i] for i in some} and read[some[0]] == photos[some[0]]


def test_same_photos_make_the_same_shard_bytes(tmp_path, synthetic):
    photos, labels = synthetic
    first, _ = write_shards(tmp_path / "a", photos, labels, max_bytes=10**6)
    again, _ = write_shards(tmp_path / "b", photos, labels, max_bytes=10**6)
    assert first.shards == again.shards
    assert all((tmp_path / "a" / s).read_bytes() == (tmp_path / "b" / s).read_bytes() for s in first.shards)


def test_a_damaged_shard_is_an_error_that_names_it(tmp_path, synthetic):
    photos, labels = synthetic
    shards, index = write_shards(tmp_path, photos, labels, max_bytes=10**6)
    path = tmp_path / shards.shards[0]
    data = bytearray(path.read_bytes())
    victim = next(iter(photos))
    at = data.find(photos[victim][100:140])  # a byte inside the first photo's JPEG data
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=f"photo {victim} .* does not match its checksum"):
        list(Photos(shards, index).read([victim]))
    data[at] ^= 0xFF  # mended, then cut short
    path.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(ShardError, match="unreadable|lacks"):
        list(Photos(shards, index).read(list(photos)))
    path.unlink()
    with pytest.raises(ShardError, match="cannot open shard"):
        list(Photos(shards, index).read([victim]))


def test_no_photos_write_no_shard(tmp_path):
    with ShardSink(tmp_path / "empty") as sink:
        assert sink.close() == ShardSet(str(tmp_path / "empty"), ())
    assert not list((tmp_path / "empty").iterdir())


def test_shards_round_trip_through_a_real_s3_server(s3_endpoint, s3_client, monkeypatch, synthetic):
    photos, labels = synthetic
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    s3_client.create_bucket(Bucket="shards")
    shards, index = write_shards("s3://shards/runs/1", photos, labels, max_bytes=20 * max(map(len, photos.values())))
    keys = sorted(o["Key"] for o in s3_client.list_objects_v2(Bucket="shards", Prefix="runs/1/")["Contents"])
    assert keys == [f"runs/1/{s}" for s in shards.shards] and len(keys) >= 2
    assert dict(Photos(ShardSet.from_dict(shards.to_dict()), index).read(list(photos))) == photos
    body = s3_client.get_object(Bucket="shards", Key=keys[0])["Body"]
    assert {i for i, _, _ in samples_in(body)} == set(index.loc[index["shard"] == shards.shards[0], "id"])


def test_the_loader_decodes_shards_exactly_as_the_photos_decode(tmp_path, synthetic):
    from bincount.data.images import decode_all
    from bincount.data.loader import decode_photos

    photos, labels = synthetic
    shards, index = write_shards(tmp_path, photos, labels, max_bytes=8 * max(map(len, photos.values())))
    ids = list(photos)[::-1]  # any order asked for is the order returned
    want = decode_all([photos[i] for i in ids], 64, progress=False)
    for workers in (0, 2):
        assert decode_photos(Photos(shards, index), ids, 64, workers=workers, progress=False).equal(want)
    assert decode_photos(photos, ids, 64, workers=2, progress=False).equal(want)


def test_a_streamed_epoch_is_shuffled_by_seed_and_epoch_and_holds_every_photo_once(tmp_path, synthetic):
    from bincount.data.loader import StreamedPhotos

    photos, labels = synthetic
    shards, index = write_shards(tmp_path, photos, labels, max_bytes=8 * max(map(len, photos.values())))
    ids = list(photos)

    def order(seed: int, epoch: int, workers: int = 2) -> list[str]:
        stream = StreamedPhotos(Photos(shards, index), ids, [labels[i] for i in ids], 32, seed=seed,
                                workers=workers, buffer=16)
        got = []
        for x, y, batch_ids in stream.batches(epoch, batch_size=8):
            assert x.shape == (len(batch_ids), 3, 32, 32) and y.tolist() == [labels[i] for i in batch_ids]
            got.extend(batch_ids)
        return got

    first = order(seed=0, epoch=1)
    assert sorted(first) == sorted(ids)  # every photo once
    assert order(seed=0, epoch=1) == first  # the same for a seed
    assert order(seed=1, epoch=1) != first and order(seed=0, epoch=2) != first
    assert first != ids  # shuffled, not in write order
