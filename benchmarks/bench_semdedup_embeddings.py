"""Do a preset's filter image embeddings separate near-copies from distinct images? (semantic dedup)

Embeds images and near-copies of them (1-2 px / 2.5 % crop, resize, JPEG re-encode) with the
preset's BLIP filter (``BlipScorer.score(..., embed=True)``: the ITC image embedding semantic dedup
uses) and prints the cosine of each image with its copy and, for distinct images, the cosine with
the most similar other image; then, per threshold, the share of copies found and how many distinct
pairs would also count as duplicates.

``python benchmarks/bench_semdedup_embeddings.py --models shapes --images shapes``  (300 shapes-world scenes)
``python benchmarks/bench_semdedup_embeddings.py --models tiny --images coco``      (the 79 bundled photos)
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from capfilt.config import load_preset  # noqa: E402
from capfilt.modeling.blip_scorer import BlipScorer  # noqa: E402


def copy_of(im: Image.Image, crop: int, scale: float, quality: int) -> Image.Image:
    """A near-copy: ``crop`` px off each side, resized by ``scale``, JPEG at ``quality``."""
    w, h = im.size
    im = im.crop((crop, crop, w - crop, h - crop)).resize((max(1, int(w * scale)), max(1, int(h * scale))))
    buf = io.BytesIO()
    im.convert("RGB").save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def main() -> None:
    """Embed, compare, print."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="shapes")
    ap.add_argument("--images", choices=["shapes", "coco"], default="shapes")
    ap.add_argument("--n", type=int, default=300, help="shapes-world scenes")
    args = ap.parse_args()
    preset = load_preset(args.models)
    scorer = BlipScorer.from_spec(preset.filter, preset, ["itm"])
    if args.images == "coco":
        ims = [Image.open(f).convert("RGB") for f in sorted((ROOT / "tests/fixtures/coco/images").glob("*.jpg"))]
        copies = [copy_of(im, im.width // 40, 0.75, 60) for im in ims]
    else:
        from capfilt.synthetic.splits import generate

        ims = [Image.open(io.BytesIO(r.image)).convert("RGB") for r in generate("web", args.n, seed=5)]
        copies = [copy_of(im, 2, 1.0, 60) for im in ims]

    def embed(xs: list[Image.Image]) -> np.ndarray:
        """L2-normalised image embeddings of ``xs``, float32 ``(len(xs), D)``, 32 images per forward."""
        out = []
        for i in range(0, len(xs), 32):
            out += [r.image_embedding for r in scorer.score(xs[i:i + 32], [[]] * len(xs[i:i + 32]), embed=True)]
        return np.stack(out)

    e, c = embed(ims), embed(copies)
    pair = (e * c).sum(1)
    sims = e @ e.T
    np.fill_diagonal(sims, -1)
    print(f"{args.models} on {len(ims)} {args.images} images, embedding dim {e.shape[1]}")
    print(f"image vs its copy: min {pair.min():.4f}  5th pct {np.percentile(pair, 5):.4f}  median {np.median(pair):.4f}")
    near = sims.max(1)
    print(f"distinct images, most similar other: median {np.median(near):.4f}  95th pct {np.percentile(near, 95):.4f}  "
          f"max {near.max():.4f}")
    pairs = len(e) * (len(e) - 1) // 2
    for t in (0.9, 0.95, 0.97, 0.98, 0.99):
        print(f"threshold {t}: copies found {(pair >= t).mean():.3f}; distinct pairs >= t: "
              f"{int((np.triu(sims, 1) >= t).sum())} of {pairs}")


if __name__ == "__main__":
    main()
