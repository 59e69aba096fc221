"""capfilt.io.imaging: the Pillow front end, img2dataset's Resizer behind it, and memory on bombs."""

from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from capfilt import schema
from capfilt.config import DownloadConfig
from capfilt.io import imaging
from capfilt.io.imaging import (
    ImageProcessor, check_geometry, describe_non_image, load_upright_rgb, significant_bits, sniff_image_format,
)

ROOT = Path(__file__).resolve().parents[2]
TRICKY = ROOT / "tests" / "fixtures" / "tricky"
PHOTOS = ROOT / "tests" / "fixtures" / "photos"
BOMBS = ["pillow_decompression_bomb.gif", "pillow_bmp_b_reallybig.bmp", "pillow_png_decompression_dos.png",
         "pillow_decompression_bomb_extents.gif"]


def _decode(b: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(b)).convert("RGB")).astype(np.float64)


def _png(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG", **kw)
    return buf.getvalue()


def _jpeg(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=92, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def lossless():
    return ImageProcessor(DownloadConfig(resize_mode="no", encode_format="png", encode_quality=1))


@pytest.fixture(scope="module")
def hopper_l():
    return Image.open(TRICKY / "pillow_hopper.png").convert("L")


# ---------------------------------------------------------------------------------------------
# 16-bit scaling
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("top, bits", [(0, 8), (255, 8), (256, 10), (1023, 10), (4095, 12), (4096, 14),
                                       (16383, 14), (16384, 16), (65535, 16), (10**6, 16)])
def test_significant_bits(top, bits):
    assert significant_bits(top) == bits


@pytest.mark.parametrize("factor, bits", [(257, 16), (16, 12), (4, 10)])
def test_high_bit_depth_greyscale_scaled_by_its_bit_depth(lossless, hopper_l, factor, bits):
    """Full-range 16-bit, 12-bit-in-16 and 10-bit-in-16 copies of hopper all come out as hopper."""
    ref = np.asarray(hopper_l).astype(np.int64)
    deep = Image.fromarray((ref * factor).astype(np.uint16))  # mode I;16
    assert deep.mode == "I;16" and significant_bits(int((ref * factor).max())) == bits
    out = lossless(_png(deep))
    assert out.status == schema.SUCCESS
    got = _decode(out.image)[..., 0]
    assert np.abs(got - ref).mean() < 2.0  # not black (/65535 of 12-bit data) and not white (clipped)
    assert np.abs(got - ref).max() <= 3


def test_sixteen_bit_transparency_key_composited_on_white(lossless, hopper_l):
    ref = np.asarray(hopper_l).astype(np.uint16) * 257
    ref[:10, :10] = 1234
    im = Image.fromarray(ref)
    out = lossless(_png(im, transparency=1234))
    got = _decode(out.image)
    assert (got[:10, :10] == 255).all()
    assert np.abs(got[20:, 20:, 0] - ref[20:, 20:] / 257).mean() < 1.0


def test_float_mode_image(lossless):
    arr = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
    buf = io.BytesIO()
    Image.fromarray(arr, "F").save(buf, format="TIFF")
    out = lossless(buf.getvalue())
    assert out.status == schema.SUCCESS
    got = _decode(out.image)[..., 0]
    assert got.min() == 0 and got.max() == 255


# ---------------------------------------------------------------------------------------------
# sniffing and the one status rule
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, fmt", [
    ("pillow_hopper.jpg", "JPEG"), ("pillow_hopper.png", "PNG"), ("pillow_hopper.gif", "GIF"),
    ("pillow_hopper.webp", "WEBP"), ("pillow_12in16bit.tif", "TIFF"), ("pillow_l2rgb_read.bmp", "BMP"),
    ("pillow_avif_hopper.avif", "AVIF"), ("pillow_avif_hopper.heif", "HEIF"), ("pillow_sugarshack.mpo", "JPEG"),
    ("pillow_broken.png", "PNG"), ("lfs_pointer_1000268201_693b08cb0e.jpg", None),
])
def test_sniff_image_format(name, fmt):
    assert sniff_image_format((TRICKY / name).read_bytes()) == fmt


