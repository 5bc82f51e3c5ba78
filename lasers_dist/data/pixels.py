"""Image bytes <-> 8-bit RGB pixels, shared by the shard writer and the shard stream.

Every image that enters a shard or a batch goes through `to_rgb`, so odd modes (grayscale, alpha, palette,
16-bit, CMYK, float) are handled in exactly one place.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp")
# Extensions the stream accepts inside a shard (WebDataset convention: the part after the key's first dot).
SHARD_IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp", "bmp", "ppm")


def _sixteen_bit_to_l(img: Image.Image) -> Image.Image:
    # Pillow opens 16-bit grayscale as "I;16*" or "I" (int32); scale the full 16-bit range to 8 bits
    # instead of clipping, which would turn most of a 16-bit photo white.
    values = np.asarray(img).astype(np.float64)
    top = 65535.0 if values.max(initial=0) > 255 else 255.0
    return Image.fromarray(np.clip(np.rint(values * (255.0 / top)), 0, 255).astype(np.uint8), mode="L")


def _float_to_l(img: Image.Image) -> Image.Image:
    values = np.asarray(img).astype(np.float64)
    if values.size and np.nanmax(values) <= 1.0:  # float images are usually [0, 1]
        values = values * 255.0
    return Image.fromarray(np.clip(np.nan_to_num(np.rint(values)), 0, 255).astype(np.uint8), mode="L")


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow image to 8-bit RGB; transparent pixels are composited onto white.

    Raises ValueError for a mode that has no sensible RGB reading.
    """
    if img.mode == "RGB":
        return img
    if img.mode in ("1", "L"):
        return img.convert("RGB")
    if img.mode.startswith("I;16") or img.mode == "I":
        return _sixteen_bit_to_l(img).convert("RGB")
    if img.mode == "F":
        return _float_to_l(img).convert("RGB")
    if img.mode == "P" and "transparency" not in img.info:
        return img.convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "P", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if img.mode in ("CMYK", "YCbCr", "LAB", "HSV", "RGBX"):
        return img.convert("RGB")
    raise ValueError(f"unsupported image mode {img.mode!r}")


def open_rgb(data: bytes | str, draft_size: int | None = None) -> tuple[Image.Image, str]:
    """Fully decode image bytes (or a path) to RGB; returns (image, original mode).

    `draft_size` lets JPEG decode at a reduced scale whose shorter side stays >= draft_size (much faster
    for large JPEGs that are resized down anyway). Raises on empty, truncated or undecodable data
    (Pillow's errors, or ValueError for odd modes).
    """
    if isinstance(data, bytes) and len(data) == 0:
        raise ValueError("zero-byte image")
    src = io.BytesIO(data) if isinstance(data, bytes) else data
    with Image.open(src) as img:
        if draft_size is not None and img.format == "JPEG" and img.mode in ("RGB", "L"):
            w, h = img.size
            scale = draft_size / min(w, h)
            img.draft(img.mode, (max(1, int(w * scale + 0.999)), max(1, int(h * scale + 0.999))))
        img.load()  # force the whole decode now: truncated files fail here, not later
        mode = img.mode
        img = ImageOps.exif_transpose(img) if img.format == "JPEG" else img
        return to_rgb(img).copy(), mode


def resize_shorter_side(img: Image.Image, size: int) -> Image.Image:
    """Resize so the shorter side is `size` (aspect kept), with an antialiasing filter."""
    w, h = img.size
    if min(w, h) == size:
        return img
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    return img.resize((new_w, new_h), Image.Resampling.BICUBIC, reducing_gap=None if scale > 1 else 3.0)


def center_crop(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))


def encode(img: Image.Image, image_format: str, quality: int) -> bytes:
    """Encode RGB pixels as PNG (lossless) or JPEG at `quality`."""
    buf = io.BytesIO()
    if image_format == "png":
        img.save(buf, format="PNG", compress_level=6)
    elif image_format == "jpeg":
        img.save(buf, format="JPEG", quality=quality)
    else:
        raise ValueError(f"unknown image format {image_format!r}: use 'png' or 'jpeg'")
    return buf.getvalue()
