"""Executors: where stages run. The only module that imports Ray.

:func:`run_ray` maps each stage onto Ray Data ``map_batches`` by its declared
:data:`capfilt.stages.base.Shape`: ``actor_pool`` stages become actor pools (one model load per
actor), ``single_actor`` one actor, the others plain tasks, each with the CPUs/GPUs and
concurrency of its :class:`capfilt.config.StageResources`. One input block is one spec: a whole
shard, or one streaming block of it (``output.block_rows`` rows, :func:`capfilt.stages.read.stream_blocks`);
a ``fanout`` stage takes one spec at a time and every other stage a whole block
(``batch_size=None``; model stages micro-batch inside), so download, caption and score overlap on
the blocks of one shard and the ``sink`` commits the shard whole when its last block arrives.
Model actors get torch threads by :func:`actor_threads`. Nothing here knows a stage by name.

:func:`run_local` (:mod:`capfilt.local_runner`) runs the same stages in this
process, a thread per stage, for small runs, model-free recipes (``refilter``) and debugging.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from capfilt.config import StageResources
from capfilt.errors import CapfiltError
from capfilt.local_runner import counted_call
from capfilt.stages.base import ACTOR_SHAPES, Stage

log = logging.getLogger(__name__)


@dataclass
class StagePlan:
    """A stage and the Ray resources it runs with."""

    stage: Stage
    resources: StageResources


class ResourceError(CapfiltError):
    """A stage asks for resources the Ray cluster does not have (raised before any work)."""


def set_torch_threads(threads: int) -> int:
    """Give torch (and OpenMP/MKL in this process) ``threads`` intra-op threads; return the count.

    Ray starts a worker of a fractional-CPU actor with ``OMP_NUM_THREADS=1``, and torch reads it
    at import: without this call a model actor computes on one core whatever the machine has.
    Does nothing (returns 0) when torch is not installed.
    """
    os.environ["OMP_NUM_THREADS"] = str(threads)  # for libraries that read it later (onnxruntime)
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency; a stage without models needs none
        return 0
    torch.set_num_threads(threads)
    return torch.get_num_threads()


def actor_threads(plan: StagePlan, plans: list[StagePlan], node_cpus: int) -> int:
    """Torch threads of one actor of ``plan``'s stage: ``resources.threads``, or the ``auto`` rule.

    ``auto``: the node's cores shared among the actor pools that run at the same time, in
    proportion to their ``num_cpus``, rounded, never fewer than the CPUs Ray reserves for the
    actor (rounded up) nor than 1. On a 2-core laptop the captioner and the scorer (0.5 CPU each)
    get one core each, which they use concurrently because blocks stream (``output.block_rows``);
    a model running alone gets every core.

    Args:
        plan: the actor-pool stage and its resources.
        plans: every stage of the run (the other actor pools share the node).
        node_cpus: cores of the node (of the largest node on a cluster).
    """
    r = plan.resources
    if r.threads != "auto":
        return int(r.threads)
    pools = [p for p in plans if p.stage.shape == "actor_pool"]
    weight = sum(max(p.resources.num_cpus, 1e-3) * _min_workers(p.resources) for p in pools) or 1.0
    share = node_cpus * max(r.num_cpus, 1e-3) / weight
    return max(1, math.ceil(r.num_cpus), int(round(share)))


class StageCounter:
    """Rows that entered (``started``) and left (``done``) each stage so far, for the progress lines.

    Thread-safe. The same class counts in this process (``--executor local``) and, wrapped by
    ``ray.remote``, as one small named actor (no CPU) that the Ray stage wrappers report to.
    """

    def __init__(self) -> None:
        import threading

        self._lock = threading.Lock()
        self._counts: dict[str, list[int]] = {}

    def add(self, stage: str, started: int, done: int) -> None:
        """Count ``started`` rows entering and ``done`` rows leaving ``stage`` (either may be 0)."""
        with self._lock:
            c = self._counts.setdefault(stage, [0, 0])
            c[0] += started
            c[1] += done

    def snapshot(self) -> dict[str, tuple[int, int]]:
        """``{stage name: (rows started, rows done)}`` now."""
        with self._lock:
            return {k: (v[0], v[1]) for k, v in self._counts.items()}


#: Per worker process: counter actor handles by name.
_COUNTER_HANDLES: dict[str, Any] = {}


def _ray_reporter(name: str | None) -> Any:
    """In a Ray worker: a ``report(stage, started, done)`` that sends to the counter actor ``name``."""
    if name is None:
        return None

    def report(stage: str, started: int, done: int) -> None:
        """Fire-and-forget one count to the driver's counter actor."""
        import ray

        h = _COUNTER_HANDLES.get(name)
        if h is None:
            h = _COUNTER_HANDLES[name] = ray.get_actor(name)
        h.add.remote(stage, started, done)

    return report


