"""DictionaryBottleneck, VQBottleneck, usage statistics and the online (BCD) dictionary update, single process."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lasers_dist.bottleneck import DictionaryBottleneck, VQBottleneck, atom_usage, dead_count, perplexity
from lasers_dist.bottleneck.dictionary import from_signals, to_signals
from lasers_dist.sparse import OnlineDictionaryStats, batch_omp, batch_statistics, bcd_update
from lasers_dist.sparse.online import forgetting_factor, surrogate_objective


def _latents(seed, shape=(2, 4, 4, 6)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_gradients_reach_encoder_and_dictionary():
    torch.manual_seed(0)
    bottleneck = DictionaryBottleneck(num_atoms=32, embed_dim=4, sparsity=2, omp_backend="torch")
    z_e = _latents(1).requires_grad_(True)
    z_q, loss, info = bottleneck(z_e)
    upstream = torch.randn_like(z_q)
    (z_q * upstream).sum().backward(retain_graph=True)
    # Straight-through: the decoder's gradient reaches z_e unchanged, and none of it reaches the dictionary.
    torch.testing.assert_close(z_e.grad, upstream)
    assert bottleneck.dictionary.grad is None
    z_e.grad = None
    loss.backward()
    assert z_e.grad.abs().sum() > 0
    grad_norms = bottleneck.dictionary.grad.norm(dim=1)
    used = info.usage > 0
    assert (grad_norms[used] > 0).all() and (grad_norms[~used] == 0).all()
    # Atoms are normalised in forward, so the parameter's norm may drift without changing the bottleneck.
    with torch.no_grad():
        bottleneck.dictionary.mul_(torch.rand(32, 1) + 0.5)
    torch.testing.assert_close(bottleneck(z_e)[0], z_q)


def test_patch_signals_are_unfolded_patches():
    z = _latents(2, (2, 3, 4, 6))
    signals = to_signals(z, (2, 2))
    unfolded = F.unfold(z, kernel_size=2, stride=2).transpose(1, 2).reshape(-1, 12)  # (L, P_H, P_W) order
    assert torch.equal(signals, unfolded)
    assert torch.equal(from_signals(signals, 2, 3, (2, 3), (2, 2)), z)

    torch.manual_seed(0)
    bottleneck = DictionaryBottleneck(num_atoms=20, embed_dim=3, sparsity=3, patch_size=(2, 2), omp_backend="torch")
    assert bottleneck.code_dim == 12 and bottleneck.dictionary.shape == (20, 12)
    indices, coeffs = bottleneck.codes(z)
    assert indices.shape == (2, 3, 2, 3) and indices.dtype == torch.int64
    expected = batch_omp(unfolded, bottleneck.unit_atoms(), 3, backend="torch")
    assert torch.equal(indices.permute(0, 2, 3, 1).reshape(-1, 3), expected.indices)
    torch.testing.assert_close(coeffs.permute(0, 2, 3, 1).reshape(-1, 3), expected.coeffs)


def test_bad_shapes_raise():
    bottleneck = DictionaryBottleneck(num_atoms=8, embed_dim=3, sparsity=2, patch_size=(2, 2))
    with pytest.raises(ValueError, match=r"5x6.*2x2"):
        bottleneck(torch.randn(1, 3, 5, 6))
    with pytest.raises(ValueError, match="L=3"):
        bottleneck(torch.randn(1, 4, 4, 4))
    with pytest.raises(ValueError, match="sparsity"):
        DictionaryBottleneck(num_atoms=8, embed_dim=2, sparsity=3)
    with pytest.raises(ValueError, match="update"):
        DictionaryBottleneck(num_atoms=8, embed_dim=2, sparsity=1, update="sgd")


def test_sparsity_one_is_assignment_by_absolute_correlation():
    torch.manual_seed(0)
    bottleneck = DictionaryBottleneck(num_atoms=16, embed_dim=5, sparsity=1, omp_backend="torch")
    z = _latents(3, (2, 5, 3, 3))
    indices, coeffs = bottleneck.codes(z)
    correlations = to_signals(z, (1, 1)) @ bottleneck.unit_atoms().T  # (N, K)
    best = correlations.abs().argmax(dim=1)
    assert torch.equal(indices.reshape(-1), best)  # (B, 1, H, W) flattens in signal order
    torch.testing.assert_close(coeffs.reshape(-1), correlations.gather(1, best[:, None]).squeeze(1))


def test_perplexity_and_dead_counts():
    num_atoms = 8
    uniform = atom_usage(torch.arange(32) % num_atoms, torch.ones(32), num_atoms)
    assert torch.equal(uniform, torch.full((num_atoms,), 4))
    torch.testing.assert_close(perplexity(uniform), torch.tensor(float(num_atoms)))
    single = atom_usage(torch.full((10,), 3), torch.ones(10), num_atoms)
    torch.testing.assert_close(perplexity(single), torch.tensor(1.0))
    assert int(dead_count(single)) == num_atoms - 1
    # Zero coefficients (Batch-OMP padding after an exact fit) are not selections.
    padded = atom_usage(torch.tensor([[0, 1], [2, 3]]), torch.tensor([[1.0, 0.0], [0.5, -2.0]]), num_atoms)
    assert padded.tolist() == [1, 0, 1, 1, 0, 0, 0, 0]


def test_from_codes_of_codes_is_z_hat():
    torch.manual_seed(0)
    z = _latents(4, (2, 3, 4, 4))
    dictionary = DictionaryBottleneck(num_atoms=24, embed_dim=3, sparsity=3, patch_size=(1, 2), omp_backend="torch")
    vq = VQBottleneck(num_codes=12, embed_dim=3)
    for bottleneck in (dictionary, vq):
        bottleneck.eval()
        z_q, _, info = bottleneck(z)
        indices, coeffs = bottleneck.codes(z)
        assert torch.equal(indices, info.indices) and torch.equal(coeffs, info.coeffs)
        torch.testing.assert_close(bottleneck.from_codes(indices, coeffs), z_q, rtol=1e-5, atol=1e-6)
    assert vq.codes(z)[0].shape == (2, 1, 4, 4)


def test_eval_forward_changes_no_state():
    torch.manual_seed(0)
    online = DictionaryBottleneck(num_atoms=16, embed_dim=4, sparsity=2, update="online", omp_backend="torch")
    vq = VQBottleneck(num_codes=8, embed_dim=4)
    for bottleneck in (online, vq):
        before = {k: v.clone() for k, v in bottleneck.state_dict().items()}
        bottleneck.eval()(_latents(5))
        assert all(torch.equal(before[k], v) for k, v in bottleneck.state_dict().items())


def test_batch_statistics_and_forgetting_schedule():
    gen = torch.Generator().manual_seed(6)
    num_atoms, dim = 7, 3
    signals = torch.randn(10, dim, generator=gen)
    indices = torch.stack([torch.randperm(num_atoms, generator=gen)[:2] for _ in range(10)])
    coeffs = torch.randn(10, 2, generator=gen)
    dense = torch.zeros(10, num_atoms).scatter_(1, indices, coeffs)  # gamma as rows
    a_inc, b_inc = batch_statistics(signals, indices, coeffs, num_atoms)
    torch.testing.assert_close(a_inc, dense.T @ dense)
    torch.testing.assert_close(b_inc, signals.T @ dense)

    # beta_t = (theta + 1 - xi) / (theta + 1), theta = t xi if t < xi else xi^2 + t - xi
    assert float(forgetting_factor(1, 4)) == pytest.approx(1 / 5)
    assert float(forgetting_factor(2, 4)) == pytest.approx(5 / 9)  # theta = 8
    assert float(forgetting_factor(5, 4)) == pytest.approx(14 / 18)  # theta = 16 + 5 - 4 = 17
    stats = OnlineDictionaryStats(num_atoms, dim)
    stats.mix_(a_inc, b_inc, torch.tensor(4.0))
    stats.mix_(2 * a_inc, 2 * b_inc, torch.tensor(4.0))
    assert int(stats.t) == 2
    torch.testing.assert_close(stats.A, (5 / 9 * 1 + 2) * a_inc)  # first beta multiplies zeros
    torch.testing.assert_close(stats.B, (5 / 9 * 1 + 2) * b_inc)


def _bcd_reference(dictionary_rows, a, b):
    """Eqs. 27-28 transcribed literally in float64 with the paper's (dim, K) column layout."""
    d = dictionary_rows.double().numpy().T.copy()
    a, b = a.double().numpy(), b.double().numpy()
    for j in range(d.shape[1]):
        if a[j, j] == 0:
            continue
        u = (b[:, j] - d @ a[:, j] + d[:, j] * a[j, j]) / a[j, j]
        d[:, j] = u / np.linalg.norm(u)
    return torch.from_numpy(d.T.copy())


