"""Benchmark: images per second of ``fetch_subset`` against a real S3 server.

Real Amazon Bin Image Dataset objects are uploaded to a local ``moto_server``
(a real HTTP S3 endpoint on 127.0.0.1). Both methods below then read them
through a small delaying TCP proxy that holds each HTTP request for a fixed
time (default 30 ms) before passing it on, as a round trip to a cloud bucket
would cost. Measured in the same run:

* a sequential boto3 loop, as reference projects download the dataset:
  for each id, get the metadata json, then get the image, one after the other;
* ``bincount.data.fetch.fetch_subset`` with its thread pool.

Both read the label from the metadata and fully decode each image with PIL, so
the work per image is the same; only the way requests are issued differs.

Why a proxy and not ``tc netem``: netem needs the kernel's sch_netem module and
CAP_NET_ADMIN, which containers and CI machines often lack; a proxy needs
nothing beyond Python. It adds the delay once per HTTP request, not per packet
or per TCP handshake. (moto's werkzeug server closes the connection after each
response, so every request opens a new loopback connection; those connects are
not delayed, so neither method pays for them as it would against a far server.)

moto_server, the proxy and the client share this machine's CPUs, which a real
bucket would not: the report gives each process's CPU per image and a run
without added latency (the ceiling this machine allows fetch_subset).

Run: ``python benchmarks/fetch.py`` (see ``--help``). It needs the sample at
``../shared/abid-sample`` (or ``--data`` / ``BINCOUNT_ABID_SAMPLE``) and exits
with a message and status 1 if it is missing.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import multiprocessing
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "abid-sample"
BUCKET = "bench-bucket"
CLASSES = [1, 2, 3, 4, 5]  # the classes of the sample's file_list.json
HOST = "127.0.0.1"  # everything binds to loopback only
# moto never checks credentials, but boto3 must find some to sign requests;
# setting them here also keeps real credentials from ever being used.
DUMMY_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


# --------------------------------------------------------------------------
# Options and data
# --------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from bincount.data.fetch import DEFAULT_WORKERS

    parser = argparse.ArgumentParser(
        description="Images/s of bincount's fetch_subset vs a sequential boto3 loop (metadata, then image, "
                    "per id), both reading real ABID objects from a local moto S3 server through a proxy that "
                    "adds a fixed latency to every HTTP request.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data", type=Path,
                        default=Path(os.environ.get("BINCOUNT_ABID_SAMPLE", DEFAULT_DATA)),
                        help="abid-sample folder (bucket layout + file_list.json); "
                             "env BINCOUNT_ABID_SAMPLE overrides the default")
    parser.add_argument("--n", type=int, default=300, help="number of images (ids from file_list.json)")
    parser.add_argument("--latency-ms", type=float, default=30.0,
                        help="delay added before each HTTP request is forwarded to the server")
    parser.add_argument("--jitter-ms", type=float, default=0.0,
                        help="each request's delay is drawn uniformly from latency +- jitter")
    parser.add_argument("--workers", type=int, default=DEFAULT_WORKERS,
                        help="fetch_subset threads (and S3 connection pool size)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed runs of each method; the median is reported")
    parser.add_argument("--no-ceiling", action="store_true",
                        help="skip the extra fetch_subset run without added latency, which shows "
                             "how fast this machine's server + client can go at all")
    args = parser.parse_args(argv)
    if args.n < 1 or args.workers < 1 or args.repeats < 1:
        parser.error("--n, --workers and --repeats must be at least 1")
    if args.latency_ms < 0 or not 0 <= args.jitter_ms <= args.latency_ms:
        parser.error("need latency >= 0 and 0 <= jitter <= latency")
    return args


def pick_ids(data: Path, n: int) -> list[str]:
    """``n`` ids from file_list.json, taken round-robin over its classes so that all are present."""
    listing = json.loads((data / "file_list.json").read_text())
    # Ids stay strings: '00526' and '526' are different bins.
    queues = [[Path(key).stem for key in keys] for keys in listing.values()]
    ids: list[str] = []
    while len(ids) < n and any(queues):
        for queue in queues:
            if queue and len(ids) < n:
                ids.append(queue.pop(0))
    return ids


def check_data(data: Path) -> None:
    if not all((data / name).exists() for name in ("file_list.json", "bin-images", "metadata")):
        sys.exit(f"benchmarks/fetch.py: no ABID sample at {data} (expected file_list.json, bin-images/, "
                 "metadata/). Point --data or BINCOUNT_ABID_SAMPLE at the abid-sample folder.")


# --------------------------------------------------------------------------
# Delaying proxy (runs in its own process so it does not compete for the
# benchmark's GIL; asyncio so each connection's delay overlaps the others')
# --------------------------------------------------------------------------

class _Connection:
    """Per-connection state: is the next client chunk the start of a new request?"""

    def __init__(self) -> None:
        self.new_request = True


async def _pump(reader, writer, before_write) -> None:
    """Copy one direction of a connection, awaiting ``before_write()`` per chunk."""
    try:
        while data := await reader.read(65536):
            await before_write()
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


def _request_delayer(conn: _Connection, delay):
    # HTTP/1.1 clients send a request only after reading the previous
    # response, so the first client bytes after any response bytes (or on a
    # fresh connection) begin a new request: hold those back once.
    async def before_write() -> None:
        if conn.new_request:
            conn.new_request = False
            await asyncio.sleep(delay())
    return before_write


def _response_marker(conn: _Connection):
    async def before_write() -> None:
        conn.new_request = True
    return before_write


async def _serve_proxy(upstream_port: int, delay, ready) -> None:
    async def handle(client_reader, client_writer):
        try:
            server_reader, server_writer = await asyncio.open_connection(HOST, upstream_port)
        except OSError:
            client_writer.close()
            return
        conn = _Connection()
        await asyncio.gather(_pump(client_reader, server_writer, _request_delayer(conn, delay)),
                             _pump(server_reader, client_writer, _response_marker(conn)))

    server = await asyncio.start_server(handle, HOST, 0, backlog=512)
    ready.send(server.sockets[0].getsockname()[1])  # port 0: the OS picks a free one, no race
    async with server:
        await server.serve_forever()


def run_proxy(upstream_port: int, latency_s: float, jitter_s: float, seed: int, ready) -> None:
    """Process entry point: proxy 127.0.0.1:<free port> -> 127.0.0.1:upstream_port with delays."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops us
    rng = random.Random(seed)

    def delay() -> float:
        return latency_s + rng.uniform(-jitter_s, jitter_s) if jitter_s else latency_s

    asyncio.run(_serve_proxy(upstream_port, delay, ready))


