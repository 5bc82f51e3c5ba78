"""Reconstruction (MSE + LPIPS) and adversarial losses, the adaptive GAN weight."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import torchvision

from lasers_dist.losses import (
    GANDiagnostics,
    ReconstructionLoss,
    adaptive_weight,
    backbone_weights_path,
    disc_factor,
    discriminator_loss,
    generator_loss,
)


@pytest.fixture
def empty_torch_home(tmp_path, monkeypatch):
    """A TORCH_HOME with no cached weights (torch reads the variable at call time)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    return tmp_path


def images(batch: int, size: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, size, size, generator=generator) * 2 - 1


def test_random_backbone_loss_is_the_weighted_sum_with_finite_gradients(empty_torch_home):
    with pytest.warns(UserWarning, match="not the LPIPS metric"):
        loss_fn = ReconstructionLoss(0.3, lpips_net="alex", random_backbone=True)
    target = images(2, 64, seed=0)
    recon = images(2, 64, seed=1).requires_grad_(True)
    loss, parts = loss_fn(recon, target)
    assert set(parts) == {"mse", "lpips"} and not parts["lpips"].requires_grad
    with torch.no_grad():
        mse = F.mse_loss(recon, target)
        perceptual = loss_fn.lpips(recon, target).mean()
    torch.testing.assert_close(parts["mse"], mse)
    torch.testing.assert_close(parts["lpips"], perceptual)
    torch.testing.assert_close(loss.detach(), 0.7 * mse + 0.3 * perceptual)
    assert perceptual > 0
    assert loss_fn(target, target)[1]["lpips"].abs() < 1e-6  # a distance: zero for identical images

    loss.backward()
    assert torch.isfinite(recon.grad).all() and recon.grad.abs().sum() > 0


def test_lpips_is_frozen_and_stays_in_eval_mode(empty_torch_home):
    with pytest.warns(UserWarning):
        loss_fn = ReconstructionLoss(0.5, random_backbone=True)
    loss_fn.train()
    assert not loss_fn.lpips.training and not any(m.training for m in loss_fn.lpips.modules())
    assert not any(p.requires_grad for p in loss_fn.parameters())
    x, y = images(2, 32, seed=0), images(2, 32, seed=1)
    # Dropout off: two calls agree.
    torch.testing.assert_close(loss_fn(x, y)[0], loss_fn(x, y)[0])


@pytest.mark.parametrize(
    "net,file_name",
    [("alex", "alexnet-owt-7be5be79.pth"), ("vgg", "vgg16-397923af.pth"), ("squeeze", "squeezenet1_1-b8a52dc0.pth")],
)
def test_missing_backbone_weights_raise_file_not_found_naming_file_and_folder(empty_torch_home, net, file_name):
    folder = empty_torch_home / "hub" / "checkpoints"
    assert backbone_weights_path(net) == folder / file_name
    with pytest.raises(FileNotFoundError) as error:
        ReconstructionLoss(0.5, lpips_net=net)
    message = str(error.value)
    assert file_name in message and str(folder) in message
    assert "loss.perceptual_weight=0" in message and "loss.lpips_random_backbone=true" in message


def test_backbone_weights_are_loaded_from_the_checked_file(empty_torch_home):
    # A (random) SqueezeNet state dict under the expected name: LPIPS must load exactly this file, which proves
    # the path we check is the one torchvision reads. SqueezeNet keeps the file small (5 MB).
    torch.manual_seed(0)
    weights = torchvision.models.squeezenet1_1(weights=None).state_dict()
    path = backbone_weights_path("squeeze")
    path.parent.mkdir(parents=True)
    torch.save(weights, path)
    loss_fn = ReconstructionLoss(0.5, lpips_net="squeeze")
    torch.testing.assert_close(loss_fn.lpips.net.slice1[0].weight, weights["features.0.weight"])
    loss, parts = loss_fn(images(1, 32, seed=0), images(1, 32, seed=1))
    assert torch.isfinite(loss) and parts["lpips"] > 0


def test_zero_perceptual_weight_builds_no_lpips(empty_torch_home):
    loss_fn = ReconstructionLoss(0.0, lpips_net="alex")  # no weights file needed
    assert loss_fn.lpips is None and list(loss_fn.parameters()) == []
    x, y = images(2, 16, seed=0), images(2, 16, seed=1)
    loss, parts = loss_fn(x, y)
    assert set(parts) == {"mse"}
    torch.testing.assert_close(loss, F.mse_loss(x, y))


def test_reconstruction_loss_rejects_bad_settings(empty_torch_home):
    with pytest.raises(ValueError, match="perceptual_weight"):
        ReconstructionLoss(1.5)
    with pytest.raises(ValueError, match="lpips_net"):
        ReconstructionLoss(0.5, lpips_net="resnet")
    with pytest.raises(ValueError, match="shape"):
        ReconstructionLoss(0.0)(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 4))


REAL = torch.tensor([2.0, 0.5, -1.0])
FAKE = torch.tensor([-2.0, 0.5, 2.5])


def softplus(value: float) -> float:
    return math.log1p(math.exp(value))


