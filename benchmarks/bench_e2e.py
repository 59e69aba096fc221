"""End to end: ``capfilt run`` (blip recipe) vs the naive transformers loop, on identical saved weights.

Both sides caption every image with nucleus sampling and score the web caption and every
synthetic caption with the ITM head, on the same COCO photos served from 127.0.0.1:

- **naive**: the HF model-card way, one image at a time: fetch, ``processor(image, prompt)``,
  ``generate(num_return_sequences=K)``, then ``BlipForImageTextRetrieval(**processor(image, text))``
  once per (image, text) pair (ITM only, as the HF/LAVIS examples do). torch's default threads.
- **capfilt**: ``capfilt.api.run`` with the same weights (a preset YAML naming the saved folders),
  ``score.scorers=[itm]``, on a local Ray that it starts and stops itself (included in wall).

Weights: BLIP-base-shaped random models (``--size base``: ViT-B/16 at 384 px, BERT-base; the FLOPs of
``Salesforce/blip-image-captioning-base`` / ``blip-itm-base-coco``) built with a fixed seed and saved
once, so both sides load the same files. A random decoder never emits [SEP], so every caption
runs to ``max_length`` tokens on both sides (equal work). Model time: capfilt's caption + score
stage seconds from its shard stats (busy time; with overlap the stages' seconds overlap too);
naive's generate + ITM seconds. Wall: the whole call, start-up and shutdown included.
Sides are interleaved ``--reps`` times; medians and the ratio (capfilt / naive, images per
second) are printed last.

    PYTHONPATH=. python benchmarks/bench_e2e.py --images 64 --captions 1 --reps 3
    PYTHONPATH=. python benchmarks/bench_e2e.py --images 16 --captions 10 --reps 3
    PYTHONPATH=. python benchmarks/bench_e2e.py --size tiny --images 16 --reps 1   # smoke test
    # variants: --variant threads1 / threads2 (resources.{caption,score}.threads), --variant noblocks
    # (output.block_rows=1000: a shard moves as one block), --variant fused (resources.fused=true),
    # --variant twopools (resources.fused=false), --variant local / local_fused (--executor local)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
PHOTOS = ROOT / "tests" / "fixtures" / "coco" / "images"
PROMPT, TOP_P, MAX_LENGTH, MIN_LENGTH, REP = "a picture of ", 0.9, 30, 5, 1.1

#: capfilt variants: extra ``--set`` overrides (Ray executor unless listed in :data:`LOCAL`).
VARIANTS = {"default": [], "threads1": ["resources.caption.threads=1", "resources.score.threads=1"],
            "threads2": ["resources.caption.threads=2", "resources.score.threads=2"],
            "noblocks": ["output.block_rows=1000"], "fused": ["resources.fused=true"],
            "twopools": ["resources.fused=false"], "local": [], "local_fused": ["resources.fused=true"]}
#: variants run with ``--executor local`` (in this process, a thread per stage).
LOCAL = {"local", "local_fused"}


def save_weights(size: str, folder: Path, device: str = "cpu", dtype: str = "float32") -> Path:
    """Save seed-0 random BLIP captioner + ITM models of ``size`` and a preset YAML naming them
    (loaded on ``device`` in ``dtype``); also used by ``gpu_e2e.py``."""
    from transformers import BlipForConditionalGeneration, BlipForImageTextRetrieval

    from capfilt.modeling.tiny import random_blip

    for name, cls in (("captioner", BlipForConditionalGeneration), ("filter", BlipForImageTextRetrieval)):
        model, proc = random_blip(cls, size, seed=0)
        model.save_pretrained(folder / name)
        proc.save_pretrained(folder / name)
    preset = folder / "preset.yaml"
    preset.write_text(f"name: bench-{size}\ndescription: random BLIP-{size} weights (benchmark only)\n"
                      f"captioner: {{id: {folder / 'captioner'}, kind: blip, dtype: {dtype}, device: {device}}}\n"
                      f"filter: {{id: {folder / 'filter'}, kind: blip, dtype: {dtype}, device: {device}}}\n")
    return preset


def naive(folder: Path, urls: list[str], captions: list[str], k: int) -> dict:
    """The HF model-card loop, one image and one (image, text) pair at a time. Returns timings."""
    import io

    import torch
    from PIL import Image
    from transformers import BlipForConditionalGeneration, BlipForImageTextRetrieval, BlipProcessor

    t0 = time.perf_counter()
    cap_model = BlipForConditionalGeneration.from_pretrained(folder / "captioner").eval()
    cap_proc = BlipProcessor.from_pretrained(folder / "captioner")
    itm_model = BlipForImageTextRetrieval.from_pretrained(folder / "filter").eval()
    itm_proc = BlipProcessor.from_pretrained(folder / "filter")
    model_s = 0.0
    with torch.inference_mode():
        for url, web in zip(urls, captions):
            image = Image.open(io.BytesIO(urllib.request.urlopen(url, timeout=30).read())).convert("RGB")
            m0 = time.perf_counter()
            inputs = cap_proc(images=image, text=PROMPT, return_tensors="pt")
            out = cap_model.generate(**inputs, do_sample=True, top_p=TOP_P, max_length=MAX_LENGTH,
                                     min_length=MIN_LENGTH, repetition_penalty=REP, num_return_sequences=k)
            synthetic = cap_proc.batch_decode(out, skip_special_tokens=True)
            for text in [web] + synthetic:
                pair = itm_proc(images=image, text=text, return_tensors="pt")
                torch.softmax(itm_model(**pair, use_itm_head=True).itm_score, dim=1)[:, 1].item()
            model_s += time.perf_counter() - m0
    return {"wall": time.perf_counter() - t0, "model": model_s}


def capfilt_run(preset: Path, inp: Path, k: int, variant: str) -> dict:
    """``capfilt run --pipeline blip`` on ``inp`` into a fresh folder. Returns timings."""
    import shutil

    from capfilt.api import RunOptions, run
    from capfilt.runner import shutdown_local_ray

    out = Path(tempfile.mkdtemp(prefix="bench-e2e-out-"))
    shutil.rmtree(out)
    t0 = time.perf_counter()
    try:
        res = run(RunOptions(inputs=[str(inp)], output=str(out), pipeline="blip", models=str(preset), progress=False,
                             executor="local" if variant in LOCAL else "ray",
                             overrides=["download.allow_private_network=true", f"caption.num_captions={k}",
                                        f"caption.max_length={MAX_LENGTH}", f"caption.min_length={MIN_LENGTH}",
                                        "score.scorers=[itm]", "select.itm_threshold=0.5"] + VARIANTS[variant]))
        shutdown_local_ray()
    finally:
        wall = time.perf_counter() - t0
        shutil.rmtree(out, ignore_errors=True)
    seconds = {}
    for name, tp in res.totals["throughput"].items():
        seconds[name] = tp.get("seconds", 0.0)
    assert res.totals["images_captioned"] == res.totals["rows"], res.totals
    return {"wall": wall, "model": seconds.get("caption", 0.0) + seconds.get("score", 0.0), "stages": seconds}


def main() -> None:
    """Run both sides ``--reps`` times, interleaved, and print medians and ratios (ratio last)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=["tiny", "base"], default="base")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--captions", type=int, default=1)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--variant", action="append", choices=sorted(VARIANTS), help="capfilt variants (default: default)")
    ap.add_argument("--no-naive", action="store_true", help="only capfilt variants (their ratios to the first)")
    args = ap.parse_args()
    variants = args.variant or ["default"]

    import pyarrow as pa
    import pyarrow.parquet as pq

    from tests.helpers.httpserver import ImageServer

    photos = sorted(PHOTOS.glob("*.jpg"))
    work = Path(tempfile.mkdtemp(prefix="bench-e2e-"))
    preset = save_weights(args.size, work / "weights")
    print(f"# {time.strftime('%Y-%m-%d %H:%M')} load {os.getloadavg()[0]:.2f} cpus {os.cpu_count()} "
          f"size={args.size} images={args.images} num_captions={args.captions} reps={args.reps}", flush=True)
    with ImageServer(PHOTOS) as srv:
        urls = [srv.url(photos[i % len(photos)].name) + f"?i={i}" for i in range(args.images)]
        caps = [f"a photo number {i}" for i in range(args.images)]
        pq.write_table(pa.table({"url": urls, "caption": caps}), work / "in.parquet")
        results: dict[str, list[dict]] = {}
        sides = ([] if args.no_naive else ["naive"]) + [f"capfilt:{v}" for v in variants]
        for rep in range(args.reps):
            for side in sides:
                if side == "naive":
                    r = naive(work / "weights", urls, caps, args.captions)
                else:
                    r = capfilt_run(preset, work / "in.parquet", args.captions, side.split(":", 1)[1])
                results.setdefault(side, []).append(r)
                print(f"rep {rep} {side:18s} wall {r['wall']:7.1f} s  model {r['model']:7.1f} s  "
                      f"load {os.getloadavg()[0]:.2f}", flush=True)
    med = {s: {k: statistics.median(r[k] for r in rs) for k in ("wall", "model")} for s, rs in results.items()}
    n = args.images
    for s, m in med.items():
        print(f"{s:18s} median wall {m['wall']:7.1f} s ({n / m['wall']:.3f} img/s)  "
              f"model {m['model']:7.1f} s ({n / m['model']:.3f} img/s)")
    base = "naive" if "naive" in med else sides[0]
    for s in sides:
        if s != base:
            print(f"ratio {s} / {base} (images/s): wall {med[base]['wall'] / med[s]['wall']:.2f}x  "
                  f"model {med[base]['model'] / med[s]['model']:.2f}x")


if __name__ == "__main__":
    main()
