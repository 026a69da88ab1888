"""Benchmark: which shard format stores bincount's photos for training.

Every format gets the same samples: the original JPEG bytes of each photo in
``bin-images/`` (never re-encoded), its integer label (``EXPECTED_QUANTITY``
from ``metadata/<id>.json``) and its string id (ids are strings: ``00526`` and
``526`` are different bins). Each writer puts them into shards of at most
``--shard-bytes`` (64 MB = 64,000,000 bytes, a hard limit: it is asserted)
under ``--work`` on local disk. Then every sample is read back, bytes only (no
JPEG decode): once "cold", right after the format's files were written back
and evicted from the page cache (``posix_fadvise(DONTNEED)`` on those files
only), then ``--reads`` times warm through the dataset's iterator (the fastest
pass counts), then ``--reads`` times warm by ``dataset[i]`` for every i where
the format has random access. Every pass checks the bytes, labels and ids
against the originals (a mismatch is a failed row, not a figure).

Rows:

* **files**: the baseline, measured in the same run: each original ``.jpg`` is
  opened and read one by one from the sample folder (what a loader without
  shards does). Its "write" is nothing: the photos already are files.
* **webdataset**: ``webdataset.ShardWriter`` (POSIX tar, key = position, the id
  in ``.id``, the label in ``.cls``), read with ``webdataset.WebDataset(urls,
  shardshuffle=False)`` and no decoder. ShardWriter's ``maxsize`` is soft (it
  counts payload only and rolls over after a shard has passed it), so the
  benchmark rolls over itself from the exact tar size; members get a fixed
  integer mtime (the default float mtime adds a 1 KiB PAX header per member).
* **mds**: MosaicML streaming, ``streaming.MDSWriter`` (columns ``str``,
  ``int``, ``bytes``, no compression; its ``size_limit`` is hard) and
  ``streaming.StreamingDataset(local=...)`` with no remote, ``shuffle=False``.
* **litdata**: ``litdata.streaming.writer.BinaryWriter`` (what
  ``litdata.optimize`` runs in each of its workers; here in this process, like
  the other writers; its ``chunk_bytes`` is a target that one item may cross,
  so it gets the limit less the largest item) and
  ``litdata.StreamingDataset(input_dir=...)``.

All reads run in this one process, no DataLoader workers: the per-sample cost
of each reader, which workers would divide but not remove.

For each: write seconds, cold and warm read samples/s (and as a ratio to the
baseline), warm MB/s, random-access samples/s, bytes on disk against the sum
of the JPEG sizes, number and largest size of the shards, the seconds to open
the dataset object, the seconds to import the package in a fresh interpreter, and the distributions that import
pulls in beyond what the project already loads (numpy, Pillow, torch,
torchvision), each marked with where it was found. A package that is not
installed gives a "not installed" row; a format that fails gives a "failed"
row with the error, and the other rows still run.

Then, on the same photos, the cost behind "store original bytes or pre-resized
copies": decode + resize to 224x224 (``Image.open(BytesIO(raw)).convert("RGB")
.resize((224, 224), Image.BILINEAR, reducing_gap=3.0)``, the call of
``bincount.data.images.decode``) from the original JPEG, against the same from
a copy whose longer side was brought to 320 px with the same resize call
(never enlarged: photos already at most 320 px keep their size) and saved as
JPEG quality 90. Both decodes of a photo run back to back, so load from other
processes weighs on both alike. It reports images/s of each, the time it took
to make the copies, the size ratio of the copies to the originals, and the mean
absolute difference (0-255 scale, over all pixels and channels) between the two
224 px results.

Warm figures measure the reader's own per-sample cost, not the disk; cold
ones add this machine's local disk (a virtual disk whose host may cache too).
Neither is S3: remote reads favour few large objects far more than a local disk
does. Shards are deleted at the end unless ``--keep``. Exit status 1 when a
format failed (a missing package is not a failure).

Run (packages the project does not declare can live outside the venv, so that
installing them changes nothing in it)::

    .venv/bin/python -m pip install --target /tmp/fmtpkgs --no-deps \\
        mosaicml-streaming litdata lightning-utilities 'transformers<5' 'huggingface_hub<1' \\
        safetensors 'tokenizers>=0.22,<=0.23' Brotli python-snappy cramjam zstd xxhash catalogue
    PYTHONPATH=/tmp/fmtpkgs nice -n 10 .venv/bin/python benchmarks/shard_formats.py \\
        --out /tmp/shard_formats.json

See ``--help``. Photos come from ``--data`` / ``BINCOUNT_ABID_SAMPLE`` /
``../shared/abid-sample`` next to the repository; they are read there, never
copied into the repository.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
import traceback
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "abid-sample"
MB = 1000 * 1000

# What the project imports anyway when it trains: not counted as "extra".
BASE_IMPORTS = ("numpy", "PIL.Image", "torch", "torchvision")
FORMATS = ("files", "webdataset", "mds", "litdata")
IMPORTS = {"files": (), "webdataset": ("webdataset",), "mds": ("streaming",), "litdata": ("litdata",)}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Write the bin photos' original JPEG bytes into WebDataset, MosaicML MDS and litdata "
                    "shards, read every sample back, and compare with reading the .jpg files one by one; "
                    "then the decode+resize cost of originals against pre-resized copies.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("BINCOUNT_ABID_SAMPLE", DEFAULT_DATA)),
                        help="abid-sample folder (bin-images/, metadata/)")
    parser.add_argument("--out", type=Path, default=None, help="write all figures to this JSON file")
    parser.add_argument("--work", type=Path, default=Path("/tmp/fmtbench"),
                        help="where the temporary shards go (one folder per format, emptied first, deleted at the end)")
    parser.add_argument("--formats", default=",".join(FORMATS), help="comma-separated subset of " + ",".join(FORMATS))
    parser.add_argument("--shard-bytes", type=int, default=64 * MB, help="largest shard allowed, in bytes")
    parser.add_argument("--reads", type=int, default=3, help="read passes per format; the fastest counts")
    parser.add_argument("--limit", type=int, default=0, help="use only the first N photos (a smoke test)")
    parser.add_argument("--size", type=int, default=224, help="side of the decoded square")
    parser.add_argument("--copy-side", type=int, default=320, help="longer side of the pre-resized copies")
    parser.add_argument("--copy-quality", type=int, default=90, help="JPEG quality of the pre-resized copies")
    parser.add_argument("--no-decode", action="store_true", help="skip the decode+resize comparison")
    parser.add_argument("--keep", action="store_true", help="keep the shards under --work")
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------- data


def load_samples(data: Path, limit: int = 0) -> tuple[list[str], list[int], list[bytes], list[Path]]:
    images = data / "bin-images"
    if not images.is_dir():
        sys.exit(f"no photos at {images}: pass --data or set BINCOUNT_ABID_SAMPLE")
    paths = sorted(images.glob("*.jpg"))
    if limit:
        paths = paths[:limit]
    ids, labels, raws = [], [], []
    for path in paths:
        ids.append(path.stem)  # a string: never int()
        labels.append(int(json.loads((data / "metadata" / f"{path.stem}.json").read_text())["EXPECTED_QUANTITY"]))
        raws.append(path.read_bytes())
    return ids, labels, raws, paths


def disk_usage(folder: Path) -> dict:
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return {"files": len(files), "bytes": sum(p.stat().st_size for p in files),
            "allocated_bytes": sum(p.stat().st_blocks * 512 for p in files)}


def evict(paths: list[Path]) -> None:
    """Write these files back and drop their pages from the page cache (other files are left alone)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            try:
                os.fsync(fd)  # pages must be clean to be dropped; a no-op for files long written
            except OSError:
                pass
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def check(got: list[tuple[str, int, bytes]], ids, labels, raws) -> None:
    """Every sample back, once, with its bytes, label and id unchanged (order may differ)."""
    assert len(got) == len(ids), f"read {len(got)} samples, wrote {len(ids)}"
    want = {i: (label, raw) for i, label, raw in zip(ids, labels, raws)}
    seen = set()
    for sid, label, raw in got:
        assert isinstance(sid, str), f"id {sid!r} came back as {type(sid).__name__}"
        assert sid in want and sid not in seen, f"id {sid!r} unknown or read twice"
        seen.add(sid)
        assert int(label) == want[sid][0], f"{sid}: label {label!r} != {want[sid][0]}"
        assert isinstance(raw, bytes) and raw == want[sid][1], f"{sid}: bytes differ from the original JPEG"


