"""Decode/resize choices of capfilt.io.imaging, measured side by side in one run.

Run::

    PYTHONPATH=. python benchmarks/bench_decode_memory.py [--repeat 3]

Measures (CPU time of this process per image, best of ``--repeat`` passes, variants interleaved, so that
other load on a shared machine distorts less; the Resizer runs cv2 single-threaded):

1. hand-off format from the Pillow front end to img2dataset's Resizer: PPM (chosen) vs BMP vs
   PNG at compression 1 and 6, for 320 px COCO photos and a 2400x1800 photo;
2. plain upright RGB JPEG: original bytes straight to the Resizer (chosen) vs Pillow decode + PPM;
3. large JPEG to 384 px: libjpeg DCT scaling (``Image.draft``, chosen) vs full-size decode;
4. importing img2dataset's Resizer + is_disallowed: capfilt's loader vs ``import img2dataset``
   (wall time and peak RSS, each in a fresh subprocess);
5. peak RSS while decoding the four decompression-bomb fixtures (fresh subprocess).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from PIL import Image  # noqa: E402

from capfilt.config import DownloadConfig  # noqa: E402
from capfilt.io import imaging  # noqa: E402
from capfilt.io.imaging import ImageProcessor  # noqa: E402

COCO = sorted((ROOT / "tests" / "fixtures" / "coco" / "images").glob("*.jpg"))
TRICKY = ROOT / "tests" / "fixtures" / "tricky"


def best_per_item(fn, items, repeat: int) -> float:
    """Best-of-``repeat`` CPU seconds per item of ``fn`` over ``items`` (time.process_time)."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.process_time()
        for it in items:
            fn(it)
        best = min(best, (time.process_time() - t0) / len(items))
    return best


