"""`lasers-train --config FILE [section.key=value ...] [--resume auto|PATH]`: the training entry point.

Run it under torchrun (`torchrun --standalone --nproc_per_node=2 -m lasers_dist.cli.train --config ...`), under
Slurm (`srun lasers-train --config ...`, one task per GPU), or as a single plain process. This is the only
layer that reads the environment: the rank / world size / master address come from torchrun's variables
(RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT) or Slurm's (SLURM_PROCID,
SLURM_NTASKS, SLURM_LOCALID, SLURM_NODEID, SLURM_TASKS_PER_NODE, SLURM_NODELIST, SLURM_JOB_ID).

Everything that can be checked without the other ranks (config keys and combinations, shards on disk, the
DeepSpeed JSON, the checkpoint to resume) is checked before any process group starts, so a bad run fails in
seconds with exit code 2 instead of hanging in a rendezvous.

Exit codes: 0 when the run finished or stopped early on SIGTERM / SIGUSR1 or the stop file (then it logs
"stopped early", writes out_dir/status.json with "state": "stopped", and `--resume auto` continues it); 2 for a
bad configuration or checkpoint request (a damaged checkpoint named explicitly); 3 when training diverged
(train.max_bad_steps non-finite steps in a row; status "failed", reason "diverged ..."); 1 for any other crash
(status "failed"). A failing rank prints why once, shuts its data workers down and exits at once; under torchrun
the job's exit code is torchrun's own (1), and the worker's code appears in its error summary.

`--check` runs only those checks and prints the resolved config (YAML, with the run directory, stop file and
resume decision in a comment): the Slurm scripts call it in the batch shell, so a bad config fails in seconds
without being requeued, and the job log shows what will run.

CPU threads per process: OMP_NUM_THREADS when it is set, else this process's cores divided by the processes on
its node. torchrun sets OMP_NUM_THREADS=1 itself (and prints a banner) when it starts several processes and the
variable is unset; the launch scripts always set it, to the user's value or to cores / processes.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import socket
import subprocess
import sys
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from lasers_dist.config import ConfigError, load_config, validate
from lasers_dist.train.checkpoint import CheckpointError

DEFAULT_PORT = 29500
EXIT_CRASH = 1
EXIT_CONFIG = 2  # a bad config or checkpoint request
EXIT_DIVERGED = 3  # train.max_bad_steps non-finite steps in a row
EXIT_INTERRUPTED = 130


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="lasers-train",
        description="Train a DL-VAE / DL-GAN / VQ-VAE / VQ-GAN with DeepSpeed (run under torchrun or srun).",
    )
    parser.add_argument("--config", required=True, help="YAML experiment config (see configs/)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=200 model.sparsity=3")
    parser.add_argument(
        "--resume",
        default=None,
        help="'auto': continue from the newest complete checkpoint in train.out_dir (a fresh start if none); "
        "or a checkpoint folder / run directory",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="only check the config, shards and resume for this world size (no training) and print the resolved "
        "config; exit 0 when it would start, 2 when not",
    )
    # Intermixed: overrides may follow --resume (launch scripts append "$@" after their own overrides).
    return parser.parse_intermixed_args(argv)


# ---- where this process sits: torchrun, Slurm or alone ----------------------------------------------------


def _expand_count_list(text: str) -> list[int]:
    """Slurm's SLURM_TASKS_PER_NODE, e.g. "2(x3),1" -> [2, 2, 2, 1]."""
    counts: list[int] = []
    for part in text.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not match:
            raise ValueError(f"cannot parse SLURM_TASKS_PER_NODE={text!r}")
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    return counts


def first_slurm_host(nodelist: str) -> str:
    """The first host of a Slurm node list, e.g. "gpu[007-009,012],cpu1" -> "gpu007",
    "rack[1-2]-n[01-04]" -> "rack1-n01" (zero padding kept). Used when `scontrol` is unavailable."""
    depth, end = 0, len(nodelist)
    for i, char in enumerate(nodelist):  # the first comma outside brackets ends the first entry
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            end = i
            break
    entry = nodelist[:end].strip()
    if not entry:
        raise ValueError(f"empty Slurm node list {nodelist!r}")
    # In every bracket group keep the first item, and of a range "007-009" its start.
    return re.sub(r"\[([^\]]+)\]", lambda m: m.group(1).split(",")[0].split("-")[0], entry)


