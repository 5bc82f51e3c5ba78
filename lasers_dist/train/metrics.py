"""What a run shows: metrics.jsonl (one JSON object per logged step), TensorBoard when installed, a progress bar.

Per-step values stay on the device as tensors and are summed locally; one all-reduce per log step averages
them over ranks, so logging costs no per-step host sync.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lasers_dist.train import distributed as D


def psnr(reconstructions: Tensor, targets: Tensor) -> Tensor:
    """Mean per-image PSNR in dB of images in [-1, 1], measured on [0, 1] (peak 1): (B, C, H, W) x 2 -> 0-dim.

    On [0, 1] the MSE is a quarter of the MSE on [-1, 1]; clamping the reconstructions to the valid range first
    is what an image file would hold.
    """
    recon01 = (reconstructions.detach().float().clamp(-1, 1) + 1) / 2
    target01 = (targets.detach().float() + 1) / 2
    mse = (recon01 - target01).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return (-10.0 * torch.log10(mse)).mean()


class MetricAccumulator:
    """Sums of 0-dim tensors per key between log steps; `reduce` averages over steps and ranks.

    Every rank must add the same keys over an interval (they depend on the step only, e.g. the GAN terms after
    loss.disc_start), because the reduction packs them in sorted-key order.
    """

    def __init__(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self.counts: dict[str, int] = {}

    def add(self, values: dict[str, Tensor]) -> None:
        for key, value in values.items():
            value = value.detach().float()
            self.sums[key] = self.sums[key] + value if key in self.sums else value.clone()
            self.counts[key] = self.counts.get(key, 0) + 1

    def reduce(self) -> dict[str, float]:
        """Averages over the interval and over ranks (a collective when anything was added); then resets."""
        if not self.sums:
            return {}
        keys = sorted(self.sums)
        packed = torch.stack([self.sums[k] / self.counts[k] for k in keys])
        D.all_reduce_(packed, op="mean")
        values = dict(zip(keys, packed.tolist()))
        self.sums, self.counts = {}, {}
        return values


class MetricsLog:
    """Rank 0's writer: out_dir/metrics.jsonl (appended, so a resumed run continues the file), TensorBoard
    events under out_dir/tensorboard when the tensorboard package is installed, and a tqdm progress bar.
    Other ranks construct it disabled and every call is a no-op."""

    def __init__(
        self, out_dir: str | Path, enabled: bool, total_steps: int, start_step: int = 0, progress: bool = True
    ) -> None:
        self.enabled = enabled
        self.path = Path(out_dir) / "metrics.jsonl"
        self._file = None
        self._tensorboard = None
        self._bar = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._drop_after(start_step)
        self._file = self.path.open("a")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard = SummaryWriter(str(Path(out_dir) / "tensorboard"), purge_step=start_step + 1)
        except ImportError:  # tensorboard is optional
            self._tensorboard = None
        if progress:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def _drop_after(self, step: int) -> None:
        # A run that resumes from step N rewrites steps > N: keep the file one line per step, as if uninterrupted.
        if not self.path.is_file():
            return
        kept = [line for line in self.path.read_text().splitlines() if _step_of(line) <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def log(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _finite(v) for k, v in values.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tensorboard is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self._tensorboard.add_scalar(key, value, step)

    def progress(self, step: int, values: dict[str, float]) -> None:
        if self._bar is None:
            return
        shown = {
            "img/s": values.get("images_per_s"),
            "loss": values.get("train/loss"),
            "psnr": values.get("train/psnr"),
            "ppl": values.get("train/perplexity"),
            "lambda": values.get("train/lambda"),
        }
        self._bar.set_postfix({k: f"{v:.3g}" for k, v in shown.items() if v is not None}, refresh=False)
        self._bar.update(step - self._bar.n)

    def message(self, text: str) -> None:
        """A line for the console (through tqdm, so it does not break the bar)."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._bar is not None:
            self._bar.close()
        self._file = self._tensorboard = self._bar = None


def _step_of(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf  # a torn line (the process was killed while writing it): dropped


def _finite(value: Any) -> Any:
    # JSON has no NaN / inf: write null so every line stays parseable by strict readers.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
