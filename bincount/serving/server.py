"""The local endpoint: SageMaker's container protocol on a real HTTP server.

``GET /ping`` answers 200 once the model is loaded; ``POST /invocations`` runs
the handler in bincount.serving.handler. Bad requests get a 4xx with a message; the
server keeps serving. Starlette on uvicorn: a maintained ASGI stack, not a
hand-rolled socket loop.

Concurrent requests share forward passes (dynamic micro-batching): each request
is read, validated and decoded on its own, so bad input never reaches the
model; the decoded images then wait in a queue, and one worker puts whatever
arrived within a few milliseconds (up to ``max_batch_size`` images) through the
model at once and hands each request its slice of the answer.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from bincount.model.metadata import ModelMeta

DEFAULT_PORT = 8080
DEFAULT_MAX_BODY = 10 * 1024 * 1024
DEFAULT_MAX_BATCH_SIZE = "auto"
DEFAULT_MAX_BATCH_DELAY_MS = 5.0
AUTO_BATCH_LIMIT = 32  # the largest batch "auto" tries
MAX_TIMED_BATCH_S = 2.0  # ...unless a smaller one already takes this long
# Environment variables that set the batching defaults, so that a server
# started by someone else (bincount.serving.endpoint.start_local_endpoint, a container)
# can be configured without changing its command line.
MAX_BATCH_SIZE_ENV = "BINCOUNT_MAX_BATCH_SIZE"
MAX_BATCH_DELAY_ENV = "BINCOUNT_MAX_BATCH_DELAY_MS"

log = logging.getLogger("bincount.serving.server")


# --- Micro-batching ----------------------------------------------------------

@dataclass
class _Job:
    items: Any  # a sized batch of decoded images (a uint8 tensor)
    future: asyncio.Future
    queued_at: float = field(default_factory=time.monotonic)


class MicroBatcher:
    """Groups the images of requests that arrive close together into one forward pass.

    ``forward(parts)`` takes a list of per-request image batches and returns one
    answer per image, in order; it runs in a worker thread so the event loop
    keeps accepting and decoding requests meanwhile. A single worker task runs
    one forward pass at a time: on one device, passes in parallel only compete.

    The worker waits for more requests at most ``max_delay_s`` after the first
    one was queued, and only while another request is being read or decoded
    (see ``arriving``): an idle server answers a lone request without delay,
    and a busy one batches what queued up during the previous pass without
    waiting at all.
    """

    def __init__(self, forward: Callable[[list], list], *, max_batch_size: int, max_delay_s: float):
        self._forward = forward
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self._queue: asyncio.Queue[_Job] = asyncio.Queue()
        self._carry: _Job | None = None  # taken from the queue but did not fit in the last batch
        self._arriving = 0
        self._task: asyncio.Task | None = None

    # The API for request handlers.

    @contextlib.contextmanager
    def arriving(self):
        """Wrap reading and decoding a request: the worker may wait for it to join a batch."""
        self._arriving += 1
        try:
            yield
        finally:
            self._arriving -= 1

    async def submit(self, items) -> list:
        """The answers for ``items``, once the batch they joined has run."""
        if not self.running:
            raise RuntimeError("the batch worker is not running")
        future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Job(items, future))
        return await future

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="bincount-batch-worker")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        leftover = [self._carry] if self._carry else []
        while not self._queue.empty():
            leftover.append(self._queue.get_nowait())
        for job in leftover:
            if not job.future.done():
                job.future.set_exception(RuntimeError("the server is shutting down"))

    # The worker.

    async def _run(self) -> None:
        while True:
            jobs = await self._collect()
            try:
                await self._process(jobs)
            except Exception:  # noqa: BLE001 - a bug here must not stop every later request
                log.exception("batch worker: unexpected error; carrying on")
                self._fail(jobs, RuntimeError("internal error in the batch worker"))

    async def _collect(self) -> list[_Job]:
        first = self._carry or await self._queue.get()
        self._carry = None
        jobs, size = [first], len(first.items)
        deadline = first.queued_at + self.max_delay_s
        while size < self.max_batch_size:
            job = await self._next_job(deadline)
            if job is None:
                break
            if size + len(job.items) > self.max_batch_size:
                self._carry = job  # starts the next batch; a request is never split
                break
            jobs.append(job)
            size += len(job.items)
        return jobs

    async def _next_job(self, deadline: float) -> _Job | None:
        """A queued job now; or, while a request is on its way, the next one before ``deadline``."""
        if not self._queue.empty():
            return self._queue.get_nowait()
        remaining = deadline - time.monotonic()
        if self._arriving == 0 or remaining <= 0:
            return None
        # asyncio.wait rather than wait_for: on Python < 3.12 wait_for can drop
        # an item that arrives just as it times out. A cancelled get leaves the
        # item in the queue.
        getter = asyncio.ensure_future(self._queue.get())
        done, _ = await asyncio.wait({getter}, timeout=remaining)
        if getter in done:
            return getter.result()
        getter.cancel()
        return None

    async def _process(self, jobs: list[_Job]) -> None:
        from starlette.concurrency import run_in_threadpool

        jobs = [job for job in jobs if not job.future.done()]  # cancelled: its client went away
        if not jobs:
            return
        try:
            answers = await run_in_threadpool(self._forward, [job.items for job in jobs])
        except Exception as e:  # noqa: BLE001 - passed on to the requests, as a 500
            if len(jobs) > 1:
                # One request's input may be what broke the model: run each on
                # its own so only that request fails, not those batched with it.
                for job in jobs:
                    await self._process([job])
            else:
                self._fail(jobs, e)
            return
        start = 0
        for job in jobs:
            if not job.future.done():
                job.future.set_result(answers[start:start + len(job.items)])
            start += len(job.items)

    @staticmethod
    def _fail(jobs: list[_Job], error: BaseException) -> None:
        for job in jobs:
            if not job.future.done():
                job.future.set_exception(error)


# --- Choosing the batch size ------------------------------------------------------

def choose_batch_size(seconds_per_image: dict[int, float]) -> int:
    """The batch size with the most images/s; a smaller one within 5% of it wins.

    Bigger is not always faster: on 2 CPU cores EfficientNet-Lite0 at 224 px
    ran batches of 4 at 26 ms per image and batches of 32 at 59 (activations
    outgrow the caches), while ResNet18 at 64 px kept gaining up to 32. The 5%
    absorbs timing noise, and a smaller batch keeps its requests waiting less.
    """
    best = min(seconds_per_image.values())
    return min(b for b, t in seconds_per_image.items() if t <= best / 0.95)


def time_batch_sizes(predictor, limit: int = AUTO_BATCH_LIMIT, rounds: int = 3) -> dict[int, float]:
    """Seconds per image of the model on blank batches of 1, 2, 4, ... ``limit`` images.

    Sizes take turns, round after round, and each keeps its fastest round:
    other work on the machine only ever adds time, and taking turns keeps a
    burst of it from landing on one size alone. Sizes stop doubling once one
    batch takes over MAX_TIMED_BATCH_S: an ensemble with flip TTA costs 4 forward
    passes per member per photo, and on a CPU timing it at 32 would hold up
    start-up for a minute to learn what a batch that slow cannot gain.
    """
    import torch

    sizes = [2 ** k for k in range(limit.bit_length()) if 2 ** k <= limit]
    images = torch.zeros((sizes[-1], 3, predictor.meta.image_size, predictor.meta.image_size),
                         dtype=torch.uint8)
    for k, size in enumerate(sizes):  # warm-up: the first pass at each shape picks kernels and allocates
        start = time.perf_counter()
        predictor.predict_tensors(images[:size], batch_size=size)
        if time.perf_counter() - start > MAX_TIMED_BATCH_S:
            sizes = sizes[:k + 1]
            break
    fastest = dict.fromkeys(sizes, float("inf"))
    for _ in range(rounds):
        for size in sizes:
            start = time.perf_counter()
            predictor.predict_tensors(images[:size], batch_size=size)
            fastest[size] = min(fastest[size], (time.perf_counter() - start) / size)
    return fastest


# --- The HTTP app ---------------------------------------------------------------

async def _read_body(request, max_body_bytes: int) -> bytes:
    from bincount.serving.handler import RequestError

    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_body_bytes:
        raise RequestError(f"body of {declared} bytes is over the {max_body_bytes}-byte limit", 413)
    body = bytearray()
    async for chunk in request.stream():  # chunked uploads declare no length: count as they come
        body.extend(chunk)
        if len(body) > max_body_bytes:
            raise RequestError(f"body is over the {max_body_bytes}-byte limit", 413)
    return bytes(body)


def _decode_request(predictor, body: bytes, content_type: str):
    """Validate a request and decode its images: uint8 tensor (N, 3, size, size)."""
    from bincount.serving import handler as inference

    raws = inference.input_fn(body, content_type)
    try:
        return predictor.prepare(raws)
    except Exception as e:  # noqa: BLE001 - the bytes passed input_fn's check, but are still the client's
        raise inference.RequestError(f"an image could not be decoded: {e}") from None


def create_app(model, *, max_body_bytes: int = DEFAULT_MAX_BODY,
               max_batch_size: int | str = DEFAULT_MAX_BATCH_SIZE,
               max_batch_delay_ms: float = DEFAULT_MAX_BATCH_DELAY_MS):
    """The ASGI app for ``model``: a model folder, or an already loaded Predictor.

    ``max_batch_size`` "auto" times the model and picks the fastest size (see
    choose_batch_size); 1 turns micro-batching off: each request then runs its
    own forward pass in the thread pool, concurrently with the others. The
    size used, and the timings behind "auto", are in ``app.state``.
    """
    import torch
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    from bincount.serving import handler as inference

    predictor = model if isinstance(model, inference.Predictor) else inference.model_fn(str(model))
    timings = {}
    if max_batch_size == "auto":
        timings = time_batch_sizes(predictor)
        max_batch_size = choose_batch_size(timings)
    batcher = None
    if max_batch_size > 1:
        def forward(parts: list) -> list[dict]:
            return predictor.predict_tensors(torch.cat(parts), batch_size=max_batch_size)

        batcher = MicroBatcher(forward, max_batch_size=max_batch_size, max_delay_s=max_batch_delay_ms / 1000)

    async def predict(images) -> list[dict]:
        if batcher:
            return await batcher.submit(images)
        return await run_in_threadpool(predictor.predict_tensors, images)

    def error(message: str, status: int) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    async def ping(request: Request) -> Response:
        if batcher and not batcher.running:
            return error("the batch worker is not running", 503)
        return JSONResponse({"status": "ok", "run_id": predictor.meta.run_id})

    async def invocations(request: Request) -> Response:
        try:
            with batcher.arriving() if batcher else contextlib.nullcontext():
                accept = inference.check_accept(request.headers.get("accept"))  # before any model work
                body = await _read_body(request, max_body_bytes)
                images = await run_in_threadpool(_decode_request, predictor, body,
                                                 request.headers.get("content-type", ""))
            prediction = await predict(images)
        except inference.RequestError as e:
            return error(str(e), e.status)
        except Exception as e:  # noqa: BLE001 - our fault (the model, a bug): say so, as JSON, keep serving
            log.exception("internal error answering /invocations")
            return error(f"internal error: {type(e).__name__}: {e}", 500)
        return Response(inference.output_fn(prediction, accept), media_type=inference.JSON_TYPE)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if batcher:
            batcher.start()
        try:
            yield
        finally:
            if batcher:
                await batcher.stop()

    app = Starlette(routes=[Route("/ping", ping, methods=["GET"]),
                            Route("/invocations", invocations, methods=["POST"])], lifespan=lifespan)
    app.state.max_batch_size, app.state.batch_timings = max_batch_size, timings
    return app


def _prefer_passive_openmp() -> None:
    """Let torch's idle OpenMP threads sleep rather than spin.

    The server decodes requests in threads while the model runs. With libgomp's
    default (spinning) policy, an OpenMP thread that loses its core to one of
    those threads, or to another process, stalls every parallel region: on 2
    busy cores a ResNet18 forward pass was 10-70x slower (670 vs 10 ms at batch
    1), and PASSIVE removed that. OpenMP reads the variable once, when torch
    loads, so this does nothing if torch is already imported or the variable is set.
    """
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def describe_batching(app, max_batch_delay_ms: float) -> str:
    size, timings = app.state.max_batch_size, app.state.batch_timings
    chosen = "micro-batching off" if size == 1 else f"micro-batching up to {size} images, {max_batch_delay_ms:g} ms"
    if not timings:
        return chosen
    measured = ", ".join(f"{b}: {1000 * t:.1f}" for b, t in timings.items())
    return f"{chosen}; chosen from ms per image by batch size {{{measured}}}"


def serve(model_dir: str | Path, *, host: str = "127.0.0.1", port: int = DEFAULT_PORT,
          max_body_bytes: int = DEFAULT_MAX_BODY, max_batch_size: int | str = DEFAULT_MAX_BATCH_SIZE,
          max_batch_delay_ms: float = DEFAULT_MAX_BATCH_DELAY_MS) -> None:
    import uvicorn

    _prefer_passive_openmp()
    app = create_app(model_dir, max_body_bytes=max_body_bytes, max_batch_size=max_batch_size,
                     max_batch_delay_ms=max_batch_delay_ms)
    meta = ModelMeta.read(Path(model_dir) / "model.json")
    print(f"serving run {meta.run_id} ({meta.arch}) on http://{host}:{port} "
          f"({describe_batching(app, max_batch_delay_ms)})", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")


def batch_size_arg(value: str) -> int | str:
    """argparse type for --max-batch-size: "auto" or a whole number >= 1."""
    if value.strip().lower() == "auto":
        return "auto"
    if not value.strip().isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a whole number >= 1, not {value!r}")
    return int(value)


def _env_default(parser: argparse.ArgumentParser, name: str, default, kind):
    value = os.environ.get(name, "")
    try:
        return kind(value) if value else default
    except (ValueError, argparse.ArgumentTypeError) as e:
        parser.error(f"${name}: {e}")


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    """The endpoint's options, shared by ``python -m bincount.serving.server`` and ``bincount serve``."""
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="(default: %(default)s)")
    parser.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY,
                        help="larger requests get 413 (default: %(default)s)")
    parser.add_argument("--max-batch-size", type=batch_size_arg,
                        default=_env_default(parser, MAX_BATCH_SIZE_ENV, DEFAULT_MAX_BATCH_SIZE, batch_size_arg),
                        help="most images that concurrent requests put through the model in one forward pass "
                             "(a single larger request runs alone, in passes of this size). 'auto' times the "
                             f"model at startup on batches of 1, 2, 4, ... {AUTO_BATCH_LIMIT} (seconds on a CPU) "
                             "and takes the fastest per image; 1 turns micro-batching off, so each request runs "
                             "its own pass "
                             f"(default: %(default)s; ${MAX_BATCH_SIZE_ENV} sets it)")
    parser.add_argument("--max-batch-delay-ms", type=float,
                        default=_env_default(parser, MAX_BATCH_DELAY_ENV, DEFAULT_MAX_BATCH_DELAY_MS, float),
                        help="longest a request waits for others to join its batch; it waits only while "
                             "other requests are being read or decoded, so a lone request never waits "
                             f"(default: %(default)s; ${MAX_BATCH_DELAY_ENV} sets it)")


def serve_with_arguments(model_dir: str | Path, args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    if args.max_batch_delay_ms < 0 or args.max_body_bytes < 1:
        parser.error("need --max-batch-delay-ms >= 0 and --max-body-bytes >= 1")
    serve(model_dir, host=args.host, port=args.port, max_body_bytes=args.max_body_bytes,
          max_batch_size=args.max_batch_size, max_batch_delay_ms=args.max_batch_delay_ms)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bincount.serving.server",
                                     description="Serve an extracted model.tar.gz folder.")
    parser.add_argument("--model-dir", required=True, help="folder with model.pt and model.json")
    add_server_arguments(parser)
    args = parser.parse_args(argv)
    serve_with_arguments(args.model_dir, args, parser)


if __name__ == "__main__":
    sys.exit(main())
