"""Autoencoder = encoder -> bottleneck -> decoder, and the factory that builds it from a ModelConfig.

The four model kinds of the paper:
    DL-VAE  dictionary bottleneck          DL-GAN  dictionary bottleneck + PatchGAN discriminator
    VQ-VAE  EMA vector quantiser           VQ-GAN  EMA vector quantiser + PatchGAN discriminator
The discriminator is a separate module (its own optimizer / DeepSpeed engine), so it is built apart.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lasers_dist.bottleneck import BottleneckInfo, DictionaryBottleneck, VQBottleneck
from lasers_dist.config import ModelConfig
from lasers_dist.models.discriminator import PatchDiscriminator
from lasers_dist.models.encoder_decoder import DeepDecoder, DeepEncoder, LightDecoder, LightEncoder


@dataclass
class LatentCodes:
    """The discrete part of an image's latent: S atoms (or 1 code) per coded latent position.

    indices: (B, S, H', W') int64 atom / code ids.
    coeffs:  (B, S, H', W') coefficients (ones for VQ).
    """

    indices: Tensor
    coeffs: Tensor

    def to(self, device: torch.device | str) -> LatentCodes:
        return LatentCodes(self.indices.to(device), self.coeffs.to(device))


@dataclass
class AutoencoderOutput:
    """reconstructions (B, C, H, W); bottleneck_loss 0-dim fp32 (codebook/dictionary + commitment terms);
    info the bottleneck's BottleneckInfo; latents z_e (B, L, H/f, W/f), the encoder output before coding."""

    reconstructions: Tensor
    bottleneck_loss: Tensor
    info: BottleneckInfo
    latents: Tensor


class Autoencoder(nn.Module):
    """images (B, C, H, W) in [-1, 1] -> latents (B, L, H/f, W/f) -> codes -> reconstructions (B, C, H, W).

    f is the encoder's downsample_factor; H and W must be multiples of f (times the bottleneck's patch size).
    """

    def __init__(self, encoder: nn.Module, bottleneck: nn.Module, decoder: nn.Module) -> None:
        super().__init__()
        self.encoder, self.bottleneck, self.decoder = encoder, bottleneck, decoder

    @property
    def last_layer(self) -> nn.Parameter:
        """The decoder's final conv weight (for the adaptive GAN weight)."""
        return self.decoder.last_layer

    def _check_images(self, images: Tensor) -> None:
        factor = self.encoder.downsample_factor
        expected = self.encoder.in_channels
        if images.ndim != 4 or images.shape[1] != expected:
            raise ValueError(f"expected images of shape (B, {expected}, H, W), got {tuple(images.shape)}")
        if images.shape[2] % factor or images.shape[3] % factor:
            raise ValueError(
                f"image size {images.shape[2]}x{images.shape[3]} is not divisible by the encoder's downsampling "
                f"factor {factor}; resize or crop to a multiple of {factor} (data.image_size)"
            )

    def forward(self, images: Tensor) -> AutoencoderOutput:
        self._check_images(images)
        latents = self.encoder(images)
        z_q, loss, info = self.bottleneck(latents)
        return AutoencoderOutput(self.decoder(z_q), loss, info, latents)

    def encode(self, images: Tensor, sparsity: int | None = None) -> LatentCodes:
        """images (B, C, H, W) -> LatentCodes. Changes no bottleneck state (no EMA / usage update).

        sparsity (dictionary bottleneck only): atoms per coded signal, instead of the trained S.
        """
        return self.codes_of_latents(self.latents(images), sparsity)

    def latents(self, images: Tensor) -> Tensor:
        """images (B, C, H, W) -> z_e (B, L, H/f, W/f), the encoder output before coding."""
        self._check_images(images)
        return self.encoder(images)

    def codes_of_latents(self, latents: Tensor, sparsity: int | None = None) -> LatentCodes:
        """z_e (B, L, H/f, W/f) -> LatentCodes (see encode)."""
        if sparsity is None:
            return LatentCodes(*self.bottleneck.codes(latents))
        if not isinstance(self.bottleneck, DictionaryBottleneck):
            raise ValueError("sparsity can be chosen only for a dictionary bottleneck (VQ codes one vector per latent)")
        return LatentCodes(*self.bottleneck.codes(latents, sparsity=sparsity))

    def decode(self, codes: LatentCodes) -> Tensor:
        """LatentCodes -> reconstructions (B, C, H, W), as forward() would give for the coded images."""
        latents = self.bottleneck.from_codes(codes.indices, codes.coeffs)
        return self.decoder(latents.to(self.decoder.last_layer.dtype))


