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


# ---------------------------------------------------------------------------------------------
# parallel_blocks stages in worker processes
# ---------------------------------------------------------------------------------------------
class _InWorker(Stage):
    """A ``parallel_blocks`` task: adds 1 to ``x`` and records the process id; ``fail_on``: raise
    on the block whose first ``x`` is that value; ``die_on``: the worker kills itself there."""

    name = "work"
    shape = "task"
    parallel_blocks = True

    def __init__(self, fail_on: int | None = None, die_on: int | None = None, pause: float = 0.3):
        self.fail_on, self.die_on, self.pause = fail_on, die_on, pause

    def __call__(self, batch: pa.Table) -> pa.Table:
        import os
        import signal
        import time

        first = batch.column("x")[0].as_py()
        if first == self.fail_on:
            raise ValueError(f"block starting at {first} is bad")
        if first == self.die_on:
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(self.pause)  # long enough that both workers take blocks
        return pa.table({"x": [v + 1 for v in batch.column("x").to_pylist()], "pid": [os.getpid()] * batch.num_rows})


class _Counter:
    def __init__(self):
        self.rows: dict[str, list[int]] = {}
        self.lock = threading.Lock()

    def add(self, name: str, started: int, done: int) -> None:
        with self.lock:
            got = self.rows.setdefault(name, [0, 0])
            got[0] += started
            got[1] += done


def test_a_parallel_blocks_stage_runs_in_worker_processes_with_order_and_counts_kept():
    import os

    counter = _Counter()
    out = list(run_local(_specs(6), _plans(_Spec(), _InWorker()), counter, processes=2))
    assert [t.column("x").to_pylist() for t in out] == [[n * 10 + i + 1 for i in range(3)] for n in range(6)]
    pids = {p for t in out for p in t.column("pid").to_pylist()}
    assert len(pids) == 2 and os.getpid() not in pids  # two workers, neither of them this process
    assert counter.rows["work"] == [18, 18]


def test_processes_1_keeps_a_parallel_blocks_stage_in_its_thread():
    import os

    out = list(run_local(_specs(2), _plans(_Spec(), _InWorker(pause=0.0)), processes=1))
    assert {p for t in out for p in t.column("pid").to_pylist()} == {os.getpid()}


def test_an_error_in_a_worker_process_is_raised_to_the_caller():
    with pytest.raises(ValueError, match="block starting at 30 is bad"):
        list(run_local(_specs(6), _plans(_Spec(), _InWorker(fail_on=30)), processes=2))


def test_a_killed_worker_process_fails_the_run_instead_of_hanging():
    from concurrent.futures.process import BrokenProcessPool

    with pytest.raises(BrokenProcessPool):
        list(run_local(_specs(6), _plans(_Spec(), _InWorker(die_on=20)), processes=2))


def test_block_processes_one_per_core_only_without_models_and_with_two_blocks_or_more():
    from capfilt.config import DownloadConfig, StageResources
    from capfilt.local_runner import block_processes
    from capfilt.stages.download import DownloadStage

    download = SimpleNamespace(stage=DownloadStage(DownloadConfig()), resources=StageResources())
    write = SimpleNamespace(stage=_Add("write", 0, shape="sink"), resources=StageResources())
    model = SimpleNamespace(stage=_Add("caption", 0, shape="actor_pool"), resources=StageResources())
    assert block_processes([download, write], blocks=10, cpus=4) == 4
    assert block_processes([download, write], blocks=3, cpus=4) == 3  # never more processes than blocks
    assert block_processes([download, write], blocks=1, cpus=4) == 1
    assert block_processes([download, model, write], blocks=10, cpus=4) == 1  # the models take the cores
    dedup = SimpleNamespace(stage=_Add("dedup", 0, shape="single_actor"), resources=StageResources())
    assert block_processes([download, dedup, write], blocks=10, cpus=4) == 4  # run-wide state, no model
    capped = SimpleNamespace(stage=download.stage, resources=StageResources(concurrency=2))
    assert block_processes([capped, write], blocks=10, cpus=4) == 2


class _PidFile(Stage):
    """A ``parallel_blocks`` task that writes its process id into ``folder`` and then sleeps."""

    name = "work"
    shape = "task"
    parallel_blocks = True

    def __init__(self, folder: str):
        self.folder = folder

    def __call__(self, batch: pa.Table) -> pa.Table:
        import os
        import time
        from pathlib import Path

        Path(self.folder, f"pid-{os.getpid()}").touch()
        time.sleep(120)
        return batch


def test_worker_processes_exit_when_the_parent_is_killed(tmp_path):
    """Fresh-clone trial: after a kill -9 of the capfilt process alone (as the OOM killer does),
    its two download workers stayed alive, asleep, for as long as anyone watched."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    script = (
        "import sys\n"
        f"sys.path.insert(0, {str(root)!r})\n"
        "from types import SimpleNamespace\n"
        "import pyarrow as pa\n"
        "from capfilt.local_runner import run_local\n"
        "from tests.stages.test_local_runner import _PidFile, _Spec\n"
        "if __name__ == '__main__':\n"
        "    plans = [SimpleNamespace(stage=_Spec()), SimpleNamespace(stage=_PidFile(sys.argv[1]))]\n"
        "    list(run_local(pa.table({'n': [0, 1, 2, 3]}), plans, processes=2))\n"
    )
    (tmp_path / "run.py").write_text(script)
    pids = tmp_path / "pids"
    pids.mkdir()
    proc = subprocess.Popen([sys.executable, str(tmp_path / "run.py"), str(pids)], cwd=root)
    try:
        deadline = time.monotonic() + 60
        while len(list(pids.iterdir())) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        workers = [int(p.name.split("-")[1]) for p in pids.iterdir()]
        assert len(workers) == 2, "the two workers never started"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    def alive(pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
        except FileNotFoundError:
            return False

    deadline = time.monotonic() + 10
    while any(alive(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [p for p in workers if alive(p)]
    for p in left:
        os.kill(p, signal.SIGKILL)
    assert left == []
