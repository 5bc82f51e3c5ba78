"""Per-image metrics against hand-computed cases and trusted references (scikit-image, pytorch-msssim, FLIP)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from lasers_dist.eval.image_metrics import (
    finite_mean,
    flip_error,
    hwc_unit,
    ms_ssim_available,
    ms_ssim_per_image,
    psnr_per_image,
    ssim_per_image,
    to_uint8,
)
from lasers_dist.eval.perceptual import INCEPTION_WEIGHTS, FidAccumulator, Lpips, MetricUnavailable, frechet_distance


def _images(seed: int, batch: int, height: int, width: int, smooth: bool = True) -> torch.Tensor:
    """uint8 (B, 3, H, W): smooth gradients with texture (SSIM is uninformative on pure noise)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.linspace(0, 1, height).view(1, 1, -1, 1)
    x = torch.linspace(0, 1, width).view(1, 1, 1, -1)
    base = torch.rand(batch, 3, 1, 1, generator=g) * 120 + 60 + 60 * y * torch.rand(batch, 3, 1, 1, generator=g)
    base = base + 50 * torch.sin(9 * x + 5 * y) * torch.rand(batch, 3, 1, 1, generator=g)
    if not smooth:
        base = base + torch.randn(batch, 3, height, width, generator=g) * 20
    return base.clamp(0, 255).round().to(torch.uint8)


