"""A local endpoint never outlives the process that started it, nor does its work folder.

Each test starts the endpoint from a real child process, as the deploy step does,
ends that process, and checks the server's process, port and work folder.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from serving_helpers import wait_until

from bincount.serving.endpoint import start_local_endpoint
from bincount.serving.lifetime import WORKDIR_PREFIX, remove_workdir
from bincount.serving.package import build_package

GONE_WITHIN_S = 15  # the parent's pipe closes at once; the server then has lifetime.GRACE_S to finish

# The deploy step's part: start an endpoint and report it. It is started from a thread
# that has ended by the time the parent is killed: a mechanism tied to the starting
# thread (Linux's PR_SET_PDEATHSIG) would stop the server too early, and this catches it.
PARENT = """
import json, os, sys, threading, time
from bincount.serving.endpoint import start_local_endpoint
from bincount.serving.lifetime import WORKDIR_PREFIX, remove_workdir
started = []
thread = threading.Thread(target=lambda: started.append(start_local_endpoint(open(sys.argv[1], "rb").read())))
thread.start()
thread.join()
endpoint = started[0]
workdir = str(endpoint.model_dir.parent)
print(json.dumps({"pid": endpoint.process.pid, "url": endpoint.url, "workdir": workdir}), flush=True)
time.sleep(600)
"""


@pytest.fixture(scope="module")
def package_file(tiny_model, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("package") / "model.tar.gz"
    path.write_bytes(build_package(*tiny_model))
    return path


def alive(pid: int) -> bool:
    """Whether ``pid`` runs: a zombie (dead, not yet reaped by whoever adopted it) does not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc (macOS): os.kill succeeded
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def refuses(url: str) -> bool:
    host, port = url.removeprefix("http://").split(":")
    try:
        socket.create_connection((host, int(port)), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


# A parent that returns or raises without stopping its endpoint ends the same way as far as the
# server can tell (the kernel closes the pipe); each case costs a server start (~7 s on 2 busy cores).
@pytest.mark.parametrize("ending", ["SIGKILL", "SIGTERM"])
def test_the_server_and_its_folder_go_with_the_process_that_started_it(package_file, ending):
    # max batch size 1: no timing of batch sizes at startup, which would only slow the test
    env = dict(os.environ, BINCOUNT_MAX_BATCH_SIZE="1")
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(package_file), ending],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    server = None
    try:
        line = parent.stdout.readline()
        assert line, f"the parent did not start an endpoint: {parent.stderr.read()[-3000:]}"
        server = json.loads(line)
        workdir = Path(server["workdir"])
        assert workdir.name.startswith(WORKDIR_PREFIX) and (workdir / "model" / "model.pt").is_file()
        # alive while its parent is, though the thread that started it has ended (and the
        # watcher's once-a-second look at its parent's pid has had time to run)
        time.sleep(1.5)
        assert requests.get(f"{server['url']}/ping", timeout=10).status_code == 200
        assert alive(server["pid"])
        parent.send_signal(getattr(signal, ending))
        parent.wait(30)

        assert wait_until(lambda: not alive(server["pid"]), GONE_WITHIN_S), \
            f"the server outlived its parent by {GONE_WITHIN_S} s ({ending})"
        assert refuses(server["url"])
        assert wait_until(lambda: not workdir.exists(), 2), f"{workdir} outlived the server"
    finally:
        parent.kill()
        parent.wait()
        if server and alive(server["pid"]):  # a failed test must not leave a server behind either
            os.kill(server["pid"], signal.SIGKILL)
        if server:
            shutil.rmtree(server["workdir"], ignore_errors=True)


def test_stop_removes_the_work_folder(package_file, monkeypatch):
    monkeypatch.setenv("BINCOUNT_MAX_BATCH_SIZE", "1")  # read by the server subprocess: no batch timing
    with start_local_endpoint(package_file.read_bytes()) as endpoint:
        assert requests.get(f"{endpoint.url}/ping", timeout=10).status_code == 200
        assert (endpoint.workdir / "model" / "model.pt").is_file()
    assert endpoint.process.returncode is not None
    assert not endpoint.workdir.exists()
    assert refuses(endpoint.url)


def test_only_an_endpoints_own_folder_is_ever_removed(tmp_path):
    """The server removes the folder its environment names: a stray variable must not cost a user's folder."""
    theirs, ours = tmp_path / "results", tmp_path / f"{WORKDIR_PREFIX}abc"
    for folder in (theirs, ours):
        (folder / "model").mkdir(parents=True)
        (folder / "model" / "model.pt").write_bytes(b"x")
    remove_workdir(theirs)
    remove_workdir(ours)
    assert (theirs / "model" / "model.pt").is_file()
    assert not ours.exists()
