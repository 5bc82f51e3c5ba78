"""Building blocks shared by the encoder/decoder families: residual blocks, self-attention, norm helpers.

All blocks map (B, C, H, W) -> (B, C', H', W') feature maps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    """GroupNorm over `channels`, with a clear error when `groups` does not divide them."""
    if groups < 1 or channels % groups:
        raise ValueError(
            f"model.norm_groups={groups} does not divide {channels} channels; choose model.norm_groups dividing "
            "model.hidden_channels x every model.channel_mult entry (and model.disc_channels)"
        )
    # eps 1e-6 as in the taming-transformers family: the 1e-5 default is noticeable with few channels per group.
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)


def run_block(block: nn.Module, x: Tensor, use_checkpoint: bool) -> Tensor:
    """block(x), recomputed in backward instead of storing activations when `use_checkpoint` and grads are on.

    Non-reentrant checkpointing: it works with inputs that do not require grad, with torch.autograd.grad (the
    adaptive GAN weight) and with DeepSpeed engines that do not manage checkpointing themselves.
    """
    if use_checkpoint and torch.is_grad_enabled():
        return checkpoint(block, x, use_reentrant=False)
    return block(x)


class LightResidualBlock(nn.Module):
    """VQ-VAE residual block: x + conv1x1(ReLU(conv3x3(ReLU(x)))), channels -> channels."""

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.conv3 = nn.Conv2d(channels, hidden, 3, padding=1)
        self.conv1 = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv1(F.relu(self.conv3(F.relu(x))))


class ResnetBlock(nn.Module):
    """Pre-activation residual block of the deep family: (GroupNorm, SiLU, conv3x3) x 2 plus a 1x1 shortcut
    when the channel count changes. in_channels -> out_channels at the same resolution."""

    def __init__(self, in_channels: int, out_channels: int, norm_groups: int) -> None:
        super().__init__()
        self.norm1 = group_norm(in_channels, norm_groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels, norm_groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.shortcut(x) + h


class SelfAttention(nn.Module):
    """Single-head self-attention over the H*W positions of a feature map, residual: (B, C, H, W) -> same.

    Only used at the lowest resolution (32^2 or 64^2 tokens), where its quadratic cost is affordable;
    scaled_dot_product_attention picks a memory-efficient kernel on GPU.
    """

    def __init__(self, channels: int, norm_groups: int) -> None:
        super().__init__()
        self.norm = group_norm(channels, norm_groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        batch, channels, height, width = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(batch, 3, channels, height * width).unbind(1)
        # (B, 1 head, HW tokens, C)
        q, k, v = (t.transpose(1, 2).unsqueeze(1) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.squeeze(1).transpose(1, 2).reshape(batch, channels, height, width)
        return x + self.proj(out)


class Downsample(nn.Module):
    """Strided 3x3 conv: (B, C, H, W) -> (B, C, H/2, W/2) for even H, W."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest x2 then 3x3 conv: (B, C, H, W) -> (B, C, 2H, 2W). Avoids the checkerboard artefacts of a
    stride-2 transposed conv in the deep decoder."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
