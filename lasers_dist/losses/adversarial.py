"""GAN losses for the PatchGAN discriminator and the adaptive weight of the generator's GAN term.

Logits are the discriminator's raw outputs (B, 1, H', W'), one per patch; every loss is a mean over patches.

    hinge            D: 1/2 [mean relu(1 - D(x)) + mean relu(1 + D(x_hat))]     G: -mean D(x_hat)
    non_saturating   D: 1/2 [mean softplus(-D(x)) + mean softplus(D(x_hat))]   G: mean softplus(-D(x_hat))

(softplus(-l) = -log sigmoid(l); the 1/2 keeps the discriminator's loss on the scale of one term, as in
taming-transformers.) The generator's GAN term is weighted by

    lambda = ||grad_last recon|| / (||grad_last GAN|| + delta)          (Esser et al. 2021; the paper's eq. 16)

at the decoder's last layer, clamped to [0, max_weight] and detached, and switched on by disc_factor after
loss.disc_start optimizer steps.
"""

from __future__ import annotations

from typing import Callable

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

GAN_LOSSES = ("hinge", "non_saturating")


def _check_kind(kind: str) -> None:
    if kind not in GAN_LOSSES:
        raise ValueError(f"loss.gan_loss must be one of {GAN_LOSSES}, got {kind!r}")


def generator_loss(logits_fake: Tensor, kind: str = "hinge") -> Tensor:
    """Generator's GAN loss (0-dim) from the discriminator's logits on reconstructions."""
    _check_kind(kind)
    if kind == "hinge":
        return -logits_fake.float().mean()
    return F.softplus(-logits_fake.float()).mean()


def discriminator_loss(logits_real: Tensor, logits_fake: Tensor, kind: str = "hinge") -> Tensor:
    """Discriminator's loss (0-dim) from its logits on real images and on (detached) reconstructions."""
    _check_kind(kind)
    real, fake = logits_real.float(), logits_fake.float()
    if kind == "hinge":
        return 0.5 * (F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean())
    return 0.5 * (F.softplus(-real).mean() + F.softplus(fake).mean())


def adaptive_weight(
    recon_loss: Tensor,
    gan_loss: Tensor,
    last_layer: Tensor,
    delta: float = 1e-6,
    max_weight: float = 1e4,
    reduce_grads: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """lambda = ||d recon / d last_layer|| / (||d gan / d last_layer|| + delta), clamped to [0, max_weight].

    Both losses must depend on `last_layer` (the decoder's final weight). The graph is kept (retain_graph) for
    the backward of the total loss; the result is detached, a 0-dim fp32 tensor.
    reduce_grads: applied to the two stacked gradients (2, *last_layer.shape) before the norms; data-parallel
    training passes a mean all-reduce so every rank uses the global batch's lambda (a per-rank lambda would
    make N ranks differ from one process on the union of their batches).
    """
    recon_grad = torch.autograd.grad(recon_loss, last_layer, retain_graph=True)[0]
    gan_grad = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)[0]
    grads = torch.stack([recon_grad.float(), gan_grad.float()])
    if reduce_grads is not None:
        grads = reduce_grads(grads)
    weight = grads[0].norm() / (grads[1].norm() + delta)
    return weight.clamp(0.0, max_weight).detach()


def disc_factor(step: int, disc_start: int, factor: float = 1.0) -> float:
    """`factor` from optimizer step `disc_start` on, 0 before it (the GAN terms are off while the autoencoder
    learns to reconstruct)."""
    return factor if step >= disc_start else 0.0


@dataclass
class GANDiagnostics:
    """Detached numbers of one GAN step, for logging: the adaptive weight lambda, mean logits on real images
    and on reconstructions, and the discriminator's loss."""

    disc_weight: Tensor
    logits_real: Tensor
    logits_fake: Tensor
    disc_loss: Tensor

    @classmethod
    def from_step(
        cls, disc_weight: Tensor, logits_real: Tensor, logits_fake: Tensor, disc_loss: Tensor
    ) -> GANDiagnostics:
        """Reduce raw logits (B, 1, H', W') to their means and detach everything."""
        return cls(
            disc_weight=disc_weight.detach().float(),
            logits_real=logits_real.detach().float().mean(),
            logits_fake=logits_fake.detach().float().mean(),
            disc_loss=disc_loss.detach().float(),
        )

    def as_dict(self, prefix: str = "train/") -> dict[str, Tensor]:
        """Slash-named values for metrics.jsonl (still tensors: the caller syncs them once per log step)."""
        return {
            f"{prefix}disc_weight": self.disc_weight,
            f"{prefix}logits_real": self.logits_real,
            f"{prefix}logits_fake": self.logits_fake,
            f"{prefix}disc_loss": self.disc_loss,
        }