def test_hinge_losses_on_known_logits():
    # relu(1 - real) = [0, 0.5, 2] (mean 5/6), relu(1 + fake) = [0, 1.5, 3.5] (mean 5/3)
    assert discriminator_loss(REAL, FAKE, "hinge").item() == pytest.approx(0.5 * (5 / 6 + 5 / 3))
    assert generator_loss(FAKE, "hinge").item() == pytest.approx(-1 / 3)


def test_non_saturating_losses_on_known_logits():
    expected_disc = 0.5 * (sum(softplus(-r) for r in REAL.tolist()) / 3 + sum(softplus(f) for f in FAKE.tolist()) / 3)
    expected_gen = sum(-math.log(1 / (1 + math.exp(-f))) for f in FAKE.tolist()) / 3  # -log sigmoid
    assert discriminator_loss(REAL, FAKE, "non_saturating").item() == pytest.approx(expected_disc, rel=1e-6)
    assert generator_loss(FAKE, "non_saturating").item() == pytest.approx(expected_gen, rel=1e-6)


def test_gan_losses_reject_unknown_kind():
    with pytest.raises(ValueError, match="loss.gan_loss"):
        generator_loss(FAKE, "wasserstein")
    with pytest.raises(ValueError, match="loss.gan_loss"):
        discriminator_loss(REAL, FAKE, "lsgan")


def tiny_generator_losses(gan_scale: float):
    """out = W x with W (2, 3): recon = ||out - t||^2, gan = -gan_scale * <c, out>.

    d recon / dW = 2 (out - t) x^T and d gan / dW = -gan_scale c x^T are outer products, so their Frobenius
    norms are products of vector norms.
    """
    last = torch.nn.Parameter(torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.25, -0.5]]))
    x = torch.tensor([1.0, 2.0, -1.0])
    target = torch.tensor([0.3, -0.7])
    c = torch.tensor([0.6, -0.8])
    out = last @ x
    recon = ((out - target) ** 2).sum()
    gan = -gan_scale * (c * out).sum()
    recon_norm = (2 * (out.detach() - target)).norm() * x.norm()
    gan_norm = gan_scale * c.norm() * x.norm()
    return last, recon, gan, recon_norm, gan_norm


def test_adaptive_weight_equals_hand_computation_and_keeps_the_graph():
    last, recon, gan, recon_norm, gan_norm = tiny_generator_losses(gan_scale=3.0)
    weight = adaptive_weight(recon, gan, last)
    torch.testing.assert_close(weight, recon_norm / (gan_norm + 1e-6))
    assert weight.ndim == 0 and not weight.requires_grad
    (recon + weight * gan).backward()  # the graph survived both autograd.grad calls
    assert last.grad is not None


def test_adaptive_weight_is_clamped():
    last, recon, gan, recon_norm, _ = tiny_generator_losses(gan_scale=0.0)  # GAN gradient 0
    assert recon_norm / 1e-6 > 1e4
    assert adaptive_weight(recon, gan, last).item() == 1e4
    last, recon, gan, recon_norm, gan_norm = tiny_generator_losses(gan_scale=0.1)
    assert recon_norm / gan_norm > 2.0
    assert adaptive_weight(recon, gan, last, max_weight=2.0).item() == 2.0


def test_disc_factor_switches_on_at_disc_start():
    assert disc_factor(0, 10) == 0.0 and disc_factor(9, 10) == 0.0
    assert disc_factor(10, 10) == 1.0 and disc_factor(11, 10, factor=0.5) == 0.5
    assert disc_factor(0, 0) == 1.0


def test_gan_diagnostics_reduce_and_detach():
    logits_real = torch.tensor([[[[1.0, 3.0]]]], requires_grad=True)
    logits_fake = torch.tensor([[[[-2.0, 0.0]]]], requires_grad=True)
    disc_loss = discriminator_loss(logits_real, logits_fake)
    diagnostics = GANDiagnostics.from_step(torch.tensor(0.5), logits_real, logits_fake, disc_loss)
    values = diagnostics.as_dict("train/")
    assert set(values) == {"train/disc_weight", "train/logits_real", "train/logits_fake", "train/disc_loss"}
    assert values["train/logits_real"].item() == 2.0 and values["train/logits_fake"].item() == -1.0
    assert not any(v.requires_grad for v in values.values())


def test_adaptive_weight_reduces_the_gradients_before_the_norms():
    """The data-parallel hook sees both gradients stacked; here it halves the GAN one, doubling lambda."""
    last, recon, gan, recon_norm, gan_norm = tiny_generator_losses(gan_scale=3.0)
    seen = []

    def halve_gan(grads: torch.Tensor) -> torch.Tensor:
        seen.append(tuple(grads.shape))
        return grads * torch.tensor([1.0, 0.5]).view(2, *([1] * (grads.ndim - 1)))

    weight = adaptive_weight(recon, gan, last, reduce_grads=halve_gan)
    assert seen == [(2, *last.shape)]
    torch.testing.assert_close(weight, recon_norm / (0.5 * gan_norm + 1e-6))
