"""``capfilt inspect OUT``: the report's overview as a rich table in the terminal."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from capfilt.report.layout import wall_seconds
from capfilt.report.stats import compute_report_data


def _pct(part: int | None, whole: int | None) -> str:
    return f"{part / whole:.1%}" if part is not None and whole else "–"


def overview_table(data: dict[str, Any]) -> Table:
    """The overview of :func:`capfilt.report.stats.compute_report_data`'s ``data`` as a rich table."""
    ov, sh, run = data["overview"], data["shards"], data["run"]
    rows = ov["rows"]
    t = Table(title=f"capfilt output {data['output']}", show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column(justify="right")
    t.add_column(style="dim")
    t.add_row("shards read", f"{sh['read']:,} of {sh['found']:,}",
              f"{sh['incomplete']:,} incomplete skipped" if sh["incomplete"] else "")
    t.add_row("rows", f"{rows:,}", "")
    t.add_row("downloaded", f"{ov['downloaded']:,}", _pct(ov["downloaded"], rows))
    for status, n in ov["status_counts"].items():
        t.add_row(f"  {status}", f"{n:,}", _pct(n, rows))
    if ov["rows_kept"] is not None:
        t.add_row("rows kept", f"{ov['rows_kept']:,}", _pct(ov["rows_kept"], rows))
        src = ov["texts_kept_by_source"] or {}
        t.add_row("texts kept", f"{ov['texts_kept']:,}",
                  f"web {src.get('web', 0):,} / synthetic {src.get('synthetic', 0):,}")
    filt = data.get("filter")
    if filt:
        for which in ("web", "synthetic"):
            r = filt["removed"][which]
            t.add_row(f"{which} texts removed", f"{r['removed']:,} of {r['scored']:,}", _pct(r["removed"], r["scored"]))
    cfg = run.get("config") or {}
    if cfg:
        t.add_row("recipe", str(cfg.get("name", "?")), f"models: {_models_text(run)}")
    for role, mid in (run.get("model_ids") or {}).items():
        t.add_row(f"{role} model", mid, "")
    if run.get("status"):
        t.add_row("run status", str(run["status"]), "")
    wall = wall_seconds(run)
    if wall is not None:
        t.add_row("wall time", f"{wall:,.1f} s", f"{rows / wall:,.1f} rows/s" if wall else "")
    return t


def inspect_output(out: str | Path, console: Console | None = None) -> dict[str, Any]:
    """Print the overview of a capfilt output (complete or interrupted) and its warnings.

    Reads only the small columns (no image bytes, no samples).

    Returns:
        The report data (:func:`capfilt.report.stats.compute_report_data` ``.data``).

    Raises:
        capfilt.errors.OutputError: if ``out`` is not a folder.
    """
    console = console or Console()
    data = compute_report_data(str(out), samples=0, borderline=0).data
    console.print(overview_table(data))
    if data["run"].get("tiny_models"):
        console.print("[bold yellow]untrained tiny models:[/] captions and scores are noise (random weights).")
    for w in data["warnings"]:
        console.print(f"[yellow]note:[/] {w}", highlight=False, soft_wrap=True)
    return data


def _models_text(run: dict) -> str:
    """The preset name, ``none`` for a model-free recipe (download, refilter), ``?`` if unknown."""
    from capfilt.report.layout import uses_models

    if run.get("preset"):
        return str(run["preset"])
    return "none" if run.get("present") and not uses_models({"config": run.get("config")}) else "?"
