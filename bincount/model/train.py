"""How a model trains: one grid point, start to finish.

Photos reach the network as uint8 batches from a split (:class:`CachedSplit`: decoded
once into memory, so an epoch costs only augmentation and the network; or
:class:`StreamedSplit`: read from the run's shards every epoch by the loader's worker
processes, for splits too big for memory; see bincount.data.loader). The weights of the epoch with
the best validation accuracy are kept (ties: lower validation loss), which is
early stopping without a patience knob to tune.

The same code trains data-parallel under torch.distributed (torchrun and the
launchers built on it; see bincount.model.distributed): each process decodes and
trains on its own shards of the photos, and all of them return the same result.
"""

from __future__ import annotations

import io
import math
import os
import tempfile
import time
from collections.abc import Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from typing import Callable

from bincount.data.images import augment_batch, normalizer
from bincount.data.shards import Photos
from bincount.model.architectures import create_model, get_arch, head_name
from bincount.model.distributed import all_gather, all_reduce_sum, broadcast_buffers, init_from_env, shard, world
from bincount.model.grid import TrainConfig
from bincount.model.predictor import Predictor, autocast, autocast_dtype, pick_device

# How the test suite makes a branch fail or hang; never set in normal use. ``name`` fails the
# grid point of that name after the first epoch each attempt trains (so it fails every attempt);
# ``name:k`` fails it once, right after epoch k is checkpointed (a retry goes on from epoch k+1).
FAIL_ENV = "BINCOUNT_FAIL_TRAIN"
# ``name:k``: after epoch k is checkpointed, that grid point starts epoch k+1 and sleeps after its
# first batch, mid-epoch (for a test to kill the run there).
HANG_ENV = "BINCOUNT_HANG_TRAIN"
LOCK_PATH = os.path.join(tempfile.gettempdir(), "bincount-train.lock")


@contextmanager
def machine_lock(path: str = LOCK_PATH):
    """Let one training run at a time use this machine's cores or GPU.

    Metaflow runs foreach branches of a local run in parallel; two trainings
    on one CPU each start a thread per core and thrash each other (measured
    here: 6 images/s each instead of about 150 for one alone). On Batch or
    Kubernetes every branch has its own machine and the lock is never contended.
    Data-parallel processes on one machine must not take it: they would wait
    for each other forever.
    """
    import fcntl

    import threading

    if _HELD.get(path) == threading.get_ident():  # already this thread's: an adaptive search trial
        yield                                      # holds it from its draw to its end
        return
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        _HELD[path] = threading.get_ident()
        try:
            yield
        finally:
            del _HELD[path]
            fcntl.flock(handle, fcntl.LOCK_UN)


_HELD: dict[str, int] = {}  # lock file -> the thread holding it (a second flock of it would deadlock)


class TrainingTimeout(TimeoutError):
    """A grid point took longer than its time limit."""