class RayStageCounter:
    """Driver side of the Ray stage counter: the actor, its snapshot, and its end.

    Args:
        name: the actor's name (unique per run).
    """

    def __init__(self, name: str):
        import ray

        self.name = name
        self.actor = ray.remote(num_cpus=0, max_restarts=0)(StageCounter).options(name=name).remote()

    def snapshot(self) -> dict[str, tuple[int, int]]:
        """``{stage: (started, done)}``; empty when the actor cannot answer within 5 s."""
        import ray

        try:
            return ray.get(self.actor.snapshot.remote(), timeout=5)
        except Exception as e:  # noqa: BLE001 - Ray shut down, actor lost: no stage line this time
            log.debug("stage counter unavailable: %s", e)
            return {}

    def close(self) -> None:
        """Stop the actor (stage wrappers still reporting to it lose their counts, harmlessly)."""
        import ray

        try:
            ray.kill(self.actor)
        except Exception:  # noqa: BLE001 - Ray already shut down
            pass


def stage_counter(executor: str) -> StageCounter | RayStageCounter:
    """A per-stage row counter for one run: in process (``local``) or a named Ray actor (``ray``, Ray
    already initialised); :func:`run_ray` given its ``name`` makes the stage wrappers report to it.

    Returns:
        An object with ``snapshot() -> {stage: (rows started, rows done)}``.
    """
    if executor != "ray":
        return StageCounter()
    import uuid

    return RayStageCounter(f"capfilt-stage-counter-{uuid.uuid4().hex[:12]}")


def _actor_class(stage: Stage, threads: int | None = None, counter: str | None = None) -> type:
    """A Ray Data actor class for ``stage``: set up once per actor, then called per block.

    The stage travels inside the class definition rather than as a constructor argument in the
    object store, so restarted actors (Ray restarts dead actors by default) can always rebuild it.
    ``threads``: torch threads of the actor (:func:`set_torch_threads`), set before ``setup``;
    ``counter``: name of the run's :class:`RayStageCounter` actor (``None``: no per-stage counts).
    """

    class _ActorStage:
        def __init__(self):
            if threads:
                set_torch_threads(threads)
            self.stage = stage
            self.stage.setup()
            self.report = _ray_reporter(counter)

        def __call__(self, batch: pa.Table) -> pa.Table:
            return counted_call(self.stage, batch, self.report)

    _ActorStage.__name__ = _ActorStage.__qualname__ = "".join(w.capitalize() for w in stage.name.split("_")) + "Actor"
    return _ActorStage


def _task_fn(stage: Stage, counter: str | None = None):

    def fn(batch: pa.Table) -> pa.Table:
        """Run the task stage on one block (setup is idempotent and cheap)."""
        stage.setup()  # task stages keep setup idempotent and cheap
        return counted_call(stage, batch, _ray_reporter(counter))

    fn.__name__ = f"{stage.name}"
    return fn


#: Environment variables that every Ray worker of a run must see as the driver does: model caches
#: and offline mode, and object-storage credentials/endpoints from "the usual environment" (AWS
#: SDK variables; ``GOOGLE_APPLICATION_CREDENTIALS`` names a file that must exist on every node).
#: They travel in the job's runtime environment, which Ray stores in its GCS and shows in the
#: dashboard: on shared clusters prefer node-level credentials (instance roles, Kubernetes
#: service accounts, a mounted secret) and leave these unset in the driver.
FORWARDED_ENV = ("NO_ALBUMENTATIONS_UPDATE", "HF_HUB_OFFLINE", "HF_HOME", "HF_TOKEN", "CAPFILT_CACHE",
                 "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL",
                 "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE",
                 "GOOGLE_APPLICATION_CREDENTIALS")


def forwarded_env() -> dict[str, str]:
    """The :data:`FORWARDED_ENV` variables set in this process (name -> value)."""
    return {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}


