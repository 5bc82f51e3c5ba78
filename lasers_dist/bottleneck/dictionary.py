"""DictionaryBottleneck: code each latent vector (or latent patch) as S atoms of a learned dictionary.

Forward (training and eval):
    signals = patches of z_e (N, dim)                       N = B H' W', dim = L P_H P_W
    gamma   = Batch-OMP(sg[signals], D_unit, S)             no gradients, fp32
    z_hat   = gamma D_unit                                  differentiable in the dictionary
    loss    = ||sg[z_e] - z_hat||^2 + beta ||z_e - sg[z_hat]||^2    (means, as in VQ-VAE)
    z_q     = z_e + sg[z_hat - z_e]                         straight-through to the encoder

so the encoder learns from the decoder through z_q and from the commitment term, and the dictionary only from
the first loss term (update="gradient"), or from block-coordinate descent on running statistics
(update="online", lasers_dist.sparse.online).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lasers_dist.bottleneck.usage import BottleneckInfo, all_reduce_sum_, replacement_rows, usage_info
from lasers_dist.sparse import batch_omp
from lasers_dist.sparse.online import OnlineDictionaryStats, batch_statistics, bcd_update

UPDATES = ("gradient", "online")


def patch_grid(shape: torch.Size, patch_size: tuple[int, int]) -> tuple[int, int]:
    """(B, L, H, W) -> the patch grid (H', W') = (H / P_H, W / P_W); ValueError if a side is not divisible."""
    if len(shape) != 4:
        raise ValueError(f"expected latents of shape (B, L, H, W), got {tuple(shape)}")
    (height, width), (patch_h, patch_w) = shape[2:], patch_size
    if height % patch_h or width % patch_w:
        raise ValueError(
            f"latent map {height}x{width} (z_e shape {tuple(shape)}) is not divisible by patch_size "
            f"{patch_h}x{patch_w}; change the image size, the encoder's downsampling or model.patch_size"
        )
    return height // patch_h, width // patch_w


def to_signals(z: Tensor, patch_size: tuple[int, int]) -> Tensor:
    """(B, L, H, W) -> (B H' W', L P_H P_W): one row per non-overlapping patch, flattened as (L, P_H, P_W).

    Row order is (b, h', w'), the same as F.unfold(z, patch_size, stride=patch_size) transposed; with a 1x1
    patch each row is one latent vector z[b, :, h, w].
    """
    batch, channels = z.shape[:2]
    (grid_h, grid_w), (patch_h, patch_w) = patch_grid(z.shape, patch_size), patch_size
    z = z.reshape(batch, channels, grid_h, patch_h, grid_w, patch_w)
    return z.permute(0, 2, 4, 1, 3, 5).reshape(batch * grid_h * grid_w, channels * patch_h * patch_w)


def from_signals(rows: Tensor, batch: int, channels: int, grid: tuple[int, int], patch_size: tuple[int, int]) -> Tensor:
    """Inverse of to_signals: (B H' W', L P_H P_W) -> (B, L, H' P_H, W' P_W)."""
    (grid_h, grid_w), (patch_h, patch_w) = grid, patch_size
    z = rows.reshape(batch, grid_h, grid_w, channels, patch_h, patch_w).permute(0, 3, 1, 4, 2, 5)
    return z.reshape(batch, channels, grid_h * patch_h, grid_w * patch_w)


def finite_rows(signals: Tensor) -> Tensor:
    """(N, dim) -> the same with every row set to zero whose squared norm is not finite (no host sync): rows
    holding NaN / Inf, and rows so large (|x| beyond ~1e19 in fp32) that sparse coding's products would overflow.

    A diverging encoder must not crash sparse coding (batch_omp refuses non-finite rows, and overflowing ones
    select garbage atoms) nor poison the state a training forward updates (online statistics, revival
    candidates): such rows get empty codes, z_e itself still reaches the loss, which is then not finite, and the
    trainer skips the step (lasers_dist.train.step).
    """
    return signals.masked_fill(~torch.isfinite(signals.square().sum(dim=1, keepdim=True)), 0.0)


def codes_to_grid(values: Tensor, batch: int, grid: tuple[int, int]) -> Tensor:
    """(B H' W', S) -> (B, S, H', W')."""
    return values.reshape(batch, grid[0], grid[1], -1).permute(0, 3, 1, 2)


def grid_to_codes(values: Tensor) -> Tensor:
    """(B, S, H', W') -> (B H' W', S)."""
    return values.permute(0, 2, 3, 1).reshape(-1, values.shape[1])


class DictionaryBottleneck(nn.Module):
    """Sparse dictionary bottleneck (DL-VAE / DL-GAN).

    num_atoms K, embed_dim L (latent channels), sparsity S atoms per signal, patch_size (P_H, P_W) latent
    vectors per coded signal (code_dim = L P_H P_W), beta the commitment weight, update "gradient" (the
    dictionary is a trainable parameter) or "online" (block-coordinate descent per training forward, no
    gradient), omp_backend passed to batch_omp, revive_dead_every: every that many training forwards, atoms
    not selected since the last revival are replaced by signals of the current batch (0 = never).

    Every training forward is a step of the bottleneck's own state (usage window, online statistics): run it
    exactly once per micro-batch on every rank, in lockstep (it issues collectives). Eval-mode forwards change
    no state and issue no collectives, so evaluation may run on any subset of ranks; their info.usage is local.
    """

    def __init__(
        self,
        num_atoms: int,
        embed_dim: int,
        sparsity: int,
        patch_size: tuple[int, int] = (1, 1),
        beta: float = 0.25,
        update: str = "gradient",
        omp_backend: str = "auto",
        revive_dead_every: int = 0,
    ) -> None:
        super().__init__()
        patch_size = tuple(patch_size)
        if len(patch_size) != 2 or any(not isinstance(p, int) or p < 1 for p in patch_size):
            raise ValueError(f"patch_size must be two positive ints (P_H, P_W), got {patch_size!r}")
        if update not in UPDATES:
            raise ValueError(f"update must be one of {UPDATES}, got {update!r}")
        code_dim = embed_dim * patch_size[0] * patch_size[1]
        if not 1 <= sparsity <= min(num_atoms, code_dim):
            raise ValueError(
                f"sparsity must be in [1, min(num_atoms={num_atoms}, code_dim={code_dim})], got {sparsity}: "
                "more atoms than signal dimensions are linearly dependent"
            )
        if revive_dead_every < 0:
            raise ValueError(f"revive_dead_every must be >= 0 (0 = off), got {revive_dead_every}")
        self.num_atoms, self.embed_dim, self.sparsity = num_atoms, embed_dim, sparsity
        self.patch_size, self.beta, self.update = patch_size, beta, update
        self.omp_backend, self.revive_dead_every = omp_backend, revive_dead_every

        # Stored as a plain (K, dim) parameter so DDP / DeepSpeed reduce its gradient like any weight. Atoms are
        # made unit-norm in forward (D / ||D||, differentiable) rather than by editing the parameter in place:
        # DeepSpeed ZeRO-1/2 keep an fp32 master copy that would overwrite such edits at the next step, while
        # normalising in forward lets the raw norm drift harmlessly and keeps optimizer state consistent.
        initial = torch.randn(num_atoms, code_dim)
        self.dictionary = nn.Parameter(initial / initial.norm(dim=1, keepdim=True))
        if update == "online":
            # Updated in place by block-coordinate descent, so no optimizer may own it: with requires_grad=False
            # DeepSpeed ZeRO leaves it out of its (master-copy) partitions and never overwrites the update; build
            # plain optimizers from the parameters that require grad.
            self.dictionary.requires_grad_(False)
            self.online = OnlineDictionaryStats(num_atoms, code_dim)
        self.register_buffer("train_steps", torch.zeros((), dtype=torch.int64))
        # All-reduced usage since the last revival: "dead" for revival means zero here (a window of
        # revive_dead_every training forwards), whereas info.dead_atoms counts this batch only.
        self.register_buffer("usage_window", torch.zeros(num_atoms, dtype=torch.int64))
        self._host_steps: int | None = None  # host mirror of train_steps, to schedule revival without syncs
        self._pending_signals: Tensor | None = None

    @property
    def code_dim(self) -> int:
        """Dimension of one coded signal: embed_dim * P_H * P_W."""
        return self.embed_dim * self.patch_size[0] * self.patch_size[1]

    def unit_atoms(self) -> Tensor:
        """(K, code_dim) fp32 row-normalised dictionary, differentiable in the parameter (gradient mode)."""
        atoms = self.dictionary.float()
        return atoms / atoms.norm(dim=1, keepdim=True).clamp_min(1e-12)

    def _check_latents(self, z_e: Tensor) -> tuple[int, int]:
        if z_e.ndim != 4 or z_e.shape[1] != self.embed_dim:
            raise ValueError(
                f"expected z_e of shape (B, L={self.embed_dim}, H, W), got {tuple(z_e.shape)}; "
                "model.embed_dim must equal the encoder's output channels"
            )
        return patch_grid(z_e.shape, self.patch_size)

    def forward(self, z_e: Tensor) -> tuple[Tensor, Tensor, BottleneckInfo]:
        """z_e (B, L, H, W) -> z_q (B, L, H, W) straight-through, loss (0-dim fp32), BottleneckInfo."""
        grid = self._check_latents(z_e)
        signals = to_signals(z_e, self.patch_size).float()  # (N, code_dim), still attached to the encoder
        atoms = self.unit_atoms()
        coded = finite_rows(signals.detach())
        codes = batch_omp(coded, atoms.detach(), self.sparsity, backend=self.omp_backend)
        z_hat = codes.reconstruct(atoms)  # (N, code_dim), gradient flows into the dictionary only
        loss = F.mse_loss(z_hat, signals.detach()) + self.beta * F.mse_loss(signals, z_hat.detach())
        z_hat_map = from_signals(z_hat.detach(), z_e.shape[0], self.embed_dim, grid, self.patch_size)
        z_q = z_e + (z_hat_map.to(z_e.dtype) - z_e).detach()
        indices = codes_to_grid(codes.indices, z_e.shape[0], grid)
        coeffs = codes_to_grid(codes.coeffs, z_e.shape[0], grid)
        info = usage_info(indices, coeffs, self.num_atoms, reduce=self.training)
        if self.training:
            self._training_step(coded, codes.indices, codes.coeffs, info.usage)
        return z_q, loss, info

    @torch.no_grad()
    def _training_step(self, signals: Tensor, indices: Tensor, coeffs: Tensor, usage: Tensor) -> None:
        """State updates of one training forward: online statistics + BCD, usage window, revival schedule."""
        self.train_steps += 1
        self.usage_window += usage
        if self.update == "online":
            a_inc, b_inc = batch_statistics(signals, indices, coeffs, self.num_atoms)
            num_signals = torch.full((1,), signals.shape[0], dtype=torch.float32, device=signals.device)
            # One collective for A, B and xi: every rank then mixes and descends on identical numbers.
            packed = all_reduce_sum_(torch.cat([a_inc.reshape(-1), b_inc.reshape(-1), num_signals]))
            a_inc = packed[: a_inc.numel()].view_as(a_inc)
            b_inc = packed[a_inc.numel() : -1].view_as(b_inc)
            self.online.mix_(a_inc, b_inc, packed[-1])
            self.dictionary.copy_(bcd_update(self.unit_atoms(), self.online.A, self.online.B))
        if self.revive_dead_every and self._revival_due():
            if self.update == "online":
                self.revive_dead(signals)
            else:
                # Gradient mode: an in-place edit of a trainable parameter must also reach the optimizer's
                # master copy (DeepSpeed ZeRO-1/2 would silently undo it), which only the trainer can do. So keep
                # the batch and let the trainer call revive_dead() after its optimizer step (see there).
                self._pending_signals = signals

    def _revival_due(self) -> bool:
        # train_steps is read from the device once after construction or loading, then mirrored on the host.
        self._host_steps = int(self.train_steps) if self._host_steps is None else self._host_steps + 1
        return self._host_steps % self.revive_dead_every == 0

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self._host_steps = None  # train_steps changes on load: re-read it at the next training forward
        self._pending_signals = None
        super()._load_from_state_dict(*args, **kwargs)

    @property
    def revival_due(self) -> bool:
        """Gradient mode: True when a revival window has ended and revive_dead() should be called."""
        return self._pending_signals is not None

    @torch.no_grad()
    def revive_dead(self, signals: Tensor | None = None) -> Tensor:
        """Replace every atom unused since the last revival by a (normalised) signal; returns how many (0-dim).

        signals: (N, code_dim) or latents (B, L, H, W); None uses the batch kept by the last due training forward.
        A collective (broadcast from rank 0): call it on every rank. Rows are chosen by rank 0 from its batch
        with a generator seeded by train_steps, so all ranks install identical atoms.
        Gradient mode: call it after the optimizer step, then copy the parameter into the optimizer's master
        weights (with DeepSpeed ZeRO-1/2: deepspeed.utils.safe_set_full_fp32_param(p, p.float())); stale Adam
        moments of the revived rows are harmless but may be reset the same way.
        """
        if signals is None:
            signals = self._pending_signals
            if signals is None:
                raise RuntimeError("revive_dead() without signals needs a due training forward first")
        if signals.ndim == 4:
            self._check_latents(signals)
            signals = to_signals(signals, self.patch_size)
        self._pending_signals = None
        dead = self.usage_window == 0
        rows = replacement_rows(signals, self.num_atoms, seed=int(self.train_steps))
        rows = rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)
        self.dictionary.copy_(torch.where(dead[:, None], rows.to(self.dictionary.dtype), self.dictionary))
        if self.update == "online":
            self.online.forget_atoms_(dead)  # the statistics describe the replaced atoms, not the new ones
        self.usage_window.zero_()
        return dead.sum()

    @torch.no_grad()
    def codes(self, z_e: Tensor, sparsity: int | None = None) -> tuple[Tensor, Tensor]:
        """z_e (B, L, H, W) -> indices (B, S, H', W') int64, coeffs (B, S, H', W') fp32. No state change.

        sparsity: code with this many atoms instead of the trained S (evaluation: one model, several rates).
        """
        grid = self._check_latents(z_e)
        sparsity = self.sparsity if sparsity is None else sparsity
        if not 1 <= sparsity <= min(self.num_atoms, self.code_dim):
            raise ValueError(f"sparsity must be in [1, min(num_atoms={self.num_atoms}, code_dim={self.code_dim})], "
                             f"got {sparsity}")
        signals = to_signals(z_e, self.patch_size).float()
        codes = batch_omp(signals, self.unit_atoms(), sparsity, backend=self.omp_backend)
        return codes_to_grid(codes.indices, z_e.shape[0], grid), codes_to_grid(codes.coeffs, z_e.shape[0], grid)

    def from_codes(self, indices: Tensor, coeffs: Tensor) -> Tensor:
        """indices, coeffs (B, S, H', W') -> z (B, L, H' P_H, W' P_W) = the bottleneck's z_hat (fp32)."""
        if indices.shape != coeffs.shape or indices.ndim != 4:
            raise ValueError(
                f"indices and coeffs must both be (B, S, H', W'), got {tuple(indices.shape)} and "
                f"{tuple(coeffs.shape)}"
            )
        atoms = self.unit_atoms()
        rows = torch.einsum("ns,nsd->nd", grid_to_codes(coeffs).float(), atoms[grid_to_codes(indices)])
        return from_signals(rows, indices.shape[0], self.embed_dim, tuple(indices.shape[2:]), self.patch_size)
