"""PatchGAN discriminator (Isola et al. 2017, pix2pix's N-layer discriminator).

    conv4x4/2 (-> C), LeakyReLU(0.2)
    n_layers - 1 times: conv4x4/2 (-> C * min(2^n, 8)), norm, LeakyReLU(0.2)
    conv4x4/1 (-> C * min(2^n_layers, 8)), norm, LeakyReLU(0.2)
    conv4x4/1 (-> 1 logit per patch)

Each output logit judges one input patch; with n_layers = 3 the patch (receptive field) is 70x70.

Normalisation: GroupNorm (default) instead of pix2pix's BatchNorm. BatchNorm's running statistics are buffers
that change in every training-mode forward, including the generator step in which the discriminator is frozen
(requires_grad False does not stop them), so they would be pulled towards fake-only batches; they also depend
on each rank's micro-batch, so ranks would drift apart (DeepSpeed does not re-broadcast buffers), breaking the
"identical weights on every rank" invariant, and batch statistics make a logit depend on the other images of
the batch. GroupNorm is per-sample with no running state, so train and eval modes agree and ranks stay
identical. Like pix2pix's InstanceNorm option it normalises over the whole map, so a logit also sees global
statistics of the image; norm="none" gives strictly local logits (used to check the receptive field).
"""

from __future__ import annotations

from torch import Tensor, nn

from lasers_dist.models.blocks import group_norm

NORMS = ("group", "none")


class PatchDiscriminator(nn.Module):
    """(B, in_channels, H, W) images in [-1, 1] -> (B, 1, H', W') real/fake logits, one per patch.

    For H = 256 and n_layers = 3: H' = 30 (256 -> 128 -> 64 -> 32 -> 31 -> 30).
    """

    def __init__(
        self,
        in_channels: int = 3,
        channels: int = 64,
        n_layers: int = 3,
        norm: str = "group",
        norm_groups: int = 32,
    ) -> None:
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"model.disc_layers must be >= 1, got {n_layers}")
        if norm not in NORMS:
            raise ValueError(f"discriminator norm must be one of {NORMS}, got {norm!r}")

        def norm_layer(width: int) -> nn.Module:
            return group_norm(width, norm_groups) if norm == "group" else nn.Identity()

        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        width = channels
        for n in range(1, n_layers + 1):
            stride = 2 if n < n_layers else 1
            out = channels * min(2**n, 8)
            # The conv before a norm needs no bias: the norm's shift replaces it.
            layers += [
                nn.Conv2d(width, out, 4, stride=stride, padding=1, bias=norm == "none"),
                norm_layer(out),
                nn.LeakyReLU(0.2),
            ]
            width = out
        layers.append(nn.Conv2d(width, 1, 4, stride=1, padding=1))
        self.layers = nn.Sequential(*layers)
        self.apply(_pix2pix_init)

    def forward(self, images: Tensor) -> Tensor:
        return self.layers(images)

    def receptive_field(self) -> int:
        """Side in input pixels of the patch that one output logit sees, from the conv geometry."""
        return receptive_field(self.layers)


def receptive_field(module: nn.Module) -> int:
    """Receptive field of a chain of square convolutions, taken in registration order.

    Walking back from one output pixel, a conv with kernel k and stride s widens a field of r pixels to
    (r - 1) s + k pixels of its input.
    """
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    field = 1
    for conv in reversed(convs):
        field = (field - 1) * conv.stride[0] + conv.kernel_size[0]
    return field


def _pix2pix_init(module: nn.Module) -> None:
    # pix2pix: conv weights ~ N(0, 0.02); norm scales ~ N(1, 0.02), shifts 0.
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.GroupNorm):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)
