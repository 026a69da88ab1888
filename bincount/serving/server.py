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

Under overload the server sheds work rather than queueing it without end (see
:class:`Limits`): at most ``max_queue`` requests are inside it at once, being
read, decoded, queued or computed, and the next gets 503 with ``Retry-After``;
a request whose client disconnects is dropped, and leaves the batch queue if it
was waiting there, so no forward pass is spent on an answer nobody reads; a body
that does not arrive within ``body_timeout_s`` gets 408; a connection that sends
no complete request head within ``header_timeout_s`` is closed; past
``max_connections`` uvicorn answers 503; on SIGTERM it stops accepting, gives
the requests inside it ``shutdown_timeout_s`` to finish, and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import logging
import os
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

from bincount.serving.capture import CaptureWriter, add_capture_arguments, capture_from_arguments
from bincount.serving.handler import MAX_IMAGE_PIXELS, MAX_REQUEST_PIXELS

DEFAULT_PORT = 8080
DEFAULT_MAX_BODY = 10 * 1024 * 1024
DEFAULT_MAX_BATCH_SIZE = "auto"
DEFAULT_MAX_BATCH_DELAY_MS = 5.0
AUTO_BATCH_LIMIT = 32  # the largest batch "auto" tries
MAX_TIMED_BATCH_S = 2.0  # ...unless a smaller one already takes this long
# Environment variables that set the defaults, so that a server started by
# someone else (bincount.serving.endpoint.start_local_endpoint, a container)
# can be configured without changing its command line.
MAX_BATCH_SIZE_ENV = "BINCOUNT_MAX_BATCH_SIZE"
MAX_BATCH_DELAY_ENV = "BINCOUNT_MAX_BATCH_DELAY_MS"
MAX_QUEUE_ENV = "BINCOUNT_MAX_QUEUE"
MAX_CONNECTIONS_ENV = "BINCOUNT_MAX_CONNECTIONS"
HEADER_TIMEOUT_ENV = "BINCOUNT_HEADER_TIMEOUT_S"
BODY_TIMEOUT_ENV = "BINCOUNT_BODY_TIMEOUT_S"
SHUTDOWN_TIMEOUT_ENV = "BINCOUNT_SHUTDOWN_TIMEOUT_S"
MAX_IMAGE_PIXELS_ENV = "BINCOUNT_MAX_IMAGE_PIXELS"
MAX_REQUEST_PIXELS_ENV = "BINCOUNT_MAX_REQUEST_PIXELS"
RETRY_AFTER_S = 1  # a forward pass takes tens of milliseconds to a second or two: soon, not never
DECODE_THREADS = min(8, os.cpu_count() or 1)  # requests decoded at once (the forward pass has its own thread)

log = logging.getLogger("bincount.serving.server")


@dataclass(frozen=True)
class Limits:
    """What the server takes on at once, and how long it waits for a client.

    The defaults: ``max_queue`` 64 requests is a few seconds of work on a CPU (a
    request is usually one photo, at 10-100 ms a photo) and at most about 64 x 10 MB
    of bodies held; ``max_connections`` leaves room above it for /ping, idle
    keep-alive connections and the 503s themselves. A request head is a few
    hundred bytes (5 s, uvicorn's keep-alive default); a 10 MB body takes 30 s at
    under 3 Mbit/s. ``shutdown_timeout_s`` 8 s fits inside the 10 s that `docker
    stop` and bincount.serving.lifetime allow before they kill the process.
    """

    max_queue: int = 64  # requests inside the server at once; more get 503 + Retry-After
    max_connections: int = 256  # uvicorn's limit_concurrency: connections or requests; more get 503
    header_timeout_s: float = 5.0  # a connection's next complete request head, from open or last answer
    body_timeout_s: float = 30.0  # a request's whole body, from its head; slower gets 408
    shutdown_timeout_s: float = 8.0  # uvicorn's timeout_graceful_shutdown: in-flight requests on SIGTERM
    max_image_pixels: int = MAX_IMAGE_PIXELS  # per image (413)
    max_request_pixels: int = MAX_REQUEST_PIXELS  # all the images of a request together (413)


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


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

async def _read_body(request, max_body_bytes: int, timeout_s: float) -> bytes:
    """The body, or RequestError: 413 over ``max_body_bytes``, 408 not all there within ``timeout_s``.

    Raises starlette's ClientDisconnect if the client leaves while sending it.
    """
    from bincount.serving.handler import RequestError

    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_body_bytes:
        raise RequestError(f"body of {declared} bytes is over the {max_body_bytes}-byte limit", 413)

    async def read() -> bytes:
        body = bytearray()
        async for chunk in request.stream():  # chunked uploads declare no length: count as they come
            body.extend(chunk)
            if len(body) > max_body_bytes:
                raise RequestError(f"body is over the {max_body_bytes}-byte limit", 413)
        return bytes(body)

    try:
        return await asyncio.wait_for(read(), timeout_s)
    except asyncio.TimeoutError:  # (TimeoutError itself only from 3.11)
        raise RequestError(f"the request body did not arrive within {timeout_s:g} s", 408) from None


