"""Learning-rate schedule: linear warmup, then cosine decay to min_lr_ratio (or constant after warmup).

The schedule is a picklable callable (not a lambda), so LambdaLR's state_dict carries it through DeepSpeed
checkpoints and a resumed run continues on the same curve.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SCHEDULES = ("cosine", "constant")


@dataclass
class WarmupCosine:
    """step -> LR multiplier. Warmup: (step + 1) / warmup_steps for step < warmup_steps (the first step already
    trains). Then cosine from 1 at warmup_steps down to min_ratio at total_steps (constant: 1), and min_ratio
    beyond total_steps."""

    warmup_steps: int
    total_steps: int
    min_ratio: float = 0.1
    kind: str = "cosine"

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise ValueError(f"optim.schedule must be one of {SCHEDULES}, got {self.kind!r}")
        if self.warmup_steps < 0 or self.total_steps < 1:
            raise ValueError(
                f"need warmup_steps >= 0 and total_steps >= 1, got {self.warmup_steps} and {self.total_steps}"
            )
        if not 0.0 <= self.min_ratio <= 1.0:
            raise ValueError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_ratio}")

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return 1.0
        decay_steps = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class HoldingLambdaLR(torch.optim.lr_scheduler.LambdaLR):
    """LambdaLR that holds when its optimizer skipped the last update (a non-finite step, see
    train.engines.SkippableAdamW): the schedule counts applied updates, as DeepSpeed's own skipped steps do."""

    def step(self, epoch: int | None = None) -> None:
        if getattr(self.optimizer, "skipped_last_update", False):
            return
        super().step(epoch)


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    warmup_steps: int,
    total_steps: int,
    min_ratio: float = 0.1,
    kind: str = "cosine",
) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR over `optimizer` following WarmupCosine; DeepSpeed steps it after every applied optimizer step."""
    return HoldingLambdaLR(optimizer, WarmupCosine(warmup_steps, total_steps, min_ratio, kind))