def _job_env_vars() -> dict[str, str]:
    """``env_vars`` of the runtime env that ``ray job submit`` gave this driver (empty outside a job).

    Ray refuses ``ray.init(runtime_env=...)`` in a submitted job when it repeats one of the job's
    env var names (``_merge_runtime_env`` treats it as a conflict), so those are not passed again.
    """
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return {}
    try:
        env = (json.loads(raw).get("runtime_env") or {}).get("env_vars") or {}
    except (ValueError, AttributeError):
        return {}
    return dict(env)


def init_ray(address: str | None) -> dict:
    """Connect to ``address`` (or ``RAY_ADDRESS``), or start a local Ray sized to this machine.

    Inside ``ray job submit`` the job's own ``RAY_ADDRESS`` is used. Only a local Ray defaults to
    ``RAY_AUTH_MODE=disabled``; clusters with token authentication need ``RAY_AUTH_MODE=token``
    and ``RAY_AUTH_TOKEN`` in this process's environment. The :data:`FORWARDED_ENV`
    variables of this process go into the job's runtime env (except those the submitted job
    already sets), so workers on every node see them.

    Returns:
        ``ray.cluster_resources()`` (``{"CPU": 2.0, "GPU": ..., ...}``).
    """
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    address = address or os.environ.get("RAY_ADDRESS") or None
    if not address:
        # a private local Ray needs no token; an existing cluster keeps its own auth mode
        # (RAY_AUTH_MODE=token + RAY_AUTH_TOKEN, or Ray's auto-detection of ~/.ray/auth_token)
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    if not ray.is_initialized():
        job_env = _job_env_vars()
        env_vars = {k: v for k, v in forwarded_env().items() if k not in job_env}
        kwargs = dict(ignore_reinit_error=True, include_dashboard=False, logging_level=logging.WARNING,
                      runtime_env={"env_vars": env_vars} if env_vars else None)
        # ray.init installs its own SIGTERM handler (it logs and exits 15); keep the caller's, so that
        # `capfilt run` stops on SIGTERM like on Ctrl-C (run record updated, Ray shut down)
        import signal
        import threading

        main = threading.current_thread() is threading.main_thread()
        sigterm = signal.getsignal(signal.SIGTERM) if main else None
        _init_with_retries(ray, address, kwargs)
        if main and callable(sigterm):
            signal.signal(signal.SIGTERM, sigterm)
    return ray.cluster_resources()


#: Attempts to start (or join) Ray before giving up, and the pause before each retry, seconds.
STARTUP_ATTEMPTS = 3
STARTUP_BACKOFF_S = (2.0, 5.0)


class ExecutorError(CapfiltError):
    """Ray could not be started or joined (raised before the output folder is touched)."""


def _init_with_retries(ray: Any, address: str | None, kwargs: dict[str, Any]) -> None:
    """``ray.init`` with retries and back-off; one readable paragraph when it keeps failing.

    A local Ray on a busy machine sometimes misses its own 30 s start-up window ("The current
    node timed out during startup"); a second try usually succeeds once the load passes.

    Raises:
        ExecutorError: every attempt failed; names the last error and what to do.
    """
    from capfilt.errors import one_line, shorten

    last: BaseException | None = None
    for attempt in range(STARTUP_ATTEMPTS):
        try:
            if address:
                ray.init(address=address, **kwargs)
            else:
                # "local": a private Ray even when one already runs on this machine (ray.init() would
                # join that one, and then refuses num_cpus)
                ray.init(address="local", num_cpus=os.cpu_count(), **kwargs)
            return
        except Exception as e:  # Ray raises plain Exception/RuntimeError/ConnectionError here
            last = e
            try:
                ray.shutdown()  # clean up a half-started local node before the next try
            except Exception:  # pragma: no cover - best effort
                pass
            if attempt + 1 < STARTUP_ATTEMPTS:
                pause = STARTUP_BACKOFF_S[min(attempt, len(STARTUP_BACKOFF_S) - 1)]
                log.warning("Ray did not start (%s); retrying in %.0f s (attempt %d of %d)",
                            shorten(one_line(e), 200), pause, attempt + 2, STARTUP_ATTEMPTS)
                time.sleep(pause)
    where = f"join the Ray cluster at {address}" if address else "start a local Ray on this machine"
    advice = ("Check that the cluster is up and the address is right (ray status), or drop --ray-address to "
              "run on a local Ray." if address else
              "This happens when the machine is very busy. Retry when it is less loaded, or run without Ray "
              "with --executor local (in-process), or join a running cluster with --ray-address.")
    raise ExecutorError(f"could not {where} after {STARTUP_ATTEMPTS} attempts (last error: {type(last).__name__}: "
                        f"{shorten(one_line(last), 300)}). Nothing was written to the output. {advice}") from None


