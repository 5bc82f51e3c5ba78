"""Distributed training: DeepSpeed engines, the DL-GAN step, checkpoints, graceful stop, metrics, the loop.

    from lasers_dist.train import DistEnv, Trainer, init_distributed
    device = init_distributed(env, "cpu", timeout_s=600)   # the entry layer builds env from torchrun / Slurm
    Trainer(cfg, env, device).fit(resume=None)

Modules: distributed (process group), engines (DeepSpeed configs and engines), schedule (warmup + cosine),
step (generator / discriminator steps), checkpoint (atomic layout, resume), signals (SIGTERM / SIGUSR1 stop),
metrics (metrics.jsonl, TensorBoard, progress bar), trainer (the loop, validation, sample grids).
"""

from lasers_dist.train.checkpoint import CheckpointError, latest_checkpoint, list_checkpoints, resolve_resume
from lasers_dist.train.distributed import DistEnv, init_distributed
from lasers_dist.train.trainer import Trainer, TrainResult

__all__ = [
    "CheckpointError",
    "DistEnv",
    "TrainResult",
    "Trainer",
    "init_distributed",
    "latest_checkpoint",
    "list_checkpoints",
    "resolve_resume",
]
