"""Batch-OMP sparse coding (Rubinstein, Zibulevsky & Elad 2008), vectorised over signals.

Every signal x_n (a row of x) is coded as S atoms of the dictionary D (K unit-norm rows) with least-squares
coefficients, chosen greedily: pick the atom most correlated with the current residual, then re-solve the
coefficients on the whole support. Batch-OMP updates the correlations with the residual from the Gram
matrix and the initial correlations,

    G = D D^T (K, K),   alpha0 = x D^T (K,),   alpha = alpha0 - G[:, tau] gamma

and keeps a Cholesky factor L of G[tau, tau] that grows by one row per step:
    w = L^-1 G[tau, j],   corner = sqrt(1 - w^T w),   L <- [[L, 0], [w^T, corner]]
and gamma solves L L^T gamma = alpha0[tau].

Implementation choices (measured on a 2-core CPU with kernels/bench_omp.py):
- G[:, tau] gamma is evaluated as D (D[tau]^T gamma): alpha = (x - gamma D[tau]) D^T, one dense
  (chunk, dim) @ (dim, K) GEMM per step. The literal form gathers s rows of G per signal ((chunk, s, K)
  floats per step) and is memory bound; the factored form reads only D (K x dim, cache resident).
- The factor is kept as its inverse M = L^-1 (lower triangular, grown by one row per step:
  [[L, 0], [w^T, c]]^-1 = [[M, 0], [-w^T M / c, 1 / c]]), so w = M G[tau, j] and gamma = M^T (M alpha0[tau])
  are a handful of elementwise ops on (s, s, chunk) tensors instead of O(s) substitution steps; the
  incremental z = M alpha0[tau] gains one entry per step. Batched LAPACK on s x s matrices is far slower.
- torch's row-wise argmax is ~10x slower on CPU than a max reduction; the selection uses max reductions and
  elementwise passes over one reused (chunk, K) buffer instead (exact, same first-index tie rule).
- Signals are processed in chunks (default: chunk * K = 2^20 elements, e.g. 2048 signals for K = 512) so
  the work buffer stays in cache and a call on 2^20 signals never materialises an (N, K) tensor.

Degenerate rows: if the atom picked at step s is linearly dependent on the support (1 - w^T w <= 64 * the
dtype's machine epsilon; e.g. once S > dim atoms span the space, with duplicated atoms, or when the residual is
exactly zero as for zero signals) the row stops growing. Its index at that step and at every later step is
still the (distinct) atom the greedy step picked, with coefficient exactly 0. So indices within a row are
always distinct, and a code never holds NaN or Inf.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

BACKENDS = ("auto", "torch", "triton")

# Relative tolerance on the dictionary's row norms: 1e-3, or 4 machine epsilons of the dictionary's own dtype
# when that is coarser. Rows normalised in bf16 / fp16 (d / d.norm(), F.normalize) were measured up to
# 1.45 eps off unit norm (fp16, dim 2; about 0.7 eps for dim >= 8), so bf16 gets 2^-5 and fp16 2^-8.
_UNIT_NORM_TOL = 1e-3
_UNIT_NORM_EPS = 4
# Default chunk: chunk * K = 2^20 work-buffer elements (4 MiB in fp32), e.g. 2048 signals for K = 512; on
# the 2-core dev CPU 2048-4096 signals were fastest, 1024 and 8192 slower.
_DEFAULT_CHUNK_ELEMENTS = 1 << 20


@dataclass(frozen=True)
class SparseCodes:
    """S atoms per signal and their coefficients.

    indices: (N, S) int64, atom ids into the dictionary's rows (distinct within a row).
    coeffs:  (N, S) coefficients, dtype of the coded signals.
    """

    indices: Tensor
    coeffs: Tensor

    def reconstruct(self, dictionary: Tensor) -> Tensor:
        """(K, dim) dictionary -> (N, dim) signals sum_s coeffs[n, s] * dictionary[indices[n, s]].

        Differentiable in `dictionary`; computed in the dictionary's dtype.
        """
        atoms = dictionary[self.indices]  # (N, S, dim)
        return torch.einsum("ns,nsd->nd", self.coeffs.to(dictionary.dtype), atoms)


def batch_omp(
    x: Tensor,
    dictionary: Tensor,
    sparsity: int,
    *,
    backend: str = "auto",
    chunk_size: int | None = None,
) -> SparseCodes:
    """Sparse-code the rows of x over the rows of dictionary with exactly `sparsity` atoms each.

    x: (N, dim) float signals. dictionary: (K, dim) float, unit-norm rows. 1 <= sparsity <= K.
    backend: "auto" (the Triton kernel for CUDA tensors when it is importable, supports the shapes and passed
    its self-check in this process -- see lasers_dist.sparse.backend; torch otherwise; float64 always uses torch
    so it stays float64), "torch", or "triton" (never self-checked: errors from the Triton module, e.g. for CPU
    tensors or unsupported shapes, surface as they are).
    chunk_size: signals per chunk for the torch backend (None: chosen for cache locality).
    Returns SparseCodes with indices (N, S) int64 and coeffs (N, S) in x's dtype. No gradients flow.
    bf16/fp16 inputs are computed in fp32; float64 inputs in float64.
    """
    compute_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    norms = _check_inputs(x, dictionary, sparsity, backend, chunk_size, compute_dtype)
    out_dtype = x.dtype
    with torch.no_grad():
        # Both backends assume G_jj = 1 exactly. Rows within the unit-norm tolerance are coded over the exactly
        # normalised atoms and the coefficients divided by the norms, which is the least-squares fit on the
        # atoms as given (and the same selection, by normalised correlation).
        atoms = dictionary.to(compute_dtype) / norms[:, None]
        if _pick_triton(backend, x, dictionary.shape[0], sparsity):
            from lasers_dist.kernels.omp_triton import batch_omp_triton

            indices, coeffs = batch_omp_triton(x.float().contiguous(), atoms.float().contiguous(), sparsity)
            indices = indices.long()
        else:
            indices, coeffs = _batch_omp_torch(x.to(compute_dtype), atoms, sparsity, chunk_size)
        coeffs = coeffs / norms.to(coeffs.dtype)[indices]
        return SparseCodes(indices, coeffs.to(out_dtype))


def _pick_triton(backend: str, x: Tensor, num_atoms: int, sparsity: int) -> bool:
    """Whether to dispatch to kernels/omp_triton.py; an explicit "triton" that cannot import raises.

    "auto" picks the kernel only for CUDA tensors that are not float64, only within the shapes the kernel
    reports it supports (`triton_supported`), and only once its self-check passed for this device, dtype and
    shape (lasers_dist.sparse.backend); everything else runs on the torch backend.
    """
    if backend == "torch" or (backend == "auto" and (not x.is_cuda or x.dtype == torch.float64)):
        return False
    try:
        from lasers_dist.kernels.omp_triton import batch_omp_triton, triton_supported  # noqa: F401
    except ImportError as error:
        if backend == "auto":
            return False
        raise RuntimeError(
            f"backend='triton' was requested but lasers_dist.kernels.omp_triton cannot be imported ({error}); "
            "install triton or use backend='torch'"
        ) from error
    if backend == "triton":
        return True
    from lasers_dist.sparse.backend import auto_uses_triton

    return triton_supported(x.shape[0], num_atoms, x.shape[1], sparsity) and auto_uses_triton(x, num_atoms, sparsity)


def _check_inputs(
    x: Tensor, dictionary: Tensor, sparsity: int, backend: str, chunk_size: int | None, compute_dtype: torch.dtype
) -> Tensor:
    """Raise TypeError/ValueError naming what was expected; see batch_omp for the contract."""
    if not isinstance(x, Tensor) or not isinstance(dictionary, Tensor):
        raise TypeError(
            f"batch_omp expects torch tensors, got x: {type(x).__name__}, dictionary: {type(dictionary).__name__}"
        )
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if x.ndim != 2 or not x.is_floating_point():
        raise ValueError(f"x must be a floating (N, dim) tensor, got shape {tuple(x.shape)} dtype {x.dtype}")
    if dictionary.ndim != 2 or not dictionary.is_floating_point() or 0 in dictionary.shape:
        raise ValueError(
            f"dictionary must be a floating (K, dim) tensor with K, dim >= 1, got shape {tuple(dictionary.shape)} "
            f"dtype {dictionary.dtype}"
        )
    num_atoms, dim = dictionary.shape
    if x.shape[1] != dim:
        raise ValueError(f"x has {x.shape[1]} features per signal but the dictionary atoms have dim {dim}")
    if x.device != dictionary.device:
        raise ValueError(f"x is on {x.device} but the dictionary is on {dictionary.device}; move them together")
    if isinstance(sparsity, bool) or not isinstance(sparsity, int) or not 1 <= sparsity <= num_atoms:
        raise ValueError(f"sparsity must be an int in [1, K={num_atoms}], got {sparsity!r}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    return _check_values(x, dictionary, compute_dtype)


def _check_values(x: Tensor, dictionary: Tensor, compute_dtype: torch.dtype) -> Tensor:
    """Unit-norm (and finite) atoms, finite signals; returns the (K,) atom norms in compute_dtype.
    One host sync each on CUDA; details only on failure."""
    norms = dictionary.detach().to(compute_dtype).norm(dim=1)
    tolerance = unit_norm_tolerance(dictionary.dtype)
    bad_atoms = ~((norms - 1).abs() <= tolerance)  # also true for NaN / Inf norms
    if bool(bad_atoms.any()):
        first = int(bad_atoms.nonzero()[0])
        raise ValueError(
            f"dictionary rows must have unit L2 norm (tolerance {tolerance:.3g} for {dictionary.dtype}); "
            f"{int(bad_atoms.sum())} of "
            f"{dictionary.shape[0]} do not (atom {first} has norm {float(norms[first]):.6g}); "
            "normalise with dictionary / dictionary.norm(dim=1, keepdim=True)"
        )
    bad_rows = ~torch.isfinite(x).all(dim=1)
    if bool(bad_rows.any()):
        raise ValueError(
            f"x has {int(bad_rows.sum())} of {x.shape[0]} rows with NaN or Inf (first bad row: "
            f"{int(bad_rows.nonzero()[0])}); sparse codes of non-finite signals are undefined"
        )
    return norms


def unit_norm_tolerance(dtype: torch.dtype) -> float:
    """Accepted |norm - 1| of a dictionary row stored in `dtype` (rows within it are renormalised exactly)."""
    return max(_UNIT_NORM_TOL, _UNIT_NORM_EPS * torch.finfo(dtype).eps)


def _default_chunk_size(num_atoms: int) -> int:
    return max(256, min(8192, _DEFAULT_CHUNK_ELEMENTS // num_atoms))


def _batch_omp_torch(x: Tensor, dictionary: Tensor, sparsity: int, chunk_size: int | None) -> tuple[Tensor, Tensor]:
    """x (N, dim), dictionary (K, dim), same float dtype -> indices (N, S) int64, coeffs (N, S)."""
    num_signals, num_atoms = x.shape[0], dictionary.shape[0]
    indices = torch.empty(num_signals, sparsity, dtype=torch.int64, device=x.device)
    coeffs = torch.empty(num_signals, sparsity, dtype=x.dtype, device=x.device)
    if num_signals == 0:
        return indices, coeffs
    chunk = min(num_signals, chunk_size or _default_chunk_size(num_atoms))
    gram = dictionary @ dictionary.T
    dictionary_t = dictionary.T.contiguous()
    # One (chunk, K) buffer reused by every chunk and step: holds alpha, then |alpha|, then the argmax mask.
    # Reusing it matters: a fresh multi-MB tensor per step costs more in page faults than the arithmetic.
    scores = torch.empty(chunk, num_atoms, dtype=x.dtype, device=x.device)
    # K - j for atom j: the largest weight among the maximal atoms marks the first of them (argmax's rule).
    # Exact while K <= 2^24 (fp32 integers).
    first_weight = torch.arange(num_atoms, 0, -1, dtype=x.dtype, device=x.device)
    row_offsets = torch.arange(chunk, device=x.device) * num_atoms  # flat offset of each row of scores
    for start in range(0, num_signals, chunk):
        stop = min(start + chunk, num_signals)
        rows = stop - start
        _omp_chunk(
            x[start:stop], dictionary, dictionary_t, gram, scores[:rows], first_weight, row_offsets[:rows],
            indices[start:stop], coeffs[start:stop],
        )
    return indices, coeffs


def _omp_chunk(
    x: Tensor,
    dictionary: Tensor,
    dictionary_t: Tensor,
    gram: Tensor,
    scores: Tensor,
    first_weight: Tensor,
    row_offsets: Tensor,
    indices: Tensor,
    coeffs: Tensor,
) -> None:
    """Code one chunk of C signals in place.

    x (C, dim), dictionary (K, dim), dictionary_t (dim, K), gram (K, K), scores (C, K) workspace,
    first_weight (K,), row_offsets (C,) = K * row; writes indices (C, S) and coeffs (C, S).
    Per-signal state is stored signal-last, (S, C) and (S, S, C), so every small op runs over contiguous rows.
    """
    num_rows, sparsity = indices.shape
    num_atoms = gram.shape[0]
    eps = 64 * torch.finfo(x.dtype).eps
    inv_chol = x.new_zeros(sparsity, sparsity, num_rows)  # M = L^-1, lower triangular
    inv_chol[0, 0] = 1.0
    z = x.new_empty(sparsity, num_rows)  # z = M alpha0[tau], so that gamma = M^T z
    support = x.new_empty(sparsity, num_rows, x.shape[1])  # D[tau]
    chosen_flat = row_offsets.new_empty(sparsity, num_rows)  # tau + row_offsets: positions in scores
    gram_rows = row_offsets.new_empty(sparsity, num_rows)  # tau * K: flat offsets of G[tau, :]
    active = torch.ones(num_rows, dtype=torch.bool, device=x.device)
    gram_flat = gram.view(-1)
    torch.mm(x, dictionary_t, out=scores)  # alpha0 = x D^T
    for s in range(sparsity):
        atom = _select_atoms(scores, chosen_flat[:s].view(-1), first_weight)
        torch.add(atom, row_offsets, out=chosen_flat[s])
        torch.mul(atom, num_atoms, out=gram_rows[s])
        atom_vectors = torch.index_select(dictionary, 0, atom, out=support[s])
        alpha0_atom = (x * atom_vectors).sum(dim=1)  # alpha0[j] = x . d_j
        if s == 0:
            z[0] = alpha0_atom
            gamma = z[:1]
        else:
            gram_column = gram_flat.index_select(0, (gram_rows[:s] + atom).view(-1)).view(s, num_rows)
            _extend_factor(inv_chol[: s + 1, : s + 1], z[: s + 1], gram_column, alpha0_atom, active, eps)
            gamma = (inv_chol[: s + 1, : s + 1] * z[: s + 1, None]).sum(dim=0)  # gamma = M^T z
        if s + 1 < sparsity:
            # alpha = alpha0 - G[:, tau] gamma, with G[:, tau] gamma = D (D[tau]^T gamma): one GEMM.
            residual = x - (gamma[:, :, None] * support[: s + 1]).sum(dim=0)
            torch.mm(residual, dictionary_t, out=scores)
    torch.sub(chosen_flat.T, row_offsets[:, None], out=indices)
    coeffs.copy_(gamma.T)


def _select_atoms(scores: Tensor, chosen_flat: Tensor, first_weight: Tensor) -> Tensor:
    """argmax_j |alpha_j| over the atoms not chosen yet, per row, overwriting scores.

    scores (C, K) holds alpha; chosen_flat: flat positions in scores of the chosen atoms. Returns (C,) int64.
    torch's row-wise argmax is ~10x slower on CPU than a max reduction, so the first maximal index is found
    with elementwise passes and max reductions (all cache friendly, exact, same tie rule as argmax).
    """
    scores.abs_()
    scores.view(-1).index_fill_(0, chosen_flat, -1.0)  # below every |alpha|: chosen atoms never win again
    best = scores.amax(dim=1, keepdim=True)
    torch.eq(scores, best, out=scores)  # 1 where maximal
    return (scores.shape[1] - scores.mul_(first_weight).amax(dim=1)).long()


def _extend_factor(
    inv_chol: Tensor, z: Tensor, gram_column: Tensor, alpha0_atom: Tensor, active: Tensor, eps: float
) -> None:
    """Grow M = L^-1 and z = M alpha0[tau] by the atom j picked at step s, in place.

    inv_chol (s+1, s+1, C) with its first s rows filled; z (s+1, C); gram_column G[tau, j] (s, C);
    alpha0_atom alpha0[j] (C,); active (C,) bool, cleared for rows whose atom j is linearly dependent on the
    support. Such a row gets a zero row in M, so its new coefficient and all later ones are exactly 0.
    """
    s = gram_column.shape[0]
    old = inv_chol[:s, :s]
    w = (old * gram_column).sum(dim=1)  # w = L^-1 G[tau, j]: the new row of L is [w, corner]
    corner_sq = 1.0 - (w * w).sum(dim=0)
    active &= corner_sq > eps
    inv_corner = corner_sq.clamp_min_(eps).rsqrt_().mul_(active)
    # [[L, 0], [w^T, c]]^-1 = [[M, 0], [-w^T M / c, 1 / c]]
    torch.mul((w[:, None] * old).sum(dim=0), -inv_corner, out=inv_chol[s, :s])
    inv_chol[s, s] = inv_corner
    z[s] = (alpha0_atom - (w * z[:s]).sum(dim=0)) * inv_corner
