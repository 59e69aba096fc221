"""The runner maps each stage onto ``map_batches`` by its declared shape, never by its name."""

from __future__ import annotations

import pyarrow as pa
import pytest

from capfilt.config import ConfigError, StageResources, load_pipeline
from capfilt.runner import StagePlan, actor_threads, map_stages, resolve_auto, run_ray
from capfilt.stages.base import RunContext, Stage
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
    # num_gpus auto -> a whole GPU when caption is the only auto stage (the score entry below was
    # overridden to num_gpus 0); pool up to one actor per GPU
    assert got["caption"] == {**base, "batch_size": None, "num_cpus": 0.5, "num_gpus": 1.0,
                              "compute": ActorPool(min_size=1, max_size=2)}
    # an overridden entry replaces the default one (num_gpus 0); [1, 4] actors capped at 3 shards
    assert got["score"] == {**base, "batch_size": None, "num_cpus": 0.5, "compute": ActorPool(min_size=1, max_size=3)}
    assert got["select"] == got["write"] == {**base, "batch_size": None, "num_cpus": 0.25, "max_calls": 0}


def test_auto_gpus_share_a_device_between_caption_and_score_and_give_the_fused_stage_one():
    two = {p.stage.name: p.resources.num_gpus for p in _plans(**{"resources.fused": False})}
    assert two["caption"] == two["score"] == 0.5
    fused = {p.stage.name: p.resources.num_gpus for p in _plans(**{"resources.fused": True})}
    assert fused["caption_score"] == 1.0 and "caption" not in fused
    assert {p.stage.name: p.resources.num_gpus for p in _plans()} == fused  # fused is the default


def test_fused_is_the_default_unless_the_recipe_sizes_the_two_pools():
    """Issue 15 item 6: one caption_score actor by default (measured faster); a recipe that sets
    resources.caption or resources.score asks for two pools and gets them; false forces two pools."""
    names = lambda **o: [p.stage.name for p in _plans(**o)]  # noqa: E731
    assert names() == ["read", "download", "dedup", "caption_score", "select", "write"]
    assert names(**{"resources.caption.num_gpus": 0.5})[3:5] == ["caption", "score"]
    assert names(**{"resources.score.concurrency": 2})[3:5] == ["caption", "score"]
    assert names(**{"resources.fused": False})[3:5] == ["caption", "score"]
    with pytest.raises(ConfigError, match=r"resources.caption \(the size of a separate pool\) would be ignored"):
        names(**{"resources.fused": True, "resources.caption.num_gpus": 0.5})
    assert names(**{"resources.fused": "auto"})[3] == "caption_score"


def test_runtime_env_and_callables():
    plans = _plans(**{"resources.fused": False})
    ds = map_stages(FakeDataset(), plans, {"CPU": 2.0}, num_shards=1, env={"HF_HOME": "/x"},
                    actor_pool=ActorPool, task_pool=TaskPool)
    assert all(kw["runtime_env"] == {"env_vars": {"HF_HOME": "/x"}} for _fn, kw in ds.calls)
    # actors are classes named after the stage (worker process titles), tasks are functions
    kinds = {p.stage.name: (isinstance(fn, type), fn.__name__) for p, (fn, _kw) in zip(plans, ds.calls)}
    assert kinds["caption"] == (True, "CaptionActor") and kinds["dedup"] == (True, "DedupActor")
    assert kinds["download"] == (False, "download") and kinds["write"] == (False, "write")
    fused = _plans()
    ds = map_stages(FakeDataset(), fused, {"CPU": 2.0}, num_shards=1, env={}, actor_pool=ActorPool, task_pool=TaskPool)
    assert ds.calls[[p.stage.name for p in fused].index("caption_score")][0].__name__ == "CaptionScoreActor"


# --- issue 15 item 1: model actors compute on the cores Ray gives them ------------------------------------


class _Specs(Stage):
    """A fanout that passes the spec rows on."""

    name = "read"
    shape = "fanout"

    def __call__(self, batch: pa.Table) -> pa.Table:
        return batch


class _Threads(Stage):
    """An actor-pool stage that records, from inside its actor, torch's thread count and the PID."""

    name = "threads"
    shape = "actor_pool"

    def __call__(self, batch: pa.Table) -> pa.Table:
        import os

        import torch

        n = batch.num_rows
        batch = batch.append_column("threads", pa.array([torch.get_num_threads()] * n, pa.int64()))
        omp = os.environ.get("OMP_NUM_THREADS")
        return batch.append_column("omp", pa.array([omp] * n, pa.string()))


def test_actor_threads_rule():
    two = [StagePlan(_Threads(), StageResources(num_cpus=0.5)), StagePlan(_Threads(), StageResources(num_cpus=0.5))]
    assert [actor_threads(p, two, 2) for p in two] == [1, 1]      # captioner + scorer on a 2-core laptop
    assert [actor_threads(p, two, 16) for p in two] == [8, 8]
    assert actor_threads(two[0], two[:1], 2) == 2                 # the only model stage: every core
    gpu = StagePlan(_Threads(), StageResources(num_cpus=4, num_gpus=1))
    assert actor_threads(gpu, [gpu, two[0]], 4) == 4              # never fewer than the CPUs Ray reserves
    fixed = StagePlan(_Threads(), StageResources(num_cpus=0.5, threads=3))
    assert actor_threads(fixed, two + [fixed], 2) == 3


def test_model_actor_threads_seen_from_inside_the_actor():
    """Ray starts a 0.5-CPU actor with OMP_NUM_THREADS=1; the runner gives it the threads of its rule."""
    specs = pa.table({"shard_id": pa.array([0, 1], pa.int64())})
    seen = {}
    for threads in ("auto", 1):
        plans = [StagePlan(_Specs(), StageResources(num_cpus=0.25)),
                 StagePlan(_Threads(), StageResources(num_cpus=0.5, threads=threads))]
        rows = pa.concat_tables(list(run_ray(specs, plans, progress=False))).to_pylist()
        assert len(rows) == 2
        seen[threads] = {(r["threads"], r["omp"]) for r in rows}
    import ray

    cpus = int(ray.cluster_resources()["CPU"])
    assert cpus >= 2, "this test needs a Ray with at least 2 CPUs"
    assert seen == {"auto": {(cpus, str(cpus))}, 1: {(1, "1")}}
