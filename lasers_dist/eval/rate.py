"""Bits: what a coded image costs, so that DL and VQ can be compared at equal rate.

Fixed-length codes (what `bits_per_pixel` reports):
    VQ   one code index per latent vector:              log2 K bits
    DL   an unordered support of S atoms out of K,      log2 C(K, S) bits
         plus S coefficients of b bits each:            + S b bits        (b = 32 for float coefficients)
One coded signal covers P_H x P_W latent positions (the dictionary's patch), so
    bits_per_latent = bits per coded signal / (P_H P_W)
    bits_per_pixel  = bits per coded signal x coded signals per image / (H W)      (pixels, not sub-pixels)
The entropy-coded estimate (`entropy_bits_per_pixel`, an estimate, not a codec) replaces the index bits by the
empirical entropy of atom usage (S i.i.d. draws, minus log2 S! because the order carries no information, never
above log2 C(K, S)) and, with quantized coefficients, the coefficient bits by the empirical entropy of the
quantization symbols.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from lasers_dist.bottleneck.usage import all_reduce_sum_, atom_usage, dead_count, perplexity

FLOAT_COEFF_BITS = 32


def log2_binomial(n: int, k: int) -> float:
    """log2 C(n, k) without overflow (lgamma), exact to float precision."""
    if not 0 <= k <= n:
        raise ValueError(f"C({n}, {k}) needs 0 <= k <= n")
    return (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)) / math.log(2)


@dataclass(frozen=True)
class RateSpec:
    """What one coded signal is: `kind` "dictionary" or "vq", K atoms/codes, S atoms per signal (1 for VQ),
    coefficient bits (None: float32), patch (P_H, P_W) latent positions per signal."""

    kind: str
    num_atoms: int
    sparsity: int
    coeff_bits: int | None = None
    patch: tuple[int, int] = (1, 1)

    def __post_init__(self) -> None:
        if self.kind not in ("dictionary", "vq"):
            raise ValueError(f"kind must be 'dictionary' or 'vq', got {self.kind!r}")
        if self.kind == "vq" and (self.sparsity != 1 or self.coeff_bits is not None):
            raise ValueError("a VQ code has one index and no coefficient: sparsity 1, coeff_bits None")

    @property
    def coefficient_bits(self) -> int:
        return FLOAT_COEFF_BITS if self.coeff_bits is None else self.coeff_bits

    @property
    def index_bits(self) -> float:
        if self.kind == "vq":
            return math.log2(self.num_atoms)
        return log2_binomial(self.num_atoms, self.sparsity)

    @property
    def bits_per_signal(self) -> float:
        if self.kind == "vq":
            return self.index_bits
        return self.index_bits + self.sparsity * self.coefficient_bits

    @property
    def bits_per_latent(self) -> float:
        return self.bits_per_signal / (self.patch[0] * self.patch[1])

    def bits_per_pixel(self, signals_per_image: int, image_pixels: int) -> float:
        return self.bits_per_signal * signals_per_image / image_pixels


class CoefficientQuantizer:
    """Uniform mid-tread quantizer of coefficients to `bits` bits over [-scale, scale] (zero stays exact).

    Symbols are the integers -L..L with L = 2^(bits-1) - 1 (2^bits - 1 levels, so `bits` bits each); values
    beyond the range saturate. scale is per model, taken from the data (see evaluate.calibrate_quantizer).
    """

    def __init__(self, bits: int, scale: float) -> None:
        if not 2 <= bits <= 24:
            raise ValueError(f"coefficient bits must be in [2, 24], got {bits}")
        if not (scale > 0 and math.isfinite(scale)):
            raise ValueError(f"quantizer range must be a positive finite number, got {scale}")
        self.bits, self.scale = bits, float(scale)
        self.levels = 2 ** (bits - 1) - 1
        self.step = self.scale / self.levels

    def symbols(self, coeffs: Tensor) -> Tensor:
        """coeffs (any shape) -> int64 symbols in [-L, L]."""
        return torch.round(coeffs.double().clamp(-self.scale, self.scale) / self.step).long()

    def dequantize(self, symbols: Tensor) -> Tensor:
        return symbols.to(torch.float32) * self.step

    def __call__(self, coeffs: Tensor) -> Tensor:
        """What the decoder sees: coefficients rounded to the nearest of the 2^bits - 1 levels."""
        return self.dequantize(self.symbols(coeffs))


def entropy_bits(counts: Tensor) -> float:
    """Empirical entropy (bits) of a histogram of counts; 0 for an empty one."""
    counts = counts.double()
    total = counts.sum()
    if total <= 0:
        return 0.0
    probs = counts[counts > 0] / total
    return float(-(probs * torch.log2(probs)).sum())


class CodeStatistics:
    """Atom usage over a whole evaluation (not per batch), and coefficient symbol counts when quantizing.

    update() per batch with indices / coeffs (B, S, H', W'); reduce_() sums over ranks (a collective); the
    summaries are then global. Usage counts each of the S slots whose coefficient is nonzero.
    """

    def __init__(self, num_atoms: int, device: torch.device, quantizer: CoefficientQuantizer | None = None):
        self.num_atoms, self.quantizer = num_atoms, quantizer
        self.usage = torch.zeros(num_atoms, dtype=torch.int64, device=device)
        self.totals = torch.zeros(2, dtype=torch.int64, device=device)  # coded signals, nonzero coefficients
        levels = quantizer.levels if quantizer is not None else 0
        self.symbol_counts = torch.zeros(2 * levels + 1, dtype=torch.int64, device=device)

    def update(self, indices: Tensor, coeffs: Tensor) -> None:
        self.usage += atom_usage(indices, coeffs, self.num_atoms)
        signals = indices.numel() // indices.shape[1]
        self.totals += torch.tensor([signals, int((coeffs != 0).sum())], device=self.totals.device)
        if self.quantizer is not None:
            symbols = self.quantizer.symbols(coeffs).flatten() + self.quantizer.levels
            self.symbol_counts += torch.bincount(symbols, minlength=self.symbol_counts.numel())

    def reduce_(self) -> None:
        all_reduce_sum_(self.usage)
        all_reduce_sum_(self.totals)
        all_reduce_sum_(self.symbol_counts)

    def usage_summary(self) -> dict[str, float | int]:
        """perplexity exp(H), entropy in bits, used fraction, dead atoms, mean nonzeros per coded signal."""
        signals = max(int(self.totals[0]), 1)
        return {
            "perplexity": float(perplexity(self.usage)),
            "usage_entropy_bits": entropy_bits(self.usage),
            "used_fraction": float((self.usage > 0).double().mean()),
            "dead_atoms": int(dead_count(self.usage)),
            "mean_nonzeros": int(self.totals[1]) / signals,
            "coded_signals": int(self.totals[0]),
        }

    def entropy_bits_per_signal(self, spec: RateSpec) -> float:
        """The entropy-coded estimate of one coded signal (see the module docstring)."""
        usage_bits = entropy_bits(self.usage)
        if spec.kind == "vq":
            return usage_bits
        order_free = spec.sparsity * usage_bits - math.log2(math.factorial(spec.sparsity))
        index_bits = min(max(order_free, 0.0), spec.index_bits)
        if self.quantizer is None:
            return index_bits + spec.sparsity * FLOAT_COEFF_BITS
        return index_bits + spec.sparsity * entropy_bits(self.symbol_counts)
