"""SageMaker's own PyTorch serving stack, run here without Docker.

A SageMaker PyTorch endpoint does not run bincount's server: its container's entry point
calls ``sagemaker_pytorch_serving_container.serving.main()``, which writes TorchServe's
config, pip-installs ``code/requirements.txt``, and starts TorchServe (Java) with the
toolkit's handler service; that imports ``code/inference.py`` from ``/opt/ml/model``, calls
``model_fn`` once, then ``input_fn``, ``predict_fn`` and ``output_fn`` once per request (no
micro-batching), and answers any exception that is not one of the toolkit's own error types
with a 500. ``python -m bincount.serving.toolkit`` runs that same ``main()`` from the
installed packages (``sagemaker-pytorch-inference``, ``torchserve``; Java 17), so a
``model.tar.gz`` can be checked against the real stack before it is deployed.

Three things differ from the container, each because this is not one:

- ``/opt/ml`` is a folder of our own, through the toolkit's own ``SAGEMAKER_BASE_DIR``
  (the package is extracted to ``<folder>/model``, as SageMaker extracts it);
- TorchServe listens on 127.0.0.1, not 0.0.0.0, and its metrics on a free port, set through
  ``TS_*`` environment variables (the toolkit's config sets ``enable_envvars_config``);
- the toolkit writes TorchServe's config into that folder, not ``/etc/sagemaker-ts.properties``.

TorchServe allows one server per machine (the toolkit looks its Java process up by name,
and workers talk over fixed socket names in /tmp), so run one toolkit endpoint at a time.
The endpoint is started by bincount.serving.endpoint (``server="toolkit"``) in a process
group of its own, which is how it is stopped, Java and Python workers included.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

MODULES = ("sagemaker_pytorch_serving_container", "sagemaker_inference", "ts")
MIN_JAVA = 17  # TorchServe 0.12 asks for JDK 17
GRACE_S = 10.0  # how long TorchServe gets to stop before its process group is killed


def missing() -> str | None:
    """Why the toolkit cannot run here (a line), or None where it can."""
    absent = [name for name in MODULES if importlib.util.find_spec(name) is None]
    if absent:
        return (f"SageMaker's serving toolkit is not installed (no {', '.join(absent)}): "
                "pip install 'bincount[toolkit]'")
    java_home = os.environ.get("JAVA_HOME")  # TorchServe prefers it to PATH
    places = [os.path.join(java_home, "bin")] if java_home else []
    java = shutil.which("java", path=os.pathsep.join([*places, os.environ.get("PATH", "")]))
    if java is None:
        return "TorchServe needs Java (17 suggested) and there is none on PATH or JAVA_HOME: apt-get install openjdk-17-jre-headless"
    version = java_version(java)
    if version is not None and version < MIN_JAVA:
        return f"TorchServe needs Java {MIN_JAVA} or newer; {java} is Java {version}"
    return None


def java_version(java: str) -> int | None:
    """The major version ``java -version`` reports (8 for "1.8.0"), or None if it says none."""
    try:
        said = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=30).stderr
    except (OSError, subprocess.TimeoutExpired):
        return None
    found = re.search(r'version "(\d+)(?:\.(\d+))?', said)
    if not found:
        return None
    major = int(found[1])
    return int(found[2] or 0) if major == 1 else major


def environment(base_dir: Path, port: int, metrics_port: int) -> dict[str, str]:
    """What the toolkit's process needs besides this process's environment."""
    here = f"http://127.0.0.1:{port}"
    return {
        "SAGEMAKER_BASE_DIR": str(base_dir),  # the toolkit's /opt/ml
        "SAGEMAKER_BIND_TO_PORT": str(port),
        # SageMaker runs inference and management on the one port; so does this, on loopback
        "TS_INFERENCE_ADDRESS": here, "TS_MANAGEMENT_ADDRESS": here,
        "TS_METRICS_ADDRESS": f"http://127.0.0.1:{metrics_port}",
        # TorchServe starts its Python workers with the `python` it finds first: this one, with torch
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
    }


def command(base_dir: Path) -> list[str]:
    return [sys.executable, "-m", "bincount.serving.toolkit", "--base-dir", str(base_dir)]


def stop_group(parent_pid: int, workdir: str | None) -> None:
    """The toolkit endpoint's parent is gone: stop TorchServe and its workers (the rest of this
    process group), then remove the work folder (once nothing writes logs there) and end this
    process (see bincount.serving.lifetime). Runs in the watcher thread, so it signals the
    others one by one rather than the group: this process must live to clean up."""
    from bincount.serving.lifetime import remove_workdir

    print(f"bincount: the process that started this endpoint (pid {parent_pid}) is gone; stopping",
          file=sys.stderr, flush=True)
    group, me = os.getpgid(0), os.getpid()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        deadline = time.monotonic() + GRACE_S
        for pid in _group_members(group, but=me):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        while _group_members(group, but=me) and time.monotonic() < deadline:
            time.sleep(0.2)
    remove_workdir(workdir)
    os._exit(0)


def _group_members(group: int, but: int) -> list[int]:
    """The pids of the live processes of group ``group``, but ``but`` (psutil comes with the toolkit)."""
    import psutil

    found = []
    for process in psutil.process_iter():
        try:
            if process.pid != but and os.getpgid(process.pid) == group and process.status() != psutil.STATUS_ZOMBIE:
                found.append(process.pid)
        except (psutil.Error, ProcessLookupError):
            continue
    return found


def kill_group(group: int, grace_s: float = GRACE_S) -> None:
    """From outside the group: SIGTERM to every process of ``group``, then SIGKILL to what is
    left after ``grace_s``."""
    try:
        os.killpg(group, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            os.killpg(group, 0)  # ProcessLookupError once none is left
            time.sleep(0.2)
        os.killpg(group, signal.SIGKILL)
    except ProcessLookupError:
        pass


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bincount.serving.toolkit",
        description="Serve <base-dir>/model (an extracted model.tar.gz) with SageMaker's PyTorch serving toolkit, "
                    "as its container does. Set SAGEMAKER_BASE_DIR, SAGEMAKER_BIND_TO_PORT and the TS_*_ADDRESS "
                    "variables as bincount.serving.toolkit.environment does; bincount.serving.endpoint's "
                    "start_local_endpoint(package, server='toolkit') does all of it.")
    parser.add_argument("--base-dir", required=True, type=Path, help="the folder that stands for /opt/ml")
    args = parser.parse_args(argv)
    if Path(os.environ.get("SAGEMAKER_BASE_DIR", "")).resolve() != args.base_dir.resolve():
        parser.error("SAGEMAKER_BASE_DIR must name --base-dir: the toolkit reads it when first imported")

    from bincount.serving.lifetime import exit_with_parent_if_asked

    exit_with_parent_if_asked(stop=stop_group)
    from sagemaker_pytorch_serving_container import serving, torchserve

    torchserve.TS_CONFIG_FILE = str(args.base_dir / "sagemaker-ts.properties")  # not /etc
    serving.main()  # returns once TorchServe has stopped (SIGTERM is passed on to it)


if __name__ == "__main__":
    main()
