"""Sobel gradient magnitude and Ea-GAN's edge map / edge L1 loss, in 2D or 3D (no parameters).

Ea-GAN's ``sobelLayer`` (by-lab/Ea-GANs ``models/networks.py``), restated:

1. one 3×3×3 kernel per axis: the difference ``[1, 0, −1]`` along that axis times the smoothing ``[1, 2, 1]``
   along each other axis;
2. pad with a constant (−1: the background on the [−1, 1] scale the GAN works on), correlate, divide by 4;
3. the L2 norm over the axes (Ea-GAN also multiplies by ``3 / c`` with ``c = 3`` directions, i.e. by 1);
4. edge map ``tanh(magnitude)·2 − 1``: a flat region maps to −1, a strong edge towards 1.

So a linear ramp of slope ``a`` per voxel has magnitude ``2a·16 / 4 = 8a`` away from the border and edge map
``tanh(8a)·2 − 1``. The 2D version keeps the same ``8a`` (no division: ``2a·4 = 8a``), i.e. the divisor is
``4 ** (spatial_dims − 2)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

_SMOOTH = (1.0, 2.0, 1.0)
_DIFFERENCE = (1.0, 0.0, -1.0)


def sobel_kernels(spatial_dims: int = 3, *, dtype: torch.dtype = torch.float32,
                  device: torch.device | str | None = None) -> Tensor:
    """The ``spatial_dims`` Sobel kernels as a conv weight ``(spatial_dims, 1, 3, …, 3)``, axis ``i`` in channel i."""
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    smooth = torch.tensor(_SMOOTH, dtype=dtype, device=device)
    difference = torch.tensor(_DIFFERENCE, dtype=dtype, device=device)
    kernels = []
    for axis in range(spatial_dims):
        kernel = torch.ones((3,) * spatial_dims, dtype=dtype, device=device)
        for other in range(spatial_dims):  # outer product by broadcasting: factor ``other`` varies along axis other
            shape = [1] * spatial_dims
            shape[other] = 3
            kernel = kernel * (difference if other == axis else smooth).reshape(shape)
        kernels.append(kernel)
    return torch.stack(kernels).unsqueeze(1)


def sobel_magnitude(image: Tensor, *, pad_value: float = -1.0) -> Tensor:
    """Sobel gradient magnitude of each channel: ``(B, C, *S)`` → ``(B, C, *S)``, same units as ``image`` per voxel.

    ``pad_value`` fills the one-voxel border (Ea-GAN pads its [−1, 1] images with −1; use 0 on a [0, 1] scale).
    Computed in float32 (a Sobel response is a difference of neighbours: bf16 would round it away).
    """
    spatial_dims = image.dim() - 2
    batch, channels = image.shape[:2]
    flat = image.float().reshape(batch * channels, 1, *image.shape[2:])
    with torch.autocast(device_type=image.device.type, enabled=False):  # keep the conv in float32 under AMP
        padded = F.pad(flat, (1, 1) * spatial_dims, mode="constant", value=pad_value)
        conv = F.conv3d if spatial_dims == 3 else F.conv2d
        gradients = conv(padded, sobel_kernels(spatial_dims, device=image.device)) / 4 ** (spatial_dims - 2)
        return torch.linalg.vector_norm(gradients, dim=1).reshape(image.shape)


def eagan_edge_map(image: Tensor, *, pad_value: float = -1.0) -> Tensor:
    """Ea-GAN's edge map ``tanh(sobel_magnitude(image))·2 − 1`` in [−1, 1), shape of ``image``; input on [−1, 1]."""
    return torch.tanh(sobel_magnitude(image, pad_value=pad_value)) * 2 - 1


def edge_l1_loss(synthetic: Tensor, target: Tensor, *, pad_value: float = -1.0) -> Tensor:
    """Ea-GAN's Sobel term: mean ``|edge(synthetic) − edge(target)|`` (scalar); both ``(B, C, *S)`` on [−1, 1].

    The target's edge map carries no gradient (it is data).
    """
    with torch.no_grad():
        target_edges = eagan_edge_map(target, pad_value=pad_value)
    return F.l1_loss(eagan_edge_map(synthetic, pad_value=pad_value), target_edges)
