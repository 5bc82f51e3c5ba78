"""Process-group start-up, the few collectives the trainer issues itself, and what a failed collective means.

The entry layer (lasers_dist.cli.train) reads torchrun's or Slurm's environment into a `DistEnv`; nothing here
reads environment variables. DeepSpeed's engine insists on finding LOCAL_RANK in the environment, which is why
the entry layer also exports the values it resolved.
"""

from __future__ import annotations

import json
import os
import re
import socket
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable

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
    restart_count: int = 0  # torchrun's restarts of this job's workers so far (TORCHELASTIC_RESTART_COUNT)
    agent_store: bool = False  # torchrun's agent serves the store at master_addr:master_port

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
        dist.init_process_group(
            backend,
            store=rendezvous_store(env, timeout),
            rank=env.rank,
            world_size=env.world_size,
            timeout=timeout,
            device_id=device if device_type == "cuda" else None,
        )
    # With a group already up, DeepSpeed only wraps it (no second rendezvous, no MPI discovery).
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, timeout=timeout, verbose=False)
    _bound_deepspeed_world_group(timeout)
    return device


def rendezvous_store(env: DistEnv, timeout: timedelta) -> dist.Store:
    """The job's key-value store, seen through this launch attempt's own key prefix.

    Our own TCP rendezvous (not env://), so Slurm-launched ranks need no torchrun: rank 0 serves the store, the
    others connect. Under torchrun the agent already serves it on MASTER_ADDR:MASTER_PORT (env.agent_store) and
    every rank is a client. The agent's store outlives the workers it restarts (--max-restarts): without the
    prefix a restarted rank would read the addresses its predecessors published and connect to dead ports.
    """
    store = dist.TCPStore(env.master_addr, env.master_port, env.world_size,
                          is_master=env.rank == 0 and not env.agent_store, timeout=timeout, multi_tenant=True)
    return dist.PrefixStore(f"lasers/attempt-{env.restart_count}", store)


def _bound_deepspeed_world_group(timeout: timedelta) -> None:
    """DeepSpeed reduces gradients (all ZeRO stages) over its own clone of the world group, which it creates
    lazily with `dist.new_group(ranks)` and hence torch's default timeout (30 min for gloo, 10 for NCCL), not
    ours. Create that clone ourselves, first, with our timeout, so its collectives are bounded too."""
    from deepspeed.utils import groups

    if getattr(groups, "_WORLD_GROUP", None) is None:
        groups._WORLD_GROUP = dist.new_group(ranks=list(range(dist.get_world_size())), timeout=timeout)


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


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


def all_gather_object(obj: object) -> list:
    """Every rank's `obj`, in rank order, on every rank."""
    if not dist.is_initialized():
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


# ---- a collective failed: which rank, and what to do ------------------------------------------------------

_HEARTBEAT_KEY = "lasers_heartbeat/"
# What gloo / NCCL / the TCP store say when the other end is gone, and when it stopped answering.
_PEER_GONE = re.compile(r"connection (reset|closed) by peer|broken pipe|remote process exited|ncclRemoteError"
                        r"|communicator was aborted", re.IGNORECASE)
_TIMED_OUT = re.compile(r"timed out waiting|timed out after \d+ seconds waiting|collective operation timeout"
                        r"|socket timeout|wait timeout", re.IGNORECASE)