def build_bottleneck(cfg: ModelConfig) -> nn.Module:
    if cfg.bottleneck == "dictionary":
        return DictionaryBottleneck(
            num_atoms=cfg.num_atoms,
            embed_dim=cfg.embed_dim,
            sparsity=cfg.sparsity,
            patch_size=tuple(cfg.patch_size),
            beta=cfg.beta,
            update=cfg.dictionary_update,
            omp_backend=cfg.omp_backend,
            revive_dead_every=cfg.revive_dead_every,
        )
    if cfg.bottleneck == "vq":
        if list(cfg.patch_size) != [1, 1]:
            raise ValueError(f"model.patch_size must be [1, 1] for model.bottleneck=vq, got {cfg.patch_size}")
        return VQBottleneck(
            num_codes=cfg.num_atoms,
            embed_dim=cfg.embed_dim,
            beta=cfg.beta,
            ema_decay=cfg.ema_decay,
            revive_dead_every=cfg.revive_dead_every,
        )
    raise ValueError(f"model.bottleneck must be 'dictionary' or 'vq', got {cfg.bottleneck!r}")


def build_encoder_decoder(cfg: ModelConfig) -> tuple[nn.Module, nn.Module]:
    if cfg.architecture == "light":
        args = (cfg.hidden_channels, cfg.embed_dim, cfg.num_res_blocks, cfg.checkpoint_activations)
        return LightEncoder(cfg.in_channels, *args), LightDecoder(cfg.in_channels, *args)
    if cfg.architecture == "deep":
        kwargs = dict(
            hidden=cfg.hidden_channels,
            embed_dim=cfg.embed_dim,
            channel_mult=tuple(cfg.channel_mult),
            num_res_blocks=cfg.num_res_blocks,
            norm_groups=cfg.norm_groups,
            attention=cfg.attention,
            checkpoint=cfg.checkpoint_activations,
        )
        return DeepEncoder(cfg.in_channels, **kwargs), DeepDecoder(cfg.in_channels, **kwargs)
    raise ValueError(f"model.architecture must be 'light' or 'deep', got {cfg.architecture!r}")


def build_autoencoder(cfg: ModelConfig) -> Autoencoder:
    """The generator of a DL-VAE / DL-GAN / VQ-VAE / VQ-GAN run (the discriminator is build_discriminator's)."""
    encoder, decoder = build_encoder_decoder(cfg)
    return Autoencoder(encoder, build_bottleneck(cfg), decoder)


def build_discriminator(cfg: ModelConfig) -> PatchDiscriminator | None:
    """PatchGAN discriminator for the *-GAN kinds, None when model.discriminator is false."""
    if not cfg.discriminator:
        return None
    return PatchDiscriminator(
        in_channels=cfg.in_channels,
        channels=cfg.disc_channels,
        n_layers=cfg.disc_layers,
        norm="group",
        norm_groups=cfg.norm_groups,
    )


def model_kind(cfg: ModelConfig) -> str:
    """'DL-VAE', 'DL-GAN', 'VQ-VAE' or 'VQ-GAN' (for logs and reports)."""
    family = {"dictionary": "DL", "vq": "VQ"}[cfg.bottleneck]
    return f"{family}-{'GAN' if cfg.discriminator else 'VAE'}"
