"""The in-process executor: a thread per stage, blocks streaming in order, failures raised to the caller."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pyarrow as pa
import pytest

from capfilt.local_runner import run_local
from capfilt.stages.base import Stage

WAIT = 20.0  # seconds a stage waits for something that must happen; never reached when it works


class _Spec(Stage):
    """A fanout: spec row ``n`` becomes a block of rows ``n*10 .. n*10+2``."""

    name = "read"
    shape = "fanout"

    def __call__(self, batch: pa.Table) -> pa.Table:
        n = batch.column("n")[0].as_py()
        return pa.table({"x": [n * 10, n * 10 + 1, n * 10 + 2]})


class _Add(Stage):
    """Adds ``k`` to ``x``; optionally runs a hook first."""

    shape = "task"

    def __init__(self, name: str, k: int, hook=None, shape: str = "task"):
        self.name, self.k, self.hook, self.shape = name, k, hook, shape
        self.set_up = 0

    def setup(self) -> None:
        self.set_up += 1

    def __call__(self, batch: pa.Table) -> pa.Table:
        if self.hook is not None:
            self.hook(self, batch)
        return pa.table({"x": [v + self.k for v in batch.column("x").to_pylist()]})


def _plans(*stages: Stage) -> list:
    return [SimpleNamespace(stage=s) for s in stages]


def _specs(n: int) -> pa.Table:
    return pa.table({"n": list(range(n))})


def test_blocks_come_out_in_order_through_every_stage_and_each_stage_is_set_up_once():
    a, b = _Add("a", 1), _Add("b", 100)
    out = list(run_local(_specs(6), _plans(_Spec(), a, b)))
    assert [t.column("x").to_pylist() for t in out] == [[n * 10 + i + 101 for i in range(3)] for n in range(6)]
    assert a.set_up == b.set_up == 1


def test_a_later_stage_works_on_block_1_while_an_earlier_one_works_on_block_2():
    """Streaming: 'late' holds block 0 until 'early' has started on block 1; run in series, this would
    wait for ever (the test fails after WAIT seconds)."""
    early_on_block_1 = threading.Event()
    overlapped = []

    def early(stage, batch):
        if batch.column("x")[0].as_py() == 10:
            early_on_block_1.set()

    def late(stage, batch):
        if batch.column("x")[0].as_py() == 1:  # block 0 after 'early' added 1
            overlapped.append(early_on_block_1.wait(WAIT))

    out = list(run_local(_specs(3), _plans(_Spec(), _Add("early", 1, early), _Add("late", 0, late))))
    assert overlapped == [True]
    assert len(out) == 3


def test_two_model_stages_never_compute_at_the_same_time():
    busy, most, lock = [0], [0], threading.Lock()

    def model(stage, batch):
        with lock:
            busy[0] += 1
            most[0] = max(most[0], busy[0])
        threading.Event().wait(0.02)
        with lock:
            busy[0] -= 1

    stages = (_Spec(), _Add("caption", 1, model, "actor_pool"), _Add("score", 1, model, "actor_pool"))
    assert len(list(run_local(_specs(8), _plans(*stages)))) == 8
    assert most[0] == 1


@pytest.mark.parametrize("where", ["call", "setup"])
def test_a_stage_failure_is_raised_to_the_caller_and_stops_the_others(where):
    seen = []

    class Boom(_Add):
        def setup(self):
            if where == "setup":
                raise ValueError("cannot load the model")

    def hook(stage, batch):
        if batch.column("x")[0].as_py() >= 20:
            raise ValueError("bad block 2")

    after = _Add("after", 0, lambda s, b: seen.append(b.column("x")[0].as_py()))
    with pytest.raises(ValueError, match="bad block 2" if where == "call" else "cannot load the model"):
        list(run_local(_specs(50), _plans(_Spec(), Boom("boom", 0, hook), after)))
    assert all(v < 20 for v in seen)  # nothing after the failed block reached later stages
    assert not [t for t in threading.enumerate() if t.name.startswith("capfilt-local-")]


def test_closing_the_stream_early_stops_every_thread():
    stream = run_local(_specs(100), _plans(_Spec(), _Add("a", 1)))
    first = next(stream)
    assert first.column("x").to_pylist() == [1, 2, 3]
    stream.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("capfilt-local-")]


def test_empty_blocks_are_dropped_and_the_counter_sees_every_stage():
    class Drop(_Add):
        def __call__(self, batch):
            return batch.slice(0, 0) if batch.column("x")[0].as_py() == 10 else batch

    counts: dict[str, list[int]] = {}

    class Counter:
        def add(self, name, started, done):
            c = counts.setdefault(name, [0, 0])
            c[0] += started
            c[1] += done

    out = list(run_local(_specs(3), _plans(_Spec(), Drop("drop", 0), _Add("a", 1)), Counter()))
    assert [t.column("x")[0].as_py() for t in out] == [1, 21]
    assert counts == {"read": [9, 9], "drop": [9, 6], "a": [6, 6]}  # drop: 9 rows in, 6 out