@pytest.mark.parametrize("body, kind", [
    (b"<!doctype html><html><body>Not an image</body></html>", "HTML page"),
    (b"  <HTML><head></head></HTML>", "HTML page"),
    (b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 12\n", "Git LFS pointer"),
    (b'{"error": "not found"}', "JSON/text"),
    (b"Access denied", "text"),
    (b"\x00\x01\x02\x03\xfe\xfe\xfe\xfe", "unknown data starting with 00 01 02 03 fe fe fe fe"),
])
def test_non_images_are_failed_to_download(lossless, body, kind):
    assert describe_non_image(body) == kind
    r = lossless(body, "image/jpeg; charset=binary")
    assert (r.status, r.error_message) == (schema.FAILED_TO_DOWNLOAD, f"not an image ({kind}, served as image/jpeg)")


def test_corrupt_images_are_failed_to_resize(lossless):
    good = (TRICKY / "pillow_hopper.png").read_bytes()
    for data in (good[:200], good[:8] + b"\0" * 300, b"\xff\xd8\xff\xe0" + b"\0" * 100, b"GIF89a" + b"\0" * 4):
        r = lossless(data)
        assert r.status == schema.FAILED_TO_RESIZE, (data[:10], r)
        assert r.error_message.startswith("cannot decode ")
    assert lossless(b"").status == schema.FAILED_TO_DOWNLOAD


# ---------------------------------------------------------------------------------------------
# geometry limits from the header (before decoding)
# ---------------------------------------------------------------------------------------------
def test_geometry_rules():
    check_geometry(100, 50, 50, 2.0)
    with pytest.raises(imaging.ImageFailure) as e:
        check_geometry(100, 49, 50, 10)
    assert (e.value.status, e.value.message) == (schema.TOO_SMALL, "image is 100x49 px, shorter side below 50")
    with pytest.raises(imaging.ImageFailure) as e:
        check_geometry(300, 100, 0, 2.5)
    assert (e.value.status, e.value.message) == (schema.TOO_LARGE, "aspect ratio 3.0 is over the limit of 2.5")


def test_limits_apply_before_decoding(monkeypatch):
    """too_small / too_large / pixel limit are decided from the header: no pixel is decoded."""
    data = (PHOTOS / "456_123.jpg").read_bytes()  # 456x123
    loads = []
    real_load = Image.Image.load

    def counting_load(self):
        loads.append(self.size)
        return real_load(self)

    monkeypatch.setattr(Image.Image, "load", counting_load)
    from PIL import ImageFile
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: (loads.append(self.size), real_load(self))[1])
    cases = [
        (DownloadConfig(min_image_size=124), schema.TOO_SMALL, "image is 456x123 px, shorter side below 124"),
        (DownloadConfig(max_aspect_ratio=3.0), schema.TOO_LARGE, "aspect ratio 3.7 is over the limit of 3"),
        (DownloadConfig(max_image_pixels=50_000), schema.TOO_LARGE, "image is 56,088 px, over the limit of 50,000"),
    ]
    for cfg, status, message in cases:
        r = ImageProcessor(cfg)(data)
        assert (r.status, r.error_message) == (status, message)
    assert loads == []
    assert ImageProcessor(DownloadConfig(min_image_size=123, max_aspect_ratio=3.8))(data).status == schema.SUCCESS


@pytest.mark.parametrize("size", [(1, 1), (63, 500), (16, 16)])
def test_default_floor_keeps_tiny_images_out_of_the_models(size):
    """A tracking pixel or an icon is ``too_small`` by default, not upscaled to 384 px and kept;
    ``min_image_size: 0`` (the shapes world, decode tests) still takes it."""
    data = _png(Image.new("RGB", size, (200, 30, 30)))
    r = ImageProcessor(DownloadConfig())(data)
    assert (r.status, r.image) == (schema.TOO_SMALL, None)
    assert r.error_message == f"image is {size[0]}x{size[1]} px, shorter side below 64"
    r = ImageProcessor(DownloadConfig(min_image_size=0))(data)
    assert r.status == schema.SUCCESS and min(r.width, r.height) == 384
    assert ImageProcessor(DownloadConfig())(_png(Image.new("RGB", (64, 64)))).status == schema.SUCCESS


