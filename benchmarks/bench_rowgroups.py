"""Reading shards out of one big Parquet row group: once per shard (before) vs once per worker (now).

Builds a Parquet file with a single row group of ``--rows`` rows (LAION-like ``url``/``caption``
text), then reads it as ``--shard``-row shards, as the read stage does:

- **old**: :func:`capfilt.io.reader.read_rows` without a cache, i.e. what every shard did before
  (decode the whole row group, keep a 1000-row slice);
- **new**: :class:`capfilt.stages.read.ReadStage`, one shard spec per call as the runner sends them,
  so the row group is decoded once per worker process (its run-scoped ``ReadCache``).

Checks that both give the same keys and values, and prints times, decodes and the ratio. With
``--old-shards N`` only the first N shards are timed the old way and the total is extrapolated
(every old shard decodes the same row group, so each costs the same); the measured run times all.

    python benchmarks/bench_rowgroups.py                      # measured run: 200k rows, 1000-row shards
    python benchmarks/bench_rowgroups.py --rows 5000 --shard 100   # smoke test
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
import time
from pathlib import Path

import sys

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from capfilt.config import InputConfig  # noqa: E402
from capfilt.io.reader import inspect_inputs, read_rows  # noqa: E402
from capfilt.stages.read import ReadStage, ShardSpec, specs_table  # noqa: E402


def build(path: Path, rows: int) -> None:
    """Write ``rows`` LAION-like rows (``url``, ``caption``, ``similarity``) as ONE row group."""
    t = pa.table({
        "url": [f"https://images.example.com/{i % 977:03d}/photo-{i:09d}.jpg?w=800&q=75" for i in range(rows)],
        "caption": [f"A photo number {i} of a red bicycle leaning on a wall in the old town, sunny day"
                    for i in range(rows)],
        "similarity": [((i * 7919) % 1000) / 1000 for i in range(rows)],
    })
    pq.write_table(t, path, row_group_size=rows, compression="zstd")


def main() -> None:
    """Build the file, time both ways, check they agree, print the ratio."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--shard", type=int, default=1000)
    ap.add_argument("--old-shards", type=int, default=None, help="time only this many shards the old way")
    args = ap.parse_args()
    print("load before:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "one_row_group.parquet"
        build(path, args.rows)
        meta = pq.ParquetFile(path).metadata
        print(f"file: {args.rows} rows, {meta.num_row_groups} row group(s), {path.stat().st_size / 1e6:.1f} MB; "
              f"shards of {args.shard} rows")
        (f,) = inspect_inputs([str(path)], InputConfig())
        specs = [ShardSpec(i, 0, s, min(s + args.shard, args.rows))
                 for i, s in enumerate(range(0, args.rows, args.shard))]
        n_old = len(specs) if args.old_shards is None else min(args.old_shards, len(specs))

        t0 = time.perf_counter()
        old = [read_rows(f, s.start, s.stop) for s in specs[:n_old]]
        old_s = (time.perf_counter() - t0) * len(specs) / n_old

        stage = ReadStage([f])
        t0 = time.perf_counter()
        new = [stage(specs_table([s])) for s in specs]
        new_s = time.perf_counter() - t0

        for a, b in zip(old, new):
            assert a.column("key").equals(b.column("key")) and a.column("url").equals(b.column("url"))
            assert a.column("caption").equals(b.column("caption"))
        assert sum(t.num_rows for t in new) == args.rows
    est = "" if n_old == len(specs) else f" (timed {n_old} shards, extrapolated)"
    print(f"old (decode per shard): {old_s:8.2f} s for {len(specs)} shards, {len(specs)} row-group decodes{est}")
    print(f"new (run-scoped cache): {new_s:8.2f} s for {len(specs)} shards, {stage._cache.loads} row-group decode(s)")
    print(f"ratio old/new: {old_s / new_s:.1f}x   (keys and values identical on the {n_old} shards compared)")
    print("load after:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())


if __name__ == "__main__":
    main()
