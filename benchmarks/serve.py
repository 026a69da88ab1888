"""Benchmark: images per second and latency of the local endpoint under concurrent clients.

A model package is built (default: an untrained EfficientNet-Lite0 at 224 px;
the weights do not change the cost of a forward pass) and served by
``bincount.serving.endpoint.start_local_endpoint``, which runs ``python -m
bincount.serving.server`` in a subprocess, exactly as the flow's deploy step does.
Client threads (one kept-alive ``requests.Session`` each) then POST single
JPEGs to ``/invocations`` for ``--seconds`` at each concurrency level, every
client sending its next request as soon as its last is answered.

Measured in the same run:

* the ceiling: ``Predictor.predict_bytes`` in this process on batches of 32 of
  the same images (decode + forward, no HTTP), and the same one image per
  call: their ratio is what batching saves inside the model on this machine;
* one server per ``--servers`` value, each that server's ``--max-batch-size``:
  by default ``auto`` (the server times the model at startup and picks the
  fastest batch size) and ``1`` (micro-batching off: each request its own
  forward pass, concurrently in the server's thread pool). All servers run at
  once and take turns at each concurrency level, so that load from other
  processes, which drifts over minutes, weighs on each about equally.

Before timing, every image is sent once to each server and its answer checked
against the in-process one, so a fast but wrong server cannot pass.

start_local_endpoint takes no server flags; the servers' batching settings go
through the environment variables bincount.serving.server reads its defaults from.
The clients, the servers and the in-process model share this machine's CPUs;
the report says how much other processes used.

Run: ``python benchmarks/serve.py`` (see ``--help``). Images are real bin
photos from ``--data`` / ``BINCOUNT_ABID_SAMPLE`` / ``../shared/abid-sample``
when present, else generated ones (bincount.data.synthetic).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "abid-sample"
CLASSES = [1, 2, 3, 4, 5]
CEILING_BATCH = 32


# --------------------------------------------------------------------------
# Options, images, model
# --------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from bincount.serving.server import DEFAULT_MAX_BATCH_DELAY_MS, DEFAULT_MAX_BATCH_SIZE, batch_size_arg

    parser = argparse.ArgumentParser(
        description="Images/s and p50/p99 latency of the local endpoint (python -m bincount.serving.server) at several "
                    "client concurrencies, with and without micro-batching, as a ratio to the model's own "
                    "batched throughput in-process.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--arch", default="efficientnet_lite0", help="architecture (bincount.model.architectures.ARCHS)")
    parser.add_argument("--image-size", type=int, default=224, help="model input size in pixels")
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("BINCOUNT_ABID_SAMPLE", DEFAULT_DATA)),
                        help="abid-sample folder with bin-images/*.jpg; generated images if it is missing")
    parser.add_argument("--images", type=int, default=64, help="distinct images, sent round-robin")
    parser.add_argument("--clients", default="1,8,32", help="concurrency levels, comma-separated")
    parser.add_argument("--seconds", type=float, default=10.0, help="timed sending per level")
    parser.add_argument("--warmup", type=float, default=2.0, help="untimed sending before each level")
    parser.add_argument("--servers", default=f"{DEFAULT_MAX_BATCH_SIZE},1",
                        help="one server per value, each its --max-batch-size: 'auto', a size, or 1 (batching "
                             "off; the others are compared with it), comma-separated")
    parser.add_argument("--max-batch-delay-ms", type=float, default=DEFAULT_MAX_BATCH_DELAY_MS,
                        help="the servers' --max-batch-delay-ms")
    args = parser.parse_args(argv)
    try:
        args.clients = sorted({int(c) for c in args.clients.split(",")})
        args.servers = list(dict.fromkeys(batch_size_arg(v) for v in args.servers.split(",")))
    except (ValueError, argparse.ArgumentTypeError) as e:
        parser.error(f"--clients and --servers: {e}")
    if min(args.clients) < 1 or args.images < 1 or args.seconds <= 0:
        parser.error("need clients >= 1, --images >= 1 and --seconds > 0")
    return args


def load_images(data: Path, n: int) -> tuple[list[bytes], str]:
    """``n`` real bin photos if the sample is there, else ``n`` generated ones; and what they are."""
    paths = sorted((data / "bin-images").glob("*.jpg"))[:n] if (data / "bin-images").is_dir() else []
    if paths:
        raws = [p.read_bytes() for p in paths]
        return raws, f"{len(raws)} real bin photos from {data}"
    from bincount.data.synthetic import synthetic_bin

    raws = [synthetic_bin(CLASSES[i % len(CLASSES)], seed=i) for i in range(n)]
    return raws, f"{n} generated bin images (no sample at {data})"


def build_model(arch: str, image_size: int) -> tuple[bytes, dict]:
    from bincount.model.architectures import create_model
    from bincount.model.train import state_dict_bytes

    meta = {"arch": arch, "image_size": image_size, "classes": CLASSES, "run_id": "bench"}
    return state_dict_bytes(create_model(arch, num_classes=len(CLASSES), image_size=image_size)), meta


# --------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------

@dataclass
class Level:
    mode: str
    clients: int | None  # None: in-process
    images: int
    seconds: float
    latencies_ms: list[float]
    errors: int = 0
    others_busy: float = 0.0  # share of all CPUs used by processes other than this one and the server

    @property
    def rate(self) -> float:
        return self.images / self.seconds

    def percentile(self, q: float) -> float:
        if not self.latencies_ms:
            return float("nan")
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


def in_process(predictor, raws: list[bytes], seconds: float, batch: int) -> Level:
    """predict_bytes on successive batches of ``raws`` for about ``seconds`` (decode + forward, no HTTP)."""
    batches = [[raws[(start + i) % len(raws)] for i in range(batch)] for start in range(0, len(raws), batch)]
    predictor.predict_bytes(batches[0], batch_size=batch)  # warm-up: first-call allocations, kernel choice
    done, start, times = 0, time.perf_counter(), []
    while time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        predictor.predict_bytes(batches[(done // batch) % len(batches)], batch_size=batch)
        times.append(1000 * (time.perf_counter() - t0))
        done += batch
    mode = f"in-process, batches of {batch}" if batch > 1 else "in-process, one image per call"
    return Level(mode, None, done, time.perf_counter() - start, times)


def post_image(session, url: str, raw: bytes) -> tuple[int, dict | str]:
    response = session.post(f"{url}/invocations", data=raw, timeout=120,
                            headers={"Content-Type": "image/jpeg", "Accept": "application/json"})
    return response.status_code, response.json() if response.status_code == 200 else response.text[:300]


def check_answers(url: str, raws: list[bytes], expected: list[dict], clients: int) -> None:
    """Send every image once, concurrently, and insist on the in-process counts."""
    import requests

    local = threading.local()

    def ask(i: int) -> str | None:
        local.session = getattr(local, "session", None) or requests.Session()
        status, answer = post_image(local.session, url, raws[i])
        if status != 200:
            return f"image {i}: {status} {answer}"
        got, want = answer["predictions"][0], expected[i]
        if got["count"] != want["count"] or any(abs(got["probabilities"][k] - v) > 1e-3
                                                for k, v in want["probabilities"].items()):
            return f"image {i}: endpoint {got} vs in-process {want}"
        return None

    with ThreadPoolExecutor(clients) as pool:
        wrong = [w for w in pool.map(ask, range(len(raws))) if w]
    if wrong:
        sys.exit(f"benchmarks/serve.py: the endpoint at {url} answered wrongly: {wrong[:3]}")


def drive(url: str, raws: list[bytes], clients: int, seconds: float) -> tuple[int, float, list[float], int]:
    """``clients`` threads send back to back for ``seconds``: (answered, elapsed, latencies in ms, errors)."""
    import requests

    start = time.perf_counter()
    deadline = start + seconds
    results: list[tuple[list[float], int]] = [([], 0)] * clients

    def client(k: int) -> None:
        session, latencies, errors, i = requests.Session(), [], 0, k
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            status, _ = post_image(session, url, raws[i % len(raws)])
            if status == 200:
                latencies.append(1000 * (time.perf_counter() - t0))
            else:
                errors += 1
            i += clients
        results[k] = (latencies, errors)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start  # up to the last answer, including requests in flight at the deadline
    latencies = [ms for lat, _ in results for ms in lat]
    return len(latencies), elapsed, latencies, sum(e for _, e in results)


@contextlib.contextmanager
def server_env(**settings):
    """Environment for the server subprocess: start_local_endpoint takes no server flags, but
    bincount.serving.server reads its batching defaults from BINCOUNT_MAX_BATCH_SIZE / _DELAY_MS."""
    saved = {name: os.environ.get(name) for name in settings}
    os.environ.update({name: str(value) for name, value in settings.items()})
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def server_label(max_batch_size, log: str) -> str:
    """What the server does, from its startup line: for 'auto', the size it chose."""
    if max_batch_size == 1:
        return "server, batching off"
    if max_batch_size != "auto":
        return f"server, batch {max_batch_size}"
    found = re.search(r"micro-batching (off|up to (\d+) images)", log)
    return f"server, batch auto ({found.group(2) or 'off'})" if found else "server, batch auto"


def start_server(stack: contextlib.ExitStack, max_batch_size, package: bytes, args):
    """A started endpoint with ``max_batch_size``, stopped when ``stack`` closes; and its label."""
    from bincount.serving.endpoint import start_local_endpoint

    settings = {"BINCOUNT_MAX_BATCH_SIZE": max_batch_size, "BINCOUNT_MAX_BATCH_DELAY_MS": args.max_batch_delay_ms}
    with server_env(**settings):  # the subprocess copies the environment at start
        endpoint = stack.enter_context(start_local_endpoint(package))
    label = server_label(max_batch_size, endpoint.log())
    print(f"{label}: {endpoint.log().strip().splitlines()[-1]}", flush=True)
    return endpoint, label


def measure_servers(package: bytes, raws: list[bytes], expected: list[dict], args) -> dict[object, list[Level]]:
    """Every server in ``args.servers`` at every concurrency level.

    All servers run at once (an idle one costs nothing) and take turns at each
    level, so that load from other processes, which drifts over minutes,
    weighs on each about equally.
    """
    with contextlib.ExitStack() as stack:
        servers = {size: start_server(stack, size, package, args) for size in args.servers}
        for endpoint, label in servers.values():
            check_answers(endpoint.url, raws, expected, max(args.clients))
        print(f"answers match in-process on all {len(servers)} servers", flush=True)
        levels: dict[object, list[Level]] = {size: [] for size in servers}
        for clients in args.clients:
            for size, (endpoint, label) in servers.items():
                drive(endpoint.url, raws, clients, args.warmup)
                with cpu_use(endpoint.process.pid) as others:
                    answered, elapsed, latencies, errors = drive(endpoint.url, raws, clients, args.seconds)
                level = Level(label, clients, answered, elapsed, latencies, errors, others["busy"])
                print(f"  {label}, {clients:>3} clients: {level.rate:7.1f} images/s, "
                      f"p50 {level.percentile(50):7.1f} ms, p99 {level.percentile(99):7.1f} ms", flush=True)
                levels[size].append(level)
        for endpoint, label in servers.values():
            if endpoint.process.poll() is not None:
                sys.exit(f"benchmarks/serve.py: {label} died:\n{endpoint.log()[-2000:]}")
    return levels


def machine_cpu() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs since boot, from /proc/stat; NaN where there is none."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except OSError:
        return float("nan"), float("nan")
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields[:8]) - idle, sum(fields[:8])


def process_jiffies(pid: int | None) -> float:
    """User + system CPU time of a process (this one if None), in clock ticks."""
    if pid is None:
        return time.process_time() * os.sysconf("SC_CLK_TCK")
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return int(fields[11]) + int(fields[12])


@contextlib.contextmanager
def cpu_use(server_pid: int | None):
    """Fills ``["busy"]`` with the share of all CPUs that other processes used meanwhile: the
    machine is shared, and a busy neighbour lowers every figure."""
    result = {"busy": float("nan")}
    ours = (None, server_pid) if server_pid else (None,)
    machine_before, ours_before = machine_cpu(), sum(process_jiffies(p) for p in ours)
    yield result
    machine_after, ours_after = machine_cpu(), sum(process_jiffies(p) for p in ours)
    total = machine_after[1] - machine_before[1]
    if total > 0:
        result["busy"] = max(0.0, (machine_after[0] - machine_before[0] - (ours_after - ours_before)) / total)


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------

def print_report(ceiling: Level, single: Level, servers: dict, args, described: str, device: str) -> None:
    import torch

    cpus = len(os.sched_getaffinity(0))
    print(f"\n{args.arch} at {args.image_size} px (untrained), {described}; device {device}; {cpus} CPUs; "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads, OMP_WAIT_POLICY "
          f"{os.environ['OMP_WAIT_POLICY']}); Python {sys.version.split()[0]}")
    print(f"each level: {args.warmup:g} s warm-up, then {args.seconds:g} s of clients sending single JPEGs "
          "back to back (kept-alive connections); images/s counts answers until the last one came back; "
          f"--max-batch-delay-ms {args.max_batch_delay_ms:g}\n")
    rows = [ceiling, single] + [level for levels in servers.values() for level in levels]
    width = max(len(r.mode) for r in rows)
    print(f"{'mode':<{width}}  {'clients':>7}  {'images':>6}  {'images/s':>8}  {'p50 ms':>7}  {'p99 ms':>7}  "
          f"{'x ceiling':>9}")
    for r in rows:
        clients = "-" if r.clients is None else str(r.clients)
        print(f"{r.mode:<{width}}  {clients:>7}  {r.images:>6}  {r.rate:>8.1f}  {r.percentile(50):>7.1f}  "
              f"{r.percentile(99):>7.1f}  {r.rate / ceiling.rate:>9.2f}")
    print(f"(in-process latencies are per call; the ceiling is the batch-{CEILING_BATCH} row)")

    print(f"\nin-process, batches of {CEILING_BATCH} vs one image per call: {ceiling.rate / single.rate:.2f}x "
          f"images/s ({ceiling.rate:.1f} vs {single.rate:.1f}): what batching saves in decode + forward alone")
    for levels in servers.values():
        for r in levels:
            print(f"{r.mode}, {r.clients} client(s): {r.rate / ceiling.rate:.2f}x the in-process ceiling "
                  f"({r.rate:.1f} vs {ceiling.rate:.1f} images/s)")
    off = servers.get(1, [])
    for size, levels in servers.items():
        for b, u in zip(levels, off) if size != 1 else ():
            print(f"{b.mode.removeprefix('server, ')} vs batching off, {b.clients} client(s): {b.rate / u.rate:.2f}x "
                  f"images/s ({b.rate:.1f} vs {u.rate:.1f}); p50 {b.percentile(50):.0f} vs "
                  f"{u.percentile(50):.0f} ms, p99 {b.percentile(99):.0f} vs {u.percentile(99):.0f} ms")
    errors = sum(r.errors for r in rows)
    if errors:
        print(f"warning: {errors} requests were not answered 200 during the timed runs")
    others = max(r.others_busy for r in rows)
    print(f"other processes on this machine used up to {others:.0%} of its CPUs during a timed level"
          + ("; the figures are lower and noisier than on an idle machine" if others > 0.10 else ""))


def main(argv: list[str] | None = None) -> None:
    sys.path.insert(0, str(REPO_ROOT))  # run as a script from anywhere, bincount importable
    # The same OpenMP policy as the server's (bincount.serving.server sets it unless it is
    # set), so that the ceiling and the server run the model alike; before torch loads.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    args = parse_args(argv)
    from bincount.model.predictor import load_predictor
    from bincount.serving.package import build_package

    raws, described = load_images(args.data, args.images)
    state, meta = build_model(args.arch, args.image_size)
    package = build_package(state, meta)
    predictor = load_predictor(state, meta)
    print(f"{described}; {args.arch} at {args.image_size} px on {predictor.device}", flush=True)

    expected = predictor.predict_bytes(raws)
    in_process_levels = []
    for batch in (CEILING_BATCH, 1):
        print(f"in-process: predict_bytes, batch {batch}, for {args.seconds:g} s...", flush=True)
        with cpu_use(None) as others:
            level = in_process(predictor, raws, args.seconds, batch)
        level.others_busy = others["busy"]
        print(f"  {level.rate:.1f} images/s", flush=True)
        in_process_levels.append(level)
    ceiling, single = in_process_levels

    servers = measure_servers(package, raws, expected, args)
    print_report(ceiling, single, servers, args, described, predictor.device)


if __name__ == "__main__":
    main()
