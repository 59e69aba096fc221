"""``capfilt synth`` and ``capfilt bootstrap``: the shapes world from the command line."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from capfilt.errors import CapfiltError


def synth(
    split: Annotated[str, typer.Option(help="web (noisy alt text), human (exact captions) or test (held out).")],
    output: Annotated[str, typer.Option("--output", "-o", help="Folder for images/, meta.parquet, captions.json.")],
    n: Annotated[int, typer.Option("--n", help="Number of image-text pairs.", min=1)] = 1000,
    seed: Annotated[int, typer.Option(help="World seed: the same seed and split give the same rows.")] = 0,
    noise_rate: Annotated[Optional[float], typer.Option(help="Share of noisy captions (default 0.4 for web, "
                                                        "0 otherwise).", min=0.0, max=1.0)] = None,
    base_url: Annotated[Optional[str], typer.Option(help="Prefix of the url column (e.g. http://127.0.0.1:8000); "
                                                    "default: paths relative to --output.")] = None,
) -> None:
    """Write a split of the shapes world: images, a LAION-style meta.parquet (url, caption, noise_type,
    objects) and COCO-style captions.json. A toy world for testing CapFilt, not real data."""
    from capfilt.synthetic.splits import SPLITS, write_split

    console = Console()
    if split not in SPLITS:
        Console(stderr=True).print(f"[bold red]error:[/] --split must be one of {', '.join(SPLITS)}, not {split!r}")
        raise typer.Exit(2)
    path = write_split(output, split, n, seed, noise_rate, base_url=base_url)
    console.print(f"wrote {n} {split} pairs (seed {seed}) to {Path(output)}: {path.name}, captions.json, images/")


def bootstrap(
    output: Annotated[str, typer.Option("--output", "-o", help="Experiment folder (resumable).")] = "capfilt-bootstrap",
    seeds: Annotated[int, typer.Option(help="Number of seeds (0, 1, ...); results are means over them.", min=1)] = 3,
    quick: Annotated[bool, typer.Option("--quick", help="Small size (a few minutes; the test suite's).")] = False,
    threshold: Annotated[float, typer.Option(help="ITM threshold of the filter.", min=0.0, max=1.0)] = 0.5,
    export_models: Annotated[Optional[str], typer.Option(help="Copy seed 0's finetuned captioner and filter to "
                                                         "DIR/captioner and DIR/filter (how models/shapes/ is "
                                                         "built).")] = None,
) -> None:
    """BLIP's CapFilt experiment in the shapes world: pre-train, finetune captioner and filter, capfilt run
    the noisy web split, pre-train again on raw vs curated data, compare. Writes bootstrap.json/.md."""
    from capfilt.synthetic.bootstrap import SIZES, Experiment

    console = Console()
    exp = Experiment(output, SIZES["quick" if quick else "default"], threshold,
                     echo=lambda line: console.print(line, markup=False, highlight=False))
    try:
        results = exp.run(list(range(seeds)))
    except CapfiltError as e:
        Console(stderr=True).print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    if export_models:
        from capfilt.synthetic.bootstrap import copy_models

        copy_models(Path(output), 0, Path(export_models))
        console.print(f"seed 0's captioner and filter copied to {export_models}/captioner, {export_models}/filter")
    console.print((Path(output) / "bootstrap.md").read_text(), markup=False, highlight=False)
    console.print(f"results: {Path(output) / 'bootstrap.json'} (wall {results['wall_s']:.0f} s)")


def register(app: typer.Typer) -> None:
    """Add ``synth`` and ``bootstrap`` to ``app``."""
    app.command("synth")(synth)
    app.command("bootstrap")(bootstrap)
