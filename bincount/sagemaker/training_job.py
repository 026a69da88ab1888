"""bincount's training entry point in SageMaker script mode, and the formats both sides share.

SageMaker runs it in the training container (the launcher is
bincount.sagemaker.training), from a ``train.py`` that sits beside a copy of
the ``bincount`` package, the way SageMaker runs any script::

    python train.py --name a --arch resnet18 --lr 0.001 --classes "[1, 2, 3]" --seed 0 ...
    torchrun --nnodes=2 --nproc_per_node=4 train.py --name a ...      (distributed)

It reads

- the hyperparameters: every :class:`TrainConfig` field (``name`` required) plus
  ``seed`` and ``classes`` (required), from ``SM_HPS`` (JSON, which SageMaker
  sets) or else from ``--key value`` arguments; values may arrive as strings
  and are converted to the field's type;
- ``SM_CHANNEL_TRAIN``: the branch's data as :func:`write_channel` lays it out
  (``split.csv`` with ``id,label,split,shard,checksum``, the train and validation
  rows only, and the photos in WebDataset shards under ``shards/``);
- ``SM_CHANNEL_SHARDS`` (optional): where the run's shards already sat in S3, the
  job reads them from this channel instead, and ``SM_CHANNEL_TRAIN`` holds only
  ``split.csv``. The shards hold the test photos too, but nothing reads them: the
  split file names only train and validation rows;
- ``SM_MODEL_DIR``: where :func:`save_result` puts the weights and the rest of
  the :class:`TrainResult`; SageMaker tars it into ``model.tar.gz`` and the
  launcher reads it back with :func:`load_result`;
- ``SM_OUTPUT_DATA_DIR`` (optional): the curves as ``history.csv``, for people
  looking at the job (SageMaker's ``output.tar.gz``);
- ``SM_OUTPUT_FAILURE`` (optional): where an error's message goes, which
  SageMaker reports as the job's FailureReason;
- ``BINCOUNT_CHECKPOINT_DIR`` (optional, ``/opt/ml/checkpoints`` in a job): the
  training state is saved there after every epoch, and a job that finds one there
  (SageMaker restores the folder when it restarts a job) goes on after its epoch.

Run by hand::

    SM_CHANNEL_TRAIN=channel SM_MODEL_DIR=model python -m bincount.sagemaker.training_job \\
        --name a --arch resnet18 --pretrained false --epochs 2 --classes 1,2,3
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import sys
import typing
from dataclasses import fields
from pathlib import Path
from typing import Mapping, Sequence

from bincount.data.shards import DEFAULT_SHARD_BYTES
from bincount.model.grid import TrainConfig
from bincount.model.train import TrainResult
from bincount.validation import build

CHANNEL = "train"  # the job's split file (and its shards, unless they have a channel of their own)
CHANNEL_ENV = f"SM_CHANNEL_{CHANNEL.upper()}"
SHARDS_CHANNEL = "shards"  # the run's own shards, where they already sit in S3
SHARDS_CHANNEL_ENV = f"SM_CHANNEL_{SHARDS_CHANNEL.upper()}"
# The job's checkpoint folder: SageMaker syncs it with the job's checkpoint_s3_uri (restored when
# a job restarts). The launcher sets the variable; SageMaker itself sets none for it.
CHECKPOINT_LOCAL_PATH = "/opt/ml/checkpoints"
CHECKPOINT_DIR_ENV = "BINCOUNT_CHECKPOINT_DIR"
CHANNEL_SPLITS = ("train", "val")  # what leaves the flow; never "test"
SPLIT_FILE = "split.csv"
SPLIT_COLUMNS = ["id", "label", "split", "shard", "checksum"]
SHARDS_DIR = "shards"
SHARD_NAME = re.compile(r"^[A-Za-z0-9_-]*shard-\d{6}\.tar$")  # what ShardSink names them; nothing that leaves shards/
WEIGHTS_FILE = "model.pt"  # TrainResult.state_dict, byte for byte (torch.save; load with weights_only=True)
RESULT_FILE = "result.json"  # every other TrainResult field
HISTORY_FILE = "history.csv"
FORMAT_VERSION = 1
EXTRA_HYPERPARAMETERS = ("seed", "classes", "cache_bytes")
REQUIRED_HYPERPARAMETERS = ("name", "classes")
FAILURE_REASON_MAX = 1000  # SageMaker keeps about 1 KB of FailureReason


class TrainingJobError(ValueError):
    """The job's input (hyperparameters, environment, channel, model folder) is not usable;
    the message says what is wrong and what was expected."""


# --- hyperparameters ---------------------------------------------------------------

def _parses_as_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def encode_hyperparameters(cfg: TrainConfig, *, seed: int, classes: Sequence[int],
                           cache_bytes: int | None = None) -> dict[str, str]:
    """The job's hyperparameters: strings, as SageMaker stores them.

    SageMaker's container JSON-decodes every value it can (``"123"`` becomes
    123, ``"true"`` becomes True), so a string field whose text happens to be
    valid JSON (a grid point named ``"1e-3"``) is sent JSON-quoted and comes back
    as the same string; every other value is sent as plain text, as it reads
    in the SageMaker console.
    """
    values = {**cfg.as_dict(), "seed": int(seed), "classes": [int(c) for c in classes]}
    if cache_bytes is not None:  # the flow's --cache-mb; absent, the job uses the default
        values["cache_bytes"] = int(cache_bytes)
    encoded = {}
    for key, value in values.items():
        if isinstance(value, str):
            encoded[key] = json.dumps(value) if _parses_as_json(value) else value
        else:
            encoded[key] = json.dumps(value)
    return encoded


def hyperparameters_from_args(argv: Sequence[str]) -> dict[str, str]:
    """``--key value`` / ``--key=value`` pairs, as SageMaker's drivers pass hyperparameters."""
    values: dict[str, str] = {}
    args = list(argv)
    i = 0
    while i < len(args):
        token = args[i]
        if not token.startswith("--") or token == "--":
            raise TrainingJobError(f"unexpected argument {token!r}: hyperparameters are given as --key value")
        key, has_value, value = token[2:].partition("=")
        if not has_value:
            if i + 1 >= len(args):
                raise TrainingJobError(f"hyperparameter --{key} has no value")
            value, i = args[i + 1], i + 1
        values[key.replace("-", "_")] = value
        i += 1
    return values


