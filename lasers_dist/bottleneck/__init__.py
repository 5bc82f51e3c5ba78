"""Latent bottlenecks: the sparse dictionary (DL-VAE / DL-GAN) and the EMA vector quantiser (VQ baselines).

Both map z_e (B, L, H, W) -> (z_q, loss, BottleneckInfo) and offer codes(z_e) / from_codes(indices, coeffs).
"""

from lasers_dist.bottleneck.dictionary import DictionaryBottleneck
from lasers_dist.bottleneck.usage import BottleneckInfo, all_reduce_sum_, atom_usage, dead_count, perplexity
from lasers_dist.bottleneck.vq import VQBottleneck

__all__ = [
    "BottleneckInfo",
    "DictionaryBottleneck",
    "VQBottleneck",
    "all_reduce_sum_",
    "atom_usage",
    "dead_count",
    "perplexity",
]
