"""The runner maps each stage onto ``map_batches`` by its declared shape, never by its name."""

from __future__ import annotations

import pyarrow as pa

from capfilt.config import load_pipeline
from capfilt.runner import StagePlan, map_stages, resolve_auto
from capfilt.stages.base import RunContext
from capfilt.stages.registry import build_stages


class _Strategy:
    def __init__(self, **kw):
        self.kw = kw

    def __eq__(self, other):
        return type(self) is type(other) and self.kw == other.kw


class ActorPool(_Strategy):
    """Records the arguments of ``ray.data.ActorPoolStrategy`` (the test compares them)."""


class TaskPool(_Strategy):
    """Records the arguments of ``ray.data.TaskPoolStrategy``."""


class FakeDataset:
    """Records each ``map_batches`` call: the callable and its keyword arguments."""

    def __init__(self):
        self.calls: list[tuple[object, dict]] = []

    def map_batches(self, fn, **kw):
        self.calls.append((fn, kw))
        return self


def _plans(**overrides) -> list[StagePlan]:
    cfg = load_pipeline("blip", {"dedup.enabled": True, **overrides})
    ctx = RunContext("/tmp/never-written", "rid", schema=pa.schema([]))
    return resolve_auto([StagePlan(s, r) for s, r in build_stages(cfg, ctx)], {"CPU": 8.0, "GPU": 2.0})


def test_map_batches_arguments_per_stage():
    plans = _plans(**{"resources.download.concurrency": 3, "resources.score.concurrency": [1, 4]})
    ds = map_stages(FakeDataset(), plans, {"CPU": 8.0, "GPU": 2.0}, num_shards=3, env=None,
                    actor_pool=ActorPool, task_pool=TaskPool)
    got = {p.stage.name: kw for p, (_fn, kw) in zip(plans, ds.calls)}
    assert list(got) == ["read", "download", "dedup", "caption", "score", "select", "write"]
    base = dict(batch_format="pyarrow", zero_copy_batch=True)
    assert got["read"] == {**base, "batch_size": 1, "num_cpus": 0.25, "max_calls": 0}  # fanout: one spec per call
    assert got["download"] == {**base, "batch_size": None, "num_cpus": 0.5, "max_calls": 0,
                               "compute": TaskPool(size=3)}
    assert got["dedup"] == {**base, "batch_size": None, "num_cpus": 0.25,
                            "compute": ActorPool(min_size=1, max_size=1)}  # single_actor
    # num_gpus auto -> 0.5 on a GPU cluster; pool up to one actor per share, at most one per shard
    assert got["caption"] == {**base, "batch_size": None, "num_cpus": 0.5, "num_gpus": 0.5,
                              "compute": ActorPool(min_size=1, max_size=3)}
    # an overridden entry replaces the default one (num_gpus 0); [1, 4] actors capped at 3 shards
    assert got["score"] == {**base, "batch_size": None, "num_cpus": 0.5, "compute": ActorPool(min_size=1, max_size=3)}
    assert got["select"] == got["write"] == {**base, "batch_size": None, "num_cpus": 0.25, "max_calls": 0}


def test_runtime_env_and_callables():
    plans = _plans()
    ds = map_stages(FakeDataset(), plans, {"CPU": 2.0}, num_shards=1, env={"HF_HOME": "/x"},
                    actor_pool=ActorPool, task_pool=TaskPool)
    assert all(kw["runtime_env"] == {"env_vars": {"HF_HOME": "/x"}} for _fn, kw in ds.calls)
    # actors are classes named after the stage (worker process titles), tasks are functions
    kinds = {p.stage.name: (isinstance(fn, type), fn.__name__) for p, (fn, _kw) in zip(plans, ds.calls)}
    assert kinds["caption"] == (True, "CaptionActor") and kinds["dedup"] == (True, "DedupActor")
    assert kinds["download"] == (False, "download") and kinds["write"] == (False, "write")
