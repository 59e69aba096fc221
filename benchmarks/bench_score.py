"""Scoring throughput: naive per-pair BLIP forwards vs capfilt's BlipScorer (image encoded once).

The naive way is the HF model card call, ``BlipForImageTextRetrieval(**processor(image, text))``
with the ITM head, once per (image, text) pair (ITM only, as the HF/LAVIS filtering examples
do): the ViT runs once per text. :class:`capfilt.modeling.blip_scorer.BlipScorer` (``itm`` only)
runs the ViT once per image, then the text encoder on all pairs at once. The headline ratio is
ITM against ITM. A second line gives capfilt's ITM + ITC (its default scorers) against the same
ITM-only naive loop, so ITC's extra cost is visible. All timed in the same run on the same model
and inputs; ITM scores are compared (max abs difference).

Default model: a BLIP-base-shaped ``BlipForImageTextRetrieval`` (ViT-B/16 at 384 px, BERT-base text)
with random weights (same FLOPs as ``Salesforce/blip-itm-base-coco``; no download). ``--model tiny``
uses the tiny preset; ``--model NAME|PATH.yaml`` loads a preset's filter (must be cached).

    PYTHONPATH=. python benchmarks/bench_score.py                       # CPU, fp32, 8 images x 11 texts
    PYTHONPATH=. python benchmarks/bench_score.py --device cuda --dtype bfloat16 --images 32
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
COCO = ROOT / "tests" / "fixtures" / "coco"


def coco_inputs(n_images: int, n_texts: int) -> tuple[list, list[list[str]]]:
    """``n_images`` COCO fixture photos, each with ``n_texts`` texts: its own captions first, then others'."""
    from PIL import Image

    ann = json.loads((COCO / "captions_val2017.json").read_text())
    by_image: dict[int, list[str]] = {}
    for a in ann["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a["caption"].strip())
    all_caps = [c for caps in by_image.values() for c in caps]
    files = sorted((COCO / "images").glob("*.jpg"))
    images, texts = [], []
    for i in range(n_images):
        f = files[i % len(files)]
        own = by_image.get(int(f.stem), [])
        others = [all_caps[(7 * i + 13 * j) % len(all_caps)] for j in range(n_texts)]
        images.append(Image.open(f).convert("RGB"))
        texts.append((own + others)[:n_texts])
    return images, texts


def load_model(name: str, device: str, dtype: str):
    """``(model, processor)`` for ``--model``: ``random-base``, ``tiny`` or a preset name/YAML path."""
    import torch
    from transformers import BlipForImageTextRetrieval

    from capfilt.config import load_preset
    from capfilt.modeling.tiny import random_blip

    if name == "random-base":
        model, proc = random_blip(BlipForImageTextRetrieval, "base", seed=0)
    else:
        from transformers import BlipProcessor

        from capfilt.modeling.loading import load_pretrained, load_processor

        preset = load_preset(name)
        spec = preset.filter.model_copy(update={"device": "cpu", "dtype": "float32"})
        model = load_pretrained(BlipForImageTextRetrieval, spec, preset, attn_implementation="eager")
        proc = load_processor(BlipProcessor, spec, preset)
    return model.to(device=device, dtype=getattr(torch, dtype)).eval(), proc


def main() -> None:
    """Print naive per-pair vs optimized scoring time (8 images x 11 texts) and the speedup."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="random-base")
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--texts", type=int, default=11, help="texts per image")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    p.add_argument("--skip-naive", action="store_true")
    args = p.parse_args()

    import numpy as np
    import torch

    from capfilt.modeling.blip_scorer import BlipScorer, naive_scores

    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    model, proc = load_model(args.model, args.device, args.dtype)
    images, texts = coco_inputs(args.images, args.texts)
    n_pairs = sum(len(t) for t in texts)
    import copy

    from capfilt.modeling.attention import use_fused_attention

    ours = copy.deepcopy(model)  # capfilt's side: fused attention, as BlipScorer.from_spec loads it
    use_fused_attention(ours)
    scorer = BlipScorer(ours, proc, scorers=["itm"])
    both = BlipScorer(ours, proc, scorers=["itm", "itc"])

    def sync() -> None:
        """Wait for queued CUDA work (no-op on CPU) so timings are honest."""
        if cuda:
            torch.cuda.synchronize()

    scorer.score(images[:1], [texts[0][:2]])  # warm-up (allocator, kernels)
    naive_scores(model, proc, images[0], texts[0][0])
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    t0 = time.perf_counter()
    res = scorer.score(images, texts)
    sync()
    t_opt = time.perf_counter() - t0
    mem_opt = torch.cuda.max_memory_allocated() / 2**20 if cuda else float("nan")
    t0 = time.perf_counter()
    both.score(images, texts)
    sync()
    t_both = time.perf_counter() - t0

    print(f"model={args.model} device={args.device} dtype={args.dtype} threads={torch.get_num_threads()} "
          f"images={args.images} texts/image={args.texts} pairs={n_pairs}")
    print(f"capfilt ITM (BlipScorer, ViT once per image): {t_opt:8.2f} s  {args.images / t_opt:8.2f} images/s  "
          f"{n_pairs / t_opt:8.1f} texts/s" + (f"  max_memory_allocated {mem_opt:.0f} MiB" if cuda else ""))
    print(f"capfilt ITM + ITC:                           {t_both:8.2f} s  {args.images / t_both:8.2f} images/s  "
          f"{n_pairs / t_both:8.1f} texts/s")
    if args.skip_naive:
        return
    t0 = time.perf_counter()
    naive = [np.array([naive_scores(model, proc, im, t, itm_prefix_id=scorer.itm_prefix_id, itc=False)
                       for t in ts]) for im, ts in zip(images, texts)]
    sync()
    t_naive = time.perf_counter() - t0
    d_itm = max(float(np.max(np.abs(r.itm - n[:, 0]))) for r, n in zip(res, naive))
    print(f"naive ITM (one full forward per pair):        {t_naive:8.2f} s  {args.images / t_naive:8.2f} images/s  "
          f"{n_pairs / t_naive:8.1f} texts/s")
    print(f"capfilt ITM + ITC vs naive ITM: {t_naive / t_both:.1f}x")
    print(f"speedup capfilt ITM vs naive ITM: {t_naive / t_opt:.1f}x   max |diff| itm={d_itm:.2e}")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
