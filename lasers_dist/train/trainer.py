"""The training loop: engines + data + step + logging + validation + samples + checkpoints + graceful stop.

    trainer = Trainer(cfg, env, device)        # after init_distributed, on every rank
    result = trainer.fit(resume=folder_or_None)  # TrainResult(step, stopped_early, reason, checkpoint)

Faults: a step whose numbers are not finite is skipped on every rank (lasers_dist.train.step) and counted as
train/skipped_steps; train.max_bad_steps of them in a row raise TrainingDiverged. Any exception leaves fit() only
after the data streams (and their DataLoader workers) are shut down and rank 0 has written status "failed".

Seeding: every rank seeds with train.seed before building the modules (identical initial weights, and the
same random LPIPS backbone in tests), then with train.seed + rank for anything random during training. The data
streams carry their own seeded generators and resumable positions.
"""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol

import numpy as np
import torch
from torch import Tensor

from lasers_dist.bottleneck import perplexity
from lasers_dist.config import Config, save_config
from lasers_dist.data import ShardStream, expand_urls, shared_shard_lists
from lasers_dist.losses import ReconstructionLoss
from lasers_dist.models import build_autoencoder, build_discriminator
from lasers_dist.train import checkpoint as ckpt
from lasers_dist.train import distributed as D
from lasers_dist.train.distributed import DistEnv
from lasers_dist.train.engines import Engines, build_engines
from lasers_dist.train.metrics import MetricAccumulator, MetricsLog, psnr
from lasers_dist.train.omp_backend import agree_omp_backend
from lasers_dist.train.provenance import build_provenance, write_provenance
from lasers_dist.train.signals import STOP_SIGNALS, StopFlag, stop_file_path
from lasers_dist.train.step import StepOutcome, train_step


class BatchStream(Protocol):
    """What the loop needs from a training stream (ShardStream, or a test's union of streams)."""

    def forever(self) -> Iterator[dict]: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...
    def set_epoch(self, epoch: int) -> None: ...
    @property
    def corrupt_count(self) -> int: ...
    # and, optionally, close(): stop reading now (ShardStream shuts its DataLoader workers down)


class TrainingDiverged(RuntimeError):
    """train.max_bad_steps non-finite steps in a row. `reason` ("diverged at step N: ...") goes to status.json."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"training {reason}")
        self.reason = reason


@dataclass
class TrainResult:
    step: int
    stopped_early: bool  # a signal or train.stop_at_step ended the run before train.max_steps
    reason: str  # "finished", or the signal name / "requested"
    checkpoint: Path | None  # the last committed checkpoint


def failure_reason(err: BaseException) -> str:
    """One line for status.json: the divergence reason, a failed collective in words, or the exception."""
    if isinstance(err, TrainingDiverged):
        return err.reason
    described = D.describe_collective_failure(err, None, 0)
    text = described or f"{type(err).__name__}: {err}"
    return " ".join(text.split())[:500]


@contextmanager
def stop_signals_held() -> Iterator[None]:
    """SIGTERM / SIGUSR1 ignored inside the block (main thread only; a no-op elsewhere).

    For a rank that is failing: once one worker has failed, torchrun sends SIGTERM to the others, which may be
    failing too (their collectives broke); the default action would end them before they say why and write
    status "failed". They exit by themselves a moment later.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


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


def shard_lists(cfg: Config, env: DistEnv) -> dict[str, tuple[list[str], list[int]]]:
    """{"train": (shard URLs, samples per shard), "val": ...}: rank 0 looks them up once per job and broadcasts
    (see `lasers_dist.data.index.shared_shard_lists`); a collective."""
    d = cfg.data
    return shared_shard_lists({"train": (d.train_shards, d.train_manifest), "val": (d.val_shards, d.val_manifest)},
                              rank=env.rank, broadcast=D.broadcast_object, timeout=d.io_timeout_s)


def build_train_stream(cfg: Config, env: DistEnv,
                       shards: tuple[list[str], list[int]] | None = None) -> ShardStream:
    """This rank's training stream; `shards` = (URLs, counts) from `shard_lists` (None: the stream looks them up)."""
    d = cfg.data
    return ShardStream(
        shards[0] if shards else d.train_shards,
        counts=shards[1] if shards else None,
        manifest=d.train_manifest or None,
        io_timeout_s=d.io_timeout_s,
        mode=d.mode,
        train=True,
        rank=env.rank,
        world_size=env.world_size,
        num_workers=d.num_workers,
        batches_per_epoch=d.batches_per_epoch if d.mode == "resampled" else None,
        **_stream_args(cfg, env.world_size),
    )


