"""The download stage: URL in, resized image bytes plus a per-row status out (img2dataset semantics).

Each row's URL is fetched with :func:`capfilt.io.fetch.fetch` (scheme, address, redirect, size and
time limits; ``X-Robots-Tag`` opt-out with img2dataset's rule) and the body is turned into the
stored image by :class:`capfilt.io.imaging.ImageProcessor` (Pillow safety front end +
img2dataset's ``Resizer``). Rows run on ``thread_count`` threads inside one call, as img2dataset's
downloader runs a thread pool per shard, with at most ``per_host_concurrency`` rows of one host
name at a time (:func:`capfilt.io.hosts.map_per_host`; the fetcher enforces the same cap per
request across every thread of the process). Every failure is row data: ``status`` +
``error_message``; the call itself only raises on programming errors.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any, ClassVar

import pyarrow as pa
import pyarrow.compute as pc

from capfilt import schema
from capfilt.config import DownloadConfig
from capfilt.errors import row_message, shorten
from capfilt.io.failures import class_counts, classify, domain_counts
from capfilt.io.fetch import fetch
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
            # threads pick rows of hosts below their per-host cap, so a shard of one big host does
            # not park every thread behind it (io/hosts.py); results come back in row order
            got = map_per_host(self._safe, [urls[i] for i in todo], [host_key(urls[i]) for i in todo],
                               self.cfg.thread_count, self.cfg.per_host_concurrency, "capfilt-download")
            for i, res in zip(todo, got):
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
        out = batch
        for field, values in zip(self.fields, [status, message, klass, image, width, height, ow, oh, digest]):
            out = set_field(out, field, values)
        seconds = (time.perf_counter() - start) / n if n else 0.0
        return set_column(out, "_seconds_download", pa.array([seconds] * n, type=pa.float64()))

    def _safe(self, url: object) -> ImageResult:
        try:
            return self.process_url(url)
        except Exception as e:  # noqa: BLE001 - a bug on one row must not lose the batch
            message = shorten(f"internal error: {type(e).__name__}: {e}", 200, "")
            return ImageResult(schema.FAILED_TO_DOWNLOAD, message)
