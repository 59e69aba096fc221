"""DownloadStage: the batch contract (same rows, same order, typed columns, statuses) on a real server."""

from __future__ import annotations

import hashlib
import io
import pickle
import time
from pathlib import Path

import pyarrow as pa
import pytest
from PIL import Image

from capfilt import schema
from capfilt.config import DownloadConfig
from capfilt.stages.download import DownloadStage
from tests.helpers.httpserver import ImageServer

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


@pytest.fixture(scope="module")
def server():
    with ImageServer(root=FIXTURES) as srv:
        yield srv


def _batch(urls, **extra) -> pa.Table:
    cols = {"key": [f"k{i:03d}" for i in range(len(urls))], "url": pa.array(urls, pa.string())}
    cols.update(extra)
    return pa.table(cols)


def test_mixed_batch_keeps_rows_order_and_types(server):
    urls = [
        server.url("photos/524_316.jpg"),
        None,
        "UNLIKELY",
        server.url("status/404"),
        server.url("coco/images/000000000139.jpg"),
        "",
        server.url("tricky/pillow_transparent.png"),
        server.url("empty"),
        server.url("html"),
        server.url("tricky/pillow_decompression_bomb.gif"),
    ]
    batch = _batch(urls, caption=pa.array([f"c{i}" for i in range(len(urls))]))
    stage = DownloadStage(DownloadConfig(timeout=2.0, allow_private_network=True, thread_count=4))
    out = stage(batch)

    assert out.num_rows == batch.num_rows
    assert out.column("key").to_pylist() == batch.column("key").to_pylist()
    assert out.column("caption").to_pylist() == batch.column("caption").to_pylist()
    for f in schema.DOWNLOAD_FIELDS:
        assert out.schema.field(f.name).type == f.type, f.name
    assert out.schema.field("_seconds_download").type == pa.float64()

    rows = out.to_pylist()
    assert [r["status"] for r in rows] == [
        schema.SUCCESS, schema.INVALID_URL, schema.INVALID_URL, schema.FAILED_TO_DOWNLOAD, schema.SUCCESS,
        schema.INVALID_URL, schema.SUCCESS, schema.FAILED_TO_DOWNLOAD, schema.FAILED_TO_DOWNLOAD, schema.TOO_LARGE,
    ]
    assert rows[1]["error_message"] == "no URL"
    assert rows[2]["error_message"] == "not a URL: 'UNLIKELY'"
    assert rows[3]["error_message"] == "HTTP 404 Not Found"
    assert rows[5]["error_message"] == "empty URL"
    assert rows[7]["error_message"] == "empty body (0 bytes)"
    assert rows[8]["error_message"] == "not an image (HTML page, served as image/jpeg)"
    assert rows[9]["error_message"] == "image is 4,364,696,535 px, over the limit of 89,478,485"
    assert [r["error_class"] for r in rows] == [None, "bad_url", "bad_url", "http_4xx", None, "bad_url", None,
                                                "decode", "decode", "too_large"]
    for r in rows:
        if r["status"] == schema.SUCCESS:
            assert r["error_message"] is None
            assert r["sha256"] == hashlib.sha256(r["image"]).hexdigest()
            img = Image.open(io.BytesIO(r["image"]))
            assert img.format == "JPEG" and img.mode == "RGB"
            assert img.size == (r["width"], r["height"]) and min(img.size) == 384
        else:
            assert r["error_message"] and r["image"] is None and r["sha256"] is None and r["width"] is None
    assert (rows[0]["original_width"], rows[0]["original_height"]) == (524, 316)
    assert (rows[6]["original_width"], rows[6]["original_height"]) == (200, 150)


def test_default_config_refuses_private_addresses(server):
    urls = [server.url("photos/524_316.jpg"), "http://10.0.0.1/x.jpg", "http://169.254.169.254/",
            "http://[::1]/x.jpg", "file:///etc/passwd", "ftp://example.com/x.jpg", "javascript:alert(1)"]
    out = DownloadStage(DownloadConfig(timeout=1.0))(_batch(urls)).to_pylist()
    assert [(r["status"], r["error_message"], r["error_class"]) for r in out] == [
        (schema.BLOCKED_ADDRESS, "host 127.0.0.1 is a loopback address (pass --allow-private-network to allow it)", "blocked_address"),
        (schema.BLOCKED_ADDRESS, "host 10.0.0.1 is a private address (pass --allow-private-network to allow it)", "blocked_address"),
        (schema.BLOCKED_ADDRESS, "host 169.254.169.254 is a link-local address (pass --allow-private-network to allow it)", "blocked_address"),
        (schema.BLOCKED_ADDRESS, "host ::1 is a loopback address (pass --allow-private-network to allow it)", "blocked_address"),
        (schema.INVALID_URL, "file:// URLs are not allowed (allow_file_urls is off)", "bad_url"),
        (schema.INVALID_URL, "unsupported scheme 'ftp' (only http/https)", "bad_url"),
        (schema.INVALID_URL, "unsupported scheme 'javascript' (only http/https)", "bad_url"),
    ]


