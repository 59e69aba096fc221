"""Cost of the semantic-dedup pass (:func:`capfilt.stages.semdedup.semantic_dedup`) over a committed
output, and its recall/precision on planted duplicates, without any model.

Writes ``--rows`` rows in parts of ``--rows-per-part`` as the pipeline commits them (through
``io.writer.commit_part``, the run's schema), with ``--dim``-d unit embeddings: ``--centres``
random centres, each row a centre plus noise (cosine about 0.8 to its centre, so distinct rows
are not duplicates), and ``--dup-share`` of the rows near-copies of another row (cosine about 0.99).
Then times the pass (read, k-means, prune, rewrite) and a second, idempotent pass (reads only),
and prints recall (planted copies dropped) and how many other rows were dropped.

``python benchmarks/bench_semdedup.py [--rows 200000 --dim 256]``
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402

from capfilt.config import load_pipeline  # noqa: E402
from capfilt.io.filesystem import locate  # noqa: E402
from capfilt.io.writer import commit_part, part_name  # noqa: E402
from capfilt.schema import conform  # noqa: E402
from capfilt.stages.registry import output_schema  # noqa: E402
from capfilt.stages.semdedup import semantic_dedup  # noqa: E402


def unit(x: np.ndarray) -> np.ndarray:
    """Rows of ``x`` L2-normalised."""
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def main() -> None:
    """Build the output, run the pass twice, print the numbers."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--rows-per-part", type=int, default=5_000)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--centres", type=int, default=2_000)
    ap.add_argument("--dup-share", type=float, default=0.1)
    ap.add_argument("--clusters", type=int, default=1000)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    n, d = args.rows, args.dim
    centres = unit(rng.normal(size=(args.centres, d)))
    emb = unit(centres[rng.integers(args.centres, size=n)] + unit(rng.normal(size=(n, d))) * 0.75)
    n_dup = int(n * args.dup_share)
    src = rng.choice(n - n_dup, size=n_dup)  # copies of rows that are not copies themselves
    emb[n - n_dup:] = unit(emb[src] + unit(rng.normal(size=(n_dup, d))) * 0.14)
    itm = rng.random(n).astype(np.float32)
    emb = emb.astype(np.float32)
    cfg = load_pipeline("blip", {"semdedup.enabled": True, "semdedup.n_clusters": args.clusters})
    schema = output_schema([], ["itm", "itc"], "bench")
    with tempfile.TemporaryDirectory() as tmp:
        out = locate(tmp)
        t0 = time.perf_counter()
        for shard, start in enumerate(range(0, n, args.rows_per_part)):
            sl = slice(start, min(n, start + args.rows_per_part))
            m = sl.stop - sl.start
            t = pa.table({"key": [f"0000_{i:09d}" for i in range(sl.start, sl.stop)], "status": ["success"] * m,
                          "keep": [True] * m, "web_itm": pa.array(itm[sl]), "caption": ["c"] * m,
                          "captions": [["c"]] * m, "caption_scores": [[float(v)] for v in itm[sl]],
                          "caption_sources": [["web"]] * m,
                          "image_embedding": pa.array(list(emb[sl]), pa.list_(pa.float32()))})
            commit_part(out, part_name(shard, 0), conform(t, schema), {"rows": m}, "zstd")
        write_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        res = semantic_dedup(out, cfg)
        first_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        again = semantic_dedup(out, cfg)
        second_s = time.perf_counter() - t0
        import pyarrow.dataset as ds

        got = ds.dataset(tmp, format="parquet").to_table(columns=["key", "drop_reason", "semantic_duplicate_of"])
        dropped = {int(k.split("_")[1]) for k, r in zip(got.column("key").to_pylist(),
                                                        got.column("drop_reason").to_pylist())
                   if r == "semantic_duplicate"}
    # a planted pair is found when one of its two rows was dropped
    found = sum((n - n_dup + j) in dropped or int(s) in dropped for j, s in enumerate(src))
    planted_rows = set(range(n - n_dup, n)) | {int(s) for s in src}
    print(f"rows {n:,} dim {d} parts {-(-n // args.rows_per_part)}; write {write_s:.1f} s")
    print(f"pass: {first_s:.1f} s ({n / first_s:,.0f} rows/s), {res.clusters} clusters, {res.duplicates:,} dropped, "
          f"{res.parts_rewritten} parts rewritten")
    print(f"second pass (nothing to change): {second_s:.1f} s, {again.parts_rewritten} parts rewritten")
    print(f"recall of planted copies {found / n_dup:.4f}; dropped outside planted pairs: "
          f"{len(dropped - planted_rows)} of {n - len(planted_rows):,}")
    print(f"cpus {os.cpu_count()}")


if __name__ == "__main__":
    main()
