"""Executors: where stages run. The only module that imports Ray.

:func:`run_ray` maps each stage onto Ray Data ``map_batches``: model stages (``uses_model``) become
actor pools (one model load per actor), the others plain tasks, each with the CPUs/GPUs and
concurrency of its :class:`capfilt.config.StageResources`. One input block is one shard spec, and
every stage processes a whole block (``batch_size=None``; model stages micro-batch inside), so a
shard streams through the pipeline as one unit and the writer commits it.

:func:`run_local` runs the same stages in this process, shard after shard: for model-free recipes
(``refilter``) and debugging.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa

from capfilt.config import StageResources
from capfilt.errors import CapfiltError
from capfilt.stages.base import Stage

log = logging.getLogger(__name__)


@dataclass
class StagePlan:
    """A stage and the Ray resources it runs with."""

    stage: Stage
    resources: StageResources


class ResourceError(CapfiltError):
    """A stage asks for resources the Ray cluster does not have (raised before any work)."""


def run_local(specs: pa.Table, plans: list[StagePlan]) -> Iterator[pa.Table]:
    """Run every stage in this process, one shard spec at a time.

    Yields:
        The last stage's output for each shard (the writer's stats rows).
    """
    for p in plans:
        p.stage.setup()
    for i in range(specs.num_rows):
        t = specs.slice(i, 1)
        for p in plans:
            t = p.stage(t)
            if t.num_rows == 0:
                break
        yield t


def _actor_class(stage: Stage) -> type:
    """A Ray Data actor class for ``stage``: set up once per actor, then called per block.

    The stage travels inside the class definition rather than as a constructor argument in the
    object store, so restarted actors (Ray restarts dead actors by default) can always rebuild it.
    """

    class _ActorStage:
        def __init__(self):
            self.stage = stage
            self.stage.setup()

        def __call__(self, batch: pa.Table) -> pa.Table:
            return self.stage(batch)

    _ActorStage.__name__ = _ActorStage.__qualname__ = f"{stage.name.capitalize()}Actor"
    return _ActorStage


def _task_fn(stage: Stage):
    def fn(batch: pa.Table) -> pa.Table:
        stage.setup()  # task stages keep setup idempotent and cheap
        return stage(batch)

    fn.__name__ = f"{stage.name}"
    return fn


def init_ray(address: str | None) -> dict:
    """Connect to ``address`` (or ``RAY_ADDRESS``), or start a local Ray sized to this machine.

    Returns:
        ``ray.cluster_resources()`` (``{"CPU": 2.0, "GPU": ..., ...}``).
    """
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    import ray

    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS") or None
        env_vars = {k: os.environ[k] for k in ("NO_ALBUMENTATIONS_UPDATE", "HF_HUB_OFFLINE", "CAPFILT_CACHE",
                                               "HF_HOME", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID",
                                               "AWS_SECRET_ACCESS_KEY", "AWS_REGION", "AWS_DEFAULT_REGION")
                    if k in os.environ}
        kwargs = dict(ignore_reinit_error=True, include_dashboard=False, logging_level=logging.WARNING,
                      runtime_env={"env_vars": env_vars} if env_vars else None)
        if address:
            ray.init(address=address, **kwargs)
        else:
            ray.init(num_cpus=os.cpu_count(), **kwargs)
    return ray.cluster_resources()


def check_resources(plans: list[StagePlan], cluster: dict) -> None:
    """Refuse stage resources the cluster cannot provide.

    Raises:
        ResourceError: naming the stage, the resource asked for and what the cluster has.
    """
    cpus, gpus = cluster.get("CPU", 0.0), cluster.get("GPU", 0.0)
    for p in plans:
        r = p.resources
        n = r.concurrency if isinstance(r.concurrency, int) else (r.concurrency[0] if r.concurrency else 1)
        if r.num_gpus * n > gpus:
            raise ResourceError(f"stage {p.stage.name!r} asks for {r.num_gpus:g} GPU(s) x {n} worker(s), but the "
                                f"Ray cluster has {gpus:g} GPU(s). Set resources.{p.stage.name}.num_gpus=0 (CPU) "
                                f"or run on a cluster with GPUs.")
        if r.num_cpus * n > cpus:
            raise ResourceError(f"stage {p.stage.name!r} asks for {r.num_cpus:g} CPU(s) x {n} worker(s), but the "
                                f"Ray cluster has {cpus:g} CPU(s). Lower resources.{p.stage.name}.num_cpus.")
    actor_cpus = sum(p.resources.num_cpus * (p.resources.concurrency if isinstance(p.resources.concurrency, int)
                                             else (p.resources.concurrency or (1, 1))[0])
                     for p in plans if p.stage.uses_model)
    task_cpus = max((p.resources.num_cpus for p in plans if not p.stage.uses_model), default=0)
    if actor_cpus + task_cpus > cpus:
        raise ResourceError(f"model stages reserve {actor_cpus:g} CPU(s) and tasks need {task_cpus:g} more, but the "
                            f"cluster has {cpus:g}: the pipeline would stall. Lower resources.<stage>.num_cpus.")


def _pool_size(r: StageResources, cluster: dict) -> tuple[int, int]:
    if isinstance(r.concurrency, int):
        return r.concurrency, r.concurrency
    if r.concurrency is not None:
        return r.concurrency
    if r.num_gpus > 0:
        n = max(1, int(cluster.get("GPU", 0) // r.num_gpus))
        return 1, n
    return 1, 1


def run_ray(specs: pa.Table, plans: list[StagePlan], address: str | None = None,
            progress: bool = True) -> Iterator[pa.Table]:
    """Run the stages as one streaming Ray Data job.

    Args:
        specs: one row per shard (see :mod:`capfilt.stages.read`); each becomes one block.
        plans: stages in order, the last one being the writer.
        address: Ray address (``auto``, ``ray://host:10001``) or ``None`` for ``RAY_ADDRESS``/local.
        progress: show Ray Data's progress bars.

    Yields:
        The writer's small stats tables as shards are committed (no image data reaches the driver).

    Raises:
        ResourceError: stage resources that the cluster cannot provide.
    """
    cluster = init_ray(address)
    check_resources(plans, cluster)
    import ray
    from ray.data import ActorPoolStrategy

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = progress
    ctx.target_max_block_size = 1 << 30  # keep a shard one block (images ~40 KB x rows_per_shard)
    ctx.execution_options.verbose_progress = False

    if specs.num_rows == 0:
        return
    # one block per shard spec, built in the driver (no remote metadata tasks)
    ds = ray.data.from_items(specs.to_pylist(), override_num_blocks=specs.num_rows)
    for p in plans:
        r = p.resources
        common = dict(batch_size=None if p.stage.name != "read" else 1, batch_format="pyarrow",
                      zero_copy_batch=True, num_cpus=r.num_cpus)
        if r.num_gpus:
            common["num_gpus"] = r.num_gpus
        if p.stage.uses_model:
            lo, hi = _pool_size(r, cluster)
            # Ray Data restarts dead actors and retries their tasks by default (max_restarts=-1)
            ds = ds.map_batches(_actor_class(p.stage), compute=ActorPoolStrategy(min_size=lo, max_size=hi),
                                **common)
        else:
            # max_calls=0 (unlimited worker reuse, Ray's default for CPU tasks) is set explicitly so that
            # Ray Data never fuses a task stage into the next model actor: downloads must scale on
            # their own, not inside the captioner's actor pool.
            ds = ds.map_batches(_task_fn(p.stage), max_calls=0, **common)
    yield from ds.iter_batches(batch_size=None, batch_format="pyarrow")