def test_file_urls_with_flag():
    path = FIXTURES / "photos" / "416_264.jpg"
    out = DownloadStage(DownloadConfig(allow_file_urls=True))(_batch([path.as_uri()])).to_pylist()[0]
    assert out["status"] == schema.SUCCESS and (out["original_width"], out["original_height"]) == (416, 264)


def test_rows_with_an_earlier_failure_are_left_alone(server):
    urls = [server.url("photos/524_316.jpg"), server.url("photos/416_264.jpg"), server.url("photos/456_123.jpg")]
    batch = _batch(urls, status=pa.array([None, "invalid_url", schema.SUCCESS]),
                   error_message=pa.array([None, "set upstream", None]))
    before = dict(server.hits)
    out = DownloadStage(DownloadConfig(allow_private_network=True))(batch)
    rows = out.to_pylist()
    assert [r["status"] for r in rows] == [schema.SUCCESS, "invalid_url", schema.SUCCESS]
    assert rows[1]["error_message"] == "set upstream" and rows[1]["image"] is None
    assert server.hits.get("/photos/416_264.jpg", 0) == before.get("/photos/416_264.jpg", 0)  # not fetched
    assert out.column_names.count("status") == 1 and out.column_names.index("status") == 2  # replaced in place


def test_thread_count_does_not_change_results(server):
    names = sorted(p.name for p in (FIXTURES / "coco" / "images").iterdir())[:12]
    batch = _batch([server.url(f"coco/images/{n}") for n in names])
    one = DownloadStage(DownloadConfig(allow_private_network=True, thread_count=1))(batch)
    many = DownloadStage(DownloadConfig(allow_private_network=True, thread_count=12))(batch)
    assert one.drop_columns(["_seconds_download"]).equals(many.drop_columns(["_seconds_download"]))
    assert set(one.column("status").to_pylist()) == {schema.SUCCESS}


def test_threads_overlap_slow_servers(server):
    """8 rows that each wait 0.5 s on the server finish in about 0.5 s with 8 threads."""
    batch = _batch([server.url(f"slow/0.5/photos/524_316.jpg?n={i}") for i in range(8)])
    stage = DownloadStage(DownloadConfig(allow_private_network=True, thread_count=8))
    stage.setup()
    t0 = time.monotonic()
    out = stage(batch)
    took = time.monotonic() - t0
    assert set(out.column("status").to_pylist()) == {schema.SUCCESS}
    assert took < 2.0, took
    per_row = out.column("_seconds_download").to_pylist()
    assert all(abs(s - per_row[0]) < 1e-12 for s in per_row) and per_row[0] * 8 == pytest.approx(took, rel=0.2)


def test_images_are_processed_in_the_calling_thread(server):
    """Fetch threads only fetch; decoding and resizing run in the thread that called the stage
    (img2dataset's layout: no CPU work convoying over 64 threads on the GIL and the Resizer lock)."""
    import threading

    names = sorted(p.name for p in (FIXTURES / "coco" / "images").iterdir())[:8]
    stage = DownloadStage(DownloadConfig(allow_private_network=True, thread_count=8))
    stage.setup()
    real = stage._processor
    threads = []

    def recording(data, content_type=None):
        threads.append(threading.get_ident())
        return real(data, content_type)

    stage._processor = recording
    stage.setup = lambda: None  # the Resizer is built already
    out = stage(_batch([server.url(f"coco/images/{n}") for n in names]))
    assert set(out.column("status").to_pylist()) == {schema.SUCCESS}
    assert threads == [threading.get_ident()] * 8


def test_image_column_is_not_built_in_arrows_pool(server):
    """The stored images live in one exact-size buffer outside Arrow's memory pool, whose freed pages
    the pool keeps (a finished download worker used to hold ~115 MB per 1,000-row shard)."""
    names = sorted(p.name for p in (FIXTURES / "coco" / "images").iterdir())[:12]
    stage = DownloadStage(DownloadConfig(allow_private_network=True, thread_count=4))
    stage.setup()
    before = pa.total_allocated_bytes()
    out = stage(_batch([server.url(f"coco/images/{n}") for n in names]))
    in_pool = pa.total_allocated_bytes() - before
    image_bytes = sum(len(b) for b in out.column("image").to_pylist())
    assert set(out.column("status").to_pylist()) == {schema.SUCCESS}
    assert image_bytes > 200_000 and in_pool < image_bytes / 4, (in_pool, image_bytes)

    from capfilt.stages.download import binary_array

    values = [b"ab", None, b"", b"xyz" * 1000]
    arr = binary_array(values)
    arr.validate(full=True)
    assert arr.equals(pa.array(values, pa.binary())) and arr.null_count == 1
    assert binary_array([]).equals(pa.array([], pa.binary()))


def test_empty_batch_and_pickling():
    stage = pickle.loads(pickle.dumps(DownloadStage(DownloadConfig())))
    assert stage.name == "download" and stage.shape == "task"
    out = stage(_batch([]))
    assert out.num_rows == 0
    assert [f.name for f in schema.DOWNLOAD_FIELDS] == out.column_names[2:-1]
    assert out.column_names[-1] == "_seconds_download"


def test_missing_url_column_raises():
    with pytest.raises(KeyError):
        DownloadStage(DownloadConfig())(pa.table({"key": ["a"]}))
