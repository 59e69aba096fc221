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

A CPU-heavy stage (``parallel_blocks``, i.e. download) can instead spread its blocks over worker
processes, one block per process at a time, as img2dataset spreads shards over its processes:
:func:`block_processes` gives it one per core when no model stage runs (a download-only run, where
decoding and resizing are the work) and the input has two blocks or more. The stage's thread then
hands blocks to the pool and passes the results on in order. The workers are started with
``spawn`` (never ``fork`` a process that has threads) and ignore ``SIGINT``: Ctrl-C reaches this
process, which stops the pool. A worker also exits by itself within a second of this process
dying (a ``kill -9``, the out-of-memory killer), which leaves no one to stop it. As with any
``spawn`` pool (img2dataset's included), a script that calls :func:`capfilt.api.run` must start it
under ``if __name__ == "__main__":``, since each worker imports the script's main module again.

An exception in any stage stops the others and is raised to the caller; a ``KeyboardInterrupt``
in the caller stops them too. Committed work stays committed (the writer's protocol).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import multiprocessing
import os
import queue
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, wait
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


def block_processes(plans: list[Any], blocks: int, cpus: int | None = None) -> int:
    """Worker processes for the ``parallel_blocks`` stages of a local run (1: in the stage's thread).

    One per core (``resources.<stage>.concurrency`` caps it when set) when no model stage
    (``actor_pool``, the stages that take turns on the model lock) runs and there are at least two
    blocks; with a model stage the models take the cores (and decoding is a small part of the
    work), and one block gains nothing from a second process. A ``single_actor`` stage (exact or
    near dedup: run-wide state, no model) does not count as one.

    Args:
        plans: :class:`capfilt.runner.StagePlan` s (``.stage``; ``.resources`` when present).
        blocks: blocks in the run (specs after :func:`capfilt.stages.read.stream_blocks`).
        cpus: cores to use (default: ``os.cpu_count()``).
    """
    if blocks < 2 or any(p.stage.shape == "actor_pool" for p in plans):
        return 1
    n = cpus or os.cpu_count() or 1
    for p in plans:
        cap = getattr(getattr(p, "resources", None), "concurrency", None)
        if p.stage.parallel_blocks and cap is not None:
            n = min(n, cap if isinstance(cap, int) else cap[1])
    return max(1, min(n, blocks))


def _worker_init(parent: int) -> None:
    """Worker initializer: Ctrl-C is the parent's to handle (it stops the pool), and the worker
    exits when process ``parent`` is gone (:func:`_exit_with_parent` on a daemon thread)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_with_parent, args=(parent,), name="capfilt-parent-watch", daemon=True).start()


def _exit_with_parent(parent: int, every_s: float = 0.5) -> None:
    """End this worker process once its parent is not ``parent`` any more (the parent died and the
    worker was re-parented): a pool worker blocked on its task queue would otherwise wait for ever."""
    while True:
        time.sleep(every_s)
        if os.getppid() != parent:
            os._exit(1)


def _call_in_worker(stage: Stage, batch: pa.Table) -> pa.Table:
    """``stage(batch)`` in a worker process (the stage arrives pickled with every block)."""
    stage.setup()
    return stage(batch)


def run_local(specs: pa.Table, plans: list[Any], counter: Any = None, depth: int = QUEUE_DEPTH,
              processes: int = 1) -> Iterator[pa.Table]:
    """Run every stage in this process, one thread per stage, blocks streaming between them.

    Args:
        specs: one row per shard spec or streaming block (:func:`capfilt.stages.read.specs_table`).
        plans: :class:`capfilt.runner.StagePlan` s in pipeline order (only ``.stage`` is used).
        counter: per-stage row counts for the progress lines (``.add(name, started, done)``,
            thread-safe); ``None``: none.
        depth: blocks buffered between two stages (>= 1).
        processes: worker processes for each ``parallel_blocks`` stage (:func:`block_processes`);
            1 runs it in its thread like the others.

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

    def work_in_processes(index: int, stage: Stage) -> None:
        """Run ``stage`` on every block from ``queues[index]`` in ``processes`` worker processes,
        at most ``2 * processes`` blocks submitted at once, results handed on in block order."""
        inbox, outbox = queues[index], queues[index + 1]
        pending: collections.deque = collections.deque()  # futures, in block order
        ended = False
        pool = ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_worker_init, initargs=(os.getpid(),))
        try:
            while not stop.is_set():
                if pending and pending[0].done():
                    out = pending.popleft().result()
                    if counter is not None:
                        _safe_report(counter.add, stage.name, 0, out.num_rows)
                    if out.num_rows and not put(outbox, out):
                        return
                elif not ended and len(pending) < 2 * processes:
                    try:
                        item = inbox.get(timeout=0.05)
                    except queue.Empty:
                        if pending:
                            wait([pending[0]], timeout=0.05)
                        continue
                    if item is _END:
                        ended = True
                        continue
                    if counter is not None:
                        _safe_report(counter.add, stage.name, item.num_rows, 0)
                    pending.append(pool.submit(_call_in_worker, stage, item))
                elif pending:
                    wait([pending[0]], timeout=0.1)
                else:
                    put(outbox, _END)
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the caller, which re-raises it
            errors.append(e)
            stop.set()
        finally:
            if stop.is_set():  # a failure or Ctrl-C: end the workers now, not after their blocks
                for proc in list((getattr(pool, "_processes", None) or {}).values()):  # no public API before 3.14
                    proc.terminate()
            pool.shutdown(wait=not stop.is_set(), cancel_futures=True)

    def target(stage: Stage):
        """The thread body for ``stage``: :func:`work_in_processes` for a ``parallel_blocks`` task
        stage when ``processes > 1``, else :func:`work`."""
        return work_in_processes if processes > 1 and stage.parallel_blocks and stage.shape == "task" else work

    threads = [threading.Thread(target=feed, name="capfilt-local-feed", daemon=True)]
    threads += [threading.Thread(target=target(p.stage), args=(i, p.stage), name=f"capfilt-local-{p.stage.name}",
                                 daemon=True) for i, p in enumerate(plans)]
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
