"""A fault-injecting HTTP proxy in front of a real S3 server (moto), for tests.

boto3 talks to it like to any S3 endpoint (``endpoint_url``); it forwards every request to the
server behind it, except that for chosen keys it answers as a failing S3 would:

    forbidden   403 AccessDenied
    slowdown    503 SlowDown (botocore retries it as throttling)
    stall       the real headers and half the body, then nothing for ``stall_s``, then a close
    cut         the real headers (the full Content-Length) and half the body, then a close
    down        the endpoint goes down: the listening socket closes, so every later connection
                is refused, and open connections are dropped at their next request

A fault applies to every request for its key, or to the first ``times`` of them (a transient
fault). A key ending in ``/`` names a folder: every key under it. Only 127.0.0.1, threads only.
"""

from __future__ import annotations

import http.client
import threading
import urllib.parse
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

KINDS = {"forbidden", "slowdown", "stall", "cut", "down"}
HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
              "transfer-encoding", "upgrade", "content-length", "date", "server"}
ERRORS = {"forbidden": (403, "AccessDenied", "Access Denied"),
          "slowdown": (503, "SlowDown", "Please reduce your request rate.")}


@dataclass
class Fault:
    kind: str
    times: int | None = None  # None: every request


class FaultProxy:
    """Start with :meth:`start`, point boto3 at :attr:`url`, set faults with :meth:`fail`."""

    def __init__(self, upstream: str, *, stall_s: float = 10.0):
        parsed = urllib.parse.urlsplit(upstream)
        self.upstream = (parsed.hostname, parsed.port)
        self.stall_s = stall_s
        self.faults: dict[str, Fault] = {}
        self.hits: Counter = Counter()  # object key (without the bucket) -> requests seen
        self.down = False
        self.closing = threading.Event()  # wakes stalled answers when the proxy closes
        self._lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.server.daemon_threads = True
        self.server.proxy = self
        self.server.handle_error = lambda request, address: None  # a client that gave up is not news
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="s3-fault-proxy", daemon=True)

    def start(self) -> FaultProxy:
        self._thread.start()
        return self

    def fail(self, key: str, kind: str, *, times: int | None = None) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown fault {kind!r}; one of {sorted(KINDS)}")
        with self._lock:
            self.faults[key] = Fault(kind, times)

    def take(self, key: str) -> str | None:
        """The fault for one request for ``key`` (the object key, bucket left out), counting it."""
        with self._lock:
            self.hits[key] += 1
            for name, fault in self.faults.items():
                # a key, or a folder, under any prefix: "bin-images/7.jpg" is "abid/bin-images/7.jpg" too
                if ("/" + key).endswith("/" + name) or (name.endswith("/") and ("/" + name) in ("/" + key)):
                    if fault.times is None:
                        return fault.kind
                    if fault.times > 0:
                        fault.times -= 1
                        return fault.kind
        return None

    def go_down(self) -> None:
        self.down = True
        # shutdown() waits for serve_forever to return, which runs in another thread: safe from here
        threading.Thread(target=self._stop_listening, daemon=True).start()

    def _stop_listening(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def close(self) -> None:
        self.closing.set()
        if not self.down:
            self.down = True
            self._stop_listening()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as S3 does: botocore reuses connections

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        proxy: FaultProxy = self.server.proxy
        if proxy.down:  # an open connection of an endpoint that went down: drop it unanswered
            self.close_connection = True
            return
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
        key = path.lstrip("/").partition("/")[2]  # path style: /bucket/key
        fault = proxy.take(key) if self.command == "GET" and key else None
        if fault == "down":
            proxy.go_down()
            self.close_connection = True
            return
        if fault in ERRORS:
            self._send_error(*ERRORS[fault])
            return
        status, headers, data = self._forward(body)
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if fault in {"stall", "cut"}:
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            if fault == "stall":
                proxy.closing.wait(proxy.stall_s)
            self.close_connection = True
            return
        if self.command != "HEAD":
            self.wfile.write(data)

    do_PUT = do_POST = do_DELETE = do_HEAD = do_GET

    def _forward(self, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
        connection = http.client.HTTPConnection(*self.server.proxy.upstream, timeout=30)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
            connection.request(self.command, self.path, body=body or None, headers=headers)
            response = connection.getresponse()
            data = response.read()
            return response.status, [(k, v) for k, v in response.getheaders() if k.lower() not in HOP_BY_HOP], data
        finally:
            connection.close()

    def _send_error(self, status: int, code: str, message: str) -> None:
        data = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
                f"<RequestId>fault-proxy</RequestId></Error>").encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
