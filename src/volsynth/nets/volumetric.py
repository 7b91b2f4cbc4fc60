"""Volumetric layers of Make-A-Volume: identity-initialised 1D convolutions along the slice axis [MAV §2.3].

A 2D denoising UNet sees a batch of ``b_s = b_v·n`` slices (``b_v`` volumes of ``n`` slices each, volume-major:
slice ``j`` of volume ``v`` is batch row ``v·n + j``). After every 3×3 spatial ``Conv2d`` of the UNet a volumetric
layer mixes each feature along the ``n`` slices of its own volume [MAV Eqs. 5–7]::

    f' ← Rearrange(f,  (b_v·n) c h w → (b_v·h·w) c n)     (5)
    f' ← l_v(f')                                           (6)  1D conv over n, channels c
    f' ← Rearrange(f', (b_v·h·w) c n → (b_v·n) c h w)      (7)  (the paper prints f here: a typo, or (6) is lost)

Together with the 2D conv it acts as a pseudo-3D (2+1D) convolution. The 1D convs start as the identity
(``nn.init.dirac_`` weights, zero bias) so that inserting them leaves the trained slice model exactly unchanged
[MAV §2.3 "initialize ... as Identity Functions"]. Kernel size, padding and insertion points are not in the paper:
kernel 3 with padding 1 (a kernel of 1 could not mix slices) after every 3×3 conv, the "pseudo 3D conv" reading.

The number of slices per volume is given per forward call (:meth:`VolumetricUNet.forward`'s ``num_slices``);
``None`` bypasses every volumetric layer, so the same network is the purely 2D slice model of stage 1. Volumes
never mix: ``b_v`` stays a batch dimension of the 1D conv.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn


def slices_to_sequences(features: Tensor, num_slices: int) -> Tensor:
    """[MAV Eq. 5] ``(b_v·n, c, h, w)`` → ``(b_v·h·w, c, n)``: every in-plane position of a volume becomes one
    sequence of ``n`` slices (volume-major input: row ``v·n + j`` is slice ``j`` of volume ``v``)."""
    if features.ndim != 4:
        raise ValueError(f"expected (b_v·n, c, h, w) features, got shape {tuple(features.shape)}")
    batch, channels, height, width = features.shape
    if num_slices < 1 or batch % num_slices:
        raise ValueError(f"a batch of {batch} slices is not a whole number of volumes of {num_slices} slices")
    volumes = batch // num_slices
    grouped = features.reshape(volumes, num_slices, channels, height, width)
    return grouped.permute(0, 3, 4, 2, 1).reshape(volumes * height * width, channels, num_slices)


def sequences_to_slices(sequences: Tensor, num_slices: int, height: int, width: int) -> Tensor:
    """[MAV Eq. 7] ``(b_v·h·w, c, n)`` → ``(b_v·n, c, h, w)``, the exact inverse of :func:`slices_to_sequences`."""
    if sequences.ndim != 3 or sequences.shape[-1] != num_slices or sequences.shape[0] % (height * width):
        raise ValueError(f"sequences of shape {tuple(sequences.shape)} do not hold {num_slices} slices of "
                         f"{height}×{width}")
    rows, channels, _ = sequences.shape
    volumes = rows // (height * width)
    grouped = sequences.reshape(volumes, height, width, channels, num_slices)
    return grouped.permute(0, 4, 3, 1, 2).reshape(volumes * num_slices, channels, height, width)


class PseudoConv3d(nn.Module):
    """A spatial ``Conv2d`` followed by its volumetric 1D conv over the slices [MAV Eq. 6].

    ``num_slices`` is set by :class:`VolumetricUNet` for the duration of one forward; ``None`` skips the 1D conv.

    Args:
        spatial: the 2D convolution (kept as it is, weights and all).
        kernel_size: odd length of the 1D kernel along the slice axis (zero padding keeps ``n``).
    """

    def __init__(self, spatial: nn.Conv2d, kernel_size: int = 3) -> None:
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 != 1:
            raise ValueError(f"the volumetric kernel size must be a positive odd integer, got {kernel_size}")
        self.spatial = spatial
        channels = spatial.out_channels
        self.volumetric = nn.Conv1d(channels, channels, kernel_size, padding=kernel_size // 2)
        reset_to_identity(self.volumetric)
        self.num_slices: int | None = None

    def forward(self, x: Tensor) -> Tensor:
        features = self.spatial(x)
        if self.num_slices is None:
            return features
        height, width = features.shape[-2:]
        sequences = self.volumetric(slices_to_sequences(features, self.num_slices))
        return sequences_to_slices(sequences, self.num_slices, height, width)


def reset_to_identity(conv: nn.Conv1d) -> None:
    """Dirac weights (the centre tap of channel ``i`` → channel ``i`` is 1, all else 0) and zero bias."""
    with torch.no_grad():
        nn.init.dirac_(conv.weight)
        if conv.bias is not None:
            conv.bias.zero_()


def insert_volumetric_layers(network: nn.Module, kernel_size: int = 3) -> list[PseudoConv3d]:
    """Replace every 3×3 ``Conv2d`` inside ``network`` by a :class:`PseudoConv3d` wrapping it (in place).

    1×1 convs (skip connections, attention projections) are left alone: they mix no neighbours in-plane either.
    Returns the new layers in module order.
    """
    targets = [(name, module) for name, module in network.named_modules()
               if isinstance(module, nn.Conv2d) and tuple(module.kernel_size) == (3, 3)]
    layers = []
    for name, conv in targets:
        parent_name, _, child = name.rpartition(".")
        parent = network.get_submodule(parent_name) if parent_name else network
        layer = PseudoConv3d(conv, kernel_size)
        setattr(parent, child, layer)
        layers.append(layer)
    return layers


class VolumetricUNet(nn.Module):
    """A 2D diffusion UNet (MONAI ``DiffusionModelUNet``, ``spatial_dims=2``) with volumetric layers inserted.

    ``forward(x, timesteps, num_slices)``: ``x`` is ``(b_v·n, C, h, w)`` volume-major; ``num_slices = n`` turns
    the volumetric layers on, ``None`` runs the plain 2D UNet (stage 1) with the 1D convs skipped.
    """

    def __init__(self, unet: nn.Module, kernel_size: int = 3) -> None:
        super().__init__()
        self.unet = unet
        if not insert_volumetric_layers(self.unet, kernel_size):
            raise ValueError("the network has no 3×3 Conv2d to attach volumetric layers to")

    def volumetric_layers(self) -> list[PseudoConv3d]:
        return [m for m in self.modules() if isinstance(m, PseudoConv3d)]

    def volumetric_parameters(self) -> Iterator[nn.Parameter]:
        """The 1D convs' weights and biases (the only parameters stage 2 trains by default)."""
        for layer in self.volumetric_layers():
            yield from layer.volumetric.parameters()

    def spatial_parameters(self) -> Iterator[nn.Parameter]:
        """Every parameter of the 2D UNet, i.e. all but the volumetric layers."""
        volumetric = {id(p) for p in self.volumetric_parameters()}
        return (p for p in self.parameters() if id(p) not in volumetric)

    def forward(self, x: Tensor, timesteps: Tensor, num_slices: int | None = None) -> Tensor:
        if num_slices is not None and (num_slices < 1 or x.shape[0] % num_slices):
            raise ValueError(f"a batch of {x.shape[0]} slices is not a whole number of volumes of {num_slices}")
        layers = self.volumetric_layers()
        for layer in layers:
            layer.num_slices = num_slices
        try:
            return self.unet(x, timesteps)
        finally:
            for layer in layers:
                layer.num_slices = None
