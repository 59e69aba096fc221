"""The ``capfilt export`` command (added to the main app by :func:`register`)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from capfilt.errors import CapfiltError


def _summary(result) -> Table:
    """One row per shard (rows in, written, filtered by reason, written now or resumed), then the total."""
    table = Table(title=f"capfilt export → {result.dest} ({result.format})", title_justify="left")
    for col in ("shard", "rows in", "written", "filtered", "this run"):
        table.add_column(col, justify="right" if col in ("rows in", "written") else "left")

    def why(filtered: dict) -> str:
        """``{reason: rows}`` as ``"not_kept:below_threshold 12, no_image:failed_to_download 3"`` (``-``: none)."""
        return ", ".join(f"{k} {v:,}" for k, v in filtered.items()) or "-"

    for s in result.shards:
        table.add_row(s.name, f"{s.stats['rows_in']:,}", f"{s.stats['written']:,}", why(s.stats.get("filtered") or {}),
                      "written" if s.written_now else "already done")
    t = result.totals
    table.add_row("total", f"{t['rows_in']:,}", f"{t['written']:,}", why(t["filtered"]),
                  f"{sum(s.written_now for s in result.shards)} written", style="bold")
    return table


def register(app: typer.Typer) -> None:
    """Add ``export`` to ``app`` (called by :mod:`capfilt.cli`)."""

    @app.command()
    def export(
        out: Annotated[str, typer.Argument(help="Output folder of `capfilt run` (local or s3://...).")],
        to: Annotated[str, typer.Option("--to", help="Destination folder (local or s3://...); rerun the same "
                                        "command to finish an interrupted export.")],
        fmt: Annotated[str, typer.Option("--format", help="webdataset (NAME.tar with KEY.jpg/.txt/.json) or "
                                         "hf-parquet (NAME.parquet with an HF Image column, plus README.md).")]
        = "webdataset",
        all_rows: Annotated[bool, typer.Option("--all", help="Export every row with an image, not only the rows "
                                               "the filter kept.")] = False,
        rows_per_file: Annotated[Optional[int], typer.Option(
            help="Split each shard part of OUT into files of at most this many of its rows (NAME_0000.tar, "
                 "NAME_0001.tar, ...); default: one file per part, as large as the run's --rows-per-shard.",
            min=1)] = None,
    ) -> None:
        """Export a capfilt output as WebDataset tars or HF Parquet, one shard per committed part."""
        from capfilt.export.job import export_output

        console, err = Console(), Console(stderr=True)
        try:
            result = export_output(out, fmt, to, all_rows=all_rows, rows_per_file=rows_per_file,  # type: ignore[arg-type]
                                   on_shard=lambda s: err.print(
                                       f"{s.name}: {s.stats['written']:,} of {s.stats['rows_in']:,} rows"
                                       + ("" if s.written_now else " (already done)"), highlight=False))
        except CapfiltError as e:
            err.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        console.print(_summary(result))
        if result.train_data:
            console.print(f"shards: {result.train_data}", highlight=False, soft_wrap=True)
        if result.removed:
            console.print(f"[yellow]note:[/] removed {len(result.removed)} shard(s) whose source part no longer "
                          f"exists: {', '.join(result.removed)}", highlight=False, soft_wrap=True)
        for n in result.notes:
            console.print(f"[yellow]note:[/] {n}", highlight=False, soft_wrap=True)
        if result.skipped:
            err.print(f"[bold red]error:[/] {len(result.skipped)} shard(s) of {out} are incomplete (no "
                      f"_stats/NAME.stats.json: the run was interrupted or is still writing) and were not exported: "
                      f"{', '.join(result.skipped)}. The {len(result.shards)} committed shard(s) were exported. "
                      f"Finish the run (rerun the same `capfilt run` command), then rerun this export: it writes "
                      f"only the missing shards.", highlight=False, soft_wrap=True)
            raise typer.Exit(2)
