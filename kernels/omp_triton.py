"""Batch-OMP as one fused Triton kernel: each program codes BLOCK_N signals from start to finish.

Per program, everything a signal's pursuit needs stays on chip for all S steps: the signal x and its residual
(BLOCK_N, DIM_PAD), the support (BLOCK_N, S_PAD), the Cholesky factor L of G[tau, tau] (BLOCK_N, S_PAD, S_PAD),
z = L^-1 alpha0[tau] and gamma (BLOCK_N, S_PAD). One step s is
  1. alpha = D r by tiles of BLOCK_K atoms, |alpha| masked on the support, running argmax across tiles;
  2. w = L^-1 G[tau, j] (forward substitution), corner = sqrt(1 - w^T w), append [w^T, corner] to L;
  3. z_s = (alpha0_j - w^T z) / corner, gamma = L^-T z (back substitution);
  4. r = x - gamma D[tau].
The numerics follow lasers_dist/sparse/omp.py exactly: L[0, 0] = 1 (unit-norm atoms), a row whose new atom
is dependent on its support (1 - w^T w <= eps) stops growing (unit row in L, coefficient 0, index kept), ties
in |alpha| go to the lowest atom id.

Why alpha = D r (residual correlation) rather than alpha0 - G[:, tau] gamma: for K up to 4096 neither alpha0
nor alpha of a block fits on chip, so the literal form would either store alpha0 (N x K floats in global
memory, 1 GB for 2^16 signals at K = 4096) or gather s rows of G per signal per tile (a (BLOCK_N, s, BLOCK_K)
gather that is memory bound and cannot use tl.dot). D r is one dense (BLOCK_N, dim) x (dim, BLOCK_K) tl.dot per
tile, D (at most 4096 x 256 fp32 = 4 MB) stays in L2 across programs, and for the paper's dim = 16, S = 5 it
costs no more flops than s gathered G rows. It also never forms G (K x K), and its rounding error scales with
|r| instead of |x|. G[tau, j] for the Cholesky row is the dot of two gathered dictionary rows.

Bounds: S <= 16, K <= 4096, dim <= 256 (`triton_supported`); lasers_dist.sparse.batch_omp uses torch outside.
On CPU tensors the kernel runs only under Triton's interpreter (TRITON_INTERPRET=1 set before this import).

GPU status: never run on a GPU by this project. It compiles with Triton's NVIDIA compiler for sm_80 and sm_90
(tests/test_omp_backend.py compiles it ahead of time without a GPU: fp32 FMA for the ieee tl.dot, no TF32, no
local-memory spills at the paper's shape), and batch_omp(backend="auto") runs it only after a self-check on the
device (lasers_dist.sparse.backend). launch/gpu_check.sh verifies it on a real card.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
except ImportError as error:  # pragma: no cover - exercised only where triton is absent
    raise ImportError(
        f"lasers_dist.kernels.omp_triton needs the `triton` package ({error}); it ships with torch's CUDA "
        "wheels (pip install triton), or use batch_omp(..., backend='torch')"
    ) from error

MAX_SPARSITY = 16
MAX_ATOMS = 4096
MAX_DIM = 256
NUM_WARPS = 4
# Same stop rule as the torch reference: the new atom is dependent on the support when 1 - w^T w <= EPS.
EPS = 64 * torch.finfo(torch.float32).eps


@triton.jit
def _slot(values, slots, t):
    """values[:, t] of a (BLOCK_N, S_PAD) block as a (BLOCK_N,) vector (t is a runtime index)."""
    return tl.sum(tl.where(slots[None, :] == t, values, 0), axis=1)


@triton.jit
def _select_atom(residual, support, d_ptr, K, DIM, dims, dim_ok, slots, step,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """argmax_k |d_k . r| over atoms not in the first `step` support slots, lowest id on ties. -> (BLOCK_N,) int32."""
    best_score = tl.full((BLOCK_N,), -1.0, tl.float32)
    best_atom = tl.zeros((BLOCK_N,), tl.int32)
    for start in range(0, K, BLOCK_K):
        atoms = start + tl.arange(0, BLOCK_K)
        atom_ok = atoms < K
        tile = tl.load(d_ptr + atoms[:, None] * DIM + dims[None, :],
                       mask=atom_ok[:, None] & dim_ok[None, :], other=0.0)
        score = tl.abs(tl.dot(residual, tl.trans(tile), input_precision="ieee"))  # (BLOCK_N, BLOCK_K)
        # Masked scores are -1 < any |alpha|, so padding and chosen atoms never win.
        excluded = tl.broadcast_to((atoms >= K)[None, :], (BLOCK_N, BLOCK_K))
        for t in range(0, step):
            excluded = excluded | (_slot(support, slots, t)[:, None] == atoms[None, :])
        score = tl.where(excluded, -1.0, score)
        tile_score, tile_arg = tl.max(score, axis=1, return_indices=True, return_indices_tie_break_left=True)
        # Strict > keeps the earlier tile on ties, so the lowest id wins overall like torch.argmax.
        better = tile_score > best_score
        best_score = tl.where(better, tile_score, best_score)
        best_atom = tl.where(better, start + tile_arg, best_atom)
    return best_atom


@triton.jit
def _gram_column(d_ptr, support, atom_vec, dims, dim_ok, DIM, slots, step):
    """G[tau_t, j] = d_{tau_t} . d_j for the first `step` support slots, zero after. -> (BLOCK_N, S_PAD)."""
    gram = tl.zeros(support.shape, tl.float32)
    for t in range(0, step):
        support_vec = tl.load(d_ptr + _slot(support, slots, t)[:, None] * DIM + dims[None, :],
                              mask=dim_ok[None, :], other=0.0)
        gram = tl.where(slots[None, :] == t, tl.sum(support_vec * atom_vec, axis=1)[:, None], gram)
    return gram


@triton.jit
def _forward_substitute(chol, rhs, slots, size):
    """Solve L[:size, :size] w = rhs[:size] per signal. chol (BLOCK_N, S_PAD, S_PAD) -> (BLOCK_N, S_PAD)."""
    w = tl.zeros(rhs.shape, tl.float32)
    for t in range(0, size):
        row = tl.sum(tl.where(slots[None, :, None] == t, chol, 0.0), axis=1)  # L[t, :]
        # w is still zero from slot t on, so the full-width dot only sums the solved part.
        w_t = (_slot(rhs, slots, t) - tl.sum(row * w, axis=1)) / _slot(row, slots, t)
        w = tl.where(slots[None, :] == t, w_t[:, None], w)
    return w


@triton.jit
def _back_substitute(chol, z, slots, size):
    """Solve L[:size, :size]^T gamma = z[:size] per signal. -> (BLOCK_N, S_PAD), zero from slot `size` on."""
    gamma = tl.zeros(z.shape, tl.float32)
    for i in range(0, size):
        t = size - 1 - i
        col = tl.sum(tl.where(slots[None, None, :] == t, chol, 0.0), axis=2)  # L[:, t]
        gamma_t = (_slot(z, slots, t) - tl.sum(col * gamma, axis=1)) / _slot(col, slots, t)
        gamma = tl.where(slots[None, :] == t, gamma_t[:, None], gamma)
    return gamma


# N is not specialised (Triton would otherwise compile separate binaries for N == 1 and N % 16 == 0): every N
# then runs the binary that lasers_dist.sparse.backend's self-check compiled and verified for (K, dim, S).
@triton.jit(do_not_specialize=["N"])
def _batch_omp_kernel(x_ptr, d_ptr, indices_ptr, coeffs_ptr, N, K, DIM, eps,
                      SPARSITY: tl.constexpr, S_PAD: tl.constexpr, DIM_PAD: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, DIM_PAD)
    slots = tl.arange(0, S_PAD)
    row_ok = rows < N
    dim_ok = dims < DIM
    # Padded rows are zero signals: they run the same pursuit harmlessly and are never stored.
    x = tl.load(x_ptr + rows[:, None] * DIM + dims[None, :], mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    residual = x
    support = tl.full((BLOCK_N, S_PAD), -1, tl.int32)
    chol = tl.zeros((BLOCK_N, S_PAD, S_PAD), tl.float32)
    z = tl.zeros((BLOCK_N, S_PAD), tl.float32)
    gamma = tl.zeros((BLOCK_N, S_PAD), tl.float32)
    active = rows >= 0  # all True: the row keeps growing its support
    # Runtime loops throughout (not tl.static_range): unrolling the S steps and their O(S) inner loops made
    # the GPU compile time grow steeply with S (about 20 s at S = 5 and 100 s at S = 8 for sm_90 on a 2-core
    # machine, far longer at S = 16), and every rank pays it before its first step.
    for step in range(0, SPARSITY):
        atom = _select_atom(residual, support, d_ptr, K, DIM, dims, dim_ok, slots, step, BLOCK_N, BLOCK_K)
        atom_vec = tl.load(d_ptr + atom[:, None] * DIM + dims[None, :], mask=dim_ok[None, :], other=0.0)
        alpha0_atom = tl.sum(x * atom_vec, axis=1)
        # At step 0 the support is empty: gram = w = 0, corner = sqrt(1) = 1 and z_0 = alpha0_j exactly.
        gram = _gram_column(d_ptr, support, atom_vec, dims, dim_ok, DIM, slots, step)
        w = _forward_substitute(chol, gram, slots, step)
        corner_sq = 1.0 - tl.sum(w * w, axis=1)
        active = active & (corner_sq > eps)
        # A stopped row gets the unit row e_step: coefficient 0, earlier coefficients unchanged.
        w = tl.where(active[:, None], w, 0.0)
        corner = tl.where(active, tl.sqrt(tl.maximum(corner_sq, eps)), 1.0)
        z_step = tl.where(active, (alpha0_atom - tl.sum(w * z, axis=1)) / corner, 0.0)
        new_row = tl.where(slots[None, :] == step, corner[:, None], w)
        chol = tl.where(slots[None, :, None] == step, new_row[:, None, :], chol)
        z = tl.where(slots[None, :] == step, z_step[:, None], z)
        support = tl.where(slots[None, :] == step, atom[:, None], support)
        gamma = _back_substitute(chol, z, slots, step + 1)
        approx = tl.zeros((BLOCK_N, DIM_PAD), tl.float32)
        for t in range(0, step + 1):
            support_vec = tl.load(d_ptr + _slot(support, slots, t)[:, None] * DIM + dims[None, :],
                                  mask=dim_ok[None, :], other=0.0)
            approx += _slot(gamma, slots, t)[:, None] * support_vec
        residual = x - approx  # unused after the last step
    out = rows[:, None] * SPARSITY + slots[None, :]
    out_mask = row_ok[:, None] & (slots < SPARSITY)[None, :]
    tl.store(indices_ptr + out, support.to(tl.int64), mask=out_mask)
    tl.store(coeffs_ptr + out, gamma, mask=out_mask)


def triton_supported(n: int, k: int, dim: int, s: int) -> bool:
    """Whether the fused kernel handles N signals of dim `dim` over K atoms at sparsity s (per-block state
    must fit on chip); lasers_dist.sparse.batch_omp should use torch otherwise."""
    return n >= 0 and 1 <= s <= min(k, MAX_SPARSITY) and 1 <= k <= MAX_ATOMS and 1 <= dim <= MAX_DIM


def _interpreted() -> bool:
    # Triton decides at decoration time (TRITON_INTERPRET read when this module was imported).
    return isinstance(_batch_omp_kernel, InterpretedFunction)


def _block_sizes(num_signals: int, num_atoms: int, dim_pad: int) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_K): powers of two (tl.arange), and >= 16 in every tl.dot dimension (Triton releases before
    per-backend minimum dot sizes asserted it; 3.8 also compiles 8 for this fp32 ieee dot)."""
    if _interpreted():
        # The interpreter's cost is per program and per op, not per element: use few, large programs.
        return (min(256, max(16, triton.next_power_of_2(num_signals))),
                min(1024, max(16, triton.next_power_of_2(num_atoms))))
    # GPU: 16 signals keep L (16 x S_PAD^2) and the residual in registers; a D tile of <= 4096 floats.
    return 16, min(128, max(16, 4096 // dim_pad))


def batch_omp_triton(x: Tensor, dictionary: Tensor, sparsity: int) -> tuple[Tensor, Tensor]:
    """Batch-OMP of the rows of x over the unit-norm rows of dictionary, on the GPU.

    x: (N, dim) fp32, dictionary: (K, dim) fp32 on the same CUDA device (or CPU under TRITON_INTERPRET=1).
    Returns indices (N, S) int64 and coeffs (N, S) fp32, with the semantics of lasers_dist.sparse.batch_omp.
    Raises ValueError outside `triton_supported` bounds (use the torch backend there).
    """
    if x.dtype != torch.float32 or dictionary.dtype != torch.float32:
        raise TypeError(f"batch_omp_triton takes fp32 tensors, got x {x.dtype} and dictionary {dictionary.dtype}")
    if x.ndim != 2 or dictionary.ndim != 2 or x.shape[1] != dictionary.shape[1]:
        raise ValueError(
            f"batch_omp_triton expects x (N, dim) and dictionary (K, dim), got {tuple(x.shape)} and "
            f"{tuple(dictionary.shape)}"
        )
    num_signals, dim = x.shape
    num_atoms = dictionary.shape[0]
    if not triton_supported(num_signals, num_atoms, dim, sparsity):
        raise ValueError(
            f"batch_omp_triton supports 1 <= sparsity <= min(K, {MAX_SPARSITY}), K <= {MAX_ATOMS}, "
            f"dim <= {MAX_DIM}; got N={num_signals}, K={num_atoms}, dim={dim}, sparsity={sparsity}: "
            "use batch_omp(..., backend='torch')"
        )
    if x.device != dictionary.device:
        raise ValueError(f"x is on {x.device} but the dictionary is on {dictionary.device}")
    check_device(x.device)
    return launch_kernel(x, dictionary, sparsity, kernel_constants(num_signals, num_atoms, dim, sparsity))


def check_device(device: torch.device) -> None:
    """RuntimeError unless the kernel can run on `device`: CUDA, or the CPU under the interpreter."""
    if device.type != "cuda" and not _interpreted():
        raise RuntimeError("Triton needs a CUDA tensor (or TRITON_INTERPRET=1 for the CPU interpreter)")


def kernel_constants(num_signals: int, num_atoms: int, dim: int, sparsity: int) -> dict[str, int]:
    """The constexpr arguments of a launch. With K and dim (which Triton specialises on) they decide which
    binary runs; N does not (it is not specialised, and on GPU the blocks do not depend on it)."""
    dim_pad = max(16, triton.next_power_of_2(dim))
    block_n, block_k = _block_sizes(num_signals, num_atoms, dim_pad)
    return dict(SPARSITY=sparsity, S_PAD=max(2, triton.next_power_of_2(sparsity)), DIM_PAD=dim_pad,
                BLOCK_N=block_n, BLOCK_K=block_k)


def launch_kernel(x: Tensor, dictionary: Tensor, sparsity: int, constants: dict[str, int]) -> tuple[Tensor, Tensor]:
    """Run the kernel with the given constexprs (see kernel_constants), without batch_omp_triton's checks.

    Inputs are made contiguous and 16-byte aligned: Triton also specialises pointers on their alignment, so an
    unaligned view would compile a second, unchecked binary.
    """
    num_signals, dim = x.shape
    indices = torch.empty(num_signals, sparsity, dtype=torch.int64, device=x.device)
    coeffs = torch.empty(num_signals, sparsity, dtype=torch.float32, device=x.device)
    if num_signals == 0:
        return indices, coeffs
    x, dictionary = _aligned(x), _aligned(dictionary)
    grid = (triton.cdiv(num_signals, constants["BLOCK_N"]),)
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        _batch_omp_kernel[grid](x, dictionary, indices, coeffs, num_signals, dictionary.shape[0], dim, EPS,
                                **constants, num_warps=NUM_WARPS)
    return indices, coeffs


def _aligned(tensor: Tensor) -> Tensor:
    tensor = tensor.contiguous()
    return tensor if tensor.data_ptr() % 16 == 0 else tensor.clone()
