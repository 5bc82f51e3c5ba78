"""Degradations for the paper's downstream tasks; each maps a clean batch to the model's input.

Both work on (B, 3, H, W) float batches in [-1, 1] and are deterministic (no randomness to resume).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DEGRADATIONS = ("super_resolution", "inpainting")


def super_resolution_input(images: torch.Tensor, factor: int = 4) -> torch.Tensor:
    """Bicubic downsample by `factor` (antialiased), then bicubic upsample back: (B, 3, H, W) -> same shape.

    The paper's task is 64^2 -> 256^2, i.e. factor 4 at H = 256.
    """
    _, _, h, w = images.shape
    if h % factor or w % factor:
        raise ValueError(f"image size {h}x{w} is not divisible by the super-resolution factor {factor}")
    low = F.interpolate(images, size=(h // factor, w // factor), mode="bicubic", align_corners=False, antialias=True)
    return F.interpolate(low, size=(h, w), mode="bicubic", align_corners=False).clamp_(-1.0, 1.0)


def center_mask(height: int, width: int, fraction: float = 0.25) -> torch.Tensor:
    """(1, 1, H, W) bool, True inside a centered rectangle spanning `fraction` of each side."""
    if not 0 < fraction < 1:
        raise ValueError(f"mask fraction must be in (0, 1), got {fraction}")
    mh, mw = max(1, round(height * fraction)), max(1, round(width * fraction))
    top, left = (height - mh) // 2, (width - mw) // 2
    mask = torch.zeros(1, 1, height, width, dtype=torch.bool)
    mask[..., top:top + mh, left:left + mw] = True
    return mask


def inpainting_input(images: torch.Tensor, fraction: float = 0.25) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero the centered square (0 is mid-gray in [-1, 1]); returns (inputs (B, 3, H, W), mask (1, 1, H, W))."""
    mask = center_mask(images.shape[-2], images.shape[-1], fraction).to(images.device)
    return images.masked_fill(mask, 0.0), mask


def degrade(images: torch.Tensor, kind: str, *, sr_factor: int = 4, mask_fraction: float = 0.25) -> dict:
    """{"inputs": degraded images} (+ "mask" for inpainting); "images" stays the clean target."""
    if kind == "super_resolution":
        return {"inputs": super_resolution_input(images, sr_factor)}
    if kind == "inpainting":
        inputs, mask = inpainting_input(images, mask_fraction)
        return {"inputs": inputs, "mask": mask.expand(images.shape[0], 1, -1, -1).contiguous()}
    raise ValueError(f"unknown degradation {kind!r}: choose None or one of {DEGRADATIONS}")
