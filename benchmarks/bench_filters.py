"""Cost per image of the curation-filter stages on the 79 bundled COCO photos (CPU; numpy/faiss on
one thread, onnxruntime with its default threads).

Runs each stage (as the pipeline builds it) on one batch of the stored images of a download run:
blocklist (PDQ hash of every image against a 1,000-entry list), decontam (perceptual embedding +
faiss search against 10 evaluation images), safety (NudeNet's ONNX detector). Each stage is timed
``--repeats`` times after a warm-up; the median milliseconds per image are printed, last the
ratio of the safety stage to a plain JPEG decode of the same images (the floor of any image filter).

``python benchmarks/bench_filters.py [--repeats 3]``
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pyarrow as pa  # noqa: E402
from PIL import Image  # noqa: E402

from capfilt.config import BlocklistConfig, DecontamConfig, SafetyConfig  # noqa: E402
from capfilt.stages.blocklist import BlocklistStage  # noqa: E402
from capfilt.stages.decontam import DecontamStage  # noqa: E402
from capfilt.stages.safety import SafetyStage  # noqa: E402

COCO = sorted((ROOT / "tests" / "fixtures" / "coco" / "images").glob("*.jpg"))


def _batch() -> pa.Table:
    images = [p.read_bytes() for p in COCO]
    n = len(images)
    return pa.table({"key": [f"0000_{i:09d}" for i in range(n)], "url": [f"http://h/{i}" for i in range(n)],
                     "status": ["success"] * n, "error_message": pa.nulls(n, pa.string()),
                     "image": pa.array(images, pa.binary()),
                     "sha256": [hashlib.sha256(b).hexdigest() for b in images]})


def _time(fn, batch: pa.Table, repeats: int) -> float:
    fn(batch)  # warm-up (model load, index build)
    runs = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn(batch)
        runs.append(time.perf_counter() - t)
    return statistics.median(runs) * 1000 / batch.num_rows


def main() -> None:
    """Time every filter stage on the bundled photos and print ms/image, images/s and the safety/decode ratio."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    batch = _batch()
    with tempfile.TemporaryDirectory() as tmp:
        rng = random.Random(0)
        lst = Path(tmp) / "list.txt"
        lst.write_text("".join(f"pdq:{rng.getrandbits(256):064x}\n" for _ in range(1000)))
        ev = Path(tmp) / "eval"
        ev.mkdir()
        for p in COCO[:10]:
            (ev / p.name).write_bytes(p.read_bytes())
        stages = {"blocklist (PDQ, 1,000 entries)": BlocklistStage(BlocklistConfig(enabled=True, lists=[str(lst)])),
                  "decontam (10 eval images)": DecontamStage(DecontamConfig(enabled=True, eval_sets=[str(ev)])),
                  "safety (NudeNet ONNX)": SafetyStage(SafetyConfig(enabled=True))}
        decode = _time(lambda b: [Image.open(io.BytesIO(x)).convert("RGB") for x in b.column("image").to_pylist()],
                       batch, args.repeats)
        print(f"{len(COCO)} COCO photos ({COCO[0].name}...), median of {args.repeats} runs")
        print(f"  JPEG decode alone: {decode:.2f} ms/image")
        costs = {}
        for name, stage in stages.items():
            costs[name] = _time(stage, batch, args.repeats)
            print(f"  {name}: {costs[name]:.2f} ms/image ({1000 / costs[name]:.1f} images/s)")
    print(f"safety / decode = {costs['safety (NudeNet ONNX)'] / decode:.1f}x")


if __name__ == "__main__":
    main()
