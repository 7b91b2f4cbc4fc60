"""Generic building blocks for 2D/3D networks: conv helpers, RDB/RRDB, CBAM and resampling helpers.

Every block takes ``spatial_dims`` (2 or 3) so the same code builds the 3D paper networks and cheap 2D variants for
tests. No normalisation layers appear anywhere (the 3D-mDAUNet release's generator, juhha/3D-mADUNet, has no BN/IN/GN).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm

ResampleMode = Literal["nearest", "linear", "trilinear", "bilinear"]
"""Interpolation for down/up-sampling; ``linear`` means bilinear in 2D and trilinear in 3D (the aliases are
accepted so configs can name the mode either way)."""


def conv_class(spatial_dims: int) -> type[nn.Conv2d] | type[nn.Conv3d]:
    """``nn.Conv2d`` or ``nn.Conv3d`` for ``spatial_dims`` 2 or 3."""
    if spatial_dims == 2:
        return nn.Conv2d
    if spatial_dims == 3:
        return nn.Conv3d
    raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")


def conv(spatial_dims: int, in_channels: int, out_channels: int, kernel_size: int = 3, *, stride: int = 1,
         padding: int | None = None, bias: bool = True, spectral: bool = False) -> nn.Module:
    """A ``kernel_size``-cube convolution ("same" padding by default), optionally spectrally normalised.

    Spectral normalisation (Miyato et al. 2018) is a weight *parametrisation*: it adds the power-iteration
    vectors ``u``/``v`` as buffers, never parameters, so parameter counts are the plain conv's.
    """
    layer = conv_class(spatial_dims)(in_channels, out_channels, kernel_size, stride=stride,
                                     padding=kernel_size // 2 if padding is None else padding, bias=bias)
    return spectral_norm(layer) if spectral else layer


def sn_conv(spatial_dims: int, in_channels: int, out_channels: int, kernel_size: int = 3, *,
            stride: int = 1, bias: bool = True) -> nn.Module:
    """Spectrally normalised convolution (shorthand for ``conv(..., spectral=True)``)."""
    return conv(spatial_dims, in_channels, out_channels, kernel_size, stride=stride, bias=bias, spectral=True)


def interpolation_mode(mode: str, spatial_dims: int) -> str:
    """The ``F.interpolate`` mode for a config mode name (``linear`` → ``bilinear``/``trilinear``)."""
    if mode == "nearest":
        return "nearest"
    if mode in ("linear", "trilinear", "bilinear"):
        return "bilinear" if spatial_dims == 2 else "trilinear"
    raise ValueError(f"Unknown resampling mode {mode!r}; use 'nearest' or 'linear'")


def resize(x: Tensor, size: Sequence[int], mode: str) -> Tensor:
    """Resample ``(B, C, *spatial)`` to ``size`` (PyTorch default ``align_corners=False``; no anti-aliasing).

    Nearest down-sampling by 2 keeps the even-index voxels; linear down-sampling by 2 averages voxel pairs.
    """
    spatial_dims = x.dim() - 2
    if tuple(x.shape[2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(int(s) for s in size), mode=interpolation_mode(mode, spatial_dims))


def scaled_size(shape: Sequence[int], level: int) -> tuple[int, ...]:
    """Spatial size at pyramid ``level`` (each level halves every axis)."""
    return tuple(int(s) // 2**level for s in shape)


def make_pyramid(x: Tensor, levels: int, mode: str) -> dict[str, Tensor]:
    """Multi-resolution pyramid ``{"level_0": x, "level_1": x at 1/2, ..., f"level_{levels-1}"}``.

    Args:
        x: ``(B, C, *spatial)``, every spatial size divisible by ``2 ** (levels - 1)``.
        levels: number of levels (4 for the paper networks).
        mode: ``nearest`` or ``linear`` (each level is resampled directly from ``x``, as the release does).
    """
    return {f"level_{k}": x if k == 0 else resize(x, scaled_size(x.shape[2:], k), mode) for k in range(levels)}


def check_divisible(shape: Sequence[int], divisor: int, network: str) -> None:
    """Raise a ``ValueError`` naming the offending size and the divisor unless every size divides."""
    for axis, size in enumerate(shape):
        if int(size) % divisor:
            raise ValueError(
                f"{network} needs every spatial size to be a multiple of {divisor} (one halving per level); "
                f"got size {int(size)} on spatial axis {axis} of shape {tuple(int(s) for s in shape)}. "
                f"Pad or crop the input, or choose a patch/ROI size divisible by {divisor}."
            )


class ResidualDenseBlock(nn.Module):
    """Residual dense block as in the 3D-mDAUNet release (juhha/3D-mADUNet), an ESRGAN RDB variant.

    ``num_convs`` 3×3(×3) convs; conv ``i < num_convs - 1`` maps ``channels + i * growth`` → ``growth`` and the
    last maps ``channels + (num_convs - 1) * growth`` → ``channels``. LeakyReLU follows *every* conv, the last
    one included (ESRGAN has none on the last; the release does). Output = ``residual_scale * last + input``.
    Convs use Kaiming-normal × 0.1 initialisation with zero bias (ESRGAN's trick that keeps the residual
    branches near zero at the start so the deep block trains stably without normalisation).

    Shapes: ``(B, channels, *spatial)`` → same.
    """

    def __init__(self, spatial_dims: int, channels: int, growth: int, num_convs: int = 5, *,
                 residual_scale: float = 0.2, negative_slope: float = 0.2, init_scale: float = 0.1) -> None:
        super().__init__()
        if num_convs < 2:
            raise ValueError(f"A residual dense block needs at least 2 convs, got {num_convs}")
        self.residual_scale = residual_scale
        self.convs = nn.ModuleList(
            conv(spatial_dims, channels + i * growth, growth if i < num_convs - 1 else channels)
            for i in range(num_convs)
        )
        self.act = nn.LeakyReLU(negative_slope)
        for layer in self.convs:
            assert isinstance(layer, nn.Conv2d | nn.Conv3d)
            nn.init.kaiming_normal_(layer.weight)
            layer.weight.data.mul_(init_scale)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)

    def forward(self, x: Tensor) -> Tensor:
        features = [x]
        out = x
        for index, layer in enumerate(self.convs):
            out = self.act(layer(torch.cat(features, dim=1) if index else x))
            features.append(out)
        return out * self.residual_scale + x


class RRDB(nn.Module):
    """Residual-in-residual dense block: ``num_blocks`` chained RDBs, output ``scale * chain(x) + x``.

    Shapes: ``(B, channels, *spatial)`` → same.
    """

    def __init__(self, spatial_dims: int, channels: int, growth: int, num_blocks: int = 3, num_convs: int = 5, *,
                 residual_scale: float = 0.2, negative_slope: float = 0.2) -> None:
        super().__init__()
        self.residual_scale = residual_scale
        self.blocks = nn.Sequential(*(
            ResidualDenseBlock(spatial_dims, channels, growth, num_convs, residual_scale=residual_scale,
                               negative_slope=negative_slope)
            for _ in range(num_blocks)
        ))

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(x) * self.residual_scale + x


class ChannelAttention(nn.Module):
    """CBAM channel attention: ``x * sigmoid(MLP(avgpool x) + MLP(maxpool x))``.

    The shared MLP is two bias-free 1×1 convs ``C → max(1, C // reduction) → C`` with a ReLU between.
    Shapes: ``(B, C, *spatial)`` → same.
    """

    def __init__(self, spatial_dims: int, channels: int, reduction: int) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        self.mlp = nn.Sequential(
            conv(spatial_dims, channels, hidden, 1, bias=False), nn.ReLU(), conv(spatial_dims, hidden, channels, 1,
                                                                                   bias=False)
        )

    def forward(self, x: Tensor) -> Tensor:
        dims = tuple(range(2, x.dim()))
        avg = x.mean(dim=dims, keepdim=True)
        peak = x.amax(dim=dims, keepdim=True)
        return x * torch.sigmoid(self.mlp(avg) + self.mlp(peak))


class SpatialAttention(nn.Module):
    """CBAM spatial attention: ``x * sigmoid(conv_k([mean_c x, max_c x]))`` with one bias-free k-cube conv.

    Shapes: ``(B, C, *spatial)`` → same.
    """

    def __init__(self, spatial_dims: int, kernel_size: int = 7) -> None:
        super().__init__()
        self.conv = conv(spatial_dims, 2, 1, kernel_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        pooled = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.conv(pooled))


class CBAM(nn.Module):
    """Convolutional block attention module (Woo et al. 2018): channel then spatial attention, no residual.

    In the mDAUNet decoder it merges the concatenation [up-sampled deep features, encoder skip]
    (Ha et al. §3.2 and Fig. 1; the release juhha/3D-mADUNet). Shapes: ``(B, C, *spatial)`` → same.
    """

    def __init__(self, spatial_dims: int, channels: int, reduction: int, kernel_size: int = 7) -> None:
        super().__init__()
        self.channel = ChannelAttention(spatial_dims, channels, reduction)
        self.spatial = SpatialAttention(spatial_dims, kernel_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.spatial(self.channel(x))