async def _unless_client_leaves(request, work):
    """``await work``; but if the client disconnects first, cancel it and raise ClientGone.

    ``work`` waits in the batch queue until its forward pass: cancelled, its job's
    future is cancelled and the batch worker skips it. Call once the body has been
    read: from then on, the next ASGI message can only be http.disconnect.
    """
    if await request.is_disconnected():  # already gone (while decoding, say): never queue it
        work.close()
        raise ClientGone
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:  # also when this request itself is cancelled (shutdown): leave nothing running
        watcher.cancel()
        if not task.done():
            task.cancel()
            # Work already in a thread cannot be stopped: let it end unobserved and quiet.
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
    if task.cancelled() or not task.done():
        raise ClientGone
    return task.result()


def _decode_request(predictor, body: bytes, content_type: str, limits: Limits):
    """Validate a request and decode its images: uint8 tensor (N, 3, size, size)."""
    from bincount.serving import handler as inference

    raws = inference.read_images(body, content_type, max_image_pixels=limits.max_image_pixels,
                                 max_request_pixels=limits.max_request_pixels)
    try:
        return predictor.prepare(raws)
    except Exception as e:  # noqa: BLE001 - the bytes passed read_images' check, but are still the client's
        raise inference.RequestError(f"an image could not be decoded: {e}") from None


def create_app(model, *, max_body_bytes: int = DEFAULT_MAX_BODY,
               max_batch_size: int | str = DEFAULT_MAX_BATCH_SIZE,
               max_batch_delay_ms: float = DEFAULT_MAX_BATCH_DELAY_MS, limits: Limits = Limits(),
               capture: CaptureWriter | None = None):
    """The ASGI app for ``model``: a model folder, or an already loaded Predictor.

    ``max_batch_size`` "auto" times the model and picks the fastest size (see
    choose_batch_size); 1 turns micro-batching off: each request then runs its
    own forward pass in the thread pool, concurrently with the others. The
    size used, and the timings behind "auto", are in ``app.state``, and so are
    counters (``app.state.stats``): forward passes, images computed, requests
    refused as busy and requests whose client left before their answer.
    Of ``limits``, the app applies the queue bound, the body timeout and the
    pixel limits; the rest are uvicorn's (see uvicorn_settings). With ``capture``,
    each answered request is handed to it (bincount.serving.capture); it is closed,
    its last file put into place, when the app stops.
    """
    import anyio
    import torch
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import ClientDisconnect, Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    from bincount.serving import handler as inference

    predictor = model if isinstance(model, inference.Predictor) else inference.model_fn(str(model))
    timings = {}
    if max_batch_size == "auto":
        timings = time_batch_sizes(predictor)
        max_batch_size = choose_batch_size(timings)
    stats = collections.Counter()  # batches_computed, images_computed, refused_busy, client_left
    stats_lock = threading.Lock()  # forward passes count themselves from worker threads

    def compute(images, batch_size: int) -> list[dict]:
        with stats_lock:
            stats["batches_computed"] += 1
            stats["images_computed"] += len(images)
        return predictor.predict_tensors(images, batch_size=batch_size)

    batcher = None
    if max_batch_size > 1:
        def forward(parts: list) -> list[dict]:
            return compute(torch.cat(parts), max_batch_size)

        batcher = MicroBatcher(forward, max_batch_size=max_batch_size, max_delay_s=max_batch_delay_ms / 1000)

    async def predict(images) -> list[dict]:
        if batcher:
            return await batcher.submit(images)
        return await run_in_threadpool(compute, images, 32)

    def error(message: str, status: int, headers: dict | None = None) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    async def ping(request: Request) -> Response:
        if batcher and not batcher.running:
            return error("the batch worker is not running", 503)
        return JSONResponse({"status": "ok", "run_id": predictor.meta.run_id})

    inside = 0  # requests in /invocations now: being read, decoded, queued or computed
    # Decoding is CPU work: more threads at it than cores only adds waiting, memory (each decode
    # holds up to max_request_pixels of pixels) and malloc arenas that keep what they once held.
    decoders = anyio.CapacityLimiter(DECODE_THREADS)

    async def invocations(request: Request) -> Response:
        nonlocal inside
        if inside >= limits.max_queue:  # counted from arrival: a queue of bodies costs memory too
            stats["refused_busy"] += 1
            return error(f"the server is busy ({limits.max_queue} requests in progress); retry in "
                         f"{RETRY_AFTER_S} s", 503, {"Retry-After": str(RETRY_AFTER_S)})
        inside += 1
        try:
            return await answer(request)
        finally:
            inside -= 1

    async def answer(request: Request) -> Response:
        try:
            with batcher.arriving() if batcher else contextlib.nullcontext():
                accept = inference.check_accept(request.headers.get("accept"))  # before any model work
                body = await _read_body(request, max_body_bytes, limits.body_timeout_s)
                images = await anyio.to_thread.run_sync(_decode_request, predictor, body,
                                                        request.headers.get("content-type", ""), limits,
                                                        limiter=decoders)
            prediction = await _unless_client_leaves(request, predict(images))
        except inference.RequestError as e:
            # After a 408 the rest of a slow body may still trickle in: close rather than wait for it.
            return error(str(e), e.status, {"Connection": "close"} if e.status == 408 else None)
        except (ClientDisconnect, ClientGone):  # not an error: the client gave up (a timeout, Ctrl-C)
            stats["client_left"] += 1
            log.info("a client disconnected before its answer; its request was dropped")
            return Response(status_code=499)  # never sent (nobody listens); nginx's code for it
        except asyncio.CancelledError:
            # Only uvicorn cancels a request, once the shutdown timeout is up. Say so, rather than
            # let uvicorn log a traceback and answer a bare 500: the request was cut off, not broken.
            # (Nothing awaits this task, so ending it normally hides the cancel from no one.)
            log.warning("a request still in progress at the end of the shutdown timeout was cut off")
            return error("the server is shutting down; retry", 503,
                         {"Retry-After": str(RETRY_AFTER_S), "Connection": "close"})
        except Exception:  # noqa: BLE001 - our fault (the model, a bug): say so, as JSON, keep serving
            # The detail stays in the log, under an id the client can quote: exception text
            # can hold paths, shapes and other internals that are no business of a caller.
            incident = uuid.uuid4().hex[:12]
            log.exception("internal error %s answering /invocations", incident)
            return error(f"internal error (id {incident}); the server's log has the details", 500)
        response = Response(inference.output_fn(prediction, accept), media_type=accept)
        if capture is not None:  # only queued here: it never slows or fails the answer (CaptureWriter.record)
            capture.record(request_body=body, request_type=request.headers.get("content-type", ""),
                           response_body=response.body, response_type=response.headers["content-type"],
                           headers=request.headers)
        return response

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if batcher:
            batcher.start()
        try:
            yield
        finally:
            if batcher:
                await batcher.stop()
            if capture is not None:
                await anyio.to_thread.run_sync(capture.close)

    app = Starlette(routes=[Route("/ping", ping, methods=["GET"]),
                            Route("/invocations", invocations, methods=["POST"])], lifespan=lifespan)
    app.state.max_batch_size, app.state.batch_timings = max_batch_size, timings
    app.state.stats, app.state.limits, app.state.capture = stats, limits, capture
    return app


