"""The training loop shared by single-process runs and Ray Train workers.

``train(recipe, data, output)`` builds the task, the streaming data loader and AdamW with a
cosine-after-warm-up schedule, then runs ``recipe.train.max_steps`` optimizer steps of
``grad_accum`` micro-batches each (bf16 autocast on CUDA only). Under ``torch.distributed``
(Ray Train's ``TorchTrainer``) the task is wrapped in ``DistributedDataParallel``; rank ``r``
reads its own slice of the data (:mod:`capfilt.train.data`) and rank 0 writes logs and checkpoints.

Output folder (local or a shared filesystem)::

    OUTPUT/recipe.json                      the resolved recipe (compared on resume)
    OUTPUT/train_log.jsonl                  one JSON object per logged step
    OUTPUT/checkpoints/step-00000020/       <component>/ (save_pretrained + processor),
                                            extras.safetensors, trainer_state.pt (written last)
    OUTPUT/final/<component>/               the trained model(s) in Hugging Face format
    OUTPUT/final/preset.yaml                a capfilt model preset using them (capfilt run --models)

Resume (the default): the newest complete checkpoint is loaded: weights, AdamW state, scheduler,
RNG states of every rank (dropout, ITM negative sampling), the data position of every
DataLoader worker of every rank and which worker delivers the next batch, so the continued run
computes the same losses as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from capfilt.config import ConfigError
from capfilt.errors import CapfiltError, one_line, shorten
from capfilt.train.config import TrainRecipe
from capfilt.train.data import ImageTransform, StreamingDataset, open_source
from capfilt.train.builders import build_task
from capfilt.train.task import TrainTask

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.pt"
LOG_FILE = "train_log.jsonl"


@dataclass
class TrainResult:
    """What :func:`train` did.

    Attributes:
        output: the output folder.
        step: the last completed optimizer step.
        final: ``OUTPUT/final`` when the run reached ``max_steps``, else ``None``.
        checkpoint: the newest checkpoint folder written or loaded.
        resumed_from: step the run resumed from (``None``: fresh start).
        history: the logged metric rows of this invocation (``step``, ``loss``, one key per objective, ``lr``, ...).
        preset: ``OUTPUT/final/preset.yaml`` if written.
    """

    output: Path
    step: int
    final: Path | None
    checkpoint: Path | None
    resumed_from: int | None
    history: list[dict[str, Any]] = field(default_factory=list)
    preset: Path | None = None


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
def _dist() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _barrier() -> None:
    if _dist()[1] > 1:
        torch.distributed.barrier()


def _gather(obj: Any) -> list[Any]:
    if _dist()[1] == 1:
        return [obj]
    out: list[Any] = [None] * _dist()[1]
    torch.distributed.all_gather_object(out, obj)
    return out


def _device(setting: str, device: torch.device | str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    if setting == "cuda" or (setting == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def param_groups(task: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay for >= 2-D trainable tensors, none for biases/norms/temperature (LAVIS).

    Shared (tied) parameters appear once; frozen ones (``requires_grad=False``) not at all.
    """
    decay, no_decay = [], []
    for _, p in task.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_scheduler(opt: torch.optim.Optimizer, recipe: TrainRecipe) -> Any:
    """``transformers.get_cosine_schedule_with_warmup`` (or constant after warm-up) over ``max_steps``."""
    from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

    o = recipe.optim
    if o.schedule == "constant":
        return get_constant_schedule_with_warmup(opt, o.warmup_steps)
    return get_cosine_schedule_with_warmup(opt, o.warmup_steps, recipe.train.max_steps)


def _rng_state() -> dict[str, Any]:
    st = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict[str, Any]) -> None:
    torch.set_rng_state(st["torch"])
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


class CheckpointError(CapfiltError):
    """A trainer checkpoint cannot be loaded safely (it holds something other than tensors and plain data)."""


def load_trainer_state(path: Path) -> dict[str, Any]:
    """Read a ``trainer_state.pt`` with torch's weights-only unpickler (no code runs while loading).

    The file holds only tensors, dicts, lists, tuples and numbers/strings (step, AdamW and scheduler
    state, RNG states, data positions), which ``torch.load(weights_only=True)`` accepts; any other
    pickled object (a class, a function, an ``os.system`` call smuggled in via ``__reduce__``) is
    refused before it is constructed, so a writable shared output folder cannot run code on resume.

    Args:
        path: the ``trainer_state.pt`` file.

    Returns:
        the state dict written by the trainer.

    Raises:
        CheckpointError: the file holds anything but plain data, or is not a torch file; the message
            names the file and what to do.
    """
    import pickle

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(
            f"refusing to load trainer checkpoint {path}: it is not plain tensors/numbers that capfilt's trainer "
            f"writes, so it was not unpickled (loading it could run code). Detail: {shorten(one_line(e), 300)}. "
            f"Delete that checkpoint folder (training resumes from an older one, or starts again with "
            f"--overwrite) if you did not write it yourself.") from None
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"trainer checkpoint {path} has no 'step': not written by capfilt's trainer; delete "
                              f"that checkpoint folder or start again with --overwrite")
    return state


