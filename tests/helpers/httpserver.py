"""A real HTTP server on 127.0.0.1 for tests: static files plus scripted misbehaviours.

Usage::

    with ImageServer(root=FIXTURES / "images") as srv:
        srv.url("photo.jpg")            # http://127.0.0.1:PORT/photo.jpg
        srv.url("status/404")           # answers 404
        srv.add_route("/odd", handler)  # handler(req: BaseHTTPRequestHandler) -> None

Built-in behaviours (path prefix):
- ``/status/<code>``: empty body with that status.
- ``/redirect/<n>/<path>``: ``n`` 302 hops, then ``/<path>``. ``/loop``: redirects to itself.
- ``/empty``: 200 with a 0-byte body. ``/html``: HTML served as ``image/jpeg``.
- ``/slow/<seconds>/<path>``: waits, then serves ``/<path>``.
- ``/trickle``: one byte per 0.5 s for ~60 s. ``/never``: sends headers then a body that never ends.
- ``/big/<bytes>``: that many bytes of JPEG-looking data.
- ``/robots/<directive>/<path>``: serves ``/<path>`` with ``X-Robots-Tag: <directive>``.
- ``/as/<content-type-with-_-for-/>/<path>``: serves ``/<path>`` under that Content-Type.
Anything else is looked up in ``root``; a ``fallback(req, path)`` may answer unknown paths.
"""

from __future__ import annotations

import mimetypes
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

Handler = Callable[[BaseHTTPRequestHandler], None]


class ImageServer:
    """Threaded HTTP server on 127.0.0.1 (random free port) serving files and misbehaviours."""

    def __init__(self, root: Path | None = None, fallback: Callable[[BaseHTTPRequestHandler, str], None] | None = None):
        self.root = Path(root) if root else None
        self.fallback = fallback
        self.routes: dict[str, Handler] = {}
        self.hits: dict[str, int] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        server = self

        class _Req(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output clean
                pass

            def do_GET(self):  # noqa: N802 - http.server API
                server._dispatch(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Req)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> "ImageServer":
        """Start serving in a daemon thread."""
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self._stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> "ImageServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- helpers -----------------------------------------------------------------------------
    @property
    def base(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        """Absolute URL of ``path`` on this server."""
        return f"{self.base}/{path.lstrip('/')}"

    def add_route(self, path: str, handler: Handler) -> None:
        """Answer exactly ``path`` (without query) with ``handler(request)``."""
        self.routes[path] = handler

    # -- dispatch ----------------------------------------------------------------------------
    def _dispatch(self, req: BaseHTTPRequestHandler) -> None:
        path = unquote(urlsplit(req.path).path)
        with self._lock:
            self.hits[path] = self.hits.get(path, 0) + 1
        try:
            self._answer(req, path)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            pass

    def _send(self, req, code: int, body: bytes = b"", ctype: str = "application/octet-stream", headers=None):
        req.send_response(code)
        req.send_header("Content-Type", ctype)
        req.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            req.send_header(k, v)
        req.end_headers()
        if body:
            req.wfile.write(body)

    def _serve_file(self, req, rel: str, ctype: str | None = None, headers=None) -> None:
        if self.root is None:
            return self._send(req, 404)
        f = (self.root / rel.lstrip("/")).resolve()
        if not f.is_file() or self.root.resolve() not in f.parents:
            return self._send(req, 404, b"not found", "text/plain")
        body = f.read_bytes()
        ctype = ctype or mimetypes.guess_type(f.name)[0] or "application/octet-stream"
        self._send(req, 200, body, ctype, headers)

    def _answer(self, req, path: str) -> None:
        if path in self.routes:
            return self.routes[path](req)
        parts = path.strip("/").split("/")
        head = parts[0]
        if head == "status" and len(parts) >= 2:
            return self._send(req, int(parts[1]), b"", "text/plain")
        if head == "redirect" and len(parts) >= 3:
            n = int(parts[1])
            target = "/" + "/".join(parts[2:]) if n <= 1 else f"/redirect/{n - 1}/" + "/".join(parts[2:])
            return self._send(req, 302, b"", "text/plain", {"Location": target})
        if head == "loop":
            return self._send(req, 302, b"", "text/plain", {"Location": "/loop"})
        if head == "empty":
            return self._send(req, 200, b"", "image/jpeg")
        if head == "html":
            return self._send(req, 200, b"<!doctype html><html><body>Not an image</body></html>", "image/jpeg")
        if head == "slow" and len(parts) >= 3:
            time.sleep(float(parts[1]))
            return self._serve_file(req, "/".join(parts[2:]))
        if head == "trickle":
            req.send_response(200)
            req.send_header("Content-Type", "image/jpeg")
            req.send_header("Content-Length", "1000")
            req.end_headers()
            for _ in range(120):
                if self._stop.is_set():
                    return
                req.wfile.write(b"\xff")
                req.wfile.flush()
                time.sleep(0.5)
            return
        if head == "never":
            req.send_response(200)
            req.send_header("Content-Type", "image/jpeg")
            req.end_headers()
            chunk = b"\xff\xd8" + b"\0" * 65534
            deadline = time.monotonic() + 120
            while not self._stop.is_set() and time.monotonic() < deadline:
                req.wfile.write(chunk)
            return
        if head == "big" and len(parts) >= 2:
            n = int(parts[1])
            return self._send(req, 200, b"\xff\xd8\xff\xe0" + b"\0" * max(0, n - 4), "image/jpeg")
        if head == "robots" and len(parts) >= 3:
            return self._serve_file(req, "/".join(parts[2:]), headers={"X-Robots-Tag": unquote(parts[1])})
        if head == "as" and len(parts) >= 3:
            return self._serve_file(req, "/".join(parts[2:]), ctype=parts[1].replace("_", "/"))
        if self.root is not None and (self.root / path.lstrip("/")).is_file():
            return self._serve_file(req, path)
        if self.fallback is not None:
            return self.fallback(req, path)
        return self._send(req, 404, b"not found", "text/plain")


def photo_server(photos: list[Path], delay: float = 0.0) -> ImageServer:
    """A server answering every path with one of ``photos`` (chosen by the path's md5), after ``delay`` s.

    Stands in for a web host: any URL path is an image, stable across requests.
    """
    import hashlib

    def fallback(req, path):
        if delay:
            time.sleep(delay)
        body = photos[int(hashlib.md5(path.encode()).hexdigest(), 16) % len(photos)].read_bytes()
        req.send_response(200)
        req.send_header("Content-Type", "image/jpeg")
        req.send_header("Content-Length", str(len(body)))
        req.end_headers()
        req.wfile.write(body)

    return ImageServer(fallback=fallback)
