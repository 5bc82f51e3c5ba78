"""Reconstruction loss: (1 - w) * MSE + w * LPIPS (Zhang et al. 2018), on images in [-1, 1].

The paper's recon = eta * MSE + (1 - eta) * LPIPS with eta = 0.5, i.e. perceptual_weight w = 1 - eta = 0.5.

LPIPS needs the ImageNet weights of its torchvision backbone, which torchvision downloads into
torch.hub.get_dir()/checkpoints on first use. Offline that download fails deep inside torchvision with a
URLError, so the file is looked for before anything is built and a missing file is a FileNotFoundError that
says where to put it and how to run without it.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LPIPS_NETS = ("alex", "vgg", "squeeze")


def backbone_weights_path(net: str) -> Path:
    """Where torchvision looks for the ImageNet weights that lpips.LPIPS(net=net) loads.

    The file name is the last part of the weight URL of the torchvision version installed (what torch.hub
    caches it as): alex -> alexnet-owt-7be5be79.pth, vgg -> vgg16-397923af.pth, squeeze ->
    squeezenet1_1-b8a52dc0.pth. torch.hub.get_dir() follows $TORCH_HOME (default ~/.cache/torch/hub).
    """
    from torchvision.models import AlexNet_Weights, SqueezeNet1_1_Weights, VGG16_Weights

    # lpips calls tv.alexnet(pretrained=True) etc., which torchvision maps to these IMAGENET1K_V1 weights.
    weights = {
        "alex": AlexNet_Weights.IMAGENET1K_V1,
        "vgg": VGG16_Weights.IMAGENET1K_V1,
        "squeeze": SqueezeNet1_1_Weights.IMAGENET1K_V1,
    }
    if net not in weights:
        raise ValueError(f"loss.lpips_net must be one of {LPIPS_NETS}, got {net!r}")
    file_name = Path(urlparse(weights[net].url).path).name
    return Path(torch.hub.get_dir()) / "checkpoints" / file_name


def build_lpips(net: str = "alex", random_backbone: bool = False) -> nn.Module:
    """A frozen lpips.LPIPS module in eval mode: (B, 3, H, W) x 2 in [-1, 1] -> (B, 1, 1, 1) distances.

    random_backbone builds offline with a randomly initialised backbone (the calibrated linear heads ship with
    the lpips package): a differentiable image distance for tests, but NOT the LPIPS metric.
    """
    import lpips

    if random_backbone:
        if net not in LPIPS_NETS:
            raise ValueError(f"loss.lpips_net must be one of {LPIPS_NETS}, got {net!r}")
        warnings.warn(
            f"LPIPS({net}) with a randomly initialised backbone (loss.lpips_random_backbone=true): this is not "
            "the LPIPS metric; use it for tests only",
            UserWarning,
            stacklevel=2,
        )
    else:
        path = backbone_weights_path(net)
        if not path.is_file():
            raise FileNotFoundError(
                f"LPIPS(net={net!r}) needs the torchvision ImageNet weights file {path.name} in the folder "
                f"{path.parent} (torch.hub.get_dir()/checkpoints, set by $TORCH_HOME), and it is missing. Copy "
                f"{path.name} there (torchvision downloads it on a machine with network access), or run without "
                "LPIPS: loss.perceptual_weight=0, or loss.lpips_random_backbone=true (tests only: not real LPIPS)."
            )
    with warnings.catch_warnings():
        # lpips uses torchvision's deprecated `pretrained=` argument; the warning says nothing actionable to us.
        warnings.filterwarnings("ignore", category=UserWarning, module="torchvision")
        module = lpips.LPIPS(net=net, pretrained=True, pnet_rand=random_backbone, verbose=False)
    module.requires_grad_(False)
    return module.eval()


class ReconstructionLoss(nn.Module):
    """(reconstructions, targets) (B, 3, H, W) in [-1, 1] -> (loss 0-dim, {"mse", "lpips"} detached parts).

    loss = (1 - perceptual_weight) * MSE + perceptual_weight * mean LPIPS. With perceptual_weight 0 no LPIPS
    network is built (nothing to download) and the parts hold "mse" only.
    The LPIPS network is frozen and stays in eval mode (its dropout off) even when this module is put in
    training mode. It is a buffer-like passenger, not a trainable weight: the trainer keeps this module apart
    from the Autoencoder, so no optimizer or DeepSpeed engine ever sees it.
    """

    def __init__(self, perceptual_weight: float, lpips_net: str = "alex", random_backbone: bool = False) -> None:
        super().__init__()
        if not 0.0 <= perceptual_weight <= 1.0:
            raise ValueError(f"loss.perceptual_weight must be in [0, 1], got {perceptual_weight}")
        self.perceptual_weight = float(perceptual_weight)
        self.lpips = build_lpips(lpips_net, random_backbone) if perceptual_weight > 0 else None

    def train(self, mode: bool = True) -> ReconstructionLoss:
        super().train(mode)
        if self.lpips is not None:
            self.lpips.eval()
        return self

    def forward(self, reconstructions: Tensor, targets: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        if reconstructions.shape != targets.shape:
            raise ValueError(
                f"reconstructions {tuple(reconstructions.shape)} and targets {tuple(targets.shape)} differ in shape"
            )
        mse = F.mse_loss(reconstructions.float(), targets.float())
        parts = {"mse": mse.detach()}
        if self.lpips is None:
            return mse, parts
        perceptual = self.lpips(reconstructions.float(), targets.float()).mean()
        parts["lpips"] = perceptual.detach()
        w = self.perceptual_weight
        return (1.0 - w) * mse + w * perceptual, parts
