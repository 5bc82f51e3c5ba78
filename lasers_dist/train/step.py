"""One optimizer step of DL-GAN / VQ-GAN (or DL-VAE / VQ-VAE without a discriminator).

Per micro-batch (DeepSpeed applies the update on the last one of a gradient-accumulation window):
    generator:      loss = recon(x, x_hat) + codebook_weight * bottleneck_loss [+ lambda * G(D(x_hat))]
    discriminator:  loss = D_loss(D(x), D(sg[x_hat]))                          (from loss.disc_start on)

In the generator step the discriminator is frozen and called through its bare module: gradients of the GAN
term must reach the generator only. Through the engine, or with requires_grad on, DeepSpeed would collect them
for the discriminator's next update (silently at ZeRO-1, an error at ZeRO-0 and ZeRO-2).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from lasers_dist.config import Config
from lasers_dist.losses import adaptive_weight, discriminator_loss, disc_factor, generator_loss
from lasers_dist.train import distributed as D
from lasers_dist.train.metrics import psnr


@contextmanager
def frozen(module: nn.Module) -> Iterator[nn.Module]:
    """Turn off requires_grad of `module`'s parameters inside the block, restoring each flag afterwards."""
    params = list(module.parameters())
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield module
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


def _mean_over_ranks(tensor: Tensor) -> Tensor:
    return D.all_reduce_(tensor, op="mean")


def module_dtype(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


def generator_micro_step(
    engines: Any, recon_loss: nn.Module, inputs: Tensor, targets: Tensor, step: int, cfg: Config
) -> tuple[Tensor, dict[str, Tensor]]:
    """Forward + backward (+ DeepSpeed step call) of the generator on one micro-batch.

    inputs: (B, 3, H, W) what the encoder sees (degraded for restoration tasks); targets: (B, 3, H, W) the
    clean images, both in [-1, 1]. Returns the detached reconstructions (for the discriminator) and 0-dim
    metric tensors.
    """
    gen, disc = engines.generator, engines.discriminator
    out = gen(inputs.to(module_dtype(gen.module)))
    recon, parts = recon_loss(out.reconstructions.float(), targets)
    loss = recon + cfg.loss.codebook_weight * out.bottleneck_loss
    metrics = {
        "train/recon": recon.detach(),
        "train/mse": parts["mse"],
        "train/bottleneck": out.bottleneck_loss.detach().float(),
        "train/psnr": psnr(out.reconstructions, targets),
        "train/perplexity": out.info.perplexity.detach().float(),
        "train/dead_atoms": out.info.dead_atoms.detach().float(),
    }
    if "lpips" in parts:
        metrics["train/lpips"] = parts["lpips"]
    factor = disc_factor(step, cfg.loss.disc_start, 1.0) if disc is not None else 0.0
    if factor > 0:
        with frozen(disc.module):
            g_loss = generator_loss(disc.module(out.reconstructions), cfg.loss.gan_loss)
            if cfg.loss.adaptive_weight:
                weight = adaptive_weight(recon, g_loss, gen.module.last_layer, reduce_grads=_mean_over_ranks)
                weight = weight * cfg.loss.disc_weight
            else:
                weight = torch.tensor(cfg.loss.disc_weight, device=recon.device)
            loss = loss + factor * weight * g_loss
            gen.backward(loss)
        metrics["train/lambda"] = weight
        metrics["train/g_loss"] = g_loss.detach()
    else:
        gen.backward(loss)
    gen.step()
    metrics["train/loss"] = loss.detach().float()
    return out.reconstructions.detach(), metrics


def discriminator_micro_step(engines: Any, targets: Tensor, reconstructions: Tensor, cfg: Config) -> dict[str, Tensor]:
    """Forward + backward (+ DeepSpeed step call) of the discriminator on real images and detached fakes."""
    disc = engines.discriminator
    dtype = module_dtype(disc.module)
    # Two calls rather than one concatenated batch: the fake half must not change the real half's logits.
    logits_real = disc(targets.to(dtype))
    logits_fake = disc(reconstructions.to(dtype))
    d_loss = discriminator_loss(logits_real, logits_fake, cfg.loss.gan_loss)
    disc.backward(d_loss)
    disc.step()
    return {
        "train/d_loss": d_loss.detach(),
        "train/logits_real": logits_real.detach().float().mean(),
        "train/logits_fake": logits_fake.detach().float().mean(),
    }


@torch.no_grad()
def revive_if_due(engines: Any) -> None:
    """After an optimizer step: replace dead atoms when the bottleneck's revival window has ended.

    A gradient-trained dictionary edited in place must also be written into the optimizer's fp32 master copy
    (ZeRO-1/2, bf16), or the next step would restore the old atoms.
    """
    bottleneck = getattr(engines.generator.module, "bottleneck", None)
    if not getattr(bottleneck, "revival_due", False):
        return
    from deepspeed.utils import safe_set_full_fp32_param

    bottleneck.revive_dead()
    if bottleneck.dictionary.requires_grad:
        safe_set_full_fp32_param(bottleneck.dictionary, bottleneck.dictionary.detach().float())


def train_step(
    engines: Any, recon_loss: nn.Module, micro_batches: list[tuple[Tensor, Tensor]], step: int, cfg: Config
) -> dict[str, Tensor]:
    """One optimizer step over `micro_batches` [(inputs, targets), ...] (optim.grad_accum_steps of them).

    `step` is the number of optimizer steps already taken (0 for the first); the GAN terms are on when
    step >= loss.disc_start. Returns the step's metrics averaged over its micro-batches (0-dim tensors).
    """
    disc_on = engines.discriminator is not None and disc_factor(step, cfg.loss.disc_start, 1.0) > 0
    totals: dict[str, Tensor] = {}
    for inputs, targets in micro_batches:
        reconstructions, metrics = generator_micro_step(engines, recon_loss, inputs, targets, step, cfg)
        if disc_on:
            metrics.update(discriminator_micro_step(engines, targets, reconstructions, cfg))
        for key, value in metrics.items():
            totals[key] = totals[key] + value if key in totals else value
    revive_if_due(engines)
    return {key: value / len(micro_batches) for key, value in totals.items()}
