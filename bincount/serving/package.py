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
import tarfile
from pathlib import Path

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


def extract_archive(source: bytes | Path, dest: str | Path) -> Path:
    """Unpack a .tar.gz (its bytes, or a file) into ``dest``, refusing entries that would
    land or link outside it: the archive may come from S3, written by someone else."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    with _open_archive(source) as tar:
        if hasattr(tarfile, "data_filter"):  # Python 3.11.4+
            tar.extractall(dest, filter="data")
        else:
            _refuse_unsafe_members(tar, dest)
            tar.extractall(dest)
    return dest


def _open_archive(source: bytes | Path) -> tarfile.TarFile:
    if isinstance(source, bytes):
        return tarfile.open(fileobj=io.BytesIO(source), mode="r:gz")
    return tarfile.open(source, "r:gz")


def _refuse_unsafe_members(tar: tarfile.TarFile, dest: Path) -> None:
    """What the 'data' filter refuses, for Pythons that lack it: anything but plain files
    and folders, and anything outside ``dest``."""
    root = dest.resolve()
    for member in tar.getmembers():
        if not (member.isfile() or member.isdir()) or not (root / member.name).resolve().is_relative_to(root):
            raise tarfile.TarError(f"refusing entry {member.name!r}")


def extract_package(package: bytes, model_dir: str | Path) -> Path:
    """Unpack :func:`build_package`'s bytes into ``model_dir``, as SageMaker does into /opt/ml/model."""
    return extract_archive(package, model_dir)
