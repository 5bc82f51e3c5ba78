"""VQBottleneck: the VQ-VAE / VQ-GAN baseline with an EMA codebook (van den Oord et al. 2017, appendix).

Each latent vector z (one row of z_e's (B H W, L) view) is replaced by its nearest code e_k (squared distance);
loss = beta ||z_e - sg[e]||^2 (the codebook term of VQ-VAE is replaced by the EMA update), z_q = z_e + sg[e - z_e].
In training mode the codebook follows the assigned vectors by exponential moving averages of the cluster sizes
N_k and cluster sums m_k, summed over ranks first so all ranks keep one codebook:

    N_k <- decay N_k + (1 - decay) n_k,   m_k <- decay m_k + (1 - decay) sum_{z -> k} z,
    e_k = m_k / N~_k,   N~_k = (N_k + eps) / (sum N + K eps) * sum N      (Laplace smoothing: N~_k > 0)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lasers_dist.bottleneck.dictionary import codes_to_grid, from_signals, grid_to_codes, patch_grid, to_signals
from lasers_dist.bottleneck.usage import BottleneckInfo, all_reduce_sum_, replacement_rows, usage_info

_PATCH = (1, 1)


class VQBottleneck(nn.Module):
    """Vector quantiser with an EMA codebook (a buffer, never a parameter); S = 1, coefficients 1.

    num_codes K, embed_dim L, beta the commitment weight, ema_decay, eps the Laplace smoothing constant,
    revive_dead_every: every that many training forwards, codes unused since the last revival are replaced by
    vectors of the current batch (0 = never). Training forwards update the codebook and issue collectives: run
    them once per micro-batch on every rank in lockstep. Eval forwards change nothing and communicate nothing.
    """

    def __init__(
        self,
        num_codes: int,
        embed_dim: int,
        beta: float = 0.25,
        ema_decay: float = 0.99,
        eps: float = 1e-5,
        revive_dead_every: int = 0,
    ) -> None:
        super().__init__()
        if num_codes < 1 or embed_dim < 1:
            raise ValueError(f"num_codes and embed_dim must be >= 1, got {num_codes} and {embed_dim}")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
        if revive_dead_every < 0:
            raise ValueError(f"revive_dead_every must be >= 0 (0 = off), got {revive_dead_every}")
        self.num_codes = self.num_atoms = num_codes  # num_atoms: the name shared with DictionaryBottleneck
        self.embed_dim, self.sparsity = embed_dim, 1
        self.beta, self.ema_decay, self.eps, self.revive_dead_every = beta, ema_decay, eps, revive_dead_every
        codebook = torch.randn(num_codes, embed_dim)
        self.register_buffer("codebook", codebook)
        # Every code starts as one pseudo-observation of itself (N_k = 1, m_k = e_k): the first EMA steps then
        # move codes smoothly toward their means, whereas zero-initialised (unbiased) averages would either jump
        # (e_k ~ m_k / ((1 - decay) n_k)) or, debiased, send every code unused in the first batch to 0.
        self.register_buffer("ema_cluster_size", torch.ones(num_codes))
        self.register_buffer("ema_embed_sum", codebook.clone())
        self.register_buffer("train_steps", torch.zeros((), dtype=torch.int64))
        self.register_buffer("usage_window", torch.zeros(num_codes, dtype=torch.int64))  # since the last revival
        self._host_steps: int | None = None  # host mirror of train_steps, to schedule revival without syncs

    @property
    def code_dim(self) -> int:
        return self.embed_dim

    def _check_latents(self, z_e: Tensor) -> tuple[int, int]:
        if z_e.ndim != 4 or z_e.shape[1] != self.embed_dim:
            raise ValueError(
                f"expected z_e of shape (B, L={self.embed_dim}, H, W), got {tuple(z_e.shape)}; "
                "model.embed_dim must equal the encoder's output channels"
            )
        return patch_grid(z_e.shape, _PATCH)

    def _nearest(self, signals: Tensor) -> Tensor:
        """(N, L) fp32 -> (N,) int64 index of the nearest code (squared Euclidean; ties -> lowest index)."""
        codebook = self.codebook.float()
        distances = (
            signals.pow(2).sum(1, keepdim=True) - 2 * signals @ codebook.T + codebook.pow(2).sum(1)[None, :]
        )
        return distances.argmin(dim=1)

    def smoothed_cluster_size(self) -> Tensor:
        """(K,) Laplace-smoothed N~_k: positive for every code, same total as the raw EMA sizes."""
        sizes = self.ema_cluster_size.float()
        total = sizes.sum()
        return (sizes + self.eps) / (total + self.num_atoms * self.eps) * total

    def forward(self, z_e: Tensor) -> tuple[Tensor, Tensor, BottleneckInfo]:
        """z_e (B, L, H, W) -> z_q (B, L, H, W) straight-through, loss (0-dim fp32), BottleneckInfo (S = 1)."""
        grid = self._check_latents(z_e)
        signals = to_signals(z_e, _PATCH).float()
        with torch.no_grad():
            nearest = self._nearest(signals.detach())
            quantized = self.codebook.float()[nearest]
        loss = self.beta * F.mse_loss(signals, quantized)
        quantized_map = from_signals(quantized, z_e.shape[0], self.embed_dim, grid, _PATCH)
        z_q = z_e + (quantized_map.to(z_e.dtype) - z_e).detach()
        indices = codes_to_grid(nearest[:, None], z_e.shape[0], grid)
        coeffs = torch.ones(indices.shape, dtype=torch.float32, device=z_e.device)
        info = usage_info(indices, coeffs, self.num_atoms, reduce=self.training)
        if self.training:
            self._training_step(signals.detach(), nearest, info.usage)
        return z_q, loss, info

    @torch.no_grad()
    def _training_step(self, signals: Tensor, nearest: Tensor, counts: Tensor) -> None:
        """EMA update from all ranks' assignments (counts (K,) are already summed over ranks), then revival."""
        self.train_steps += 1
        self.usage_window += counts
        sums = torch.zeros(self.num_atoms, self.embed_dim, dtype=torch.float32, device=signals.device)
        all_reduce_sum_(sums.index_add_(0, nearest, signals))
        decay = self.ema_decay
        self.ema_cluster_size.copy_(decay * self.ema_cluster_size.float() + (1 - decay) * counts.float())
        self.ema_embed_sum.copy_(decay * self.ema_embed_sum.float() + (1 - decay) * sums)
        self.codebook.copy_(self.ema_embed_sum.float() / self.smoothed_cluster_size()[:, None])
        if self.revive_dead_every and self._revival_due():
            self.revive_dead(signals)

    def _revival_due(self) -> bool:
        # train_steps is read from the device once after construction or loading, then mirrored on the host.
        self._host_steps = int(self.train_steps) if self._host_steps is None else self._host_steps + 1
        return self._host_steps % self.revive_dead_every == 0

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self._host_steps = None  # train_steps changes on load: re-read it at the next training forward
        super()._load_from_state_dict(*args, **kwargs)

    @torch.no_grad()
    def revive_dead(self, signals: Tensor) -> Tensor:
        """Replace every code unused since the last revival by a batch vector; returns how many (0-dim).

        signals: (N, L) or latents (B, L, H, W). A collective (broadcast from rank 0): call it on every rank;
        forward does so itself every revive_dead_every training forwards. A revived code restarts as one
        pseudo-observation of its new vector, like a freshly initialised code.
        """
        if signals.ndim == 4:
            self._check_latents(signals)
            signals = to_signals(signals, _PATCH)
        dead = self.usage_window == 0
        rows = replacement_rows(signals, self.num_atoms, seed=int(self.train_steps))
        column = dead[:, None]
        self.codebook.copy_(torch.where(column, rows, self.codebook.float()))
        self.ema_embed_sum.copy_(torch.where(column, rows, self.ema_embed_sum.float()))
        self.ema_cluster_size.copy_(torch.where(dead, torch.ones_like(self.ema_cluster_size), self.ema_cluster_size))
        self.usage_window.zero_()
        return dead.sum()

    @torch.no_grad()
    def codes(self, z_e: Tensor) -> tuple[Tensor, Tensor]:
        """z_e (B, L, H, W) -> indices (B, 1, H, W) int64, coeffs (B, 1, H, W) fp32 ones. No state change."""
        grid = self._check_latents(z_e)
        nearest = self._nearest(to_signals(z_e, _PATCH).float())
        indices = codes_to_grid(nearest[:, None], z_e.shape[0], grid)
        return indices, torch.ones(indices.shape, dtype=torch.float32, device=z_e.device)

    def from_codes(self, indices: Tensor, coeffs: Tensor) -> Tensor:
        """indices, coeffs (B, 1, H, W) -> z (B, L, H, W) = coeffs * codebook[indices] (fp32)."""
        if indices.shape != coeffs.shape or indices.ndim != 4:
            raise ValueError(
                f"indices and coeffs must both be (B, S, H, W), got {tuple(indices.shape)} and {tuple(coeffs.shape)}"
            )
        codebook = self.codebook.float()
        rows = torch.einsum("ns,nsd->nd", grid_to_codes(coeffs).float(), codebook[grid_to_codes(indices)])
        return from_signals(rows, indices.shape[0], self.embed_dim, tuple(indices.shape[2:]), _PATCH)
