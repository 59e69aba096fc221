"""``capfilt inspect OUT``: the report's overview as a rich table in the terminal."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from capfilt.report.failures import retry_lines
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
        tr = filt.get("web_text_truncated")
        if tr and tr["truncated"]:
            limit = tr.get("max_text_tokens")
            t.add_row("web captions truncated", f"{tr['truncated']:,} of {tr['measured']:,}",
                      f"judged on their first {limit} tokens" if limit else "judged on their first tokens")
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


def failures_table(f: dict[str, Any]) -> Table:
    """The report's ``failures`` section (:mod:`capfilt.report.failures`) as a rich table: failed rows
    by class (transient ones marked), then the top failing domains with their classes."""
    t = Table(title=f"failures by class: {f['failed']:,} of {f['rows']:,} rows ({f['transient']:,} transient)",
              show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column(justify="right")
    t.add_column(style="dim")
    for c in f["by_class"]:
        t.add_row(f"  {c['class']}", f"{c['count']:,}", f"{c['share']:.1%}" + (" transient" if c["transient"] else ""))
    t.add_row(f"top failing domains (of {f['distinct_failing_domains']:,})", "", "")
    for d in f["top_domains"]:
        t.add_row(f"  {d['domain']}", f"{d['count']:,}", ", ".join(f"{c} {n:,}" for c, n in d["classes"].items()))
    return t


def labels_table(labels: dict[str, Any]) -> Table:
    """The report's ``labels`` (filter vs labels) as a rich table: web captions kept / removed per label."""
    t = Table(title=f"filter vs labels: {labels['column']} ({labels['scorer']} >= {labels['threshold']:g})",
              title_justify="left")
    for name in ("label", "scored", "kept", "removed", "removed %", "not scored"):
        t.add_column(name, justify="left" if name == "label" else "right")
    for c in labels["classes"]:
        t.add_row(c["label"] + (" (matches)" if c["positive"] else ""), f"{c['scored']:,}", f"{c['kept']:,}",
                  f"{c['removed']:,}", _pct(c["removed"], c["scored"]), f"{c['unscored']:,}")
    return t


def labels_summary(labels: dict[str, Any]) -> str:
    """One or two lines: precision/recall of removal at the threshold and the suggested thresholds."""
    m, sug = labels["metrics"], labels["suggested"]
    f = lambda x: "–" if x is None else f"{x:.1%}"  # noqa: E731
    lines = [f"filter vs {labels['column']}: at {labels['scorer']} >= {labels['threshold']:g} removal precision "
             f"{f(m['precision'])}, recall {f(m['recall'])}, clean kept {f(m['clean_keep_rate'])} "
             f"({labels['scored']:,} labelled rows scored, {labels['unscored']:,} not scored)"]
    if sug.get("best_f1"):
        b = sug["best_f1"]
        lines.append(f"suggested threshold {b['threshold']:.3f} (best F1 {b['f1']:.3f}: recall {f(b['recall'])}, "
                     f"clean kept {f(b['clean_keep_rate'])})")
    if sug.get("clean_keep"):
        k = sug["clean_keep"]
        lines.append(f"highest threshold keeping >= {sug['min_clean_keep']:.0%} clean: {k['threshold']:.3f} "
                     f"(recall {f(k['recall'])})")
    return "\n".join(lines)


def inspect_output(out: str | Path, console: Console | None = None, label_col: str | None = None,
                   label_positive: Sequence[str] | None = None) -> dict[str, Any]:
    """Print the overview of a capfilt output (complete or interrupted) and its warnings.

    Reads only the small columns (no image bytes, no samples).

    Args:
        label_col / label_positive: also print the filter vs labels table
            (see :func:`capfilt.report.stats.compute_report_data`).

    Returns:
        The report data (:func:`capfilt.report.stats.compute_report_data` ``.data``).

    Raises:
        capfilt.errors.OutputError: if ``out`` is not a folder.
        capfilt.errors.LabelError: if ``label_col`` is missing or has no positive value.
    """
    console = console or Console()
    data = compute_report_data(str(out), samples=0, borderline=0, label_col=label_col,
                               label_positive=label_positive).data
    console.print(overview_table(data))
    if data["failures"]["failed"]:
        console.print(failures_table(data["failures"]))
    for line in retry_lines(data["failures"]["retries"]):
        console.print(line, highlight=False, soft_wrap=True)
    if data.get("labels"):
        console.print(labels_table(data["labels"]))
        console.print(labels_summary(data["labels"]), highlight=False, soft_wrap=True)
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
