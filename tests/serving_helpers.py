"""Helpers for the endpoint tests: a server in a thread or a subprocess, a slowed-down
model, raw HTTP over a socket (for clients that stall or leave), a process's memory."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import requests

from bincount.serving.server import uvicorn_settings


@contextlib.contextmanager
def serve_in_thread(app):
    """``app`` on uvicorn in a thread of this process, so a test can reach inside its model.

    uvicorn gets the settings ``serve`` gives it for the app's limits (header deadline,
    connection limit, shutdown timeout). Yields the URL and the uvicorn.Server."""
    import uvicorn
    from conftest import free_port

    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                            **uvicorn_settings(app.state.limits))
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    server.thread = thread
    try:
        yield f"http://127.0.0.1:{port}", server
    finally:
        server.should_exit = True
        thread.join(30)


class SlowModel:
    """Wraps a network: each forward pass first sleeps ``delay_s``; counts the images it is given.

    Stands in for a big model on a busy machine, so that requests pile up in the queue."""

    def __init__(self, model, delay_s: float):
        self.model, self.delay_s = model, delay_s
        self.images = 0
        self.computing = threading.Event()  # set once a forward pass has started

    def __call__(self, x):
        self.images += len(x)
        self.computing.set()
        time.sleep(self.delay_s)
        return self.model(x)


@contextlib.contextmanager
def server_process(model_dir: Path, log_path: Path, *args: str, env: dict | None = None):
    """``python -m bincount.serving.server`` on a free port with ``args``; yields (url, process)
    once /ping answers; its stdout and stderr go to ``log_path``."""
    from conftest import free_port

    port = free_port()
    with open(log_path, "wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "bincount.serving.server", "--model-dir", str(model_dir),
                                    "--port", str(port), *args], stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, "the server did not answer /ping: " + log_path.read_text()[-3000:]
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{url}/ping", timeout=2).status_code == 200:
                    break
            time.sleep(0.2)
        yield url, process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(30)


def connect(url: str, timeout: float = 30) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=timeout)


def request_head(path: str, content_type: str, length: int) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()


def read_until_closed(sock: socket.socket, limit_s: float) -> tuple[bytes, float | None]:
    """Everything the server sends until it closes the connection, and the seconds that took
    (None: still open after ``limit_s``)."""
    start, data = time.monotonic(), b""
    sock.settimeout(0.2)
    while time.monotonic() - start < limit_s:
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            continue
        except ConnectionResetError:
            return data, time.monotonic() - start
        if not chunk:
            return data, time.monotonic() - start
        data += chunk
    return data, None


def rss_bytes(pid: int) -> int:
    """The resident memory of process ``pid`` (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def wait_until(condition, timeout: float) -> bool:
    """Whether ``condition()`` came true within ``timeout`` seconds (asked every 0.2 s)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True