@contextmanager
def time_limit(seconds: float | None, what: str):
    """Raise :class:`TrainingTimeout` in this thread once ``seconds`` have passed.

    SIGALRM interrupts whatever the thread is doing, a read that hangs included, which a check
    between epochs would not. Only in a POSIX process's main thread (where signals are delivered);
    elsewhere, and without ``seconds``, there is no limit. Metaflow's own ``@timeout`` uses the
    same signal and counts from the task's start, lock wait included, which is why the train step
    uses this instead.
    """
    import signal
    import threading

    if not seconds or not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum, frame):
        raise TrainingTimeout(f"{what} took longer than its limit of {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@dataclass
class TrainResult:
    config: dict
    state_dict: bytes  # torch.save of the best epoch's state_dict; load with weights_only=True
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    val_accuracy: float = 0.0
    val_loss: float = math.inf
    train_seconds: float = 0.0
    images_per_second: float = 0.0
    device: str = "cpu"
    # The best epoch's softmax on each validation photo, alone and averaged over
    # its four flips: what the join needs to score ensembles and TTA.
    val_probabilities: list = field(default_factory=list)
    val_probabilities_tta: list = field(default_factory=list)
    # The epoch after which early stopping (a search's) ended training; 0: it trained every epoch.
    stopped_after: int = 0

    # A train task keeps its result as three artifacts, so the Client can read a branch's
    # curves (``history``) and scores (``scores``) without loading its weights (``state_dict``).
    ARTIFACTS = ("scores", "history", "state_dict")

    def to_artifacts(self) -> dict:
        scores = {k: v for k, v in asdict(self).items() if k not in {"state_dict", "history"}}
        return {"scores": scores, "history": self.history, "state_dict": self.state_dict}

    @classmethod
    def from_artifacts(cls, task) -> "TrainResult":
        """From anything with the three artifacts as attributes: a join's input, a Task's data."""
        return cls(**task.scores, state_dict=task.state_dict, history=task.history)


def _batches(n: int, batch_size: int, generator=None):
    import torch

    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    for start in range(0, n, batch_size):
        yield order[start:start + batch_size]


class CachedSplit:
    """A split decoded into memory: uint8 images ``x`` (N, 3, S, S), class indices ``y``, and
    the photos' ids (positions when not given)."""

    def __init__(self, x, y, ids: list | None = None):
        self.x, self.y = x, y
        self.ids = list(range(len(x))) if ids is None else list(ids)

    def __len__(self) -> int:
        return len(self.x)

    def labels(self):
        return self.y

    def batches(self, epoch: int, batch_size: int, generator):
        """A shuffled epoch, drawn from ``generator`` (the same draws as every earlier version)."""
        for idx in _batches(len(self.x), batch_size, generator):
            yield self.x[idx], self.y[idx]

    def ordered(self, batch_size: int):
        """(images, class indices, ids) in order, for validation."""
        for idx in _batches(len(self.x), batch_size):
            yield self.x[idx], self.y[idx], [self.ids[i] for i in idx.tolist()]


class StreamedSplit:
    """A split read from its photos every epoch (bincount.data.loader.StreamedPhotos), by
    loader workers suited to ``device``."""

    def __init__(self, photos, ids: list[str], y, image_size: int, *, seed: int, device: str = "cpu",
                 workers: int | None = None):
        from bincount.data.loader import StreamedPhotos, streaming_workers

        self.ids, self.y = list(ids), y
        self._stream = StreamedPhotos(photos, ids, y.tolist(), image_size, seed=seed, pin_memory=device == "cuda",
                                      workers=streaming_workers(device) if workers is None else workers)

    def __len__(self) -> int:
        return len(self.ids)

    def labels(self):
        return self.y

    def batches(self, epoch: int, batch_size: int, generator):
        for x, y, _ in self._stream.batches(epoch, batch_size):
            yield x, y

    def ordered(self, batch_size: int):
        yield from self._stream.batches(0, batch_size, shuffle=False)


def evaluate_split(model, split, *, cfg: TrainConfig, num_classes: int, batch_size: int, device: str,
                   dtype=None):
    """Mean cross-entropy and accuracy of ``model`` on a split."""
    import torch

    predictor = Predictor.of_network(model, arch=cfg.arch, image_size=cfg.image_size, num_classes=num_classes,
                                     device=device, dtype=dtype)
    loss_sum, correct = 0.0, 0
    for x, y, _ in split.ordered(batch_size):
        logits = predictor.logits(x)
        targets = y.to(device)
        loss_sum += torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item()
        correct += (logits.argmax(1) == targets).sum().item()
    return loss_sum / max(len(split), 1), correct / max(len(split), 1)


def make_loss(cfg: TrainConfig, train_y, num_classes: int):
    """The training loss: cross-entropy (label-smoothed, optionally class-balanced), plus
    ``count_loss_weight`` times the squared error of the softmax's expected count.

    The expected-count term is what makes the loss know that counts are ordered:
    cross-entropy alone charges a 4-for-5 mistake as much as a 1-for-5 one, and
    RMSE does not.
    """
    import torch

    weight = None
    if cfg.class_balanced:
        freq = torch.bincount(train_y, minlength=num_classes).float().clamp(min=1)
        weight = freq.sum() / (num_classes * freq)
    cross_entropy = torch.nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing)
    counts = torch.arange(num_classes, dtype=torch.float32)

    def loss(logits, targets):
        logits = logits.float()
        value = cross_entropy(logits, targets)
        if cfg.count_loss_weight:
            expected = torch.softmax(logits, 1) @ counts.to(logits.device)
            value = value + cfg.count_loss_weight * ((expected - targets.float()) ** 2).mean()
        return value

    return loss