def build_val_stream(cfg: Config, env: DistEnv,
                     shards: tuple[list[str], list[int]] | None = None) -> ShardStream | None:
    """This rank's share of the val shards (in order, centre crops), or None when it gets no shard: with fewer
    val shards than ranks the first ranks validate and the others contribute nothing to the reduction.
    `shards` = (URLs, counts) from `shard_lists`, so a validation pass reads no shard just to count it."""
    d = cfg.data
    if not d.val_shards:
        return None
    urls, counts = shards if shards else (expand_urls(d.val_shards, d.io_timeout_s), None)
    val_world = min(env.world_size, len(urls))
    if env.rank >= val_world:
        return None
    return ShardStream(
        urls, counts=counts, manifest=d.val_manifest or None, io_timeout_s=d.io_timeout_s, mode="split",
        train=False, rank=env.rank, world_size=val_world, num_workers=0, **_stream_args(cfg, env.world_size),
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
        # The OMP backend is decided once, here (Triton self-check on first use), agreed across ranks,
        # logged once and recorded in provenance.json and every checkpoint's meta.json.
        self.omp = agree_omp_backend(cfg.model, env.rank, env.world_size, device)
        if env.is_main:
            print(f"lasers-train: {self.omp.message}", flush=True)
            write_provenance(self.out_dir, build_provenance(env.world_size, device, self.omp.record()))
        seed_everything(cfg.train.seed + env.rank)
        self.shards = shard_lists(cfg, env)  # a collective: every rank constructs the Trainer
        self.train_stream = train_stream if train_stream is not None else \
            build_train_stream(cfg, env, self.shards.get("train"))
        self.progress = progress
        self.step = 0
        self.skipped_steps = 0  # non-finite steps skipped over the whole run (resumed runs continue the count)
        self.bad_in_a_row = 0
        self.last_checkpoint: Path | None = None
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
        self.skipped_steps = int(meta.get("skipped_steps", 0))
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
        """Train to train.max_steps (or an agreed stop). On any exception: the streams are closed, rank 0 writes
        status "failed" with the reason (best effort), and the exception propagates (the caller reports it)."""
        cfg, env = self.cfg, self.env
        log = None
        try:
            if resume is not None:
                self.load(resume)
            if env.is_main:
                self.out_dir.mkdir(parents=True, exist_ok=True)
                save_config(cfg, self.out_dir / "config.yaml")
            self.last_checkpoint = resume  # (a newer, damaged one may lie beside it: never named as good)
            self._write_status("running", "", self.last_checkpoint)  # a kill -9 leaves "running"
            log = MetricsLog(self.out_dir, env.is_main, cfg.train.max_steps, self.step, progress=self.progress)
            if resume is not None:
                log.message(f"lasers-train: resumed from {resume} at step {self.step}")
            return self._loop(log)
        except BaseException as err:
            with stop_signals_held():
                self._write_status("failed", failure_reason(err), self.last_checkpoint)
                self.close()
            raise
        finally:
            self.close()
            if log is not None:
                log.close()

    def close(self) -> None:
        """Stop the training stream's readers now (DataLoader workers ignore SIGTERM, and a process that exits
        with workers alive waits for them forever)."""
        close = getattr(self.train_stream, "close", None)
        if close is not None:
            close()

    def _loop(self, log: MetricsLog) -> TrainResult:
        cfg, t, accum_steps = self.cfg, self.cfg.train, self.cfg.optim.grad_accum_steps
        metrics = MetricAccumulator()
        batches = self.train_stream.forever()
        train_time, steps_timed = 0.0, 0
        stopped, reason = False, "finished"
        with StopFlag(stop_file=stop_file_path(t.out_dir, t.stop_file)) as stop:
            while self.step < t.max_steps:
                start = time.perf_counter()
                with data_rng():
                    micro_batches = [split_batch(next(batches), self.device) for _ in range(accum_steps)]
                if self._sample_batch is None:
                    self._sample_batch = micro_batches[0][0][:8].clone()
                outcome = train_step(self.engines, self.recon_loss, micro_batches, self.step, cfg)
                self.step += 1
                self._count(outcome)
                if not outcome.skipped:
                    metrics.add(outcome.metrics)
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
                if outcome.skipped:
                    log.message(f"lasers-train: step {step} skipped: {outcome.reason} ({self.bad_in_a_row} in a row; "
                                f"train.max_bad_steps={t.max_bad_steps})")
                    self._stop_if_diverged(outcome)
                if step == t.stop_at_step:
                    stop.request()
                stopping = stop.should_stop(self.device) and not last
                if stopping or step % t.checkpoint_every == 0 or last:
                    self.last_checkpoint = self.save(step)
                if stopping:
                    stopped, reason = True, stop.reason
                    break
            if self.env.is_main:
                stop.consume_stop_file()  # acted on, checkpoint committed: a resumed run must not stop at once
        if stopped:
            log.message(
                f"lasers-train: stopped early at step {self.step} ({reason}); checkpoint {self.last_checkpoint} is "
                "complete; resume with --resume auto"
            )
        else:
            log.message(f"lasers-train: finished {self.step} steps; checkpoint {self.last_checkpoint}")
        self._write_status("stopped" if stopped else "finished", reason, self.last_checkpoint)
        return TrainResult(self.step, stopped, reason, self.last_checkpoint)

    def _count(self, outcome: StepOutcome) -> None:
        """Skipped-step bookkeeping, identical on every rank (the verdict is agreed)."""
        if outcome.skipped:
            self.skipped_steps += 1
            self.bad_in_a_row += 1
        else:
            self.bad_in_a_row = 0

    def _stop_if_diverged(self, outcome: StepOutcome) -> None:
        if self.bad_in_a_row >= self.cfg.train.max_bad_steps:
            raise TrainingDiverged(
                f"diverged at step {self.step}: {outcome.reason}, {self.bad_in_a_row} steps in a row (each skipped, "
                f"train.max_bad_steps={self.cfg.train.max_bad_steps}); last good checkpoint "
                f"{self.last_checkpoint or 'none (none was written)'}; try a lower optim.lr (now {self.cfg.optim.lr:g})"
            )

    def _log_extras(self, images_per_s: float) -> dict[str, float]:
        corrupt = torch.tensor([float(self.train_stream.corrupt_count)], device=self.device)
        D.all_reduce_(corrupt, op="sum")
        return {
            "images_per_s": images_per_s,
            "lr": float(self.engines.generator.get_lr()[0]),
            "data/corrupt_samples": corrupt.item(),
            "train/skipped_steps": float(self.skipped_steps),
        }

    def _write_status(self, state: str, reason: str, checkpoint: Path | None) -> None:
        """out_dir/status.json for requeue scripts: state "running" (still running, or killed), "stopped" (a signal
        or train.stop_at_step: resumable with --resume auto), "finished", or "failed" (an exception; the reason
        starts with "diverged" for train.max_bad_steps non-finite steps in a row). "failed" is best effort: a
        full disk must not hide the error that is being reported."""
        if not self.env.is_main:
            return
        status = {"state": state, "step": self.step, "reason": reason,
                  "checkpoint": str(checkpoint) if checkpoint else None}
        path = self.out_dir / "status.json"
        try:
            tmp = path.with_name(".status.json.tmp")
            tmp.write_text(json.dumps(status) + "\n")
            os.replace(tmp, path)  # a reader never sees a half-written status
        except OSError:
            if state != "failed":
                raise

    # ---- checkpoints ------------------------------------------------------------------------------------

    def save(self, step: int) -> Path:
        rank_state = {"step": step, "stream": self.train_stream.state_dict(), "rng": ckpt.rng_state()}
        meta = ckpt.build_meta(step, self.cfg, self.env.world_size)
        meta["stream_epoch"] = int(rank_state["stream"].get("epoch", 0))
        meta["skipped_steps"] = self.skipped_steps
        meta["omp_backend"] = self.omp.backend
        keep = self.cfg.train.keep_checkpoints
        return ckpt.save_checkpoint(self.checkpoints, step, self.engines, rank_state, meta, keep, self.last_checkpoint)

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
        stream = build_val_stream(self.cfg, self.env, self.shards.get("val"))
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
            stream = build_val_stream(self.cfg, self.env, self.shards.get("val"))
            if stream is not None:
                self._val_sample = split_batch(next(iter(stream)), self.device)[0][:8]
                stream.close()
        return self._val_sample if self._val_sample is not None else self._sample_batch
