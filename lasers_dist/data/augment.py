"""Decode shard samples into fixed-size uint8 crops and assemble float batches in [-1, 1].

Pixels travel as (H, W, 3) uint8 numpy arrays (crops and flips are free views) and are transposed to
channels-first once, in `to_batch`. Training: random crop + horizontal flip;
validation: center crop. Randomness comes from the generator the caller passes (seeded per batch by the
stream), so a resumed stream repeats the same crops.
"""

from __future__ import annotations

import io
import warnings
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .pixels import SHARD_IMAGE_EXTENSIONS, open_rgb

_EXIF_ORIENTATION = 0x0112


def jpeg_decoders() -> dict[str, Callable[[bytes], np.ndarray]]:
    """The fast JPEG decoders installed, preferred first: bytes -> (H, W, 3) uint8 RGB. TorchCodec
    (torchcodec >= 0.16, the replacement torchvision 0.29 names for its deprecated image decoders), then
    torchvision.io.decode_jpeg while it exists. Without either, Pillow decodes (about 15% slower per 1024^2 image;
    all three run libjpeg-turbo, see `lasers-bench data`)."""
    found: dict[str, Callable[[bytes], np.ndarray]] = {}
    try:
        from torchcodec.decoders import decode_jpeg as codec_decode

        # (3, H, W) results are views of H x W x 3 memory: the permute costs nothing
        found["torchcodec"] = lambda data: codec_decode(data, mode="RGB").permute(1, 2, 0).numpy()
    except Exception:  # noqa: BLE001 - not installed, or its native library does not load with this torch
        pass
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            from torchvision.io import ImageReadMode
            from torchvision.io import decode_jpeg as vision_decode

        def vision(data: bytes) -> np.ndarray:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                chw = vision_decode(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
            return chw.permute(1, 2, 0).numpy()

        found["torchvision"] = vision
    except ImportError:
        pass
    return found


_FAST_DECODERS = jpeg_decoders()
JPEG_DECODER = next(iter(_FAST_DECODERS), "pillow")  # the one the stream uses
_decode_jpeg = _FAST_DECODERS.get(JPEG_DECODER)


def _decode(data: bytes, ext: str, draft_size: int | None) -> np.ndarray:
    if not data:
        raise ValueError("zero-byte image")
    if ext in ("jpg", "jpeg") and _decode_jpeg is not None:
        with Image.open(io.BytesIO(data)) as header:  # reads the header only
            (w, h), fmt, mode = header.size, header.format, header.mode
            upright = fmt == "JPEG" and header.getexif().get(_EXIF_ORIENTATION, 1) == 1
        # Pillow's draft mode (decoding at 1/2, 1/4, 1/8 scale) wins when the image is much larger than needed;
        # rotated (EXIF), CMYK and other odd JPEGs go through Pillow, which turns them upright 8-bit RGB.
        if upright and mode in ("RGB", "L") and not (draft_size and min(w, h) >= 2 * draft_size):
            return _decode_jpeg(data)
    img, _ = open_rgb(data, draft_size=draft_size)
    return np.asarray(img)


def decode_sample(parts: dict[str, bytes], draft_size: int | None = None) -> tuple[np.ndarray, int] | None:
    """((H, W, 3) uint8 RGB, label or -1) from a sample's members; None when the image is missing or bad."""
    ext = next((e for e in SHARD_IMAGE_EXTENSIONS if e in parts), None)
    if ext is None:
        return None
    try:
        pixels = _decode(parts[ext], ext, draft_size)
    except Exception:  # decoders raise many types for bad bytes; the caller counts the loss
        return None
    try:
        label = int(parts["cls"]) if "cls" in parts else -1
    except ValueError:
        label = -1
    return pixels, label


def resize_shorter_side(pixels: np.ndarray, size: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (H', W', 3) uint8 with min(H', W') = size; antialiased bicubic."""
    h, w = pixels.shape[:2]
    scale = size / min(h, w)
    new = (max(size, round(h * scale)), max(size, round(w * scale)))
    chw = torch.from_numpy(np.array(pixels)).permute(2, 0, 1)[None].float()  # a copy: decoded arrays are read-only
    resized = F.interpolate(chw, size=new, mode="bicubic", antialias=True, align_corners=False)
    return resized[0].round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


def crop(pixels: np.ndarray, size: int, *, train: bool, resize: bool, rng: np.random.Generator) -> np.ndarray:
    """(size, size, 3) uint8 view from (H, W, 3) uint8. The shorter side is first resized to `size` when
    `resize` is set, and always when it is smaller than `size`; then a random (train) or center (validation)
    crop, and for training a horizontal flip with probability 1/2."""
    h, w = pixels.shape[:2]
    if min(h, w) < size or (resize and min(h, w) != size):
        pixels = resize_shorter_side(pixels, size)
        h, w = pixels.shape[:2]
    if train:
        left, top = int(rng.integers(w - size + 1)), int(rng.integers(h - size + 1))
    else:
        left, top = (w - size) // 2, (h - size) // 2
    pixels = pixels[top:top + size, left:left + size]
    if train and rng.random() < 0.5:
        pixels = pixels[:, ::-1]
    return pixels


def to_batch(crops: list[np.ndarray]) -> torch.Tensor:
    """List of (H, W, 3) uint8 -> (B, 3, H, W) float32 in [-1, 1]."""
    # One transposing copy per crop into a channels-first uint8 buffer, then a conversion of contiguous
    # memory: several times faster than torch's strided uint8 stack / permute.
    h, w, _ = crops[0].shape
    planar = np.empty((len(crops), 3, h, w), dtype=np.uint8)
    for i, pixels in enumerate(crops):
        planar[i] = pixels.transpose(2, 0, 1)
    return torch.from_numpy(planar).float().div_(127.5).sub_(1.0)
