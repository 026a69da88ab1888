"""A local endpoint for a packaged model: start it, check it, stop it.

``start_local_endpoint`` extracts model.tar.gz and starts a server for it in a
subprocess: ``bincount.serving.server`` from the package's own ``code/`` (first on
the import path, as SageMaker would), or, with ``server="toolkit"``, SageMaker's own
PyTorch serving toolkit and TorchServe (bincount.serving.toolkit). ``smoke_test`` sends
it test images over HTTP, checks its answers against in-process predictions and records
latency. ``deploy_local`` is both: the ``local`` and ``local-toolkit`` deploy targets.
The server never outlives the process that started it, nor does its work folder
(bincount.serving.lifetime).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from bincount.serving.lifetime import EXIT_WITH_PARENT_ENV, WORKDIR_ENV, WORKDIR_PREFIX, remove_workdir
from bincount.serving.package import extract_package

STARTUP_TIMEOUT_S = 300  # loading and timing an ensemble on a busy CPU takes a while
REQUEST_TIMEOUT_S = 30
Server = Literal["bincount", "toolkit"]


class EndpointError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def invoke(url: str, raw: bytes, content_type: str = "image/jpeg", timeout: float = REQUEST_TIMEOUT_S) -> dict:
    """POST one image to ``url``/invocations; raise EndpointError with the server's message."""
    import requests

    try:
        response = requests.post(f"{url}/invocations", data=raw, timeout=timeout,
                                 headers={"Content-Type": content_type, "Accept": "application/json"})
    except requests.RequestException as e:
        raise EndpointError(f"endpoint {url} did not answer: {e}") from e
    if response.status_code != 200:
        raise EndpointError(f"endpoint {url} answered {response.status_code}: {response.text[:500]}")
    return response.json()


@dataclass
class LocalEndpoint:
    """A server started by :func:`start_local_endpoint`.

    It never outlives the process that started it (see bincount.serving.lifetime):
    ``process.stdin`` is a pipe that only this process holds, and the server stops and
    removes ``workdir`` when that pipe closes, however this process ends. ``stop``
    stops it and removes ``workdir`` here, log included: read ``log()`` before.
    """

    url: str
    process: subprocess.Popen
    model_dir: Path
    log_path: Path
    workdir: Path | None = None  # removed by stop(); None when the caller's folder was given
    server: Server = "bincount"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.server == "toolkit":  # Java and its Python workers: the process group it leads
            from bincount.serving.toolkit import GRACE_S, kill_group

            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)  # the toolkit passes it on to TorchServe
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(GRACE_S)
            kill_group(self.process.pid)  # whatever is left of the tree
            self.process.wait()
        elif self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdin:
            self.process.stdin.close()
        remove_workdir(self.workdir)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def start_local_endpoint(package: bytes, *, port: int | None = None, workdir: str | Path | None = None,
                         timeout: float = STARTUP_TIMEOUT_S, server: Server = "bincount") -> LocalEndpoint:
    """Extract ``package`` and serve it on 127.0.0.1; return once /ping answers.

    ``server``: bincount's own (bincount.serving.server), or SageMaker's serving toolkit
    (bincount.serving.toolkit; EndpointError where it cannot run here, saying why).
    Without ``workdir``, the package and the server's log go to a new temporary folder
    named ``bincount-endpoint-*``, removed when the endpoint stops or the process that
    started it ends; a ``workdir`` given is the caller's, and kept.
    """
    import requests

    if server == "toolkit":
        from bincount.serving import toolkit

        if reason := toolkit.missing():
            raise EndpointError(reason)
    owned = None if workdir else Path(tempfile.mkdtemp(prefix=WORKDIR_PREFIX))
    workdir = Path(workdir or owned)
    try:
        model_dir = extract_package(package, workdir / "model")  # the toolkit's /opt/ml/model: <workdir>/model
    except BaseException:
        remove_workdir(owned)
        raise
    port = port or free_port()
    env = dict(os.environ, **{EXIT_WITH_PARENT_ENV: str(os.getpid()), WORKDIR_ENV: str(owned or "")})
    if server == "toolkit":
        args = toolkit.command(workdir)
        env.update(toolkit.environment(workdir, port, free_port()))
    else:
        args = [sys.executable, "-m", "bincount.serving.server", "--model-dir", str(model_dir), "--port", str(port)]
        env["PYTHONPATH"] = os.pathsep.join([str(model_dir / "code"), os.environ.get("PYTHONPATH", "")])
    log_path = workdir / "server.log"
    with open(log_path, "wb") as log:
        # stdin is the pipe that ties the server's life to this process: only this process
        # holds its write end (Popen's pipes are not inherited by other children), and it
        # writes nothing to it; the server stops when it closes (bincount.serving.lifetime).
        # The toolkit's server is a tree (Java, Python workers): a process group of its own.
        process = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT, env=env,
                                   cwd=workdir, start_new_session=server == "toolkit")
    endpoint = LocalEndpoint(f"http://127.0.0.1:{port}", process, model_dir, log_path, owned, server)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise EndpointError(f"the endpoint exited with code {process.returncode}:\n{endpoint.log()[-2000:]}")
            try:
                if requests.get(f"{endpoint.url}/ping", timeout=2).status_code == 200:
                    return endpoint
            except requests.RequestException:
                pass
            time.sleep(0.3)
        raise EndpointError(f"the endpoint did not answer /ping within {timeout:.0f} s:\n{endpoint.log()[-2000:]}")
    except BaseException:  # the log is in the message; Ctrl-C while waiting must not leave a server either
        endpoint.stop()
        raise


def smoke_test(url: str, images: dict[str, bytes], expected: dict[str, dict]) -> dict:
    """Send each image over HTTP; compare counts with ``expected``; time each request."""
    import numpy as np

    latencies, mismatches = [], []
    for bin_id, raw in images.items():
        t0 = time.perf_counter()
        answer = invoke(url, raw)["predictions"][0]
        latencies.append((time.perf_counter() - t0) * 1000)
        want = expected[bin_id]
        close = all(abs(answer["probabilities"][k] - v) < 1e-3 for k, v in want["probabilities"].items())
        if answer["count"] != want["count"] or not close:
            mismatches.append({"id": bin_id, "endpoint": answer, "in_process": want})
    return {"requests": len(latencies), "mismatches": mismatches,
            "latency_ms_p50": float(np.percentile(latencies, 50)),
            "latency_ms_p95": float(np.percentile(latencies, 95)),
            "latency_ms_mean": float(np.mean(latencies))}


def deploy_local(package: bytes, images: dict[str, bytes], expected: dict[str, dict],
                 server: Server = "bincount") -> dict:
    """The ``local`` (bincount's server) and ``local-toolkit`` (SageMaker's serving toolkit)
    targets: serve the package, smoke-test it against in-process answers, stop it."""
    import hashlib

    with start_local_endpoint(package, server=server) as endpoint:
        report = smoke_test(endpoint.url, images, expected)
    return {"url": endpoint.url, "server": server, "package_sha256": hashlib.sha256(package).hexdigest(),
            "package_bytes": len(package), "smoke_test": report}