def _head_deadline_protocol():
    """uvicorn's HTTP/1.1 (h11) protocol, with a deadline for every request head.

    uvicorn's ``timeout_keep_alive`` closes a connection left idle after an answer,
    but a new connection gets no timer at all, and any byte cancels it (uvicorn
    issue #157 asks for this timeout; uvicorn has none): a client that opens
    connections and sends nothing, or trickles a request head a byte at a time,
    held them open for good. Here a connection must deliver a complete request
    head within ``timeout_keep_alive`` of opening or of its previous answer, or it
    is closed. The body has its own deadline, in the app (408).

    h11 rather than httptools: it is what uvicorn installs with, and the one whose
    hooks this relies on (``cycle``, ``on_response_complete``).
    """
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeadDeadlineProtocol(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm_head_deadline()

        def on_response_complete(self) -> None:
            # Armed before uvicorn starts on a pipelined request: the deadline is for a new head.
            self._arm_head_deadline()
            super().on_response_complete()

        def connection_lost(self, exc) -> None:
            if self._head_timer:
                self._head_timer.cancel()
            super().connection_lost(exc)

        def _arm_head_deadline(self) -> None:
            if self._head_timer:
                self._head_timer.cancel()
            self._head_timer = self.loop.call_later(self.timeout_keep_alive, self._head_overdue, self.cycle)

        def _head_overdue(self, cycle_then) -> None:
            # A new request's head makes a new cycle: the same one still means no head came.
            if self.cycle is cycle_then and not self.transport.is_closing():
                self.transport.close()

    return HeadDeadlineProtocol


def uvicorn_settings(limits: Limits) -> dict:
    """uvicorn.run's (and uvicorn.Config's) keyword arguments for the limits that uvicorn applies."""
    return {"http": _head_deadline_protocol(), "limit_concurrency": limits.max_connections,
            "timeout_keep_alive": limits.header_timeout_s, "timeout_graceful_shutdown": limits.shutdown_timeout_s}


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


def serve(model, *, host: str = "127.0.0.1", port: int = DEFAULT_PORT,
          max_body_bytes: int = DEFAULT_MAX_BODY, max_batch_size: int | str = DEFAULT_MAX_BATCH_SIZE,
          max_batch_delay_ms: float = DEFAULT_MAX_BATCH_DELAY_MS, limits: Limits = Limits(),
          capture: CaptureWriter | None = None) -> None:
    import uvicorn

    _prefer_passive_openmp()
    # Our warnings and errors (an internal error's id and traceback) with a time and a source.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from bincount.serving import handler as inference

    # Loaded here, not in create_app, so that the folder is no longer needed once it is in memory.
    predictor = model if isinstance(model, inference.Predictor) else inference.model_fn(str(model))
    app = create_app(predictor, max_body_bytes=max_body_bytes, max_batch_size=max_batch_size,
                     max_batch_delay_ms=max_batch_delay_ms, limits=limits, capture=capture)
    meta = predictor.meta
    print(f"serving run {meta.run_id} ({meta.arch}) on http://{host}:{port} "
          f"({describe_batching(app, max_batch_delay_ms)})"
          + (f"; {capture.describe()}" if capture else ""), flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", **uvicorn_settings(limits))


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
    defaults = Limits()
    limits = parser.add_argument_group("limits under load (see the README's serving section)")
    for flag, env, kind, help_text in [
        ("--max-queue", MAX_QUEUE_ENV, int,
         "most requests inside the server at once (being read, decoded, waiting for or in a forward pass); "
         f"more get 503 with Retry-After: {RETRY_AFTER_S}"),
        ("--max-connections", MAX_CONNECTIONS_ENV, int,
         "most open connections, or requests in progress, before uvicorn answers 503 (its limit_concurrency); "
         "keep it above --max-queue"),
        ("--header-timeout-s", HEADER_TIMEOUT_ENV, float,
         "seconds a connection may take to send a complete request head, from when it opens or its previous "
         "answer ends (so also how long an idle keep-alive connection stays open); then it is closed"),
        ("--body-timeout-s", BODY_TIMEOUT_ENV, float, "seconds a request's body may take to arrive; then 408"),
        ("--shutdown-timeout-s", SHUTDOWN_TIMEOUT_ENV, float,
         "on SIGTERM, seconds the requests in progress get to finish before they are cancelled and the "
         "server exits; no new connection is accepted meanwhile"),
        ("--max-image-pixels", MAX_IMAGE_PIXELS_ENV, int,
         "most pixels in one image (a bin photo has about 200,000); more get 413"),
        ("--max-request-pixels", MAX_REQUEST_PIXELS_ENV, int,
         "most pixels in all the images of a request together; more get 413"),
    ]:
        dest = flag[2:].replace("-", "_")
        limits.add_argument(flag, type=kind, default=_env_default(parser, env, getattr(defaults, dest), kind),
                            help=f"{help_text} (default: %(default)s; ${env} sets it)")
    add_capture_arguments(parser, _env_default)


def limits_from_arguments(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Limits:
    """The Limits that add_server_arguments' options ask for, or a one-line parser error."""
    values = {name: getattr(args, name) for name in Limits.__dataclass_fields__}
    if any(value <= 0 for value in values.values()):
        parser.error("--max-queue, --max-connections, the --*-timeout-s and the --max-*-pixels must be > 0")
    return Limits(**values)


def serve_with_arguments(model, args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Serve ``model`` (a model folder or a loaded Predictor) as the parsed arguments say."""
    if args.max_batch_delay_ms < 0 or args.max_body_bytes < 1:
        parser.error("need --max-batch-delay-ms >= 0 and --max-body-bytes >= 1")
    serve(model, host=args.host, port=args.port, max_body_bytes=args.max_body_bytes,
          max_batch_size=args.max_batch_size, max_batch_delay_ms=args.max_batch_delay_ms,
          limits=limits_from_arguments(args, parser), capture=capture_from_arguments(args, parser))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bincount.serving.server",
                                     description="Serve an extracted model.tar.gz folder.")
    parser.add_argument("--model-dir", required=True, help="folder with model.pt and model.json")
    add_server_arguments(parser)
    args = parser.parse_args(argv)
    from bincount.serving.lifetime import exit_with_parent_if_asked
    exit_with_parent_if_asked()  # started by start_local_endpoint: never outlive it (before the slow model load)
    serve_with_arguments(args.model_dir, args, parser)


if __name__ == "__main__":
    sys.exit(main())