def big_photo(size=(2400, 1800)) -> bytes:
    """A real COCO photo upscaled to ``size`` (width, height) pixels, as JPEG q90 bytes."""
    src = Image.open(COCO[0]).convert("RGB").resize(size, Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    src.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def handoff(repeat: int) -> None:
    """Compare hand-off formats (PPM, BMP, PNG) from the Pillow front end to img2dataset's Resizer."""
    proc = ImageProcessor(DownloadConfig())
    resizer = proc.resizer
    small = [Image.open(p).convert("RGB") for p in COCO[:40]]
    large = [Image.open(io.BytesIO(big_photo())).convert("RGB")]
    formats = {"PPM": dict(format="PPM"), "BMP": dict(format="BMP"),
               "PNG-1": dict(format="PNG", compress_level=1), "PNG-6": dict(format="PNG", compress_level=6)}
    print("\n1. hand-off format, Pillow RGB image -> encode -> img2dataset Resizer (CPU ms/image)")
    print(f"   {'images':<22}" + "".join(f"{k:>9}" for k in formats) + "   PNG-1/PPM")
    for label, imgs in (("40 COCO ~320 px", small), ("1 photo 2400x1800", large)):
        row = {}
        for name, kw in formats.items():
            def run(im, kw=kw):
                """Encode ``im`` with these save options and resize it; returns the Resizer's output."""
                buf = io.BytesIO()
                im.save(buf, **kw)
                out = resizer(io.BytesIO(buf.getvalue()))
                assert out[-1] is None, out[-1]
            row[name] = best_per_item(run, imgs, repeat) * 1e3
        print(f"   {label:<22}" + "".join(f"{v:9.2f}" for v in row.values()) + f"   {row['PNG-1'] / row['PPM']:.2f}x")


def interleaved(variants: dict, items, repeat: int) -> dict[str, float]:
    """Best CPU seconds per item of each variant; variants alternate within every pass so that load from
    other processes on a shared machine hits them alike. ``variants``: name -> (setup, teardown, fn)."""
    best = {k: float("inf") for k in variants}
    for _ in range(repeat):
        for name, (enter, leave, fn) in variants.items():
            enter()
            try:
                t0 = time.process_time()
                for it in items:
                    fn(it)
                best[name] = min(best[name], (time.process_time() - t0) / len(items))
            finally:
                leave()
    return best


def _patch(name, value):
    real = getattr(imaging, name)
    return (lambda: setattr(imaging, name, value)), (lambda: setattr(imaging, name, real))


def fast_path(repeat: int) -> None:
    """Plain upright JPEGs: original bytes to the Resizer vs a full Pillow decode first."""
    datas = [p.read_bytes() for p in COCO[:40]]
    proc = ImageProcessor(DownloadConfig())
    _ = proc.resizer
    noop = (lambda: None, lambda: None)
    t = interleaved({"direct": (*noop, proc), "pillow": (*_patch("_is_complete_jpeg", lambda d: False), proc)},
                    datas, repeat)
    print("\n2. plain RGB JPEG (40 COCO ~320 px -> 384), CPU ms/image")
    print(f"   original bytes to Resizer {t['direct'] * 1e3:7.2f}   Pillow decode + PPM {t['pillow'] * 1e3:7.2f}   "
          f"ratio {t['pillow'] / t['direct']:.2f}x")


def draft(repeat: int) -> None:
    """Large JPEGs to 384 px: DCT-scaled (draft) decode vs full decode."""
    data = [big_photo((2400, 1800)), big_photo((4000, 3000))]
    proc = ImageProcessor(DownloadConfig())
    _ = proc.resizer
    noop = (lambda: None, lambda: None)
    t = interleaved({"scaled": (*noop, proc), "full": (*_patch("_draft_size", lambda *a, **k: None), proc)},
                    data, repeat)
    print("\n3. large JPEG (2400x1800 and 4000x3000 -> 384), CPU ms/image")
    print(f"   DCT-scaled decode {t['scaled'] * 1e3:7.1f}   full decode {t['full'] * 1e3:7.1f}   "
          f"ratio {t['full'] / t['scaled']:.2f}x")


def _fresh(cmd: list[str]) -> list[str]:
    """Run ``cmd`` as a grandchild forked by a small shell: a direct child inherits this process's
    peak RSS in ``ru_maxrss`` on Linux (the high-water mark survives exec)."""
    return ["/bin/sh", "-c", '"$@"; exit $?', "sh", *cmd]


_IMPORT = r"""
import resource, time, os, sys, json
os.environ["NO_ALBUMENTATIONS_UPDATE"] = "1"
t = time.perf_counter()
if sys.argv[1] == "capfilt":
    from capfilt.io._img2dataset import resizer_class, preload
    preload(); resizer_class()
else:
    import img2dataset
    from img2dataset.resizer import Resizer
    from img2dataset.downloader import is_disallowed
print(json.dumps([time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "torch" in sys.modules]))
"""


def imports() -> None:
    """Import time (s) and RSS (MB) of capfilt's img2dataset parts vs ``import img2dataset``, in subprocesses."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    res = {}
    for which in ("capfilt", "img2dataset"):
        out = subprocess.run(_fresh([sys.executable, "-c", _IMPORT, which]), capture_output=True, text=True,
                             env=env, check=True)
        res[which] = json.loads(out.stdout.strip().splitlines()[-1])
    (tc, mc, torch_c), (ti, mi, torch_i) = res["capfilt"], res["img2dataset"]
    print("\n4. importing img2dataset's Resizer + is_disallowed (fresh process)")
    print(f"   capfilt loader      {tc:5.2f} s  peak RSS {mc:6.0f} MB  torch imported: {torch_c}")
    print(f"   import img2dataset  {ti:5.2f} s  peak RSS {mi:6.0f} MB  torch imported: {torch_i}")
    print(f"   ratio               {ti / tc:5.2f}x          {mi / mc:6.2f}x")


_BOMBS = r"""
import resource, sys, json
from capfilt.config import DownloadConfig
from capfilt.io.imaging import ImageProcessor
p = ImageProcessor(DownloadConfig()); _ = p.resizer
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
rows = []
for f in sys.argv[1:]:
    r = p(open(f, "rb").read())
    rows.append([f.rsplit("/", 1)[-1], r.status, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024])
print(json.dumps([base, rows]))
"""


def bombs() -> None:
    """Peak RSS (MB) while decoding each decompression-bomb fixture, in a fresh subprocess."""
    files = ["pillow_decompression_bomb.gif", "pillow_bmp_b_reallybig.bmp", "pillow_png_decompression_dos.png",
             "pillow_decompression_bomb_extents.gif"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run(_fresh([sys.executable, "-c", _BOMBS, *[str(TRICKY / f) for f in files]]),
                         capture_output=True, text=True, env=env, check=True)
    base, rows = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"\n5. decompression bombs, peak RSS (after imports: {base:.0f} MB; limit in the test: 500 MB)")
    for name, status, peak in rows:
        print(f"   {name:<40} {status:<10} {peak:6.0f} MB  (+{peak - base:.0f})")


def main() -> None:
    """Run the decode/memory benchmarks and print their ratios."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    print(f"python {sys.version.split()[0]}, Pillow {Image.__version__}, cpu count {os.cpu_count()}")
    handoff(args.repeat)
    fast_path(args.repeat)
    draft(args.repeat)
    imports()
    bombs()


if __name__ == "__main__":
    main()
