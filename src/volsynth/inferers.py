"""Inferers: how a network that sees patches or slabs covers a whole preprocessed volume.

A method chooses its inferer (:meth:`volsynth.methods.base.TranslationMethod.make_inferer`); the inferer gets a
*predictor* callable, not the method, so this module stays a leaf under ``methods``:

    predictor(items: Tensor (B, 1, *spatial), generators: list[torch.Generator] | None) -> Tensor (B, 1, *spatial)

* :class:`SlidingWindowInferer`: MONAI's ``sliding_window_inference`` with Gaussian blending, for 3D patch models.
* :class:`SlabInferer`: the volume cut along one axis into slabs of ``depth`` slices (``1`` = single 2D slices,
  ``"all"`` = the whole volume as one item), at the full in-plane extent. Overlapping slabs keep the earlier
  slab's slices (Make-A-Volume's sweep; averaging independent samples would blur them). Every slab draws its
  noise from its own generator, seeded from ``(seed, first slice)``, so the output does not depend on the batch
  size, and the same seed gives the same volume.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np
import torch
from torch import Tensor

Predictor = Callable[[Tensor, "list[torch.Generator] | None"], Tensor]


class Inferer(Protocol):
    """Covers a ``(1, 1, X, Y, Z)`` volume with a predictor's outputs; returns ``(1, 1, X, Y, Z)``."""

    def __call__(self, predictor: Predictor, volume: Tensor, *, seed: int = 0) -> Tensor: ...


def item_generator(seed: int, index: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator for item ``index`` of a volume, independent of how items are batched."""
    state = np.random.SeedSequence([int(seed), int(index)]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator(device=device).manual_seed(int(state % (2**63)))


@dataclass(frozen=True)
class SlidingWindowInferer:
    """Overlapping 3D windows blended with a Gaussian (MONAI ``sliding_window_inference``; the paper's setting).

    Args:
        roi_size: window size in voxels (the training patch).
        overlap: fraction of a window shared with its neighbour along each axis.
        sigma_scale: Gaussian sigma as a fraction of the window.
        batch: windows per forward pass (batched windows keep the CPU's cores busy).
        blend: ``gaussian`` or ``constant`` weighting.
    """

    roi_size: tuple[int, int, int]
    overlap: float = 0.625
    sigma_scale: float = 0.125
    batch: int = 4
    blend: Literal["gaussian", "constant"] = "gaussian"

    def __call__(self, predictor: Predictor, volume: Tensor, *, seed: int = 0) -> Tensor:
        from monai.inferers import sliding_window_inference

        return sliding_window_inference(
            volume, roi_size=self.roi_size, sw_batch_size=self.batch, predictor=lambda w: predictor(w, None),
            overlap=self.overlap, mode=self.blend, sigma_scale=self.sigma_scale, padding_mode="constant",
            cval=0.0, progress=False,
        )


@dataclass(frozen=True)
class SlabInferer:
    """Slabs of ``depth`` consecutive slices along ``axis`` (spatial axis 0–2), full in-plane extent.

    Args:
        axis: the slice axis of the (canonically oriented) volume.
        depth: slices per slab; ``"all"`` = the whole volume in one item.
        overlap: slices shared by consecutive slabs (``depth`` > 1); the earlier slab's values are kept.
        batch: slabs per forward pass.
    """

    axis: int = 2
    depth: int | Literal["all"] = 1
    overlap: int = 0
    batch: int = 8

    def starts(self, length: int) -> list[int]:
        """First slice of every slab; the last slab ends at the last slice."""
        depth = length if self.depth == "all" else int(self.depth)
        if length <= depth:
            return [0]
        stride = max(1, depth - self.overlap)
        starts = list(range(0, length - depth + 1, stride))
        if starts[-1] != length - depth:
            starts.append(length - depth)
        return starts

    def __call__(self, predictor: Predictor, volume: Tensor, *, seed: int = 0) -> Tensor:
        if volume.ndim != 5 or volume.shape[:2] != (1, 1):
            raise ValueError(f"SlabInferer expects a (1, 1, X, Y, Z) volume, got {tuple(volume.shape)}")
        moved = volume.movedim(2 + self.axis, -1)  # slice axis last: (1, 1, A, B, N)
        length = moved.shape[-1]
        depth = length if self.depth == "all" else int(self.depth)
        padded = moved
        if length < depth:  # a volume thinner than one slab: zero slices are added, then dropped
            padded = torch.nn.functional.pad(moved, (0, depth - length))
        starts = self.starts(padded.shape[-1])
        output = torch.zeros_like(padded)
        filled = torch.zeros(padded.shape[-1], dtype=torch.bool)
        for first in range(0, len(starts), self.batch):
            chunk = starts[first:first + self.batch]
            items = torch.cat([padded[..., s:s + depth] for s in chunk], dim=0)
            generators = [item_generator(seed, s, items.device) for s in chunk]
            result = predictor(items, generators)
            for k, s in enumerate(chunk):
                keep = ~filled[s:s + depth]  # slices an earlier slab already produced stay as they are
                index = torch.nonzero(keep).flatten()
                output[..., s + index] = result[k:k + 1, ..., index].to(output.dtype)
                filled[s:s + depth] = True
        return output[..., :length].movedim(-1, 2 + self.axis)


def run_inferer(inferer: Inferer, predictor: Predictor, source: np.ndarray, *, device: torch.device,
                seed: int = 0, mirror_axes: Sequence[int] = ()) -> np.ndarray:
    """Apply ``inferer`` to a preprocessed ``(X, Y, Z)`` array on [0, 1]; returns float32 ``(X, Y, Z)``.

    ``mirror_axes``: test-time mirroring as nnU-Net does it: the source is also flipped along every non-empty
    subset of these axes, each prediction flipped back, and the ``2 ** len(mirror_axes)`` predictions averaged
    (each clipped to [0, 1] first). Every pass draws with the same ``seed``.
    """
    if source.ndim != 3:
        raise ValueError(f"expected a 3D (X, Y, Z) array, got shape {source.shape}")
    axes = tuple(int(a) for a in mirror_axes)
    if len(set(axes)) != len(axes) or not set(axes) <= {0, 1, 2}:
        raise ValueError(f"mirror_axes must be distinct axes among 0, 1, 2, got {list(mirror_axes)}")
    tensor = torch.from_numpy(np.array(source, dtype=np.float32, copy=True))[None, None].to(device)
    flips = [subset for size in range(len(axes) + 1) for subset in itertools.combinations(axes, size)]
    total: torch.Tensor | None = None
    for subset in flips:
        dims = [2 + a for a in subset]
        output = inferer(predictor, tensor.flip(dims) if dims else tensor, seed=seed).float().clamp(0, 1)
        output = output.flip(dims) if dims else output
        total = output if total is None else total + output
    assert total is not None
    return (total[0, 0] / len(flips)).cpu().numpy().astype(np.float32)


def check_multiple(sizes: Sequence[int], divisor: Sequence[int], what: str) -> None:
    """Raise ``ValueError`` when a size is not a multiple of its divisor (names ``what``)."""
    bad = [int(s) for s, d in zip(sizes, divisor, strict=True) if int(s) % int(d)]
    if bad:
        raise ValueError(f"{what} {list(sizes)} must be a multiple of {list(divisor)}")