def _slurm_master(environ: Mapping[str, str]) -> str:
    nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
    if not nodelist:
        raise ValueError("running under Slurm (SLURM_PROCID is set) but SLURM_NODELIST is not; set MASTER_ADDR")
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             timeout=30, check=True).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass  # no scontrol on this host: parse the list ourselves
    return first_slurm_host(nodelist)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def dist_env_from_environ(environ: Mapping[str, str]):
    """DistEnv from torchrun's variables (preferred, also under `srun torchrun`), else Slurm's, else one process."""
    from lasers_dist.train.distributed import DistEnv

    def num(key: str, default: int | None = None) -> int:
        value = environ.get(key)
        if value is None:
            if default is None:
                raise ValueError(f"environment variable {key} is required here but not set")
            return default
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"environment variable {key}={value!r} is not an integer") from None

    if "RANK" in environ and "WORLD_SIZE" in environ:
        world = num("WORLD_SIZE")
        return DistEnv(
            rank=num("RANK"),
            world_size=world,
            local_rank=num("LOCAL_RANK", 0),
            local_world_size=num("LOCAL_WORLD_SIZE", world),
            master_addr=environ.get("MASTER_ADDR", "127.0.0.1"),
            master_port=num("MASTER_PORT", DEFAULT_PORT),
            restart_count=num("TORCHELASTIC_RESTART_COUNT", 0),
            agent_store=environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True",
        )
    if "SLURM_PROCID" in environ:
        node_counts = _expand_count_list(environ.get("SLURM_TASKS_PER_NODE", "1"))
        node = num("SLURM_NODEID", 0)
        # A per-job default port keeps two jobs that share a node from colliding.
        default_port = 20000 + num("SLURM_JOB_ID", 0) % 20000
        return DistEnv(
            rank=num("SLURM_PROCID"),
            world_size=num("SLURM_NTASKS"),
            local_rank=num("SLURM_LOCALID", 0),
            local_world_size=node_counts[node] if node < len(node_counts) else 1,
            master_addr=environ.get("MASTER_ADDR") or _slurm_master(environ),
            master_port=num("MASTER_PORT", default_port),
        )
    return DistEnv(rank=0, world_size=1, local_rank=0, local_world_size=1, master_addr="127.0.0.1",
                   master_port=num("MASTER_PORT", 0) or _free_port())


def _export_for_deepspeed(env, device_type: str) -> None:
    # DeepSpeed reads these itself (its engine requires LOCAL_RANK and takes it as the CUDA device index): make
    # them agree with what we resolved.
    from lasers_dist.train.distributed import cuda_device_index

    local = cuda_device_index(env) if device_type == "cuda" else env.local_rank
    os.environ.update({
        "RANK": str(env.rank), "WORLD_SIZE": str(env.world_size), "LOCAL_RANK": str(local),
        "LOCAL_WORLD_SIZE": str(env.local_world_size), "MASTER_ADDR": env.master_addr,
        "MASTER_PORT": str(env.master_port),
    })


def cpu_threads(environ: Mapping[str, str], local_world_size: int) -> tuple[int, str]:
    """Intra-op threads for this process, and where the number comes from (for the start-up log).

    OMP_NUM_THREADS wins when set (its first entry: OpenMP allows a nested list "8,2"). Otherwise ranks that share
    a node's cores split them: one thread per core per rank would oversubscribe (2 ranks on 2 cores run several
    times slower than with 1 thread each)."""
    value = environ.get("OMP_NUM_THREADS", "").strip()
    if value:
        first = value.split(",")[0].strip()
        if not first.isdigit() or int(first) < 1:
            raise ValueError(f"OMP_NUM_THREADS={value!r} is not a positive integer: unset it or set e.g. 4")
        return int(first), "OMP_NUM_THREADS"
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(1, cores // local_world_size), f"{cores} cores / {local_world_size} processes on this node"


def quiet_start_up(rank: int) -> None:
    """Start-up warnings once per job, not once per process: deprecations are the same on every rank, so only
    rank 0 shows them. One is dropped everywhere: DeepSpeed's ZeRO calls torch's all_gather_into_tensor, which
    torch >= 2.9 marks deprecated; nothing a user can change, and harmless."""
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor. is deprecated", category=FutureWarning)
    if rank != 0:
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)


# ---- main ----------------------------------------------------------------------------------------------


