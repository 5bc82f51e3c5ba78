"""Atom / code usage statistics shared by both bottlenecks, and the few collectives they need.

Usage counts one selection per (signal, atom) pair with a nonzero coefficient: Batch-OMP pads a code that
reached a zero residual early with coefficient-0 atoms, and those are not "used".
Perplexity = exp(entropy of the usage frequencies): K when all atoms are used equally, 1 when one atom is used.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass
class BottleneckInfo:
    """What a bottleneck forward reports besides (z_q, loss).

    indices: (B, S, H', W') int64 atom/code ids per coded signal (S = 1 for VQ).
    coeffs: (B, S, H', W') coefficients (ones for VQ).
    perplexity: 0-dim float, exp(entropy) of `usage`.
    dead_atoms: 0-dim int64, atoms with zero usage in this batch (revival uses its own window, see the modules).
    usage: (K,) int64 selections per atom in this batch; summed over ranks in training mode.
    """

    indices: Tensor
    coeffs: Tensor
    perplexity: Tensor
    dead_atoms: Tensor
    usage: Tensor


def distributed_ready() -> bool:
    return dist.is_available() and dist.is_initialized()


def all_reduce_sum_(tensor: Tensor) -> Tensor:
    """Sum `tensor` in place over all ranks of the default group; a no-op without torch.distributed. Returns it."""
    if distributed_ready():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_(tensor: Tensor, src: int = 0) -> Tensor:
    """Overwrite `tensor` on every rank with rank `src`'s copy; a no-op without torch.distributed. Returns it."""
    if distributed_ready():
        dist.broadcast(tensor, src=src)
    return tensor


def atom_usage(indices: Tensor, coeffs: Tensor, num_atoms: int) -> Tensor:
    """indices, coeffs: any matching shape -> (K,) int64 count of selections with a nonzero coefficient."""
    selected = (coeffs != 0).reshape(-1).long()
    counts = torch.zeros(num_atoms, dtype=torch.int64, device=indices.device)
    return counts.index_add_(0, indices.reshape(-1), selected)


def perplexity(usage: Tensor) -> Tensor:
    """(K,) counts -> 0-dim fp32 exp(-sum p log p) with p = usage / usage.sum(); 1 if nothing was used."""
    counts = usage.float()
    probs = counts / counts.sum().clamp_min(1.0)
    entropy = -(probs * torch.log(probs.clamp_min(1e-30))).sum()
    return torch.exp(entropy)


def dead_count(usage: Tensor) -> Tensor:
    """(K,) counts -> 0-dim int64 number of atoms never used."""
    return (usage == 0).sum()


def usage_info(indices: Tensor, coeffs: Tensor, num_atoms: int, reduce: bool) -> BottleneckInfo:
    """Build BottleneckInfo for codes (B, S, H', W'); reduce=True sums the usage over ranks first."""
    usage = atom_usage(indices, coeffs, num_atoms)
    if reduce:
        all_reduce_sum_(usage)
    return BottleneckInfo(
        indices=indices, coeffs=coeffs, perplexity=perplexity(usage), dead_atoms=dead_count(usage), usage=usage
    )


def replacement_rows(signals: Tensor, num_rows: int, seed: int) -> Tensor:
    """Pick num_rows rows of signals (N, dim) as revival candidates, the same on every rank -> (num_rows, dim).

    Every rank draws from its own batch with a CPU generator seeded by `seed` (reproducible runs), then rank 0's
    pick is broadcast, so all ranks install identical rows. Distinct rows when N >= num_rows. The shape is fixed
    (one candidate per atom, used only where the atom is dead), so no data-dependent size crosses ranks.
    """
    generator = torch.Generator().manual_seed(seed)
    num_signals = signals.shape[0]
    if num_signals >= num_rows:
        picks = torch.randperm(num_signals, generator=generator)[:num_rows]
    else:
        picks = torch.randint(num_signals, (num_rows,), generator=generator)
    rows = signals.detach()[picks.to(signals.device)].float().contiguous()
    return broadcast_(rows, src=0)
