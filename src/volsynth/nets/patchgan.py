"""PatchGAN discriminator (pix2pix "basic"/"n_layers") in 2D/3D, with its pix2pix-family companions.

Layout (junyanz/pytorch-CycleGAN-and-pix2pix ``NLayerDiscriminator``): ``C64`` (k4 s2, no norm) → ``n_layers - 1``
more k4 s2 convs doubling the width up to 8×ndf → one k4 **s1** conv (width ``min(2**n_layers, 8)·ndf``) → a k4 s1
conv to one channel of raw logits. LeakyReLU 0.2 after every conv but the last, norm on all middle convs. With
``n_layers = 3`` this is the "70×70 PatchGAN": one output voxel sees a 70³ input cube (:func:`receptive_field`).

Also here, because every GAN method of the pix2pix family shares them:

- :func:`init_gan_weights` — pix2pix/CycleGAN's ``init_type='normal'``: conv weights ~ N(0, 0.02), norm scale
  ~ N(1, 0.02), biases 0 (junyanz ``models/networks.py`` ``init_weights``);
- :class:`ImagePool` — the history buffer of synthetic images shown to the discriminator (Shrivastava et al.
  2017; CycleGAN ``pool_size`` 50, Ea-GAN 4), checkpointed through ``get_extra_state``.
"""

from __future__ import annotations

from typing import Any

import torch
from monai.networks.layers.factories import Conv
from torch import Tensor, nn

from volsynth.nets.resunet import NormKind, make_norm

KERNEL_SIZE = 4  # pix2pix's kw = 4 for every PatchGAN conv


def layer_specs(n_layers: int) -> list[tuple[int, int]]:
    """``(kernel, stride)`` of each conv of an ``n_layers`` PatchGAN, input side first."""
    return [(KERNEL_SIZE, 2)] * n_layers + [(KERNEL_SIZE, 1), (KERNEL_SIZE, 1)]


def receptive_field(n_layers: int = 3) -> int:
    """Receptive field (voxels per axis) of one output voxel: ``r ← (r − 1)·stride + kernel`` from the output back.

    ``n_layers = 3`` gives 70 (the pix2pix "70×70 PatchGAN"), 1 → 16, 2 → 34, 4 → 142, 5 → 286.
    """
    field = 1
    for kernel, stride in reversed(layer_specs(n_layers)):
        field = (field - 1) * stride + kernel
    return field


def output_size(input_size: int, n_layers: int = 3, padding: int = 1) -> int:
    """Output grid length per axis for an input of ``input_size`` voxels (``⌊(n + 2p − k)/s⌋ + 1`` per conv).

    With ``padding = 1``: 64 → 6, 96 → 10, 128 → 14, 256 → 30 (as the official ``NLayerDiscriminator``); Ea-GAN's
    padding 2 gives 128 → 19.
    """
    size = input_size
    for kernel, stride in layer_specs(n_layers):
        size = (size + 2 * padding - kernel) // stride + 1
    return size


def smallest_input(n_layers: int = 3, padding: int = 1) -> int:
    """Smallest input length per axis a critic can train on: every normalised conv keeps ≥ 2 voxels per axis.

    Instance norm needs more than one value per channel, and the logit grid is then ≥ 1. With ``padding = 1``:
    1 layer → 6, 2 → 12, 3 → 24 (a 16³ patch leaves the 3-layer critic one voxel before its last conv); Ea-GAN's
    padding 2, 3 layers → 2.
    """
    specs = layer_specs(n_layers)[:-1]  # up to the last normalised conv
    size = 1
    while True:
        grids, grid = [], size
        for kernel, stride in specs:
            grid = (grid + 2 * padding - kernel) // stride + 1
            grids.append(grid)
        if min(grids[1:]) >= 2:  # every conv after the first is normalised
            return size
        size += 1


