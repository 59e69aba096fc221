"""Caption + score stages on one device: images/s per stage, GPU busy %, achieved TFLOP/s and MFU.

Runs capfilt's own :class:`~capfilt.stages.caption.CaptionStage` and
:class:`~capfilt.stages.score.ScoreStage` (what the actors run, image decoding and preprocessing
included) on ``--images`` rows of encoded 384 px COCO photos, with random-weight BLIP models of
the shape of ``Salesforce/blip-image-captioning-{base,large}`` / ``blip-itm-{base,large}-coco``
saved locally and loaded through a preset (no download). FLOPs per image are counted by
``torch.utils.flop_counter.FlopCounterMode`` on a small batch of each stage (matmul/conv FLOPs,
2 per multiply-add); MFU = counted FLOPs x images/s / ``--peak-tflops`` (default 989: H100/H200
dense bf16). GPU busy % is ``torch.cuda.utilization()`` (NVML) sampled every 0.1 s during a stage.
The blip recipe's target on one H200 at BLIP-large size is >= 400 images/s end to end.

    python benchmarks/gpu_e2e.py --size large --images 1024 --batch 128        # CUDA, bf16
    python benchmarks/gpu_e2e.py --size base --images 1024 --batch 128
    python benchmarks/gpu_e2e.py --size tiny --device cpu --dtype float32 --images 16 --batch 8   # smoke test
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def encoded_photos(n: int, size: int = 384) -> list[bytes]:
    """``n`` JPEG images as the download stage stores them (COCO fixture photos, long side ``size``)."""
    from PIL import Image

    files = sorted((ROOT / "tests" / "fixtures" / "coco" / "images").glob("*.jpg"))
    cache = []
    for f in files:
        im = Image.open(f).convert("RGB")
        im.thumbnail((size, size))
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=95)
        cache.append(buf.getvalue())
    return [cache[i % len(cache)] for i in range(n)]


class BusySampler(threading.Thread):
    """Samples ``torch.cuda.utilization()`` every 0.1 s until stopped (empty without CUDA/NVML)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.samples: list[float] = []
        self.stop = threading.Event()

    def run(self) -> None:
        """Append one GPU busy % (0-100, NVML) every 0.1 s until :attr:`stop` is set."""
        import torch

        while not self.stop.wait(0.1):
            try:
                self.samples.append(float(torch.cuda.utilization()))
            except Exception:  # noqa: BLE001 - no CUDA or no NVML: no busy figure
                return

    def mean(self) -> float | None:
        """Mean GPU busy %, or ``None`` without samples."""
        return statistics.fmean(self.samples) if self.samples else None


def timed(stage, batch, cuda: bool):
    """``(output, seconds, busy %)`` of ``stage(batch)``."""
    import torch

    sampler = BusySampler()
    sampler.start()
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = stage(batch)
    if cuda:
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    sampler.stop.set()
    sampler.join()
    return out, dt, sampler.mean()


def flops_per_image(stage, batch) -> float:
    """FLOPs per row of ``stage(batch)`` counted by ``FlopCounterMode`` (matmul/conv, 2 per MAC)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        stage(batch)
    return counter.get_total_flops() / batch.num_rows


def main() -> None:
    """Print per-stage and end-to-end images/s, GPU busy %, TFLOP/s and MFU."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=["tiny", "base", "large"], default="large")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    ap.add_argument("--images", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=128, help="caption.batch_size and score.batch_size")
    ap.add_argument("--captions", type=int, default=1, help="caption.num_captions")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="device peak for MFU (H100/H200 bf16 dense)")
    args = ap.parse_args()

    import pyarrow as pa
    import torch

    from capfilt.config import load_pipeline, load_preset
    from capfilt.stages.base import RunContext
    from capfilt.stages.caption import CaptionStage
    from capfilt.stages.score import ScoreStage

    cuda = args.device.startswith("cuda")
    work = Path(tempfile.mkdtemp(prefix="gpu-e2e-"))
    from benchmarks.bench_e2e import save_weights

    preset = load_preset(str(save_weights(args.size, work, args.device, args.dtype)))
    cfg = load_pipeline("blip", {"caption.batch_size": args.batch, "score.batch_size": args.batch,
                                 "caption.num_captions": args.captions})
    ctx = RunContext(str(work / "out"), "bench", preset, schema=pa.schema([]))
    caption, score = CaptionStage.build(cfg, ctx), ScoreStage.build(cfg, ctx)
    caption.setup()
    score.setup()
    images = encoded_photos(args.images)
    table = pa.table({"key": [f"0000_{i:09d}" for i in range(args.images)], "status": ["success"] * args.images,
                      "caption": [f"a photo number {i}" for i in range(args.images)],
                      "image": pa.array(images, pa.binary())})
    small = table.slice(0, min(4, args.images))
    score(caption(small))  # warm-up: kernels, allocator, cuDNN autotune
    cap_flops = flops_per_image(caption, small)
    score_flops = flops_per_image(score, caption(small))

    name = torch.cuda.get_device_name(0) if cuda else "cpu"
    print(f"# {time.strftime('%Y-%m-%d %H:%M')} device={name} size={args.size} dtype={args.dtype} "
          f"images={args.images} batch={args.batch} num_captions={args.captions} threads={torch.get_num_threads()}")
    captioned, t_cap, busy_cap = timed(caption, table, cuda)
    _, t_score, busy_score = timed(score, captioned, cuda)
    total = t_cap + t_score
    for label, t, busy, flops in (("caption", t_cap, busy_cap, cap_flops), ("score", t_score, busy_score, score_flops),
                                  ("caption+score", total, None, cap_flops + score_flops)):
        ips = args.images / t
        tflops = flops * ips / 1e12
        mfu = f"  MFU {100 * tflops / args.peak_tflops:5.1f} %" if cuda else ""
        busy_s = f"  GPU busy {busy:5.1f} %" if busy is not None else ""
        print(f"{label:14s} {t:8.2f} s  {ips:8.1f} images/s  {flops / 1e9:9.3f} GFLOP/image  "
              f"{tflops:7.2f} TFLOP/s{mfu}{busy_s}")
    if cuda:
        print(f"max_memory_allocated {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    print(f"end to end (model stages, one device): {args.images / total:.1f} images/s "
          f"(blip recipe goal on one H200 at BLIP-large: >= 400)")


if __name__ == "__main__":
    main()