def start_proxy(upstream_port: int, latency_s: float, jitter_s: float) -> tuple[multiprocessing.Process, int]:
    ctx = multiprocessing.get_context("spawn")  # no inherited threads or sockets
    receive, send = ctx.Pipe(duplex=False)
    process = ctx.Process(target=run_proxy, args=(upstream_port, latency_s, jitter_s, 0, send), daemon=True)
    process.start()
    deadline = time.monotonic() + 30
    while not receive.poll(0.1):
        if not process.is_alive() or time.monotonic() > deadline:
            stop(process)
            raise RuntimeError("the delaying proxy did not start (see the error above, if any)")
    return process, receive.recv()


# --------------------------------------------------------------------------
# moto server
# --------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def start_moto() -> tuple[subprocess.Popen, int]:
    exe = Path(sys.executable).with_name("moto_server")
    command = [str(exe)] if exe.exists() else [shutil.which("moto_server") or "moto_server"]
    port = free_port()
    # Its per-request log lines are discarded; a new session keeps Ctrl-C
    # from reaching it before the benchmark's own cleanup runs.
    process = subprocess.Popen(command + ["-H", HOST, "-p", str(port)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    wait_until_answers(f"http://{HOST}:{port}/", process)
    return process, port


def wait_until_answers(url: str, process: subprocess.Popen, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"moto_server exited with status {process.returncode} before answering")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except (urllib.error.URLError, ConnectionError, OSError):
            time.sleep(0.1)
    raise RuntimeError(f"moto_server did not answer at {url} within {timeout_s:.0f} s")


def stop(process) -> None:
    """Stop a subprocess.Popen or multiprocessing.Process, politely first."""
    if process is None:
        return
    alive = process.poll() is None if isinstance(process, subprocess.Popen) else process.is_alive()
    if not alive:
        return
    process.terminate()
    try:
        if isinstance(process, subprocess.Popen):
            process.wait(timeout=5)
        else:
            process.join(timeout=5)
    except subprocess.TimeoutExpired:
        pass
    if (process.poll() is None) if isinstance(process, subprocess.Popen) else process.is_alive():
        process.kill()


def s3_client(endpoint_url: str, max_pool_connections: int = 10):
    """A plain boto3 client, as a reference project would make it (plus the endpoint)."""
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=endpoint_url, region_name="us-east-1",
                        config=Config(max_pool_connections=max_pool_connections))


def upload(endpoint_url: str, data: Path, ids: list[str]) -> int:
    """Create the bucket and put each id's image and metadata; returns total image bytes."""
    client = s3_client(endpoint_url, max_pool_connections=8)
    client.create_bucket(Bucket=BUCKET)

    def put(bin_id: str) -> int:
        image = (data / "bin-images" / f"{bin_id}.jpg").read_bytes()
        client.put_object(Bucket=BUCKET, Key=f"bin-images/{bin_id}.jpg", Body=image)
        client.put_object(Bucket=BUCKET, Key=f"metadata/{bin_id}.json",
                          Body=(data / "metadata" / f"{bin_id}.json").read_bytes())
        return len(image)

    with ThreadPoolExecutor(8) as pool:  # direct endpoint: parallel puts just save setup time
        return sum(pool.map(put, ids))


# --------------------------------------------------------------------------
# The two methods
# --------------------------------------------------------------------------

def sequential_boto3(client, ids: list[str]) -> int:
    """The reference approach: per id, get metadata, then get image, one after the other.

    Like fetch_subset it reads the label and decodes the whole image, so the
    comparison measures only how requests are issued. Returns images read.
    """
    from PIL import Image

    count = 0
    for bin_id in ids:
        meta = json.loads(client.get_object(Bucket=BUCKET, Key=f"metadata/{bin_id}.json")["Body"].read())
        meta["EXPECTED_QUANTITY"]  # the label, as fetch_subset reads it
        raw = client.get_object(Bucket=BUCKET, Key=f"bin-images/{bin_id}.jpg")["Body"].read()
        with Image.open(io.BytesIO(raw)) as image:
            image.load()
        count += 1
    return count


def bincount_fetch(source, ids: list[str], workers: int) -> int:
    from bincount.data.fetch import fetch_subset

    subset = fetch_subset(source, classes=CLASSES, per_class=None, candidate_ids=ids, workers=workers,
                          progress=False)
    assert len(subset.ids) == len(ids), f"fetch_subset returned {len(subset.ids)} of {len(ids)} images; " \
                                        f"skipped: {subset.skipped[:5]}"
    return len(subset.ids)


@dataclass
class Result:
    method: str
    images: int
    seconds: float  # median over repeats
    cpu_ms: dict[str, float]  # CPU milliseconds per image, by process, mean over repeats
    ours_busy: float  # share of all CPUs used by the processes above while timed
    machine_busy: float  # share of all CPUs used by anything (other jobs on the machine too)

    @property
    def rate(self) -> float:
        return self.images / self.seconds


def cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU seconds used so far by a process (all its threads); this one if pid is None."""
    if pid is None:
        return time.process_time()
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:  # not Linux, or the process is gone
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def machine_cpu() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs since boot, from /proc/stat; NaN where there is none."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except OSError:
        return float("nan"), float("nan")
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields[:8]) - idle, sum(fields[:8])  # user..steal; guest time is already in user


def timed(method: str, run, ids: list[str], repeats: int, pids: dict[str, int | None]) -> Result:
    """Median wall time of ``run(ids)`` over ``repeats``, and the CPU each process spent on it.

    ``pids`` names the processes to account (None: this one). Each run must
    return len(ids).
    """
    times = []
    cpu = dict.fromkeys(pids, 0.0)
    machine_before = machine_cpu()
    for _ in range(repeats):
        before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        start = time.perf_counter()
        got = run(ids)
        times.append(time.perf_counter() - start)
        for name, pid in pids.items():
            cpu[name] += cpu_seconds(pid) - before[name]
        assert got == len(ids), f"{method}: read {got} of {len(ids)} images"
    machine_after = machine_cpu()
    per_image = {name: 1000 * total / (repeats * len(ids)) for name, total in cpu.items()}
    ours_busy = sum(cpu.values()) / (sum(times) * len(os.sched_getaffinity(0)))
    machine_busy = (machine_after[0] - machine_before[0]) / (machine_after[1] - machine_before[1])
    return Result(method, len(ids), statistics.median(times), per_image, ours_busy, machine_busy)


def get_round_trip_ms(client, key: str, tries: int = 5) -> float:
    """Median time of one small GET on an already open connection."""
    client.get_object(Bucket=BUCKET, Key=key)["Body"].read()  # opens the connection
    times = []
    for _ in range(tries):
        start = time.perf_counter()
        client.get_object(Bucket=BUCKET, Key=key)["Body"].read()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------

def print_report(baseline: Result, ours: Result, ceiling: Result | None, args, image_bytes: int,
                 rtt: tuple[float, float]) -> None:
    import moto

    n, cpus = baseline.images, len(os.sched_getaffinity(0))
    print(f"\n{n} real ABID images ({image_bytes / n / 1024:.0f} KiB mean) + their metadata on moto_server "
          f"{moto.__version__} at {HOST}; {cpus} CPUs; Python {sys.version.split()[0]}")
    jitter = f" +- {args.jitter_ms:g}" if args.jitter_ms else ""
    print(f"latency: a delaying TCP proxy holds each HTTP request {args.latency_ms:g}{jitter} ms; "
          f"one metadata GET takes {rtt[1]:.1f} ms through it vs {rtt[0]:.1f} ms direct")
    print("both methods: get metadata json, parse the label, get the image, decode it fully with PIL; "
          f"median of {args.repeats} timed run(s) after a warm-up\n")

    rows = [baseline, ours] + ([ceiling] if ceiling else [])
    width = max(len(r.method) for r in rows)
    names = list(baseline.cpu_ms)
    cpu_head = " ".join(f"{name:>6}" for name in names)
    print(f"{'method':<{width}}  {'images':>6}  {'seconds':>8}  {'images/s':>9} | CPU ms/image: {cpu_head} "
          f"| CPUs busy: benchmark machine")
    for r in rows:
        cpu = " ".join(f"{r.cpu_ms[name]:>6.1f}" for name in names)
        print(f"{r.method:<{width}}  {r.images:>6}  {r.seconds:>8.2f}  {r.rate:>9.1f} | {'':13} {cpu} "
              f"| {'':10} {r.ours_busy:>9.0%} {r.machine_busy:>7.0%}")

    print(f"\nfetch_subset vs sequential boto3: {ours.rate / baseline.rate:.1f}x ({ours.rate:.1f} vs "
          f"{baseline.rate:.1f} images/s, {args.latency_ms:g} ms added latency, {args.workers} workers)")
    if ceiling:
        print(f"ceiling: without added latency fetch_subset reaches {ceiling.rate:.1f} images/s "
              f"({ceiling.rate / baseline.rate:.1f}x the sequential loop); moto_server and the client share "
              f"the {cpus} CPUs, so where the delayed run comes near this, local CPU (largely the server's, "
              f"which a real bucket does not charge to us) is the limit, not latency")
    others = max(r.machine_busy - r.ours_busy for r in rows)
    if others > 0.10:
        print(f"warning: other processes used up to {others:.0%} of the CPUs during the timed runs; "
              "figures are lower and noisier than on an idle machine")


def run_benchmark(args) -> None:
    from bincount.data.sources import S3Source

    ids = pick_ids(args.data, args.n)
    warmup_ids = ids[:min(len(ids), args.workers)]
    moto_process = proxy_process = None
    try:
        moto_process, moto_port = start_moto()
        direct_url = f"http://{HOST}:{moto_port}"
        image_bytes = upload(direct_url, args.data, ids)
        proxy_process, proxy_port = start_proxy(moto_port, args.latency_ms / 1000, args.jitter_ms / 1000)
        pids = {"client": None, "moto": moto_process.pid, "proxy": proxy_process.pid}
        delayed_url = f"http://{HOST}:{proxy_port}"
        print(f"moto_server on {direct_url} ({len(ids)} images uploaded), delaying proxy on {delayed_url}",
              flush=True)

        # Prove the delay is real before trusting any number that depends on it.
        key = f"metadata/{ids[0]}.json"
        rtt = get_round_trip_ms(s3_client(direct_url), key), get_round_trip_ms(s3_client(delayed_url), key)
        min_ms = args.latency_ms - args.jitter_ms
        assert rtt[1] >= min_ms, f"a GET through the proxy took {rtt[1]:.1f} ms, less than {min_ms:g} ms"
        print(f"one GET of {key}: {rtt[0]:.1f} ms direct, {rtt[1]:.1f} ms through the delaying proxy", flush=True)

        # One client / source per method, warmed up on the same ids so that
        # imports and connection pools are in place before timing.
        client = s3_client(delayed_url)
        source = S3Source(f"s3://{BUCKET}", endpoint_url=delayed_url, max_pool_connections=args.workers)
        sequential_boto3(client, warmup_ids)
        bincount_fetch(source, warmup_ids, args.workers)

        print(f"timing sequential boto3 loop ({args.repeats} x {len(ids)} images)...", flush=True)
        baseline = timed("sequential boto3 loop", lambda i: sequential_boto3(client, i), ids, args.repeats,
                         pids)
        print(f"timing fetch_subset ({args.repeats} x {len(ids)} images)...", flush=True)
        ours = timed(f"fetch_subset ({args.workers} workers)",
                     lambda i: bincount_fetch(source, i, args.workers), ids, args.repeats, pids)
        ceiling = None
        if not args.no_ceiling:
            direct = S3Source(f"s3://{BUCKET}", endpoint_url=direct_url, max_pool_connections=args.workers)
            bincount_fetch(direct, warmup_ids, args.workers)
            ceiling = timed("fetch_subset, no added latency", lambda i: bincount_fetch(direct, i, args.workers),
                            ids, args.repeats, pids)
        print_report(baseline, ours, ceiling, args, image_bytes, rtt)
    finally:
        stop(proxy_process)
        stop(moto_process)


def main(argv: list[str] | None = None) -> None:
    sys.path.insert(0, str(REPO_ROOT))  # run as a script from anywhere, bincount importable
    args = parse_args(argv)
    check_data(args.data)
    os.environ.update(DUMMY_AWS_ENV)
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        os.environ.pop(name, None)  # never reach a real account or another endpoint
    # SIGTERM would otherwise end Python without running the cleanup in finally.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        run_benchmark(args)
    except KeyboardInterrupt:
        print("interrupted; moto_server and the proxy were stopped", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