def _step_dir(root: Path, step: int) -> Path:
    return root / "checkpoints" / f"step-{step:08d}"


def latest_checkpoint(output: Path) -> Path | None:
    """Newest ``OUTPUT/checkpoints/step-*`` with its ``trainer_state.pt`` (the commit marker), or ``None``."""
    root = output / "checkpoints"
    if not root.is_dir():
        return None
    done = sorted(p for p in root.glob("step-*") if (p / STATE_FILE).is_file())
    return done[-1] if done else None


def _batch_to(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def _fmt(row: dict[str, Any], objectives: tuple[str, ...], max_steps: int) -> str:
    parts = [f"step {row['step']}/{max_steps}", f"loss {row['loss']:.4f}"]
    parts += [f"{o} {row[o]:.4f}" for o in objectives if o in row]
    parts += [f"lr {row['lr']:.2e}", f"epoch {row['epoch']}", f"{row['samples_per_s']:.1f} samples/s"]
    return "  ".join(parts)


def write_preset(recipe: TrainRecipe, final: Path, components: dict[str, str]) -> Path | None:
    """Write ``final/preset.yaml``: the trained components plus the recipe's base ``preset`` for the rest.

    Args:
        recipe: the training recipe (``preset`` names the base preset, ``kind`` the model family).
        final: the final checkpoint folder.
        components: ``{"captioner" | "filter": folder}`` of the trained models.

    Returns:
        The preset path, or ``None`` when a role (captioner/filter) has no model (no base preset),
        or for a BLIP-2 stage-1 Q-Former (capfilt's filter stage scores with BLIP filters only).
    """
    import yaml

    from capfilt.config import ModelPreset, load_preset
    from capfilt.modeling.loading import resolve_model

    kind = "blip2" if recipe.task == "blip2" else "blip"
    if kind == "blip2" and "filter" in components:
        log.info("no preset.yaml: capfilt's scorer reads BLIP filters; a BLIP-2 stage-1 Q-Former is the "
                 "starting point of stage 2 (model.qformer_from=%s)", components["filter"])
        return None
    specs: dict[str, dict[str, Any]] = {role: {"id": str(Path(p).resolve()), "kind": kind}
                                        for role, p in components.items()}
    if recipe.preset:
        base = load_preset(recipe.preset)
        for role in ("captioner", "filter", "clip"):
            spec = getattr(base, role)
            if role in specs or spec is None:
                continue
            d = spec.model_dump(mode="json", exclude_none=True)
            d["id"] = resolve_model(spec, base)
            specs[role] = d
    if "captioner" not in specs or "filter" not in specs:
        log.info("no preset.yaml: the recipe has no base preset for the untrained role")
        return None
    data = {"name": f"{recipe.name}-trained",
            "description": f"models trained by capfilt train ({recipe.name}) in {final.parent}", **specs}
    ModelPreset.model_validate(data)
    path = final / "preset.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# ------------------------------------------------------------------------------------------------
# the loop
# ------------------------------------------------------------------------------------------------
def train(recipe: TrainRecipe, data: str | Sequence[str], output: str | Path, *, images: str | None = None,
          stop_after: int | None = None, resume: bool = True, overwrite: bool = False,
          device: torch.device | str | None = None, echo: Callable[[str], None] | None = print) -> TrainResult:
    """Train ``recipe`` on ``data`` into ``output`` (module docstring for the layout).

    Args:
        recipe: a :class:`~capfilt.train.config.TrainRecipe`.
        data: capfilt output folder / shard or COCO ``captions_*.json`` (local or URI), or a list
            of them read as one dataset (:class:`~capfilt.train.data.ConcatSource`).
        output: local (or shared) folder for logs and checkpoints.
        images: COCO image folder (overrides ``recipe.data.images``).
        stop_after: stop once this step is done, writing a checkpoint (the schedule still spans
            ``max_steps``; a later call resumes). ``None``: run to ``max_steps``.
        resume: continue from the newest checkpoint in ``output`` if there is one.
        overwrite: delete an earlier run in ``output`` first (otherwise a different recipe there
            is an error).
        device: force a device (Ray Train passes the worker's); default from ``recipe.train.device``.
        echo: where metric lines go on rank 0 (``None``: nowhere; the JSONL log is always written).

    Returns:
        :class:`TrainResult`.

    Raises:
        ConfigError: ``output`` holds a run of another recipe, or the data has fewer usable rows
            than data-loading consumers, or a checkpoint was written with another world size.
        capfilt.errors.InputError: the data cannot be read.
        capfilt.errors.ModelLoadError: a checkpoint cannot be loaded.
    """
    tr = recipe.train
    dev = _device(tr.device, device)
    threads = torch.get_num_threads()
    if tr.cpu_threads and dev.type == "cpu":
        torch.set_num_threads(tr.cpu_threads)
    try:
        return _train(recipe, data, Path(output), dev, images, stop_after, resume, overwrite, echo)
    finally:
        torch.set_num_threads(threads)


def _train(recipe: TrainRecipe, data: str | Sequence[str], out: Path, dev: torch.device, images: str | None,
           stop_after: int | None, resume: bool, overwrite: bool, echo: Callable[[str], None] | None) -> TrainResult:
    rank, world = _dist()
    tr, dc = recipe.train, recipe.data
    from capfilt.train.preflight import preflight_recipe

    preflight_recipe(recipe)  # no network: fail in seconds, not after minutes of Hub retries
    if recipe.preset:
        from capfilt.config import load_preset

        load_preset(recipe.preset)  # a bad base preset fails now, not after training
    fingerprint = recipe.fingerprint()
    if rank == 0:
        _prepare_output(out, recipe, fingerprint, overwrite)
    _barrier()

    ckpt = latest_checkpoint(out) if resume else None
    state: dict[str, Any] | None = None
    if ckpt is not None:
        state = load_trainer_state(ckpt / STATE_FILE)
        if state["world_size"] != world:
            raise ConfigError(f"{ckpt} was written by {state['world_size']} training process(es), this run has "
                              f"{world}; resume with the same number (data positions are per process)")

    task = build_task(recipe)
    if ckpt is not None:
        task.load(ckpt)
    task.to(dev)
    opt = torch.optim.AdamW(param_groups(task, recipe.optim.weight_decay), lr=recipe.optim.lr,
                            betas=recipe.optim.betas, eps=recipe.optim.eps)
    sched = make_scheduler(opt, recipe)
    start_step, positions, batches_done = 0, {}, 0
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start_step = int(state["step"])
        positions = {int(k): int(v) for k, v in state["positions"].items()}
        batches_done = int(state["batches"][rank])
        _set_rng_state(state["rng"][rank])
        if rank == 0:
            _truncate_log(out / LOG_FILE, start_step)
    else:
        torch.manual_seed(tr.seed + rank)
        random.seed(tr.seed + rank)

    model: torch.nn.Module = task
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(task, device_ids=[dev.index] if dev.type == "cuda" else None)

    workers = dc.num_workers
    source = open_source(data, dc.format, images or dc.images, dc.rows_per_unit)
    dataset = StreamingDataset(source, ImageTransform(task.image_processor), seed=tr.seed,
                               shuffle_buffer=dc.shuffle_buffer, text_top_k=dc.text_top_k, max_words=dc.max_words,
                               rank=rank, world_size=world, start_positions=positions,
                               worker_offset=batches_done % max(workers, 1))
    consumers = world * max(workers, 1)
    if dataset.num_rows < consumers:
        raise ConfigError(f"{dataset.num_rows} usable rows cannot feed {consumers} data-loading consumers "
                          f"({world} process(es) x {max(workers, 1)} worker(s)); lower data.num_workers")
    loader = DataLoader(dataset, batch_size=tr.batch_size, num_workers=workers, collate_fn=task.collator(),
                        pin_memory=dev.type == "cuda", generator=torch.Generator().manual_seed(tr.seed),
                        prefetch_factor=2 if workers > 0 else None, persistent_workers=False)
    if rank == 0 and echo:
        echo(f"{recipe.name}: {source.describe()}; {world} process(es) x {max(workers, 1)} loader worker(s), "
             f"device {dev}, {'resuming at step ' + str(start_step) if state else 'fresh start'}")

    history: list[dict[str, Any]] = []
    last_ckpt = ckpt
    end = min(tr.max_steps, stop_after) if stop_after is not None else tr.max_steps
    use_bf16 = tr.bf16 and dev.type == "cuda"
    objectives = task.objectives
    it = iter(loader) if start_step < end else None
    model.train()
    t0, samples = time.perf_counter(), 0
    step = start_step
    epoch = 0
    try:
        while step < end:
            step += 1
            sums: dict[str, float] = {}
            for micro in range(tr.grad_accum):
                batch = next(it)
                batches_done += 1
                for c, p in zip(batch["consumer"].tolist(), batch["position"].tolist()):
                    positions[c] = max(positions.get(c, 0), p + 1)
                epoch = max(epoch, int(batch["epoch"].max()))
                samples += len(batch["texts"])
                batch = _batch_to(batch, dev)
                sync = micro == tr.grad_accum - 1 or world == 1
                ctx = model.no_sync() if (not sync and world > 1) else contextlib.nullcontext()
                with ctx, torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=use_bf16):
                    losses = model(batch)
                    (losses["loss"] / tr.grad_accum).backward()
                for k, v in losses.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach()) / tr.grad_accum
            if recipe.optim.max_grad_norm:
                torch.nn.utils.clip_grad_norm_([p for p in task.parameters() if p.requires_grad],
                                               recipe.optim.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            if world > 1:
                sums = _mean_over_ranks(sums, dev)
            if any(not math.isfinite(v) for v in sums.values()):
                raise FloatingPointError(f"non-finite loss at step {step}: {sums}")
            if step % tr.log_every == 0 or step in (start_step + 1, end):
                elapsed = time.perf_counter() - t0
                row = {"step": step, **{k: round(v, 6) for k, v in sums.items()},
                       "lr": sched.get_last_lr()[0], "epoch": epoch,
                       "samples_per_s": samples * world / max(elapsed, 1e-9), "elapsed_s": round(elapsed, 3)}
                history.append(row)
                if rank == 0:
                    with open(out / LOG_FILE, "a") as f:
                        f.write(json.dumps(row) + "\n")
                    if echo:
                        echo(_fmt(row, objectives, tr.max_steps))
            if (tr.save_every and step % tr.save_every == 0) or step == end:
                last_ckpt = _save_checkpoint(out, step, task, opt, sched, positions, batches_done, fingerprint,
                                             tr.keep_checkpoints)
    finally:
        del it  # stop the loader workers

    final = preset = None
    if step >= tr.max_steps:
        final = out / "final"
        done = step == start_step and all((final / n / "config.json").is_file() for n in task.components)
        if rank == 0 and not done:
            if final.exists():
                shutil.rmtree(final)
            folders = task.save(final)
            preset = write_preset(recipe, final, {p.name: str(p) for p in folders
                                                  if p.name in ("captioner", "filter")})
            if echo:
                echo(f"trained model(s) in {final}: {', '.join(p.name for p in folders)}"
                     + (f"; use them with: capfilt run --models {preset}" if preset else ""))
        elif done and (final / "preset.yaml").is_file():
            preset = final / "preset.yaml"
        _barrier()
    return TrainResult(output=out, step=step, final=final, checkpoint=last_ckpt,
                       resumed_from=start_step if state is not None else None, history=history, preset=preset)


def _mean_over_ranks(sums: dict[str, float], dev: torch.device) -> dict[str, float]:
    keys = sorted(sums)
    t = torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=dev)
    torch.distributed.all_reduce(t)
    t /= _dist()[1]
    return dict(zip(keys, t.tolist()))