def shutdown_local_ray() -> int:
    """Stop the local Ray this process started, and every worker process it had; no-op otherwise.

    ``ray.shutdown()`` stops the raylet, but its worker processes (actors hold a model, ~0.5 GB
    each) notice only later and can linger for a minute or two. So the raylet's descendants are
    listed first and killed (SIGKILL) if they outlive the shutdown. A Ray cluster this process
    only connected to (``--ray-address``, ``ray job submit``) is left alone apart from
    disconnecting.

    Returns:
        Worker processes that had to be killed after the shutdown.
    """
    import signal
    import sys

    if "ray" not in sys.modules:
        return 0
    import ray

    if not ray.is_initialized():
        return 0
    node = getattr(ray._private.worker, "_global_node", None)
    pids: list[int] = []
    if node is not None and node.is_head():
        import psutil

        for info in node.all_processes.get("raylet", []):
            try:
                pids += [c.pid for c in psutil.Process(info.process.pid).children(recursive=True)]
            except (psutil.Error, AttributeError):
                continue
    ray.shutdown()
    killed = 0
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
            killed += 1
        except (ProcessLookupError, PermissionError):
            continue
    return killed


def _stage_env() -> dict[str, str]:
    """Forwarded variables that the current Ray job's runtime env lacks or holds with another value.

    Empty when ``init_ray`` started or joined Ray in this process. Not empty when Ray was already
    initialised (by the caller, or an earlier run in the same process) before, say,
    ``AWS_ENDPOINT_URL`` was set: the stages then carry these variables in their own runtime env.
    """
    import ray

    have = (ray.get_runtime_context().runtime_env or {}).get("env_vars") or {}
    return {k: v for k, v in forwarded_env().items() if have.get(k) != v}


def cluster_shapes() -> tuple[dict[str, float], list[dict[str, float]]]:
    """What the connected cluster can offer: totals and the resources of each node (or node type).

    Totals are the larger of the resources alive now and the autoscaler's maximum (from the
    cluster config a KubeRay/cluster-launcher autoscaler publishes; private Ray API, so any
    failure to read it just means "no autoscaler"). Node shapes are the alive nodes plus the
    autoscaler's node types, so a GPU worker group scaled to zero still counts.
    """
    import ray

    totals = {k: float(v) for k, v in ray.cluster_resources().items()}
    shapes = [{k: float(v) for k, v in n.get("Resources", {}).items()} for n in ray.nodes() if n.get("Alive")]
    try:
        from ray._private.state import state

        maxima = state.get_max_resources_from_cluster_config() or {}
        config = state.get_cluster_config()
        groups = list(config.node_group_configs) if config is not None else []
    except Exception:  # noqa: BLE001 - version-sensitive private API: treat as no autoscaler
        maxima, groups = {}, []
    for k, v in maxima.items():
        totals[k] = max(totals.get(k, 0.0), float(v))
    for g in groups:
        if g.max_count != 0:
            shapes.append({k: float(v) for k, v in g.resources.items()})
    return totals, shapes


def _min_workers(r: StageResources) -> int:
    if isinstance(r.concurrency, int):
        return r.concurrency
    return r.concurrency[0] if r.concurrency else 1


