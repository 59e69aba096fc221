"""Compare two capfilt outputs (or two folders of outputs) row by row: same keys, columns, values.

Usage: ``python tests/tools/compare_outputs.py A B`` where A and B are outputs, or folders whose
sub-folders are outputs with the same names. Rows are compared sorted by ``key``; shard stats
without their timing fields; ``run.json`` without ids, attempts, timings, versions, the command
and the output path. Prints one line per output and ``IDENTICAL`` or ``DIFFERENT`` (exit 1), and
for a difference the columns that differ with one example each.

Used for issue 13's before/after check (the stage-descriptor refactor must not change outputs).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pyarrow.parquet as pq

DROP_RUN = {"run_id", "attempts", "timings", "versions", "command", "stages", "output"}


def _norm_run(d: dict) -> dict:
    d = {k: v for k, v in d.items() if k not in DROP_RUN}
    if "totals" in d:
        d["totals"] = dict(d["totals"])
        d["totals"].pop("throughput", None)
    return d


def _stats(p: Path) -> dict:
    d = json.loads(p.read_text())
    for k in ("written_at", "run_id", "seconds"):
        d.pop(k, None)
    return d


def compare(a: Path, b: Path) -> bool:
    """Print how output ``a`` and output ``b`` differ; True when they hold the same rows and stats."""
    ta, tb = pq.read_table(a).sort_by("key"), pq.read_table(b).sort_by("key")
    same_schema = ta.schema.remove_metadata() == tb.schema.remove_metadata()
    diffs = {}
    if same_schema and ta.num_rows == tb.num_rows:
        for c in ta.column_names:
            va, vb = ta.column(c).to_pylist(), tb.column(c).to_pylist()
            bad = [i for i, (x, y) in enumerate(zip(va, vb)) if x != y]
            if bad:
                diffs[c] = (len(bad), str(va[bad[0]])[:100], str(vb[bad[0]])[:100])
    sa, sb = sorted((a / "_stats").glob("*.json")), sorted((b / "_stats").glob("*.json"))
    same_stats = [p.name for p in sa] == [p.name for p in sb] and all(_stats(x) == _stats(y) for x, y in zip(sa, sb))
    ra = _norm_run(json.loads((a / "_capfilt" / "run.json").read_text()))
    rb = _norm_run(json.loads((b / "_capfilt" / "run.json").read_text()))
    run_diff = [k for k in sorted(set(ra) | set(rb)) if ra.get(k) != rb.get(k)]
    print(f"{a.name}: rows {ta.num_rows}/{tb.num_rows} columns={ta.num_columns} same_schema={same_schema} "
          f"differing columns={ {c: d[0] for c, d in diffs.items()} } same_stats={same_stats} run.json differs in: {run_diff}")
    for c, (n, x, y) in diffs.items():
        print(f"    {c}: {n} rows, e.g. {x!r} vs {y!r}")
    return same_schema and ta.num_rows == tb.num_rows and not diffs and same_stats and not run_diff


def main(argv: list[str]) -> int:
    a, b = Path(argv[1]), Path(argv[2])
    pairs = [(a, b)] if (a / "_capfilt").exists() else [(a / n, b / n) for n in sorted(p.name for p in a.iterdir())]
    ok = all([compare(x, y) for x, y in pairs])
    print("IDENTICAL" if ok else "DIFFERENT")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
