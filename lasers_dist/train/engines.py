"""The two DeepSpeed engines of a run (generator and discriminator) and the DeepSpeed config dicts behind them.

Both engines get a plain torch AdamW (DeepSpeed's FusedAdam / DeepSpeedCPUAdam would JIT-compile C++ on first
use) and a LambdaLR warmup + cosine schedule that DeepSpeed steps after each optimizer step. Only parameters
with requires_grad reach an optimizer: the online-updated dictionary and the LPIPS network never do.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lasers_dist.config import Config, ConfigError
from lasers_dist.train.schedule import build_scheduler


def _ours(cfg: Config, world_size: int) -> dict[str, Any]:
    accum = cfg.optim.grad_accum_steps
    return {
        "train_batch_size": cfg.train.batch_size,
        "train_micro_batch_size_per_gpu": cfg.train.batch_size // (world_size * accum),
        "gradient_accumulation_steps": accum,
        # DeepSpeed would clip at 1.0 if this key were missing; 0 means no clipping.
        "gradient_clipping": float(cfg.optim.grad_clip),
        # compute_grad_norm / check_grad_overflow: the ZeRO-1/2 and bf16 wrappers skip an update whose gradient
        # norm (all-reduced, so every rank agrees) is not finite; the trainer counts on that (see train/step.py).
        "zero_optimization": {"stage": cfg.deepspeed.zero_stage, "compute_grad_norm": True},
        # Our optimizer is a torch AdamW, which ZeRO-1/2 accept only with this flag.
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": cfg.train.precision == "bf16", "check_grad_overflow": True},
        "steps_per_print": 1 << 30,  # our own metrics log replaces DeepSpeed's step prints
        "wall_clock_breakdown": False,
    }


def _conflicts(base: Any, ours: Any, prefix: str = "") -> list[str]:
    """Dotted keys that both dicts set, to different values."""
    if not isinstance(base, dict) or not isinstance(ours, dict):
        return [] if base == ours else [prefix.rstrip(".")]
    found: list[str] = []
    for key in ours.keys() & base.keys():
        found += _conflicts(base[key], ours[key], f"{prefix}{key}.")
    return found


def _merge(base: dict[str, Any], ours: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in ours.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def load_deepspeed_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config key 'deepspeed.config_file': {path} does not exist")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"config key 'deepspeed.config_file': {path} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"config key 'deepspeed.config_file': {path} must hold a JSON object")
    return data


def deepspeed_config(cfg: Config, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config dict of both engines: deepspeed.config_file (tuning knobs such as bucket sizes)
    under the keys our Config owns (batch sizes, clipping, ZeRO stage, precision).

    A key set in the file to a value that contradicts our Config is a ConfigError rather than a silent
    override, and so are sections that would fight our client optimizer and schedule.
    """
    ours = _ours(cfg, world_size)
    if not cfg.deepspeed.config_file:
        return ours
    path = cfg.deepspeed.config_file
    base = load_deepspeed_file(path)
    owned = {"optimizer": "optim.*", "scheduler": "optim.schedule", "fp16": "train.precision"}
    for key, ours_key in owned.items():
        if key in base and (key != "fp16" or base[key].get("enabled", False)):
            raise ConfigError(
                f"deepspeed.config_file {path}: remove the '{key}' section; it is set through {ours_key} in our config"
            )
    # Batch keys are derived from train.batch_size, so a file written for another world size would clash.
    base = {k: v for k, v in base.items() if k not in ("train_batch_size", "train_micro_batch_size_per_gpu")}
    clashes = _conflicts(base, ours)
    if clashes:
        shown = ", ".join(f"{key} (file) vs our config" for key in clashes)
        raise ConfigError(
            f"deepspeed.config_file {path} contradicts our config at {shown}: set deepspeed.zero_stage, "
            "optim.grad_clip, optim.grad_accum_steps and train.precision in our config and drop them from the file"
        )
    return _merge(base, ours)


