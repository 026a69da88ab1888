"""model.tar.gz, laid out the way SageMaker's PyTorch container expects it::

    model.pt                  the weights (a state_dict, or {"members": [...]} for an ensemble)
    model.json                architecture, classes, image size, run id
    code/inference.py         the handler: re-exports bincount.serving.handler
    code/bincount/...         this whole library, subpackages included, so the handler
                              needs nothing else
    code/requirements.txt     what the container must pip-install

The local endpoint serves from the same extracted package, with ``code/`` first
on the import path, so it runs exactly the code a SageMaker endpoint would.
"""

from __future__ import annotations

import io
import os
import shutil
import tarfile
from pathlib import Path, PurePosixPath, PureWindowsPath

import bincount
from bincount.aws.containers import INFERENCE_REQUIREMENTS, requirements_txt
from bincount.model.metadata import ModelMeta

HANDLER = "from bincount.serving.handler import input_fn, model_fn, output_fn, predict_fn  # noqa: F401\n"
REQUIREMENTS = requirements_txt(INFERENCE_REQUIREMENTS)


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def library_files() -> list[tuple[str, Path]]:
    """Every Python file of the bincount package this process imports, as (path relative to
    the folder that holds ``bincount/``, file), subpackages included: what a container needs
    to import the same code. Walked, not listed, so a new subpackage can never drop out."""
    library = Path(bincount.__file__).resolve().parent
    return [(path.relative_to(library.parent).as_posix(), path) for path in sorted(library.rglob("*.py"))
            if "__pycache__" not in path.parts]


def build_package(state_dict: bytes, meta: ModelMeta | dict) -> bytes:
    """The model.tar.gz bytes for a model's weights and metadata."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        _add_bytes(tar, "model.pt", state_dict)
        _add_bytes(tar, "model.json", ModelMeta.from_dict(meta).to_json().encode())
        _add_bytes(tar, "code/inference.py", HANDLER.encode())
        _add_bytes(tar, "code/requirements.txt", REQUIREMENTS.encode())
        for name, path in library_files():
            _add_bytes(tar, f"code/{name}", path.read_bytes())
    return buf.getvalue()


class UnsafeArchiveError(tarfile.TarError):
    """An archive entry that could write outside the destination, or is not a plain file or folder."""


def extract_archive(source: bytes | Path, dest: str | Path) -> Path:
    """Unpack a .tar.gz (its bytes, or a file) into ``dest``, refusing entries that would
    land or link outside it: the archive may come from S3, written by someone else.

    Every entry is checked first (:func:`check_members`), so a bad archive writes nothing,
    on any Python. The extraction itself then uses tarfile's 'data' filter where tarfile has
    it (3.8.17, 3.9.17, 3.10.12, 3.11.4 and later; ``filter=`` is a TypeError before), and
    :func:`extract_checked` where it does not: the project allows any 3.10.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    with _open_archive(source) as tar:
        if hasattr(tarfile, "data_filter"):
            check_members(tar, dest)  # the filter would strip a leading "/" and allow links: refuse them alike
            tar.extractall(dest, filter="data")
        else:
            extract_checked(tar, dest)
    return dest


def _open_archive(source: bytes | Path) -> tarfile.TarFile:
    if isinstance(source, bytes):
        return tarfile.open(fileobj=io.BytesIO(source), mode="r:gz")
    return tarfile.open(source, "r:gz")


def check_members(tar: tarfile.TarFile, dest: str | Path) -> list[tarfile.TarInfo]:
    """The archive's entries, once each is a plain file or folder with a relative path,
    free of "..", that stays inside ``dest`` (even through a link already in ``dest``).
    Raises UnsafeArchiveError, naming the entry, otherwise. A package never holds anything
    else, so links, devices and absolute paths are refused rather than rewritten."""
    root = Path(dest).resolve()
    members = tar.getmembers()
    for member in members:
        path = PurePosixPath(member.name)
        if not (member.isfile() or member.isdir()):
            raise UnsafeArchiveError(f"refusing entry {member.name!r}: not a plain file or folder")
        if path.is_absolute() or PureWindowsPath(member.name).anchor or ".." in path.parts or "\\" in member.name:
            raise UnsafeArchiveError(f"refusing entry {member.name!r}: an absolute path, a '..' or a backslash")
        if not (root / path).resolve().is_relative_to(root):
            raise UnsafeArchiveError(f"refusing entry {member.name!r}: it would land outside {root}")
    return members


def extract_checked(tar: tarfile.TarFile, dest: str | Path) -> None:
    """What the 'data' filter does, for Pythons whose tarfile lacks it: check every entry,
    then write the folders and files here, with no owner taken from the archive and
    permissions limited as the filter limits them (no setuid/setgid/sticky bits, no write
    for group or others). Plain ``extractall`` would chown to the archive's owners when
    run as root, as SageMaker's containers are, and keep those bits."""
    root = Path(dest)
    for member in check_members(tar, root):
        target = root / member.name
        if member.isdir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        with tar.extractfile(member) as src, open(target, "wb") as out:
            shutil.copyfileobj(src, out)
        mode = member.mode & 0o755
        os.chmod(target, (mode if mode & 0o100 else mode & ~0o111) | 0o600)


def extract_package(package: bytes, model_dir: str | Path) -> Path:
    """Unpack :func:`build_package`'s bytes into ``model_dir``, as SageMaker does into /opt/ml/model."""
    return extract_archive(package, model_dir)
