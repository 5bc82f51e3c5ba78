"""Metrics that need pretrained networks: LPIPS (AlexNet) and rFID (Inception-v3), offline.

Weights are read from the torch hub cache (torch.hub.get_dir()/checkpoints, i.e. $TORCH_HOME/hub/checkpoints)
and never downloaded. When a file is missing the metric is unavailable and the reason names the file and the
folder it belongs in; the caller reports null. `random_backbone=True` builds the same network with random
weights, for tests of the code path only (the name says so, and it is never chosen silently).

rFID follows torch-fidelity (what torchmetrics wraps): uint8 inputs, the TF1-compatible bilinear resize to
299 x 299 (torchmetrics' default antialiased resize changes the numbers), 2048-d pool features, reference
statistics from the originals of the same images. Below 2,048 images the 2048 x 2048 covariance is singular
and the distance is not reported.
"""

from __future__ import annotations

import io
from pathlib import Path

import torch
from torch import Tensor, nn

from lasers_dist.bottleneck.usage import all_reduce_sum_
from lasers_dist.losses.reconstruction import build_lpips

INCEPTION_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"
FID_FEATURES = 2048
MIN_FID_IMAGES = 2048


class MetricUnavailable(RuntimeError):
    """A metric cannot be computed here; str(error) says why and what to do."""


class Lpips:
    """LPIPS with the AlexNet backbone: uint8 (B, 3, H, W) x 2 -> (B,) spatially averaged distances.

    Inputs are mapped to [-1, 1] (what lpips expects without normalize=True). `name` records the backbone.
    """

    def __init__(self, device: torch.device, random_backbone: bool = False, net: str = "alex") -> None:
        try:
            self.module = build_lpips(net, random_backbone=random_backbone).to(device)
        except FileNotFoundError as err:
            raise MetricUnavailable(str(err)) from err
        self.name = f"lpips-{net}" + (" (random backbone: NOT LPIPS, tests only)" if random_backbone else "")

    @torch.no_grad()
    def __call__(self, reconstructions: Tensor, targets: Tensor) -> Tensor:
        scale = lambda images: images.float() / 127.5 - 1.0  # noqa: E731
        return self.module(scale(reconstructions), scale(targets)).flatten().double()


def inception_weights_path() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS


def _inception(random_backbone: bool) -> nn.Module:
    from torchmetrics.image.fid import NoTrainInceptionV3

    if random_backbone:
        class RandomInceptionV3(NoTrainInceptionV3):
            def load_state_dict(self, state_dict, strict=True, assign=False):  # keep the random initialisation
                return None

        empty = io.BytesIO()
        torch.save({}, empty)
        empty.seek(0)
        module = RandomInceptionV3("inception-v3-compat", [str(FID_FEATURES)], empty, antialias=False)
        # A variance-preserving initialisation: with torch's defaults the activations shrink ~1e6-fold over the
        # network's depth and every image gets (nearly) the same features.
        for layer in module.modules():
            if isinstance(layer, nn.BatchNorm2d):
                nn.init.ones_(layer.weight)
            elif isinstance(layer, nn.Conv2d):
                nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
    else:
        path = inception_weights_path()
        if not path.is_file():
            raise MetricUnavailable(
                f"rFID needs the Inception-v3 weights file {path.name} in the folder {path.parent} "
                "(torch.hub.get_dir()/checkpoints, set by $TORCH_HOME), and it is missing: copy it there from a "
                "machine with network access (torch-fidelity downloads it on first use)")
        module = NoTrainInceptionV3("inception-v3-compat", [str(FID_FEATURES)], str(path), antialias=False)
    module.num_features = FID_FEATURES  # tells torchmetrics the size without a dummy forward
    return module


class FidAccumulator:
    """Feature sums of the originals (real) and reconstructions (fake), reducible over ranks, -> rFID.

    update() takes uint8 (B, 3, H, W) batches; reduce_() sums the statistics over ranks (a collective);
    compute() gives the distance, or raises MetricUnavailable below `min_images` images.
    """

    def __init__(self, device: torch.device, random_backbone: bool = False, min_images: int = MIN_FID_IMAGES):
        from torchmetrics.image.fid import FrechetInceptionDistance

        self.fid = FrechetInceptionDistance(feature=_inception(random_backbone), sync_on_compute=False).to(device)
        self.min_images = min_images
        self.name = "inception-v3-compat pool3 2048-d (torch-fidelity resize)" + (
            " (random backbone: NOT FID, tests only)" if random_backbone else "")

    @torch.no_grad()
    def update(self, reconstructions: Tensor, targets: Tensor) -> None:
        if reconstructions.dtype != torch.uint8 or targets.dtype != torch.uint8:
            raise TypeError("rFID takes uint8 images (clamped and rounded, see to_uint8)")
        self.fid.update(targets, real=True)
        self.fid.update(reconstructions, real=False)

    def reduce_(self) -> None:
        for name in ("real_features_sum", "real_features_cov_sum", "real_features_num_samples",
                     "fake_features_sum", "fake_features_cov_sum", "fake_features_num_samples"):
            all_reduce_sum_(getattr(self.fid, name))

    @property
    def num_images(self) -> int:
        return int(self.fid.real_features_num_samples)

    def compute(self) -> float:
        n = self.num_images
        if n < self.min_images:
            raise MetricUnavailable(
                f"rFID needs at least {self.min_images} images (the {FID_FEATURES}x{FID_FEATURES} feature "
                f"covariance is singular below that), this evaluation has {n}")
        return float(self.fid.compute())
