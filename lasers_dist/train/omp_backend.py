"""The run's Batch-OMP backend: resolved once at start-up on every rank, agreed across ranks.

Each rank resolves model.omp_backend for the signals its DictionaryBottleneck will code (fp32, K atoms of
dimension L * P_H * P_W, S per signal) on its device; for "auto" on CUDA that runs the Triton self-check
(lasers_dist.sparse.backend). One all-reduce of every rank's outcome then decides: Triton only if it passed on
every rank; otherwise every rank's "auto" falls back to torch for the rest of the process, so no two ranks code
with different backends. An explicit "triton" that failed on any rank stops every rank with the same error.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lasers_dist.config import ModelConfig
from lasers_dist.sparse import backend as omp_backend
from lasers_dist.train import distributed as D

# Per-rank outcome codes in the all-reduced vector.
_TORCH, _TRITON, _FAILED = 0, 1, 2


@dataclass(frozen=True)
class RunBackend:
    """The agreed backend ("triton", "torch", or "none" for a VQ model), why, this rank's self-check (if one ran)
    and the ranks whose self-check failed."""

    requested: str
    backend: str
    reason: str
    check: omp_backend.SelfCheck | None = None
    failed_ranks: list[int] = field(default_factory=list)

    @property
    def message(self) -> str:
        return f"omp backend: {self.backend} (model.omp_backend={self.requested}; {self.reason})"

    def record(self) -> dict:
        """The provenance entries (JSON-ready)."""
        return {"omp_backend": self.backend, "omp_backend_requested": self.requested,
                "omp_backend_reason": self.reason, "omp_self_check": self.check.as_dict() if self.check else None,
                "omp_self_check_failed_ranks": self.failed_ranks}


class BackendCheckError(RuntimeError):
    """model.omp_backend="triton" but the kernel failed its self-check on some rank."""


def agree_omp_backend(model: ModelConfig, rank: int, world_size: int, device: torch.device) -> RunBackend:
    """Resolve model.omp_backend here and agree on it with every rank (a collective: call on all ranks)."""
    if model.bottleneck != "dictionary":
        return RunBackend(model.omp_backend, "none", f"model.bottleneck={model.bottleneck} does no sparse coding")
    code_dim = model.embed_dim * model.patch_size[0] * model.patch_size[1]
    local = omp_backend.resolve_backend(model.omp_backend, device, torch.float32, model.num_atoms, code_dim,
                                        model.sparsity)
    return agree(local, rank, world_size, device)


def agree(local: omp_backend.BackendChoice, rank: int, world_size: int, device: torch.device) -> RunBackend:
    """Combine every rank's local choice with one all-reduce (of world_size small ints). Triton only where every
    rank chose it with a passing self-check; "auto" ranks that chose it fall back to torch otherwise."""
    passed = local.backend == "triton" and local.check is not None and local.check.passed
    code = _TRITON if passed else (_FAILED if local.check is not None and not local.check.passed else _TORCH)
    outcomes = torch.zeros(world_size, dtype=torch.int32, device=device)
    outcomes[rank] = code
    outcomes = D.all_reduce_(outcomes, op="sum").tolist()
    failed = [r for r, value in enumerate(outcomes) if value == _FAILED]
    not_triton = [r for r, value in enumerate(outcomes) if value != _TRITON]
    if not not_triton:
        ranks = "every rank" if world_size > 1 else "this process"
        return RunBackend(local.requested, "triton", f"{local.reason}; agreed by {ranks}", local.check)
    if local.requested == "triton":
        raise BackendCheckError(
            f"model.omp_backend=triton, but the Triton kernel failed its self-check on rank(s) {failed} (this rank: "
            f"{local.reason}); set model.omp_backend=auto (falls back to torch) or torch"
        )
    if local.backend == "triton":  # this rank's kernel is fine, another rank's is not (or it cannot use it)
        reason = (f"the Triton self-check failed on rank(s) {failed}" if failed
                  else f"rank(s) {not_triton} cannot use the Triton kernel")
        omp_backend.fall_back_to_torch(f"{reason}; every rank uses the same backend")
        return RunBackend(local.requested, "torch", f"{reason}; all ranks use torch", local.check, failed)
    if failed:
        reason = f"{local.reason}; the Triton self-check failed on rank(s) {failed}, all ranks use torch"
    else:
        reason = local.reason
    return RunBackend(local.requested, "torch", reason, local.check, failed)