# ----------------------------------------------------------------------------- formats
# Each: write(folder, ids, labels, raws, limit) and open(folder) -> object; read(object) -> [(id, label, bytes)].


class Files:
    """The baseline: the original .jpg files, opened and read one by one."""

    def __init__(self, paths: list[Path], data: Path):
        self.paths, self.data = paths, data

    def write(self, folder, ids, labels, raws, limit):
        return None  # nothing to write: the photos are files already

    def open(self, folder):
        metadata = self.data / "metadata"
        # Labels as a loader without shards has them: read from metadata once, kept in memory.
        return [(p, p.stem, int(json.loads((metadata / f"{p.stem}.json").read_text())["EXPECTED_QUANTITY"]))
                for p in self.paths]

    def read(self, index):
        out = []
        for path, sid, label in index:
            with open(path, "rb") as f:
                out.append((sid, label, f.read()))
        return out

    def read_indexed(self, index):
        return self.read(index)  # files are random access already: the same loop

    def shards(self, folder):
        return [p for p in self.paths]


class WebDatasetFormat:
    def __init__(self):
        import webdataset  # noqa: F401 - ImportError -> "not installed"

    def write(self, folder, ids, labels, raws, limit):
        import webdataset as wds

        folder.mkdir(parents=True)
        # ShardWriter's maxsize is a soft target: it counts payload bytes only (no tar headers, padding or
        # end-of-archive record) and rolls over only after a shard has passed it. So the rollover is done
        # here, from the exact tar size (512-byte header + payload padded to 512 per member; two zero blocks
        # and padding to tarfile's 10240-byte record at the end), with ShardWriter's own limits out of reach.
        # mtime is a fixed integer: TarWriter's default (the float time.time()) makes Python's tarfile add a
        # 1 KiB PAX header to every member, 3 KiB a sample here, and makes shards differ from run to run.
        def tar_bytes(members):
            return -(-(members + 1024) // 10240) * 10240

        size = 0
        with wds.ShardWriter(str(folder / "shard-%06d.tar"), maxsize=float("inf"), maxcount=10**12,
                             verbose=0, mtime=0) as sink:
            for n, (sid, label, raw) in enumerate(zip(ids, labels, raws)):
                # key = position: WebDataset splits a key at its first dot, and an id may hold one
                sample = {"__key__": f"{n:09d}", "id": sid.encode("utf-8"), "cls": str(label).encode("ascii"),
                          "jpg": raw}
                cost = sum(512 + -(-len(v) // 512) * 512 for k, v in sample.items() if k != "__key__")
                if n and tar_bytes(size + cost) > limit:
                    sink.next_stream()
                    size = 0
                sink.write(sample)
                size += cost

    def open(self, folder):
        import webdataset as wds

        return wds.WebDataset([str(p) for p in self.shards(folder)], shardshuffle=False)

    def read(self, dataset):
        return [(s["id"].decode("utf-8"), s["cls"], s["jpg"]) for s in dataset]

    def shards(self, folder):
        return sorted(folder.glob("*.tar"))


class MDSFormat:
    def __init__(self):
        import streaming  # noqa: F401

    def write(self, folder, ids, labels, raws, limit):
        from streaming import MDSWriter

        columns = {"id": "str", "label": "int", "jpeg": "bytes"}
        with MDSWriter(out=str(folder), columns=columns, compression=None, size_limit=limit, progress_bar=False) as w:
            for sid, label, raw in zip(ids, labels, raws):
                w.write({"id": sid, "label": label, "jpeg": raw})

    def open(self, folder):
        from streaming import StreamingDataset

        return StreamingDataset(local=str(folder), remote=None, shuffle=False, batch_size=1)

    def read(self, dataset):
        return [(s["id"], s["label"], s["jpeg"]) for s in dataset]

    def read_indexed(self, dataset):
        return [(s["id"], s["label"], s["jpeg"]) for s in (dataset[i] for i in range(len(dataset)))]

    def shards(self, folder):
        return sorted(folder.glob("*.mds"))

    @staticmethod
    def cleanup():
        try:
            from streaming.base.util import clean_stale_shared_memory

            clean_stale_shared_memory()
        except Exception:  # noqa: BLE001 - best effort
            pass


class LitdataFormat:
    def __init__(self):
        import litdata  # noqa: F401

    def write(self, folder, ids, labels, raws, limit):
        from litdata.streaming.writer import BinaryWriter

        folder.mkdir(parents=True)
        # chunk_bytes is a target: a chunk is closed after the item that crosses it (litdata's own comment),
        # so leave room for the largest item and the chunk header (item count + one offset per item).
        margin = max(len(r) for r in raws) + 4 * (len(raws) + 2) + 4096
        writer = BinaryWriter(str(folder), chunk_bytes=limit - margin)
        for n, (sid, label, raw) in enumerate(zip(ids, labels, raws)):
            writer[n] = {"id": sid, "label": label, "jpeg": raw}
        writer.done()
        writer.merge()

    def open(self, folder):
        import litdata

        return litdata.StreamingDataset(input_dir=str(folder), shuffle=False)

    def read(self, dataset):
        return [(s["id"], s["label"], s["jpeg"]) for s in dataset]

    def read_indexed(self, dataset):
        return [(s["id"], s["label"], s["jpeg"]) for s in (dataset[i] for i in range(len(dataset)))]

    def shards(self, folder):
        return sorted(folder.glob("*.bin"))


# ----------------------------------------------------------------------------- packages

_PROBE = r"""
import importlib, importlib.metadata as md, json, sys, sysconfig, time
for m in sys.argv[1].split(","):
    importlib.import_module(m)
base = {m.split(".")[0] for m in sys.modules}
t = time.perf_counter()
for m in sys.argv[2].split(","):
    importlib.import_module(m)
took = time.perf_counter() - t
venv = sysconfig.get_paths()["purelib"]
p2d = md.packages_distributions()
dists = {}
for top in sorted({m.split(".")[0] for m in sys.modules} - base):
    for name in p2d.get(top, []):
        d = md.distribution(name)
        where = str(d.locate_file(""))
        dists[d.metadata["Name"]] = {"version": d.version, "in_venv": where.rstrip("/") == venv.rstrip("/"),
                                     "where": where}
print(json.dumps({"import_s": took, "dists": dists}))
"""


def probe_imports(modules: tuple[str, ...]) -> dict:
    """Import time and the distributions newly loaded, in a fresh interpreter with this one's sys.path."""
    if not modules:
        return {"import_s": 0.0, "dists": {}}
    proc = subprocess.run([sys.executable, "-c", _PROBE, ",".join(BASE_IMPORTS), ",".join(modules)],
                          capture_output=True, text=True, timeout=300, env=dict(os.environ))
    if proc.returncode:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"rc {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- run one format


def run_format(name, fmt, folder: Path, ids, labels, raws, args) -> dict:
    total = sum(len(r) for r in raws)
    row: dict = {"format": name, "status": "ok"}
    if name != "files":
        shutil.rmtree(folder, ignore_errors=True)
        t = time.perf_counter()
        fmt.write(folder, ids, labels, raws, args.shard_bytes)
        row["write_s"] = time.perf_counter() - t
        usage = disk_usage(folder)
        shards = fmt.shards(folder)
        sizes = [p.stat().st_size for p in shards]
        row.update(disk_bytes=usage["bytes"], disk_allocated_bytes=usage["allocated_bytes"], disk_files=usage["files"],
                   shards=len(shards), largest_shard_bytes=max(sizes))
        assert shards and max(sizes) <= args.shard_bytes, f"a shard of {max(sizes)} bytes > {args.shard_bytes}"
    else:
        sizes = [p.stat().st_size for p in fmt.paths]
        row.update(write_s=None, disk_bytes=sum(sizes),
                   disk_allocated_bytes=sum(p.stat().st_blocks * 512 for p in fmt.paths),
                   disk_files=len(sizes), shards=len(sizes), largest_shard_bytes=max(sizes))
    row["disk_ratio"] = row["disk_bytes"] / total
    row["disk_allocated_ratio"] = row["disk_allocated_bytes"] / total

    # Cold: one pass after this format's files were written back and evicted from the page cache
    # (posix_fadvise DONTNEED on those files only); what a first epoch from local disk costs.
    on_disk = fmt.shards(folder) if name == "files" else sorted(p for p in folder.rglob("*") if p.is_file())
    evict(on_disk)
    t = time.perf_counter()
    dataset = fmt.open(folder)
    row["open_s"] = time.perf_counter() - t
    t = time.perf_counter()
    got = fmt.read(dataset)
    row["cold_read_s"] = time.perf_counter() - t
    row["cold_read_samples_per_s"] = len(ids) / row["cold_read_s"]
    check(got, ids, labels, raws)
    del got
    times = []
    for _ in range(args.reads):
        t = time.perf_counter()
        got = fmt.read(dataset)
        times.append(time.perf_counter() - t)
        check(got, ids, labels, raws)  # every pass, outside the timing
        del got
    row["read_s_all"] = times
    row["read_s"] = min(times)
    row["read_samples_per_s"] = len(ids) / row["read_s"]
    row["read_mb_per_s"] = total / MB / row["read_s"]
    if hasattr(fmt, "read_indexed"):  # random access, dataset[i] in index order: what a shuffled sampler needs
        times = []
        for _ in range(args.reads):
            t = time.perf_counter()
            got = fmt.read_indexed(dataset)
            times.append(time.perf_counter() - t)
            check(got, ids, labels, raws)
            del got
        row["indexed_read_s_all"] = times
        row["indexed_samples_per_s"] = len(ids) / min(times)
    row["bytes_equal"] = True
    del dataset
    return row


# ----------------------------------------------------------------------------- decode + resize


def decode_compare(raws: list[bytes], size: int, side: int, quality: int) -> dict:
    import numpy as np
    from PIL import Image

    def decode(raw):
        with Image.open(io.BytesIO(raw)) as image:
            return image.convert("RGB").resize((size, size), Image.BILINEAR, reducing_gap=3.0)

    t = time.perf_counter()
    copies, kept_size, short_below = [], 0, 0
    for raw in raws:
        with Image.open(io.BytesIO(raw)) as image:
            image = image.convert("RGB")
            w, h = image.size
            scale = side / max(w, h)
            if scale < 1:  # never enlarge
                image = image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR,
                                     reducing_gap=3.0)
            else:
                kept_size += 1
            short_below += min(image.size) < size
            buf = io.BytesIO()
            image.save(buf, format="JPEG", quality=quality)
        copies.append(buf.getvalue())
    make_s = time.perf_counter() - t

    t_orig = t_copy = 0.0
    abs_sum = 0
    per_image = []
    for raw, copy in zip(raws, copies):
        t0 = time.perf_counter()
        a = decode(raw)
        t1 = time.perf_counter()
        b = decode(copy)
        t2 = time.perf_counter()
        t_orig += t1 - t0
        t_copy += t2 - t1
        d = np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16))
        abs_sum += int(d.sum())
        per_image.append(float(d.mean()))
    n = len(raws)
    return {
        "images": n,
        "orig_images_per_s": n / t_orig,
        "copy_images_per_s": n / t_copy,
        "speedup": t_orig / t_copy,
        "make_copies_s": make_s,
        "make_copies_images_per_s": n / make_s,
        "orig_bytes": sum(len(r) for r in raws),
        "copy_bytes": sum(len(c) for c in copies),
        "copy_size_ratio": sum(len(c) for c in copies) / sum(len(r) for r in raws),
        "copies_not_resized": kept_size,
        "copies_short_side_below_size": short_below,
        "mean_abs_diff": abs_sum / (n * size * size * 3),
        "mean_abs_diff_worst_image": max(per_image),
        "mean_abs_diff_p95_image": float(np.percentile(per_image, 95)),
        "copy_side": side,
        "copy_quality": quality,
        "size": size,
    }


