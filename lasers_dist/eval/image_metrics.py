"""Per-image quality metrics on 8-bit images, computed the way the papers define them.

Every metric here takes what an image file would hold: reconstructions clamped to [0, 1] and rounded to 8 bits
(`to_uint8`). The known ways to get these numbers wrong, and what is done instead:
- PSNR is the mean of per-image PSNRs (not the PSNR of the pooled MSE); identical images give +inf.
- SSIM is Wang et al. 2004: Gaussian window 11 x 11, sigma 1.5, K1 = 0.01, K2 = 0.03, data range 1, population
  (co)variances, and only the positions where the window fits inside the image (the border is cropped, as
  scikit-image does; torchmetrics pads instead). Mean over pixels and channels.
- MS-SSIM is Wang et al. 2003 (5 scales, their weights), defined only when the smaller side exceeds 160 px.
- FLIP is NVIDIA's `flip-evaluator` in LDR mode on H x W x 3 arrays in [0, 1]: it silently misreads a
  C x H x W array, so `flip_error` refuses anything else.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
# The smallest of the 5 scales (side / 16) must still hold the 11-pixel window: side > 10 * 16.
MS_SSIM_MIN_SIDE = (SSIM_WINDOW - 1) * 2 ** (len(MS_SSIM_WEIGHTS) - 1)


def to_uint8(images: Tensor) -> Tensor:
    """(B, C, H, W) float in [-1, 1] -> uint8 in [0, 255]: clamp first, then round (a bare .byte() would wrap
    1.004 * 255 to 0 and truncate 254.9 to 254)."""
    return ((images.detach().float().clamp(-1.0, 1.0) + 1.0) * 127.5).round_().to(torch.uint8)


def uint8_to_unit(images: Tensor) -> Tensor:
    """uint8 (B, C, H, W) -> float64 in [0, 1]."""
    return images.to(torch.float64) / 255.0


def psnr_per_image(reconstructions: Tensor, targets: Tensor) -> Tensor:
    """uint8 (B, C, H, W) x 2 -> (B,) float64 PSNR in dB with peak 255; +inf where the images are identical."""
    diff = reconstructions.to(torch.float64) - targets.to(torch.float64)
    mse = diff.pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(255.0**2 / mse)  # mse 0 -> +inf, as it should


def _gaussian_window(device: torch.device) -> Tensor:
    offsets = torch.arange(SSIM_WINDOW, dtype=torch.float64, device=device) - SSIM_WINDOW // 2
    window = torch.exp(-0.5 * (offsets / SSIM_SIGMA) ** 2)
    return window / window.sum()


def _band(size: int, window: Tensor) -> Tensor:
    """(size, size - 10) matrix whose column j holds the window at rows j..j+10: a valid 1-D convolution."""
    taps, out = window.numel(), size - window.numel() + 1
    band = torch.zeros(size, out, dtype=window.dtype, device=window.device)
    rows = torch.arange(out, device=window.device)[None, :] + torch.arange(taps, device=window.device)[:, None]
    band[rows, torch.arange(out, device=window.device).expand(taps, -1)] = window[:, None].expand(-1, out)
    return band


def _blur(images: Tensor, window: Tensor) -> Tensor:
    """Separable Gaussian filter over the valid positions only: (..., H, W) -> (..., H - 10, W - 10).

    Two banded matrix products (float64 GEMMs) rather than depthwise convolutions, which are many times
    slower in float64 on a CPU."""
    height, width = images.shape[-2:]
    return _band(height, window).T @ images @ _band(width, window)


def _ssim_and_cs(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """float64 images in [0, 1] (B, C, H, W) -> per-channel mean SSIM and contrast-structure term, each (B, C)."""
    if min(x.shape[-2:]) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels, got {tuple(x.shape[-2:])}")
    c1, c2 = SSIM_K1**2, SSIM_K2**2  # data range 1
    mu_x, mu_y, xx, yy, xy = _blur(torch.stack([x, y, x * x, y * y, x * y]), _gaussian_window(x.device))
    var_x, var_y, cov = xx - mu_x**2, yy - mu_y**2, xy - mu_x * mu_y
    cs = (2 * cov + c2) / (var_x + var_y + c2)
    ssim = (2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1) * cs
    return ssim.flatten(2).mean(2), cs.flatten(2).mean(2)


SSIM_CHUNK = 4  # images per float64 pass: bounds the temporaries (~2 GB for 16 images at 512^2 otherwise)


def ssim_per_image(reconstructions: Tensor, targets: Tensor) -> Tensor:
    """uint8 (B, C, H, W) x 2 -> (B,) float64 SSIM (Wang et al., border cropped; see the module docstring)."""
    return torch.cat([_ssim_and_cs(uint8_to_unit(r), uint8_to_unit(t))[0].mean(1)
                      for r, t in zip(reconstructions.split(SSIM_CHUNK), targets.split(SSIM_CHUNK))])


def ms_ssim_available(height: int, width: int) -> bool:
    return min(height, width) > MS_SSIM_MIN_SIDE


def ms_ssim_per_image(reconstructions: Tensor, targets: Tensor) -> Tensor:
    """uint8 (B, C, H, W) x 2 -> (B,) float64 MS-SSIM over 5 scales (2x2 average pooling between scales).

    Negative per-scale terms are clipped to 0 before the weighted product, so the value stays real.
    """
    if not ms_ssim_available(*reconstructions.shape[-2:]):
        raise ValueError(f"MS-SSIM needs both image sides > {MS_SSIM_MIN_SIDE} px, got {tuple(reconstructions.shape[-2:])}")
    if reconstructions.shape[0] > SSIM_CHUNK:
        return torch.cat([ms_ssim_per_image(r, t) for r, t in zip(reconstructions.split(SSIM_CHUNK),
                                                                  targets.split(SSIM_CHUNK))])
    x, y = uint8_to_unit(reconstructions), uint8_to_unit(targets)
    terms = []
    for scale in range(len(MS_SSIM_WEIGHTS)):
        ssim, cs = _ssim_and_cs(x, y)
        if scale == len(MS_SSIM_WEIGHTS) - 1:
            terms.append(ssim.clamp_min(0))
            break
        terms.append(cs.clamp_min(0))
        padding = (x.shape[-2] % 2, x.shape[-1] % 2)
        x, y = F.avg_pool2d(x, 2, padding=padding), F.avg_pool2d(y, 2, padding=padding)
    weights = torch.tensor(MS_SSIM_WEIGHTS, dtype=torch.float64, device=x.device).view(-1, 1, 1)
    return torch.prod(torch.stack(terms) ** weights, dim=0).mean(1)


# ---- FLIP --------------------------------------------------------------------------------------------------

def flip_error(reference: np.ndarray, test: np.ndarray, ppd: float | None = None) -> tuple[float, np.ndarray, float]:
    """LDR FLIP of two (H, W, 3) float arrays in [0, 1] -> (mean error, (H, W) error map, pixels per degree used).

    ppd None keeps FLIP's default observer (0.7 m from a 0.7 m wide 3840-pixel monitor, about 67 ppd).
    """
    for name, array in (("reference", reference), ("test", test)):
        if array.ndim != 3 or array.shape[2] != 3:
            raise ValueError(f"FLIP {name} must be an H x W x 3 array, got shape {array.shape}; flip-evaluator "
                             "silently misreads a C x H x W array (transpose with .permute(1, 2, 0))")
        if array.size and (array.min() < 0 or array.max() > 1):
            raise ValueError(f"FLIP {name} values must lie in [0, 1] (LDR), got [{array.min()}, {array.max()}]")
    if reference.shape != test.shape:
        raise ValueError(f"FLIP reference {reference.shape} and test {test.shape} differ in shape")
    import flip_evaluator

    parameters = {} if ppd is None else {"ppd": float(ppd)}
    error_map, mean, used = flip_evaluator.evaluate(
        np.ascontiguousarray(reference, dtype=np.float32), np.ascontiguousarray(test, dtype=np.float32), "LDR",
        applyMagma=False, parameters=parameters,
    )
    return float(mean), error_map[..., 0], float(used["ppd"])


def hwc_unit(images: Tensor) -> np.ndarray:
    """uint8 (B, 3, H, W) -> float32 (B, H, W, 3) in [0, 1], the layout FLIP and image files use."""
    return (images.permute(0, 2, 3, 1).cpu().numpy().astype(np.float32)) / 255.0


def finite_mean(values: list[float]) -> tuple[float | None, int]:
    """Mean of the finite values and how many were +inf (identical images); None when there is none finite."""
    finite = [v for v in values if math.isfinite(v)]
    return (sum(finite) / len(finite) if finite else None), len(values) - len(finite)
