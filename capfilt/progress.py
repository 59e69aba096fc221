"""Progress a person can follow: committed rows, rate, ETA, failures and where the time goes.

:class:`RunProgress` is fed each committed part's statistics as the run streams them (both
executors yield one stats row per committed part) and logs one line every ``every_s`` seconds
from a background thread, so a run whose output goes to a log file still says what it is doing
while a long shard is in flight::

    progress: 3,000 / 10,000 rows (30.0%) in 4 parts, 41.2 rows/s, ETA 2 min 50 s; failed 212
    (failed_to_download 200, too_small 12); stage time: download 71 %, write 29 %

The stage-time shares (summed worker seconds per stage, from the parts' ``seconds``) show which
stage the run is waiting on. When the executor counts rows per stage (:func:`capfilt.runner.stage_counter`),
a second line follows with each stage's rows done / total and rate, and the stage the rows are
piling up in front of (Ray Data's backpressure)::

    stages: read 6,000/10,000 (81.0 rows/s), download 4,000/10,000 (54.0 rows/s), caption 3,000/10,000
    (40.5 rows/s), ..., write 3,000/10,000 (40.5 rows/s); waiting on stage caption (1,000 rows queued or in progress)
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

log = logging.getLogger("capfilt.progress")

#: Seconds between progress lines.
EVERY_S = 30.0


def _duration(s: float) -> str:
    s = int(round(s))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    return f"{s // 3600} h {s % 3600 // 60} min"


def rate_text(rows: float, seconds: float) -> str:
    """``rows / seconds`` with enough digits that a slow run never shows ``0.0`` (e.g. ``0.012 rows/s``)."""
    from capfilt.summary import format_rate

    return f"{format_rate(rows / seconds if seconds > 0 else 0.0)} rows/s"


class RunProgress:
    """Counters of a running ``capfilt run`` and the periodic progress line (see module docs).

    Args:
        total_rows: rows the run must write (all attempts).
        done_rows: rows already committed by earlier attempts (not counted in the rate).
        every_s: seconds between lines; ``0`` logs only on :meth:`close`.
        stages: stage names in pipeline order, for the per-stage line.
        stage_counts: returns ``{stage: (rows started, rows done)}`` of this attempt
            (:func:`capfilt.runner.stage_counter`'s ``snapshot``); ``None``: no per-stage line.
    """

    def __init__(self, total_rows: int, done_rows: int = 0, every_s: float = EVERY_S,
                 stages: Sequence[str] = (), stage_counts: Callable[[], dict[str, tuple[int, int]]] | None = None):
        self.stages, self.stage_counts = list(stages), stage_counts
        self.total, self.done_before = total_rows, done_rows
        self.rows = 0
        self.parts = 0
        self.failed: Counter[str] = Counter()
        self.stage_seconds: Counter[str] = Counter()
        self.start = time.monotonic()
        self.every_s = every_s
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> RunProgress:
        if self.every_s > 0:
            self._thread = threading.Thread(target=self._loop, name="capfilt-progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            self.log_lines()

    def log_lines(self) -> None:
        """Log the progress line and, when stages are counted, the per-stage line."""
        log.info(self.line())
        stage_line = self.stage_line()
        if stage_line:
            log.info(stage_line)

    def stage_line(self) -> str:
        """Per-stage rows done / total and rows/s, and the stage rows wait in front of; ``""`` without counts."""
        if self.stage_counts is None:
            return ""
        counts = self.stage_counts() or {}
        if not counts:
            return ""
        names = self.stages + sorted(set(counts) - set(self.stages))  # stages not reached yet show 0
        counts = {n: counts.get(n, (0, 0)) for n in names}
        todo = max(0, self.total - self.done_before)
        elapsed = time.monotonic() - self.start
        parts = [f"{n} {counts[n][1]:,}/{todo:,} ({rate_text(counts[n][1], elapsed)})" for n in names]
        out = "stages: " + ", ".join(parts)
        # backpressure: the stage with most rows that reached it (done by the stage before) and not left it
        waiting = [(counts[prev][1] - counts[n][1], counts[prev][1] - counts[n][0], n)
                   for prev, n in zip(names, names[1:])]
        held, queued, name = max(waiting, default=(0, 0, ""))
        if held > 0:
            out += (f"; waiting on stage {name} ({held:,} rows: {max(queued, 0):,} queued, "
                    f"{held - max(queued, 0):,} in progress)")
        return out

    def add(self, stats: dict[str, Any]) -> None:
        """Count one committed part (its ``.stats.json`` content)."""
        with self._lock:
            self.rows += int(stats.get("rows", 0))
            self.parts += 1
            self.failed.update({k: v for k, v in (stats.get("status") or {}).items() if k != "success"})
            self.stage_seconds.update(stats.get("seconds") or {})

    def line(self) -> str:
        """The progress line now."""
        with self._lock:
            elapsed = time.monotonic() - self.start
            done = self.done_before + self.rows
            pct = f" ({done / self.total:.1%})" if self.total else ""
            out = f"progress: {done:,} / {self.total:,} rows{pct} in {self.parts} parts, {rate_text(self.rows, elapsed)}"
            if self.rows and self.total > done:
                out += f", ETA {_duration((self.total - done) * elapsed / self.rows)}"
            elif done >= self.total:
                out += ", nothing left to do" if not self.rows else ""
            elif not self.rows:
                out += f", running for {_duration(elapsed)} (the first part is not committed yet)"
            n_failed = sum(self.failed.values())
            if n_failed:
                top = ", ".join(f"{k} {v:,}" for k, v in self.failed.most_common(4))
                out += f"; failed {n_failed:,} ({top})"
            busy = sum(self.stage_seconds.values())
            if busy > 0:
                shares = ", ".join(f"{k} {v / busy:.0%}" for k, v in self.stage_seconds.most_common(4))
                out += f"; stage time: {shares}"
            return out
