"""Multi-resolution voxel loss (Ha et al. §3.3, Eq. 3; juhha/3D-mADUNet): L1 (or MSE) at every output level, summed."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from volsynth.nets.blocks import resize

VOXEL_DISTANCES = {"l1": F.l1_loss, "mse": F.mse_loss}
"""Voxel-wise distances by config name: mean |a − b| (the median's loss) or mean (a − b)² (the mean's)."""


def as_level_dict(outputs: Mapping[str, Tensor] | Sequence[Tensor] | Tensor) -> dict[str, Tensor]:
    """Normalise generator outputs to ``{"level_0": full res, "level_1": 1/2, ...}``.

    A tuple/list is read as levels 0, 1, 2, ... in order; a bare tensor is ``level_0``.
    """
    if isinstance(outputs, Tensor):
        return {"level_0": outputs}
    if isinstance(outputs, Mapping):
        return dict(outputs)
    return {f"level_{k}": t for k, t in enumerate(outputs)}


def multires_voxel_loss(outputs: Mapping[str, Tensor] | Sequence[Tensor] | Tensor, target: Tensor,
                        weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0), *, distance: str = "l1",
                        mode: str = "nearest") -> Tensor:
    """Σ_k w_k · mean d(output_k, resample(target, size_k)) over the levels present in ``outputs``.

    Args:
        outputs: per-level predictions ``level_k`` of shape ``(B, C, *spatial / 2**k)`` (dict, tuple in level
            order, or one full-resolution tensor).
        target: ``(B, C, *spatial)`` full-resolution target on the same intensity scale.
        weights: per-level weights indexed by level (the release: 1 each, summed — not averaged).
        distance: ``"l1"`` (the paper: |a − b|) or ``"mse"`` ((a − b)²: the conditional mean, what PSNR and NMSE
            score).
        mode: how the target is brought to each level's size; ``nearest`` as the release.

    Returns:
        Scalar fp32 loss: per-level mean absolute error (target intensity units) or mean squared error (units²),
        weighted sum.
    """
    if distance not in VOXEL_DISTANCES:
        raise ValueError(f"Unknown voxel distance {distance!r}; expected one of {sorted(VOXEL_DISTANCES)}")
    levels = as_level_dict(outputs)
    total = torch.zeros((), device=target.device, dtype=torch.float32)
    for key, prediction in levels.items():
        level = int(key.rsplit("_", 1)[-1])
        if level >= len(weights):
            raise ValueError(f"No voxel-loss weight for {key}: weights has {len(weights)} entries")
        if weights[level] == 0:
            continue
        reference = resize(target, prediction.shape[2:], mode)
        total = total + weights[level] * VOXEL_DISTANCES[distance](prediction.float(), reference.float())
    return total