# ----------------------------------------------------------------------------- report


def _mb(b):
    return f"{b / MB:.1f}"


def print_table(rows: list[dict], n: int, total: int) -> None:
    base = next((r for r in rows if r["format"] == "files" and r["status"] == "ok"), None)

    def ratio(r, key):
        return f"{r[key] / base[key]:.2f}" if base else "-"

    head = (f"{'format':<11} {'write s':>7} {'open s':>6} {'cold/s':>7} {'x files':>7} {'warm/s':>7} {'x files':>7} "
            f"{'warm MB/s':>9} {'[i]/s':>6} {'disk MB':>7} {'x jpeg':>6} {'shards':>6} {'max MB':>6} {'import s':>8} "
            f"{'bytes==':>7}  loaded from outside the venv")
    print(head)
    print("-" * len(head))
    for r in rows:
        pk = r.get("packages", {})
        dists = pk.get("dists", {})
        extra = ("probe failed: " + pk["error"]) if "error" in pk else (
            ", ".join(f"{k} {v['version']}" for k, v in sorted(dists.items(), key=lambda kv: kv[0].lower())
                      if not v["in_venv"]) or "-")
        if r["status"] != "ok":
            print(f"{r['format']:<11} {r['status']}")
            continue
        write = f"{r['write_s']:.2f}" if r["write_s"] is not None else "-"
        imp = f"{pk['import_s']:.2f}" if "import_s" in pk else "-"
        print(f"{r['format']:<11} {write:>7} {r['open_s']:>6.2f} {r['cold_read_samples_per_s']:>7.0f} "
              f"{ratio(r, 'cold_read_samples_per_s'):>7} {r['read_samples_per_s']:>7.0f} "
              f"{ratio(r, 'read_samples_per_s'):>7} {r['read_mb_per_s']:>9.0f} "
              f"{(format(r['indexed_samples_per_s'], '.0f') if 'indexed_samples_per_s' in r else '-'):>6} "
              f"{_mb(r['disk_bytes']):>7} "
              f"{r['disk_ratio']:>6.3f} {r['shards']:>6} {_mb(r['largest_shard_bytes']):>6} {imp:>8} "
              f"{'yes' if r['bytes_equal'] else 'NO':>7}  {extra}")
    print(f"({n} samples, {_mb(total)} MB of JPEG. cold/s: samples/s of one pass right after the format's "
          "files were evicted from the page cache; warm/s: best of the warm passes through the dataset's iterator; "
          "[i]/s: best warm pass of dataset[i] for every i (random access; a tar has none); all bytes only, no "
          "decode. x files: as a ratio to the files row. x jpeg: bytes on disk / sum of JPEG sizes. bytes==: every "
          "sample's bytes, label and id equal the originals, asserted on every pass.)")
    for r in rows:
        if r["status"] != "ok":
            continue
        pk = r.get("packages", {})
        dists = pk.get("dists", {})
        venv = sorted((k for k, v in dists.items() if v["in_venv"]), key=str.lower)
        print(f"  {r['format']}: warm passes {', '.join(f'{t:.3f}' for t in r['read_s_all'])} s, cold "
              f"{r['cold_read_s']:.3f} s; allocated on disk {r['disk_allocated_ratio']:.3f} x jpeg "
              f"({r['disk_files']} files)")
        if venv:
            print(f"    its import also loads, from the venv: {', '.join(venv)}")


