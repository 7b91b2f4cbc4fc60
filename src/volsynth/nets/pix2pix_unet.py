"""pix2pix's U-Net generator (``unet_32`` … ``unet_256``) in 2D/3D — the generator of Ea-GAN.

Structure (``UnetGenerator`` in ``models/networks.py`` of junyanz/pytorch-CycleGAN-and-pix2pix and of by-lab/Ea-GANs):
``num_downs`` nested skip-connection blocks. Going in, each block is ``LeakyReLU(0.2) → conv k4 s2 p1 → norm`` (the
outermost block has neither activation nor norm, the innermost no norm); coming out,
``ReLU → transposed conv k4 s2 p1 → norm`` (the outermost ends in ``tanh`` instead of a norm) and the block output is
``concat(up, x)``. Widths: ngf, 2·ngf, 4·ngf, then 8·ngf for every deeper level; dropout 0.5 (optional) after the
``num_downs − 5`` innermost 8·ngf blocks that are neither innermost nor among the outer four.

Ea-GAN's 3D ``unet_128`` is ``num_downs = 7`` (a 128³ input reaches 1³ at the bottleneck), ngf 64: 167.27 M
parameters; the spatial size must be a multiple of ``2 ** num_downs``.
"""

from __future__ import annotations

import torch
from monai.networks.layers.factories import Conv
from torch import Tensor, nn

from volsynth.nets.resunet import NormKind, make_norm


class UNetSkipBlock(nn.Module):
    """One level: ``x`` → ``concat(up(inner(down(h))), h)`` with ``h = LeakyReLU(x)``; the outermost block returns
    ``up(inner(down(x)))`` only. Channels: ``outer`` in and out (``in_channels`` for the outermost input),
    ``inner`` at the level below.

    Why the skip carries ``LeakyReLU(x)`` and not ``x``: pix2pix applies its down-path LeakyReLU *in place*, so the
    tensor it then concatenates as the skip has already been activated. We compute the same function explicitly.
    """

    def __init__(self, spatial_dims: int, outer: int, inner: int, *, in_channels: int | None = None,
                 submodule: nn.Module | None = None, outermost: bool = False, innermost: bool = False,
                 norm: NormKind = "batch", dropout: float = 0.0) -> None:
        super().__init__()
        self.outermost = outermost
        conv = Conv[Conv.CONV, spatial_dims]
        transposed = Conv[Conv.CONVTRANS, spatial_dims]
        bias = norm != "batch"
        down_conv = conv(in_channels or outer, inner, kernel_size=4, stride=2, padding=1, bias=bias)
        up_in = inner if innermost else 2 * inner  # a non-innermost level below returns concat(up, skip)
        self.activation: nn.Module = nn.Identity() if outermost else nn.LeakyReLU(0.2)
        layers: list[nn.Module]
        if outermost:
            layers = [down_conv, submodule or nn.Identity(), nn.ReLU(),
                      transposed(up_in, outer, kernel_size=4, stride=2, padding=1), nn.Tanh()]
        elif innermost:
            layers = [down_conv, nn.ReLU(), transposed(up_in, outer, kernel_size=4, stride=2, padding=1, bias=bias),
                      make_norm(norm, spatial_dims, outer)]
        else:
            layers = [down_conv, make_norm(norm, spatial_dims, inner), submodule or nn.Identity(), nn.ReLU(),
                      transposed(up_in, outer, kernel_size=4, stride=2, padding=1, bias=bias),
                      make_norm(norm, spatial_dims, outer)]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
        self.model = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        if self.outermost:
            return self.model(x)
        h = self.activation(x)
        return torch.cat([self.model(h), h], dim=1)


class Pix2PixUNet(nn.Module):
    """``(B, in_channels, *S)`` → ``(B, out_channels, *S)`` in [-1, 1]; ``S`` multiples of ``2 ** num_downs``.

    Args:
        num_downs: number of stride-2 down-samplings (Ea-GAN ``unet_32/64/128`` = 5/6/7, pix2pix ``unet_256`` = 8).
            Level ``k`` (0 = outermost) has inner width ``ngf·min(2**k, 8)``; for ``num_downs ≥ 5`` this is exactly
            pix2pix's layout, smaller values (≥ 2) keep its outer levels for small test patches.
        channels: ``ngf`` (64 in pix2pix and Ea-GAN).
        norm: ``batch`` (pix2pix, Ea-GAN) or ``instance``.
        dropout: dropout after the decoder of levels ``4 … num_downs − 2`` (pix2pix's ``num_downs − 5`` inner 8·ngf
            blocks; ``--use_dropout``: 0.5; 0 = off).
    """

    def __init__(self, spatial_dims: int = 3, in_channels: int = 1, out_channels: int = 1, num_downs: int = 7,
                 channels: int = 64, norm: NormKind = "batch", dropout: float = 0.0) -> None:
        super().__init__()
        if num_downs < 2:
            raise ValueError(f"num_downs must be ≥ 2, got {num_downs}")
        inner = [channels * min(2**level, 8) for level in range(num_downs)]
        block: nn.Module | None = None
        for level in reversed(range(1, num_downs)):
            block = UNetSkipBlock(spatial_dims, inner[level - 1], inner[level], submodule=block,
                                  innermost=level == num_downs - 1, norm=norm,
                                  dropout=dropout if 4 <= level <= num_downs - 2 else 0.0)
        self.model = UNetSkipBlock(spatial_dims, out_channels, inner[0], in_channels=in_channels, submodule=block,
                                   outermost=True, norm=norm)
        self.divisor = 2**num_downs

    def forward(self, x: Tensor) -> Tensor:
        if any(size % self.divisor for size in x.shape[2:]):
            raise ValueError(f"Pix2PixUNet input size {tuple(x.shape[2:])} must be a multiple of {self.divisor}")
        return self.model(x)
