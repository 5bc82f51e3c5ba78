"""Batch-OMP (lasers_dist.sparse.batch_omp) against scikit-learn's OMP and float64 least squares."""

import sys

import numpy as np
import pytest
import torch
from skimage import data as skdata
from sklearn.linear_model import orthogonal_mp_gram

from lasers_dist.sparse import SparseCodes, batch_omp


def random_dictionary(num_atoms: int, dim: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    atoms = torch.randn(num_atoms, dim, generator=gen, dtype=torch.float64)
    return (atoms / atoms.norm(dim=1, keepdim=True)).to(dtype)


def sklearn_codes(x: torch.Tensor, dictionary: torch.Tensor, sparsity: int) -> np.ndarray:
    """Dense (N, K) float64 codes from sklearn's Gram-based OMP."""
    d = dictionary.double().numpy()
    gram, xy = d @ d.T, d @ x.double().numpy().T
    dense = orthogonal_mp_gram(gram, xy, n_nonzero_coefs=sparsity)
    return np.asarray(dense).reshape(d.shape[0], -1).T


def dense_codes(codes: SparseCodes, num_atoms: int) -> torch.Tensor:
    dense = torch.zeros(codes.indices.shape[0], num_atoms, dtype=torch.float64)
    return dense.scatter_add_(1, codes.indices, codes.coeffs.double())


def assert_matches_sklearn(x: torch.Tensor, dictionary: torch.Tensor, sparsity: int) -> None:
    codes = batch_omp(x, dictionary, sparsity)
    reference = sklearn_codes(x, dictionary, sparsity)
    ref_supports = [set(np.flatnonzero(row).tolist()) for row in reference]
    agree = np.array([set(idx.tolist()) == ref for idx, ref in zip(codes.indices, ref_supports)])
    assert agree.mean() >= 0.99, f"supports agree on only {agree.mean():.3f} of rows"
    ours = codes.reconstruct(dictionary)[torch.from_numpy(agree)]
    theirs = torch.from_numpy(reference[agree]) @ dictionary
    err = (ours - theirs).norm(dim=1) / theirs.norm(dim=1).clamp_min(1e-300)
    assert err.max() <= 1e-6, f"reconstruction differs from sklearn by {err.max():.3g} (relative)"


@pytest.mark.parametrize("sparsity", [1, 3, 5, 8])
@pytest.mark.parametrize("dim", [16, 64])
@pytest.mark.parametrize("num_atoms", [64, 512])
def test_matches_sklearn_random_dictionary(num_atoms, dim, sparsity):
    dictionary = random_dictionary(num_atoms, dim, seed=num_atoms + dim)
    x = torch.randn(300, dim, generator=torch.Generator().manual_seed(sparsity), dtype=torch.float64)
    assert_matches_sklearn(x, dictionary, sparsity)


def image_patches(image: np.ndarray, size: int) -> torch.Tensor:
    """Non-overlapping size x size patches (all channels), mean-removed, flat ones dropped -> (M, dim)."""
    image = image.astype(np.float64) / 255.0
    if image.ndim == 2:
        image = image[..., None]
    h, w, c = image.shape
    h, w = h - h % size, w - w % size
    patches = image[:h, :w].reshape(h // size, size, w // size, size, c).transpose(0, 2, 1, 3, 4)
    patches = torch.from_numpy(patches.reshape(-1, size * size * c).copy())
    patches = patches - patches.mean(dim=1, keepdim=True)
    return patches[patches.norm(dim=1) > 1e-3]


# A few tiny astronaut patches equal a dictionary atom exactly: sklearn stops after that atom (and warns),
# batch_omp keeps picking atoms with ~1e-17 coefficients. Those rows fall in the allowed 1% disagreement.
@pytest.mark.filterwarnings("ignore:Orthogonal matching pursuit ended prematurely")
@pytest.mark.parametrize(
    "image_name, patch_size, sparsity", [("camera", 4, 4), ("astronaut", 2, 3), ("astronaut", 2, 6)]
)
def test_matches_sklearn_on_image_patches(image_name, patch_size, sparsity):
    patches = image_patches(getattr(skdata, image_name)(), patch_size)
    gen = torch.Generator().manual_seed(7)
    order = torch.randperm(patches.shape[0], generator=gen)
    atoms = torch.unique(patches[order[:2000]], dim=0)[:256]
    dictionary = atoms / atoms.norm(dim=1, keepdim=True)
    signals = patches[order[2000:3000]]
    assert_matches_sklearn(signals, dictionary, sparsity)


@pytest.mark.parametrize("sparsity", [2, 5])
def test_residual_orthogonal_to_chosen_atoms(sparsity):
    dictionary = random_dictionary(128, 24, seed=3)
    x = torch.randn(400, 24, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    codes = batch_omp(x, dictionary, sparsity)
    residual = x - codes.reconstruct(dictionary)
    projections = torch.einsum("nsd,nd->ns", dictionary[codes.indices], residual)
    assert (projections.abs().amax(dim=1) <= 1e-8 * x.norm(dim=1)).all()
    # Least squares on the chosen support from scratch gives the same coefficients.
    support = dictionary[codes.indices]  # (N, S, dim)
    lstsq = torch.linalg.lstsq(support.transpose(1, 2), x[:, :, None]).solution.squeeze(2)
    torch.testing.assert_close(codes.coeffs, lstsq, rtol=1e-9, atol=1e-9)


def test_sparsity_one_is_best_single_atom():
    dictionary = random_dictionary(512, 16, seed=5)
    x = torch.randn(1000, 16, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    codes = batch_omp(x, dictionary, 1)
    correlations = x @ dictionary.T
    best = correlations.abs().argmax(dim=1)
    assert torch.equal(codes.indices[:, 0], best)
    torch.testing.assert_close(codes.coeffs[:, 0], correlations.gather(1, best[:, None]).squeeze(1))


def test_indices_distinct_and_dtypes():
    dictionary = random_dictionary(64, 16, seed=8, dtype=torch.float32)
    x = torch.randn(256, 16, generator=torch.Generator().manual_seed(9))
    codes = batch_omp(x, dictionary, 8)
    assert codes.indices.dtype == torch.int64 and codes.coeffs.dtype == torch.float32
    assert codes.indices.shape == codes.coeffs.shape == (256, 8)
    assert (codes.indices.sort(dim=1).values.diff(dim=1) > 0).all()
    codes64 = batch_omp(x.double(), dictionary.double(), 8)
    assert codes64.coeffs.dtype == torch.float64
    agree = (codes.indices == codes64.indices).all(dim=1)
    assert agree.float().mean() >= 0.99
    torch.testing.assert_close(codes.coeffs[agree].double(), codes64.coeffs[agree], rtol=1e-3, atol=1e-4)


def test_duplicated_atoms_zero_rows_and_rank_deficiency_stay_finite():
    base = random_dictionary(8, 4, seed=10)
    dictionary = torch.cat([base, base, -base])  # every direction three times
    x = torch.randn(50, 4, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    x[::7] = 0.0
    x[3] = 2.5 * base[5]  # exactly one atom
    codes = batch_omp(x, dictionary, 8)  # S = 8 > dim = 4: the support saturates the space
    assert torch.isfinite(codes.coeffs).all()
    assert (codes.coeffs[::7] == 0).all()
    torch.testing.assert_close(codes.reconstruct(dictionary), x, rtol=0, atol=1e-10)
    # A stopped row's later slots carry coefficient 0 and indices stay distinct.
    assert (codes.coeffs[:, 4:] == 0).all()
    assert (codes.indices.sort(dim=1).values.diff(dim=1) > 0).all()
    # The chosen atoms' directions are distinct (no atom and its duplicate in one support).
    assert torch.equal(codes.indices[3, 0] % 8, torch.tensor(5))
    assert (codes.coeffs[3, 1:] == 0).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_input_returns_input_dtype(dtype):
    dictionary = random_dictionary(128, 16, seed=12, dtype=torch.float32)
    x = torch.randn(300, 16, generator=torch.Generator().manual_seed(13)).to(dtype)
    codes = batch_omp(x, dictionary, 5)
    assert codes.coeffs.dtype == dtype and codes.indices.dtype == torch.int64
    reference = batch_omp(x.float(), dictionary, 5)
    assert torch.equal(codes.indices, reference.indices)
    assert torch.equal(codes.coeffs, reference.coeffs.to(dtype))


def test_empty_batch():
    dictionary = random_dictionary(32, 8, seed=23)
    codes = batch_omp(torch.empty(0, 8, dtype=torch.float64), dictionary, 3)
    assert codes.indices.shape == codes.coeffs.shape == (0, 3)
    assert codes.reconstruct(dictionary).shape == (0, 8)


def test_chunking_invariance():
    dictionary = random_dictionary(96, 16, seed=14)
    x = torch.randn(201, 16, generator=torch.Generator().manual_seed(15), dtype=torch.float64)
    whole = batch_omp(x, dictionary, 6)
    chunked = batch_omp(x, dictionary, 6, chunk_size=7)
    assert torch.equal(whole.indices, chunked.indices)
    torch.testing.assert_close(whole.coeffs, chunked.coeffs, rtol=1e-12, atol=1e-12)


def test_reconstruct_matches_dense_codes_and_is_differentiable():
    dictionary = random_dictionary(64, 16, seed=16, dtype=torch.float32)
    x = torch.randn(128, 16, generator=torch.Generator().manual_seed(17), requires_grad=True)
    codes = batch_omp(x, dictionary, 4)
    assert not codes.coeffs.requires_grad
    dense = torch.zeros(128, 64).scatter_(1, codes.indices, codes.coeffs)
    torch.testing.assert_close(codes.reconstruct(dictionary), dense @ dictionary)
    trainable = dictionary.clone().requires_grad_(True)
    codes.reconstruct(trainable).sum().backward()
    expected = dense.T @ torch.ones(128, 16)
    torch.testing.assert_close(trainable.grad, expected)


def test_non_finite_rows_are_counted():
    dictionary = random_dictionary(32, 8, seed=18)
    x = torch.randn(10, 8, dtype=torch.float64)
    x[2, 3] = float("nan")
    x[7, 0] = float("inf")
    with pytest.raises(ValueError, match="2 of 10 rows"):
        batch_omp(x, dictionary, 2)


@pytest.mark.parametrize(
    "x_shape, dict_shape, sparsity, message",
    [
        ((10,), (32, 8), 2, "x must be a floating \\(N, dim\\)"),
        ((2, 10, 8), (32, 8), 2, "x must be a floating \\(N, dim\\)"),
        ((10, 8), (32, 8, 1), 2, "dictionary must be a floating \\(K, dim\\)"),
        ((10, 6), (32, 8), 2, "6 features per signal .* dim 8"),
        ((10, 8), (32, 8), 0, "sparsity must be an int in \\[1, K=32\\]"),
        ((10, 8), (32, 8), 33, "sparsity must be an int in \\[1, K=32\\]"),
    ],
)
def test_bad_shapes_and_sparsity(x_shape, dict_shape, sparsity, message):
    dictionary = torch.randn(*dict_shape, dtype=torch.float64)
    dictionary = dictionary / dictionary.norm(dim=-1, keepdim=True)
    with pytest.raises(ValueError, match=message):
        batch_omp(torch.randn(*x_shape, dtype=torch.float64), dictionary, sparsity)


def test_non_unit_norm_dictionary_and_bad_options():
    dictionary = random_dictionary(32, 8, seed=19)
    x = torch.randn(10, 8, dtype=torch.float64)
    scaled = dictionary.clone()
    scaled[[4, 9]] *= 1.01
    with pytest.raises(ValueError, match="2 of 32 do not \\(atom 4 has norm 1.01"):
        batch_omp(x, scaled, 2)
    broken = dictionary.clone()
    broken[3, 0] = float("nan")
    with pytest.raises(ValueError, match="1 of 32 do not \\(atom 3 has norm nan"):
        batch_omp(x, broken, 2)
    with pytest.raises(ValueError, match="backend must be one of"):
        batch_omp(x, dictionary, 2, backend="cuda")
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        batch_omp(x, dictionary, 2, chunk_size=0)
    with pytest.raises(TypeError, match="torch tensors"):
        batch_omp(x.numpy(), dictionary, 2)
    with pytest.raises(ValueError, match="x must be a floating"):
        batch_omp(x.long(), dictionary, 2)


def test_triton_backend_unavailable(monkeypatch):
    # A None entry in sys.modules makes the import raise ImportError, as when triton is not installed.
    monkeypatch.setitem(sys.modules, "lasers_dist.kernels.omp_triton", None)
    dictionary = random_dictionary(32, 8, seed=20, dtype=torch.float32)
    x = torch.randn(10, 8)
    with pytest.raises(RuntimeError, match="backend='triton' was requested"):
        batch_omp(x, dictionary, 2, backend="triton")
    auto, torch_codes = batch_omp(x, dictionary, 2), batch_omp(x, dictionary, 2, backend="torch")
    assert torch.equal(auto.indices, torch_codes.indices) and torch.equal(auto.coeffs, torch_codes.coeffs)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_torch_backend_on_cuda_matches_cpu():
    dictionary = random_dictionary(256, 16, seed=21)
    x = torch.randn(2000, 16, generator=torch.Generator().manual_seed(22), dtype=torch.float64)
    cpu = batch_omp(x, dictionary, 5, backend="torch")
    gpu = batch_omp(x.cuda(), dictionary.cuda(), 5, backend="torch")
    assert gpu.indices.is_cuda and gpu.coeffs.dtype == torch.float64
    assert (gpu.indices.cpu() == cpu.indices).all(dim=1).float().mean() >= 0.99


def test_atoms_within_the_norm_tolerance_still_get_least_squares_coefficients() -> None:
    """Rows a hair off unit norm (accepted) must not bias the coefficients: the fit is exact on the atoms given."""
    gen = torch.Generator().manual_seed(5)
    unit = torch.randn(64, 16, generator=gen, dtype=torch.float64)
    unit /= unit.norm(dim=1, keepdim=True)
    dictionary = unit * (1 + 9e-4 * torch.rand(64, 1, generator=gen, dtype=torch.float64))
    x = torch.randn(200, 16, generator=gen, dtype=torch.float64)
    codes = batch_omp(x, dictionary, 4)
    residual = x - codes.reconstruct(dictionary)
    chosen = dictionary[codes.indices]  # (N, S, dim)
    assert torch.einsum("nsd,nd->ns", chosen, residual).abs().max() < 1e-10
    reference = batch_omp(x, unit, 4)
    torch.testing.assert_close(codes.indices, reference.indices)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dim", [2, 3, 16, 64, 256])
def test_half_precision_dictionary_normalised_in_its_own_dtype_is_accepted(dtype, dim):
    """Rows normalised in bf16 / fp16 are up to ~1.5 machine epsilons off unit norm (bf16: 2^-7): accepted, and
    the coefficients are the least-squares fit on the atoms as given."""
    gen = torch.Generator().manual_seed(dim)
    raw = (torch.randn(512, dim, generator=gen) * 7).to(dtype)
    x = torch.randn(100, dim, generator=gen)
    for dictionary in (raw / raw.norm(dim=1, keepdim=True), torch.nn.functional.normalize(raw, dim=1)):
        # bf16 rows are always further off than the old fixed 1e-3 tolerance; fp16 rows sometimes are.
        off = (dictionary.double().norm(dim=1) - 1).abs().max()
        assert dictionary.dtype == dtype and off > (1e-3 if dtype == torch.bfloat16 else 1e-4)
        codes = batch_omp(x, dictionary, min(3, dim))
        assert codes.coeffs.dtype == torch.float32 and torch.isfinite(codes.coeffs).all()
        atoms = dictionary.float()[codes.indices]  # (N, S, dim)
        residual = x - torch.einsum("ns,nsd->nd", codes.coeffs, atoms)
        assert torch.einsum("nsd,nd->ns", atoms, residual).abs().max() < 1e-4 * x.norm(dim=1).max()


@pytest.mark.parametrize("dtype, off", [(torch.bfloat16, 1.05), (torch.bfloat16, 0.95), (torch.float16, 1.01),
                                        (torch.float32, 1.002)])
def test_rows_really_off_unit_norm_are_rejected_in_every_dtype(dtype, off):
    dictionary = random_dictionary(32, 16, seed=24, dtype=torch.float32)
    dictionary[5] *= off
    with pytest.raises(ValueError, match=rf"tolerance .* for {dtype}\); 1 of 32 do not \(atom 5 has norm"):
        batch_omp(torch.randn(4, 16), dictionary.to(dtype), 2)
