"""DRIT++-style disentangling networks (concat mode) for HiFi-Syn, in 2D (or 3D) with a width scale.

HiFi-Syn [HFS §3.1] builds on DRIT++ (Lee et al., IJCV 2020; ``HsinYingLee/DRIT`` ``src/networks.py``) and "omits
unnecessary details", so the layouts below restate DRIT++'s, except where HiFi-Syn says otherwise:

- :class:`ContentEncoders`: per domain, conv7×7 s1 → ``b`` (LeakyReLU, no norm), two conv3×3 s2 (InstanceNorm,
  ReLU) → ``2b`` → ``4b``, three residual blocks; then one residual block **shared** by both domains, plus additive
  N(0, σ²) noise in training (DRIT++'s ``GaussianNoiseLayer``). ``b = 64`` gives the 256-channel content map at
  1/4 resolution [HFS §4.2: 54×54×256 from a 216² input].
- :class:`AttributeEncoder`: HiFi-Syn's memory stores *per-pixel* attribute values of dimension C = 256 and Eq. 5
  updates them per pixel, so DRIT++'s 8-d global code cannot feed it. This encoder is DRIT++'s ``E_attr``
  front end (conv7×7 s1, two conv4×4 s2, ReLU, no norm: a norm would erase the appearance the attribute should
  carry), kept spatial at 1/4 resolution, with two conv3×3 for context and a conv1×1 to C. Its output is
  L2-normalised per pixel (NOT IN PAPER) so that the encoder's attribute (self-reconstruction, Eq. 14) lives in the
  same unit-norm space as the memory values (normalised by Eq. 5) the generator reads in translation.
- :class:`Generators`: DRIT++'s ``G_concat``: one residual block shared by both domains on the content, then per
  domain the channel-wise concatenation with the attribute map [HFS §3.2.1] (4b + C = 512 channels at full width),
  three residual blocks, two transposed conv3×3 s2 (LayerNorm, ReLU) halving the width, a transposed conv1×1 to
  the output and tanh. DRIT++ concatenates its tiled 8-d code again before every up-sampling; a spatial 256-d
  attribute would make those layers far wider than DRIT++'s, so it enters once, at the input.
- :class:`DomainDiscriminator` D_{m_i} [HFS §4.2]: conv3×3 64 → 128 → 256 → 512 → 1024, two more conv3×3 at 1024, a
  conv1×1 to 1. Stride 2, padding 1, LeakyReLU, no norm as DRIT++'s ``Dis`` (the paper gives none of them).
- :class:`ContentDiscriminator` D^c [HFS §4.2]: three conv7×7 (256 channels), a conv4×4, a conv1×1 to 1 (DRIT++'s
  ``Dis_content``). DRIT++ asks for InstanceNorm there but its ``if 'norm' == 'Instance'`` never fires, so it
  trains without one; ``norm=False`` is the default here for the same reason.

DRIT++'s ``LeakyReLU()`` has PyTorch's default slope 0.01; it is kept. Convolutions use reflection padding where
DRIT++ does (encoders, residual blocks) and zero padding in the discriminators, whose deep maps shrink to a single
pixel on small inputs (reflection needs a padding smaller than the map). Every network takes ``spatial_dims``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DRIT_LEAKY_SLOPE = 0.01  # DRIT++'s nn.LeakyReLU() default


def _conv(spatial_dims: int) -> type[nn.Conv2d] | type[nn.Conv3d]:
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    return nn.Conv2d if spatial_dims == 2 else nn.Conv3d


def _conv_transpose(spatial_dims: int) -> type[nn.ConvTranspose2d] | type[nn.ConvTranspose3d]:
    return nn.ConvTranspose2d if spatial_dims == 2 else nn.ConvTranspose3d


def _instance_norm(spatial_dims: int, channels: int) -> nn.Module:
    # DRIT++'s nn.InstanceNorm2d(planes): no affine parameters, no running statistics.
    return (nn.InstanceNorm2d if spatial_dims == 2 else nn.InstanceNorm3d)(channels)


class LayerNorm(nn.Module):
    """MUNIT/DRIT++ layer norm: normalise each item over (C, *spatial), then a per-channel scale and shift."""

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        normalised = F.layer_norm(x, x.shape[1:], eps=self.eps)
        return normalised * self.weight.view(shape) + self.bias.view(shape)


class ResidualBlock(nn.Module):
    """DRIT++ ``INSResBlock``: reflect-pad conv3 → IN → ReLU → reflect-pad conv3 → IN, plus the input."""

    def __init__(self, spatial_dims: int, channels: int) -> None:
        super().__init__()
        conv = _conv(spatial_dims)
        self.body = nn.Sequential(
            conv(channels, channels, 3, padding=1, padding_mode="reflect"), _instance_norm(spatial_dims, channels),
            nn.ReLU(inplace=True),
            conv(channels, channels, 3, padding=1, padding_mode="reflect"), _instance_norm(spatial_dims, channels),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class ContentEncoder(nn.Module):
    """One domain's content branch: ``(B, in, *S)`` → ``(B, 4·base, *S/4)`` (before the shared block)."""

    def __init__(self, spatial_dims: int = 2, in_channels: int = 1, base_channels: int = 64) -> None:
        super().__init__()
        conv = _conv(spatial_dims)
        b = base_channels
        self.layers = nn.Sequential(
            conv(in_channels, b, 7, padding=3, padding_mode="reflect"), nn.LeakyReLU(DRIT_LEAKY_SLOPE, inplace=True),
            conv(b, 2 * b, 3, stride=2, padding=1, padding_mode="reflect"), _instance_norm(spatial_dims, 2 * b),
            nn.ReLU(inplace=True),
            conv(2 * b, 4 * b, 3, stride=2, padding=1, padding_mode="reflect"), _instance_norm(spatial_dims, 4 * b),
            nn.ReLU(inplace=True),
            *(ResidualBlock(spatial_dims, 4 * b) for _ in range(3)),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class ContentEncoders(nn.Module):
    """E^c_{m_i}, E^c_{m_j} and their shared last block: ``(B, in, *S)`` → content ``(B, 4·base, *S/4)``.

    Args:
        spatial_dims: 2 (HiFi-Syn's axial slices) or 3.
        in_channels: image channels (1 for MR).
        base_channels: width scale ``b``; the content map has ``4·b`` channels (256 at DRIT++'s b = 64).
        domains: number of domains (2: source m_i = 0, target m_j = 1).
        noise_std: standard deviation of the additive Gaussian noise after the shared block in training
            (DRIT++: 1); 0 disables it. Eval mode never adds noise.
    """

    divisor = 4  # two stride-2 convolutions

    def __init__(self, spatial_dims: int = 2, in_channels: int = 1, base_channels: int = 64, domains: int = 2,
                 noise_std: float = 1.0) -> None:
        super().__init__()
        self.branches = nn.ModuleList(ContentEncoder(spatial_dims, in_channels, base_channels) for _ in range(domains))
        self.shared = ResidualBlock(spatial_dims, 4 * base_channels)
        self.noise_std = float(noise_std)
        self.channels = 4 * base_channels

    def forward(self, x: Tensor, domain: int, *, generator: torch.Generator | None = None) -> Tensor:
        """Content of ``x`` (network scale) from domain ``domain``; ``generator`` draws the training noise."""
        content = self.shared(self.branches[domain](x))
        if self.training and self.noise_std > 0:
            noise = torch.randn(content.shape, generator=generator, dtype=torch.float32,
                                device=generator.device if generator is not None else content.device)
            content = content + self.noise_std * noise.to(device=content.device, dtype=content.dtype)
        return content


class AttributeEncoder(nn.Module):
    """One domain's spatial attribute encoder: ``(B, in, *S)`` → unit-norm ``(B, C, *S/4)`` per-pixel codes.

    Args:
        spatial_dims: 2 or 3.
        in_channels: image channels.
        base_channels: width scale ``b`` (64 in DRIT++); layers ``b → 2b → 4b``.
        attribute_channels: C, the memory value dimension (256 [HFS §4.2: B ∈ R^{T×C}]).
    """

    def __init__(self, spatial_dims: int = 2, in_channels: int = 1, base_channels: int = 64,
                 attribute_channels: int = 256) -> None:
        super().__init__()
        conv = _conv(spatial_dims)
        b = base_channels
        self.layers = nn.Sequential(
            conv(in_channels, b, 7, padding=3, padding_mode="reflect"), nn.ReLU(inplace=True),
            conv(b, 2 * b, 4, stride=2, padding=1, padding_mode="reflect"), nn.ReLU(inplace=True),
            conv(2 * b, 4 * b, 4, stride=2, padding=1, padding_mode="reflect"), nn.ReLU(inplace=True),
            conv(4 * b, 4 * b, 3, padding=1, padding_mode="reflect"), nn.ReLU(inplace=True),
            conv(4 * b, 4 * b, 3, padding=1, padding_mode="reflect"), nn.ReLU(inplace=True),
            conv(4 * b, attribute_channels, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.layers(x), dim=1, eps=1e-8)


class Decoder(nn.Module):
    """One domain's decoder after the shared block: concat(content, attribute) → image on [−1, 1]."""

    def __init__(self, spatial_dims: int, content_channels: int, attribute_channels: int, out_channels: int) -> None:
        super().__init__()
        transpose = _conv_transpose(spatial_dims)
        width = content_channels + attribute_channels
        self.blocks = nn.Sequential(*(ResidualBlock(spatial_dims, width) for _ in range(3)))
        self.up = nn.Sequential(
            transpose(width, width // 2, 3, stride=2, padding=1, output_padding=1), LayerNorm(width // 2),
            nn.ReLU(inplace=True),
            transpose(width // 2, width // 4, 3, stride=2, padding=1, output_padding=1), LayerNorm(width // 4),
            nn.ReLU(inplace=True),
            transpose(width // 4, out_channels, 1), nn.Tanh(),
        )

    def forward(self, content: Tensor, attribute: Tensor) -> Tensor:
        return self.up(self.blocks(torch.cat([content, attribute.to(content.dtype)], dim=1)))


class Generators(nn.Module):
    """G_{m_i}, G_{m_j} (concat mode): ``G(content (B, 4b, *s), attribute (B, C, *s))`` → ``(B, out, *4s)``.

    Args:
        spatial_dims: 2 or 3.
        out_channels: image channels.
        base_channels: width scale ``b`` (content has ``4b`` channels).
        attribute_channels: C.
        domains: number of domains.
    """

    def __init__(self, spatial_dims: int = 2, out_channels: int = 1, base_channels: int = 64,
                 attribute_channels: int = 256, domains: int = 2) -> None:
        super().__init__()
        self.shared = ResidualBlock(spatial_dims, 4 * base_channels)
        self.decoders = nn.ModuleList(Decoder(spatial_dims, 4 * base_channels, attribute_channels, out_channels)
                                      for _ in range(domains))

    def forward(self, content: Tensor, attribute: Tensor, domain: int) -> Tensor:
        """Image of domain ``domain`` (network scale, tanh) from a content map and a same-size attribute map."""
        if content.shape[2:] != attribute.shape[2:]:
            raise ValueError(f"content {tuple(content.shape)} and attribute {tuple(attribute.shape)} differ in size")
        return self.decoders[domain](self.shared(content), attribute)


def domain_discriminator_channels(base_channels: int = 64) -> list[int]:
    """Output channels of D_{m_i}'s convolutions: ``[b, 2b, 4b, 8b, 16b, 16b, 16b, 1]`` (b = 64 [HFS §4.2])."""
    b = base_channels
    return [b, 2 * b, 4 * b, 8 * b, 16 * b, 16 * b, 16 * b, 1]


class DomainDiscriminator(nn.Module):
    """D_{m_i}: seven conv3×3 s2 (LeakyReLU, no norm) and a conv1×1 to raw logits ``(B, 1, *S/128)``.

    Any input size works (each stride-2 conv maps n → ⌈n/2⌉); the loss averages the logits. ``strided`` limits
    the stride-2 convs to the first ``strided`` (the rest use stride 1), which keeps a map of patch logits on
    small slices (the paper's 216² slices give 2×2 logits with all seven strided).
    """

    def __init__(self, spatial_dims: int = 2, in_channels: int = 1, base_channels: int = 64,
                 negative_slope: float = DRIT_LEAKY_SLOPE, strided: int = 7) -> None:
        super().__init__()
        conv = _conv(spatial_dims)
        channels = domain_discriminator_channels(base_channels)
        layers: list[nn.Module] = []
        previous = in_channels
        for index, width in enumerate(channels[:-1]):
            stride = 2 if index < strided else 1
            layers += [conv(previous, width, 3, stride=stride, padding=1), nn.LeakyReLU(negative_slope, inplace=True)]
            previous = width
        layers.append(conv(previous, channels[-1], 1))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class ContentDiscriminator(nn.Module):
    """D^c on content maps: three conv7×7 (LeakyReLU), a conv4×4 s1 p0 (LeakyReLU), a conv1×1 → logits.

    Args:
        spatial_dims: 2 or 3.
        channels: content channels (256 at full width); every layer keeps this width, as DRIT++.
        strides: strides of the three 7×7 convs (DRIT++: 2, 2, 2, which needs a ≥ 53-pixel content map).
        padding: their zero padding (DRIT++: 1). Small training crops need smaller strides or more padding
            (:func:`content_discriminator_output_size` checks a configuration).
        norm: InstanceNorm after the 7×7 convs (DRIT++ intends it, its code never applies it).
    """

    def __init__(self, spatial_dims: int = 2, channels: int = 256, strides: Sequence[int] = (2, 2, 2),
                 padding: int = 1, norm: bool = False, negative_slope: float = DRIT_LEAKY_SLOPE) -> None:
        super().__init__()
        conv = _conv(spatial_dims)
        layers: list[nn.Module] = []
        for stride in strides:
            layers.append(conv(channels, channels, 7, stride=int(stride), padding=padding))
            if norm:
                layers.append(_instance_norm(spatial_dims, channels))
            layers.append(nn.LeakyReLU(negative_slope, inplace=True))
        layers += [conv(channels, channels, 4, stride=1, padding=0), nn.LeakyReLU(negative_slope, inplace=True),
                   conv(channels, 1, 1)]
        self.layers = nn.Sequential(*layers)

    def forward(self, content: Tensor) -> Tensor:
        return self.layers(content)


def content_discriminator_output_size(size: int, strides: Sequence[int] = (2, 2, 2), padding: int = 1) -> int:
    """Logit-map length of :class:`ContentDiscriminator` for a content map of ``size`` pixels (≤ 0: too small).

    DRIT++'s layout on HiFi-Syn's 54-pixel content map gives 1.
    """
    for stride in strides:
        size = (size + 2 * padding - 7) // int(stride) + 1
        if size < 1:
            return 0
    return size - 4 + 1


def init_drit_weights(module: nn.Module, std: float = 0.02) -> None:
    """DRIT++'s ``gaussian_weights_init``: convolution weights ~ N(0, std); biases and norms keep PyTorch's init."""
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d | nn.Conv3d | nn.ConvTranspose2d | nn.ConvTranspose3d):
            nn.init.normal_(layer.weight, 0.0, std)
