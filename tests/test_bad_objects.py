"""One bad object is that object's skip reason, never the end of a fetch; a source that fails as a
whole still ends it fast. S3 faults come from a real HTTP proxy (tests/s3_faults.py) in front of the
real moto server; local faults are real files: a decompression bomb, metadata nested too deeply, a
count too long to parse, ids that name no file, a folder where a file should be."""

from __future__ import annotations

import struct
import time
import zlib

import pytest

from bincount.data.fetch import fetch_subset
from bincount.data.sources import LocalSource, S3Source, SourceUnreachable

from conftest import metadata, upload_tree, write_tree
from s3_faults import FaultProxy

CLASSES = [1, 2, 3]
READ_TIMEOUT_S = 1  # the proxy stalls for longer; kept short so that a stall costs seconds, not minutes


@pytest.fixture
def fault_proxy(s3_endpoint):
    proxy = FaultProxy(s3_endpoint, stall_s=3 * READ_TIMEOUT_S).start()
    yield proxy
    proxy.close()


def bins(synthetic_jpegs, names_and_counts: dict[str, int]) -> dict[str, bytes]:
    files = {}
    for name, count in names_and_counts.items():
        files[f"bin-images/{name}.jpg"] = synthetic_jpegs[count]
        files[f"metadata/{name}.json"] = metadata(count)
    return files


def s3_source(client, proxy, bucket: str, files: dict[str, bytes], **options) -> S3Source:
    upload_tree(client, bucket, "abid", files)  # straight to moto: only reads go through the proxy
    return S3Source(f"s3://{bucket}/abid", endpoint_url=proxy.url, read_timeout_s=READ_TIMEOUT_S, **options)


# --- S3: faults of one object --------------------------------------------------

GOOD = {"g1": 1, "g2": 2, "g3": 3, "g4": 1}


def test_s3_faults_of_one_object_are_its_skip_reason(s3_client, fault_proxy, synthetic_jpegs):
    faulty = {"forbidden-photo": 1, "forbidden-meta": 2, "throttled": 3, "stalled": 1, "cut": 2}
    source = s3_source(s3_client, fault_proxy, "faults-one", bins(synthetic_jpegs, {**GOOD, **faulty}),
                       max_attempts=1)
    for key, kind in {"bin-images/forbidden-photo.jpg": "forbidden", "metadata/forbidden-meta.json": "forbidden",
                      "bin-images/throttled.jpg": "slowdown", "bin-images/stalled.jpg": "stall",
                      "bin-images/cut.jpg": "cut"}.items():
        fault_proxy.fail(key, kind)
    started = time.monotonic()
    subset = fetch_subset(source, classes=CLASSES, per_class=None, candidate_ids=list(GOOD) + list(faulty),
                          workers=4, progress=False)
    assert time.monotonic() - started < 15
    assert sorted(subset.ids) == sorted(GOOD)
    skipped = dict(subset.skipped)
    assert set(skipped) == set(faulty)
    assert "bin-images/forbidden-photo.jpg: 403 AccessDenied" in skipped["forbidden-photo"]
    assert "metadata/forbidden-meta.json: 403 AccessDenied" in skipped["forbidden-meta"]
    assert "bin-images/throttled.jpg: 503 SlowDown" in skipped["throttled"]
    assert "bin-images/stalled.jpg: ReadTimeoutError" in skipped["stalled"] and "after 2 tries" in skipped["stalled"]
    assert "bin-images/cut.jpg" in skipped["cut"] and "after 2 tries" in skipped["cut"]
    assert all(reason.startswith("cannot read ") for reason in skipped.values())
    # bounded retries: botocore retried the 503 once (max_attempts=1), we retried the stalled and the cut
    # body once, nobody retried a 403
    hits = fault_proxy.hits
    assert hits["abid/bin-images/throttled.jpg"] == 2
    assert hits["abid/bin-images/stalled.jpg"] == 2 and hits["abid/bin-images/cut.jpg"] == 2
    assert hits["abid/bin-images/forbidden-photo.jpg"] == 1


@pytest.mark.parametrize("kind", ["cut", "stall"])
def test_s3_body_reads_are_retried_and_the_object_kept(s3_client, fault_proxy, synthetic_jpegs, kind):
    source = s3_source(s3_client, fault_proxy, f"faults-transient-{kind}", bins(synthetic_jpegs, GOOD))
    fault_proxy.fail("bin-images/g2.jpg", kind, times=2)  # the first two answers fail, the third is whole
    subset = fetch_subset(source, classes=CLASSES, per_class=None, candidate_ids=list(GOOD), workers=2,
                          progress=False)
    assert sorted(subset.ids) == sorted(GOOD) and subset.skipped == []
    assert fault_proxy.hits["abid/bin-images/g2.jpg"] == 3
    assert subset.stored[subset.ids.index("g2")] is not None


# --- S3: the source failing as a whole still ends the fetch fast ---------------

def test_an_endpoint_that_goes_down_mid_fetch_ends_it_fast(s3_client, fault_proxy, synthetic_jpegs):
    # A regression guard (today's code did this too): connection refused is the source's failure.
    names = {f"b{i:02d}": 1 + i % 3 for i in range(30)}
    source = s3_source(s3_client, fault_proxy, "faults-down", bins(synthetic_jpegs, names), max_attempts=1)
    fault_proxy.fail("metadata/b05.json", "down")
    started = time.monotonic()
    with pytest.raises(SourceUnreachable) as error:
        fetch_subset(source, classes=CLASSES, per_class=None, candidate_ids=list(names), ordered=True, workers=4,
                     progress=False)
    assert time.monotonic() - started < 15
    assert "s3://faults-down/abid" in str(error.value) and "--source synthetic" in str(error.value)


