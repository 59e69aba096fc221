"""The download stage: URL in, resized image bytes plus a per-row status out (img2dataset semantics).

Each row's URL is fetched with :func:`capfilt.io.fetch.fetch` (scheme, address, redirect, size and
time limits; ``X-Robots-Tag`` opt-out with img2dataset's rule) and the body is turned into the
stored image by :class:`capfilt.io.imaging.ImageProcessor` (Pillow safety front end +
img2dataset's ``Resizer``). Rows are fetched on ``thread_count`` threads inside one call and their
images processed by the calling thread as they arrive, as img2dataset's downloader does per shard,
with at most ``per_host_concurrency`` rows of one host name at a time
(:func:`capfilt.io.hosts.map_per_host`; the fetcher enforces the same cap per request across every
thread of the process). Every failure is row data: ``status`` +
``error_message``; the call itself only raises on programming errors.
"""

from __future__ import annotations

import hashlib
import queue
import threading
import time
from typing import Any, ClassVar

import pyarrow as pa
import pyarrow.compute as pc

from capfilt import schema
from capfilt.config import DownloadConfig
from capfilt.errors import row_message, shorten
from capfilt.io.failures import class_counts, classify, domain_counts
from capfilt.io.fetch import FetchResult, fetch
from capfilt.io.hosts import host_key, map_per_host
from capfilt.io.imaging import ImageProcessor, ImageResult
from capfilt.stages.base import Stage, column_or_nulls, set_column, set_field


