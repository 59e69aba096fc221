"""Trainer input pipeline and CPU threading: the two speed choices of capfilt.train, measured side by side.

A. Image decoding (``capfilt.train.data.ImageTransform``): JPEGs decoded in Pillow's draft mode
   (DCT scaling to the smallest size >= the model's input) vs a full decode, both followed by the
   same ``BlipImageProcessor`` resize/normalise. Real COCO val2017 photos (tests/fixtures, ~640x480)
   at the BLIP-base input size (384 px) and the tiny models' (64 px). Images per second, one thread.
B. Training steps of ``tiny-blip-pretrain`` (ITC + ITM + LM, batch 8, 2 DataLoader workers) with
   ``train.cpu_threads=1`` vs torch's default (one intra-op thread per core), samples per second
   over steps 6-40 (after warm-up), same process, same data.

    PYTHONPATH=. python benchmarks/bench_train.py
"""

from __future__ import annotations

import io
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def bench_decode(size: int, rounds: int = 3) -> tuple[float, float]:
    """Images/s of the trainer's decode+transform at ``size`` px, best of ``rounds``."""
    import torch
    from PIL import Image
    from transformers import BlipImageProcessor

    from capfilt.train.data import ImageTransform

    torch.set_num_threads(1)
    blobs = [p.read_bytes() for p in sorted((ROOT / "tests/fixtures/coco/images").glob("*.jpg"))]
    proc = BlipImageProcessor(size={"height": size, "width": size})
    draft = ImageTransform(proc)

    def full(data: bytes):
        """Decode JPEG bytes and transform to a float32 ``(3, H, W)`` tensor."""
        return proc(images=Image.open(io.BytesIO(data)).convert("RGB"), return_tensors="pt")["pixel_values"][0]

    rates = {}
    for name, fn in (("full", full), ("draft", draft)):
        fn(blobs[0])
        t = time.perf_counter()
        for _ in range(rounds):
            for b in blobs:
                fn(b)
        rates[name] = rounds * len(blobs) / (time.perf_counter() - t)
    return rates["full"], rates["draft"]


def bench_threads(data: str, tmp: Path, default_threads: int) -> dict[str, float]:
    """Seconds per training step of a tiny recipe at 1 thread vs ``default_threads``."""
    import torch

    from capfilt.train.config import load_recipe
    from capfilt.train.loop import train

    out = {}
    for label, threads in (("default", "null"), ("1 thread", "1")):
        recipe = load_recipe("tiny-blip-pretrain", ["train.max_steps=40", "train.save_every=null",
                                                    f"train.cpu_threads={threads}"])
        torch.set_num_threads(default_threads)
        t0 = torch.get_num_threads()
        res = train(recipe, data, tmp / label.replace(" ", ""), echo=None)
        h = {r["step"]: r for r in res.history}
        out[label] = (35 * 8) / (h[40]["elapsed_s"] - h[5]["elapsed_s"])
        out[f"{label} threads"] = t0 if threads == "null" else 1
    return out


def main() -> None:
    """Run the trainer benchmarks and print their ratios."""
    import torch

    from tests.helpers.train import make_shards

    default_threads = torch.get_num_threads()
    print(f"load average before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print("A. decode + BLIP processor, images/s (79 COCO val2017 photos x 3, one thread)")
    print(f"{'input size':>12} {'full decode':>12} {'draft mode':>12} {'ratio':>8}")
    for size in (384, 64):
        full, draft = bench_decode(size)
        print(f"{size:>10}px {full:>12.1f} {draft:>12.1f} {draft / full:>7.2f}x")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        make_shards(tmp / "shards")
        r = bench_threads(str(tmp / "shards"), tmp, default_threads)
    print("B. tiny-blip-pretrain training, samples/s over steps 6-40 (batch 8, 2 loader workers)")
    print(f"   torch default ({r['default threads']} threads): {r['default']:.1f}   cpu_threads=1: {r['1 thread']:.1f}"
          f"   ratio {r['1 thread'] / r['default']:.2f}x")
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
