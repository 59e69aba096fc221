"""``capfilt train blip|blip2|caption|itm``: a thin typer shell over :func:`capfilt.train.loop.train`.

Errors the user can fix (:class:`capfilt.errors.CapfiltError`) print one message and exit 2.
"""

# No ``from __future__ import annotations``: typer evaluates these annotations, which use the
# enclosing function's ``task``.
from typing import Annotated, Optional

import typer
from rich.console import Console

from capfilt.errors import CapfiltError
from capfilt.train.config import DEFAULT_RECIPES

_HELP = {
    "blip": "BLIP pre-training (ITC + ITM with hard negatives + LM, BLIP §3.2) on capfilt output shards.",
    "blip2": "BLIP-2 stage 1 (Q-Former ITC/ITM/ITG over a frozen image encoder) or stage 2 (LM through a "
             "frozen LLM) on capfilt output shards.",
    "caption": "Finetune a BLIP captioner (LM loss, prompt 'a picture of ') on COCO captions or capfilt shards.",
    "itm": "Finetune a BLIP filter (ITC + ITM) on COCO captions or capfilt shards.",
}


def _command(task: str):  # noqa: ANN202 - typer reads the signature
    def command(
        data: Annotated[list[str], typer.Option("--data", "-d", help="capfilt output folder (local or s3://...), or a "
                                                "COCO captions_*.json (images/ next to it, or --images). Repeat to "
                                                "train on several as one dataset.")],
        output: Annotated[str, typer.Option("--output", "-o", help="Checkpoint folder: logs, checkpoints/, "
                                            "final/<model>/ in Hugging Face format, final/preset.yaml.")],
        recipe: Annotated[Optional[str], typer.Option("--recipe", "-r", help=f"Training recipe name (models/train/) "
                                                      f"or YAML path (default: {DEFAULT_RECIPES[task]}"
                                                      + (" / blip2-stage2 with --stage 2" if task == "blip2" else "")
                                                      + ").")] = None,
        stage: Annotated[Optional[int], typer.Option(help="BLIP-2 stage (1 or 2) when no --recipe is given.",
                                                     hidden=task != "blip2")] = None,
        set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override a recipe value: section.key=value, "
                                                          "e.g. optim.lr=1e-5, train.batch_size=16.")] = None,
        images: Annotated[Optional[str], typer.Option(help="COCO image folder.")] = None,
        max_steps: Annotated[Optional[int], typer.Option(help="Shortcut for --set train.max_steps=N.")] = None,
        stop_after: Annotated[Optional[int], typer.Option(help="Stop after this step with a checkpoint; the same "
                                                          "command later resumes.")] = None,
        resume: Annotated[bool, typer.Option(help="Resume from the newest checkpoint in --output.")] = True,
        overwrite: Annotated[bool, typer.Option(help="Delete an earlier training run in --output first.")] = False,
        ray: Annotated[bool, typer.Option("--ray", help="Run on Ray Train workers (DistributedDataParallel).")] = False,
        workers: Annotated[int, typer.Option(help="Ray Train workers (with --ray).")] = 2,
        gpu: Annotated[bool, typer.Option("--gpu", help="One GPU per Ray Train worker (with --ray).")] = False,
        cpus_per_worker: Annotated[float, typer.Option(help="CPUs reserved per Ray Train worker.")] = 1.0,
        ray_address: Annotated[Optional[str], typer.Option(help="Ray cluster address (with --ray).")] = None,
    ) -> None:
        """Train with the chosen recipe (the command's own help text lists the options)."""
        from capfilt.train.config import load_recipe

        console, err = Console(), Console(stderr=True)
        try:
            name = recipe or ("blip2-stage2" if task == "blip2" and stage == 2 else DEFAULT_RECIPES[task])
            overrides = list(set_ or []) + ([f"train.max_steps={max_steps}"] if max_steps is not None else [])
            rec = load_recipe(name, overrides)
            if rec.task != task:
                raise CapfiltError(f"recipe {name!r} is for `capfilt train {rec.task}`, not `{task}`")
            if task == "blip2" and stage is not None and rec.stage != stage:
                raise CapfiltError(f"recipe {name!r} is BLIP-2 stage {rec.stage}, not {stage}")
            if ray:
                from capfilt.train.ray_train import train_with_ray

                res = train_with_ray(rec, data if len(data) > 1 else data[0], output, num_workers=workers, use_gpu=gpu,
                                     cpus_per_worker=cpus_per_worker, images=images, stop_after=stop_after,
                                     resume=resume, overwrite=overwrite, ray_address=ray_address)
            else:
                from capfilt.train.loop import train

                res = train(rec, data if len(data) > 1 else data[0], output, images=images, stop_after=stop_after, resume=resume,
                            overwrite=overwrite,
                            echo=lambda line: console.print(line, markup=False, highlight=False))
        except CapfiltError as e:
            err.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        if res.final is None:
            console.print(f"stopped at step {res.step}; run the same command again to resume "
                          f"(checkpoint {res.checkpoint})")
        elif not res.history and res.resumed_from is not None:
            console.print(f"{output} is already trained to step {res.step}: {res.final}")

    command.__doc__ = _HELP[task]
    return command


def register(app: typer.Typer) -> None:
    """Add the ``train`` command group (``blip``, ``blip2``, ``caption``, ``itm``) to ``app``."""
    train_app = typer.Typer(no_args_is_help=True, add_completion=False,
                            help="Train BLIP / BLIP-2 models on capfilt output (or COCO captions); checkpoints "
                                 "in Hugging Face format that `capfilt run --models` can use.")
    for task in ("blip", "blip2", "caption", "itm"):
        train_app.command(task, help=_HELP[task])(_command(task))
    app.add_typer(train_app, name="train")
