"""Process-group start-up and the few collectives the trainer issues itself.

The entry layer (lasers_dist.cli.train) reads torchrun's or Slurm's environment into a `DistEnv`; nothing here
reads environment variables. DeepSpeed's engine insists on finding LOCAL_RANK in the environment, which is why
the entry layer also exports the values it resolved.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job: global rank / world size, rank / size on this node, rendezvous."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside world size {self.world_size}")
        if not 0 <= self.local_rank < self.local_world_size:
            raise ValueError(f"local rank {self.local_rank} is outside local world size {self.local_world_size}")
        if not 0 < self.master_port < 2**16:
            raise ValueError(f"master port {self.master_port} is not a TCP port")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def cuda_device_index(env: DistEnv) -> int:
    """The CUDA device of this rank: its local rank when it sees all of the node's GPUs (torchrun), or its own
    GPU when the launcher hid the others (srun --gpus-per-task=1 leaves one visible device, index 0)."""
    return env.local_rank % max(1, torch.cuda.device_count())


def skip_shm_comm_build() -> None:
    """Tell DeepSpeed its shared-memory comm op is unavailable, so init_distributed does not JIT-compile it
    (~30 s with g++). Training collectives go through torch.distributed anyway."""
    import deepspeed

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def init_distributed(env: DistEnv, device_type: str, timeout_s: float) -> torch.device:
    """Start the default process group (nccl on CUDA, gloo on CPU) and DeepSpeed's comm layer on top of it.

    device_type: "cuda" or "cpu", decided by the entry layer (which also sets DS_ACCELERATOR to match before
    DeepSpeed is imported). timeout_s bounds every collective, so a dead rank fails the job instead of hanging it.
    Returns the device this rank computes on.
    """
    if device_type not in ("cuda", "cpu"):
        raise ValueError(f"device_type must be 'cuda' or 'cpu', got {device_type!r}")
    import deepspeed

    skip_shm_comm_build()
    if device_type == "cuda":
        device = torch.device("cuda", cuda_device_index(env))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    backend = "nccl" if device_type == "cuda" else "gloo"
    timeout = timedelta(seconds=timeout_s)
    if not dist.is_initialized():
        # Explicit tcp:// rendezvous (not env://), so Slurm-launched ranks need no torchrun. Under torchrun the
        # agent already serves a store on MASTER_ADDR:MASTER_PORT and torch connects to it as a client.
        host = f"[{env.master_addr}]" if ":" in env.master_addr else env.master_addr
        dist.init_process_group(
            backend,
            init_method=f"tcp://{host}:{env.master_port}",
            rank=env.rank,
            world_size=env.world_size,
            timeout=timeout,
            device_id=device if device_type == "cuda" else None,
        )
    # With a group already up, DeepSpeed only wraps it (no second rendezvous, no MPI discovery).
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, timeout=timeout, verbose=False)
    return device


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce ("sum", "mean" or "max") over the default group; identity on one process."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        reduce_op = {"sum": dist.ReduceOp.SUM, "mean": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op]
        dist.all_reduce(tensor, op=reduce_op)
        if op == "mean":
            tensor /= dist.get_world_size()
    return tensor


def broadcast_object(obj: object, src: int = 0) -> object:
    """Rank `src`'s `obj` on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