def print_decode(d: dict) -> None:
    print()
    print(f"decode + resize to {d['size']}x{d['size']} (PIL BILINEAR, reducing_gap=3.0), {d['images']} photos, "
          "one thread:")
    print(f"  from original JPEG        {d['orig_images_per_s']:8.1f} images/s")
    print(f"  from {d['copy_side']} px q{d['copy_quality']} copy       {d['copy_images_per_s']:8.1f} images/s"
          f"   ({d['speedup']:.2f}x)")
    print(f"  making the copies         {d['make_copies_images_per_s']:8.1f} images/s "
          f"({d['make_copies_s']:.1f} s, once)")
    print(f"  copy size / original size {d['copy_size_ratio']:8.3f}   ({_mb(d['copy_bytes'])} MB vs "
          f"{_mb(d['orig_bytes'])} MB; {d['copies_not_resized']} photos already <= {d['copy_side']} px kept their "
          f"size, {d['copies_short_side_below_size']} copies have a short side < {d['size']})")
    print(f"  mean |original - copy| at {d['size']} px: {d['mean_abs_diff']:.3f} / 255 "
          f"(95th percentile photo {d['mean_abs_diff_p95_image']:.3f}, worst {d['mean_abs_diff_worst_image']:.3f})")


def main(argv=None) -> int:
    args = parse_args(argv)
    names = [f.strip() for f in args.formats.split(",") if f.strip()]
    unknown = set(names) - set(FORMATS)
    if unknown:
        sys.exit(f"unknown formats: {', '.join(sorted(unknown))}")
    ids, labels, raws, paths = load_samples(args.data, args.limit)
    total = sum(len(r) for r in raws)
    print(f"{len(ids)} photos from {args.data}, {_mb(total)} MB of JPEG; shards <= {args.shard_bytes} bytes "
          f"under {args.work}; python {sys.version.split()[0]}, pid {os.getpid()}, nice {os.nice(0)}")
    args.work.mkdir(parents=True, exist_ok=True)

    rows = []
    try:
        for name in names:
            row: dict = {"format": name}
            row["packages"] = probe_imports(IMPORTS[name])
            try:
                fmt = {"files": lambda: Files(paths, args.data), "webdataset": WebDatasetFormat, "mds": MDSFormat,
                       "litdata": LitdataFormat}[name]()
            except ImportError as exc:
                row.update(status=f"not installed ({exc})")
                rows.append(row)
                print(f"{name}: not installed ({exc})", flush=True)
                continue
            try:
                row.update(run_format(name, fmt, args.work / name, ids, labels, raws, args))
            except Exception as exc:  # noqa: BLE001 - one format failing must not stop the others
                traceback.print_exc()
                row.update(status=f"failed: {type(exc).__name__}: {exc}"[:300])
            finally:
                if isinstance(fmt, MDSFormat):
                    fmt.cleanup()
            rows.append(row)
            print(f"{name}: {row['status']}" + (f", {row['read_samples_per_s']:.0f} samples/s"
                                                if row["status"] == "ok" else ""), flush=True)
    finally:
        if not args.keep:
            for name in names:
                shutil.rmtree(args.work / name, ignore_errors=True)
            try:
                args.work.rmdir()
            except OSError:
                pass

    print()
    print_table(rows, len(ids), total)
    decode = None
    if not args.no_decode:
        decode = decode_compare(raws, args.size, args.copy_side, args.copy_quality)
        print_decode(decode)

    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"samples": len(ids), "jpeg_bytes": total, "shard_limit_bytes": args.shard_bytes,
                                        "reads": args.reads, "rows": rows, "decode": decode,
                                        "python": sys.version, "data": str(args.data)}, indent=2))
        print(f"\nwrote {args.out}")
    return 1 if any(r["status"].startswith("failed") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