def param_groups(model, cfg: TrainConfig) -> list[dict]:
    """The new head at ``lr``, the pretrained body at ``lr * backbone_lr_factor``."""
    head = head_name(cfg.arch) + "."
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in trainable if n.startswith(head)], "lr": cfg.lr},
              {"params": [p for n, p in trainable if not n.startswith(head)], "lr": cfg.lr * cfg.backbone_lr_factor}]
    return [g for g in groups if g["params"]]


def epoch_steps(shard_sizes: list[int], batch_size: int) -> int:
    """Optimizer steps per epoch: one pass over the smallest rank's shard. Every rank must take
    the same number of steps, or the ranks that step on wait for the others forever."""
    return math.ceil(min(shard_sizes) / batch_size)


def train_one_epoch(model, optimizer, scheduler, data, *, cfg: TrainConfig, device, dtype,
                    generator, progress: bool, epoch: int, criterion, timings: dict | None = None,
                    batch_size: int | None = None, steps: int | None = None, augment_generator=None,
                    after_batch: Callable[[], None] | None = None):
    """One pass over the split ``data`` (or its first ``steps`` batches of ``batch_size``; default
    ``cfg.batch_size``); mean loss and accuracy; ``after_batch`` is called after each optimizer
    step. ``timings`` (if given) gets the seconds spent
    waiting for and preparing batches (loading, augmentation, normalisation, copy to the
    device) and computing (forward, backward, optimizer step).

    ``generator`` (on the CPU) shuffles a cached split. On a GPU the uint8 batch is copied over
    first and augmented there, drawing from ``augment_generator`` (on the device); on the CPU it
    is augmented where it is, drawing from ``generator``.
    """
    import itertools

    import torch

    from bincount.data.progress import progress_bar

    arch = get_arch(cfg.arch)
    norm = normalizer(arch.mean, arch.std)
    model.train()  # frozen early blocks stay in eval mode (bincount.model.architectures.freeze)
    loss_sum, correct, seen = 0.0, 0, 0
    data_seconds = compute_seconds = 0.0
    batch_size = batch_size or cfg.batch_size
    steps = steps or math.ceil(len(data) / batch_size)
    on_device = device != "cpu"
    bar = progress_bar(itertools.islice(data.batches(epoch, batch_size, generator), steps), total=steps,
                       disable=not progress, desc=f"{cfg.name} epoch {epoch}", unit=" batch", leave=False)
    t0 = time.perf_counter()
    for x, y in bar:
        if on_device:
            x = x.to(device, non_blocking=True)
        inputs = norm(augment_batch(x, augment_generator or generator, transpose=cfg.transpose))
        inputs = inputs.to(device).contiguous(memory_format=torch.channels_last)
        targets = y.to(device, non_blocking=True)
        t1 = time.perf_counter()
        with autocast(device, dtype):
            logits = model(inputs)
        loss = criterion(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        loss_sum += loss.item() * len(y)
        correct += (logits.argmax(1) == targets).sum().item()
        seen += len(y)
        t2 = time.perf_counter()
        data_seconds += t1 - t0
        compute_seconds += t2 - t1  # .item() above waited for the device
        bar.set_postfix(loss=f"{loss_sum / seen:.3f}", refresh=False)
        if after_batch is not None:
            after_batch()
        t0 = time.perf_counter()
    if timings is not None:
        timings.update(data_seconds=data_seconds, compute_seconds=compute_seconds)
    return loss_sum / seen, correct / seen


def resource_usage(device: str, cpu_seconds: float, wall_seconds: float) -> dict:
    """This process's CPU use over ``wall_seconds`` (percent of the cores it may use), its peak
    memory, and on CUDA the peak GPU memory (reset here) and utilisation (if NVML answers)."""
    import resource

    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    usage = {"cpu_percent": 100 * cpu_seconds / max(wall_seconds, 1e-9) / cores,
             "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device == "cuda":
        usage["gpu_max_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
        torch.cuda.reset_peak_memory_stats()
        try:
            usage["gpu_utilization_percent"] = float(torch.cuda.utilization())
        except Exception:  # noqa: BLE001 - needs pynvml/NVML; optional
            pass
    return usage


def pooled(world_size: int, loss: float, accuracy: float, n: int) -> tuple[float, float]:
    """Mean loss and accuracy over every rank's photos, from each rank's means over its ``n``."""
    if world_size == 1:
        return loss, accuracy
    loss_sum, correct, total = all_reduce_sum([loss * n, round(accuracy * n), n])
    return loss_sum / max(total, 1), correct / max(total, 1)


def train_model(cfg: TrainConfig, train_x, train_y, val_x, val_y, *, num_classes: int, seed: int = 0,
                device: str | None = None, progress: bool = True) -> TrainResult:
    """Train one grid point on photos already decoded to uint8 tensors: :func:`fit` on
    :class:`CachedSplit` s."""
    return fit(cfg, CachedSplit(train_x, train_y), CachedSplit(val_x, val_y), num_classes=num_classes, seed=seed,
               device=device, progress=progress)


def _test_hook(variable: str, name: str, epoch: int, first: int) -> bool:
    """Whether the test hook in ``variable`` (see FAIL_ENV, HANG_ENV) fires after ``epoch``."""
    value = os.environ.get(variable, "")
    point, _, at = value.partition(":")
    if point != name:
        return False
    return epoch == int(at) if at else epoch == first


def _hang_mid_epoch(name: str, epoch: int) -> Callable[[], None]:
    """HANG_ENV's hang: an ``after_batch`` that sleeps for an hour."""
    def hang() -> None:
        print(f"{HANG_ENV}: {name} hangs in epoch {epoch}, after its first batch", flush=True)
        time.sleep(3600)

    return hang


def _rng_state(generator, augment_generator) -> dict:
    import torch

    state = {"torch": torch.get_rng_state(), "generator": generator.get_state()}
    if augment_generator is not None:
        state["augment_generator"] = augment_generator.get_state()
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict, generator, augment_generator) -> None:
    import torch

    torch.set_rng_state(state["torch"])
    generator.set_state(state["generator"])
    if augment_generator is not None and "augment_generator" in state:
        augment_generator.set_state(state["augment_generator"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def fit(cfg: TrainConfig, train, val, *, num_classes: int, seed: int = 0, device: str | None = None,
        progress: bool = True, val_order: list | None = None, checkpoints=None,
        on_epoch: Callable[[TrainResult], None] | None = None,
        should_stop: Callable[[TrainResult], bool] | None = None) -> TrainResult:
    """Train one grid point; return the best epoch's weights and every epoch's curves.

    ``train`` and ``val`` are splits (:class:`CachedSplit` or :class:`StreamedSplit`). In a
    torch.distributed process group of more than one process, each rank passes its own share
    of the train and validation photos and the model trains under DistributedDataParallel.
    ``cfg.batch_size`` stays the global batch (each rank takes its share), so the learning
    rate means what it means in one process. Every rank returns the same result: curves, best
    epoch and weights over all ranks' photos, and the validation softmax of the whole
    validation set in the order of ``val_order`` (the validation photos' ids; default: the
    order of ``val``).

    ``checkpoints`` (:class:`bincount.model.checkpoint.Checkpoints`): the state is saved there
    after every epoch, and where a state is found there when training starts, it continues
    after that state's epoch. ``on_epoch(result)`` is called after each epoch with the result
    so far (curves, best epoch), for live reports. ``should_stop(result)``, asked after each epoch
    but the last, ends training early when it answers True (a search's early stopping); the result
    keeps the best epoch so far and says where it stopped (``stopped_after``).
    """
    import torch

    from bincount.model.checkpoint import check_compatible

    rank, world_size = world()
    torch.manual_seed(seed)
    device = device or pick_device()
    dtype = autocast_dtype(cfg.precision, device)
    model = create_model(cfg.arch, num_classes=num_classes, pretrained=cfg.pretrained,
                         freeze_backbone=cfg.freeze_backbone, frozen_blocks=cfg.frozen_blocks,
                         image_size=cfg.image_size)
    model = model.to(device).to(memory_format=torch.channels_last)
    groups = param_groups(model, cfg)
    optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    # Class-balanced weights need the class frequencies of all the training photos.
    train_y = train.labels()
    criterion = make_loss(cfg, train_y if world_size == 1 else torch.cat(all_gather(train_y)), num_classes)
    shard_sizes = [len(train)] if world_size == 1 else all_gather(len(train))
    batch_size = max(1, cfg.batch_size // world_size)
    steps_per_epoch = epoch_steps(shard_sizes, batch_size)
    if steps_per_epoch == 0:
        raise ValueError(f"no training photos on some rank (shares of {shard_sizes} photos)")
    images_per_epoch = sum(min(n, steps_per_epoch * batch_size) for n in shard_sizes)
    # One cycle: warm-up, then cosine decay; per group, so the body keeps its lower rate.
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=[g["lr"] for g in groups], total_steps=cfg.epochs * steps_per_epoch,
        pct_start=cfg.warmup_fraction, anneal_strategy="cos")
    # Each rank shuffles, flips and recolours its photos with draws of its own; on a GPU the
    # flips and colours are drawn there, where the batch is augmented.
    generator = torch.Generator().manual_seed(seed + rank)
    augment_generator = None if device == "cpu" else torch.Generator(device=device).manual_seed(seed + rank)
    net = model
    if world_size > 1:
        # The weights above were drawn alike on every rank (and DDP copies rank 0's anyway);
        # dropout and drop-connect from here on should differ between ranks, like their photos.
        torch.manual_seed(seed + rank)
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[torch.cuda.current_device()] if device == "cuda" else None)

    result = TrainResult(config=cfg.as_dict(), state_dict=b"", device=device)
    first = 1
    state = checkpoints.load() if checkpoints is not None else None
    if state is not None:
        check_compatible(state, cfg.as_dict(), num_classes, world_size)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        # every rank saved its own generators' state; each takes back its own
        _set_rng_state(state["rng"][rank], generator, augment_generator)
        result.history = list(state["history"])
        result.best_epoch, result.val_accuracy, result.val_loss, result.state_dict = (
            state["best_epoch"], state["val_accuracy"], state["val_loss"], state["best_state_dict"])
        first = state["epoch"] + 1
        if rank == 0:
            print(f"{cfg.name}: continuing from the checkpoint after epoch {state['epoch']} of {cfg.epochs} "
                  f"({state['source']})", flush=True)
    started = time.perf_counter() - sum(row["epoch_seconds"] for row in result.history)
    for epoch in range(first, cfg.epochs + 1):
        t0, cpu0, timings = time.perf_counter(), time.process_time(), {}
        train_loss, train_acc = train_one_epoch(
            net, optimizer, scheduler, train, cfg=cfg,
            device=device, dtype=dtype, generator=generator, progress=progress and rank == 0, epoch=epoch,
            criterion=criterion, timings=timings, batch_size=batch_size, steps=steps_per_epoch,
            augment_generator=augment_generator,
            after_batch=_hang_mid_epoch(cfg.name, epoch) if _test_hook(HANG_ENV, cfg.name, epoch - 1, first - 1)
            else None)
        train_time = time.perf_counter() - t0
        if world_size > 1:
            broadcast_buffers(model)
        # Validation runs on the network itself, not through DDP: ranks hold different numbers
        # of validation photos, and only the collectives in ``pooled`` need to line up.
        val_loss, val_acc = evaluate_split(model, val, cfg=cfg, num_classes=num_classes,
                                           batch_size=cfg.batch_size * 2, device=device, dtype=dtype)
        trained = min(len(train), steps_per_epoch * batch_size)
        train_loss, train_acc = pooled(world_size, train_loss, train_acc, trained)
        val_loss, val_acc = pooled(world_size, val_loss, val_acc, len(val))
        epoch_seconds = time.perf_counter() - t0
        row = {"epoch": epoch, "train_loss": train_loss, "train_accuracy": train_acc,
               "val_loss": val_loss, "val_accuracy": val_acc, "epoch_seconds": epoch_seconds,
               "train_images_per_second": images_per_epoch / train_time, "lr": scheduler.get_last_lr()[0],
               **timings, "val_seconds": epoch_seconds - train_time,
               **resource_usage(device, time.process_time() - cpu0, epoch_seconds)}
        result.history.append(row)
        if rank == 0:
            print(f"{cfg.name} epoch {epoch}/{cfg.epochs}: train loss {train_loss:.3f} acc {train_acc:.3f} | "
                  f"val loss {val_loss:.3f} acc {val_acc:.3f} | {row['train_images_per_second']:.1f} img/s", flush=True)
        if (val_acc, -val_loss) > (result.val_accuracy, -result.val_loss) or not result.state_dict:
            result.best_epoch, result.val_accuracy, result.val_loss = epoch, val_acc, val_loss
            result.state_dict = state_dict_bytes(model)
        if checkpoints is not None:
            save_checkpoint(checkpoints, epoch, model, optimizer, scheduler, result, num_classes,
                            _rng_state(generator, augment_generator), rank=rank, world_size=world_size)
        if on_epoch is not None and rank == 0:
            on_epoch(result)
        if _test_hook(FAIL_ENV, cfg.name, epoch, first):
            raise RuntimeError(f"{FAIL_ENV}={os.environ[FAIL_ENV]}: failing on purpose after epoch {epoch}")
        if should_stop is not None and epoch < cfg.epochs and _agreed(rank == 0 and should_stop(result), world_size):
            result.stopped_after = epoch
            if rank == 0:
                print(f"{cfg.name}: stopped early after epoch {epoch} of {cfg.epochs}: its best validation accuracy "
                      f"so far ({result.val_accuracy:.3f}) is below the median of the finished trials'", flush=True)
            break
    result.train_seconds = time.perf_counter() - started
    result.images_per_second = len(result.history) * images_per_epoch / result.train_seconds
    model.load_state_dict(torch.load(io.BytesIO(result.state_dict), weights_only=True))
    ids, plain, tta = split_probabilities(model, val, cfg=cfg, num_classes=num_classes,
                                          batch_size=cfg.batch_size * 2, device=device, dtype=dtype)
    if world_size > 1:  # every rank's share, put back in one order
        parts = all_gather((ids, plain, tta))
        ids, plain, tta = ([x for part in parts for x in part[k]] for k in range(3))
    order = list(val.ids) if val_order is None else list(val_order)
    position = {bin_id: k for k, bin_id in enumerate(ids)}
    result.val_probabilities = [plain[position[i]] for i in order]
    result.val_probabilities_tta = [tta[position[i]] for i in order]
    return result


def _agreed(decision: bool, world_size: int) -> bool:
    """Rank 0's decision, on every rank (they must leave the epoch loop together)."""
    return bool(decision) if world_size == 1 else bool(all_gather(bool(decision))[0])


def save_checkpoint(checkpoints, epoch: int, model, optimizer, scheduler, result: TrainResult, num_classes: int,
                    rng: dict, *, rank: int, world_size: int) -> None:
    """Everything the epochs after ``epoch`` depend on, to ``checkpoints``; rank 0 writes it, with
    every rank's generators (each rank shuffles and augments with its own)."""
    rngs = [rng] if world_size == 1 else all_gather(rng)
    if rank != 0:
        return
    checkpoints.save({
        "epoch": epoch, "config": result.config, "num_classes": num_classes,
        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "rng": rngs, "history": result.history, "best_epoch": result.best_epoch,
        "val_accuracy": result.val_accuracy, "val_loss": result.val_loss, "best_state_dict": result.state_dict})


def split_probabilities(model, split, *, cfg: TrainConfig, num_classes: int, batch_size: int, device: str,
                        dtype=None) -> tuple[list, list, list]:
    """(ids, softmax of each photo alone, mean softmax over its four flips) over a split."""
    import torch

    predictor = Predictor.of_network(model, arch=cfg.arch, image_size=cfg.image_size, num_classes=num_classes,
                                     device=device, dtype=dtype)
    ids, plain, tta = [], [], []
    for x, _, batch_ids in split.ordered(batch_size):
        [views] = predictor.view_probabilities(x, views=4)
        ids.extend(batch_ids)
        plain.append(views[0])
        tta.append(sum(views) / len(views))
    if not ids:  # a rank's validation share, when there are fewer photos than ranks
        return [], [], []
    return ids, torch.cat(plain).tolist(), torch.cat(tta).tolist()


def state_dict_bytes(model) -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, buf)
    return buf.getvalue()


def rank_share(photos, ids: list[str], rank: int, world_size: int) -> list[str]:
    """This rank's photos of ``ids``. From shards, whole shards: rank r takes the photos
    in every world-size-th shard of the run, from shard r on, so ranks read disjoint shards
    (for every split alike, since a shard holds photos of several splits), where the photos
    of ``ids`` span at least as many shards as there are ranks; otherwise, and for a dict of
    photos, every world-size-th photo."""
    if world_size == 1:
        return list(ids)
    if isinstance(photos, Photos) and len(photos.by_shard(ids)) >= world_size:
        mine = set(photos.shards.shards[rank::world_size])
        return [i for i in ids if photos.shard_of(i) in mine]
    return shard(list(ids), rank, world_size)


def train_on_split(cfg: TrainConfig, photos: Mapping[str, bytes], split_table, classes: list[int], *,
                   seed: int = 0, progress: bool = True, cache_bytes: int | None = None,
                   workers: int | None = None, checkpoints=None, timeout_s: float | None = None,
                   on_epoch: Callable[[TrainResult], None] | None = None,
                   should_stop: Callable[[TrainResult], bool] | None = None) -> TrainResult:
    """Train one grid point on the train and validation rows of ``split_table``.

    ``photos`` maps id to encoded photo: a run's shards (``bincount.data.shards.Photos``) or a
    dict. Where the decoded training and validation photos together fit ``cache_bytes``
    (default ``bincount.data.loader.DEFAULT_CACHE_BYTES``), they are decoded once into memory
    by the loader's ``workers`` processes; otherwise both stream from the photos every epoch.

    Launched by torchrun (or anything else that sets ``WORLD_SIZE`` above 1 and the other
    torch.distributed variables), this process joins the group and reads only its own share
    of each split (:func:`rank_share`); every rank returns the same result. The entry point
    then lets rank 0 write what is written once, and calls
    ``bincount.model.distributed.cleanup()``.

    ``checkpoints``, ``on_epoch`` and ``should_stop``: see :func:`fit`. ``timeout_s``: decoding and training
    together may take this long (from when this machine's training lock is taken), then they
    stop with :class:`TrainingTimeout`, which a retry continues from the last checkpoint.
    """
    import torch

    from bincount.data.loader import DEFAULT_CACHE_BYTES, decode_photos, decoded_bytes

    cache_bytes = DEFAULT_CACHE_BYTES if cache_bytes is None else cache_bytes
    distributed = init_from_env()
    rank, world_size = world()
    target = {c: k for k, c in enumerate(classes)}
    device = pick_device()

    rows = {split: split_table[split_table["split"] == split] for split in ("train", "val")}
    share = {split: rank_share(photos, list(r["id"]), rank, world_size) for split, r in rows.items()}
    cached = decoded_bytes(len(share["train"]) + len(share["val"]), cfg.image_size) <= cache_bytes
    if not cached and rank == 0:
        print(f"{len(share['train'])} training and {len(share['val'])} validation photos at {cfg.image_size} px "
              f"exceed the cache of {cache_bytes / 2**20:.0f} MB: streaming them from the shards every epoch")

    def load(split: str):
        label = dict(zip(rows[split]["id"], rows[split]["label"]))
        ids = share[split]
        y = torch.tensor([target[label[i]] for i in ids], dtype=torch.long)
        if cached:
            x = decode_photos(photos, ids, cfg.image_size, workers=workers, progress=progress and rank == 0,
                              desc=f"decoding {split}")
            return CachedSplit(x, y, ids)
        return StreamedSplit(photos, ids, y, cfg.image_size, seed=seed + rank, device=device, workers=workers)

    # Decoding waits for the lock too: on one machine it would only take cores from the
    # branch that trains, and a branch waiting with its photos decoded holds their memory.
    # The time limit starts once the lock is held: waiting for other grid points to finish
    # their turn on this machine is not this one's training taking too long.
    with nullcontext() if distributed else machine_lock(), time_limit(timeout_s, f"training {cfg.name}"):
        train, val = load("train"), load("val")
        return fit(cfg, train, val, num_classes=len(classes), seed=seed, device=device, progress=progress,
                   val_order=list(rows["val"]["id"]), checkpoints=checkpoints, on_epoch=on_epoch,
                   should_stop=should_stop)
