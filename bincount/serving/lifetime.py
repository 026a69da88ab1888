"""Tying a server's life to the process that started it.

``start_local_endpoint`` starts the server with the write end of a pipe as
the server's stdin and keeps that end open; nothing is ever written to it.
However the starting process ends (returns, raises, SIGTERM, SIGKILL, an
out-of-memory kill), its kernel closes that end, and the server's read end
sees end-of-file. A watcher thread in the server waits for that and then
stops the server and removes its work folder, which nobody else is left to do.

Why a pipe rather than Linux's PR_SET_PDEATHSIG: that signal fires when the
*thread* that started the child ends, not the process, so an endpoint started
from a worker thread would be killed while its parent still runs; and it is
Linux-only. The watcher also checks every second that its parent process is
still the one that started it: if the pipe's write end was copied into a
forked sibling (``os.fork``, multiprocessing's "fork"), end-of-file only comes
when that sibling ends too, but the server is re-parented as soon as its
parent dies.

The server learns that it should watch from the environment
(``EXIT_WITH_PARENT_ENV``), so ``bincount serve`` and ``python -m
bincount.serving.server`` run by a person, with a terminal or nothing on
stdin, keep running until stopped, as before.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

# The pid of the process that started the server: set, it makes the server watch its stdin.
EXIT_WITH_PARENT_ENV = "BINCOUNT_EXIT_WITH_PARENT"
# The folder the server removes when its parent is gone (its extracted model, its log).
WORKDIR_ENV = "BINCOUNT_ENDPOINT_WORKDIR"
# start_local_endpoint's temporary folders are named so; only such a folder is ever removed
# by the server, so a stray environment variable cannot make it delete anything else, and a
# folder left behind by a crashed machine is easy to recognize.
WORKDIR_PREFIX = "bincount-endpoint-"
# How long the server may take to finish what it is answering once its parent is gone.
GRACE_S = 10.0
PARENT_POLL_S = 1.0


def parent_gone(parent_pid: int, fd: int) -> None:
    """Return once ``fd`` (the read end of the parent's pipe) is at end-of-file, or once the
    process's parent is no longer ``parent_pid``."""
    while os.getppid() == parent_pid:
        try:
            if os.name == "posix":  # select cannot wait on a pipe on Windows: there, block in read
                ready, _, _ = select.select([fd], [], [], PARENT_POLL_S)
                if not ready:
                    continue
            if not os.read(fd, 4096):
                return  # end-of-file: every copy of the write end is closed
        except OSError:
            return  # no such pipe, or it broke: nothing ties the server to a parent any more


def remove_workdir(workdir: str | Path | None) -> None:
    if workdir and Path(workdir).name.startswith(WORKDIR_PREFIX):
        shutil.rmtree(workdir, ignore_errors=True)


def _stop(parent_pid: int, workdir: str | None) -> None:
    print(f"bincount: the process that started this server (pid {parent_pid}) is gone; stopping",
          file=sys.stderr, flush=True)
    # The folder goes first: once the server is stopping, nothing is sure to run after it.
    # Uvicorn re-raises SIGTERM after a graceful shutdown, which ends the process before
    # atexit handlers or code after uvicorn.run would run. A server that is up has its model
    # in memory; one still loading it fails and ends. The log is an open file: writing to it
    # still works once it is unlinked.
    remove_workdir(workdir)
    if callable(signal.getsignal(signal.SIGTERM)):
        # The server handles SIGTERM (uvicorn, once it runs): let it finish in-flight requests
        # and exit, as LocalEndpoint.stop asks it to; the hard exit below bounds that.
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(GRACE_S)
    # Still starting up (SIGTERM would kill it at once anyway), or slower than GRACE_S.
    os._exit(0)


def exit_with_parent_if_asked(stop=None) -> None:
    """In a server started by start_local_endpoint: stop when the starting process ends.

    Does nothing unless ``EXIT_WITH_PARENT_ENV`` is set. Call it early in the
    server's main(): loading and timing a model can take minutes, and a parent
    that dies meanwhile must not leave the server behind. ``stop(parent_pid, workdir)``
    replaces the default way of stopping (a server with processes of its own, such as
    TorchServe's, stops them too).
    """
    stop = stop or _stop
    parent = os.environ.pop(EXIT_WITH_PARENT_ENV, "")
    workdir = os.environ.pop(WORKDIR_ENV, None)  # popped: neither is meant for processes the server starts
    if not parent.isdigit():
        return

    def watch() -> None:
        parent_gone(int(parent), 0)  # fd 0: start_local_endpoint makes the pipe the server's stdin
        stop(int(parent), workdir)

    threading.Thread(target=watch, name="bincount-exit-with-parent", daemon=True).start()