def _check_buildable(cfg) -> None:
    """Build the models on the meta device (no memory, no compute) so that shape and channel errors, and missing
    LPIPS weights, stop the run here instead of after every rank has joined the process group."""
    import torch

    from lasers_dist.losses.reconstruction import backbone_weights_path
    from lasers_dist.models import build_autoencoder, build_discriminator

    try:
        with torch.device("meta"):
            build_autoencoder(cfg.model)
            build_discriminator(cfg.model)
    except ValueError as err:
        raise ConfigError(f"the model described by the config cannot be built: {err}") from err
    if cfg.loss.perceptual_weight > 0 and not cfg.loss.lpips_random_backbone:
        weights = backbone_weights_path(cfg.loss.lpips_net)
        if not weights.is_file():
            raise ConfigError(
                f"loss.perceptual_weight={cfg.loss.perceptual_weight} needs LPIPS, whose {cfg.loss.lpips_net} "
                f"backbone weights {weights.name} are not in {weights.parent}: copy the file there, or set "
                "loss.perceptual_weight=0 (MSE only)"
            )


@dataclass
class ResumePlan:
    """Checkpoints to resume from, newest first, whose files have their recorded sizes; after the process group
    starts, the first whose hashes also match is taken (explicit: a damaged one is an error, not skipped)."""

    candidates: list[Path]
    explicit: bool


def _warner(rank: int, own: bool = False):
    """A warning printer: for what every rank finds alike, said once by rank 0; own=True: this rank's own finding,
    said by it, with its rank."""
    def warn(text: str) -> None:
        if own:
            print(f"lasers-train: rank {rank}: warning: {text}", file=sys.stderr, flush=True)
        elif rank == 0:
            print(f"lasers-train: warning: {text}", file=sys.stderr, flush=True)

    return warn


def preflight(args: argparse.Namespace, environ: Mapping[str, str]):
    """Config, environment and resume checks that need no process group. Returns (cfg, env, ResumePlan or None
    for a fresh start)."""
    from lasers_dist.train import checkpoint as ckpt
    from lasers_dist.train.engines import deepspeed_config

    cfg = load_config(args.config, args.overrides)
    env = dist_env_from_environ(environ)
    validate(cfg, env.world_size)
    deepspeed_config(cfg, env.world_size)  # the JSON file's keys against ours
    _check_buildable(cfg)
    checkpoints = Path(cfg.train.out_dir) / "checkpoints"
    if args.resume is None:
        if ckpt.list_checkpoints(checkpoints):
            raise ConfigError(
                f"train.out_dir={cfg.train.out_dir} already holds checkpoints: pass --resume auto to continue that "
                "run, or choose another train.out_dir"
            )
        return cfg, env, None
    candidates, explicit = ckpt.resume_candidates(args.resume, checkpoints)
    candidates = ckpt.first_intact(candidates, explicit, _warner(env.rank))
    if not candidates:
        return cfg, env, None
    ckpt.check_resume_compatible(
        ckpt.read_meta(candidates[0]), env.world_size, cfg.data.mode, cfg.deepspeed.zero_stage, candidates[0],
        cfg.train.precision,
    )
    return cfg, env, ResumePlan(candidates, explicit)


def _verified_resume(plan: ResumePlan | None, cfg, env) -> Path | None:
    """The checkpoint every rank resumes from: rank 0's candidates, hashes checked by all ranks together."""
    from lasers_dist.train import checkpoint as ckpt
    from lasers_dist.train import distributed as D

    plan = D.broadcast_object(plan)  # every rank must load the same folder: rank 0's view of the file system
    if plan is None:
        return None
    folder = ckpt.first_verified(plan.candidates, plan.explicit, _warner(env.rank))
    ckpt.check_resume_compatible(ckpt.read_meta(folder), env.world_size, cfg.data.mode, cfg.deepspeed.zero_stage,
                                 folder, cfg.train.precision)
    return folder


