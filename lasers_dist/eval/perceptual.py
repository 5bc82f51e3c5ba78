"""Metrics that need pretrained networks: LPIPS (AlexNet) and rFID (Inception-v3), offline.

Weights are read from the torch hub cache (torch.hub.get_dir()/checkpoints, i.e. $TORCH_HOME/hub/checkpoints)
and never downloaded. When a file is missing the metric is unavailable and the reason names the file and the
folder it belongs in; the caller reports null. `random_backbone=True` builds the same network with random
weights, for tests of the code path only (the name says so, and it is never chosen silently).

rFID follows torch-fidelity (what torchmetrics wraps): uint8 inputs, the TF1-compatible bilinear resize to
299 x 299 (torchmetrics' default antialiased resize changes the numbers), 2048-d pool features, reference
statistics from the originals of the same images. Below 2,048 images the 2048 x 2048 covariance is singular
and the distance is not reported. torchmetrics accumulates the feature sums; the distance itself is computed
from symmetric eigendecompositions (Tr sqrt(S1 S2) = Tr sqrt(S1^1/2 S2 S1^1/2)), several times faster on a
CPU than torchmetrics' general eigenvalue route and free of its complex round-off.
"""

from __future__ import annotations

import io
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor, nn

from lasers_dist.bottleneck.usage import all_reduce_sum_
from lasers_dist.losses.reconstruction import backbone_weights_path, build_lpips

INCEPTION_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"
FID_FEATURES = 2048
MIN_FID_IMAGES = 2048


class MetricUnavailable(RuntimeError):
    """A metric cannot be computed here; str(error) says why and what to do."""


@contextmanager
def _seeded(random_backbone: bool):
    """Random backbones are drawn from a fixed seed (every process and rank gets the same network), without
    disturbing the caller's random stream."""
    if not random_backbone:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        yield


class Lpips:
    """LPIPS with the AlexNet backbone: uint8 (B, 3, H, W) x 2 -> (B,) spatially averaged distances.

    Inputs are mapped to [-1, 1] (what lpips expects without normalize=True). `name` records the backbone.
    """

    def __init__(self, device: torch.device, random_backbone: bool = False, net: str = "alex") -> None:
        path = backbone_weights_path(net)
        if not random_backbone and not path.is_file():
            raise MetricUnavailable(
                f"LPIPS ({net}) needs the torchvision ImageNet weights file {path.name} in the folder {path.parent} "
                "(torch.hub.get_dir()/checkpoints, set by $TORCH_HOME), and it is missing: copy it there from a "
                "machine with network access (torchvision downloads it on first use)")
        with _seeded(random_backbone):
            self.module = build_lpips(net, random_backbone=random_backbone).to(device)
        self.name = f"lpips-{net}" + (" (random backbone: NOT LPIPS, tests only)" if random_backbone else "")

    @torch.no_grad()
    def __call__(self, reconstructions: Tensor, targets: Tensor) -> Tensor:
        scale = lambda images: images.float() / 127.5 - 1.0  # noqa: E731
        return self.module(scale(reconstructions), scale(targets)).flatten().double()


def inception_weights_path() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS


def frechet_distance(mean_a: Tensor, cov_a: Tensor, mean_b: Tensor, cov_b: Tensor) -> float:
    """||m_a - m_b||^2 + Tr(C_a + C_b - 2 (C_a C_b)^1/2) for (d,) means and (d, d) covariances, in float64."""
    mean_a, cov_a, mean_b, cov_b = (t.double() for t in (mean_a, cov_a, mean_b, cov_b))
    values, vectors = torch.linalg.eigh(cov_a)
    root_a = (vectors * values.clamp_min(0).sqrt()) @ vectors.T
    middle = root_a @ cov_b @ root_a
    trace_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0).sqrt().sum()
    return float((mean_a - mean_b).pow(2).sum() + cov_a.trace() + cov_b.trace() - 2 * trace_sqrt)


def _inception(random_backbone: bool, features: int) -> nn.Module:
    from torchmetrics.image.fid import NoTrainInceptionV3

    if random_backbone:
        class RandomInceptionV3(NoTrainInceptionV3):
            def load_state_dict(self, state_dict, strict=True, assign=False):  # keep the random initialisation
                return None

        empty = io.BytesIO()
        torch.save({}, empty)
        empty.seek(0)
        module = RandomInceptionV3("inception-v3-compat", [str(features)], empty, antialias=False)
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
        module = NoTrainInceptionV3("inception-v3-compat", [str(features)], str(path), antialias=False)
    module.num_features = features  # tells torchmetrics the size without a dummy forward
    return module


class FidAccumulator:
    """Feature sums of the originals (real) and reconstructions (fake), reducible over ranks, -> rFID.

    update() takes uint8 (B, 3, H, W) batches; reduce_() sums the statistics over ranks (a collective);
    compute() gives the distance, or raises MetricUnavailable below `min_images` images.
    """

    def __init__(self, device: torch.device, random_backbone: bool = False, min_images: int = MIN_FID_IMAGES,
                 features: int = FID_FEATURES):
        from torchmetrics.image.fid import FrechetInceptionDistance

        if min_images < 2:
            raise ValueError(f"min_images must be >= 2 (a covariance needs two samples), got {min_images}")
        if features not in (64, 192, 768, 2048):
            raise ValueError(f"Inception features must be 64, 192, 768 or 2048, got {features}")
        with _seeded(random_backbone):
            inception = _inception(random_backbone, features)
        self.fid = FrechetInceptionDistance(feature=inception, sync_on_compute=False).to(device)
        self.min_images = min_images
        self.name = f"inception-v3-compat {features}-d (torch-fidelity resize)" + (
            "" if features == FID_FEATURES else " (not the standard 2048-d FID)") + (
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
        fid, count = self.fid, n
        means = [fid.real_features_sum / count, fid.fake_features_sum / count]
        covs = [(fid.real_features_cov_sum - count * torch.outer(means[0], means[0])) / (count - 1),
                (fid.fake_features_cov_sum - count * torch.outer(means[1], means[1])) / (count - 1)]
        return frechet_distance(means[0], covs[0], means[1], covs[1])
