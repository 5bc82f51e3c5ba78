"""The fused Triton Batch-OMP kernel (kernels/omp_triton.py) against the torch reference batch_omp.

Triton reads TRITON_INTERPRET when a kernel is *defined*, for the whole process, so the CPU interpreter cannot
be switched on for just this file inside a shared pytest process. Without CUDA this module therefore runs its
kernel cases in a child pytest (this same file, TRITON_INTERPRET=1, CPU tensors); the parent's own process never
defines kernels in interpreter mode. With CUDA the same cases also run natively in the parent.
"""

from __future__ import annotations

import pytest
import torch
from interpreter_support import assert_passes_under_interpreter

pytest.importorskip("triton", reason="the Triton kernel needs the `triton` package")

from lasers_dist.kernels import omp_triton  # noqa: E402
from lasers_dist.kernels.omp_triton import EPS, batch_omp_triton, triton_supported  # noqa: E402
from lasers_dist.sparse import SparseCodes, batch_omp  # noqa: E402
from lasers_dist.sparse.backend import near_tie_rows  # noqa: E402

# Whether the kernels of this process were defined under the interpreter (not merely whether the variable is
# set now: it only counts if it was set before omp_triton was first imported).
INTERPRETED = omp_triton._interpreted()
# The interpreter child runs the kernel cases on CPU tensors; the parent runs them natively where CUDA exists.
KERNEL_DEVICES = ["cpu"] if INTERPRETED else [
    pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
        not torch.cuda.is_available(), reason="no CUDA: these cases run in the CPU-interpreter child instead")])
]
TOL = 1e-5