def test_bcd_pass_descends_and_matches_float64_reference():
    gen = torch.Generator().manual_seed(7)
    num_atoms, dim, sparsity = 24, 6, 3
    truth = F.normalize(torch.randn(num_atoms, dim, generator=gen), dim=1)
    dictionary = F.normalize(truth + 0.5 * torch.randn(num_atoms, dim, generator=gen), dim=1)
    signals = torch.randn(200, 4, generator=gen) @ truth[:4] + 0.01 * torch.randn(200, dim, generator=gen)
    codes = batch_omp(signals, dictionary[:20], sparsity, backend="torch")  # atoms 20..23 stay unused
    a, b = batch_statistics(signals, codes.indices, codes.coeffs, num_atoms)
    unused = a.diagonal() == 0
    assert unused[20:].all()

    updated = bcd_update(dictionary, a, b)
    assert surrogate_objective(updated, a, b) < surrogate_objective(dictionary, a, b) - 1e-3
    torch.testing.assert_close(updated.double(), _bcd_reference(dictionary, a, b), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(updated.norm(dim=1), torch.ones(num_atoms))
    assert torch.equal(updated[unused], dictionary[unused])


def test_online_bottleneck_updates_dictionary_in_training_forward():
    torch.manual_seed(0)
    bottleneck = DictionaryBottleneck(num_atoms=16, embed_dim=4, sparsity=2, update="online", omp_backend="torch")
    assert not bottleneck.dictionary.requires_grad
    assert {"online.A", "online.B", "online.t", "dictionary"} <= set(bottleneck.state_dict())
    z = _latents(8)
    before = bottleneck.unit_atoms()
    signals = to_signals(z, (1, 1))
    codes = batch_omp(signals, before, 2, backend="torch")
    a, b = batch_statistics(signals, codes.indices, codes.coeffs, 16)
    bottleneck(z)
    assert int(bottleneck.online.t) == 1
    torch.testing.assert_close(bottleneck.online.A, a)  # beta_1 multiplies the zero initial statistics
    torch.testing.assert_close(bottleneck.dictionary, bcd_update(before, a, b))
    torch.testing.assert_close(bottleneck.dictionary.norm(dim=1), torch.ones(16))


def test_vq_ema_moves_codes_toward_assigned_means():
    vq = VQBottleneck(num_codes=3, embed_dim=2, ema_decay=0.9, eps=1e-5)
    vq.codebook.copy_(torch.tensor([[0.0, 0.0], [10.0, 0.0], [50.0, 50.0]]))
    vq.ema_embed_sum.copy_(vq.codebook)
    gen = torch.Generator().manual_seed(9)
    cluster_a = torch.tensor([1.0, 1.0]) + 0.1 * torch.randn(6, 2, generator=gen)
    cluster_b = torch.tensor([9.0, -1.0]) + 0.1 * torch.randn(10, 2, generator=gen)
    signals = torch.cat([cluster_a, cluster_b])
    z = signals.T.reshape(1, 2, 4, 4)  # 16 latent vectors, in to_signals order
    _, loss, info = vq(z)
    assert info.indices.reshape(-1).tolist() == [0] * 6 + [1] * 10
    assert info.usage.tolist() == [6, 10, 0]
    sizes = 0.9 * torch.ones(3) + 0.1 * torch.tensor([6.0, 10.0, 0.0])
    sums = 0.9 * torch.tensor([[0.0, 0.0], [10.0, 0.0], [50.0, 50.0]])
    sums[0] += 0.1 * cluster_a.sum(0)
    sums[1] += 0.1 * cluster_b.sum(0)
    smoothed = (sizes + 1e-5) / (sizes.sum() + 3e-5) * sizes.sum()
    torch.testing.assert_close(vq.codebook, sums / smoothed[:, None])
    torch.testing.assert_close(vq.ema_cluster_size, sizes)
    for code, cluster in ((0, cluster_a), (1, cluster_b)):
        old = torch.tensor([[0.0, 0.0], [10.0, 0.0]])[code]
        assert (vq.codebook[code] - cluster.mean(0)).norm() < (old - cluster.mean(0)).norm()
    torch.testing.assert_close(loss, 0.25 * F.mse_loss(signals, torch.tensor([[0.0, 0.0]] * 6 + [[10.0, 0.0]] * 10)))


def test_vq_laplace_smoothing_keeps_unused_codes_finite():
    vq = VQBottleneck(num_codes=4, embed_dim=2, ema_decay=0.5)
    vq.codebook.copy_(torch.tensor([[10.0, 10.0], [11.0, 10.0], [10.0, 11.0], [-100.0, -100.0]]))
    vq.ema_embed_sum.copy_(vq.codebook)
    z = 10 + torch.rand(1, 2, 4, 4, generator=torch.Generator().manual_seed(10))
    for _ in range(200):  # 0.5^200 underflows fp32: code 3's raw EMA size becomes exactly 0
        _, _, info = vq(z)
        assert info.usage[3] == 0
    assert vq.ema_cluster_size[3] == 0
    assert (vq.smoothed_cluster_size() > 0).all()
    assert torch.isfinite(vq.codebook).all()
    torch.testing.assert_close(vq.smoothed_cluster_size().sum(), vq.ema_cluster_size.sum())


def test_vq_gradients_are_straight_through_plus_commitment():
    vq = VQBottleneck(num_codes=8, embed_dim=4, beta=0.25)
    z_e = _latents(11).requires_grad_(True)
    z_q, loss, _ = vq(z_e)
    z_q.sum().backward(retain_graph=True)
    torch.testing.assert_close(z_e.grad, torch.ones_like(z_e))
    z_e.grad = None
    loss.backward()
    torch.testing.assert_close(z_e.grad, 0.25 * 2 * (z_e - z_q).detach() / z_e.numel())


def test_revival_replaces_unused_codes_and_atoms_with_batch_signals():
    torch.manual_seed(0)
    z = _latents(12, (2, 4, 3, 3))
    signals = to_signals(z, (1, 1))

    vq = VQBottleneck(num_codes=6, embed_dim=4, revive_dead_every=2)
    vq.codebook[3:] += 1000.0  # never nearest
    vq.ema_embed_sum.copy_(vq.codebook)
    vq(z)
    assert (vq.codebook[3:] > 500).all()  # not due yet
    vq(z)
    for row in vq.codebook[3:]:
        assert (signals - row).abs().amax(dim=1).min() == 0  # an actual batch vector
    assert int(vq.usage_window.sum()) == 0 and torch.equal(vq.ema_cluster_size[3:], torch.ones(3))

    online = DictionaryBottleneck(16, 4, 1, update="online", revive_dead_every=1, omp_backend="torch")
    online(z)
    revived = online.online.A.diagonal() == 0
    assert revived.any()
    normalised = F.normalize(signals, dim=1)
    for row in online.dictionary[revived]:
        assert torch.isclose(normalised @ row, torch.tensor(1.0)).any()
    assert torch.equal(online.online.B[:, revived], torch.zeros(4, int(revived.sum())))

    gradient = DictionaryBottleneck(64, 4, 1, revive_dead_every=1, omp_backend="torch")
    gradient(z)
    assert gradient.revival_due
    dead = gradient.usage_window == 0
    number = gradient.revive_dead()
    assert int(number) == int(dead.sum()) > 0 and not gradient.revival_due
    for row in gradient.dictionary[dead]:
        assert torch.isclose(normalised @ row, torch.tensor(1.0)).any()


def test_revival_schedule_survives_state_dict_round_trip():
    torch.manual_seed(0)
    original = VQBottleneck(num_codes=32, embed_dim=4, revive_dead_every=3)
    for step in range(2):
        original(_latents(20 + step))
    restored = VQBottleneck(num_codes=32, embed_dim=4, revive_dead_every=3)
    restored(_latents(99))  # its host step counter must be reset by loading
    restored.load_state_dict(original.state_dict())
    for module in (original, restored):
        module(_latents(22))  # third training forward: revival due for both
    assert int(original.usage_window.sum()) == 0
    for key, value in original.state_dict().items():
        assert torch.equal(value, restored.state_dict()[key]), key
