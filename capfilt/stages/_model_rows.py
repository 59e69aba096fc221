"""Row plumbing shared by the model stages (caption, score): image decoding, row-level failures."""

from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import pyarrow as pa

from capfilt.modeling.batching import FitLimit, is_oom
from capfilt.errors import ROW_MESSAGE_CHARS, one_line, shorten
from capfilt.schema import SUCCESS
from capfilt.stages.base import column_or_nulls, set_column

R = TypeVar("R")
log = logging.getLogger(__name__)

#: Longest ``error_message`` a model stage writes (characters): the one row-message limit.
MAX_ERROR_CHARS = ROW_MESSAGE_CHARS


def success_rows(batch: pa.Table) -> list[int]:
    """Indices of rows whose ``status`` is ``success`` (all rows if there is no ``status`` column)."""
    if "status" not in batch.column_names:
        return list(range(batch.num_rows))
    return [i for i, s in enumerate(batch.column("status").to_pylist()) if s == SUCCESS]


def decode_image(data: bytes | None) -> Any:
    """Decode JPEG/PNG/WebP bytes (already resized by the download stage) to an RGB ``PIL.Image``.

    Raises:
        ValueError: ``data`` is null or empty.
        ValueError: the bytes are not an image format Pillow knows.
        OSError: a truncated or corrupt image.
    """
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise ValueError("no image bytes")
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.convert("RGB")
    except UnidentifiedImageError:
        raise ValueError(f"image bytes are not a format Pillow can decode ({len(data)} bytes, "
                         f"starting {bytes(data[:8])!r})") from None


def short_error(err: BaseException) -> str:
    """``"TypeName: message"`` on one line, at most :data:`MAX_ERROR_CHARS` characters."""
    return shorten(f"{type(err).__name__}: {one_line(err)}", MAX_ERROR_CHARS, "...")


def row_seed(seed: int, key: str) -> int:
    """Stable 63-bit sampling seed of a row: blake2b of ``(seed, key)`` (not Python's salted ``hash``)."""
    digest = hashlib.blake2b(f"{seed}\x1f{key}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def run_rows(rows: Sequence[int], batch_size: int, fn: Callable[[Sequence[int]], list[R]],
             stage: str, limit: FitLimit | None = None) -> tuple[dict[int, R], dict[int, str]]:
    """Run ``fn`` on ``rows`` in micro-batches; a failing micro-batch is retried row by row.

    A micro-batch that runs out of GPU memory is not retried row by row: the batch size is halved
    (kept in ``limit`` for later calls: the stage learns the largest batch that fits) and its rows
    go through again in smaller batches.

    Args:
        rows: row indices to process.
        batch_size: rows per ``fn`` call.
        fn: maps a list of row indices to one result per row (decoding included, so a broken
            image fails its row only).
        stage: stage name for log messages.

    Returns:
        ``(results, errors)``: ``{row: result}`` for rows that succeeded and ``{row: message}``
        (:func:`short_error`) for rows that failed even alone.

    Raises:
        torch.OutOfMemoryError: out of memory on a single row (an infrastructure fault, not row data).
    """
    results: dict[int, R] = {}
    errors: dict[int, str] = {}
    limit = limit or FitLimit()
    todo = list(rows)
    while todo:
        size = limit.cap(batch_size)
        part, todo = todo[:size], todo[size:]
        try:
            results.update(zip(part, fn(part)))
            continue
        except Exception as e:
            if is_oom(e) and len(part) == 1:
                raise
            if is_oom(e):
                _free_cuda()
                log.warning("%s: out of GPU memory with a batch of %d rows; batch size now %d", stage, len(part),
                            limit.halve(size))
                todo = part + todo
                continue
            log.warning("%s: batch of %d rows failed (%s); retrying row by row", stage, len(part), short_error(e))
        for r in part:
            try:
                results[r] = fn([r])[0]
            except Exception as e:
                if is_oom(e):
                    raise
                errors[r] = short_error(e)
    return results, errors


def _free_cuda() -> None:
    """Release cached GPU memory after an out-of-memory error (no-op without CUDA)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def mark_failed(batch: pa.Table, errors: dict[int, str], status: str) -> pa.Table:
    """Set ``status`` and ``error_message`` of the rows in ``errors`` (other rows unchanged)."""
    if not errors:
        return batch
    statuses = column_or_nulls(batch, "status")
    messages = column_or_nulls(batch, "error_message")
    for r, msg in errors.items():
        statuses[r] = status
        messages[r] = msg
    batch = set_column(batch, "status", pa.array(statuses, pa.string()))
    return set_column(batch, "error_message", pa.array(messages, pa.string()))


def add_seconds(batch: pa.Table, name: str, seconds: float) -> pa.Table:
    """Add float64 column ``name``: ``seconds`` divided evenly over the batch's rows."""
    n = batch.num_rows
    return set_column(batch, name, pa.array([seconds / n if n else 0.0] * n, pa.float64()))
