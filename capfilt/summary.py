"""The end-of-run summary table that ``capfilt run`` and ``capfilt demo`` print."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table


def print_summary(result, con: Console | None = None) -> None:
    """Print the end-of-run table: rows, statuses, texts kept, output path, wall time."""
    con = con or Console()
    t = result.totals
    table = Table(title="capfilt run", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(justify="right")
    table.add_row("rows", f"{t['rows']:,}")
    for status, n in sorted(t["status"].items(), key=lambda kv: (kv[0] != "success", -kv[1])):
        table.add_row(f"  {status}", f"{n:,}")
    add_failure_rows(table, t)
    retried = this_runs_retry(result.record)
    if retried:
        table.add_row("retried (--retry-failed)", f"{retried['rows']:,} rows: {retried['succeeded']:,} succeeded, "
                                                  f"{retried['still_failed']:,} not")
    table.add_row("rows kept", f"{t['keep']:,}")
    tk = t.get("texts_kept", {})
    table.add_row("texts kept (web / synthetic)", f"{tk.get('web', 0):,} / {tk.get('synthetic', 0):,}")
    for stage, tp in t.get("throughput", {}).items():
        rate = ", ".join(f"{format_rate(v)} {k.replace('_per_s', '')}/s" for k, v in tp.items() if k.endswith("_per_s"))
        table.add_row(f"{stage} throughput (per busy worker)", rate)
    table.add_row("shard parts written / already done", f"{result.parts_written} / {result.parts_skipped}")
    table.add_row("output", str(result.output))
    table.add_row("wall time", f"{result.wall_seconds:.1f} s")
    con.print(table)


#: Failure classes and failing domains the summary lists (the report has them all).
SUMMARY_CLASSES, SUMMARY_DOMAINS = 8, 5


def add_failure_rows(table: Table, totals: dict) -> None:
    """Rows for failed rows by class (transient ones marked) and the top failing domains, from run
    totals (``error_class`` and ``failed_domains``, summed from the shards' stats); none when nothing failed."""
    from capfilt.io.failures import TRANSIENT_CLASSES

    classes = totals.get("error_class") or {}
    if not classes:
        return
    failed = sum(classes.values())
    transient = sum(n for c, n in classes.items() if c in TRANSIENT_CLASSES)
    table.add_row("failures by class", f"{failed:,} ({transient:,} transient)")
    for c, n in sorted(classes.items(), key=lambda kv: (-kv[1], kv[0]))[:SUMMARY_CLASSES]:
        table.add_row(f"  {c}" + (" (transient)" if c in TRANSIENT_CLASSES else ""), f"{n:,}")
    domains = totals.get("failed_domains") or {}
    if domains:
        table.add_row("top failing domains", "")
        for d, n in sorted(domains.items(), key=lambda kv: (-kv[1], kv[0]))[:SUMMARY_DOMAINS]:
            table.add_row(f"  {d}", f"{n:,}")


def this_runs_retry(record) -> dict | None:
    """The run record's ``retries`` entry made by the record's last attempt (``--retry-failed``), else None."""
    retries = getattr(record, "retries", None) or []
    attempts = getattr(record, "attempts", None) or []
    if not retries or not attempts or attempts[-1].started is None:
        return None
    last = retries[-1]
    return last if last.get("started", 0) >= attempts[-1].started else None


def format_rate(v: float) -> str:
    """A per-second rate with enough digits that a slow stage never reads ``0.00`` (``0.0042``)."""
    if v == 0:
        return "0"
    digits = 1 if v >= 10 else 2 if v >= 1 else 3 if v >= 0.01 else 4
    return f"{v:,.{digits}f}"