class PatchDiscriminator(nn.Module):
    """PatchGAN critic: ``(B, in_channels, *S)`` → ``(B, 1, *S')`` raw logits, one per receptive-field patch.

    Args:
        spatial_dims: 2 or 3.
        in_channels: 2 for a conditional pix2pix critic on ``concat(source, image)``, 1 for CycleGAN's unconditional
            critic, 3 for dEa-GAN's ``(source, image, Sobel(image))``.
        channels: width of the first conv (pix2pix ``ndf``, 64).
        n_layers: number of stride-2 convs (3 → 70³ receptive field).
        norm: ``batch`` (pix2pix, Ea-GAN), ``instance`` (CycleGAN) or ``none``.
        padding: 1 (pix2pix today) or 2 (Ea-GAN's older ``ceil((kw − 1)/2)``); the receptive field does not depend
            on it, only the output grid and the border handling.

    Convs followed by BatchNorm carry no bias (as pix2pix: the norm's shift makes it redundant).
    """

    def __init__(self, spatial_dims: int = 3, in_channels: int = 2, channels: int = 64, n_layers: int = 3,
                 norm: NormKind = "batch", padding: int = 1) -> None:
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers must be ≥ 1, got {n_layers}")
        conv = Conv[Conv.CONV, spatial_dims]
        bias = norm != "batch"
        layers: list[nn.Module] = [
            conv(in_channels, channels, kernel_size=KERNEL_SIZE, stride=2, padding=padding),
            nn.LeakyReLU(0.2, inplace=True),
        ]
        width = channels
        for index, (kernel, stride) in enumerate(layer_specs(n_layers)[1:-1], start=1):
            next_width = channels * min(2**index, 8)
            layers += [
                conv(width, next_width, kernel_size=kernel, stride=stride, padding=padding, bias=bias),
                make_norm(norm, spatial_dims, next_width),
                nn.LeakyReLU(0.2, inplace=True),
            ]
            width = next_width
        layers.append(conv(width, 1, kernel_size=KERNEL_SIZE, stride=1, padding=padding))
        self.model = nn.Sequential(*layers)
        self.n_layers = n_layers
        self.padding = padding

    @property
    def receptive_field(self) -> int:
        return receptive_field(self.n_layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


def init_gan_weights(module: nn.Module, std: float = 0.02) -> nn.Module:
    """pix2pix/CycleGAN ``init_type='normal'``: conv/linear weights ~ N(0, std), norm scale ~ N(1, std), biases 0.

    Returns ``module`` (initialised in place). Uses the global torch RNG, like any module construction.
    """
    for child in module.modules():
        if isinstance(child, nn.modules.conv._ConvNd | nn.Linear):
            nn.init.normal_(child.weight, 0.0, std)
            if child.bias is not None:
                nn.init.zeros_(child.bias)
        elif isinstance(child, nn.modules.batchnorm._NormBase) and child.weight is not None:
            nn.init.normal_(child.weight, 1.0, std)
            nn.init.zeros_(child.bias)
    return module


class ImagePool(nn.Module):
    """History of synthetic images for the discriminator (CycleGAN's ``ImagePool``, junyanz ``util/image_pool.py``).

    :meth:`query` takes a batch ``(B, C, *S)`` and returns a batch of the same shape. Per image: while the pool holds
    fewer than ``size`` images the image is stored and returned; once full, with probability 0.5 a random stored
    image is returned and replaced by the new one, otherwise the new image is returned. ``size = 0`` disables the
    pool (the input comes back unchanged). Randomness comes only from the ``torch.Generator`` passed in, so a run
    reseeded per iteration replays the same choices. The stored images are detached and travel with the module's
    ``state_dict`` (``get_extra_state``), so a resumed run sees the same history.
    """

    def __init__(self, size: int) -> None:
        super().__init__()
        if size < 0:
            raise ValueError(f"pool size must be ≥ 0, got {size}")
        self.size = size
        self.images: list[Tensor] = []

    def __len__(self) -> int:
        return len(self.images)

    @torch.no_grad()
    def query(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        if self.size == 0:
            return images
        returned: list[Tensor] = []
        for image in images.detach():
            image = image.unsqueeze(0)
            if len(self.images) < self.size:
                self.images.append(image.clone())
                returned.append(image)
            elif float(torch.rand((), generator=generator)) > 0.5:
                index = int(torch.randint(len(self.images), (), generator=generator))
                returned.append(self.images[index].to(image.device, image.dtype))
                self.images[index] = image.clone()
            else:
                returned.append(image)
        return torch.cat(returned, dim=0)

    def get_extra_state(self) -> dict[str, Any]:
        return {"size": self.size, "images": list(self.images)}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        if state["size"] != self.size:
            raise ValueError(f"image pool of size {self.size} cannot load a pool of size {state['size']}")
        self.images = [image.clone() for image in state["images"]]
