"""CycleGAN's ResNet generator (``resnet_9blocks`` / ``resnet_6blocks``) in 2D/3D.

Structure (junyanz/pytorch-CycleGAN-and-pix2pix ``ResnetGenerator``), ported to 3D by swapping the layer types:

    reflect-pad conv k7 → ngf, norm, ReLU
    2 × [conv k3 s2 → ×2 width, norm, ReLU]
    n_blocks × residual block(4·ngf): reflect-pad conv k3, norm, ReLU, reflect-pad conv k3, norm; x + block(x)
    2 × [transposed conv k3 s2 (output padding 1) → ½ width, norm, ReLU]
    reflect-pad conv k7 → out_channels, tanh

Reflection padding is done by the convolutions themselves (``padding_mode="reflect"``), which is the same
operation as a separate ``ReflectionPad`` followed by an unpadded conv. CycleGAN uses InstanceNorm without affine
parameters, so its convs keep their bias; with BatchNorm they drop it (as upstream). No dropout (CycleGAN's
default). Spatial sizes must be multiples of 4 (two stride-2 convs).
"""

from __future__ import annotations

from monai.networks.layers.factories import Conv
from torch import Tensor, nn

from volsynth.nets.resunet import NormKind, make_norm


class ResnetBlock(nn.Module):
    """``x + [conv k3 → norm → ReLU → conv k3 → norm](x)`` with reflection padding; shape preserved."""

    def __init__(self, spatial_dims: int, channels: int, norm: NormKind, bias: bool) -> None:
        super().__init__()
        conv = Conv[Conv.CONV, spatial_dims]
        self.body = nn.Sequential(
            conv(channels, channels, kernel_size=3, padding=1, padding_mode="reflect", bias=bias),
            make_norm(norm, spatial_dims, channels),
            nn.ReLU(inplace=True),
            conv(channels, channels, kernel_size=3, padding=1, padding_mode="reflect", bias=bias),
            make_norm(norm, spatial_dims, channels),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class ResnetGenerator(nn.Module):
    """``(B, in_channels, *S)`` → ``(B, out_channels, *S)`` in [-1, 1]; ``S`` multiples of :attr:`divisor` (4).

    Args:
        spatial_dims: 2 or 3.
        channels: ``ngf``, the width of the first conv (CycleGAN: 64); the residual trunk runs at 4·ngf.
        n_blocks: residual blocks at the lowest resolution (CycleGAN: 9 for 256² images, 6 for 128²).
        norm: ``instance`` (CycleGAN) or ``batch``.
    """

    divisor = 4

    def __init__(self, spatial_dims: int = 3, in_channels: int = 1, out_channels: int = 1, channels: int = 64,
                 n_blocks: int = 9, norm: NormKind = "instance") -> None:
        super().__init__()
        conv = Conv[Conv.CONV, spatial_dims]
        transposed = Conv[Conv.CONVTRANS, spatial_dims]
        bias = norm != "batch"
        layers: list[nn.Module] = [
            conv(in_channels, channels, kernel_size=7, padding=3, padding_mode="reflect", bias=bias),
            make_norm(norm, spatial_dims, channels),
            nn.ReLU(inplace=True),
        ]
        width = channels
        for _ in range(2):
            layers += [conv(width, 2 * width, kernel_size=3, stride=2, padding=1, bias=bias),
                       make_norm(norm, spatial_dims, 2 * width), nn.ReLU(inplace=True)]
            width *= 2
        layers += [ResnetBlock(spatial_dims, width, norm, bias) for _ in range(n_blocks)]
        for _ in range(2):
            layers += [transposed(width, width // 2, kernel_size=3, stride=2, padding=1, output_padding=1, bias=bias),
                       make_norm(norm, spatial_dims, width // 2), nn.ReLU(inplace=True)]
            width //= 2
        layers += [conv(width, out_channels, kernel_size=7, padding=3, padding_mode="reflect"), nn.Tanh()]
        self.model = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        if any(size % self.divisor for size in x.shape[2:]):
            raise ValueError(f"ResnetGenerator input size {tuple(x.shape[2:])} must be a multiple of {self.divisor}")
        return self.model(x)