class DownloadStage(Stage):
    """Download and resize the image of every row.

    Args:
        cfg: the recipe's ``download`` section (:class:`capfilt.config.DownloadConfig`).

    ``__call__(batch)`` takes a ``pyarrow.Table`` with ``url`` (string, may be null or garbage)
    and returns the same rows in the same order with :data:`capfilt.schema.DOWNLOAD_FIELDS`
    added (``status``, ``error_message``, ``error_class`` (:data:`capfilt.io.failures.CLASSES`,
    null on success), ``image`` (binary, ``encode_format``), ``width``,
    ``height``, ``original_width``, ``original_height`` (int32 pixels), ``sha256`` (hex digest of
    the stored ``image`` bytes)) plus the internal ``_seconds_download`` (float64: the batch's
    wall seconds divided by its row count). A row whose ``status`` column already holds a
    non-success status is left as it is (not fetched).

    Raises:
        KeyError: if the batch has no ``url`` column.
    """

    name: ClassVar[str] = "download"
    section: ClassVar[str] = "download"
    parallel_blocks: ClassVar[bool] = True  # decode + resize is CPU work; the instance is cfg only
    fields: ClassVar[tuple[pa.Field, ...]] = tuple(schema.DOWNLOAD_FIELDS)

    def __init__(self, cfg: DownloadConfig):
        self.cfg = cfg
        self._processor = ImageProcessor(cfg)

    #: Domains per shard kept in ``failed_domains`` (the most failures first).
    STATS_DOMAINS: ClassVar[int] = 20

    @classmethod
    def stats(cls, table: pa.Table) -> dict[str, Any]:
        """Per-shard counters: ``image_bytes`` (bytes of the stored images), ``error_class``
        (``{class: rows}`` of failed rows) and ``failed_domains`` (``{domain: failed rows}`` of the
        shard's :attr:`STATS_DOMAINS` most failing domains, so run totals are exact for a domain
        that is among them in every shard, a lower bound otherwise)."""
        if "status" not in table.column_names:
            return {"image_bytes": 0, "error_class": {}, "failed_domains": {}}
        image = (int(pc.sum(pc.binary_length(table.column("image"))).as_py() or 0)
                 if "image" in table.column_names else 0)
        return {"image_bytes": image, "error_class": class_counts(table),
                "failed_domains": domain_counts(table, cls.STATS_DOMAINS)}

    @classmethod
    def throughput(cls, totals: dict[str, Any], seconds: float) -> dict[str, float]:
        """``rows_per_s``: rows per worker-second of downloading."""
        return {"rows_per_s": totals["rows"] / seconds, "seconds": seconds}

    def setup(self) -> None:
        """Import img2dataset and build its Resizer now (~3 s once per process) instead of in the first row."""
        _ = self._processor.resizer

    def process_url(self, url: object) -> ImageResult:
        """Fetch and process one URL (thread-safe). Never raises for anything a URL/server can do."""
        got = fetch(url, self.cfg)
        if not got.ok:
            return ImageResult(got.status, got.error_message, error_class=got.error_class)
        return self._processor(got.data, got.content_type)

    def __call__(self, batch: pa.Table) -> pa.Table:
        self.setup()  # one-off imports stay out of the per-row timing
        start = time.perf_counter()
        n = batch.num_rows
        urls = batch.column("url").to_pylist()
        prior_status = column_or_nulls(batch, "status")
        prior_message = column_or_nulls(batch, "error_message")
        prior_class = column_or_nulls(batch, "error_class")
        todo = [i for i in range(n) if prior_status[i] in (None, schema.SUCCESS)]
        results: list[ImageResult | None] = [None] * n
        if todo:
            for i, res in zip(todo, self._fetch_and_process([urls[i] for i in todo])):
                results[i] = res
        status, message, klass, image, width, height, ow, oh, digest = ([] for _ in range(9))
        for i in range(n):
            r = results[i]
            if r is None:
                r = ImageResult(prior_status[i], prior_message[i], error_class=prior_class[i])
            status.append(r.status)
            message.append(row_message(r.error_message))
            klass.append(r.error_class or classify(r.status, r.error_message))
            image.append(r.image)
            width.append(r.width)
            height.append(r.height)
            ow.append(r.original_width)
            oh.append(r.original_height)
            digest.append(hashlib.sha256(r.image).hexdigest() if r.image is not None else None)
        del results
        image_column = binary_array(image)
        del image
        out = batch
        for field, values in zip(self.fields, [status, message, klass, image_column, width, height, ow, oh, digest]):
            out = set_field(out, field, values)
        seconds = (time.perf_counter() - start) / n if n else 0.0
        out = set_column(out, "_seconds_download", pa.array([seconds] * n, type=pa.float64()))
        release_memory()
        return out

    def _fetch_and_process(self, urls: list) -> list[ImageResult]:
        """``[process_url(u) for u in urls]``: fetches on ``thread_count`` threads, images in this thread.

        As img2dataset's downloader does, the pool threads only fetch (network I/O, GIL mostly
        released) and the calling thread decodes and resizes each body as it arrives, so CPU work is
        not spread over 64 threads convoying on the GIL and the Resizer's lock (measured in-process
        on this 2-core VM: ~1 ms less CPU per row). Threads pick rows of hosts below their
        per-host cap (``io/hosts.map_per_host``). At most ``2 * thread_count`` fetched bodies wait
        for processing at once (the fetch threads block), so memory does not grow with the shard.
        """
        n = len(urls)
        results: list[ImageResult | None] = [None] * n
        arrived: queue.SimpleQueue = queue.SimpleQueue()
        window = threading.Semaphore(2 * self.cfg.thread_count)
        DONE = object()

        def fetch_one(i: int) -> None:
            """Fetch row ``i`` (pool thread) and queue ``(i, FetchResult | ImageResult)`` for the caller;
            blocks while ``2 * thread_count`` fetched bodies already wait. Never raises for a row."""
            window.acquire()
            arrived.put((i, self._safe_fetch(urls[i])))

        def feed() -> None:
            """Run every row's fetch on the per-host scheduler, then queue ``DONE`` (or the exception
            the scheduler raised, which the calling thread re-raises)."""
            try:
                map_per_host(fetch_one, list(range(n)), [host_key(u) for u in urls], self.cfg.thread_count,
                             self.cfg.per_host_concurrency, "capfilt-download")
                arrived.put(DONE)
            except BaseException as e:  # noqa: BLE001 - handed to the calling thread, which re-raises it
                arrived.put(e)

        feeder = threading.Thread(target=feed, name="capfilt-download-feed", daemon=True)
        feeder.start()
        try:
            while True:
                item = arrived.get()
                if item is DONE:
                    break
                if isinstance(item, BaseException):
                    raise item
                i, got = item
                results[i] = self._safe_process(got)
                del item, got
                window.release()
        finally:
            for _ in range(n):  # a failure above must not leave fetch threads blocked on the window
                window.release()
            feeder.join()
        return [r if r is not None else ImageResult(schema.FAILED_TO_DOWNLOAD, "internal error: row not processed")
                for r in results]

    def _safe_fetch(self, url: object) -> FetchResult | ImageResult:
        try:
            return fetch(url, self.cfg)
        except Exception as e:  # noqa: BLE001 - a bug on one row must not lose the batch
            return _internal_error(e)

    def _safe_process(self, got: FetchResult | ImageResult) -> ImageResult:
        if isinstance(got, ImageResult):
            return got
        if not got.ok:
            return ImageResult(got.status, got.error_message, error_class=got.error_class)
        try:
            return self._processor(got.data, got.content_type)
        except Exception as e:  # noqa: BLE001 - a bug on one row must not lose the batch
            return _internal_error(e)


