"""Test driver (not collected by pytest): the OMP backend agreement on a real process group.

    TRITON_INTERPRET=1 python -m torch.distributed.run --standalone --nproc_per_node=2 \
        tests/omp_backend_driver.py OUT_DIR

Every rank writes OUT_DIR/rank<R>.json with what it saw in three rounds:
  cpu       the trainer's own call on CPU: "auto" resolves to torch without a self-check;
  forced    rank 1's self-check is made to fail (inject_self_check_fault("disagree"), the real kernel under the
            CPU interpreter on wrong input), rank 0's passes: both ranks must end on torch;
  explicit  the same outcomes with model.omp_backend=triton: every rank must raise the same error;
  clean     no fault: both ranks pass and agree on Triton.
On CUDA, resolve_backend("auto") returns backend "triton" exactly when the check passed; on CPU "auto" never
tries the kernel, so the rounds build that choice from the explicit resolution (same self-check, same agreement).
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from lasers_dist.config import ModelConfig
from lasers_dist.sparse import backend as B
from lasers_dist.train.omp_backend import BackendCheckError, agree, agree_omp_backend

SHAPE = (64, 8, 3)


def auto_choice_on_cuda(explicit: B.BackendChoice) -> B.BackendChoice:
    """What resolve_backend("auto") returns on CUDA for the same self-check."""
    passed = explicit.check.passed
    return replace(explicit, requested="auto", backend="triton" if passed else "torch")


def main() -> None:
    out = Path(sys.argv[1])
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    cpu = torch.device("cpu")
    seen: dict = {}

    run = agree_omp_backend(ModelConfig(num_atoms=SHAPE[0], embed_dim=SHAPE[1], sparsity=SHAPE[2]), rank, world, cpu)
    seen["cpu"] = {"backend": run.backend, "reason": run.reason, "check": run.record()["omp_self_check"]}

    B.inject_self_check_fault("disagree" if rank == 1 else None)
    explicit = B.resolve_backend("triton", cpu, torch.float32, *SHAPE)
    run = agree(auto_choice_on_cuda(explicit), rank, world, cpu)
    seen["forced"] = {"backend": run.backend, "failed_ranks": run.failed_ranks, "reason": run.reason,
                      "local_check_passed": explicit.check.passed, "fallback_reason": B.fallback_reason()}
    try:
        agree(explicit, rank, world, cpu)
        seen["explicit_error"] = None
    except BackendCheckError as error:
        seen["explicit_error"] = str(error)

    B.inject_self_check_fault(None)
    B.clear_self_checks()
    run = agree(auto_choice_on_cuda(B.resolve_backend("triton", cpu, torch.float32, *SHAPE)), rank, world, cpu)
    seen["clean"] = {"backend": run.backend, "reason": run.reason}

    (out / f"rank{rank}.json").write_text(json.dumps(seen, indent=2))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
