"""2.5D perception loss (Ha et al. §3.3, Eq. 4; juhha/3D-mADUNet): VGG-19 relu5_4 feature L1 over 3 views' slices.

A 3D volume ``(B, 1, X, Y, Z)`` is cut into 2D slices along each spatial axis in turn (X → Y×Z planes,
Y → X×Z, Z → X×Y: sagittal, coronal and axial for RAS-ordered volumes); every slice becomes a batch item of a
frozen ImageNet VGG-19, and the loss is the mean absolute difference of the ``features.35`` (relu5_4)
activations of synthetic and target slices. The per-view losses are averaged (= the release's sum over the
three views divided by 3). A 2D input ``(B, 1, H, W)`` is a single view.

Normalisation order. Grey slices in [0, 1] are first replicated to 3 channels and *then* normalised with the
ImageNet per-channel mean/std, so a grey value g becomes ((g − m_R)/s_R, (g − m_G)/s_G, (g − m_B)/s_B), what VGG
saw for a grey photo. The release normalises the 1-channel tensor first (broadcasting it into 3 differently
normalised copies), then splits those into 3 separate samples each repeated to 3 identical channels: VGG then
sees 3 "grey" images per slice normalised with the R, G or B statistics — not an ImageNet-like input, and 3×
the compute. We do not reproduce that.

The VGG is frozen (``requires_grad=False``, eval) and deliberately *not* a registered sub-module: it is not in
``state_dict()`` (checkpoints stay free of ~80 MB of fixed ImageNet weights), not in ``parameters()`` (so
optimisers and parameter counts ignore it), and ``train()`` cannot switch it out of eval mode. ``.to()`` /
``.cuda()`` / dtype casts still move it (see :meth:`PerceptionLoss25D._apply`). Gradients flow to the input.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from volsynth.nets.vgg import IMAGENET_MEAN, IMAGENET_STD, load_vgg, relu_indices


def grey_to_vgg_input(slices: Tensor) -> Tensor:
    """``(N, 1, H, W)`` grey in [0, 1] → ``(N, 3, H, W)`` ImageNet-normalised: replicate, then normalise.

    A 3-channel input is only normalised.
    """
    if slices.shape[1] == 1:
        slices = slices.expand(-1, 3, -1, -1)
    elif slices.shape[1] != 3:
        raise ValueError(f"Perception loss expects 1- or 3-channel slices, got {slices.shape[1]} channels")
    mean = torch.tensor(IMAGENET_MEAN, device=slices.device, dtype=slices.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=slices.device, dtype=slices.dtype).view(1, 3, 1, 1)
    return (slices - mean) / std


def volume_slices(volume: Tensor, axis: int, indices: Tensor | None = None) -> Tensor:
    """Slices of ``(B, C, *spatial)`` along spatial dim ``axis`` (2, 3 or 4) folded into the batch.

    Returns ``(B * n, C, H, W)`` where ``n`` is the number of slices kept (``indices`` or all), ordered
    batch-major.
    """
    if indices is not None:
        volume = volume.index_select(axis, indices.to(volume.device))
    moved = volume.movedim(axis, 1)  # (B, n, C, H, W)
    return moved.reshape(-1, *moved.shape[2:])


class PerceptionLoss25D(nn.Module):
    """2.5D feature L1 between synthetic and target volumes through a frozen 2D feature extractor.

    Args:
        features: a frozen 2D network; a :class:`volsynth.nets.vgg.VGG` is tapped at ``tap`` through
            ``forward_features``; any other module is called on the normalised ``(N, 3, H, W)`` slices.
        tap: index into ``VGG.features`` (35 = relu5_4 of VGG-19; the release's ``features.35``).
        slice_fraction: fraction of slices used per view and step (1.0 = all, as the release); a random subset
            is drawn with the generator passed to :meth:`forward`. The same slices are taken from both volumes.
        chunk_size: slices per feature-extractor call (bounds peak memory of one call).
        checkpoint: recompute the synthetic slices' activations in the backward pass (gradient checkpointing
            per chunk) so training memory does not grow with the number of slices × VGG depth.
    """

    def __init__(self, features: nn.Module, *, tap: int | None = 35, slice_fraction: float = 1.0,
                 chunk_size: int = 64, checkpoint: bool = True) -> None:
        super().__init__()
        if not 0.0 < slice_fraction <= 1.0:
            raise ValueError(f"slice_fraction must be in (0, 1], got {slice_fraction}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        features.eval()
        features.requires_grad_(False)
        # A plain list hides the extractor from nn.Module registration (no state_dict / parameters entries).
        self._extractor: list[nn.Module] = [features]
        self.tap = tap
        self.slice_fraction = slice_fraction
        self.chunk_size = chunk_size
        self.checkpoint = checkpoint
        self.min_size = self._min_size(features, tap)

    @classmethod
    def from_weights(cls, weights: str | Path, *, depth: int = 19, layer: str = "relu5_4",
                     **kwargs: Any) -> PerceptionLoss25D:
        """Build with :func:`load_vgg` (``weights``: local path | ``imagenet`` | ``random``).

        Raises:
            VGGWeightsUnavailable: from :func:`load_vgg`, with instructions for providing the weights.
        """
        taps = relu_indices(depth)
        if layer not in taps:
            raise ValueError(f"Unknown VGG-{depth} layer {layer!r}; choose one of {', '.join(taps)}")
        return cls(load_vgg(depth, weights), tap=taps[layer], **kwargs)

    @property
    def extractor(self) -> nn.Module:
        return self._extractor[0]

    @staticmethod
    def _min_size(features: nn.Module, tap: int | None) -> int:
        layers = getattr(features, "features", None)
        if not isinstance(layers, nn.Sequential) or tap is None:
            return 1
        pools = sum(isinstance(layer, nn.MaxPool2d) for layer in list(layers)[: tap + 1])
        return 2**pools

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> PerceptionLoss25D:
        # Keep the hidden extractor on the same device/dtype as the module it belongs to.
        super()._apply(fn, recurse)
        self.extractor._apply(fn, recurse)
        return self

    def train(self, mode: bool = True) -> PerceptionLoss25D:
        super().train(mode)
        self.extractor.eval()  # frozen: never leaves eval mode
        return self

    def _features(self, slices: Tensor) -> Tensor:
        x = grey_to_vgg_input(slices)
        extractor = self.extractor
        forward_features = getattr(extractor, "forward_features", None)
        if self.tap is not None and callable(forward_features):
            return forward_features(x, [self.tap])[0]
        return extractor(x)

    def _view_loss(self, synthetic: Tensor, target: Tensor) -> Tensor:
        """Mean |f(synthetic) − f(target)| over all slices of one view, ``(N, 1, H, W)`` each."""
        if min(synthetic.shape[2:]) < self.min_size:
            raise ValueError(
                f"2.5D perception loss: slices of size {tuple(synthetic.shape[2:])} are too small for the "
                f"tapped VGG layer, which needs at least {self.min_size} voxels per in-plane axis "
                f"(one halving per max-pool). Use larger patches or disable the perception loss."
            )
        total = torch.zeros((), device=synthetic.device, dtype=torch.float32)
        count = 0
        for start in range(0, synthetic.shape[0], self.chunk_size):
            chunk = synthetic[start:start + self.chunk_size]
            with torch.no_grad():
                reference = self._features(target[start:start + self.chunk_size]).float()
            if self.checkpoint and torch.is_grad_enabled() and chunk.requires_grad:
                predicted = checkpoint(self._features, chunk, use_reentrant=False)
            else:
                predicted = self._features(chunk)
            total = total + F.l1_loss(predicted.float(), reference, reduction="sum")
            count += reference.numel()
        return total / count

    def forward(self, synthetic: Tensor, target: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """2.5D perception loss.

        Args:
            synthetic: ``(B, 1, X, Y, Z)`` (or ``(B, 1, H, W)``) prediction, nominally in [0, 1].
            target: same shape, in [0, 1] (no gradient needed).
            generator: CPU ``torch.Generator`` for slice sampling when ``slice_fraction < 1``
                (``None`` = torch's global RNG).

        Returns:
            Scalar fp32 loss: mean over views of the mean absolute feature difference (feature units).
        """
        if synthetic.shape != target.shape:
            raise ValueError(f"synthetic {tuple(synthetic.shape)} and target {tuple(target.shape)} differ in shape")
        if synthetic.dim() == 4:
            return self._view_loss(synthetic, target)
        if synthetic.dim() != 5:
            raise ValueError(f"Expected (B, C, X, Y, Z) or (B, C, H, W), got shape {tuple(synthetic.shape)}")
        views = []
        for axis in (2, 3, 4):
            n = synthetic.shape[axis]
            indices = None
            if self.slice_fraction < 1.0:
                keep = max(1, round(self.slice_fraction * n))
                indices = torch.randperm(n, generator=generator)[:keep].sort().values
            views.append(self._view_loss(volume_slices(synthetic, axis, indices), volume_slices(target, axis,
                                                                                                  indices)))
        return torch.stack(views).mean()
