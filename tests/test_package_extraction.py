"""Extracting a model.tar.gz that someone else wrote: nothing lands or links outside the
destination, on every Python the project allows (>= 3.10), with or without tarfile's
'data' filter (3.10.12 / 3.11.4 and later)."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest

from bincount.serving.package import build_package, extract_archive, extract_checked

REPO = Path(__file__).resolve().parents[1]
META = {"arch": "resnet18", "image_size": 64, "classes": [1, 2, 3, 4, 5], "run_id": "test-run"}


def archive(*entries: tarfile.TarInfo | tuple[str, bytes, int]) -> bytes:
    """A .tar.gz of (name, data, mode) files and ready-made TarInfo entries, in order."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for entry in entries:
            if isinstance(entry, tarfile.TarInfo):
                tar.addfile(entry)
                continue
            name, data, mode = entry
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), mode
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def special(name: str, kind: bytes, target: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


def bad_entries(outside: Path) -> dict[str, tarfile.TarInfo | tuple[str, bytes, int]]:
    """Entries a model package never holds, each named by what it tries."""
    return {
        "parent folder": ("../model-evil/x", b"evil", 0o644),
        "absolute path": (str(outside / "abs-evil" / "x"), b"evil", 0o644),
        "'..' that climbs out": ("code/../../escape", b"evil", 0o644),
        "symlink outside": special("code/link", tarfile.SYMTYPE, "../../outside"),
        "absolute symlink": special("etc", tarfile.SYMTYPE, "/etc"),
        "symlink inside": special("alias.pt", tarfile.SYMTYPE, "model.pt"),
        "hard link outside": special("passwd", tarfile.LNKTYPE, "/etc/passwd"),
        "fifo": special("pipe", tarfile.FIFOTYPE),
    }


def extract_with_fallback(source: bytes, dest: Path) -> Path:
    """The extraction that Pythons without tarfile.data_filter get; this Python may have it."""
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(source), mode="r:gz") as tar:
        extract_checked(tar, dest)
    return dest


EXTRACTORS = {"extract_archive": extract_archive, "fallback": extract_with_fallback}


@pytest.mark.parametrize("extract", EXTRACTORS.values(), ids=EXTRACTORS.keys())
@pytest.mark.parametrize("kind", bad_entries(Path("/")).keys())
def test_an_entry_that_could_escape_is_refused_and_nothing_is_written(tmp_path, extract, kind):
    outside = tmp_path / "outside"
    outside.mkdir()
    entry = bad_entries(outside)[kind]
    name = entry.name if isinstance(entry, tarfile.TarInfo) else entry[0]
    dest = tmp_path / "unpack" / "model"
    # a good entry first: a refused archive must leave nothing behind, not half a model
    with pytest.raises(tarfile.TarError, match=re.escape(repr(name))):
        extract(archive(("model.json", b"{}", 0o644), entry), dest)
    assert list(dest.iterdir()) == []
    assert sorted(p.name for p in (tmp_path / "unpack").iterdir()) == ["model"]  # no model-evil, no escape
    assert list(outside.iterdir()) == []


@pytest.mark.parametrize("extract", EXTRACTORS.values(), ids=EXTRACTORS.keys())
def test_a_file_through_a_link_already_in_the_destination_is_refused(tmp_path, extract):
    outside, dest = tmp_path / "outside", tmp_path / "model"
    outside.mkdir()
    dest.mkdir()
    (dest / "code").symlink_to(outside)
    with pytest.raises(tarfile.TarError, match="code/x"):
        extract(archive(("code/x", b"evil", 0o644)), dest)
    assert list(outside.iterdir()) == []


@pytest.mark.parametrize("extract", EXTRACTORS.values(), ids=EXTRACTORS.keys())
def test_a_package_extracts_whole_with_safe_permissions(tmp_path, extract):
    package = build_package(b"weights", META)  # the weights are never loaded here
    odd = archive(("setuid", b"#!/bin/sh\n", 0o4777), ("read-only", b"r", 0o444), ("private", b"p", 0o640),
                  ("dir/nested/file", b"n", 0o664))
    got = extract(package, tmp_path / "package")
    with tarfile.open(fileobj=io.BytesIO(package)) as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
    assert {name: (got / name).read_bytes() for name in files} == files
    assert json.loads((got / "model.json").read_text())["run_id"] == "test-run"

    got = extract(odd, tmp_path / "odd")
    modes = {name: stat.S_IMODE((got / name).stat().st_mode) for name in ("setuid", "read-only", "private",
                                                                           "dir/nested/file")}
    # what the 'data' filter makes of them: no setuid, no write for others; the owner reads and writes
    assert modes == {"setuid": 0o755, "read-only": 0o644, "private": 0o640, "dir/nested/file": 0o644}


# Run by a Python whose tarfile has no 'data' filter, with this checkout's bincount.
WITHOUT_FILTER = """
import json, sys, tarfile
from bincount.serving.package import extract_archive
assert not hasattr(tarfile, "data_filter")
good, bad, dest = sys.argv[1:]
extract_archive(open(good, "rb").read(), dest + "/good")
try:
    extract_archive(open(bad, "rb").read(), dest + "/bad")
    refused = None
except tarfile.TarError as e:
    refused = str(e)
print(json.dumps({"python": sys.version, "refused": refused}))
"""


def python_without_tar_filter() -> str | None:
    """An interpreter on this machine that is >= 3.10 and whose tarfile lacks the 'data' filter."""
    candidates = [os.environ.get("BINCOUNT_PYTHON_WITHOUT_TAR_FILTER"), "/usr/bin/python3", "/usr/bin/python3.10",
                  "/usr/bin/python3.11", shutil.which("python3.10"), shutil.which("python3.11")]
    probe = "import sys, tarfile; print(sys.version_info >= (3, 10) and not hasattr(tarfile, 'data_filter'))"
    for python in dict.fromkeys(c for c in candidates if c and os.path.exists(c)):
        try:
            out = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if out.stdout.strip() == "True":
            return python
    return None


def test_extraction_works_on_a_python_without_the_data_filter(tmp_path):
    """The defect itself: ``filter=`` is a TypeError before 3.10.12 / 3.11.4, so every
    extraction failed there. Needs such an interpreter (Debian 12's python3 is 3.11.2)."""
    python = python_without_tar_filter()
    if python is None:
        pytest.skip("no Python >= 3.10 without tarfile.data_filter here (set BINCOUNT_PYTHON_WITHOUT_TAR_FILTER)")
    package = build_package(b"weights", META)
    (tmp_path / "good.tar.gz").write_bytes(package)
    (tmp_path / "bad.tar.gz").write_bytes(archive(("model.json", b"{}", 0o644), ("../model-evil/x", b"evil", 0o644)))
    out = subprocess.run([python, "-c", WITHOUT_FILTER, str(tmp_path / "good.tar.gz"), str(tmp_path / "bad.tar.gz"),
                          str(tmp_path)], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                         env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert "model-evil" in (result["refused"] or ""), result
    assert not (tmp_path / "model-evil").exists() and list((tmp_path / "bad").iterdir()) == []
    assert (tmp_path / "good" / "code" / "bincount" / "serving" / "handler.py").read_bytes() == \
        (REPO / "bincount" / "serving" / "handler.py").read_bytes()
