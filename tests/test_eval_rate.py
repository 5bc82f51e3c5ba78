"""Rate arithmetic (VQ and DL, patches, coefficient bits), the quantizer, usage statistics, the sparsity hook."""

from __future__ import annotations

import math

import pytest
import torch

from lasers_dist.bottleneck import DictionaryBottleneck
from lasers_dist.config import config_from_dict
from lasers_dist.eval.rate import CodeStatistics, CoefficientQuantizer, RateSpec, entropy_bits, log2_binomial
from lasers_dist.models import build_autoencoder
from lasers_dist.sparse import batch_omp


def test_log2_binomial_is_exact() -> None:
    for n, k in [(512, 5), (64, 1), (256, 4), (10, 10), (7, 0)]:
        assert log2_binomial(n, k) == pytest.approx(math.log2(math.comb(n, k)), abs=1e-9)
    with pytest.raises(ValueError):
        log2_binomial(4, 5)


def test_vq_rate() -> None:
    spec = RateSpec("vq", 512, 1)
    assert spec.bits_per_signal == 9.0 and spec.bits_per_latent == 9.0
    # 256x256 image, light encoder (factor 4): 64x64 latents of 9 bits each.
    assert spec.bits_per_pixel(64 * 64, 256 * 256) == pytest.approx(9 * 4096 / 65536)
    with pytest.raises(ValueError, match="one index"):
        RateSpec("vq", 512, 1, coeff_bits=8)


def test_dictionary_rate_with_float_and_quantized_coefficients_and_patches() -> None:
    support = math.log2(math.comb(512, 5))
    spec = RateSpec("dictionary", 512, 5)
    assert spec.bits_per_signal == pytest.approx(support + 5 * 32)
    quantized = RateSpec("dictionary", 512, 5, coeff_bits=8)
    assert quantized.bits_per_signal == pytest.approx(support + 40)
    # 2x2 patches: one coded signal covers 4 latent positions; a 64x64 latent map holds 32x32 signals.
    patched = RateSpec("dictionary", 512, 5, coeff_bits=8, patch=(2, 2))
    assert patched.bits_per_latent == pytest.approx((support + 40) / 4)
    assert patched.bits_per_pixel(32 * 32, 256 * 256) == pytest.approx((support + 40) * 1024 / 65536)
    assert patched.bits_per_pixel(32 * 32, 256 * 256) == pytest.approx(patched.bits_per_latent * 4096 / 65536)


def test_quantizer_levels_zero_saturation_and_error() -> None:
    q = CoefficientQuantizer(bits=4, scale=2.0)
    assert q.levels == 7 and q.step == pytest.approx(2.0 / 7)
    coeffs = torch.linspace(-3.0, 3.0, 1001)
    symbols = q.symbols(coeffs)
    assert symbols.min() == -7 and symbols.max() == 7  # 15 levels: fits in 4 bits
    assert len(torch.unique(symbols)) <= 2**4 - 1
    assert q(torch.zeros(3)).tolist() == [0.0, 0.0, 0.0]  # padding atoms (coefficient 0) stay exactly 0
    inside = coeffs.abs() <= 2.0
    assert (q(coeffs)[inside] - coeffs[inside]).abs().max() <= q.step / 2 + 1e-6
    assert q(torch.tensor([5.0, -5.0])).tolist() == pytest.approx([2.0, -2.0])  # saturates at the range
    with pytest.raises(ValueError):
        CoefficientQuantizer(bits=1, scale=1.0)
    with pytest.raises(ValueError):
        CoefficientQuantizer(bits=8, scale=0.0)


