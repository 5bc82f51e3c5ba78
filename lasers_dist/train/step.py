"""One optimizer step of DL-GAN / VQ-GAN (or DL-VAE / VQ-VAE without a discriminator).

Per micro-batch (DeepSpeed applies the update on the last one of a gradient-accumulation window):
    generator:      loss = recon(x, x_hat) + codebook_weight * bottleneck_loss [+ lambda * G(D(x_hat))]
    discriminator:  loss = D_loss(D(x), D(sg[x_hat]))                          (from loss.disc_start on)

In the generator step the discriminator is frozen and called through its bare module: gradients of the GAN
term must reach the generator only. Through the engine, or with requires_grad on, DeepSpeed would collect them
for the discriminator's next update (silently at ZeRO-1, an error at ZeRO-0 and ZeRO-2).

Non-finite steps: every rank notes whether its latents (before sparse coding), generator loss or discriminator
loss held a NaN / Inf; one all-reduce before the optimizer steps makes that the verdict of all ranks, and a bad
step is skipped everywhere: no optimizer moves (train.engines.SkippableAdamW), the LR schedule holds, and the
module state that the forward itself updates (EMA codebook, online dictionary, usage windows) is put back. A
gradient that is not finite although the losses were is refused by the engines themselves (DeepSpeed's
all-reduced norm check behind ZeRO-1/2 and bf16, SkippableAdamW on the identical reduced gradients at ZeRO-0).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
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


# What a rank can find non-finite before the optimizer steps, in the order of the agreement vector.
NONFINITE_KINDS = ("the latents before sparse coding were", "the generator loss was", "the discriminator loss was")


@dataclass
class StepOutcome:
    """metrics: 0-dim tensors averaged over the step's micro-batches. skipped: no optimizer update happened (the
    same on every rank). reason: why, in words, naming the first rank that saw it ("" when applied)."""

    metrics: dict[str, Tensor]
    skipped: bool
    reason: str


def generator_micro_step(
    engines: Any, recon_loss: nn.Module, inputs: Tensor, targets: Tensor, step: int, cfg: Config
) -> tuple[Tensor, dict[str, Tensor], Tensor]:
    """Forward + backward of the generator on one micro-batch (the caller calls the engine's step).

    inputs: (B, 3, H, W) what the encoder sees (degraded for restoration tasks); targets: (B, 3, H, W) the
    clean images, both in [-1, 1]. Returns the detached reconstructions (for the discriminator), 0-dim metric
    tensors, and a 0-dim bool: whether the encoder's latents held a NaN / Inf.
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
    metrics["train/loss"] = loss.detach().float()
    latents_bad = ~torch.isfinite(out.latents.detach()).all()
    return out.reconstructions.detach(), metrics, latents_bad


def discriminator_micro_step(engines: Any, targets: Tensor, reconstructions: Tensor, cfg: Config) -> dict[str, Tensor]:
    """Forward + backward of the discriminator on real images and detached fakes (the caller steps it)."""
    disc = engines.discriminator
    dtype = module_dtype(disc.module)
    # Two calls rather than one concatenated batch: the fake half must not change the real half's logits.
    logits_real = disc(targets.to(dtype))
    logits_fake = disc(reconstructions.to(dtype))
    d_loss = discriminator_loss(logits_real, logits_fake, cfg.loss.gan_loss)
    disc.backward(d_loss)
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


def _forward_state(engines: Any) -> list[tuple[nn.Module, dict[str, Tensor]]]:
    """Copies of what training forwards change without an optimizer: buffers (EMA codebook, usage windows, online
    statistics) and parameters no optimizer owns (the online dictionary)."""
    saved = []
    for engine in (engines.generator, engines.discriminator):
        if engine is None:
            continue
        module = engine.module
        state = {name: b.detach().clone() for name, b in module.named_buffers() if b is not None}
        state.update({name: p.detach().clone() for name, p in module.named_parameters() if not p.requires_grad})
        saved.append((module, state))
    return saved


@torch.no_grad()
def _restore_forward_state(saved: list[tuple[nn.Module, dict[str, Tensor]]]) -> None:
    # Through load_state_dict, so modules that mirror their state on the host (the bottleneck's revival
    # schedule) re-read it.
    for module, state in saved:
        module.load_state_dict(state, strict=False)


def _skippable(engine: Any) -> Any:
    # A DeepSpeed engine keeps the optimizer it was given as client_optimizer (its .optimizer is a ZeRO / bf16
    # wrapper around it); a bare engine stand-in (kernels/bench_step.py) has just .optimizer.
    optimizer = getattr(engine, "client_optimizer", None) or engine.optimizer
    if not hasattr(optimizer, "skip_update"):
        raise TypeError(f"{type(optimizer).__name__} cannot skip a non-finite step: build the engines with "
                        "train.engines.build_engines (SkippableAdamW)")
    return optimizer


def _step_engine(engine: Any, skip: bool) -> bool:
    """The engine's boundary step, skipped when asked. Returns whether it applied an update: False also when its
    own check found a gradient norm that is not finite (all ranks agree on that, see the module docstring)."""
    optimizer = _skippable(engine)
    optimizer.skip_update = skip
    try:
        engine.step()
    finally:
        optimizer.skip_update = False
    engine_applied = engine.was_step_applied() if hasattr(engine, "was_step_applied") else True
    return not skip and engine_applied and not optimizer.skipped_last_update


def agree_nonfinite(found: Tensor) -> str:
    """found: (len(NONFINITE_KINDS),) flags of this rank (a collective: one all-reduce). Returns "" when no rank
    found anything, else what was found first and the lowest rank that found it, e.g. "the generator loss was
    NaN or Inf on rank 1"."""
    world, rank = D.world_size(), D.rank()
    code = torch.where(found > 0, float(world - rank), 0.0)
    D.all_reduce_(code, op="max")
    for kind, value in zip(NONFINITE_KINDS, code.tolist()):
        if value > 0:
            return f"{kind} NaN or Inf on rank {world - int(value)}"
    return ""


def train_step(
    engines: Any, recon_loss: nn.Module, micro_batches: list[tuple[Tensor, Tensor]], step: int, cfg: Config
) -> StepOutcome:
    """One optimizer step over `micro_batches` [(inputs, targets), ...] (optim.grad_accum_steps of them).

    `step` is the number of optimizer steps already taken (0 for the first); the GAN terms are on when
    step >= loss.disc_start. Within a step, DeepSpeed's step() calls before the last micro-batch only advance its
    accumulation counter; the boundary step comes after the non-finite verdict (see the module docstring).
    """
    disc_on = engines.discriminator is not None and disc_factor(step, cfg.loss.disc_start, 1.0) > 0
    saved = _forward_state(engines)
    totals: dict[str, Tensor] = {}
    found = torch.zeros(len(NONFINITE_KINDS), device=micro_batches[0][1].device)
    for index, (inputs, targets) in enumerate(micro_batches):
        reconstructions, metrics, latents_bad = generator_micro_step(engines, recon_loss, inputs, targets, step, cfg)
        found[0] += latents_bad.float()
        found[1] += (~torch.isfinite(metrics["train/loss"])).float()
        if disc_on:
            metrics.update(discriminator_micro_step(engines, targets, reconstructions, cfg))
            found[2] += (~torch.isfinite(metrics["train/d_loss"])).float()
        if index < len(micro_batches) - 1:
            engines.generator.step()
            if disc_on:
                engines.discriminator.step()
        for key, value in metrics.items():
            totals[key] = totals[key] + value if key in totals else value
    reason = agree_nonfinite(found)
    applied = _step_engine(engines.generator, skip=bool(reason))
    if not applied and not reason:
        reason = "the generator's gradients were NaN or Inf"
    if disc_on:
        disc_applied = _step_engine(engines.discriminator, skip=bool(reason))
        if not disc_applied and not reason:
            reason = "the discriminator's gradients were NaN or Inf (the generator's update was applied)"
    if reason:
        _restore_forward_state(saved)
    else:
        revive_if_due(engines)
    return StepOutcome({key: value / len(micro_batches) for key, value in totals.items()}, bool(reason), reason)
