"""Data capture for the local endpoint: the answered requests, as SageMaker captures them.

The local endpoint (``bincount serve --capture-dir PATH``, or ``python -m bincount.serving.server``)
writes each answered ``/invocations`` request (the body as the client sent it, the answer as it
was sent, and the request's ``X-Amzn-SageMaker-Custom-Attributes`` and
``X-Amzn-SageMaker-Inference-Id`` headers) in SageMaker's data-capture JSONL format and layout
(bincount.data.captures)::

    PATH/<endpoint-name>/AllTraffic/yyyy/mm/dd/hh/<mm>-<ss>-<ms>-<uuid>.jsonl

so ``bincount monitor`` and ``bincount audit --source capture:PATH`` read local and SageMaker
captures alike. Only answered requests (200) are captured: a refused request has no prediction
to monitor. :class:`CaptureWriter` is built so that capture never costs a request anything:

- **Sampling**: each request is captured with probability ``percent``/100, decided by one random
  draw under a lock (a seeded ``random.Random`` makes it repeatable: the k-th request decided
  always gets the k-th draw).
- **Never slow**: ``record`` only queues the bodies (bounded: ``max_pending``); a thread of its
  own encodes and writes them. A full queue drops the capture, never the request.
- **Never fail**: whatever capture raises (a full disk, a folder removed) is counted in ``stats``
  and logged (the first failure with its traceback, then at the 10th, 100th, ...), and the request
  is answered as if nothing happened.
- **Whole lines**: a file is written under a hidden name (``.<name>.jsonl.partial``) and renamed
  into place when it is complete: after ``rotate_s`` seconds, at ``max_file_bytes``, when the hour
  changes (a file holds one hour, like SageMaker's) and when the server stops. A reader that skips
  hidden files (bincount.data.sources.open_captures does) only ever sees whole files of whole
  lines. A file left hidden by a crash is put into place when a writer next starts on the folder.
"""

from __future__ import annotations

import argparse
import collections
import logging
import os
import queue
import random
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Mapping

from bincount.data.captures import (CUSTOM_ATTRIBUTES_HEADER, INFERENCE_ID_HEADER, VARIANT, capture_file_key,
                                    capture_record)

LOCAL_ENDPOINT_NAME = "local"  # the <endpoint-name> folder of the local endpoint's captures
ROTATE_S = 60.0  # a capture becomes visible to readers at most this long after it is written
MAX_FILE_BYTES = 16 * 1024 * 1024
MAX_PENDING = 256  # captures queued for the writer thread; a bin photo is 10-100 KB: at most ~25 MB held
PARTIAL = ".partial"
MODES = ("input", "output", "both")
CAPTURE_DIR_ENV = "BINCOUNT_CAPTURE_DIR"
CAPTURE_PERCENT_ENV = "BINCOUNT_CAPTURE_PERCENT"
CAPTURE_MODE_ENV = "BINCOUNT_CAPTURE_MODE"
CAPTURE_SEED_ENV = "BINCOUNT_CAPTURE_SEED"

log = logging.getLogger("bincount.serving.capture")


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


@dataclass(frozen=True)
class _Answered:
    """One sampled request, as queued for the writer thread."""

    time: datetime
    event_id: str
    request: tuple[bytes, str] | None
    response: tuple[bytes, str] | None
    inference_id: str | None
    custom_attributes: str | None


_STOP = object()


