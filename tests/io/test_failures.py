"""Failure classes (capfilt.io.failures): one real failure of each class, from a real server or a real
file, classified through the download stage; per-shard counts; domains; old outputs without the column."""

from __future__ import annotations

import io
import socket
from pathlib import Path

import pyarrow as pa
import pytest
from PIL import Image

from capfilt import schema
from capfilt.config import DownloadConfig
from capfilt.io import failures
from capfilt.stages.download import DownloadStage
from tests.helpers.httpserver import ImageServer

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


@pytest.fixture(scope="module")
def server():
    def tiny(req, path):
        if path == "/tiny.png":
            buf = io.BytesIO()
            Image.new("RGB", (8, 8), "red").save(buf, "PNG")
            req.send_response(200)
            req.send_header("Content-Type", "image/png")
            req.send_header("Content-Length", str(len(buf.getvalue())))
            req.end_headers()
            req.wfile.write(buf.getvalue())
            return True
        if path == "/reset":
            req.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            req.connection.close()
            return True
        return False

    with ImageServer(root=FIXTURES, fallback=tiny) as srv:
        yield srv


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_every_download_failure_gets_its_class(server):
    port = server.url("x").split(":")[2].split("/")[0]
    cases = [
        (server.url("photos/524_316.jpg"), schema.SUCCESS, None),
        ("http://no-such-host.invalid/a.jpg", schema.FAILED_TO_DOWNLOAD, "dns"),
        (f"http://127.0.0.1:{_closed_port()}/a.jpg", schema.FAILED_TO_DOWNLOAD, "connect"),
        (server.url("reset"), schema.FAILED_TO_DOWNLOAD, "connect"),
        (server.url("slow/3/photos/524_316.jpg"), schema.FAILED_TO_DOWNLOAD, "timeout"),
        (server.url("status/404"), schema.FAILED_TO_DOWNLOAD, "http_4xx"),
        (server.url("status/408"), schema.FAILED_TO_DOWNLOAD, "timeout"),
        (server.url("status/429"), schema.FAILED_TO_DOWNLOAD, "http_429"),
        (server.url("status/503"), schema.FAILED_TO_DOWNLOAD, "http_5xx"),
        (f"https://127.0.0.1:{port}/photos/524_316.jpg", schema.FAILED_TO_DOWNLOAD, "tls"),
        (server.url("big/5000000"), schema.TOO_LARGE, "too_large"),
        (server.url("loop"), schema.FAILED_TO_DOWNLOAD, "redirect"),
        (server.url("redirect/9/photos/524_316.jpg"), schema.FAILED_TO_DOWNLOAD, "redirect"),
        ("ftp://example.com/a.jpg", schema.INVALID_URL, "bad_url"),
        (None, schema.INVALID_URL, "bad_url"),
        (server.url("html"), schema.FAILED_TO_DOWNLOAD, "decode"),
        (server.url("empty"), schema.FAILED_TO_DOWNLOAD, "decode"),
        (server.url("tiny.png"), schema.TOO_SMALL, "too_small"),
        (server.url("robots/noai/photos/524_316.jpg"), schema.OPTED_OUT, "opted_out"),
    ]
    cfg = DownloadConfig(timeout=1.0, retries=0, allow_private_network=True, max_bytes=1_000_000,
                         max_redirects=3, min_image_size=32, thread_count=4)
    batch = pa.table({"key": [f"k{i}" for i in range(len(cases))], "url": pa.array([c[0] for c in cases], pa.string())})
    rows = DownloadStage(cfg)(batch).to_pylist()
    got = [(r["url"], r["status"], r["error_class"]) for r in rows]
    assert got == [(u, s, c) for u, s, c in cases], [r["error_message"] for r in rows]
    blocked = DownloadStage(DownloadConfig(timeout=1.0))(pa.table({"key": ["b"], "url": [server.url("x.jpg")]}))
    row = blocked.to_pylist()[0]
    assert row["error_class"] == "blocked_address" and "--allow-private-network" in row["error_message"]


def test_transient_classes_and_non_download_statuses():
    assert failures.TRANSIENT_CLASSES == {"dns", "connect", "timeout", "http_5xx", "http_429"}
    assert [failures.is_transient(c) for c in ("dns", "http_4xx", "decode", None)] == [True, False, False, False]
    assert failures.classify(schema.FAILED_TO_CAPTION, "RuntimeError: x") == "model"
    assert failures.classify(schema.FAILED_TO_RESIZE, "cannot decode JPEG image: truncated") == "decode"
    assert failures.classify(schema.FAILED_TO_DOWNLOAD, "internal error: KeyError: 'x'") == "internal"
    for status in failures.FILTER_STATUSES | {schema.SUCCESS, None}:
        assert failures.classify(status, None) is None
    assert set(failures.CLASSES) >= {"dns", "connect", "timeout", "http_4xx", "http_5xx", "http_429", "tls",
                                     "too_large", "redirect", "blocked_address", "bad_url", "decode",
                                     "too_small", "opted_out", "internal"}


def test_stats_carry_counts_by_class_and_domain():
    t = pa.table({
        "key": ["a", "b", "c", "d", "e"],
        "url": ["http://www.A.com/1", "http://a.com/2", "http://b.org/x", "http://c.net/ok", None],
        "status": [schema.FAILED_TO_DOWNLOAD, schema.FAILED_TO_DOWNLOAD, schema.FAILED_TO_DOWNLOAD,
                   schema.SUCCESS, schema.INVALID_URL],
        # an output written before error_class existed: classified from the messages
        "error_message": ["cannot resolve host www.a.com (Name or service not known)", "HTTP 503 Service Unavailable",
                          "timed out after 1.0 s", None, "no URL"],
    })
    st = DownloadStage.stats(t)
    assert st["error_class"] == {"bad_url": 1, "dns": 1, "http_5xx": 1, "timeout": 1}
    assert st["failed_domains"] == {"a.com": 2, "(no host)": 1, "b.org": 1}
    assert DownloadStage.stats(pa.table({})) == {"image_bytes": 0, "error_class": {}, "failed_domains": {}}
    filled = failures.fill_classes(t)
    assert filled.column("error_class").to_pylist() == ["dns", "http_5xx", "timeout", None, "bad_url"]