def test_pillow_limit_is_never_disabled():
    assert Image.MAX_IMAGE_PIXELS == 89_478_485
    for path in (ROOT / "capfilt").rglob("*.py"):
        text = path.read_text()
        assert "MAX_IMAGE_PIXELS = None" not in text and "MAX_IMAGE_PIXELS=None" not in text, path


# ---------------------------------------------------------------------------------------------
# decode paths: DCT scaling, the JPEG fast path, output formats
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def big_jpeg():
    """A 2400x1800 photo (COCO image upscaled) with EXIF orientation 6 (stored sideways)."""
    src = Image.open(ROOT / "tests" / "fixtures" / "coco" / "images" / "000000000139.jpg").convert("RGB")
    big = src.resize((2400, 1800), Image.Resampling.BICUBIC)
    exif = Image.Exif()
    exif[0x0112] = 6
    return _jpeg(big, exif=exif.tobytes())


def test_dct_scaling_matches_full_decode(big_jpeg, monkeypatch):
    cfg = DownloadConfig(image_size=256)
    fast = ImageProcessor(cfg)(big_jpeg)
    monkeypatch.setattr(imaging, "_draft_size", lambda *a, **k: None)
    full = ImageProcessor(cfg)(big_jpeg)
    for r in (fast, full):
        assert r.status == schema.SUCCESS
        assert (r.original_width, r.original_height) == (1800, 2400)  # upright: portrait
        assert (r.width, r.height) == (256, 341)
    assert np.abs(_decode(fast.image) - _decode(full.image)).mean() < 2.0


def test_plain_jpeg_fast_path_matches_pillow_path(monkeypatch):
    data = (PHOTOS / "524_316.jpg").read_bytes()
    cfg = DownloadConfig(image_size=384)
    direct = ImageProcessor(cfg)(data)
    monkeypatch.setattr(imaging, "_is_complete_jpeg", lambda d: False)
    via_pillow = ImageProcessor(cfg)(data)
    assert (direct.width, direct.height) == (via_pillow.width, via_pillow.height) == (637, 384)
    assert (direct.original_width, direct.original_height) == (524, 316)
    assert np.abs(_decode(direct.image) - _decode(via_pillow.image)).mean() < 1.0


@pytest.mark.parametrize("mode, size, expect", [
    ("keep_ratio", 100, (100, 138)), ("center_crop", 100, (100, 100)), ("border", 100, (100, 100)),
    ("keep_ratio_largest", 100, (73, 100)), ("no", 100, (389, 535)),
])
def test_resize_modes_follow_img2dataset(mode, size, expect):
    r = ImageProcessor(DownloadConfig(image_size=size, resize_mode=mode))((PHOTOS / "389_535.jpg").read_bytes())
    assert r.status == schema.SUCCESS
    assert (r.width, r.height) == expect == Image.open(io.BytesIO(r.image)).size


def test_resize_only_if_bigger_keeps_small_images():
    data = (PHOTOS / "123_456.jpg").read_bytes()
    r = ImageProcessor(DownloadConfig(image_size=384, resize_only_if_bigger=True))(data)
    assert (r.width, r.height) == (123, 456)
    r = ImageProcessor(DownloadConfig(image_size=384))(data)
    assert (r.width, r.height) == (384, 1424)


@pytest.mark.parametrize("fmt, quality, pil_format", [("jpg", 90, "JPEG"), ("png", 3, "PNG"), ("webp", 80, "WEBP")])
def test_encode_formats(fmt, quality, pil_format):
    r = ImageProcessor(DownloadConfig(image_size=64, encode_format=fmt, encode_quality=quality))(
        (TRICKY / "pillow_transparent.png").read_bytes())
    out = Image.open(io.BytesIO(r.image))
    assert out.format == pil_format and out.mode == "RGB" and out.size == (85, 64)