class Heartbeat:
    """A daemon thread that writes this rank's wall time and step into the rendezvous store every few seconds.

    Threads go on running while the main thread waits inside a collective, so when a collective times out, the
    ranks whose heartbeat went quiet are the ones that stopped answering (SIGSTOP, hung in the kernel, a dead
    node) and the others are alive but stuck elsewhere; `diagnose` says which, by rank, pid and host. Each rank
    also watches the next one's heartbeat and calls `warn` once when it goes quiet: the name then reaches the log
    even where the backend ends the process at the timeout itself (NCCL's watchdog).
    `progress` returns the rank's current step (read from this thread; an int read is atomic).
    """

    def __init__(self, env: DistEnv, timeout_s: float, progress: Callable[[], int] | None = None,
                 warn: Callable[[str], None] | None = None) -> None:
        self.env, self.progress, self.warn, self.timeout_s = env, progress, warn, timeout_s
        self.interval = min(5.0, max(0.5, timeout_s / 6))
        # Quiet for this long = not answering; live ranks beat every `interval` even inside a collective.
        self.quiet_after = max(3 * self.interval, min(timeout_s / 2, 60.0))
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lasers-heartbeat", daemon=True)

    def start(self) -> Heartbeat:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop beating, after a last beat that tells the watching rank this one ended on purpose."""
        self._stopped.set()
        self._thread.join(timeout=2 * self.interval + 5)

    def _connect(self) -> dist.Store:
        # Its own client of the job's store (torchrun's agent, or rank 0 under srun): never shares a socket with
        # the process group's client, so a beat can not interleave with a collective's store traffic.
        return dist.TCPStore(self.env.master_addr, self.env.master_port, is_master=False, wait_for_workers=False,
                             timeout=timedelta(seconds=max(5.0, 2 * self.interval)))

    def _key(self, rank: int) -> str:
        return f"{_HEARTBEAT_KEY}{self.env.restart_count}/{rank}"

    def _step(self) -> int:
        return int(self.progress()) if self.progress is not None else -1

    def _run(self) -> None:
        store, identity, warned = None, {"host": socket.gethostname(), "pid": os.getpid()}, False
        while True:
            done = self._stopped.is_set()
            try:
                if store is None:
                    store = self._connect()
                beat = {"time": time.time(), "step": self._step(), "done": done, **identity}
                store.set(self._key(self.env.rank), json.dumps(beat))
                warned = self._watch_next(store, warned)
            except Exception:  # the store is unreachable right now: try again at the next beat
                store = None
            if done:
                return
            self._stopped.wait(self.interval)

    def _watch_next(self, store: dist.Store, warned: bool) -> bool:
        """Warn once (per silence) when the next rank's heartbeat goes quiet; returns whether it is quiet."""
        watched = (self.env.rank + 1) % self.env.world_size
        if watched == self.env.rank or self.warn is None or not store.check([self._key(watched)]):
            return False
        beat = json.loads(store.get(self._key(watched)))
        quiet = not beat.get("done") and time.time() - beat["time"] > self.quiet_after
        if quiet and not warned:
            self.warn(f"rank {watched} (pid {beat['pid']} on {beat['host']}) has not answered for "
                      f"{time.time() - beat['time']:.0f} s (last heard at step {beat['step']}): it is stopped "
                      "(SIGSTOP, a debugger), hung in the kernel or on its device, or its node is down; collectives "
                      f"waiting for it fail after train.collective_timeout_s={self.timeout_s:g} s")
        return quiet

    def diagnose(self) -> str:
        """Which ranks went quiet, or lag behind this one, in words (reads every rank's last beat)."""
        env = self.env
        try:
            store = self._connect()
            beats = {r: json.loads(store.get(self._key(r))) for r in range(env.world_size)
                     if store.check([self._key(r)])}
        except Exception:
            return (f"The job's rendezvous store at {env.master_addr}:{env.master_port} does not answer either: the "
                    "process serving it (torchrun's agent, or rank 0 under srun) is stopped or gone.")
        now, mine = time.time(), self._step()
        quiet = [f"rank {r} (never reported)" for r in range(env.world_size) if r not in beats]
        quiet += [f"rank {r} (pid {b['pid']} on {b['host']}, silent for {now - b['time']:.0f} s; last heard at "
                  f"step {b['step']})" for r, b in sorted(beats.items())
                  if not b.get("done") and now - b["time"] > self.quiet_after]
        if quiet:
            return (f"{', '.join(quiet)} stopped answering: stopped (SIGSTOP, a debugger), hung in the kernel or on "
                    "its device, or its node is down. Look at that rank's node and log.")
        behind = sorted(r for r, b in beats.items() if b["step"] < mine)
        if behind:
            steps = ", ".join(f"rank {r} at step {beats[r]['step']}" for r in behind)
            return (f"Every rank is alive, but {steps} while this rank reached step {mine}: stuck outside the "
                    "collectives (reading data, a file system, a device). Look at those ranks' logs.")
        return ("Every rank is alive and at the same step: one was slower than the timeout inside a collective "
                "(a congested network, a very slow checkpoint write).")


def describe_collective_failure(err: BaseException, heartbeat: Heartbeat | None, timeout_s: float) -> str | None:
    """A plain account of `err` if it is a failed collective (a peer gone, or a timeout), else None."""
    text = f"{type(err).__name__}: {err}"
    if _PEER_GONE.search(text):
        return ("another rank ended (it failed, or was killed) while this one waited for it in a collective; "
                "that rank's own error is the one to read")
    if isinstance(err, RuntimeError) and _TIMED_OUT.search(text):
        detail = heartbeat.diagnose() if heartbeat is not None else ""
        return (f"a collective did not complete within train.collective_timeout_s={timeout_s:g} s. {detail} "
                "If the ranks legitimately need longer between collectives (e.g. very large checkpoints on a slow "
                "file system), raise train.collective_timeout_s")
    return None