def test_code_statistics_count_every_slot_and_estimate_entropy() -> None:
    indices = torch.tensor([[0, 1], [0, 2], [0, 1], [3, 0]]).T.reshape(1, 2, 2, 2)  # 4 signals, S = 2
    coeffs = torch.ones(1, 2, 2, 2)
    coeffs[0, 1, 1, 1] = 0.0  # a padding atom: not used
    stats = CodeStatistics(num_atoms=6, device=torch.device("cpu"))
    stats.update(indices, coeffs)
    assert stats.usage.tolist() == [3, 2, 1, 1, 0, 0]
    summary = stats.usage_summary()
    probs = torch.tensor([3, 2, 1, 1]) / 7
    assert summary["perplexity"] == pytest.approx(math.exp(-(probs * probs.log()).sum().item()), rel=1e-6)
    assert summary["used_fraction"] == pytest.approx(4 / 6) and summary["dead_atoms"] == 2
    assert summary["mean_nonzeros"] == pytest.approx(7 / 4) and summary["coded_signals"] == 4
    assert summary["usage_entropy_bits"] == pytest.approx(entropy_bits(torch.tensor([3, 2, 1, 1])))
    # DL estimate: 2 i.i.d. draws minus log2 2! for the order, capped at log2 C(6, 2); float coefficients cost 32.
    spec = RateSpec("dictionary", 6, 2)
    expected_index = min(2 * summary["usage_entropy_bits"] - 1.0, log2_binomial(6, 2))
    assert stats.entropy_bits_per_signal(spec) == pytest.approx(expected_index + 64)
    vq = CodeStatistics(num_atoms=4, device=torch.device("cpu"))
    vq.update(torch.tensor([0, 0, 1, 2]).view(1, 1, 2, 2), torch.ones(1, 1, 2, 2))
    assert vq.entropy_bits_per_signal(RateSpec("vq", 4, 1)) == pytest.approx(1.5)


def test_quantized_symbol_entropy_enters_the_estimate() -> None:
    q = CoefficientQuantizer(bits=3, scale=1.0)
    stats = CodeStatistics(num_atoms=4, device=torch.device("cpu"), quantizer=q)
    indices = torch.tensor([0, 1, 2, 3]).view(1, 1, 2, 2)
    coeffs = torch.tensor([1.0, -1.0, 1.0, -1.0]).view(1, 1, 2, 2)  # two symbols, equally often: 1 bit
    stats.update(indices, coeffs)
    spec = RateSpec("dictionary", 4, 1, coeff_bits=3)
    assert stats.entropy_bits_per_signal(spec) == pytest.approx(2.0 + 1.0)  # uniform usage 2 bits + 1 bit


def test_sparsity_hook_codes_with_fewer_atoms() -> None:
    torch.manual_seed(0)
    bottleneck = DictionaryBottleneck(num_atoms=16, embed_dim=4, sparsity=3).eval()
    latents = torch.randn(2, 4, 3, 3)
    indices, coeffs = bottleneck.codes(latents, sparsity=2)
    assert indices.shape == (2, 2, 3, 3)
    signals = latents.permute(0, 2, 3, 1).reshape(-1, 4)
    expected = batch_omp(signals, bottleneck.unit_atoms().detach(), 2)
    torch.testing.assert_close(indices.permute(0, 2, 3, 1).reshape(-1, 2), expected.indices)
    torch.testing.assert_close(bottleneck.from_codes(indices, coeffs).permute(0, 2, 3, 1).reshape(-1, 4),
                               expected.reconstruct(bottleneck.unit_atoms().detach()))
    assert bottleneck.codes(latents)[0].shape[1] == 3  # the trained S by default
    with pytest.raises(ValueError, match="sparsity"):
        bottleneck.codes(latents, sparsity=5)  # more atoms than the 4 signal dimensions
    vq = build_autoencoder(config_from_dict({"model": {"bottleneck": "vq", "num_atoms": 8, "embed_dim": 4,
                                                        "hidden_channels": 8, "norm_groups": 4}}).model).eval()
    with pytest.raises(ValueError, match="dictionary"):
        vq.encode(torch.zeros(1, 3, 8, 8), sparsity=1)