def test_processor_pickles_and_is_thread_safe():
    proc = pickle.loads(pickle.dumps(ImageProcessor(DownloadConfig(image_size=64))))
    names = sorted(p.name for p in TRICKY.iterdir())
    datas = [(TRICKY / n).read_bytes() for n in names]
    serial = [proc(d) for d in datas]
    with ThreadPoolExecutor(8) as pool:
        parallel = list(pool.map(proc, datas * 3))
    assert parallel == serial * 3
    # the Resizer's stdout/stderr redirection must leave the descriptors as they were
    assert os.readlink("/proc/self/fd/1") != os.devnull and os.readlink("/proc/self/fd/2") != os.devnull


def test_load_upright_rgb_public_helper():
    img, original = load_upright_rgb((TRICKY / "pillow_orientation_rectangle.jpg").read_bytes())
    assert img.mode == "RGB" and img.size == (1, 2) and original == (1, 2)
    with pytest.raises(imaging.ImageFailure) as e:
        load_upright_rgb((TRICKY / "pillow_decompression_bomb.gif").read_bytes())
    assert e.value.status == schema.TOO_LARGE


# ---------------------------------------------------------------------------------------------
# memory on decompression bombs (issue #4, acceptance 5)
# ---------------------------------------------------------------------------------------------
_MEMORY_SCRIPT = r"""
import json, resource, sys
from capfilt.config import DownloadConfig
from capfilt.io.imaging import ImageProcessor, load_upright_rgb, ImageFailure

def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB

out = {"start": peak_mb(), "front_end": {}, "processor": {}}
for path in sys.argv[1:]:
    data = open(path, "rb").read()
    try:
        load_upright_rgb(data)
        status = "success"
    except ImageFailure as e:
        status = e.status
    out["front_end"][path.rsplit("/", 1)[-1]] = [status, peak_mb()]
proc = ImageProcessor(DownloadConfig())
_ = proc.resizer
out["after_imports"] = peak_mb()
for path in sys.argv[1:]:
    r = proc(open(path, "rb").read())
    out["processor"][path.rsplit("/", 1)[-1]] = [r.status, peak_mb()]
out["vm_hwm"] = int([l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM")][0]) / 1024
print(json.dumps(out))
"""


def test_bomb_decoding_peak_memory_under_500_mb():
    env = dict(os.environ, PYTHONPATH=str(ROOT), NO_ALBUMENTATIONS_UPDATE="1")
    # Started through a small shell that forks it: Linux carries a parent's peak RSS into a child
    # that it spawns directly (the high-water mark survives exec), so a direct child of a big pytest
    # process would report pytest's peak, not its own.
    proc = subprocess.run(["/bin/sh", "-c", '"$@"; exit $?', "sh", sys.executable, "-c", _MEMORY_SCRIPT,
                           *[str(TRICKY / b) for b in BOMBS]], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    expected = {"pillow_decompression_bomb.gif": schema.TOO_LARGE, "pillow_bmp_b_reallybig.bmp": schema.TOO_LARGE,
                "pillow_png_decompression_dos.png": schema.TOO_LARGE,
                "pillow_decompression_bomb_extents.gif": schema.SUCCESS}
    for stage in ("front_end", "processor"):
        assert {k: v[0] for k, v in res[stage].items()} == expected
        for name, (_, peak) in res[stage].items():
            assert peak < 500, f"{stage} {name}: peak RSS {peak:.0f} MB"
    assert res["vm_hwm"] < 500, res  # the kernel's own peak-RSS figure agrees
    # decoding itself adds almost nothing: the bombs are refused from their headers
    front_growth = max(v[1] for v in res["front_end"].values()) - res["start"]
    proc_growth = max(v[1] for v in res["processor"].values()) - res["after_imports"]
    assert front_growth < 50 and proc_growth < 50, res


def test_unforeseen_errors_become_failed_to_resize(monkeypatch):
    def boom(*args):
        raise RuntimeError("decoder exploded")

    monkeypatch.setattr(imaging, "_decode_upright", boom)
    r = ImageProcessor(DownloadConfig())((TRICKY / "pillow_transparent.png").read_bytes())
    assert r.status == schema.FAILED_TO_RESIZE
    assert r.error_message == "cannot process image: RuntimeError: decoder exploded"
