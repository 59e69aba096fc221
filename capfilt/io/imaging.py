"""Decode, normalise and resize one downloaded image: a Pillow safety front end + img2dataset's Resizer.

img2dataset's :class:`img2dataset.resizer.Resizer` (cv2 + albumentations) does the resizing and
encoding, with capfilt's ``image_size`` / ``resize_mode`` / ``resize_only_if_bigger`` /
``encode_format`` / ``encode_quality``. It decodes with ``cv2.IMREAD_UNCHANGED``, which ignores
EXIF orientation, passes 16-bit and greyscale data through unchanged and has no pixel limit, so
capfilt puts a Pillow front end before it that turns any web image into an upright 8-bit RGB
image first:

1. **Sniff, don't trust names**: the format comes from the bytes (a WebP named ``.png`` works).
2. **Bound memory before decoding**: ``width * height`` from the header is compared with
   ``max_image_pixels`` (and Pillow's own ``Image.MAX_IMAGE_PIXELS``, never disabled) before any
   pixel is decoded; Pillow's ``DecompressionBombWarning`` is turned into an error and
   ``DecompressionBombError`` / the PNG text-chunk bomb (``ValueError``) are caught: ``too_large``.
   ``min_image_size`` (shorter side) gives ``too_small`` and ``max_aspect_ratio`` gives
   ``too_large``, also from the header. Large JPEGs are decoded with libjpeg's DCT scaling
   (:meth:`PIL.Image.Image.draft`) straight to the smallest size still at least the target size.
3. **First frame** of animations (GIF, WebP, APNG) and multi-picture files (MPO).
4. **Upright**: EXIF orientation applied (:func:`PIL.ImageOps.exif_transpose`, including EXIF
   in PNG/WebP and XMP orientation); broken EXIF falls back to no rotation.
5. **RGB**: CMYK (also Adobe-inverted JPEG, which Pillow un-inverts on decode) converted with
   Pillow's conversion; alpha, ``tRNS`` colour keys, ``LA`` and palettes with transparency are
   composited on **white** (as img2dataset's Resizer does for 4-channel images); greyscale and
   bilevel become 3-channel.
6. **16-bit** single-channel images (``I;16*``, ``I``) are scaled by their *significant* bit
   depth: the smallest of 8, 10, 12, 14 or 16 bits that holds the image's largest value. Pure
   ``/ 65535`` scaling would show the 10/12/14-bit data that cameras and scientific TIFFs store
   in 16-bit containers (the ``12in16bit.tif`` case) as black; Pillow's ``convert("L")`` clips
   instead and shows real 16-bit photos as white. The price: a genuinely 16-bit image whose
   values all stay below 256 is shown brighter than a strict viewer would.

Then the normalised RGB image is handed to the Resizer as uncompressed PPM bytes: lossless, and
2.5x (320 px) to 12x (2400x1800) cheaper than PNG at compression level 1. A complete, upright,
RGB JPEG that needs no DCT scaling skips Pillow's decode and goes to the Resizer as its original
bytes (1.08x). DCT scaling makes large JPEGs 1.9x cheaper. Numbers: ``benchmarks/RESULTS.md``
(``benchmarks/bench_decode_memory.py``).

Status rule (one rule, applied to every body): a body whose bytes are **not an image at all**
(HTML, text, JSON, a Git-LFS pointer, unknown data without any image signature) is
``failed_to_download`` ("not an image (HTML page, served as image/jpeg)"): the server did not
deliver an image. A body that **is** an image by its signature but cannot be decoded (truncated,
corrupt, a zero-width GIF, an unsupported codec such as HEIF) is ``failed_to_resize``.
"""

from __future__ import annotations

import io
import math
import threading
import warnings
from dataclasses import dataclass

from capfilt import schema
from capfilt.errors import shorten

# Serialises Image.open (the only step that can emit DecompressionBombWarning) while the warning
# is turned into an error: warnings.catch_warnings is process-global, not thread-local.
_OPEN_LOCK = threading.Lock()
# img2dataset's Resizer redirects the process's stdout/stderr file descriptors (dup2) while it
# runs; two threads doing that at once can leave fd 1/2 pointing at /dev/null. One at a time.
_RESIZE_LOCK = threading.Lock()

_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}