def check_resources(plans: list[StagePlan], cluster: dict, nodes: list[dict] | None = None) -> None:
    """Refuse stage resources the cluster cannot provide, before any work starts.

    Args:
        plans: the stages and their :class:`capfilt.config.StageResources`.
        cluster: total resources (``{"CPU": 8.0, "GPU": 2.0}``), e.g. from :func:`cluster_shapes`.
        nodes: resources of each node or node type; when given, one task/actor of each stage must
            fit on a single node (4 GPUs spread over four 1-GPU nodes do not run a 2-GPU actor).

    Raises:
        ResourceError: naming the stage, the resource asked for and what the cluster has.
    """
    plans = resolve_auto(plans, cluster)
    cpus, gpus = cluster.get("CPU", 0.0), cluster.get("GPU", 0.0)
    for p in plans:
        r, name = p.resources, p.stage.name
        n = _min_workers(r)
        if r.num_gpus * n > gpus:
            raise ResourceError(f"stage {name!r} asks for {r.num_gpus:g} GPU(s) x {n} worker(s), but the "
                                f"Ray cluster has {gpus:g} GPU(s). Set resources.{name}.num_gpus=0 (CPU) "
                                f"or run on a cluster with GPUs.")
        if r.num_cpus * n > cpus:
            raise ResourceError(f"stage {name!r} asks for {r.num_cpus:g} CPU(s) x {n} worker(s), but the "
                                f"Ray cluster has {cpus:g} CPU(s). Lower resources.{name}.num_cpus.")
        if nodes:
            fits = [s for s in nodes if s.get("GPU", 0.0) >= r.num_gpus and s.get("CPU", 0.0) >= r.num_cpus]
            if not fits:
                most_gpu = max(s.get("GPU", 0.0) for s in nodes)
                most_cpu = max(s.get("CPU", 0.0) for s in nodes)
                raise ResourceError(f"stage {name!r} asks for {r.num_cpus:g} CPU(s) and {r.num_gpus:g} GPU(s) per "
                                    f"worker, but no node of the Ray cluster has that much (largest: "
                                    f"{most_cpu:g} CPU(s), {most_gpu:g} GPU(s)). Lower resources.{name}.num_gpus "
                                    f"or resources.{name}.num_cpus.")
    actor_cpus = sum(p.resources.num_cpus * _min_workers(p.resources) for p in plans if _is_actor(p.stage))
    task_cpus = max((p.resources.num_cpus for p in plans if not _is_actor(p.stage)), default=0)
    if actor_cpus + task_cpus > cpus:
        raise ResourceError(f"model stages reserve {actor_cpus:g} CPU(s) and tasks need {task_cpus:g} more, but the "
                            f"cluster has {cpus:g}: the pipeline would stall. Lower resources.<stage>.num_cpus.")


def _is_actor(stage: Stage) -> bool:
    return stage.shape in ACTOR_SHAPES