def _dictionary(num_atoms: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    atoms = torch.randn(num_atoms, dim, generator=generator)
    return atoms / atoms.norm(dim=1, keepdim=True)


def _run_both(x: torch.Tensor, dictionary: torch.Tensor, sparsity: int, device: str):
    indices, coeffs = batch_omp_triton(x.to(device), dictionary.to(device), sparsity)
    assert indices.dtype == torch.int64 and coeffs.dtype == torch.float32
    assert indices.shape == coeffs.shape == (x.shape[0], sparsity)
    reference = batch_omp(x, dictionary, sparsity, backend="torch")
    return indices.cpu(), coeffs.cpu(), reference


def _assert_valid_codes(indices: torch.Tensor, coeffs: torch.Tensor, num_atoms: int) -> None:
    assert torch.isfinite(coeffs).all()
    assert ((indices >= 0) & (indices < num_atoms)).all()
    sorted_ids = indices.sort(dim=1).values
    assert (sorted_ids[:, 1:] != sorted_ids[:, :-1]).all(), "an atom appears twice in one row"


def _assert_matches_reference(x, dictionary, indices, coeffs, reference, max_near_tie_fraction=0.1):
    _assert_valid_codes(indices, coeffs, dictionary.shape[0])
    same = (indices == reference.indices).all(dim=1)
    near = near_tie_rows(x, dictionary, reference.indices)
    unexplained = (~same & ~near).nonzero().flatten().tolist()
    assert not unexplained, f"rows {unexplained[:10]} pick different atoms without a float64 near-tie"
    assert near.float().mean() <= max_near_tie_fraction, "too many near-ties: the test data is too degenerate"
    torch.testing.assert_close(coeffs[same], reference.coeffs[same], rtol=TOL, atol=TOL)


# (N, K, dim, S): N is never a multiple of the block (16 on GPU, the next power of two capped at 256 in the
# interpreter), K and dim are mostly not powers of two, dim < 16 needs the tl.dot padding, K = 1500 spans
# two K tiles in the interpreter (1024) and many on GPU.
SHAPES = [
    (300, 512, 16, 5),  # the paper's configuration
    (100, 77, 13, 3),
    (257, 300, 40, 8),
    (70, 1500, 24, 3),
    (33, 100, 5, 1),
    (48, 300, 32, 16),  # the largest sparsity: L is (16, 16) per signal
]


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N{}-K{}-dim{}-S{}".format(*s))
def test_random_signals_match_reference(shape, device):
    num_signals, num_atoms, dim, sparsity = shape
    generator = torch.Generator().manual_seed(sum(shape))
    dictionary = _dictionary(num_atoms, dim, generator)
    x = torch.randn(num_signals, dim, generator=generator) * 3.0
    indices, coeffs, reference = _run_both(x, dictionary, sparsity, device)
    _assert_matches_reference(x, dictionary, indices, coeffs, reference)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_duplicated_atoms_and_ties_across_tiles(device):
    # Every atom appears twice, 600 ids apart. Mathematically each pick is a tie between the two copies, but
    # a tiled GEMM may round the copies' correlations differently, so codes are compared up to the copy.
    # Zero rows tie exactly everywhere; the picks must be the lowest ids although the interpreter's second
    # K tile (ids >= 1024) also holds zeros: a later tile wins only on a strictly larger score.
    generator = torch.Generator().manual_seed(7)
    half = _dictionary(600, 16, generator)
    dictionary = torch.cat([half, half])
    x = torch.cat([torch.randn(90, 16, generator=generator), torch.zeros(2, 16)])
    indices, coeffs, reference = _run_both(x, dictionary, 5, device)
    assert indices[90:].tolist() == [[0, 1, 2, 3, 4]] * 2 == reference.indices[90:].tolist()
    assert (coeffs[90:] == 0).all()
    _assert_matches_reference(x[:90], half, indices[:90] % 600, coeffs[:90], SparseCodes(
        reference.indices[:90] % 600, reference.coeffs[:90]))


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_degenerate_rows_stop_growing_without_nan(device):
    generator = torch.Generator().manual_seed(3)
    dictionary = _dictionary(50, 12, generator)
    dictionary[1] = dictionary[0]  # zero rows tie everywhere: they pick 0, then its copy 1, and stop
    dictionary[9] = dictionary[4]
    zero_rows = torch.zeros(4, 12)
    atom_rows = torch.stack([dictionary[4], -2.5 * dictionary[4], 0.5 * dictionary[30]])  # exactly 1-sparse
    x = torch.cat([zero_rows, atom_rows])
    indices, coeffs, reference = _run_both(x, dictionary, 4, device)
    _assert_valid_codes(indices, coeffs, 50)
    # Zero rows: every pick is a tie, so the codes are fully determined, including the stop at the copy.
    assert indices[:4].tolist() == [[0, 1, 2, 3]] * 4 == reference.indices[:4].tolist()
    assert (coeffs[:4] == 0).all() and (reference.coeffs[:4] == 0).all()
    # 1-sparse rows: after the first pick the residual is rounding noise, so later atoms are arbitrary;
    # only the first atom and the coefficients (exactly 0 or noise-sized) are determined.
    assert indices[4:, 0].tolist() == reference.indices[4:, 0].tolist() == [4, 4, 30]
    torch.testing.assert_close(coeffs, reference.coeffs, rtol=TOL, atol=TOL)
    torch.testing.assert_close(reference.reconstruct(dictionary)[4:], x[4:], rtol=TOL, atol=TOL)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_sparsity_above_dim_stops_at_full_rank(device):
    # In R^3 the 4th atom is always in the span of the first three: 1 - w^T w ~ 0, so every row stops there
    # with an exact 3-atom fit and zero coefficients afterwards.
    generator = torch.Generator().manual_seed(11)
    dictionary = _dictionary(40, 3, generator)
    x = torch.randn(120, 3, generator=generator)
    indices, coeffs, reference = _run_both(x, dictionary, 5, device)
    _assert_valid_codes(indices, coeffs, 40)
    assert (coeffs[:, 3:] == 0).all()
    same = (indices[:, :3] == reference.indices[:, :3]).all(dim=1)
    assert same.float().mean() >= 0.95
    torch.testing.assert_close(coeffs[same], reference.coeffs[same], rtol=TOL, atol=TOL)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_batch_omp_dispatches_to_kernel(device):
    generator = torch.Generator().manual_seed(5)
    dictionary = _dictionary(64, 16, generator)
    x = torch.randn(40, 16, generator=generator)
    codes = batch_omp(x.to(device), dictionary.to(device), 3, backend="triton")
    indices, coeffs = batch_omp_triton(x.to(device), dictionary.to(device), 3)
    # batch_omp renormalises the atoms (exact least squares for rows a rounding error off unit norm): the
    # kernel's own output differs from it by that rounding only.
    assert torch.equal(codes.indices, indices)
    torch.testing.assert_close(codes.coeffs, coeffs, rtol=1e-6, atol=1e-6)
    empty_indices, empty_coeffs = batch_omp_triton(x[:0].to(device), dictionary.to(device), 3)
    assert empty_indices.shape == empty_coeffs.shape == (0, 3)


def test_supported_bounds():
    assert triton_supported(10, 512, 16, 5)
    assert triton_supported(0, 4096, 256, 16)
    assert not triton_supported(10, 512, 16, 17)
    assert not triton_supported(10, 4097, 16, 5)
    assert not triton_supported(10, 512, 257, 5)
    assert not triton_supported(10, 4, 16, 5)  # more atoms per signal than the dictionary has
    assert EPS == 64 * torch.finfo(torch.float32).eps


def test_bad_inputs_raise_clear_errors():
    x, dictionary = torch.randn(4, 8), torch.eye(8)
    with pytest.raises(ValueError, match="backend='torch'"):
        batch_omp_triton(x, dictionary, 17)
    with pytest.raises(TypeError, match="fp32"):
        batch_omp_triton(x.double(), dictionary.double(), 2)
    with pytest.raises(ValueError, match=r"\(K, dim\)"):
        batch_omp_triton(x, torch.eye(9), 2)


if not INTERPRETED:  # parent process only: kernels here are compiled for the GPU, never interpreted

    def test_cpu_tensors_need_interpreter():
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            batch_omp_triton(torch.randn(4, 8), torch.eye(8), 2)

    def test_kernel_cases_under_cpu_interpreter():
        assert_passes_under_interpreter(__file__)
