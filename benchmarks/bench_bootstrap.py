"""The CapFilt bootstrap experiment in the shapes world, as measured for benchmarks/RESULTS.md.

Runs exactly the documented command (``capfilt bootstrap``) in a fresh folder, records the machine's
load before and after (``uptime``), and prints the results table, the targets of the issue with
hit/miss, and the ratio that matters last (curated vs raw downstream TR@1 / IR@1).

    python benchmarks/bench_bootstrap.py [--quick] [--seeds 3] [--output DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

#: The issue's targets at the default size: (key, comparison, value).
TARGETS = [("filter.recall.unrelated", ">=", 0.95), ("filter.recall.junk", ">=", 0.95),
           ("filter.recall.wrong_attribute", ">=", 0.7), ("filter.clean_keep_rate", ">=", 0.9),
           ("captioner.exact_match", ">=", 0.9)]


def main() -> None:
    """Run the experiment and print the table, the targets and the downstream ratio."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--output", default=f"/tmp/capfilt-bootstrap-{int(time.time())}")
    args = ap.parse_args()
    print("load before:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    cmd = [sys.executable, "-m", "capfilt.cli", "bootstrap", "--output", args.output, "--seeds", str(args.seeds)]
    if args.quick:
        cmd.append("--quick")
    print("command:", " ".join(["capfilt"] + cmd[3:]), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    wall = time.perf_counter() - t0
    print("load after:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    r = json.loads((Path(args.output) / "bootstrap.json").read_text())
    m = r["metrics"]
    print(f"\nwall {wall:.0f} s (target <= {300 if args.quick else 1800} s)")
    for key, op, value in TARGETS:
        got = m[key]["mean"]
        print(f"{key:34s} {got:.3f} (sd {m[key]['sd']:.3f})  target {op} {value}: {'hit' if got >= value else 'MISS'}")
    for k in ("tr1", "ir1"):
        raw, cur, d = (m[f"downstream.{a}.{k}"] for a in ("raw", "curated", "delta"))
        spread = max(raw["sd"], cur["sd"])
        print(f"downstream {k}: raw {raw['mean']:.3f} curated {cur['mean']:.3f} delta {d['mean']:+.3f} "
              f"(seed spread {spread:.3f}): {'hit' if d['mean'] > spread else 'MISS'}")
    print(f"ratio curated/raw TR@1 {m['downstream.curated.tr1']['mean'] / max(m['downstream.raw.tr1']['mean'], 1e-9):.2f}x, "
          f"IR@1 {m['downstream.curated.ir1']['mean'] / max(m['downstream.raw.ir1']['mean'], 1e-9):.2f}x")


if __name__ == "__main__":
    main()