def _pool_size(r: StageResources, cluster: dict, single: bool = False) -> tuple[int, int]:
    if single:  # a single_actor stage (run-wide state): exactly one actor
        return 1, 1
    if isinstance(r.concurrency, int):
        return r.concurrency, r.concurrency
    if r.concurrency is not None:
        return r.concurrency
    if r.num_gpus > 0:
        n = max(1, int(cluster.get("GPU", 0) // r.num_gpus))
        return 1, n
    return 1, 1


AUTO_GPU_SHARE = 0.5  # num_gpus "auto" on a GPU cluster: two model stages share one device (one alone: all)


def resolve_auto(plans: list[StagePlan], cluster: dict) -> list[StagePlan]:
    """Plans with ``num_gpus: auto`` made concrete: on a cluster with GPUs :data:`AUTO_GPU_SHARE` each
    when several stages say ``auto`` (caption and score share a device), 1 when one does (the
    fused caption_score stage); 0 without GPUs."""
    gpus = cluster.get("GPU", 0.0)
    n_auto = sum(1 for p in plans if p.resources.num_gpus == "auto")
    out = []
    for p in plans:
        if p.resources.num_gpus == "auto":
            share = (AUTO_GPU_SHARE if n_auto > 1 else 1.0) if gpus > 0 else 0.0
            p = StagePlan(p.stage, p.resources.model_copy(update={"num_gpus": share}))
        out.append(p)
    return out


def prepare_ray(plans: list[StagePlan], address: str | None = None) -> list[StagePlan]:
    """Connect to (or start) Ray, resolve ``num_gpus: auto`` and check every stage's resources.

    Called by :func:`capfilt.api.run` before anything is written, and again by :func:`run_ray`.

    Returns:
        The plans with concrete resources.

    Raises:
        ResourceError: a stage asks for resources the cluster cannot provide.
    """
    init_ray(address)
    cluster, nodes = cluster_shapes()
    plans = resolve_auto(plans, cluster)
    check_resources(plans, cluster, nodes)
    return plans


def map_stages(ds: Any, plans: list[StagePlan], cluster: dict, num_shards: int, env: dict[str, str] | None,
               actor_pool: type, task_pool: type, node_cpus: int | None = None, counter: str | None = None) -> Any:
    """Chain one ``ds.map_batches`` per stage, as each stage's shape and resources ask.

    Args:
        ds: a Ray ``Dataset`` of shard specs, one block each (or anything with ``map_batches``).
        plans: stages in order, with concrete resources (:func:`resolve_auto`).
        cluster: total cluster resources (``{"CPU": 8.0, "GPU": 1.0}``) for actor-pool sizes.
        num_shards: shard specs in ``ds``; actor pools never get more actors than that.
        env: environment variables every stage's runtime env must carry (empty: none).
        actor_pool / task_pool: ``ray.data.ActorPoolStrategy`` / ``TaskPoolStrategy`` (or fakes).
        node_cpus: cores of the largest node, for the actors' torch threads (:func:`actor_threads`);
            default: the cluster's CPUs.
        counter: name of the run's :class:`RayStageCounter` actor the stages report rows to.

    Returns:
        The dataset after the last stage.
    """
    node_cpus = max(1, int(node_cpus or cluster.get("CPU", 1)))
    for p in plans:
        r = p.resources
        common: dict[str, Any] = dict(batch_size=1 if p.stage.shape == "fanout" else None, batch_format="pyarrow",
                                      zero_copy_batch=True, num_cpus=r.num_cpus)
        if r.num_gpus:
            common["num_gpus"] = r.num_gpus
        if env:
            common["runtime_env"] = {"env_vars": env}
        if _is_actor(p.stage):
            lo, hi = _pool_size(r, cluster, p.stage.shape == "single_actor")
            hi = min(hi, num_shards)  # never more actors than shards (autoscaler maxima can be huge)
            lo = min(lo, hi)
            # Ray Data restarts dead actors and retries their tasks by default (max_restarts=-1,
            # max_task_retries=-1); tasks are retried after a lost worker too (max_retries=-1).
            threads = actor_threads(p, plans, node_cpus) if p.stage.shape == "actor_pool" else None
            ds = ds.map_batches(_actor_class(p.stage, threads, counter), compute=actor_pool(min_size=lo, max_size=hi),
                                **common)
        else:
            if r.concurrency is not None:  # a cap on parallel tasks; a [min, max] range caps at max
                size = r.concurrency if isinstance(r.concurrency, int) else r.concurrency[1]
                common["compute"] = task_pool(size=size)
            # max_calls=0 (unlimited worker reuse, Ray's default for CPU tasks) is set explicitly so that
            # Ray Data never fuses a task stage into the next model actor: task stages must scale on
            # their own, not inside an actor pool.
            ds = ds.map_batches(_task_fn(p.stage, counter), max_calls=0, **common)
    return ds


def run_ray(specs: pa.Table, plans: list[StagePlan], address: str | None = None,
            progress: bool = True, counter: str | None = None) -> Iterator[pa.Table]:
    """Run the stages as one streaming Ray Data job.

    Args:
        specs: one row per shard or streaming block (the ``fanout`` stage's input); each becomes one block.
        plans: stages in order: a ``fanout`` first, a ``sink`` last.
        address: Ray address (``auto``, ``ray://host:10001``) or ``None`` for ``RAY_ADDRESS``/local.
        progress: show Ray Data's progress bars.
        counter: name of a :class:`RayStageCounter` actor (:func:`stage_counter`) that the stages
            report their rows to, for per-stage progress lines.

    Model stages get an actor pool of ``concurrency`` (``[min, max]`` autoscales; unset: one
    actor, or up to one per ``num_gpus`` share of the cluster's GPUs), never more actors than
    shards; task stages with a ``concurrency`` are capped at that many tasks. Forwarded
    environment variables that the Ray job lacks (Ray started earlier in this process) travel in
    each stage's runtime env.

    Yields:
        The sink's small stats tables (``name, shard_id, rows, stats``) as shards are committed:
        no image data reaches the driver.

    Raises:
        ResourceError: stage resources that the cluster cannot provide (before any work).
    """
    plans = prepare_ray(plans, address)
    cluster, nodes = cluster_shapes()
    node_cpus = int(max((n.get("CPU", 0.0) for n in nodes), default=cluster.get("CPU", 1.0)) or 1)
    import ray
    from ray.data import ActorPoolStrategy, TaskPoolStrategy

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = progress
    if not progress:  # capfilt's own progress lines replace Ray Data's "Total Progress: 0/?" every 10 s
        logging.getLogger("ray.data").setLevel(logging.WARNING)
    ctx.target_max_block_size = 1 << 30  # keep a spec one block (images ~40 KB x rows)
    ctx.execution_options.verbose_progress = False

    if specs.num_rows == 0:
        return
    # one block per shard spec, built in the driver (no remote metadata tasks)
    ds = ray.data.from_items(specs.to_pylist(), override_num_blocks=specs.num_rows)
    ds = map_stages(ds, plans, cluster, specs.num_rows, _stage_env(), ActorPoolStrategy, TaskPoolStrategy,
                    node_cpus, counter)
    yield from ds.iter_batches(batch_size=None, batch_format="pyarrow")
