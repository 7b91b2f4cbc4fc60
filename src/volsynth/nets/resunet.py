"""UNet with residual blocks, the generator of the 3D FLAIR→T1 "UNet-residual GAN" paper (AdelaideMRI).

The paper (Fig. 2) describes the generator only by its legend: "3×3×3 Conv+BN+ReLU (×2)" blocks with a residual
path, "Max Pooling (by 2)" down, "Up Sampling (by 2)", skip connections, and a final "1×1×1 Conv + Tanh". What
the figure leaves open is decided here and exposed as arguments:

- residual form: ``out = body(x) + shortcut(x)`` with ``body = [Conv3³ → BN → ReLU] × 2`` and ``shortcut`` the
  identity, or a 1³ convolution when the channel count changes. There is no activation after the sum, so a block
  whose convolutions are zeroed is exactly its shortcut (checked in ``tests/test_baselines.py``);
- up-sampling: trilinear interpolation by default (parameter-free, no checkerboard artefacts), nearest or a
  stride-2 transposed convolution as options; the up-sampled map is concatenated with the skip and fed to a
  residual block;
- levels and widths: ``channels`` has one entry per resolution level (paper: not stated); BatchNorm by default
  (the paper's "Bn"), instance norm as an option.

The output is ``tanh``, i.e. on the [-1, 1] scale; methods map [0, 1] data to [-1, 1] before the call and back
after it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from monai.networks.layers.factories import Conv, Norm, Pool
from torch import Tensor, nn

NormKind = Literal["batch", "instance", "none"]
UpsampleKind = Literal["linear", "nearest", "transposed"]


def make_norm(norm: NormKind, spatial_dims: int, channels: int) -> nn.Module:
    """BatchNorm (affine, running statistics), InstanceNorm (CycleGAN's: no affine, no running stats) or identity."""
    if norm == "batch":
        return Norm[Norm.BATCH, spatial_dims](channels)
    if norm == "instance":
        return Norm[Norm.INSTANCE, spatial_dims](channels, affine=False, track_running_stats=False)
    if norm == "none":
        return nn.Identity()
    raise ValueError(f"norm must be 'batch', 'instance' or 'none', got {norm!r}")


class ResidualBlock(nn.Module):
    """``[Conv k3 → norm → ReLU] × 2`` plus a shortcut (identity, or a 1³ conv when channels change).

    Shapes: ``(B, in_channels, *S)`` → ``(B, out_channels, *S)``. The 3³ convolutions have no bias when followed
    by BatchNorm (its shift makes the bias redundant).
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, norm: NormKind = "batch") -> None:
        super().__init__()
        conv = Conv[Conv.CONV, spatial_dims]
        bias = norm != "batch"
        self.body = nn.Sequential(
            conv(in_channels, out_channels, kernel_size=3, padding=1, bias=bias),
            make_norm(norm, spatial_dims, out_channels),
            nn.ReLU(inplace=True),
            conv(out_channels, out_channels, kernel_size=3, padding=1, bias=bias),
            make_norm(norm, spatial_dims, out_channels),
            nn.ReLU(inplace=True),
        )
        self.shortcut: nn.Module = (nn.Identity() if in_channels == out_channels
                                    else conv(in_channels, out_channels, kernel_size=1))

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x) + self.shortcut(x)


class ResUNet(nn.Module):
    """Residual UNet: ``(B, in_channels, *S)`` → ``(B, out_channels, *S)`` in [-1, 1] (tanh).

    ``channels[i]`` is the width at level ``i`` (full resolution first); there are ``len(channels) - 1``
    max-pool down-samplings, so every spatial size must be a multiple of ``2 ** (len(channels) - 1)``
    (:attr:`divisor`).
    """

    def __init__(self, spatial_dims: int = 3, in_channels: int = 1, out_channels: int = 1,
                 channels: Sequence[int] = (32, 64, 128, 256), norm: NormKind = "batch",
                 upsample: UpsampleKind = "linear") -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if len(channels) < 2:
            raise ValueError(f"channels needs at least two levels, got {tuple(channels)}")
        self.spatial_dims = spatial_dims
        self.upsample_mode = upsample
        self.encoder = nn.ModuleList()
        previous = in_channels
        for width in channels:
            self.encoder.append(ResidualBlock(spatial_dims, previous, width, norm))
            previous = width
        self.pool = Pool[Pool.MAX, spatial_dims](kernel_size=2, stride=2)
        self.upsamplers = nn.ModuleList()
        self.decoder = nn.ModuleList()
        for deep, shallow in zip(reversed(channels[1:]), reversed(channels[:-1]), strict=True):
            if upsample == "transposed":
                self.upsamplers.append(Conv[Conv.CONVTRANS, spatial_dims](deep, deep, kernel_size=2, stride=2))
            elif upsample in ("linear", "nearest"):
                self.upsamplers.append(nn.Identity())  # interpolation is parameter-free, done in forward
            else:
                raise ValueError(f"upsample must be 'linear', 'nearest' or 'transposed', got {upsample!r}")
            self.decoder.append(ResidualBlock(spatial_dims, deep + shallow, shallow, norm))
        self.head = nn.Sequential(Conv[Conv.CONV, spatial_dims](channels[0], out_channels, kernel_size=1), nn.Tanh())
        self.divisor = 2 ** (len(channels) - 1)

    def _upsample(self, x: Tensor, index: int) -> Tensor:
        if self.upsample_mode == "transposed":
            return self.upsamplers[index](x)
        if self.upsample_mode == "nearest":
            return nn.functional.interpolate(x, scale_factor=2, mode="nearest")
        mode = "trilinear" if self.spatial_dims == 3 else "bilinear"
        return nn.functional.interpolate(x, scale_factor=2, mode=mode, align_corners=False)

    def forward(self, x: Tensor) -> Tensor:
        if any(size % self.divisor for size in x.shape[2:]):
            raise ValueError(f"ResUNet input size {tuple(x.shape[2:])} must be a multiple of {self.divisor}")
        skips: list[Tensor] = []
        for level, block in enumerate(self.encoder):
            if level > 0:
                x = self.pool(x)
            x = block(x)
            skips.append(x)
        x = skips.pop()  # the bottleneck output
        for index, block in enumerate(self.decoder):
            x = block(torch.cat([self._upsample(x, index), skips.pop()], dim=1))
        return self.head(x)
