"""Decode shard samples into fixed-size uint8 crops and assemble float batches in [-1, 1].

Training: random crop + horizontal flip; validation: center crop. Randomness comes from the generator the
caller passes (seeded per batch by the stream), so a resumed stream repeats the same crops.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from .pixels import SHARD_IMAGE_EXTENSIONS, open_rgb, resize_shorter_side


def decode_sample(parts: dict[str, bytes], draft_size: int | None = None) -> tuple[Image.Image, int] | None:
    """(RGB image, label or -1) from a sample's members; None when the image is missing or undecodable."""
    ext = next((e for e in SHARD_IMAGE_EXTENSIONS if e in parts), None)
    if ext is None:
        return None
    try:
        img, _ = open_rgb(parts[ext], draft_size=draft_size)
    except Exception:  # Pillow raises many types for bad bytes; the caller counts the loss
        return None
    try:
        label = int(parts["cls"]) if "cls" in parts else -1
    except ValueError:
        label = -1
    return img, label


def crop(img: Image.Image, size: int, *, train: bool, resize: bool, rng: np.random.Generator) -> np.ndarray:
    """(size, size, 3) uint8. The shorter side is first resized to `size` when `resize` is set, and always
    when it is smaller than `size`; then a random (train) or center (validation) crop, and a random flip."""
    w, h = img.size
    if min(w, h) < size or (resize and min(w, h) != size):
        img = resize_shorter_side(img, size)
        w, h = img.size
    if train:
        left, top = int(rng.integers(w - size + 1)), int(rng.integers(h - size + 1))
    else:
        left, top = (w - size) // 2, (h - size) // 2
    if (left, top, w, h) != (0, 0, size, size):
        img = img.crop((left, top, left + size, top + size))
    pixels = np.asarray(img)
    if train and rng.random() < 0.5:
        pixels = pixels[:, ::-1]
    return pixels


def to_batch(crops: list[np.ndarray]) -> torch.Tensor:
    """List of (H, W, 3) uint8 -> (B, 3, H, W) float32 in [-1, 1]."""
    stacked = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2)
    return stacked.to(torch.float32, memory_format=torch.contiguous_format).div_(127.5).sub_(1.0)
