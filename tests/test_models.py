"""Encoder/decoder families, the PatchGAN discriminator, the Autoencoder and its factory (real bottlenecks)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from lasers_dist.bottleneck import DictionaryBottleneck, VQBottleneck
from lasers_dist.config import ModelConfig
from lasers_dist.models import (
    Autoencoder,
    LatentCodes,
    PatchDiscriminator,
    build_autoencoder,
    build_discriminator,
    model_kind,
    receptive_field,
)
from lasers_dist.models.blocks import SelfAttention


def small_config(**overrides) -> ModelConfig:
    """Small channel counts so every test runs in about a second on a shared CPU."""
    values = dict(
        num_atoms=32,
        embed_dim=8,
        sparsity=3,
        hidden_channels=16,
        num_res_blocks=1,
        norm_groups=4,
        channel_mult=[1, 2, 2],  # deep: 4x downsampling, like the light family
        omp_backend="torch",
        disc_channels=8,
        disc_layers=3,
    )
    values.update(overrides)
    return ModelConfig(**values)


def images(batch: int, size: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, size, size, generator=generator) * 2 - 1


@pytest.mark.parametrize("size", [32, 64, 256])
@pytest.mark.parametrize("bottleneck", ["dictionary", "vq"])
@pytest.mark.parametrize("architecture", ["light", "deep"])
def test_forward_backward_reaches_encoder_bottleneck_decoder(architecture, bottleneck, size):
    torch.manual_seed(0)
    model = build_autoencoder(small_config(architecture=architecture, bottleneck=bottleneck)).train()
    x = images(2, size)
    out = model(x)
    assert out.reconstructions.shape == x.shape
    assert out.latents.shape == (2, 8, size // 4, size // 4)
    sparsity = 3 if bottleneck == "dictionary" else 1
    assert out.info.indices.shape == (2, sparsity, size // 4, size // 4)
    assert out.bottleneck_loss.ndim == 0 and torch.isfinite(out.bottleneck_loss)

    (F.mse_loss(out.reconstructions, x) + out.bottleneck_loss).backward()
    for name, module in (("encoder", model.encoder), ("decoder", model.decoder)):
        for param_name, param in module.named_parameters():
            assert param.grad is not None and torch.isfinite(param.grad).all(), f"{name}.{param_name}"
            assert param.grad.abs().sum() > 0, f"no gradient reached {name}.{param_name}"
    if bottleneck == "dictionary":
        grad = model.bottleneck.dictionary.grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    else:  # the EMA codebook is a buffer: nothing in the VQ bottleneck is trained by gradients
        assert list(model.bottleneck.parameters()) == []


def test_deep_1024_five_downsamplings_gives_32x32_latents():
    cfg = small_config(
        architecture="deep", hidden_channels=8, norm_groups=4, channel_mult=[1, 1, 2, 2, 4, 4], attention=True
    )
    model = build_autoencoder(cfg).eval()
    x = images(1, 1024)
    with torch.no_grad():
        out = model(x)
    assert out.latents.shape == (1, 8, 32, 32)
    assert out.info.indices.shape == (1, 3, 32, 32)
    assert out.reconstructions.shape == (1, 3, 1024, 1024)
    assert torch.isfinite(out.reconstructions).all()


@pytest.mark.parametrize("architecture", ["light", "deep"])
def test_activation_checkpointing_gives_the_same_gradients(architecture):
    torch.manual_seed(0)
    plain = build_autoencoder(small_config(architecture=architecture, attention=True)).train()
    checkpointed = build_autoencoder(
        small_config(architecture=architecture, attention=True, checkpoint_activations=True)
    ).train()
    checkpointed.load_state_dict(plain.state_dict())
    x = images(2, 32)
    losses = []
    for model in (plain, checkpointed):
        out = model(x)
        loss = F.mse_loss(out.reconstructions, x) + out.bottleneck_loss
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1])
    for (name, a), (_, b) in zip(plain.named_parameters(), checkpointed.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_self_attention_matches_explicit_softmax_attention():
    torch.manual_seed(0)
    attention = SelfAttention(channels=8, norm_groups=4)
    x = torch.randn(2, 8, 5, 3)
    q, k, v = attention.qkv(attention.norm(x)).flatten(2).chunk(3, dim=1)  # (B, C, HW) each
    weights = torch.softmax(q.transpose(1, 2) @ k / 8**0.5, dim=-1)  # (B, HW queries, HW keys)
    expected = x + attention.proj((v @ weights.transpose(1, 2)).reshape(2, 8, 5, 3))
    torch.testing.assert_close(attention(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("architecture", ["light", "deep"])
@pytest.mark.parametrize("bottleneck", ["dictionary", "vq"])
def test_encode_decode_round_trip_equals_forward_in_eval(architecture, bottleneck):
    torch.manual_seed(0)
    model = build_autoencoder(small_config(architecture=architecture, bottleneck=bottleneck)).eval()
    x = images(2, 32)
    with torch.no_grad():
        out = model(x)
        codes = model.encode(x).to("cpu")
        decoded = model.decode(codes)
    assert isinstance(codes, LatentCodes) and codes.indices.dtype == torch.int64
    torch.testing.assert_close(codes.indices, out.info.indices, rtol=0, atol=0)
    torch.testing.assert_close(codes.coeffs, out.info.coeffs)
    torch.testing.assert_close(decoded, out.reconstructions, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("architecture", ["light", "deep"])
def test_last_layer_is_the_decoders_final_conv_weight(architecture):
    model = build_autoencoder(small_config(architecture=architecture))
    assert model.last_layer is model.decoder.conv_out.weight
    # The final conv maps straight to the 3 image channels and nothing follows it (no tanh): the output is
    # exactly the conv's output, so the adaptive weight sees the gradient the losses send to the image.
    features = {}
    model.decoder.conv_out.register_forward_hook(lambda module, args, output: features.update(out=output))
    out = model(images(1, 32))
    assert out.reconstructions is features["out"]
    grad = torch.autograd.grad(out.reconstructions.sum(), model.last_layer)[0]
    assert grad.abs().sum() > 0


def test_factory_builds_the_four_kinds():
    expected = {
        ("dictionary", False): "DL-VAE",
        ("dictionary", True): "DL-GAN",
        ("vq", False): "VQ-VAE",
        ("vq", True): "VQ-GAN",
    }
    for (bottleneck, discriminator), kind in expected.items():
        cfg = small_config(bottleneck=bottleneck, discriminator=discriminator, beta=0.3, revive_dead_every=7)
        model = build_autoencoder(cfg)
        disc = build_discriminator(cfg)
        assert isinstance(model, Autoencoder)
        assert model_kind(cfg) == kind
        assert isinstance(model.bottleneck, DictionaryBottleneck if bottleneck == "dictionary" else VQBottleneck)
        assert model.bottleneck.num_atoms == 32 and model.bottleneck.beta == 0.3
        assert model.bottleneck.revive_dead_every == 7
        assert (disc is None) == (not discriminator)
        if disc is not None:
            assert isinstance(disc, PatchDiscriminator) and disc.receptive_field() == 70


def test_factory_passes_the_dictionary_options():
    cfg = small_config(dictionary_update="online", patch_size=[2, 2], sparsity=4, ema_decay=0.9)
    bottleneck = build_autoencoder(cfg).bottleneck
    assert bottleneck.update == "online" and bottleneck.patch_size == (2, 2) and bottleneck.sparsity == 4
    assert bottleneck.code_dim == 8 * 4
    assert build_autoencoder(small_config(bottleneck="vq", ema_decay=0.9)).bottleneck.ema_decay == 0.9


def test_bad_inputs_raise_clear_errors():
    model = build_autoencoder(small_config())
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(torch.zeros(1, 1, 32, 32))
    with pytest.raises(ValueError, match="not divisible by the encoder's downsampling factor 4"):
        model(torch.zeros(1, 3, 30, 32))
    with pytest.raises(ValueError, match="model.norm_groups=5"):
        build_autoencoder(small_config(architecture="deep", norm_groups=5))
    with pytest.raises(ValueError, match="model.patch_size"):
        build_autoencoder(small_config(bottleneck="vq", patch_size=[2, 2]))


def test_discriminator_output_shape_and_70x70_receptive_field():
    disc = PatchDiscriminator(in_channels=3, channels=8, n_layers=3, norm_groups=4)
    assert disc(images(2, 256)).shape == (2, 1, 30, 30)  # 256 -> 128 -> 64 -> 32 -> 31 -> 30
    assert disc.receptive_field() == 70
    assert [PatchDiscriminator(channels=8, n_layers=n, norm_groups=4).receptive_field() for n in (1, 2, 3)] == [
        16,
        34,
        70,
    ]


@pytest.mark.parametrize("n_layers,field", [(1, 16), (2, 34), (3, 70)])
def test_receptive_field_matches_the_input_pixels_one_logit_depends_on(n_layers, field):
    # Without a norm every logit is a function of its patch only, so the support of its input gradient
    # must be exactly field x field pixels.
    torch.manual_seed(0)
    disc = PatchDiscriminator(channels=8, n_layers=n_layers, norm="none")
    x = torch.randn(1, 3, 160, 160, requires_grad=True)
    logits = disc(x)
    centre = logits.shape[-1] // 2
    (grad,) = torch.autograd.grad(logits[0, 0, centre, centre], x)
    rows = grad.abs().sum(dim=(0, 1, 3)).nonzero().squeeze(1)
    cols = grad.abs().sum(dim=(0, 1, 2)).nonzero().squeeze(1)
    assert rows.max() - rows.min() + 1 == field and cols.max() - cols.min() + 1 == field
    assert receptive_field(disc) == field


def test_discriminator_has_no_batch_state_and_pix2pix_init():
    torch.manual_seed(0)
    disc = PatchDiscriminator(channels=16, n_layers=3, norm_groups=4)
    x = images(3, 64)
    train_logits = disc.train()(x)
    eval_logits = disc.eval()(x)
    torch.testing.assert_close(train_logits, eval_logits)  # GroupNorm: no running statistics
    torch.testing.assert_close(disc(x[:1]), eval_logits[:1])  # a logit does not depend on other images
    assert list(disc.buffers()) == []
    convs = [m for m in disc.modules() if isinstance(m, torch.nn.Conv2d)]
    big = convs[3].weight  # 64 x 128 x 4 x 4 weights
    assert abs(big.mean().item()) < 2e-3 and 0.018 < big.std().item() < 0.022


def test_no_discriminator_when_disabled():
    assert build_discriminator(small_config(discriminator=False)) is None
    assert model_kind(small_config()) == "DL-VAE"


def test_discriminator_rejects_bad_settings():
    with pytest.raises(ValueError, match="model.disc_layers"):
        PatchDiscriminator(n_layers=0)
    with pytest.raises(ValueError, match="norm"):
        PatchDiscriminator(norm="batch")


def test_training_forward_changes_only_bottleneck_state_not_weights():
    model = build_autoencoder(small_config(bottleneck="vq"))
    before = copy.deepcopy(model.state_dict())
    model.train()(images(2, 32))
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith("bottleneck.") for k in changed)
