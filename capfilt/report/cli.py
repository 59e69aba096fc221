"""The ``capfilt report`` and ``capfilt inspect`` commands (added to the main app by :func:`register`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from capfilt.errors import CapfiltError


LABEL_COL_HELP = ("Pass-through column of ground-truth labels (e.g. noise_type, or a human audit column): "
                  "evaluate the filter against it (confusion matrix, precision/recall vs threshold, "
                  "suggested thresholds).")
LABEL_POSITIVE_HELP = ("Label value(s) meaning the web caption matches its image; repeatable or comma-separated "
                       "(default: clean, true, 1, yes, match, matched, good, positive; case-insensitive).")


def register(app: typer.Typer) -> None:
    """Add ``report`` and ``inspect`` to ``app`` (called by :mod:`capfilt.cli`)."""

    @app.command()
    def report(
        out: Annotated[str, typer.Argument(help="Output folder of `capfilt run` (local or s3://...); "
                                           "an interrupted run's output works too.")],
        html: Annotated[Optional[str], typer.Option("--html", help="HTML file to write "
                                                    "(default: OUT/_capfilt/report.html).")] = None,
        json_path: Annotated[Optional[str], typer.Option("--json", help="JSON file with every number "
                                                         "(default: OUT/_capfilt/report.json).")] = None,
        samples: Annotated[int, typer.Option("--samples", min=0, help="Images in the sample grid.")] = 24,
        seed: Annotated[int, typer.Option(help="Seed of the sample draw.")] = 0,
        label_col: Annotated[Optional[str], typer.Option("--label-col", help=LABEL_COL_HELP)] = None,
        label_positive: Annotated[Optional[list[str]], typer.Option("--label-positive", help=LABEL_POSITIVE_HELP)] = None,
    ) -> None:
        """Write a self-contained HTML dataset-quality report and a JSON with every number in it."""
        from capfilt.report.build import build_report

        console = Console()
        try:
            data = build_report(out, html=html, json_path=json_path, samples=samples, seed=seed,
                                label_col=label_col, label_positive=label_positive)
        except CapfiltError as e:
            Console(stderr=True).print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        sh = data["shards"]
        console.print(f"read {sh['read']} of {sh['found']} shard(s), {data['overview']['rows']:,} rows"
                      + (f" ({sh['incomplete']} incomplete shard(s) skipped)" if sh["incomplete"] else ""),
                      highlight=False)
        for w in data["warnings"]:
            console.print(f"[yellow]note:[/] {w}", highlight=False, soft_wrap=True)
        if data.get("labels"):
            from capfilt.report.inspect import labels_summary

            console.print(labels_summary(data["labels"]), highlight=False, soft_wrap=True)
        console.print(f"HTML: {data['files']['html']}\nJSON: {data['files']['json']}", highlight=False, soft_wrap=True)

    @app.command()
    def inspect(
        out: Annotated[str, typer.Argument(help="Output folder of `capfilt run` (local or s3://...).")],
        label_col: Annotated[Optional[str], typer.Option("--label-col", help=LABEL_COL_HELP)] = None,
        label_positive: Annotated[Optional[list[str]], typer.Option("--label-positive", help=LABEL_POSITIVE_HELP)] = None,
    ) -> None:
        """Print an overview of a capfilt output in the terminal (rows, statuses, kept texts, run)."""
        from capfilt.report.inspect import inspect_output

        try:
            inspect_output(Path(out) if "://" not in out else out, Console(), label_col=label_col,
                           label_positive=label_positive)
        except CapfiltError as e:
            Console(stderr=True).print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
