"""Shared helpers of the trainer tests: one small shard set per pytest session, a tiny config, torchrun launches.

The shard set is built once per session under pytest's base temp folder (any test module may ask first), from
the built-in scikit-image photos at 32x32: real PNGs in real tar shards with a manifest.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
DRIVER = REPO / "tests" / "dist_train_driver.py"
IMAGE_SIZE = 32


def session_shards(tmp_path_factory) -> Path:
    """OUT_DIR with train-*.tar (8 shards) and val-*.tar (2 shards) of 32x32 photo crops, built once."""
    root = tmp_path_factory.getbasetemp() / "lasers_train_shards"
    done = root / "COMPLETE"
    if not done.is_file():
        from lasers_dist.data import write_builtin_photos

        write_builtin_photos(root, size=IMAGE_SIZE, crops_per_photo=4, max_count=32, seed=0)
        done.write_text("ok\n")
    return root


def tiny_config(shards: Path, out_dir: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    """A DL-GAN small enough for a few CPU steps per second: 32x32 images, hidden 32, K = 32, S = 2, the GAN on
    from step 1, a random-backbone LPIPS (offline). `sections` update the defaults per section."""
    cfg: dict[str, Any] = {
        "data": {
            "train_shards": str(shards / "train-*.tar"),
            "val_shards": str(shards / "val-*.tar"),
            "image_size": IMAGE_SIZE,
            "mode": "resampled",
            "batches_per_epoch": 50,
            "num_workers": 0,
        },
        "model": {
            "bottleneck": "dictionary", "num_atoms": 32, "embed_dim": 8, "sparsity": 2,
            "hidden_channels": 32, "num_res_blocks": 1,
            "discriminator": True, "disc_layers": 2, "disc_channels": 16, "norm_groups": 8,
        },
        "loss": {"perceptual_weight": 0.5, "lpips_random_backbone": True, "disc_start": 1},
        "optim": {"lr": 1e-3, "disc_lr": 1e-3, "warmup_steps": 1, "grad_clip": 0.0},
        "train": {
            "max_steps": 4, "batch_size": 8, "checkpoint_every": 100, "out_dir": str(out_dir),
            "log_every": 1, "sample_every": 0, "val_batches": 1, "seed": 0,
        },
        "deepspeed": {"zero_stage": 0},
    }
    for section, values in sections.items():
        cfg[section].update(values)
    return cfg


def write_config(path: Path, cfg: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun_command(nproc: int, *args: str) -> list[str]:
    """A real torchrun launch on a free port (no --standalone: its rendezvous port could collide)."""
    return [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--nnodes=1",
        "--master_addr=127.0.0.1", f"--master_port={free_port()}", *args,
    ]


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["DS_ACCELERATOR"] = "cpu"
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def run(cmd: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    """Run a launch to completion; on failure the assertion shows the tail of its output."""
    proc = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=timeout)
    tail = f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{tail}"
    return proc


def train_cli(nproc: int, config: Path, *extra: str) -> list[str]:
    return torchrun_command(nproc, "-m", "lasers_dist.cli.train", "--config", str(config), *extra)