def _prepare_output(out: Path, recipe: TrainRecipe, fingerprint: dict[str, Any], overwrite: bool) -> None:
    rec = out / "recipe.json"
    if overwrite and out.exists():
        for name in ("checkpoints", "final", LOG_FILE, "recipe.json"):
            p = out / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    if rec.is_file():
        old = json.loads(rec.read_text()).get("fingerprint")
        if old != json.loads(json.dumps(fingerprint)):
            diff = sorted(k for k in set(old or {}) | set(fingerprint) if (old or {}).get(k) != fingerprint.get(k))
            raise ConfigError(f"{out} holds a training run of another recipe (differs in: {', '.join(diff)}); "
                              f"use another --output or --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    rec.write_text(json.dumps({"recipe": recipe.model_dump(mode="json"), "fingerprint": fingerprint}, indent=2))


def _truncate_log(path: Path, step: int) -> None:
    """Drop log rows after ``step`` (written after the checkpoint a resumed run starts from)."""
    if not path.is_file():
        return
    rows = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
    path.write_text("".join(r + "\n" for r in rows))


def _save_checkpoint(out: Path, step: int, task: TrainTask, opt: Any, sched: Any, positions: dict[int, int],
                     batches: int, fingerprint: dict[str, Any], keep: int) -> Path:
    """Gather per-rank state, write ``checkpoints/step-N`` atomically on rank 0, prune old ones."""
    rank, world = _dist()
    gathered = _gather({"rng": _rng_state(), "positions": positions, "batches": batches})
    final = _step_dir(out, step)
    if rank == 0:
        tmp = final.parent / f".tmp-{final.name}"
        if tmp.exists():
            shutil.rmtree(tmp)
        task.save(tmp)
        merged: dict[int, int] = {}
        for g in gathered:
            merged.update(g["positions"])
        state = {"step": step, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                 "rng": [g["rng"] for g in gathered], "positions": merged,
                 "batches": [g["batches"] for g in gathered], "world_size": world, "fingerprint": fingerprint}
        torch.save(state, tmp / STATE_FILE)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        done = sorted(p for p in final.parent.glob("step-*") if (p / STATE_FILE).is_file())
        for old in done[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final
