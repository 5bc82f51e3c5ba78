"""The training loop: engines + data + step + logging + validation + samples + checkpoints + graceful stop.

    trainer = Trainer(cfg, env, device)        # after init_distributed, on every rank
    result = trainer.fit(resume=folder_or_None)  # TrainResult(step, stopped_early, reason, checkpoint)

Seeding: every rank seeds with train.seed before building the modules (identical initial weights, and the
same random LPIPS backbone in tests), then with train.seed + rank for anything random during training. The data
streams carry their own seeded generators and resumable positions.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol

import numpy as np
import torch
from torch import Tensor

from lasers_dist.bottleneck import perplexity
from lasers_dist.config import Config, save_config
from lasers_dist.data import ShardStream, expand_urls
from lasers_dist.losses import ReconstructionLoss
from lasers_dist.models import build_autoencoder, build_discriminator
from lasers_dist.train import checkpoint as ckpt
from lasers_dist.train import distributed as D
from lasers_dist.train.distributed import DistEnv
from lasers_dist.train.engines import Engines, build_engines
from lasers_dist.train.metrics import MetricAccumulator, MetricsLog, psnr
from lasers_dist.train.omp_backend import agree_omp_backend
from lasers_dist.train.provenance import build_provenance, write_provenance
from lasers_dist.train.signals import StopFlag
from lasers_dist.train.step import train_step


class BatchStream(Protocol):
    """What the loop needs from a training stream (ShardStream, or a test's union of streams)."""

    def forever(self) -> Iterator[dict]: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...
    def set_epoch(self, epoch: int) -> None: ...
    @property
    def corrupt_count(self) -> int: ...


@dataclass
class TrainResult:
    step: int
    stopped_early: bool  # a signal or train.stop_at_step ended the run before train.max_steps
    reason: str  # "finished", or the signal name / "requested"
    checkpoint: Path | None  # the last committed checkpoint


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def micro_batch_size(cfg: Config, world_size: int) -> int:
    return cfg.train.batch_size // (world_size * cfg.optim.grad_accum_steps)


def _stream_args(cfg: Config, world_size: int) -> dict:
    d = cfg.data
    return dict(
        batch_size=micro_batch_size(cfg, world_size),
        image_size=d.image_size,
        seed=cfg.train.seed,
        degradation=None if d.degradation == "none" else d.degradation,
        sr_factor=d.sr_factor,
        mask_fraction=d.inpaint_fraction,
    )


def build_train_stream(cfg: Config, env: DistEnv) -> ShardStream:
    d = cfg.data
    return ShardStream(
        d.train_shards,
        mode=d.mode,
        train=True,
        rank=env.rank,
        world_size=env.world_size,
        num_workers=d.num_workers,
        batches_per_epoch=d.batches_per_epoch if d.mode == "resampled" else None,
        **_stream_args(cfg, env.world_size),
    )


def build_val_stream(cfg: Config, env: DistEnv) -> ShardStream | None:
    """This rank's share of the val shards (in order, centre crops), or None when it gets no shard: with fewer
    val shards than ranks the first ranks validate and the others contribute nothing to the reduction."""
    if not cfg.data.val_shards:
        return None
    val_world = min(env.world_size, len(expand_urls(cfg.data.val_shards)))
    if env.rank >= val_world:
        return None
    return ShardStream(
        cfg.data.val_shards, mode="split", train=False, rank=env.rank, world_size=val_world, num_workers=0,
        **_stream_args(cfg, env.world_size),
    )


def data_rng():
    """A block whose use of the global torch RNG is undone afterwards. DataLoader iterators draw their base seed
    from it when they start (at the first batch, again after a resume, for every validation pass), which would
    make the training RNG depend on when the run was last resumed; with this, it depends on the step only."""
    return torch.random.fork_rng(devices=[])


def split_batch(batch: dict, device: torch.device) -> tuple[Tensor, Tensor]:
    """(inputs, targets) on `device`: the encoder's input (degraded for restoration tasks) and the clean image."""
    targets = batch["images"].to(device, non_blocking=True)
    inputs = batch["inputs"].to(device, non_blocking=True) if "inputs" in batch else targets
    return inputs, targets


class Trainer:
    """Owns one run on one rank. Construct on every rank after `init_distributed`; `fit` runs the loop."""

    def __init__(
        self,
        cfg: Config,
        env: DistEnv,
        device: torch.device,
        train_stream: BatchStream | None = None,
        progress: bool = True,
    ) -> None:
        self.cfg, self.env, self.device = cfg, env, device
        self.out_dir = Path(cfg.train.out_dir)
        self.checkpoints = self.out_dir / "checkpoints"
        seed_everything(cfg.train.seed)
        autoencoder = build_autoencoder(cfg.model)
        discriminator = build_discriminator(cfg.model)
        self.recon_loss = ReconstructionLoss(
            cfg.loss.perceptual_weight, cfg.loss.lpips_net, cfg.loss.lpips_random_backbone
        ).to(device)
        self.engines: Engines = build_engines(cfg, autoencoder, discriminator, env.world_size, device)
        # Decision 6: the OMP backend is decided here (Triton self-check on first use), agreed across ranks,
        # logged once and recorded in provenance.json and every checkpoint's meta.json.
        self.omp = agree_omp_backend(cfg.model, env.rank, env.world_size, device)
        if env.is_main:
            print(f"lasers-train: {self.omp.message}", flush=True)
            write_provenance(self.out_dir, build_provenance(env.world_size, device, self.omp.record()))
        seed_everything(cfg.train.seed + env.rank)
        self.train_stream = train_stream if train_stream is not None else build_train_stream(cfg, env)
        self.progress = progress
        self.step = 0
        self._sample_batch: Tensor | None = None  # first training inputs of this run (no val shards)
        self._val_sample: Tensor | None = None  # first val inputs, the same images at every sample step

    # ---- resume -----------------------------------------------------------------------------------------

    def load(self, folder: Path) -> None:
        """Restore engines, step, this rank's stream position and RNG states from a committed checkpoint."""
        cfg = self.cfg
        ckpt.check_resume_compatible(
            ckpt.read_meta(folder), self.env.world_size, cfg.data.mode, cfg.deepspeed.zero_stage, folder,
            cfg.train.precision,
        )
        meta, state = ckpt.load_checkpoint(folder, self.engines, self.env.rank)
        self.step = int(meta["step"])
        if meta["world_size"] == self.env.world_size and state is not None:
            self.train_stream.load_state_dict(state["stream"])
            ckpt.set_rng_state(state["rng"])
        else:
            # Resampled stream on a new world size: positions do not carry over; start a fresh epoch past the
            # saved one, so no rank replays the samples it drew before.
            self.train_stream.set_epoch(int(meta.get("stream_epoch", 0)) + 1)
            seed_everything(self.cfg.train.seed + self.env.rank + 1_000_003 * self.step)

    # ---- the loop ---------------------------------------------------------------------------------------

    def fit(self, resume: Path | None = None) -> TrainResult:
        cfg, env = self.cfg, self.env
        if resume is not None:
            self.load(resume)
        if env.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.out_dir / "config.yaml")
        self._write_status("running", "", ckpt.latest_checkpoint(self.checkpoints))  # a crash leaves "running"
        log = MetricsLog(self.out_dir, env.is_main, cfg.train.max_steps, self.step, progress=self.progress)
        if resume is not None:
            log.message(f"lasers-train: resumed from {resume} at step {self.step}")
        try:
            return self._loop(log)
        finally:
            log.close()

    def _loop(self, log: MetricsLog) -> TrainResult:
        cfg, t, accum_steps = self.cfg, self.cfg.train, self.cfg.optim.grad_accum_steps
        metrics = MetricAccumulator()
        batches = self.train_stream.forever()
        last_checkpoint = ckpt.latest_checkpoint(self.checkpoints)
        train_time, steps_timed = 0.0, 0
        stopped, reason = False, "finished"
        with StopFlag() as stop:
            while self.step < t.max_steps:
                start = time.perf_counter()
                with data_rng():
                    micro_batches = [split_batch(next(batches), self.device) for _ in range(accum_steps)]
                if self._sample_batch is None:
                    self._sample_batch = micro_batches[0][0][:8].clone()
                metrics.add(train_step(self.engines, self.recon_loss, micro_batches, self.step, cfg))
                self.step += 1
                train_time, steps_timed = train_time + time.perf_counter() - start, steps_timed + 1
                step, last = self.step, self.step == t.max_steps
                record: dict[str, float] = {}  # one metrics.jsonl line per step, train and val values together
                if step % t.log_every == 0 or last:
                    record.update(metrics.reduce())
                    record.update(self._log_extras(t.batch_size * steps_timed / max(train_time, 1e-9)))
                    train_time, steps_timed = 0.0, 0
                with data_rng():
                    if (t.val_every and step % t.val_every == 0) or last:
                        record.update(self.validate())
                    if (t.sample_every and step % t.sample_every == 0) or last:
                        self.save_samples(step)
                if record:
                    log.log(step, record)
                    log.progress(step, record)
                if step == t.stop_at_step:
                    stop.request()
                stopping = stop.should_stop(self.device) and not last
                if stopping or step % t.checkpoint_every == 0 or last:
                    last_checkpoint = self.save(step)
                if stopping:
                    stopped, reason = True, stop.reason
                    break
        if stopped:
            log.message(
                f"lasers-train: stopped early at step {self.step} ({reason}); checkpoint {last_checkpoint} is "
                "complete; resume with --resume auto"
            )
        else:
            log.message(f"lasers-train: finished {self.step} steps; checkpoint {last_checkpoint}")
        self._write_status("stopped" if stopped else "finished", reason, last_checkpoint)
        return TrainResult(self.step, stopped, reason, last_checkpoint)

    def _log_extras(self, images_per_s: float) -> dict[str, float]:
        corrupt = torch.tensor([float(self.train_stream.corrupt_count)], device=self.device)
        D.all_reduce_(corrupt, op="sum")
        return {
            "images_per_s": images_per_s,
            "lr": float(self.engines.generator.get_lr()[0]),
            "data/corrupt_samples": corrupt.item(),
        }

    def _write_status(self, state: str, reason: str, checkpoint: Path | None) -> None:
        """out_dir/status.json for requeue scripts: state "running" (still running, or crashed), "stopped"
        (a signal or train.stop_at_step: resumable with --resume auto) or "finished"."""
        if not self.env.is_main:
            return
        status = {"state": state, "step": self.step, "reason": reason,
                  "checkpoint": str(checkpoint) if checkpoint else None}
        (self.out_dir / "status.json").write_text(json.dumps(status) + "\n")

    # ---- checkpoints ------------------------------------------------------------------------------------

    def save(self, step: int) -> Path:
        rank_state = {"step": step, "stream": self.train_stream.state_dict(), "rng": ckpt.rng_state()}
        meta = ckpt.build_meta(step, self.cfg, self.env.world_size)
        meta["stream_epoch"] = int(rank_state["stream"].get("epoch", 0))
        meta["omp_backend"] = self.omp.backend
        keep = self.cfg.train.keep_checkpoints
        return ckpt.save_checkpoint(self.checkpoints, step, self.engines, rank_state, meta, keep)

    # ---- validation and samples -------------------------------------------------------------------------

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Reconstruction metrics on up to train.val_batches batches per rank, reduced over ranks (a collective:
        every rank calls it; ranks without a val shard contribute zeros). {} without val shards."""
        if not self.cfg.data.val_shards:
            return {}
        generator = self.engines.generator.module
        num_atoms = generator.bottleneck.num_atoms
        sums = torch.zeros(4, dtype=torch.float64, device=self.device)  # images, psnr sum, mse sum, lpips sum
        usage = torch.zeros(num_atoms, dtype=torch.float64, device=self.device)
        stream = build_val_stream(self.cfg, self.env)
        generator.eval()
        try:
            if stream is not None:
                for index, batch in enumerate(stream):
                    if index >= self.cfg.train.val_batches:
                        break
                    inputs, targets = split_batch(batch, self.device)
                    out = generator(inputs.to(next(generator.parameters()).dtype))
                    recon = out.reconstructions.float()
                    _, parts = self.recon_loss(recon, targets)
                    n = targets.shape[0]
                    sums += torch.tensor(
                        [n, psnr(recon, targets).item() * n, parts["mse"].item() * n,
                         parts.get("lpips", torch.zeros(())).item() * n],
                        dtype=torch.float64, device=self.device,
                    )
                    usage += out.info.usage.double()
        finally:
            generator.train()
            if stream is not None:
                stream.close()
        packed = D.all_reduce_(torch.cat([sums, usage]), op="sum")
        sums, usage = packed[:4], packed[4:]
        count = max(sums[0].item(), 1.0)
        values = {
            "val/psnr": sums[1].item() / count,
            "val/mse": sums[2].item() / count,
            "val/perplexity": perplexity(usage).item(),
            "val/dead_atoms": float((usage == 0).sum().item()),
        }
        if self.cfg.loss.perceptual_weight > 0:
            values["val/lpips"] = sums[3].item() / count
        return values

    @torch.no_grad()
    def save_samples(self, step: int) -> None:
        """Rank 0: out_dir/samples/step-NNNNNNNN.png, originals (top row) over reconstructions (bottom row).

        Uses the first val batch when there are val shards (the same images at every step), else the first
        training batch of this run. Eval-mode forwards issue no collectives, so only rank 0 computes.
        """
        if not self.env.is_main:
            return
        from torchvision.utils import save_image

        images = self._fixed_sample_images()
        if images is None:
            return
        generator = self.engines.generator.module
        generator.eval()
        try:
            recon = generator(images.to(next(generator.parameters()).dtype)).reconstructions.float()
        finally:
            generator.train()
        grid = torch.cat([images.float(), recon.clamp(-1, 1)])
        path = self.out_dir / "samples" / f"{ckpt.step_name(step)}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_image((grid + 1) / 2, path, nrow=images.shape[0], padding=1)

    def _fixed_sample_images(self) -> Tensor | None:
        if self._val_sample is None and self.cfg.data.val_shards:
            stream = build_val_stream(self.cfg, self.env)
            if stream is not None:
                self._val_sample = split_batch(next(iter(stream)), self.device)[0][:8]
                stream.close()
        return self._val_sample if self._val_sample is not None else self._sample_batch
