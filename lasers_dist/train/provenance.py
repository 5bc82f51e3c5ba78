"""out_dir/provenance.json: what a run ran on. Rank 0 writes it when the trainer starts.

Flat keys describe the latest start: versions (python, torch, deepspeed, triton, lasers_dist, CUDA, NCCL), world
size, device and its name, host, and the agreed Batch-OMP backend with this rank's self-check. A resumed run keeps
the records of its earlier starts under "previous_starts" (oldest first), so a run that moved between machines
says which backend trained which part (each checkpoint's meta.json also names its "omp_backend").
Other components may add keys through `extra`.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

PROVENANCE_FILE = "provenance.json"


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def device_name(device: torch.device) -> str:
    """The card's name for CUDA devices, the CPU model otherwise."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def build_provenance(world_size: int, device: torch.device, omp: dict[str, Any],
                     extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The record of this start. omp: RunBackend.record() of lasers_dist.train.omp_backend."""
    record: dict[str, Any] = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": socket.gethostname(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "deepspeed": _version("deepspeed"),
        "triton": _version("triton"),
        "lasers_dist": _version("lasers_dist"),
        "cuda": torch.version.cuda,
        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if device.type == "cuda" else None,
        "world_size": world_size,
        "device": device.type,
        "device_name": device_name(device),
        **omp,
    }
    if device.type == "cuda":
        record["device_capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
    record.update(extra or {})
    return record


def write_provenance(out_dir: str | Path, record: dict[str, Any]) -> Path:
    """Write out_dir/provenance.json atomically (rank 0), moving an earlier start's record to previous_starts."""
    path = Path(out_dir) / PROVENANCE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    previous: list[dict[str, Any]] = []
    if path.is_file():
        try:
            earlier = json.loads(path.read_text())
            previous = earlier.pop("previous_starts", []) + [earlier]
        except (json.JSONDecodeError, AttributeError):
            previous = []  # an unreadable record is replaced, not fatal
    tmp = path.with_name(f".{PROVENANCE_FILE}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps({**record, "previous_starts": previous}, indent=2) + "\n")
    os.replace(tmp, path)
    return path
