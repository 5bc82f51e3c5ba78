"""Encoder/decoder families.

"light": the paper's (after VQ-VAE, van den Oord et al. 2017), downsampling by 4:
    encoder  conv4x4/2 (-> hidden/2), ReLU, conv4x4/2 (-> hidden), ReLU, conv3x3, residual blocks, ReLU,
             conv1x1 (-> embed_dim)
    decoder  conv3x3 (embed_dim -> hidden), residual blocks, ReLU, convT4x4/2 (-> hidden/2), ReLU,
             convT4x4/2 (-> out_channels)
  The paper gives 128 hidden units "everywhere", so the residual blocks' inner width is `hidden` too (VQ-VAE
  used 32); the first strided conv has hidden/2 outputs as in VQ-VAE.

"deep": taming-transformers-like, downsampling by 2^(len(channel_mult) - 1):
    encoder  conv3x3 (-> hidden), per level i: num_res_blocks ResnetBlocks (-> hidden * channel_mult[i]) and a
             strided conv except after the last level; middle ResnetBlock [SelfAttention] ResnetBlock;
             GroupNorm, SiLU, conv3x3 (-> embed_dim)
    decoder  the mirror image, with num_res_blocks + 1 blocks per level and nearest-x2 + conv3x3 upsampling.

Neither decoder ends in tanh although images live in [-1, 1]: a tanh saturates and starves the decoder of
gradient exactly on the bright/dark pixels the MSE term cares about; outputs are clamped where images are
produced (metrics, samples), not in the model.

Every decoder exposes `last_layer`, the weight of its final conv, for the adaptive GAN weight.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from lasers_dist.models.blocks import (
    Downsample,
    LightResidualBlock,
    ResnetBlock,
    SelfAttention,
    Upsample,
    group_norm,
    run_block,
)


def _check_light(hidden: int) -> None:
    if hidden < 2 or hidden % 2:
        raise ValueError(f"model.hidden_channels must be an even number >= 2 for the light family, got {hidden}")


class LightEncoder(nn.Module):
    """(B, in_channels, H, W) -> (B, embed_dim, H/4, W/4)."""

    downsample_factor = 4

    def __init__(
        self, in_channels: int, hidden: int, embed_dim: int, num_res_blocks: int = 2, checkpoint: bool = False
    ) -> None:
        super().__init__()
        _check_light(hidden)
        self.in_channels, self.checkpoint = in_channels, checkpoint
        self.conv1 = nn.Conv2d(in_channels, hidden // 2, 4, stride=2, padding=1)
        self.conv2 = nn.Conv2d(hidden // 2, hidden, 4, stride=2, padding=1)
        self.conv3 = nn.Conv2d(hidden, hidden, 3, padding=1)
        self.res_blocks = nn.ModuleList(LightResidualBlock(hidden, hidden) for _ in range(num_res_blocks))
        self.proj = nn.Conv2d(hidden, embed_dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv3(F.relu(self.conv2(F.relu(self.conv1(x)))))
        for block in self.res_blocks:
            h = run_block(block, h, self.checkpoint)
        return self.proj(F.relu(h))


class LightDecoder(nn.Module):
    """(B, embed_dim, h, w) -> (B, out_channels, 4h, 4w)."""

    def __init__(
        self, out_channels: int, hidden: int, embed_dim: int, num_res_blocks: int = 2, checkpoint: bool = False
    ) -> None:
        super().__init__()
        _check_light(hidden)
        self.checkpoint = checkpoint
        self.conv_in = nn.Conv2d(embed_dim, hidden, 3, padding=1)
        self.res_blocks = nn.ModuleList(LightResidualBlock(hidden, hidden) for _ in range(num_res_blocks))
        self.up1 = nn.ConvTranspose2d(hidden, hidden // 2, 4, stride=2, padding=1)
        self.conv_out = nn.ConvTranspose2d(hidden // 2, out_channels, 4, stride=2, padding=1)

    @property
    def last_layer(self) -> nn.Parameter:
        return self.conv_out.weight

    def forward(self, z: Tensor) -> Tensor:
        h = self.conv_in(z)
        for block in self.res_blocks:
            h = run_block(block, h, self.checkpoint)
        return self.conv_out(F.relu(self.up1(F.relu(h))))


def _check_deep(channel_mult: list[int] | tuple[int, ...], num_res_blocks: int) -> None:
    if len(channel_mult) < 1 or min(channel_mult) < 1:
        raise ValueError(f"model.channel_mult must be a non-empty list of positive ints, got {list(channel_mult)}")
    if num_res_blocks < 1:
        raise ValueError(f"model.num_res_blocks must be >= 1 for the deep family, got {num_res_blocks}")


class _Middle(nn.Module):
    """ResnetBlock, optional SelfAttention, ResnetBlock at the lowest resolution."""

    def __init__(self, channels: int, norm_groups: int, attention: bool, checkpoint: bool) -> None:
        super().__init__()
        self.checkpoint = checkpoint
        blocks = [ResnetBlock(channels, channels, norm_groups)]
        if attention:
            blocks.append(SelfAttention(channels, norm_groups))
        blocks.append(ResnetBlock(channels, channels, norm_groups))
        self.blocks = nn.ModuleList(blocks)

    def forward(self, h: Tensor) -> Tensor:
        for block in self.blocks:
            h = run_block(block, h, self.checkpoint)
        return h


class DeepEncoder(nn.Module):
    """(B, in_channels, H, W) -> (B, embed_dim, H / 2^(len(channel_mult)-1), W / ...)."""

    def __init__(
        self,
        in_channels: int,
        hidden: int,
        embed_dim: int,
        channel_mult: list[int] | tuple[int, ...] = (1, 1, 2, 2, 4),
        num_res_blocks: int = 2,
        norm_groups: int = 32,
        attention: bool = False,
        checkpoint: bool = False,
    ) -> None:
        super().__init__()
        _check_deep(channel_mult, num_res_blocks)
        self.in_channels, self.checkpoint = in_channels, checkpoint
        self.downsample_factor = 2 ** (len(channel_mult) - 1)
        self.conv_in = nn.Conv2d(in_channels, hidden, 3, padding=1)
        self.blocks = nn.ModuleList()
        channels = hidden
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                self.blocks.append(ResnetBlock(channels, hidden * mult, norm_groups))
                channels = hidden * mult
            if level != len(channel_mult) - 1:
                self.blocks.append(Downsample(channels))
        self.middle = _Middle(channels, norm_groups, attention, checkpoint)
        self.norm_out = group_norm(channels, norm_groups)
        self.conv_out = nn.Conv2d(channels, embed_dim, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for block in self.blocks:
            # Only the residual blocks hold enough activations to be worth recomputing.
            h = run_block(block, h, self.checkpoint and isinstance(block, ResnetBlock))
        h = self.middle(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class DeepDecoder(nn.Module):
    """(B, embed_dim, h, w) -> (B, out_channels, h * 2^(len(channel_mult)-1), w * ...)."""

    def __init__(
        self,
        out_channels: int,
        hidden: int,
        embed_dim: int,
        channel_mult: list[int] | tuple[int, ...] = (1, 1, 2, 2, 4),
        num_res_blocks: int = 2,
        norm_groups: int = 32,
        attention: bool = False,
        checkpoint: bool = False,
    ) -> None:
        super().__init__()
        _check_deep(channel_mult, num_res_blocks)
        self.checkpoint = checkpoint
        channels = hidden * channel_mult[-1]
        self.conv_in = nn.Conv2d(embed_dim, channels, 3, padding=1)
        self.middle = _Middle(channels, norm_groups, attention, checkpoint)
        self.blocks = nn.ModuleList()
        for level in reversed(range(len(channel_mult))):
            for _ in range(num_res_blocks + 1):
                self.blocks.append(ResnetBlock(channels, hidden * channel_mult[level], norm_groups))
                channels = hidden * channel_mult[level]
            if level != 0:
                self.blocks.append(Upsample(channels))
        self.norm_out = group_norm(channels, norm_groups)
        self.conv_out = nn.Conv2d(channels, out_channels, 3, padding=1)

    @property
    def last_layer(self) -> nn.Parameter:
        return self.conv_out.weight

    def forward(self, z: Tensor) -> Tensor:
        h = self.middle(self.conv_in(z))
        for block in self.blocks:
            h = run_block(block, h, self.checkpoint and isinstance(block, ResnetBlock))
        return self.conv_out(F.silu(self.norm_out(h)))