def test_a_source_that_refuses_every_photo_ends_the_fetch_not_in_thousands_of_skips(
        s3_client, fault_proxy, synthetic_jpegs):
    from bincount.data.sources import FAILURE_STREAK

    names = {f"b{i:02d}": 1 + i % 3 for i in range(3 * FAILURE_STREAK)}
    source = s3_source(s3_client, fault_proxy, "faults-all", bins(synthetic_jpegs, names))
    fault_proxy.fail("bin-images/", "forbidden")  # every photo; the metadata reads fine
    with pytest.raises(SourceUnreachable, match=f"failed for {FAILURE_STREAK} objects in a row under bin-images/"):
        fetch_subset(source, classes=CLASSES, per_class=None, candidate_ids=list(names), workers=4, progress=False)
    assert sum(n for key, n in fault_proxy.hits.items() if "bin-images/" in key) < len(names)


# --- local folders: one bad file each ------------------------------------------

def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def decompression_bomb() -> bytes:
    """A valid 1-bit PNG of 20000 x 9000 pixels (twice Pillow's MAX_IMAGE_PIXELS and more) in about
    25 KB. Written by hand, in pieces: Pillow would need the whole 180 MB image in memory to save it."""
    width, height = 20_000, 9_000
    row = b"\0" * (1 + width // 8)  # filter byte, then 1 bit a pixel
    compressor = zlib.compressobj(9)
    data = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", data) + png_chunk(b"IEND", b"")


def test_the_bomb_is_one_that_pillow_refuses_to_open():
    import io

    from PIL import Image

    raw = decompression_bomb()
    assert len(raw) < 100_000
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(raw))


def local_cases(synthetic_jpegs) -> dict[str, tuple[dict[str, bytes], str, str]]:
    """case -> (files, the bad bin's id, what its skip reason must say)."""
    return {
        "decompression bomb": ({"bin-images/bomb.jpg": decompression_bomb(), "metadata/bomb.json": metadata(1)},
                               "bomb", "unreadable image: decompression bomb"),
        "nested metadata": ({"bin-images/deep.jpg": synthetic_jpegs[1], "metadata/deep.json": b"[" * 100_000},
                            "deep", "malformed metadata: nested too deeply"),
        "count too long to parse": ({"bin-images/long.jpg": synthetic_jpegs[1],
                                     "metadata/long.json": b'{"EXPECTED_QUANTITY": 1' + b"0" * 4999 + b"}"},
                                    "long", "malformed metadata: ValueError: Exceeds the limit"),
        "count too big to be one": ({"bin-images/huge.jpg": synthetic_jpegs[1],
                                     "metadata/huge.json": b'{"EXPECTED_QUANTITY": 1' + b"0" * 3999 + b"}"},
                                    "huge", "not a plausible count"),
        "metadata is a folder": ({"bin-images/folder.jpg": synthetic_jpegs[1],
                                  "metadata/folder.json/inside.txt": b"x"},
                                 "folder", "cannot read metadata/folder.json: a folder, not a file"),
        "photo is a folder": ({"bin-images/photodir.jpg/inside.txt": b"x", "metadata/photodir.json": metadata(2)},
                              "photodir", "cannot read bin-images/photodir.jpg: a folder, not a file"),
    }


@pytest.mark.parametrize("case", ["decompression bomb", "nested metadata", "count too long to parse",
                                  "count too big to be one", "metadata is a folder", "photo is a folder"])
def test_a_bad_local_object_is_its_skip_reason(tmp_path, synthetic_jpegs, case):
    files, bad_id, reason = local_cases(synthetic_jpegs)[case]
    root = write_tree(tmp_path, {**bins(synthetic_jpegs, GOOD), **files})
    # the bad bin in the source's own listing, among good ones
    subset = fetch_subset(LocalSource(root), classes=CLASSES, per_class=None, workers=2, progress=False)
    assert sorted(subset.ids) == sorted(GOOD)
    assert [i for i, _ in subset.skipped] == [bad_id]
    assert reason in subset.skipped[0][1]


@pytest.mark.parametrize("bad_id,reason", [
    ("../../outside", "unusable id '../../outside': a path"),
    ("a\0b", "has control characters"),
    ("x" * 300, "File name too long"),
    ("", "unusable id ''"),
])
def test_an_id_that_names_no_file_is_its_skip_reason(tmp_path, synthetic_jpegs, bad_id, reason):
    root = write_tree(tmp_path / "source", bins(synthetic_jpegs, GOOD))
    # a bin outside the source, where '../../outside' leads from metadata/ and bin-images/: never read
    write_tree(tmp_path, {"outside.json": metadata(1), "outside.jpg": synthetic_jpegs[1]})
    subset = fetch_subset(LocalSource(root), classes=CLASSES, per_class=None, candidate_ids=list(GOOD) + [bad_id],
                          workers=2, progress=False)
    assert sorted(subset.ids) == sorted(GOOD)
    assert len(subset.skipped) == 1 and subset.skipped[0][0] == bad_id and reason in subset.skipped[0][1]


def test_a_local_source_reads_nothing_outside_its_folder(tmp_path):
    (tmp_path / "source" / "metadata").mkdir(parents=True)
    (tmp_path / "secret.json").write_text("{}")
    with pytest.raises(OSError, match="not a key inside the source folder"):  # UnreadableObject
        LocalSource(tmp_path / "source").read("metadata/../../secret.json")