class SkippableAdamW(torch.optim.AdamW):
    """AdamW whose update is skipped, leaving weights and moments untouched, when the trainer sets `skip_update`
    (all ranks agreed that the step's losses or latents were not finite) or when a gradient it holds is not finite.

    DeepSpeed calls step() at the accumulation boundary: on this object itself at ZeRO-0 in fp32, where the
    engine also reads `overflow` to count the skip and hold the LR schedule (as for its own fp16 overflows), and
    on the fp32 master partitions behind its ZeRO-1/2 and bf16 wrappers, which skip non-finite gradient norms
    before it is called. `skipped_last_update` tells the LR schedule to hold in every case (train/schedule.py).
    """

    skip_update = False
    overflow = False
    skipped_last_update = False

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        finite = not grads or bool(torch.isfinite(torch.stack(torch._foreach_norm(grads))).all())
        self.overflow = self.skipped_last_update = self.skip_update or not finite
        if self.overflow:
            return None
        return super().step(closure)


def adamw(params: list[nn.Parameter], lr: float, cfg: Config) -> SkippableAdamW:
    betas = tuple(cfg.optim.betas)
    if len(betas) != 2:
        raise ConfigError(f"optim.betas must hold two numbers, got {cfg.optim.betas}")
    return SkippableAdamW(params, lr=lr, betas=betas, weight_decay=cfg.optim.weight_decay)


def trainable(module: nn.Module) -> list[nn.Parameter]:
    """Parameters an optimizer may own (frozen / online-updated ones excluded)."""
    return [p for p in module.parameters() if p.requires_grad]


@dataclass
class Engines:
    generator: Any  # deepspeed.DeepSpeedEngine around the Autoencoder
    discriminator: Any | None  # around the PatchDiscriminator, None for DL-VAE / VQ-VAE


def _engine(module: nn.Module, lr: float, warmup: int, total: int, cfg: Config, ds_config: dict) -> Any:
    import deepspeed

    optimizer = adamw(trainable(module), lr, cfg)
    scheduler = build_scheduler(optimizer, warmup, total, cfg.optim.min_lr_ratio, cfg.optim.schedule)
    engine, _, _, _ = deepspeed.initialize(
        model=module, optimizer=optimizer, lr_scheduler=scheduler, config=copy.deepcopy(ds_config)
    )
    if cfg.train.precision == "bf16":
        _restore_fp32_state(engine.module)
    _broadcast_buffers(engine.module)
    return engine


@torch.no_grad()
def _restore_fp32_state(module: nn.Module) -> None:
    # A bf16 engine casts every floating tensor of the module. Trainable weights keep an fp32 master copy in
    # the optimizer, but state no optimizer owns (EMA codebook and cluster sizes, online A / B statistics, the
    # online-updated dictionary) would be stored in bf16 and lose every update below 2^-8 relative. The
    # bottleneck computes in fp32 and casts its output to the activations' dtype, so fp32 storage is safe.
    for sub in module.modules():
        for name, buffer in sub._buffers.items():
            if buffer is not None and buffer.is_floating_point():
                sub._buffers[name] = buffer.float()
        for param in sub.parameters(recurse=False):
            if not param.requires_grad and param.is_floating_point():
                param.data = param.data.float()


@torch.no_grad()
def _broadcast_buffers(module: nn.Module) -> None:
    # DeepSpeed broadcasts parameters from rank 0 but not buffers (EMA codebook, usage windows): make rank 0's
    # the common start so every later all-reduced update keeps them identical.
    if not torch.distributed.is_initialized():
        return
    for buffer in module.buffers():
        torch.distributed.broadcast(buffer, src=0)


def build_engines(
    cfg: Config, autoencoder: nn.Module, discriminator: nn.Module | None, world_size: int, device: torch.device
) -> Engines:
    """Wrap both modules in DeepSpeed engines (call on every rank, after init_distributed).

    The generator's schedule spans train.max_steps; the discriminator's starts at loss.disc_start (it is not
    stepped before) and spans the remaining steps.
    """
    ds_config = deepspeed_config(cfg, world_size)
    autoencoder.to(device)
    generator = _engine(autoencoder, cfg.optim.lr, cfg.optim.warmup_steps, cfg.train.max_steps, cfg, ds_config)
    disc_engine = None
    if discriminator is not None:
        discriminator.to(device)
        disc_steps = max(1, cfg.train.max_steps - cfg.loss.disc_start)
        disc_engine = _engine(discriminator, cfg.optim.disc_lr, cfg.optim.warmup_steps, disc_steps, cfg, ds_config)
    return Engines(generator, disc_engine)
