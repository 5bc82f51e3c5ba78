"""Encoder/decoder families, the PatchGAN discriminator, and the Autoencoder with its factory."""

from lasers_dist.models.autoencoder import (
    Autoencoder,
    AutoencoderOutput,
    LatentCodes,
    build_autoencoder,
    build_bottleneck,
    build_discriminator,
    build_encoder_decoder,
    model_kind,
)
from lasers_dist.models.discriminator import PatchDiscriminator, receptive_field
from lasers_dist.models.encoder_decoder import DeepDecoder, DeepEncoder, LightDecoder, LightEncoder

__all__ = [
    "Autoencoder",
    "AutoencoderOutput",
    "DeepDecoder",
    "DeepEncoder",
    "LatentCodes",
    "LightDecoder",
    "LightEncoder",
    "PatchDiscriminator",
    "build_autoencoder",
    "build_bottleneck",
    "build_discriminator",
    "build_encoder_decoder",
    "model_kind",
    "receptive_field",
]