def raw_hyperparameters(argv: Sequence[str], environ: Mapping[str, str]) -> dict:
    """``SM_HPS`` when SageMaker set it, else the command line.

    SM_HPS wins because it is the lossless one: SageMaker's drivers build the
    command line by decoding each value once more and printing it again, which
    turns a string ``"1e-3"`` into ``0.001``.
    """
    if environ.get("SM_HPS"):
        try:
            values = json.loads(environ["SM_HPS"])
        except ValueError as e:
            raise TrainingJobError(f"SM_HPS is not JSON ({e}): {environ['SM_HPS'][:200]!r}") from e
        if not isinstance(values, dict):
            raise TrainingJobError(f"SM_HPS must be a JSON object of hyperparameters, got {values!r:.200}")
        return values
    return hyperparameters_from_args(argv)


def _as_bool(key: str, value) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise TrainingJobError(f"hyperparameter {key}: expected true or false, got {value!r}")


def _as_int(key: str, value) -> int:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value).is_integer():
        raise TrainingJobError(f"hyperparameter {key}: expected a whole number, got {value!r}")
    return int(value)


def _as_float(key: str, value) -> float:
    if isinstance(value, bool):
        raise TrainingJobError(f"hyperparameter {key}: expected a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise TrainingJobError(f"hyperparameter {key}: expected a number, got {value!r}") from None
    if not math.isfinite(number):
        raise TrainingJobError(f"hyperparameter {key}: expected a finite number, got {value!r}")
    return number


def _as_str(key: str, value) -> str:
    if isinstance(value, str):
        if value.startswith('"') and _parses_as_json(value):
            return json.loads(value)  # JSON-quoted by encode_hyperparameters (a command line keeps the quotes)
        return value
    # SageMaker decoded a plain-text value that looked like JSON; its JSON text is the original.
    return json.dumps(value)


def _as_classes(value) -> list[int]:
    if isinstance(value, str):
        text = value.strip()
        try:
            value = json.loads(text) if text.startswith("[") else [int(c) for c in text.split(",") if c.strip()]
        except ValueError:
            value = None
    if not isinstance(value, list) or not value or \
            not all(isinstance(c, int) and not isinstance(c, bool) for c in value):
        raise TrainingJobError(f"hyperparameter classes: expected a list of counts such as [1, 2, 3] or 1,2,3, "
                               f"got {value!r}")
    if len(set(value)) != len(value):
        raise TrainingJobError(f"hyperparameter classes: {value} repeats a count")
    return value


CONVERTERS = {bool: _as_bool, int: _as_int, float: _as_float, str: _as_str}


def _converter(hint):
    """The converter for a TrainConfig field's type; a Literal's is that of its values."""
    if typing.get_origin(hint) is typing.Literal:
        hint = type(typing.get_args(hint)[0])
    return CONVERTERS[hint]


def parse_hyperparameters(raw: Mapping) -> tuple[TrainConfig, int, list[int]]:
    """(config, seed, classes) from hyperparameters as they arrive in the container."""
    types = typing.get_type_hints(TrainConfig)
    known = [f.name for f in fields(TrainConfig)] + list(EXTRA_HYPERPARAMETERS)
    # sagemaker_* keys are the platform's own (the SDK adds some for its drivers).
    values = {k: v for k, v in raw.items() if not k.startswith("sagemaker_")}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise TrainingJobError(f"unknown hyperparameter(s) {unknown}; known: {known}")
    missing = [k for k in REQUIRED_HYPERPARAMETERS if k not in values]
    if missing:
        raise TrainingJobError(f"missing hyperparameter(s) {missing}: the job needs at least name and classes")
    config = {k: _converter(types[k])(k, v) for k, v in values.items() if k not in EXTRA_HYPERPARAMETERS}
    seed = _as_int("seed", values.get("seed", 0))
    classes = _as_classes(values["classes"])
    try:
        cfg = build(TrainConfig, config, "hyperparameters")
    except ValueError as e:
        raise TrainingJobError(str(e)) from e
    return cfg, seed, classes


# --- the channel -------------------------------------------------------------------

def write_channel(photos: Mapping[str, bytes], split_table, dest_dir, *,
                  max_shard_bytes: int = DEFAULT_SHARD_BYTES, copy_shards: bool = True) -> Path:
    """Lay out the train and validation rows of ``split_table`` (id, label, split) and their
    photos as the job's channel: ``split.csv`` in the table's order (so training sees the
    photos in the same order as a local run), with each photo's shard and checksum, and the
    photos themselves in ``shards/`` (bincount.data.shards), written as they stream from
    ``photos``. Returns ``dest_dir``.

    With ``copy_shards=False`` (``photos`` a :class:`bincount.data.shards.Photos`), only
    ``split.csv`` is written, naming the shards the photos already sit in: the job then
    reads those shards from their own channel (:data:`SHARDS_CHANNEL`), not from a copy."""
    from bincount.data.shards import Photos, read_photos, write_shards

    dest = Path(dest_dir)
    rows = split_table[split_table["split"].isin(CHANNEL_SPLITS)]
    ids = [str(i) for i in rows["id"]]
    missing = [i for i in ids if i not in photos]
    if missing:
        raise TrainingJobError(f"{len(missing)} bin(s) of the split have no photo, e.g. {missing[:5]}")
    label = dict(zip(ids, (int(x) for x in rows["label"])))
    if copy_shards:
        _, index = write_shards(dest / SHARDS_DIR, ((i, label[i], raw) for i, raw in read_photos(photos, ids)),
                                max_bytes=max_shard_bytes)
        stored = index.set_index("id").to_dict("index")
    elif isinstance(photos, Photos):
        stored = {i: {"shard": photos.shard_of(i), "checksum": photos.checksum_of(i)} for i in ids}
    else:
        raise TypeError("copy_shards=False needs photos that already sit in shards (a Photos)")
    dest.mkdir(parents=True, exist_ok=True)
    with open(dest / SPLIT_FILE, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(SPLIT_COLUMNS)
        writer.writerows((i, label[i], split, stored[i]["shard"], stored[i]["checksum"])
                         for i, split in zip(ids, rows["split"]))
    return dest


def _split_rows(path: Path) -> list[tuple[str, int, str, str, str]]:
    with open(path, newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header != SPLIT_COLUMNS:
            raise TrainingJobError(f"{path}: header must be {','.join(SPLIT_COLUMNS)}, got {header}")
        rows = []
        for line, row in enumerate(reader, start=2):
            if (len(row) != len(SPLIT_COLUMNS) or row[2] not in CHANNEL_SPLITS or not re.fullmatch(r"-?\d+", row[1])
                    or not SHARD_NAME.match(row[3])):
                raise TrainingJobError(f"{path} line {line}: expected <id>,<count>,train|val,<shard>,<checksum>, "
                                       f"got {row}")
            rows.append((row[0], int(row[1]), row[2], row[3], row[4]))
    return rows


def read_channel(channel_dir, shards_dir=None) -> tuple[Mapping[str, bytes], object]:
    """The photos (id -> JPEG bytes, read from the channel's shards) and split table (a
    DataFrame: id, label, split, shard, checksum) of a channel written by :func:`write_channel`;
    ``shards_dir``: where the shards are when they came in a channel of their own."""
    import pandas as pd

    from bincount.data.shards import Photos, ShardSet

    root = Path(channel_dir)
    split_path = root / SPLIT_FILE
    if not split_path.is_file():
        raise TrainingJobError(f"{split_path} not found: the channel must hold {SPLIT_FILE} and "
                               f"{SHARDS_DIR}/ (see bincount.sagemaker.training_job.write_channel)")
    rows = _split_rows(split_path)
    ids = [r[0] for r in rows]
    if len(set(ids)) != len(ids):
        raise TrainingJobError(f"{split_path}: a bin id appears twice")
    for split in CHANNEL_SPLITS:
        if not any(r[2] == split for r in rows):
            raise TrainingJobError(f"{split_path} has no {split} rows: training needs both train and val photos")
    shards_root = Path(shards_dir) if shards_dir else root / SHARDS_DIR
    shards = sorted({r[3] for r in rows})
    missing = [s for s in shards if not (shards_root / s).is_file()]
    if missing:
        raise TrainingJobError(f"{len(missing)} shard(s) listed in {split_path} are not in "
                               f"{shards_root}, e.g. {missing[:5]}")
    table = pd.DataFrame(rows, columns=SPLIT_COLUMNS)
    return Photos(ShardSet(str(shards_root), tuple(shards)), table), table


# --- the result ----------------------------------------------------------------------

def _jsonable(value):
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def save_result(result: TrainResult, model_dir, *, job: Mapping | None = None) -> Path:
    """Write ``result`` to ``model_dir``: the weights byte for byte (``model.pt``) and every
    other field (``result.json``); ``job`` (optional) is kept beside them for people."""
    root = Path(model_dir)
    root.mkdir(parents=True, exist_ok=True)
    (root / WEIGHTS_FILE).write_bytes(result.state_dict)
    values = {f.name: getattr(result, f.name) for f in fields(TrainResult) if f.name != "state_dict"}
    document = {"format": FORMAT_VERSION, "result": values, **({"job": dict(job)} if job else {})}
    # Python's float repr round-trips exactly, and json writes inf (a val_loss before
    # any epoch) as Infinity and reads it back: the loaded result equals this one.
    (root / RESULT_FILE).write_text(json.dumps(document, default=_jsonable))
    return root


def load_result(model_dir) -> TrainResult:
    """The :class:`TrainResult` that :func:`save_result` wrote to ``model_dir``."""
    root = Path(model_dir)
    missing = [name for name in (WEIGHTS_FILE, RESULT_FILE) if not (root / name).is_file()]
    if missing:
        present = sorted(p.name for p in root.iterdir()) if root.is_dir() else "no such folder"
        raise TrainingJobError(f"{root} has no {' or '.join(missing)}: not a bincount training job's model "
                               f"folder (it holds: {present})")
    document = json.loads((root / RESULT_FILE).read_text())
    if document.get("format") != FORMAT_VERSION:
        raise TrainingJobError(f"{root / RESULT_FILE}: format {document.get('format')!r}, this bincount reads "
                               f"format {FORMAT_VERSION}")
    known = {f.name for f in fields(TrainResult)} - {"state_dict"}
    values = {k: v for k, v in document["result"].items() if k in known}
    return TrainResult(state_dict=(root / WEIGHTS_FILE).read_bytes(), **values)


def write_history_csv(history: list[dict], path) -> None:
    columns = list(dict.fromkeys(key for row in history for key in row))
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(history)


# --- the entry point -------------------------------------------------------------------

def _directory(environ: Mapping[str, str], name: str, what: str, *, create: bool = False) -> Path:
    value = environ.get(name)
    if not value:
        raise TrainingJobError(f"{name} is not set: it names {what}. SageMaker sets it in a training job; "
                               f"by hand, set it to a folder")
    path = Path(value)
    if create:
        path.mkdir(parents=True, exist_ok=True)
    elif not path.is_dir():
        raise TrainingJobError(f"{name}={value} is not a folder; it should hold {what}")
    return path


def _write_failure(message: str, environ: Mapping[str, str]) -> None:
    """Tell SageMaker why: the first line written to SM_OUTPUT_FAILURE becomes the job's
    FailureReason (its driver writes only a generic 'command failed' when the file is empty)."""
    print(f"bincount training job failed: {message}", file=sys.stderr, flush=True)
    path = environ.get("SM_OUTPUT_FAILURE")
    if path and not os.path.exists(path):
        try:
            Path(path).write_text(message[:FAILURE_REASON_MAX])
        except OSError:
            pass  # the message is in the log either way


def run(argv: Sequence[str], environ: Mapping[str, str]) -> TrainResult | None:
    """Train as the hyperparameters and environment say; rank 0 writes the model folder.
    Returns the result (None on ranks that wrote nothing)."""
    raw = raw_hyperparameters(argv, environ)
    cfg, seed, classes = parse_hyperparameters(raw)
    cache_bytes = _as_int("cache_bytes", raw["cache_bytes"]) if "cache_bytes" in raw else None
    channel = _directory(environ, CHANNEL_ENV, "the job's data channel (split.csv, shards/)")
    shards = _directory(environ, SHARDS_CHANNEL_ENV, "the run's shards") if environ.get(SHARDS_CHANNEL_ENV) else None
    model_dir = _directory(environ, "SM_MODEL_DIR", "the folder for the trained model", create=True)
    images, split_table = read_channel(channel, shards)
    stray = sorted(set(split_table["label"]) - set(classes))
    if stray:
        raise TrainingJobError(f"split.csv has counts {stray} that are not among classes {classes}")
    print(f"bincount training job: {cfg.name}, {len(split_table)} photos "
          f"({split_table['split'].value_counts().to_dict()}), classes {classes}, seed {seed}", flush=True)

    from bincount.model.distributed import cleanup, world
    from bincount.model.train import train_on_split

    checkpoints = None
    if environ.get(CHECKPOINT_DIR_ENV):  # a job restarted (spot) goes on from its last epoch
        from bincount.model.checkpoint import Checkpoints

        checkpoints = Checkpoints(environ[CHECKPOINT_DIR_ENV])
    try:
        result = train_on_split(cfg, images, split_table, classes, seed=seed, cache_bytes=cache_bytes,
                                checkpoints=checkpoints)
        if world()[0] != 0:  # under torchrun every rank has the result; one writes it
            return None
    finally:
        cleanup()
    save_result(result, model_dir, job={"classes": classes, "seed": seed,
                                        "training_job_name": environ.get("TRAINING_JOB_NAME")})
    if environ.get("SM_OUTPUT_DATA_DIR"):
        output = Path(environ["SM_OUTPUT_DATA_DIR"])
        output.mkdir(parents=True, exist_ok=True)
        write_history_csv(result.history, output / HISTORY_FILE)
    print(f"bincount training job: best epoch {result.best_epoch}, val accuracy {result.val_accuracy:.3f}, "
          f"wrote {model_dir}", flush=True)
    return result


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    environ = os.environ if environ is None else environ
    try:
        run(sys.argv[1:] if argv is None else argv, environ)
    except TrainingJobError as e:
        _write_failure(str(e), environ)
        return 2
    except Exception as e:
        _write_failure(f"{type(e).__name__}: {e}", environ)
        raise  # the traceback goes to the job's log
    return 0


if __name__ == "__main__":
    sys.exit(main())
