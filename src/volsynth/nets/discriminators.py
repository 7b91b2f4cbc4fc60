"""Discriminators for the multi-resolution GAN: a voxel-wise multi-resolution UNet and a global binary one.

The discriminator file of the authors' release (juhha/3D-mADUNet ``codes/model/simpleunet.py``) is not public, so the
UNet below is our own design constrained by what *is* known: unconditional 1-channel input, base width 8 with 4 levels
(8/16/32/64), LeakyReLU 0.2, nearest resampling, multi-resolution input like the generator, and one voxel-wise logit map
per level (full, 1/2, 1/4, 1/8 resolution). The paper says spectral normalisation follows each activation; we spectrally
normalise every hidden conv (all except the per-level input convs and the logit heads), as the predecessor's Real-ESRGAN
UNet discriminator does (juhha/3dRRDBGANP ``unet_disc.py``; an assumption).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from volsynth.nets.blocks import check_divisible, conv, make_pyramid, resize, scaled_size
from volsynth.nets.mdaunet import DIVISOR, LEVELS, level_key


def _double_conv(spatial_dims: int, in_channels: int, out_channels: int, negative_slope: float,
                 spectral: bool) -> nn.Sequential:
    return nn.Sequential(
        conv(spatial_dims, in_channels, out_channels, spectral=spectral), nn.LeakyReLU(negative_slope),
        conv(spatial_dims, out_channels, out_channels, spectral=spectral), nn.LeakyReLU(negative_slope),
    )


class MultiResUNetDiscriminator(nn.Module):
    """Voxel-wise 4-level UNet discriminator with multi-resolution input and output.

    Args:
        spatial_dims: 2 or 3.
        in_channels: image channels (1; unconditional — the source is not concatenated, as in the release).
        base_channels: level-0 width; levels use b, 2b, 4b, 8b (the paper: 8).
        multires_input: feed pyramid levels 1..3 through their own input conv into encoder levels 1..3.
        pyramid: resampling that builds missing pyramid levels from ``level_0``.
        downsample / upsample: resampling between levels (``nearest`` as the release's config).
        spectral: spectral norm on the hidden convs.
        negative_slope: LeakyReLU slope.

    Input: ``(B, C, *spatial)`` or ``{"level_0": ..., "level_k": (B, C, *spatial / 2**k)}``; spatial sizes
    must be multiples of 8. Output: ``{"level_k": (B, 1, *spatial / 2**k)}`` raw logits for k = 0..3.
    """

    def __init__(self, spatial_dims: int = 3, in_channels: int = 1, *, base_channels: int = 8,
                 multires_input: bool = True, pyramid: str = "nearest", downsample: str = "nearest",
                 upsample: str = "nearest", spectral: bool = True, negative_slope: float = 0.2) -> None:
        super().__init__()
        self.spatial_dims = spatial_dims
        self.multires_input = multires_input
        self.pyramid_mode = pyramid
        self.downsample_mode = downsample
        self.upsample_mode = upsample
        b = base_channels
        widths = [b * 2**k for k in range(LEVELS)]
        self.input_convs = nn.ModuleList(
            conv(spatial_dims, in_channels, b) for _ in range(LEVELS if multires_input else 1)
        )
        self.act = nn.LeakyReLU(negative_slope)
        self.encoder = nn.ModuleList(
            _double_conv(spatial_dims, b if k == 0 else widths[k - 1] + (b if multires_input else 0), widths[k],
                         negative_slope, spectral)
            for k in range(LEVELS)
        )
        self.decoder = nn.ModuleList(
            _double_conv(spatial_dims, widths[k + 1] + widths[k], widths[k], negative_slope, spectral)
            for k in range(LEVELS - 2, -1, -1)
        )
        self.heads = nn.ModuleDict({level_key(k): conv(spatial_dims, widths[k], 1) for k in range(LEVELS)})

    @property
    def output_levels(self) -> tuple[str, ...]:
        return tuple(level_key(k) for k in range(LEVELS))

    def forward(self, x: Tensor | Mapping[str, Tensor]) -> dict[str, Tensor]:
        levels = dict(x) if isinstance(x, Mapping) else {level_key(0): x}
        image = levels[level_key(0)]
        shape = image.shape[2:]
        check_divisible(shape, DIVISOR, "MultiResUNetDiscriminator")
        if self.multires_input and any(level_key(k) not in levels for k in range(1, LEVELS)):
            pyramid = make_pyramid(image, LEVELS, self.pyramid_mode)
            levels = {**pyramid, **levels}

        skips: list[Tensor] = []
        h = image
        for level in range(LEVELS):
            if level == 0:
                h = self.act(self.input_convs[0](image))
            else:
                h = resize(h, scaled_size(shape, level), self.downsample_mode)
                if self.multires_input:
                    feature = self.act(self.input_convs[level](levels[level_key(level)]))
                    h = torch.cat([feature, h], dim=1)
            h = self.encoder[level](h)
            skips.append(h)

        outputs = {level_key(LEVELS - 1): self.heads[level_key(LEVELS - 1)](h)}
        for index, level in enumerate(range(LEVELS - 2, -1, -1)):
            h = resize(h, scaled_size(shape, level), self.upsample_mode)
            h = self.decoder[index](torch.cat([h, skips[level]], dim=1))
            outputs[level_key(level)] = self.heads[level_key(level)](h)
        return dict(sorted(outputs.items()))


class BinaryDiscriminator(nn.Module):
    """Plain global discriminator for the Table 2 ablation ("U-Net D." replaced by a binary D).

    Four stride-2 4-cube convs (widths b, 2b, 4b, 8b; spectral norm on all but the first), LeakyReLU, global
    average pooling and a linear layer → one logit per sample. Takes only full resolution; a pyramid dict is
    accepted and its ``level_0`` used.

    Input: ``(B, C, *spatial)`` (any size ≥ 16 per axis). Output: ``{"level_0": (B, 1)}`` logits.
    """

    def __init__(self, spatial_dims: int = 3, in_channels: int = 1, *, base_channels: int = 8,
                 spectral: bool = True, negative_slope: float = 0.2) -> None:
        super().__init__()
        b = base_channels
        widths = [b * 2**k for k in range(LEVELS)]
        layers: list[nn.Module] = []
        previous = in_channels
        for index, width in enumerate(widths):
            layers += [conv(spatial_dims, previous, width, 4, stride=2, padding=1, spectral=spectral and index > 0),
                       nn.LeakyReLU(negative_slope)]
            previous = width
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(previous, 1)
        self.min_size = 2**LEVELS

    @property
    def output_levels(self) -> tuple[str, ...]:
        return (level_key(0),)

    def forward(self, x: Tensor | Mapping[str, Tensor]) -> dict[str, Tensor]:
        image = x[level_key(0)] if isinstance(x, Mapping) else x
        if min(image.shape[2:]) < self.min_size:
            raise ValueError(f"BinaryDiscriminator needs at least {self.min_size} voxels per axis (four stride-2 "
                             f"convs), got shape {tuple(image.shape[2:])}")
        h = self.features(image)
        return {level_key(0): self.classifier(h.flatten(2).mean(dim=2))}
