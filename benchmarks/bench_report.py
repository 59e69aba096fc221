"""Benchmark: ``capfilt report`` on a 10,000-row output with real image bytes (issue #5, acceptance 3).

Builds a contract-conforming output (every row its own JPEG: a random crop of a real COCO val2017
photo at 384 px, so Parquet cannot dedup them; real COCO captions; seeded scores; see
tests/helpers/report_fixture.py), then runs, each in a fresh process:
  A. ``capfilt report OUT`` (what users run: streams shards, reads images only for sampled rows);
  B. the naive first step of any report that loads everything: ``pyarrow.parquet.read_table`` of
     all shards with every column, for scale.
It prints wall seconds (process start to exit, imports included), CPU seconds (user + system) and
peak RSS of each, the ratios B/A, and whether A meets the targets (< 60 s, < 1.5 GB).

Usage: PYTHONPATH=. python benchmarks/bench_report.py [--rows 10000] [--recipe blip2] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Peak RSS is VmHWM of the child's own address space: ru_maxrss would carry over the parent's peak
# across fork+exec on Linux.
CHILD = r"""
import json, sys
mode, out = sys.argv[1], sys.argv[2]
if mode == "report":
    from capfilt.report import build_report
    d = build_report(out, samples=24)
    extra = {"rows": d["overview"]["rows"], "shards": d["shards"]["read"]}
else:
    import pyarrow.parquet as pq, glob
    t = pq.read_table(sorted(glob.glob(out + "/*.parquet")))
    extra = {"rows": t.num_rows, "bytes_in_memory": t.nbytes}
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]
print(json.dumps({"peak_rss": int(hwm.split()[1]) * 1024, **extra}))
"""


def measure(mode: str, out: Path) -> dict:
    """Run one measurement in a fresh Python process; wall seconds include interpreter start and imports."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", CHILD, mode, str(out)], capture_output=True, text=True,
                       cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if r.returncode:
        raise SystemExit(f"{mode} failed:\n{r.stderr}")
    return {"wall_s": wall, "cpu_s": cpu, **json.loads(r.stdout.strip().splitlines()[-1])}


def main() -> None:
    """Build a 10,000-row output, time `capfilt report` on it and print wall seconds and peak RSS."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=10_000)
    ap.add_argument("--rows-per-shard", type=int, default=1000)
    ap.add_argument("--recipe", default="blip2", choices=["blip", "blip2", "download"])
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()

    from tests.helpers.report_fixture import make_output

    work = args.workdir or Path(tempfile.mkdtemp(prefix="capfilt-bench-report-"))
    out = work / f"out-{args.recipe}-{args.rows}"
    t0 = time.perf_counter()
    if not (out / "_capfilt" / "run.json").exists():
        make_output(out, rows=args.rows, rows_per_shard=args.rows_per_shard, recipe=args.recipe, seed=0,
                    unique_images=True, row_group_rows=args.rows_per_shard)  # one row group per shard, as the writer
    size = sum(p.stat().st_size for p in out.glob("*.parquet"))
    print(f"output: {out}  rows={args.rows:,} recipe={args.recipe} shards={len(list(out.glob('*.parquet')))} "
          f"parquet={size / 1e6:,.0f} MB (built in {time.perf_counter() - t0:.1f} s)")

    a = measure("report", out)
    b = measure("naive", out)
    gb = 1024 ** 3
    print(f"load average before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"{'':34s}{'wall s':>9s}{'CPU s':>9s}{'peak RSS GB':>13s}")
    for label, m in (("A capfilt report (streaming)", a), ("B read_table all columns (naive)", b)):
        print(f"{label:34s}{m['wall_s']:>9.1f}{m['cpu_s']:>9.1f}{m['peak_rss'] / gb:>13.2f}")
    print(f"{'ratio B/A':34s}{b['wall_s'] / a['wall_s']:>9.2f}{b['cpu_s'] / a['cpu_s']:>9.2f}"
          f"{b['peak_rss'] / a['peak_rss']:>13.2f}")
    ok = a["wall_s"] < 60 and a["peak_rss"] < 1.5e9
    print(f"targets (< 60 s, < 1.5 GB): {'met' if ok else 'NOT met'}; report read {a['rows']:,} rows from {a['shards']} shards")


if __name__ == "__main__":
    main()