def _noisy(images: torch.Tensor, sigma: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (images.float() + torch.randn(images.shape, generator=g) * sigma).clamp(0, 255).round().to(torch.uint8)


def test_to_uint8_clamps_before_rounding() -> None:
    images = torch.tensor([1.01, -1.2, 0.0, 0.999, -0.999]).view(1, 1, 1, 5)
    assert to_uint8(images).flatten().tolist() == [255, 0, 128, 255, 0]
    # The pitfalls avoided: a bare cast wraps 1.01 (257.5) around (to 0 or 1) and truncates 254.9 to 254.
    naive = ((images + 1) / 2 * 255).byte().flatten()
    assert naive[0].item() != 255 and naive[3].item() == 254


def test_psnr_known_noise_identical_and_per_image_mean() -> None:
    target = _images(0, 2, 32, 32)
    target = target.clamp(10, 245)  # room for +-d without clipping
    pattern = torch.where(torch.arange(32 * 32).view(1, 1, 32, 32) % 2 == 0, 1, -1)
    recon = target.clone()
    recon[0] = (target[0].int() + 4 * pattern[0]).to(torch.uint8)  # MSE 16
    values = psnr_per_image(recon, target)
    assert values[0].item() == pytest.approx(10 * math.log10(255**2 / 16), abs=0.01)  # 36.09 dB
    assert math.isinf(values[1].item()) and values[1].item() > 0  # identical image: +inf
    mean, infinite = finite_mean(values.tolist())
    assert infinite == 1 and mean == pytest.approx(values[0].item())
    # Mean of per-image PSNRs, not the PSNR of the pooled MSE.
    recon[1] = (target[1].int() + 8 * pattern[0]).to(torch.uint8)  # MSE 64
    values = psnr_per_image(recon, target)
    pooled = 10 * math.log10(255**2 / ((16 + 64) / 2))
    assert finite_mean(values.tolist())[0] == pytest.approx((values[0] + values[1]).item() / 2)
    assert abs(finite_mean(values.tolist())[0] - pooled) > 0.5


@pytest.mark.parametrize("shape", [(32, 32), (37, 50), (64, 24)])
def test_ssim_matches_scikit_image_wang_settings(shape: tuple[int, int]) -> None:
    from skimage.metrics import structural_similarity

    target = _images(1, 3, *shape)
    recon = _noisy(target, 12.0, seed=2)
    ours = ssim_per_image(recon, target)
    for i in range(3):
        reference = structural_similarity(
            recon[i].permute(1, 2, 0).numpy() / 255.0, target[i].permute(1, 2, 0).numpy() / 255.0,
            gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1, channel_axis=2)
        assert ours[i].item() == pytest.approx(reference, abs=1e-4)
    assert ssim_per_image(target, target).tolist() == pytest.approx([1.0] * 3, abs=1e-12)


def test_ssim_border_is_cropped_not_padded() -> None:
    # Damage only the outer 5-pixel frame: no 11x11 window that fits inside the image lies wholly in the
    # frame, but the cropped score must not see the frame through padding either: compare with scikit-image.
    from skimage.metrics import structural_similarity

    target = _images(3, 1, 40, 40)
    recon = target.clone()
    recon[..., :2, :] = 0
    reference = structural_similarity(recon[0].permute(1, 2, 0).numpy() / 255.0,
                                      target[0].permute(1, 2, 0).numpy() / 255.0, gaussian_weights=True,
                                      sigma=1.5, use_sample_covariance=False, data_range=1, channel_axis=2)
    assert ssim_per_image(recon, target)[0].item() == pytest.approx(reference, abs=1e-4)


def test_ms_ssim_matches_pytorch_msssim_and_needs_large_images() -> None:
    from pytorch_msssim import ms_ssim

    target = _images(4, 2, 176, 170)
    recon = _noisy(target, 15.0, seed=5)
    ours = ms_ssim_per_image(recon, target)
    reference = ms_ssim(recon.double() / 255, target.double() / 255, data_range=1.0, size_average=False)
    torch.testing.assert_close(ours, reference.double(), atol=1e-4, rtol=0)
    assert ms_ssim_per_image(target, target).tolist() == pytest.approx([1.0, 1.0], abs=1e-9)
    assert not ms_ssim_available(160, 300) and ms_ssim_available(161, 161)
    with pytest.raises(ValueError, match="160"):
        ms_ssim_per_image(target[..., :160, :160], target[..., :160, :160])


def test_flip_identical_is_zero_chw_refused_and_matches_the_library() -> None:
    import flip_evaluator

    target = _images(6, 1, 48, 40)
    recon = _noisy(target, 10.0, seed=7)
    ref, test = hwc_unit(target)[0], hwc_unit(recon)[0]
    assert flip_error(ref, ref)[0] == 0.0
    mean, error_map, ppd = flip_error(ref, test)
    assert error_map.shape == (48, 40) and 0 < mean < 1 and ppd == pytest.approx(67.0, abs=0.1)
    assert mean == pytest.approx(flip_evaluator.evaluate(ref, test, "LDR")[1], abs=1e-6)
    assert flip_error(ref, test, ppd=30.0)[2] == 30.0
    chw_ref, chw_test = np.ascontiguousarray(ref.transpose(2, 0, 1)), np.ascontiguousarray(test.transpose(2, 0, 1))
    with pytest.raises(ValueError, match="H x W x 3"):
        flip_error(chw_ref, chw_test)
    # Why: the library takes the C x H x W array without complaint and returns another number.
    assert abs(flip_evaluator.evaluate(chw_ref, chw_test, "LDR")[1] - mean) > 1e-3
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        flip_error(ref * 255, test * 255)


def test_lpips_random_backbone_per_image_and_unavailable_offline(tmp_path, monkeypatch) -> None:
    target = _images(8, 3, 32, 32)
    recon = _noisy(target, 20.0, seed=9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        metric = Lpips(torch.device("cpu"), random_backbone=True)
    assert "random" in metric.name and "alex" in metric.name
    values = metric(recon, target)
    assert values.shape == (3,) and (values > 0).all()
    assert metric(target, target).abs().max().item() < 1e-6
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_cache"))
    with pytest.raises(MetricUnavailable) as err:
        Lpips(torch.device("cpu"))
    assert "alexnet-owt-7be5be79.pth" in str(err.value) and str(tmp_path / "empty_cache") in str(err.value)


def test_frechet_distance_matches_torchmetrics_formula() -> None:
    from torchmetrics.image.fid import _compute_fid

    g = torch.Generator().manual_seed(12)
    a, b = torch.randn(200, 16, generator=g, dtype=torch.float64), torch.randn(200, 16, generator=g, dtype=torch.float64)
    b = b @ torch.randn(16, 16, generator=g, dtype=torch.float64) * 0.5 + 0.3
    stats = [(x.mean(0), torch.cov(x.T)) for x in (a, b)]
    expected = float(_compute_fid(stats[0][0], stats[0][1], stats[1][0], stats[1][1]))
    assert frechet_distance(*stats[0], *stats[1]) == pytest.approx(expected, rel=1e-8)
    assert frechet_distance(*stats[0], *stats[0]) == pytest.approx(0.0, abs=1e-9)


def test_rfid_random_backbone_thresholds_and_unavailable_offline(tmp_path, monkeypatch) -> None:
    originals = _images(10, 6, 32, 32, smooth=False)
    # 64-d features keep the test fast; the feature accumulation and the distance are the 2048-d path's.
    fid = FidAccumulator(torch.device("cpu"), random_backbone=True, min_images=4, features=64)
    assert "random" in fid.name and "64-d" in fid.name
    fid.update(_noisy(originals, 60.0, seed=11), originals)
    assert fid.num_images == 6 and fid.compute() > 1e-3
    same = FidAccumulator(torch.device("cpu"), random_backbone=True, min_images=4, features=64)
    same.update(originals, originals)
    assert abs(same.compute()) < 1e-6
    with pytest.raises(TypeError, match="uint8"):
        fid.update(originals.float(), originals)
    strict = FidAccumulator(torch.device("cpu"), random_backbone=True, features=64)  # the default threshold: 2048
    strict.update(originals[:2], originals[:2])
    with pytest.raises(MetricUnavailable, match="at least 2048 images.*has 2"):
        strict.compute()
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_cache"))
    with pytest.raises(MetricUnavailable) as err:
        FidAccumulator(torch.device("cpu"))
    assert INCEPTION_WEIGHTS in str(err.value) and str(tmp_path / "empty_cache") in str(err.value)
