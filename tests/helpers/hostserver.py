"""A test HTTP server on 127.0.0.1 that counts requests in flight, per ``Host`` name and in total.

A request counts from its arrival until just before its answer is sent (a window inside the
client's own, so a count above the client's cap is a real breach, never a measuring artefact).

Many host names reach it through the fetcher's resolver hook (``capfilt.io.hosts.DNS.use_resolver``
with :func:`loopback_resolver`): ``http://h7.test:PORT/x.jpg`` resolves to 127.0.0.1 and arrives
with ``Host: h7.test:PORT``, which is what the per-host cap is about.

Usage::

    with CountingServer(body=jpeg, delay=0.05) as srv, hosts.DNS.use_resolver(loopback_resolver):
        ...fetch srv.url("h1.test", "a.jpg") ...
        srv.peak["h1.test"], srv.peak_total, srv.starts["h1.test"]
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def loopback_resolver(host: str, port: int, *args, **kwargs) -> list:
    """``getaddrinfo`` giving 127.0.0.1 for ``*.test`` names (and the real answer otherwise)."""
    if host.endswith(".test"):
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]
    return socket.getaddrinfo(host, port, *args, **kwargs)


class _Server(ThreadingHTTPServer):
    request_queue_size = 512  # the default listen backlog of 5 drops connections under 64 threads
    daemon_threads = True


class CountingServer:
    """Serves ``body`` (``image/jpeg``) for every path after ``delay`` seconds, counting requests in flight.

    Attributes:
        peak: most requests in flight at once, per host name (``Host`` without the port).
        peak_total: most requests in flight at once over all hosts.
        starts: per host name, the ``time.monotonic()`` of each request's arrival, in order.
        paths: every request's ``(host, path)``, in arrival order.
        answer: optional ``answer(host, path, n) -> (code, headers) | None`` (``n``: this host+path's
            request count, from 1); ``None`` serves ``body``.
    """

    def __init__(self, body: bytes, delay: float = 0.0,
                 answer: Callable[[str, str, int], tuple[int, dict] | None] | None = None):
        self.body = body
        self.delay = delay
        self.answer = answer
        self.lock = threading.Lock()
        self.inflight: dict[str, int] = {}
        self.peak: dict[str, int] = {}
        self.total = 0
        self.peak_total = 0
        self.starts: dict[str, list[float]] = {}
        self.paths: list[tuple[str, str]] = []
        self.counts: dict[tuple[str, str], int] = {}
        srv = self

        class _Req(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                """Keep test output clean (no access log)."""

            def do_GET(self):  # noqa: N802 - http.server API
                srv._handle(self)

        self.httpd = _Server(("127.0.0.1", 0), _Req)
        self.port = self.httpd.server_address[1]

    def url(self, host: str, path: str) -> str:
        """``http://HOST:PORT/PATH``."""
        return f"http://{host}:{self.port}/{path.lstrip('/')}"

    def _handle(self, req: BaseHTTPRequestHandler) -> None:
        host = (req.headers.get("Host") or "").rsplit(":", 1)[0]
        with self.lock:
            self.inflight[host] = self.inflight.get(host, 0) + 1
            self.peak[host] = max(self.peak.get(host, 0), self.inflight[host])
            self.total += 1
            self.peak_total = max(self.peak_total, self.total)
            self.starts.setdefault(host, []).append(time.monotonic())
            self.paths.append((host, req.path))
            n = self.counts[(host, req.path)] = self.counts.get((host, req.path), 0) + 1
        try:
            if self.delay:
                time.sleep(self.delay)
            special = self.answer(host, req.path, n) if self.answer else None
        finally:
            # counted until just before the answer goes out: that window lies inside the client's
            # (which holds its slot until it has read the body), so the count never over-states it
            with self.lock:
                self.inflight[host] -= 1
                self.total -= 1
        try:
            if special is not None:
                code, headers = special
                req.send_response(code)
                for k, v in headers.items():
                    req.send_header(k, v)
                req.send_header("Content-Length", "0")
                req.end_headers()
                return
            if req.path == "/robots.txt":
                req.send_response(404)
                req.send_header("Content-Length", "0")
                req.end_headers()
                return
            req.send_response(200)
            req.send_header("Content-Type", "image/jpeg")
            req.send_header("Content-Length", str(len(self.body)))
            req.end_headers()
            req.wfile.write(self.body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (a timeout test): nothing to answer

    def __enter__(self) -> "CountingServer":
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