def _report_failure(err: BaseException, env, cfg, heartbeat, trainer, resuming: bool) -> int:
    """Say once, in words, why this rank stops; return its exit code. Errors every rank meets alike (divergence, a
    damaged checkpoint) are printed by rank 0; a failed collective is explained (which rank went quiet) rather than
    traced; anything unexpected gets its traceback."""
    from lasers_dist.train import distributed as D
    from lasers_dist.train.checkpoint import CheckpointError
    from lasers_dist.train.trainer import TrainingDiverged

    def say(text: str) -> None:
        print(f"lasers-train: {text}", file=sys.stderr, flush=True)

    if isinstance(err, TrainingDiverged):
        if env.is_main:
            say(str(err))
        return EXIT_DIVERGED
    if isinstance(err, CheckpointError) and resuming:
        if env.is_main:
            say(f"error: {err}")
        return EXIT_CONFIG
    if isinstance(err, KeyboardInterrupt):
        say(f"rank {env.rank}: interrupted")
        return EXIT_INTERRUPTED
    described = D.describe_collective_failure(err, heartbeat, cfg.train.collective_timeout_s)
    if described is not None:
        last = trainer.last_checkpoint if trainer is not None else None
        say(f"rank {env.rank}: stopping: {described}. When the cause is gone, resume with --resume auto "
            f"(last good checkpoint: {last or 'none'}).")
        return EXIT_CRASH
    if not isinstance(err, CheckpointError):
        traceback.print_exception(err, file=sys.stderr)
    say(f"rank {env.rank}: error: {type(err).__name__}: {err}")
    return EXIT_CRASH


def _exit_now(code: int) -> None:
    """End this process at once. Everything worth keeping is written and the streams are closed; what may still
    run (a DataLoader worker that ignores SIGTERM, a communicator waiting on a dead peer, the heartbeat thread)
    must not keep a failed rank alive, which a normal interpreter exit would (it joins child processes)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def print_check(cfg, env, resume: Path | None) -> None:
    """`--check`'s output: the resolved config as YAML, after a comment block a launch script can read."""
    import yaml

    from lasers_dist.config import config_to_dict
    from lasers_dist.train.signals import stop_file_path

    print(f"# lasers-train --check: OK for world size {env.world_size}")
    print(f"# out_dir: {Path(cfg.train.out_dir).resolve()}")
    print(f"# stop_file: {stop_file_path(cfg.train.out_dir, cfg.train.stop_file).resolve()}")
    print(f"# resume: {resume if resume is not None else 'none (fresh start)'}")
    print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="", flush=True)


def start_up_line(cfg, env, device_type: str, threads: tuple[int, str], resume: Path | None) -> str:
    nodes = max(1, env.world_size // env.local_world_size)
    where = f"resuming from {resume}" if resume is not None else "fresh start"
    backend = "nccl" if device_type == "cuda" else "gloo"
    return (
        f"lasers-train: {env.world_size} process(es) ({nodes} node(s) x {env.local_world_size}), {device_type}/"
        f"{backend}, rendezvous {env.master_addr}:{env.master_port}, {threads[0]} CPU thread(s) per process "
        f"({threads[1]}); run directory {cfg.train.out_dir}; {where}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg, env, plan = preflight(args, os.environ)
        threads = cpu_threads(os.environ, env.local_world_size)
    except (ConfigError, CheckpointError, ValueError, FileNotFoundError) as err:
        print(f"lasers-train: error: {err}", file=sys.stderr)
        return EXIT_CONFIG
    resume = plan.candidates[0] if plan is not None else None  # before the hashes are checked (by all ranks)
    if args.check:
        print_check(cfg, env, resume)
        return 0
    quiet_start_up(env.rank)

    import torch

    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if device_type == "cpu":
        # Must be set before DeepSpeed is first imported (it picks its accelerator once, at import).
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torch.set_num_threads(threads[0])
    if env.is_main:
        print(start_up_line(cfg, env, device_type, threads, resume), flush=True)
    _export_for_deepspeed(env, device_type)
    import deepspeed

    deepspeed.utils.logger.setLevel(logging.WARNING)  # its INFO lines would drown the progress bar

    return _train(cfg, env, plan, device_type)


def _train(cfg, env, plan: ResumePlan | None, device_type: str) -> int:
    """Start the process group, verify the checkpoint to resume from, train. Any error on this rank: report it
    once and exit at once (never returns then)."""
    from lasers_dist.train import distributed as D
    from lasers_dist.train.trainer import Trainer, stop_signals_held

    device = D.init_distributed(env, device_type, cfg.train.collective_timeout_s)
    heartbeat = D.Heartbeat(env, cfg.train.collective_timeout_s, warn=_warner(env.rank, own=True)).start()
    trainer, resuming = None, True
    try:
        resume = _verified_resume(plan, cfg, env)
        resuming = False
        trainer = Trainer(cfg, env, device)
        heartbeat.progress = lambda: trainer.step
        trainer.fit(resume)
        D.barrier()
    except BaseException as err:
        with stop_signals_held():  # say why before torchrun's SIGTERM (sent once a worker failed) can end us
            _exit_now(_report_failure(err, env, cfg, heartbeat, trainer, resuming))
    heartbeat.stop()
    D.shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
