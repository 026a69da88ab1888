"""Benchmark: how each step's peak memory and time grow with the number of photos.

Runs the real flow (``python flows/bin_flow.py run``, a subprocess per N) with a
one-epoch probe grid (an untrained ResNet18 at 96 px, one point, no ensemble or
TTA: the cheapest grid that still goes through every step) on local-folder
sources of N photos each (default 2k, 8k and 32k): the real photos of
``abid-sample`` repeated under new ids, as hard links (symbolic links where the
filesystem refuses), so a source of 32k photos costs no disk beyond its
metadata. ``--s3 8000`` runs once more with ``--datastore s3`` against a real S3
server (moto, on 127.0.0.1): artifacts and shards then go through the bucket.

While a run goes, every process under it is sampled (psutil, every 0.2 s); each
sample's RSS is summed per task (the task's process and its children, such as
DataLoader workers), and a step's peak is the largest sum over its tasks. A
step's time is from its first task's start to its last task's end, as sampled.

It prints, per N, every step's peak memory, wall time and photos/s, then the
growth from the smallest N to the largest (peak memory ratio, time ratio, and N's
own ratio, which linear time would match), against the goal: peak memory at the
largest N within 1.5x of the smallest and under 3 GB.

Run: ``python benchmarks/scale.py`` (see ``--help``); about 40 minutes on a
2-core CPU with the defaults. Photos come from ``--data`` /
``BINCOUNT_ABID_SAMPLE`` / ``../shared/abid-sample``; everything it writes goes
to a temporary folder (``--keep`` keeps it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
FLOW = REPO_ROOT / "flows" / "bin_flow.py"
STEPS = ("start", "fetch_subset", "gather_subset", "split", "train", "join", "evaluate", "deploy", "end")
PROBE_GRID = {
    "description": "benchmarks/scale.py: one epoch of an untrained ResNet18 at 96 px, the cheapest full pass.",
    "defaults": {"arch": "resnet18", "pretrained": False, "epochs": 1, "image_size": 96, "batch_size": 64,
                 "lr": 1e-3},
    "points": [{"name": "probe"}],
    "select": {"ensemble": 1, "tta": False, "decision": "argmax"},
}
MEMORY_GOAL_RATIO, MEMORY_GOAL_MB = 1.5, 3 * 1024
SAMPLE_S = 0.2


def parse_args(argv=None):
    from accuracy import add_data_argument

    parser = argparse.ArgumentParser(
        description="Peak memory and time of every flow step as the number of photos grows (a probe grid on "
                    "abid-sample photos repeated under new ids).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_data_argument(parser)
    parser.add_argument("--sizes", default="2000,8000,32000", help="comma-separated numbers of photos")
    parser.add_argument("--s3", type=int, default=8000, help="photos for one more run on an S3 datastore "
                                                            "(moto on 127.0.0.1); 0 skips it")
    parser.add_argument("--workers", type=int, default=16, help="fetch_subset's parallel reads")
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (sources, datastores)")
    return parser.parse_args(argv)


def make_source(sample: Path, root: Path, n: int) -> Path:
    """A folder in the bucket layout with ``n`` bins: the sample's, repeated under new ids."""
    ids = sorted(p.stem for p in (sample / "metadata").glob("*.json") if (sample / "bin-images" / f"{p.stem}.jpg").exists())
    if not ids:
        raise SystemExit(f"no photos with metadata in {sample}")
    for sub in ("bin-images", "metadata"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for k in range(n):
        original, new = ids[k % len(ids)], f"x{k:07d}"
        for sub, ext in (("bin-images", "jpg"), ("metadata", "json")):
            target, link = sample / sub / f"{original}.{ext}", root / sub / f"{new}.{ext}"
            try:
                os.link(target, link)
            except OSError:  # another filesystem, or links refused
                os.symlink(target.resolve(), link)
    return root


@dataclass
class StepUsage:
    peak_mb: float = 0.0
    first_s: float = float("inf")
    last_s: float = 0.0

    @property
    def seconds(self) -> float:
        return max(self.last_s - self.first_s, SAMPLE_S)


@dataclass
class Monitor:
    """Samples the processes under ``pid``: per step, the peak summed RSS of a task."""

    pid: int
    steps: dict[str, StepUsage] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)

    @staticmethod
    def step_of(cmdline: list[str]) -> str | None:
        if "step" in cmdline:
            i = cmdline.index("step")
            if i + 1 < len(cmdline) and cmdline[i + 1] in STEPS:
                return cmdline[i + 1]
        return None

    def sample(self, started: float) -> None:
        import psutil

        try:
            children = psutil.Process(self.pid).children(recursive=True)
        except psutil.Error:
            return
        tasks: dict[int, tuple[str, float]] = {}  # task pid -> (step, summed rss)
        owner: dict[int, int] = {}
        for proc in children:
            try:
                step = self.step_of(proc.cmdline())
                if step:
                    tasks[proc.pid] = (step, 0.0)
                    owner[proc.pid] = proc.pid
            except psutil.Error:
                continue
        for proc in children:
            try:
                rss = proc.memory_info().rss
                task = next((p.pid for p in [proc, *proc.parents()] if p.pid in tasks), None)
            except psutil.Error:
                continue
            if task is not None:
                step, total = tasks[task]
                tasks[task] = (step, total + rss)
        now = time.monotonic() - started
        for step, total in tasks.values():
            usage = self.steps.setdefault(step, StepUsage())
            usage.peak_mb = max(usage.peak_mb, total / 2**20)
            usage.first_s, usage.last_s = min(usage.first_s, now), max(usage.last_s, now)

    def run(self, started: float) -> None:
        while not self._stop.is_set():
            self.sample(started)
            time.sleep(SAMPLE_S)

    def __enter__(self):
        self._thread = threading.Thread(target=self.run, args=(time.monotonic(),), daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def run_flow(source: Path, n: int, workdir: Path, grid: Path, *, workers: int, env: dict, top: list[str]) -> dict:
    workdir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, str(FLOW), "--config", "grid", str(grid), *top, "run", "--source", str(source),
               "--per-class", str(n), "--workers", str(workers), "--deploy-target", "local"]
    log = workdir / "run.log"
    started = time.monotonic()
    with open(log, "w") as out:
        process = subprocess.Popen(command, cwd=workdir, stdout=out, stderr=subprocess.STDOUT,
                                   env={**os.environ, **env})
        with Monitor(process.pid) as monitor:
            code = process.wait()
    seconds = time.monotonic() - started
    if code != 0:
        raise SystemExit(f"the flow failed on {n} photos (exit {code}); its log: {log}\n"
                         + log.read_text()[-3000:])
    kept = next((line for line in log.read_text().splitlines() if "kept " in line and " bins " in line), "")
    return {"n": n, "seconds": seconds, "kept": kept.split("] ", 1)[-1],
            "steps": {s: {"peak_mb": u.peak_mb, "seconds": u.seconds} for s, u in monitor.steps.items()}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto() -> tuple[subprocess.Popen, str]:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return process, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.2)
    process.kill()
    raise SystemExit("moto server did not start")


