"""The in-process executor (``--executor local``): every stage on its own thread, blocks streaming.

Ray's start-up (its processes, a worker per pool that imports torch again, the model loads) costs
a small run more than its work does. This executor runs the same stages in this process: each
stage gets a thread, and blocks (a shard, or one ``output.block_rows`` block of it,
:func:`capfilt.stages.read.stream_blocks`) pass from stage to stage through bounded queues, so the
next block downloads while the models work on this one (the GIL is released in network I/O,
Pillow and torch). Stage set-ups (model loads) also run on their threads, overlapping the first
downloads. Stages that hold models (``actor_pool`` shape) take turns on one lock, so two models
never split the cores between them (torch uses every core for one). Blocks keep their order, so
the sink commits shards exactly as under Ray.

An exception in any stage stops the others and is raised to the caller; a ``KeyboardInterrupt``
in the caller stops them too. Committed work stays committed (the writer's protocol).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Iterator
from typing import Any

import pyarrow as pa

from capfilt.stages.base import Stage

log = logging.getLogger(__name__)

#: Blocks waiting between two stages: enough to keep the next stage fed, few enough that memory
#: stays a few blocks whatever the run's size.
QUEUE_DEPTH = 2
_END = object()


def counted_call(stage: Stage, batch: pa.Table, report: Any) -> pa.Table:
    """``stage(batch)``, reporting rows in and out to ``report(stage, started, done)`` (``None``: no report).

    A ``fanout`` stage turns one spec into a shard's rows: it counts its output rows when done. A
    ``sink`` turns rows into one stats row: it counts its input rows. Every other stage keeps its
    rows, so it counts its input rows when it starts and its output rows when it ends.
    """
    if report is None:
        return stage(batch)
    if stage.shape != "fanout":
        _safe_report(report, stage.name, batch.num_rows, 0)
    out = stage(batch)
    if stage.shape == "fanout":
        _safe_report(report, stage.name, out.num_rows, out.num_rows)
    else:
        _safe_report(report, stage.name, 0, batch.num_rows if stage.shape == "sink" else out.num_rows)
    return out


def _safe_report(report: Any, name: str, started: int, done: int) -> None:
    """Progress counting is best effort: it never fails a block."""
    try:
        report(name, started, done)
    except Exception as e:  # noqa: BLE001 - a lost counter must not cost a shard
        log.debug("stage progress count lost: %s", e)


def run_local(specs: pa.Table, plans: list[Any], counter: Any = None, depth: int = QUEUE_DEPTH) -> Iterator[pa.Table]:
    """Run every stage in this process, one thread per stage, blocks streaming between them.

    Args:
        specs: one row per shard spec or streaming block (:func:`capfilt.stages.read.specs_table`).
        plans: :class:`capfilt.runner.StagePlan` s in pipeline order (only ``.stage`` is used).
        counter: per-stage row counts for the progress lines (``.add(name, started, done)``,
            thread-safe); ``None``: none.
        depth: blocks buffered between two stages (>= 1).

    Yields:
        The last stage's output for each spec, in spec order (the sink's stats rows). A spec
        whose rows all vanish in a stage (an empty table) yields nothing.

    Raises:
        Whatever a stage (or its ``setup``) raised, after the other stages were told to stop.
    """
    stop = threading.Event()
    errors: list[BaseException] = []  # the first stage failure, raised by the caller's thread
    models = threading.Lock()  # one model stage computes at a time: each uses every core
    queues: list[queue.Queue] = [queue.Queue(maxsize=max(1, depth)) for _ in range(len(plans) + 1)]

    def put(q: queue.Queue, item: Any) -> bool:
        """Hand ``item`` on unless the run is stopping; ``False`` when it stopped."""
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def get(q: queue.Queue) -> Any:
        """The next item, or ``_END`` when the run is stopping."""
        while not stop.is_set():
            try:
                return q.get(timeout=0.1)
            except queue.Empty:
                continue
        return _END

    def feed() -> None:
        """Put the specs, one at a time, on the first stage's queue."""
        for i in range(specs.num_rows):
            if not put(queues[0], specs.slice(i, 1)):
                return
        put(queues[0], _END)

    def work(index: int, stage: Stage) -> None:
        """Set ``stage`` up, then run it on every block from ``queues[index]`` into ``queues[index + 1]``."""
        inbox, outbox = queues[index], queues[index + 1]
        report = counter.add if counter is not None else None
        turn = (lambda: models) if stage.shape == "actor_pool" else contextlib.nullcontext
        try:
            with turn():
                stage.setup()
            while True:
                item = get(inbox)
                if item is _END:
                    put(outbox, item)
                    return
                with turn():
                    out = counted_call(stage, item, report)
                if out.num_rows and not put(outbox, out):
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the caller, which re-raises it
            errors.append(e)
            stop.set()

    threads = [threading.Thread(target=feed, name="capfilt-local-feed", daemon=True)]
    threads += [threading.Thread(target=work, args=(i, p.stage), name=f"capfilt-local-{p.stage.name}", daemon=True)
                for i, p in enumerate(plans)]
    for t in threads:
        t.start()
    try:
        while True:
            if errors:
                raise errors[0]
            try:
                item = queues[-1].get(timeout=0.1)
            except queue.Empty:
                if not any(t.is_alive() for t in threads[1:]) and queues[-1].empty() and not errors:
                    raise RuntimeError("local executor: every stage thread ended without a result") from None
                continue
            if item is _END:
                return
            yield item
    finally:
        stop.set()
        deadline = time.monotonic() + 5.0  # a model call in flight is not interrupted; do not wait for it long
        for t in threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
