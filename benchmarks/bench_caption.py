"""Captioning throughput for num_captions 1 and 10 (BLIP §3.3 uses 1, BLIP-2 §3.4 uses 10), against the naive way.

The naive baseline is the HF model card: ``generate(**processor(image, prompt), do_sample=True,
num_return_sequences=K)`` one image at a time, with the same decoding settings. It is timed in the
same run as capfilt's :class:`capfilt.modeling.captioner.BlipCaptioner`, and the ratio (naive time /
capfilt time, per setting) is printed last.

:class:`capfilt.modeling.captioner.BlipCaptioner` runs the ViT once per image and decodes the
``num_captions`` sequences of an image as one batch sharing its image embeddings, so 10 captions
should cost well under 10x one caption. Both settings are timed in the same run, on the same
model and images, with the pipeline's decoding settings (nucleus sampling top_p 0.9, repetition
penalty 1.1, max_length 30, min_length 5, prompt "a picture of ").

Default model: a BLIP-base-shaped ``BlipForConditionalGeneration`` (ViT-B/16 at 384 px, BERT-base
decoder, 30524-token vocabulary) with random weights: the same FLOPs per token as
``Salesforce/blip-image-captioning-base``; a random decoder rarely emits [SEP], so every sequence
runs to max_length (the worst case). ``--model tiny`` uses the tiny preset; ``--model NAME|PATH.yaml``
loads a preset's captioner (must be cached).

    PYTHONPATH=. python benchmarks/bench_caption.py                     # CPU, fp32, 4 images
    PYTHONPATH=. python benchmarks/bench_caption.py --device cuda --dtype bfloat16 --images 32
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def load_model(name: str, device: str, dtype: str):
    """``(model, processor)`` for ``--model``: ``random-base``, ``tiny`` or a preset name/YAML path."""
    import torch
    from transformers import BlipForConditionalGeneration

    from capfilt.config import load_preset
    from capfilt.modeling.tiny import random_blip

    if name == "random-base":
        model, proc = random_blip(BlipForConditionalGeneration, "base", seed=0)
    else:
        from transformers import BlipProcessor

        from capfilt.modeling.loading import load_pretrained, load_processor

        preset = load_preset(name)
        spec = preset.captioner.model_copy(update={"device": "cpu", "dtype": "float32"})
        model = load_pretrained(BlipForConditionalGeneration, spec, preset, attn_implementation="eager")
        proc = load_processor(BlipProcessor, spec, preset)
    return model.to(device=device, dtype=getattr(torch, dtype)).eval(), proc


def main() -> None:
    """Print captions/s for num_captions 1 and 10 and the 10-vs-1 cost ratio (one run, side by side)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="random-base")
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=32, help="images per generate call (caption.batch_size)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    p.add_argument("--skip-unshared", action="store_true",
                   help="skip the num_captions=10 run without shared cross-attention keys/values")
    args = p.parse_args()

    import torch
    from PIL import Image

    from capfilt.modeling.captioner import Decoding
    from capfilt.modeling.captioner import BlipCaptioner

    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    model, proc = load_model(args.model, args.device, args.dtype)
    files = sorted((ROOT / "tests" / "fixtures" / "coco" / "images").glob("*.jpg"))
    images = [Image.open(files[i % len(files)]).convert("RGB") for i in range(args.images)]
    seeds = list(range(args.images))
    import copy

    from capfilt.modeling.attention import use_fused_attention

    ours = copy.deepcopy(model)  # capfilt's side: fused attention, as BlipCaptioner.from_spec loads it
    use_fused_attention(ours)
    cap = BlipCaptioner(ours, proc)
    cap.generate(images[:1], [0], Decoding(num_captions=2, max_length=8))  # warm-up
    print(f"model={args.model} device={args.device} dtype={args.dtype} threads={torch.get_num_threads()} "
          f"images={args.images} batch_size={args.batch_size}")
    times = {}
    for n in (1, 10):
        cfg = Decoding(num_captions=n, batch_size=args.batch_size)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        out = cap.generate(images, seeds, cfg)
        if cuda:
            torch.cuda.synchronize()
        times[n] = dt = time.perf_counter() - t0
        n_caps = sum(len(c) for c in out)
        mem = f"  max_memory_allocated {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB" if cuda else ""
        print(f"num_captions={n:2d}: {dt:8.2f} s  {args.images / dt:7.2f} images/s  {n_caps / dt:7.2f} captions/s{mem}")
    print(f"cost ratio num_captions 10 vs 1: {times[10] / times[1]:.2f}x time for 10x the captions "
          f"({10 * times[1] / times[10]:.1f}x more captions per second)")
    naive_t = {}
    with torch.inference_mode():  # warm-up of the naive path (processor, generate)
        warm = proc(images=images[0], text="a picture of ", return_tensors="pt").to(args.device)
        warm["pixel_values"] = warm["pixel_values"].to(getattr(torch, args.dtype))
        model.generate(**warm, do_sample=True, max_length=8, num_return_sequences=2)
    for n in (1, 10):
        t0 = time.perf_counter()
        with torch.inference_mode():
            for im in images:  # the model card: one image per generate call
                inputs = proc(images=im, text="a picture of ", return_tensors="pt").to(args.device)
                inputs["pixel_values"] = inputs["pixel_values"].to(getattr(torch, args.dtype))
                model.generate(**inputs, do_sample=True, top_p=0.9, repetition_penalty=1.1, max_length=30,
                               min_length=5, num_return_sequences=n)
        if cuda:
            torch.cuda.synchronize()
        naive_t[n] = time.perf_counter() - t0
        print(f"naive (HF generate per image, num_return_sequences={n:2d}): {naive_t[n]:8.2f} s  "
              f"{args.images / naive_t[n]:7.2f} images/s")
    if not args.skip_unshared:
        _unshared(ours, proc, images, seeds, args, times, out, cuda)
    print(f"capfilt vs naive: num_captions=1 {naive_t[1] / times[1]:.2f}x, num_captions=10 "
          f"{naive_t[10] / times[10]:.2f}x")


def _unshared(model, proc, images, seeds, args, times, out, cuda) -> None:
    """Time num_captions=10 without the shared cross-attention keys/values (and check the captions)."""
    import torch

    from capfilt.modeling.captioner import BlipCaptioner, Decoding

    plain = BlipCaptioner(model, proc, share_cross_kv=False)
    cfg = Decoding(num_captions=10, batch_size=args.batch_size)
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    same = plain.generate(images, seeds, cfg) == out
    if cuda:
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    print(f"num_captions=10 without shared image K/V (generate re-projects the image per caption): {dt:8.2f} s "
          f"-> shared K/V is {dt / times[10]:.2f}x faster; identical captions: {same}")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
