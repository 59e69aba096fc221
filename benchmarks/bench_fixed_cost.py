"""Fixed cost of ``capfilt run``: a cold CLI process on 8 images with the tiny models, per executor.

The tiny models compute in well under a second, so a run's wall time is its fixed cost: Python and
library imports, Ray's start (or joining it), worker start-up and model loads, and shutdown. Each
side is a fresh ``python -m capfilt.cli run ...`` subprocess (nothing imported beforehand, as a
user's shell runs it) on the same Parquet of 8 COCO photos served from 127.0.0.1:

- ``local``: ``--executor local`` (what ``--executor auto`` picks for inputs of <= 1,000 rows);
- ``ray``: ``--executor ray``, starting a local Ray and stopping it;
- ``ray-join``: ``--executor ray --ray-address auto`` against a Ray started once beforehand with
  ``ray start --head`` (not counted), as on a cluster or a laptop that keeps Ray running.

Sides are interleaved ``--reps`` times; medians, the model seconds from the run's stats (caption +
score busy time) and ``fixed = wall - model`` are printed, with the load before each run.

    PYTHONPATH=. python benchmarks/bench_fixed_cost.py --reps 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PHOTOS = ROOT / "tests" / "fixtures" / "coco" / "images"
SIDES = {"local": ["--executor", "local"], "ray": ["--executor", "ray"],
         "ray-join": ["--executor", "ray", "--ray-address", "auto"]}


def one_run(inp: Path, out: Path, extra: list[str], env: dict[str, str]) -> dict:
    """One cold ``capfilt run``; returns wall seconds and model seconds (from ``run.json``)."""
    cmd = [sys.executable, "-m", "capfilt.cli", "run", "--input", str(inp), "--output", str(out), "--pipeline", "blip",
           "--models", "tiny", "--allow-private-network", "--no-progress", *extra]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - t0
    if r.returncode:
        raise SystemExit(f"capfilt run failed (rc {r.returncode}):\n{r.stderr[-3000:]}")
    record = json.loads((out / "_capfilt" / "run.json").read_text())
    tp = (record.get("totals") or {}).get("throughput") or {}
    model = sum(float(tp.get(s, {}).get("seconds", 0.0)) for s in ("caption", "score"))
    return {"wall": wall, "model": model}


def main() -> None:
    """Interleave the sides ``--reps`` times; print medians and fixed cost (wall - model)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--side", action="append", choices=sorted(SIDES), help="default: all three")
    args = ap.parse_args()
    sides = args.side or list(SIDES)

    import pyarrow as pa
    import pyarrow.parquet as pq

    from tests.helpers.httpserver import ImageServer

    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)
    work = Path(tempfile.mkdtemp(prefix="bench-fixed-"))
    photos = sorted(PHOTOS.glob("*.jpg"))
    started_ray = False
    try:
        if "ray-join" in sides:
            subprocess.run(["ray", "start", "--head", "--num-cpus", str(os.cpu_count()), "--include-dashboard=false",
                            "--disable-usage-stats"], check=True, capture_output=True, env=env)
            started_ray = True
        subprocess.run([sys.executable, "-c", "from capfilt.modeling.tiny import ensure_tiny_checkpoints as e; e()"],
                       check=True, env=env, cwd=ROOT)  # build the tiny checkpoints once, outside the timings
        print(f"# {time.strftime('%Y-%m-%d %H:%M')} load {os.getloadavg()[0]:.2f} cpus {os.cpu_count()} "
              f"images={args.images} reps={args.reps}", flush=True)
        with ImageServer(PHOTOS) as srv:
            urls = [srv.url(photos[i % len(photos)].name) + f"?i={i}" for i in range(args.images)]
            pq.write_table(pa.table({"url": urls, "caption": [f"a photo number {i}" for i in range(args.images)]}),
                           work / "in.parquet")
            results: dict[str, list[dict]] = {}
            for rep in range(args.reps):
                for side in sides:
                    load = os.getloadavg()[0]
                    out = work / f"out-{side}-{rep}"
                    r = one_run(work / "in.parquet", out, SIDES[side], env)
                    shutil.rmtree(out, ignore_errors=True)
                    results.setdefault(side, []).append(r)
                    print(f"rep {rep} {side:9s} wall {r['wall']:6.1f} s  model {r['model']:5.2f} s  "
                          f"fixed {r['wall'] - r['model']:6.1f} s  load before {load:.2f}", flush=True)
    finally:
        if started_ray:
            subprocess.run(["ray", "stop", "--force"], capture_output=True, env=env)
        shutil.rmtree(work, ignore_errors=True)
    for side, rs in results.items():
        wall = statistics.median(r["wall"] for r in rs)
        fixed = statistics.median(r["wall"] - r["model"] for r in rs)
        print(f"{side:9s} median wall {wall:6.1f} s  fixed cost {fixed:6.1f} s")


if __name__ == "__main__":
    main()