def report(rows: list[dict]) -> None:
    print(f"\n{'photos':>7} {'datastore':>9} {'step':>13} {'peak MB':>8} {'seconds':>8} {'photos/s':>9}")
    for row in rows:
        for step in STEPS:
            usage = row["steps"].get(step)
            if usage:
                print(f"{row['n']:>7} {row['datastore']:>9} {step:>13} {usage['peak_mb']:>8.0f} "
                      f"{usage['seconds']:>8.1f} {row['n'] / usage['seconds']:>9.1f}")
        print(f"{row['n']:>7} {row['datastore']:>9} {'whole run':>13} {'':>8} {row['seconds']:>8.1f} "
              f"{row['n'] / row['seconds']:>9.1f}   ({row['kept']})")
    local = [r for r in rows if r["datastore"] == "local"]
    if len(local) < 2:
        return
    small, large = local[0], local[-1]
    print(f"\ngrowth from {small['n']} to {large['n']} photos ({large['n'] / small['n']:.0f}x the photos); goal: "
          f"peak memory within {MEMORY_GOAL_RATIO}x and under {MEMORY_GOAL_MB / 1024:.0f} GB, time linear")
    print(f"{'step':>13} {'memory x':>9} {'time x':>7} {'peak MB':>8}  goal")
    for step in STEPS:
        a, b = small["steps"].get(step), large["steps"].get(step)
        if not a or not b:
            continue
        memory = b["peak_mb"] / a["peak_mb"]
        ok = memory <= MEMORY_GOAL_RATIO and b["peak_mb"] <= MEMORY_GOAL_MB
        print(f"{step:>13} {memory:>9.2f} {b['seconds'] / a['seconds']:>7.1f} {b['peak_mb']:>8.0f}  "
              f"{'met' if ok else 'MISSED'}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if not (args.data / "metadata").is_dir():
        print(f"no abid-sample at {args.data} (set --data or BINCOUNT_ABID_SAMPLE)", file=sys.stderr)
        return 1
    sizes = [int(x) for x in args.sizes.split(",") if x.strip()]
    tmp = Path(tempfile.mkdtemp(prefix="bincount-scale-"))
    grid = tmp / "probe.json"
    grid.write_text(json.dumps(PROBE_GRID))
    env = {"METAFLOW_USER": os.environ.get("METAFLOW_USER", "benchmark"), "PYTHONUNBUFFERED": "1"}
    rows = []
    moto = None
    try:
        runs = [(n, "local") for n in sizes] + ([(args.s3, "s3")] if args.s3 else [])
        for n, datastore in runs:
            source = tmp / f"source-{n}"
            if not source.exists():
                print(f"linking a source of {n} photos ...", flush=True)
                make_source(args.data, source, n)
            top, extra = [], {}
            if datastore == "s3":
                import boto3

                moto, endpoint = start_moto()
                creds = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                         "AWS_DEFAULT_REGION": "us-east-1"}
                boto3.client("s3", endpoint_url=endpoint, **{k.lower(): v for k, v in creds.items()
                                                             if k != "AWS_DEFAULT_REGION"},
                             region_name="us-east-1").create_bucket(Bucket="scale")
                extra = {**creds, "METAFLOW_DATASTORE_SYSROOT_S3": "s3://scale/metaflow",
                         "METAFLOW_S3_ENDPOINT_URL": endpoint}
                top = ["--datastore", "s3"]
            print(f"running the flow on {n} photos ({datastore} datastore) ...", flush=True)
            row = run_flow(source, n, tmp / f"run-{datastore}-{n}", grid, workers=args.workers,
                           env={**env, **extra}, top=top)
            row["datastore"] = datastore
            rows.append(row)
            print(f"  {row['seconds']:.0f} s; {row['kept']}", flush=True)
        report(rows)
        if args.out:
            args.out.write_text(json.dumps(rows, indent=2))
    finally:
        if moto is not None:
            moto.terminate()
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