class CaptureWriter:
    """Writes sampled answered requests under ``root`` in SageMaker's capture format (module docstring).

    ``rng`` (a ``random.Random``) and ``clock`` (a UTC ``datetime`` now) are for tests: a seed makes
    sampling repeatable, a clock places captures in other hours. ``stats`` counts ``captured``
    (written), ``not_sampled``, ``dropped`` (queue full) and ``failed``.
    """

    def __init__(self, root: str | os.PathLike, *, percent: float = 100.0, mode: str = "both",
                 endpoint_name: str = LOCAL_ENDPOINT_NAME, variant: str = VARIANT, rng: random.Random | None = None,
                 clock: Callable[[], datetime] = utc_now, rotate_s: float = ROTATE_S,
                 max_file_bytes: int = MAX_FILE_BYTES, max_pending: int = MAX_PENDING):
        if not 0 <= percent <= 100:
            raise ValueError(f"capture percent must be between 0 and 100, got {percent}")
        if mode not in MODES:
            raise ValueError(f"capture mode must be one of {MODES}, got {mode!r}")
        self.root = Path(root)
        try:  # a folder that cannot be made is a setting to fix, said at start-up
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ValueError(f"--capture-dir {str(self.root)!r}: cannot create it ({e.strerror or e})") from None
        self.percent, self.mode = percent, mode
        self.endpoint_name, self.variant = endpoint_name, variant
        self.rotate_s, self.max_file_bytes = rotate_s, max_file_bytes
        self.stats: collections.Counter = collections.Counter()
        self._rng = rng or random.Random()
        self._clock = clock
        self._lock = threading.Lock()  # the random draw and the counters: requests come from many tasks
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._file = None  # the open hidden file, its final path, its hour, size and when it was opened
        self._final: Path | None = None
        self._hour: datetime | None = None
        self._size = 0
        self._opened = 0.0
        self._recover()
        self._thread = threading.Thread(target=self._run, name="bincount-capture", daemon=True)
        self._thread.start()

    def describe(self) -> str:
        what = {"both": "requests and answers", "input": "requests", "output": "answers"}[self.mode]
        return f"capturing {self.percent:g}% of answered requests ({what}) to {self.root}"

    # --- the request side: cheap, never raises ---------------------------------------

    def record(self, *, request_body: bytes, request_type: str, response_body: bytes, response_type: str,
               headers: Mapping[str, str]) -> bool:
        """Queue one answered request for capture if it is sampled; True if queued. Never raises, never blocks."""
        try:
            with self._lock:
                if self._rng.random() * 100 >= self.percent:
                    self.stats["not_sampled"] += 1
                    return False
            answered = _Answered(
                time=self._clock(), event_id=str(uuid.uuid4()),
                request=(bytes(request_body), request_type) if self.mode in ("input", "both") else None,
                response=(bytes(response_body), response_type) if self.mode in ("output", "both") else None,
                inference_id=headers.get(INFERENCE_ID_HEADER), custom_attributes=headers.get(CUSTOM_ATTRIBUTES_HEADER))
            self._queue.put_nowait(answered)
            return True
        except queue.Full:
            self._failed("dropped", f"the capture queue is full ({self._queue.maxsize} waiting): "
                                    "a capture was dropped, the request was answered")
        except Exception as e:  # noqa: BLE001 - capture must never fail a request
            self._failed("failed", f"capture failed: {type(e).__name__}: {e}", exc_info=True)
        return False

    def _failed(self, kind: str, message: str, exc_info: bool = False) -> None:
        with self._lock:
            self.stats[kind] += 1
            n = self.stats[kind]
        if n & (n - 1) == 0 or n % 1000 == 0:  # 1, 2, 4, 8, ...: heard, without flooding the log
            log.warning("%s (%d %s so far)", message, n, kind, exc_info=exc_info and n == 1)

    # --- the writer thread -------------------------------------------------------------

    def _run(self) -> None:
        while True:
            try:
                item = self._queue.get(timeout=min(self.rotate_s, 1.0))
            except queue.Empty:
                item = None
            if item is _STOP:
                break
            try:
                if item is not None:
                    self._write(item)
                    with self._lock:
                        self.stats["captured"] += 1
                if self._file is not None and time.monotonic() - self._opened >= self.rotate_s:
                    self._finish()
            except Exception as e:  # noqa: BLE001 - a disk or folder problem: count it, keep serving
                self._abandon()
                self._failed("failed", f"capture failed: {type(e).__name__}: {e}", exc_info=True)
        try:
            self._finish()
        except Exception as e:  # noqa: BLE001
            self._abandon()
            self._failed("failed", f"capture failed while closing: {type(e).__name__}: {e}")

    def _write(self, answered: _Answered) -> None:
        import json

        line = (json.dumps(capture_record(event_id=answered.event_id, inference_time=answered.time,
                                          request=answered.request, response=answered.response,
                                          inference_id=answered.inference_id,
                                          custom_attributes=answered.custom_attributes),
                           separators=(",", ":")) + "\n").encode("utf-8")
        hour = answered.time.astimezone(timezone.utc).replace(minute=0, second=0, microsecond=0)
        if self._file is not None and (hour != self._hour or self._size + len(line) > self.max_file_bytes):
            self._finish()
        if self._file is None:
            self._open(answered.time, hour)
        self._file.write(line)
        self._file.flush()
        self._size += len(line)

    def _open(self, when: datetime, hour: datetime) -> None:
        final = self.root / capture_file_key(self.endpoint_name, when, uuid.uuid4().hex, self.variant)
        final.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(final.parent / f".{final.name}{PARTIAL}", "xb")
        self._final, self._hour, self._size, self._opened = final, hour, 0, time.monotonic()

    def _finish(self) -> None:
        """Close the file being written and move it into place, where readers see it."""
        if self._file is None:
            return
        f, final = self._file, self._final
        self._file = None
        f.close()
        os.replace(f.name, final)

    def _abandon(self) -> None:
        """After a failure: drop the current file handle (what it holds is recovered at the next start)."""
        f, self._file = self._file, None
        if f is not None:
            try:
                f.close()
            except OSError:
                pass

    def _recover(self) -> None:
        """Put into place the files a writer that did not stop cleanly left hidden. Their last line
        may be cut: a reader reports it as malformed, by file and line, rather than losing the rest."""
        for hidden in self.root.rglob(f".*{PARTIAL}"):
            try:
                if hidden.stat().st_size:
                    os.replace(hidden, hidden.with_name(hidden.name[1:-len(PARTIAL)]))
                else:
                    hidden.unlink()
            except OSError as e:
                log.warning("capture: could not recover %s: %s", hidden, e)

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued (for up to ``timeout`` seconds) and put the last file into place."""
        try:
            self._queue.put(_STOP, timeout=timeout)
        except queue.Full:
            log.warning("capture: the writer did not drain its queue within %g s", timeout)
            return
        self._thread.join(timeout)

    def summary(self) -> str:
        s = self.stats
        return (f"capture: {s['captured']} written, {s['not_sampled']} not sampled, {s['dropped']} dropped, "
                f"{s['failed']} failed")


# --- the server's options ------------------------------------------------------------------

def percent_arg(value: str) -> float:
    try:
        percent = float(value)
    except ValueError:
        percent = float("nan")
    if not 0 <= percent <= 100:  # also refuses nan
        raise argparse.ArgumentTypeError(f"expected a percentage from 0 to 100, not {value!r}")
    return percent


def add_capture_arguments(parser: argparse.ArgumentParser, env_default: Callable) -> None:
    """--capture-dir, --capture-percent, --capture-mode, --capture-seed; ``env_default(parser, NAME,
    default, type)`` reads an environment variable's default, as the server's other options do."""
    group = parser.add_argument_group("data capture (SageMaker's format; read by bincount monitor and "
                                      "bincount audit --source capture:PATH)")
    group.add_argument("--capture-dir", metavar="PATH", default=env_default(parser, CAPTURE_DIR_ENV, None, str),
                       help="write each answered request (body, answer, custom attributes and inference id "
                            f"headers) under PATH/{LOCAL_ENDPOINT_NAME}/{VARIANT}/yyyy/mm/dd/hh/*.jsonl; files "
                            f"appear within {ROTATE_S:g} s and when the server stops "
                            f"(default: off; ${CAPTURE_DIR_ENV} sets it)")
    group.add_argument("--capture-percent", metavar="P", type=percent_arg,
                       default=env_default(parser, CAPTURE_PERCENT_ENV, 100.0, percent_arg),
                       help=f"share of answered requests captured (default: %(default)g; ${CAPTURE_PERCENT_ENV})")
    group.add_argument("--capture-mode", choices=MODES, default=env_default(parser, CAPTURE_MODE_ENV, "both", str),
                       help=f"capture requests, answers or both (default: %(default)s; ${CAPTURE_MODE_ENV})")
    group.add_argument("--capture-seed", metavar="N", type=int, default=env_default(parser, CAPTURE_SEED_ENV, None, int),
                       help=f"seed the sampling, so that it is repeatable (default: unseeded; ${CAPTURE_SEED_ENV})")


def capture_from_arguments(args: argparse.Namespace, parser: argparse.ArgumentParser) -> CaptureWriter | None:
    """The writer the options ask for (None: capture off), or a one-line parser error."""
    if not args.capture_dir:
        return None
    if args.capture_mode not in MODES:  # from the environment: argparse checks only the command line
        parser.error(f"--capture-mode must be one of {MODES}, not {args.capture_mode!r}")
    try:
        return CaptureWriter(args.capture_dir, percent=args.capture_percent, mode=args.capture_mode,
                             rng=random.Random(args.capture_seed) if args.capture_seed is not None else None)
    except ValueError as e:
        parser.error(str(e))
