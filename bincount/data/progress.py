"""Progress bars that suit both a terminal and a Metaflow log.

In a terminal tqdm redraws in place; in a log (Metaflow captures each task's
output) every redraw becomes a line, so there the bar updates rarely.
"""

from __future__ import annotations

import sys

LOG_INTERVAL_S = 30.0


def progress_bar(iterable=None, **kwargs):
    from tqdm.auto import tqdm

    if not sys.stderr.isatty():
        kwargs.setdefault("mininterval", LOG_INTERVAL_S)
    return tqdm(iterable, **kwargs)
