"""Multi-GPU / multi-node training: the same loop under Ray Train's ``TorchTrainer``.

Ray starts ``num_workers`` training processes, sets up ``torch.distributed`` (NCCL on GPUs, gloo
on CPUs) and runs :func:`capfilt.train.loop.train` in each; the loop wraps the task in
``DistributedDataParallel``, each rank streams its own slice of the data, and rank 0 writes logs
and checkpoints. ``output`` must therefore be a folder every worker can reach (local disk on one
machine, a shared filesystem on a cluster); resume works as for a single process, with the same
number of workers.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from capfilt.train.config import TrainRecipe
from capfilt.train.loop import TrainResult


def _worker_loop(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    from capfilt.train.loop import train

    res = train(config["recipe"], config["data"], config["output"], images=config["images"],
                stop_after=config["stop_after"], resume=config["resume"], overwrite=config["overwrite"],
                device=ray.train.torch.get_device())
    last = res.history[-1] if res.history else {}
    ray.train.report({"step": res.step, **{k: v for k, v in last.items() if isinstance(v, (int, float))}})


def train_with_ray(recipe: TrainRecipe, data: str, output: str | Path, *, num_workers: int = 2,
                   use_gpu: bool = False, cpus_per_worker: float = 1.0, images: str | None = None,
                   stop_after: int | None = None, resume: bool = True, overwrite: bool = False,
                   ray_address: str | None = None) -> TrainResult:
    """Run :func:`capfilt.train.loop.train` on ``num_workers`` Ray Train workers.

    Args:
        recipe / data / output / images / stop_after / resume / overwrite: as for
            :func:`capfilt.train.loop.train` (``output`` must be reachable from every worker).
        num_workers: training processes (one per GPU with ``use_gpu``).
        use_gpu: one GPU per worker (NCCL); otherwise CPU workers (gloo).
        cpus_per_worker: CPUs reserved per worker (fractions let 2 workers share a 2-core machine;
            DataLoader worker processes are not counted by Ray).
        ray_address: ``auto`` / ``ray://...`` to join a cluster; default: an existing
            ``ray.init`` or ``RAY_ADDRESS``, else a local Ray.

    Returns:
        A :class:`TrainResult` read back from the output folder (newest checkpoint, this
        invocation's rows of ``OUTPUT/train_log.jsonl``).

    Raises:
        ray.train.TrainingFailedError: a worker raised (its exception is the cause).
    """
    import json

    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if ray_address is None and not os.environ.get("RAY_ADDRESS"):
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private local Ray (as capfilt's runner does)
    from capfilt.train.preflight import preflight_recipe

    preflight_recipe(recipe)  # before Ray starts: fail in seconds without a network
    if not ray.is_initialized():
        ray.init(address=ray_address, ignore_reinit_error=True, log_to_driver=True)

    from capfilt.train.loop import STATE_FILE, latest_checkpoint, load_trainer_state

    out = Path(output).resolve()
    before = latest_checkpoint(out) if resume and not overwrite else None
    resumed = int(load_trainer_state(before / STATE_FILE)["step"]) if before is not None else None
    cfg = {"recipe": recipe, "data": data, "output": str(out), "images": images, "stop_after": stop_after,
           "resume": resume, "overwrite": overwrite}
    trainer = TorchTrainer(
        _worker_loop, train_loop_config=cfg,
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cpus_per_worker, **({"GPU": 1} if use_gpu else {})}),
        run_config=RunConfig(name=f"capfilt-train-{recipe.name}", storage_path=str(out / "ray")))
    trainer.fit()
    ckpt = latest_checkpoint(out)
    step = int(load_trainer_state(ckpt / STATE_FILE)["step"]) if ckpt is not None else 0
    log = out / "train_log.jsonl"
    history = [r for r in (json.loads(x) for x in log.read_text().splitlines() if x.strip())
               if r["step"] > (resumed or 0)] if log.is_file() else []
    final = out / "final" if step >= recipe.train.max_steps and (out / "final").is_dir() else None
    preset = final / "preset.yaml" if final is not None and (final / "preset.yaml").is_file() else None
    return TrainResult(output=out, step=step, final=final, checkpoint=ckpt, resumed_from=resumed,
                       history=history, preset=preset)