def _internal_error(e: Exception) -> ImageResult:
    message = shorten(f"internal error: {type(e).__name__}: {e}", 200, "")
    return ImageResult(schema.FAILED_TO_DOWNLOAD, message)


def binary_array(values: list[bytes | None]) -> pa.Array:
    """A ``pa.binary()`` array of ``values`` whose data buffer is one Python ``bytes`` object.

    ``pa.array(values, pa.binary())`` grows its data buffer by doubling inside Arrow's memory pool
    (mimalloc/jemalloc), which keeps the freed pages: a download worker that built a 40 MB image
    column held ~115 MB afterwards, in every worker process that ever ran a shard. Here the data is
    one ``b"".join`` (a single exact-size allocation that the C library returns to the system when
    the array is freed) and only the offsets and validity bitmap (a few KB) come from Arrow's pool.

    Args:
        values: one ``bytes`` per row, or ``None`` for a null.

    Returns:
        A ``pa.binary()`` array equal to ``pa.array(values, pa.binary())``. Columns over 2 GiB
        (int32 offsets) fall back to ``pa.array``.
    """
    import numpy as np

    sizes = np.fromiter((0 if v is None else len(v) for v in values), dtype=np.int64, count=len(values))
    total = int(sizes.sum())
    if total >= 2**31 - 1:
        return pa.array(values, type=pa.binary())
    offsets = np.zeros(len(values) + 1, dtype=np.int32)
    np.cumsum(sizes, out=offsets[1:])
    valid = np.fromiter((v is not None for v in values), dtype=bool, count=len(values))
    nulls = len(values) - int(valid.sum())
    validity = pa.py_buffer(np.packbits(valid, bitorder="little").tobytes()) if nulls else None
    data = b"".join(v for v in values if v is not None)
    return pa.Array.from_buffers(pa.binary(), len(values), [validity, pa.py_buffer(offsets), pa.py_buffer(data)],
                                 null_count=nulls)


def release_memory() -> None:
    """Give freed memory back to the system: Arrow's pool (``release_unused``) and glibc's heaps (``malloc_trim``).

    A download worker's 64 threads each get a glibc malloc arena and Arrow's pool keeps freed pages
    for reuse, so without this a worker that finished its shards stays at its high-water mark while
    Ray keeps it alive. Best effort: a C library without ``malloc_trim`` (musl, macOS) is skipped.
    """
    pa.default_memory_pool().release_unused()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


_TRIM: list = []


def _malloc_trim():
    """glibc's ``malloc_trim`` (cached), or ``None`` where the C library has none."""
    if not _TRIM:
        import ctypes
        import ctypes.util

        fn = None
        try:
            fn = getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), "malloc_trim", None)
        except OSError:  # no loadable C library by that name: nothing to trim
            fn = None
        _TRIM.append(fn)
    return _TRIM[0]
