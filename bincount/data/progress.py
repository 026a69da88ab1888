"""Progress bars that suit both a terminal and a Metaflow log.

In a terminal (and a notebook) tqdm redraws in place. In a log it writes complete lines instead,
such as ``fetching: 1200/4000 img, 35.20 img/s, 00:34 elapsed, ~01:20 left`` (the rate averaged
since the stage started): at most one every LOG_INTERVAL_S seconds, at least one every
LOG_INTERVAL_S seconds while the bar is open (even when one iteration takes longer), and a last
one when it closes.

Why lines: Metaflow reads a task's output a line at a time, and while a redraw (a carriage return
and no newline) waits on stderr its runtime stops reading the task's stdout too, so every epoch
line of a grid point used to appear at once when the point finished.
"""

from __future__ import annotations

import os
import sys
import threading
import weakref

LOG_INTERVAL_S = 30.0
INTERVAL_ENV = "BINCOUNT_PROGRESS_INTERVAL_S"  # overrides LOG_INTERVAL_S (tests use 1 s)

# tqdm's own fields; no {bar}, and the rate never flips to "s/it" so a log can be searched for "img/s".
LOG_FORMAT = "{desc}: {n_fmt}/{total_fmt}{unit}, {rate_noinv_fmt}, {elapsed} elapsed, ~{remaining} left{postfix}"
LOG_FORMAT_NO_TOTAL = "{desc}: {n_fmt}{unit}, {rate_noinv_fmt}, {elapsed} elapsed{postfix}"


def log_interval() -> float:
    """Seconds between progress lines in a log: LOG_INTERVAL_S, or the value of BINCOUNT_PROGRESS_INTERVAL_S."""
    raw = os.environ.get(INTERVAL_ENV)
    if raw is None or raw.strip() == "":
        return LOG_INTERVAL_S
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value > 0:  # also rejects nan
        raise ValueError(f"{INTERVAL_ENV}={raw!r}: need a number of seconds above 0")
    return value


def progress_bar(iterable=None, **kwargs):
    """``tqdm(iterable, **kwargs)`` that redraws in a terminal or a notebook and writes lines in a log."""
    from tqdm.auto import tqdm

    if sys.stderr.isatty() or _is_notebook(tqdm):
        if not sys.stderr.isatty():  # a notebook widget: as before
            kwargs.setdefault("mininterval", LOG_INTERVAL_S)
        return tqdm(iterable, **kwargs)
    return _log_bar_class()(iterable, **_log_kwargs(iterable, kwargs))


def _is_notebook(auto_tqdm) -> bool:
    return any(c.__module__ == "tqdm.notebook" for c in auto_tqdm.__mro__)


def _log_kwargs(iterable, kwargs: dict) -> dict:
    total = kwargs.get("total")
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)  # as tqdm itself does
    return {**kwargs,
            "file": LineWriter(kwargs.get("file") or sys.stderr),
            "mininterval": log_interval(),
            "miniters": 0,  # check the time at every update: no adaptive skipping past the interval
            # The rate is the average since the stage started: a moving average of the stretches between lines
            # would drop the time of a batch that spans a line written meanwhile (LogBar's heartbeat).
            "smoothing": 0,
            "bar_format": LOG_FORMAT if total else LOG_FORMAT_NO_TOTAL,
            "leave": True,  # a log line cannot be cleared; the last one says how the stage ended
            "dynamic_ncols": False}


class LineWriter:
    """A file for tqdm that turns each redraw ("\\r" + text + padding) into one complete, flushed line."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> int:
        for part in text.replace("\r", "\n").split("\n"):
            line = " ".join(part.split())  # drops tqdm's padding and the space in "{rate:5.2f}"
            if line:
                self.stream.write(line + "\n")
                self.stream.flush()
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


_LOG_BAR = None


def _log_bar_class():
    """tqdm with a heartbeat, made on first use so that importing this module does not import tqdm."""
    global _LOG_BAR
    if _LOG_BAR is not None:
        return _LOG_BAR
    from tqdm.std import tqdm

    class LogBar(tqdm):
        """tqdm only prints when it is updated, so a single iteration longer than the interval (a large
        batch on a CPU, a slow first read of a shard) would leave the log silent: a thread redraws the
        bar when a line is due. It holds the bar weakly, so a bar dropped without close() still goes."""

        def __init__(self, *args, **kwargs):
            self._closing = threading.Event()
            super().__init__(*args, **kwargs)
            if not self.disable:
                threading.Thread(target=_heartbeat, args=(weakref.ref(self), self._closing), daemon=True,
                                 name=f"progress: {self.desc}").start()

        def __iter__(self):
            # tqdm's own loop keeps the count in a local variable between prints; the heartbeat reads self.n.
            if self.disable:
                yield from self.iterable
                return
            try:
                for obj in self.iterable:
                    yield obj
                    self.update()
            finally:
                self.close()

        def close(self):
            closing = getattr(self, "_closing", None)
            if closing is not None:
                closing.set()
            super().close()  # sets disable first, then writes the last line under tqdm's lock

    _LOG_BAR = LogBar
    return LogBar


def _heartbeat(ref, closing: threading.Event) -> None:
    """Redraw the bar ``ref`` whenever its interval passes without a line, until it closes or is dropped."""
    while True:
        bar = ref()
        if bar is None:
            return
        wait = bar.last_print_t + bar.mininterval - bar._time()
        if wait <= 0:
            with bar._lock:  # tqdm's own: close() cannot write its last line meanwhile
                if not bar.disable:  # not closed
                    bar.refresh(nolock=True)
                    bar.last_print_t = bar._time()  # tqdm's next update counts the interval from this line
            wait = bar.mininterval
        del bar  # hold it only while drawing
        if closing.wait(max(0.01, wait)):
            return
