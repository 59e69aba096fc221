"""Micro-batching helpers shared by the model wrappers: fixed-size chunks and CUDA-OOM back-off."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")

log = logging.getLogger(__name__)


def chunks(items: Sequence[T], size: int) -> list[Sequence[T]]:
    """Split ``items`` into consecutive slices of at most ``size`` (``size >= 1``)."""
    if size < 1:
        raise ValueError(f"chunk size must be >= 1, got {size}")
    return [items[i:i + size] for i in range(0, len(items), size)]


def is_oom(err: BaseException) -> bool:
    """True for a CUDA (or other accelerator) out-of-memory error raised by torch."""
    import torch

    oom = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    return isinstance(err, oom) or (isinstance(err, RuntimeError) and "out of memory" in str(err).lower())


class FitLimit:
    """The largest micro-batch known to fit on the device, learnt from CUDA out-of-memory errors.

    One per model (an actor keeps it across blocks), so after the first OOM every later call starts
    at the size that fitted instead of failing again. ``size`` is ``None`` until an OOM is seen.
    """

    def __init__(self) -> None:
        self.size: int | None = None

    def cap(self, batch_size: int) -> int:
        """``batch_size`` limited to what fitted (at least 1)."""
        return max(1, min(batch_size, self.size) if self.size else batch_size)

    def halve(self, failed: int) -> int:
        """Record an OOM at batch size ``failed``; returns the new (halved) limit."""
        self.size = max(1, failed // 2)
        return self.size


def run_with_oom_backoff(fn: Callable[[Sequence[T]], list[R]], items: Sequence[T], batch_size: int,
                         what: str = "batch", limit: FitLimit | None = None) -> list[R]:
    """Apply ``fn`` to ``items`` in chunks of ``batch_size``; on CUDA OOM halve the chunk and retry.

    ``fn`` must return one result per item, in order, and be a pure function of its chunk (so a
    retried chunk gives the same results). The halved size is kept for the rest of ``items`` and
    logged at WARNING level; with ``limit`` it is kept for later calls too.

    Returns:
        ``fn``'s results concatenated, ``len == len(items)``.

    Raises:
        The OOM error when even a chunk of one item does not fit; any other error of ``fn`` as is.
    """
    import torch

    out: list[R] = []
    limit = limit or FitLimit()
    i, size = 0, limit.cap(batch_size)
    while i < len(items):
        part = items[i:i + size]
        try:
            res = fn(part)
        except Exception as e:
            if not is_oom(e) or size == 1:
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            size = limit.halve(size)
            log.warning("%s: CUDA out of memory with %d items; retrying with batch size %d", what, len(part), size)
            continue
        out.extend(res)
        i += len(part)
    return out