@dataclass(frozen=True)
class ImageResult:
    """The outcome of processing one image.

    Attributes:
        status: ``success``, ``failed_to_download`` (body not an image), ``failed_to_resize``,
            ``too_small`` or ``too_large``.
        error_message: short readable reason, ``None`` on success.
        image: encoded bytes in ``encode_format`` (JPEG by default) on success.
        width, height: size of ``image`` in pixels.
        original_width, original_height: size of the upright decoded image before resizing
            (EXIF orientation applied, so a portrait photo stored sideways reports portrait).
        error_class: the failure's class when the producer knew it (the fetcher's), else ``None``
            (then :func:`capfilt.io.failures.classify` of status and message decides).
    """

    status: str
    error_message: str | None = None
    image: bytes | None = None
    width: int | None = None
    height: int | None = None
    original_width: int | None = None
    original_height: int | None = None
    error_class: str | None = None


class ImageFailure(Exception):
    """Processing ended with a non-success status (``status``, ``message``)."""

    def __init__(self, status: str, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


# ---------------------------------------------------------------------------------------------
# sniffing
# ---------------------------------------------------------------------------------------------
def sniff_image_format(data: bytes) -> str | None:
    """The image container named by the first bytes, or ``None`` when they match no image format.

    Recognises JPEG, PNG, GIF, WebP, BMP, TIFF, ICO/CUR, HEIF/AVIF (ISO-BMFF ``ftyp``), JPEG 2000,
    JPEG XL, PSD, QOI and SVG. Only the signature is checked; the rest may still be corrupt.
    """
    head = data[:64]
    if head.startswith(b"\xff\xd8"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[:2] == b"BM":
        return "BMP"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "TIFF"
    if head[:4] in (b"\x00\x00\x01\x00", b"\x00\x00\x02\x00"):
        return "ICO"
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in (b"avif", b"avis"):
            return "AVIF"
        if brand in (b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1"):
            return "HEIF"
        return None
    if head.startswith(b"\x00\x00\x00\x0cjP  ") or head.startswith(b"\xff\x4f\xff\x51"):
        return "JPEG2000"
    if head.startswith(b"\xff\x0a") or head.startswith(b"\x00\x00\x00\x0cJXL "):
        return "JPEGXL"
    if head[:4] == b"8BPS":
        return "PSD"
    if head[:4] == b"qoif":
        return "QOI"
    text = head.lstrip().lower()
    if text.startswith(b"<svg") or (text.startswith(b"<?xml") and b"<svg" in data[:1024].lower()):
        return "SVG"
    return None


def describe_non_image(data: bytes) -> str:
    """A short name for a body that is not an image: ``"HTML page"``, ``"Git LFS pointer"``, ...

    Args:
        data: the response body (only the first 1 KiB is looked at).
    """
    head = data[:1024].lstrip()
    low = head.lower()
    if data[:2] == b"\x1f\x8b":
        return "gzip data: a Content-Encoding capfilt does not decode"
    if low.startswith(b"version https://git-lfs"):
        return "Git LFS pointer"
    if low.startswith((b"<!doctype html", b"<html", b"<head", b"<body")) or b"<html" in low:
        return "HTML page"
    if low.startswith((b"{", b"[")):
        return "JSON/text"
    if low.startswith(b"<?xml") or low.startswith(b"<"):
        return "XML/text"
    try:
        head.decode("utf-8")
        return "text"
    except UnicodeDecodeError:
        return f"unknown data starting with {data[:8].hex(' ')}"


# ---------------------------------------------------------------------------------------------
# Pillow front end
# ---------------------------------------------------------------------------------------------
def _open(data: bytes):
    from PIL import Image

    with _OPEN_LOCK, warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        return Image.open(io.BytesIO(data))


def open_image(data: bytes, max_image_pixels: int, content_type: str | None = None):
    """Open ``data`` with Pillow (header only) and check its pixel count before any decoding.

    Args:
        data: the encoded image bytes.
        max_image_pixels: ``width * height`` above this is refused (Pillow's own limit
            ``Image.MAX_IMAGE_PIXELS`` also applies; it is never disabled).
        content_type: the server's ``Content-Type``, used only in messages.

    Returns:
        An unloaded ``PIL.Image.Image`` (first frame selected).

    Raises:
        ImageFailure: ``too_large`` (pixel count, decompression bombs), ``failed_to_download``
            (the bytes are not an image), ``failed_to_resize`` (an image that cannot be parsed).
    """
    from PIL import Image

    fmt = sniff_image_format(data)
    try:
        im = _open(data)
    except Image.DecompressionBombError as e:
        raise ImageFailure(schema.TOO_LARGE, _bomb_message(str(e), max_image_pixels)) from None
    except Image.DecompressionBombWarning as e:
        raise ImageFailure(schema.TOO_LARGE, _bomb_message(str(e), max_image_pixels)) from None
    except ValueError as e:
        if "MAX_TEXT" in str(e) or "too large" in str(e).lower():
            raise ImageFailure(schema.TOO_LARGE, f"PNG text chunk too large (decompression bomb): {e}") from None
        raise _undecodable(data, fmt, e, content_type) from None
    except Exception as e:  # noqa: BLE001 - any parser error is row data
        raise _undecodable(data, fmt, e, content_type) from None
    w, h = im.size
    limit = min(max_image_pixels, Image.MAX_IMAGE_PIXELS or max_image_pixels)
    if w * h > limit:
        raise ImageFailure(schema.TOO_LARGE, f"image is {w * h:,} px, over the limit of {limit:,}")
    if w <= 0 or h <= 0:
        raise ImageFailure(schema.FAILED_TO_RESIZE, f"{im.format} image has zero size {w}x{h}")
    return im


def _bomb_message(text: str, limit: int) -> str:
    import re

    m = re.search(r"\((\d+) pixels\)", text)
    if m:
        return f"image is {int(m.group(1)):,} px, over the limit of {limit:,}"
    return f"decompression bomb: {text}"


def _undecodable(data: bytes, fmt: str | None, e: BaseException, content_type: str | None) -> ImageFailure:
    served = f", served as {content_type.split(';')[0].strip()}" if content_type else ""
    if fmt is None:
        return ImageFailure(schema.FAILED_TO_DOWNLOAD, f"not an image ({describe_non_image(data)}{served})")
    if fmt in ("HEIF", "SVG", "JPEGXL", "PSD", "QOI"):
        return ImageFailure(schema.FAILED_TO_RESIZE, f"unsupported image format ({fmt})")
    return ImageFailure(schema.FAILED_TO_RESIZE, f"cannot decode {fmt} image: {_short_error(e)}")


def _short_error(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    if "cannot identify image file" in text:
        return "unrecognised or corrupt data"
    return shorten(text, 100)


def check_geometry(width: int, height: int, min_image_size: int, max_aspect_ratio: float) -> None:
    """Refuse images that are too small or too elongated (img2dataset's resizer rules).

    Args:
        width, height: pixel size (orientation does not matter).
        min_image_size: the shorter side must be at least this many pixels.
        max_aspect_ratio: long side / short side must not exceed this.

    Raises:
        ImageFailure: ``too_small`` or ``too_large``.
    """
    short, long = min(width, height), max(width, height)
    if short < min_image_size:
        raise ImageFailure(schema.TOO_SMALL, f"image is {width}x{height} px, shorter side below {min_image_size}")
    if long / short > max_aspect_ratio:
        raise ImageFailure(schema.TOO_LARGE,
                           f"aspect ratio {long / short:.1f} is over the limit of {max_aspect_ratio:g}")


def _draft_size(width: int, height: int, image_size: int, resize_mode: str) -> tuple[int, int] | None:
    """Smallest (w, h) the Resizer still needs at full quality, or ``None`` for no DCT scaling.

    Only images that the Resizer will shrink anyway are scaled (so ``resize_only_if_bigger`` needs
    no special case), and only down to twice the target size.
    """
    if resize_mode in ("keep_ratio", "center_crop"):
        side = min(width, height)
    elif resize_mode in ("border", "keep_ratio_largest"):
        side = max(width, height)
    else:
        return None
    if side <= image_size:
        return None
    # Keep at least twice the target so the Resizer's area filter still averages real pixels.
    scale = 2 * image_size / side
    if scale >= 1:
        return None
    return (math.ceil(width * scale), math.ceil(height * scale))


def to_rgb(im):
    """Convert a loaded Pillow image of any mode to 8-bit ``RGB``, compositing transparency on white.

    Args:
        im: a loaded ``PIL.Image.Image`` (any mode: ``1``, ``L``, ``P``, ``I;16``, ``I``, ``F``,
            ``LA``, ``RGBA``, ``CMYK``, ``YCbCr``, ...).

    Returns:
        A ``PIL.Image.Image`` in mode ``RGB``, same size.

    Raises:
        ValueError: for modes Pillow cannot convert (caught by the caller as ``failed_to_resize``).
    """
    from PIL import Image

    if im.mode in _SIXTEEN_BIT_MODES or im.mode == "F":
        return _high_depth_to_rgb(im)
    if im.mode == "RGB" and "transparency" not in im.info:
        return im
    if im.mode in _ALPHA_MODES or im.has_transparency_data:
        rgba = im.convert("RGBA")
        out = Image.new("RGB", im.size, (255, 255, 255))
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    return im.convert("RGB")


def significant_bits(max_value: int) -> int:
    """Bits used by data whose largest value is ``max_value``: 8, 10, 12, 14 or 16 (capped at 16)."""
    for bits in (8, 10, 12, 14, 16):
        if max_value < (1 << bits):
            return bits
    return 16


def _high_depth_to_rgb(im):
    import numpy as np
    from PIL import Image

    a = np.asarray(im)
    key = im.info.get("transparency")
    if im.mode == "F":
        f = np.nan_to_num(a.astype(np.float32))
        scale = 255.0 if f.max(initial=0) <= 1.0 else 1.0
        grey = np.clip(f * scale, 0, 255).round().astype(np.uint8)
    else:
        a = a.astype(np.int64)
        top = int(a.max(initial=0))
        bits = significant_bits(max(top, 0))
        grey = np.clip(np.rint(np.clip(a, 0, None) * (255.0 / ((1 << bits) - 1))), 0, 255).astype(np.uint8)
    rgb = Image.fromarray(np.repeat(grey[..., None], 3, axis=2), "RGB")
    if isinstance(key, int) and im.mode != "F":
        mask = Image.fromarray(((np.asarray(im) != key) * 255).astype(np.uint8), "L")
        out = Image.new("RGB", im.size, (255, 255, 255))
        out.paste(rgb, mask=mask)
        return out
    return rgb


def load_upright_rgb(data: bytes, *, max_image_pixels: int = 89_478_485, min_image_size: int = 0,
                     max_aspect_ratio: float = float("inf"), draft_to: tuple[int, int] | None = None,
                     content_type: str | None = None):
    """Decode ``data`` to an upright 8-bit RGB Pillow image with every safety check applied.

    Args:
        data: encoded image bytes (any format Pillow reads; AVIF included, HEIF not).
        max_image_pixels: header pixel limit (see :func:`open_image`).
        min_image_size: shorter side limit (pixels, ``too_small``).
        max_aspect_ratio: long/short limit (``too_large``).
        draft_to: for JPEGs, let libjpeg decode at 1/2, 1/4 or 1/8 scale as long as the result is
            at least this upright ``(w, h)`` (``None``: full size).
        content_type: the server's ``Content-Type``, for messages only.

    Returns:
        ``(image, (original_width, original_height))``: ``image`` is a ``PIL.Image.Image`` in mode
        ``RGB``, upright; the original size is the full-resolution upright size (before any DCT
        scaling).

    Raises:
        ImageFailure: ``too_large``, ``too_small``, ``failed_to_download`` (not an image) or
            ``failed_to_resize`` (corrupt/truncated/unsupported).
    """
    im = open_image(data, max_image_pixels, content_type)
    check_geometry(im.size[0], im.size[1], min_image_size, max_aspect_ratio)
    return _decode_upright(im, data, draft_to, max_image_pixels)


def _decode_upright(im, data: bytes, draft_to: tuple[int, int] | None, max_image_pixels: int):
    from PIL import Image, ImageOps

    fmt = im.format or sniff_image_format(data) or "image"
    w, h = im.size
    try:
        if draft_to is not None and im.format in ("JPEG", "MPO") and im.mode in ("RGB", "L", "CMYK"):
            dw, dh = draft_to
            if _orientation(im) in (5, 6, 7, 8):  # stored sideways: the draft box is too
                dw, dh = dh, dw
            im.draft(im.mode, (dw, dh))
        im.load()
    except Image.DecompressionBombError as e:
        raise ImageFailure(schema.TOO_LARGE, _bomb_message(str(e), max_image_pixels)) from None
    except MemoryError:
        raise ImageFailure(schema.TOO_LARGE, f"out of memory decoding a {w}x{h} {fmt} image") from None
    except Exception as e:  # noqa: BLE001 - truncated/corrupt data is row data
        raise ImageFailure(schema.FAILED_TO_RESIZE, f"cannot decode {fmt} image: {_short_error(e)}") from None
    stored = im.size
    try:
        upright = ImageOps.exif_transpose(im) or im
    except Exception:  # noqa: BLE001 - broken EXIF: keep the stored orientation
        upright = im
    # Full-resolution size (before DCT scaling), in the upright orientation.
    original = (h, w) if upright.size != stored else (w, h)
    try:
        rgb = to_rgb(upright)
    except Exception as e:  # noqa: BLE001
        raise ImageFailure(schema.FAILED_TO_RESIZE,
                           f"cannot convert {fmt} mode {upright.mode} to RGB: {_short_error(e)}") from None
    return rgb, original


# ---------------------------------------------------------------------------------------------
# the processor
# ---------------------------------------------------------------------------------------------
class ImageProcessor:
    """Turns downloaded bytes into the stored image: Pillow front end + img2dataset's Resizer.

    Args:
        cfg: a :class:`capfilt.config.DownloadConfig` (``image_size``, ``resize_mode``,
            ``resize_only_if_bigger``, ``encode_format``, ``encode_quality``, ``min_image_size``,
            ``max_image_pixels``, ``max_aspect_ratio``).

    Calling it is thread-safe; the Resizer step runs one at a time per process (it redirects the
    process's stdout/stderr while it works). The Resizer is created on first use (so the
    processor pickles cheaply).
    """

    def __init__(self, cfg):
        self.cfg = cfg
        self._resizer = None

    def __getstate__(self):
        return {"cfg": self.cfg, "_resizer": None}

    @property
    def resizer(self):
        """The img2dataset ``Resizer`` configured from ``cfg`` (built on first access)."""
        if self._resizer is None:
            from capfilt.io._img2dataset import resizer_class

            c = self.cfg
            # Size/area/aspect rules are applied here before decoding, with capfilt's statuses;
            # the Resizer's own copies of them stay at their permissive defaults.
            self._resizer = resizer_class()(
                image_size=c.image_size,
                resize_mode=c.resize_mode,
                resize_only_if_bigger=c.resize_only_if_bigger,
                encode_format=c.encode_format,
                encode_quality=c.encode_quality,
            )
        return self._resizer

    def __call__(self, data: bytes, content_type: str | None = None) -> ImageResult:
        """Process one body.

        Args:
            data: the downloaded bytes.
            content_type: the server's ``Content-Type`` (messages only; the bytes decide).

        Returns:
            An :class:`ImageResult`; never raises for anything the bytes can contain.
        """
        try:
            return self._process(data, content_type)
        except ImageFailure as f:
            return ImageResult(f.status, f.message)
        except Exception as e:  # noqa: BLE001 - an unforeseen decoder error is still row data
            return ImageResult(schema.FAILED_TO_RESIZE, f"cannot process image: {type(e).__name__}: {_short_error(e)}")

    def _process(self, data: bytes, content_type: str | None) -> ImageResult:
        c = self.cfg
        if not data:
            raise ImageFailure(schema.FAILED_TO_DOWNLOAD, "empty body (0 bytes)")
        im = open_image(data, c.max_image_pixels, content_type)
        w, h = im.size
        check_geometry(w, h, c.min_image_size, c.max_aspect_ratio or float("inf"))
        draft = None
        if im.format in ("JPEG", "MPO"):
            draft = _draft_size(w, h, c.image_size, c.resize_mode)
        if (draft is None and im.format == "JPEG" and im.mode == "RGB" and _orientation(im) == 1
                and _is_complete_jpeg(data)):
            # A plain upright RGB JPEG: cv2 decodes the original bytes, no Pillow decode needed.
            return self._resize(data, (w, h), "JPEG")
        rgb, original = _decode_upright(im, data, draft, c.max_image_pixels)
        buf = io.BytesIO()
        rgb.save(buf, format="PPM")
        return self._resize(buf.getvalue(), original, "PPM")

    def _resize(self, encoded: bytes, original: tuple[int, int], what: str) -> ImageResult:
        with _RESIZE_LOCK:
            img, width, height, _ow, _oh, err = self.resizer(io.BytesIO(encoded))
        if err is not None or img is None:
            return ImageResult(schema.FAILED_TO_RESIZE, f"resize failed ({what}): {err}")
        return ImageResult(schema.SUCCESS, None, img, int(width), int(height), int(original[0]), int(original[1]))


def _orientation(im) -> int:
    try:
        return int(im.getexif().get(0x0112, 1) or 1)
    except Exception:  # noqa: BLE001
        return 0


def _is_complete_jpeg(data: bytes) -> bool:
    """JPEG signature at byte 0 and an end-of-image marker at the end (not truncated)."""
    return data[:3] == b"\xff\xd8\xff" and data.rstrip(b"\x00\r\n ")[-2:] == b"\xff\xd9"


__all__ = [
    "ImageProcessor", "ImageResult", "ImageFailure", "load_upright_rgb", "open_image", "to_rgb",
    "sniff_image_format", "describe_non_image", "check_geometry", "significant_bits",
]
