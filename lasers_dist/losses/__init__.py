"""Losses: reconstruction (MSE + LPIPS) and adversarial (hinge / non-saturating, adaptive weight)."""

from lasers_dist.losses.adversarial import (
    GAN_LOSSES,
    GANDiagnostics,
    adaptive_weight,
    disc_factor,
    discriminator_loss,
    generator_loss,
)
from lasers_dist.losses.reconstruction import LPIPS_NETS, ReconstructionLoss, backbone_weights_path, build_lpips

__all__ = [
    "GAN_LOSSES",
    "GANDiagnostics",
    "LPIPS_NETS",
    "ReconstructionLoss",
    "adaptive_weight",
    "backbone_weights_path",
    "build_lpips",
    "disc_factor",
    "discriminator_loss",
    "generator_loss",
]
