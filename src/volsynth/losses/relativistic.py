"""Voxel-wise adversarial losses: relativistic average BCE (RaGAN) and plain BCE, as pure functions.

Every function takes logit maps of any shape (``(B, 1, *spatial)`` for the voxel-wise UNet discriminator,
``(B, 1)`` for the binary one) and returns a scalar fp32 loss averaged over every element (BCE-with-logits,
nats). The multi-level wrappers sum a per-level weighted loss over the levels of a discriminator's output dict.

Relativistic average GAN (Jolicoeur-Martineau 2019; Ha et al. Eqs. 1 and 5; release
juhha/3D-mADUNet ``codes/loss/``), per level::

    D: ½ [ BCE(D_r − E[D_s], 1) + BCE(D_s − E[D_r], 0) ]
    G: ½ [ BCE(D_r − E[D_s], 0) + BCE(D_s − E[D_r], 1) ],  D_r detached

where D_r = D(target), D_s = D(synthetic). ``mean="global"`` takes E[·] as the scalar mean over batch and all
voxels of that level (the release's ``torch.mean`` without ``dim``); ``mean="batch"`` averages over the batch
only, per voxel (the predecessor 3D-RRDB-GAN).

The release's two defects (``codes/loss/discriminator_loss.py``, ``codes/trainer/srgan_trainer.py``) are *not* in these
functions; :class:`volsynth.methods.mdagan.MDAGAN` reproduces them on request (``adversarial.release_compat``) by how it
calls them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

RelativisticMean = Literal["global", "batch"]


def _bce(logits: Tensor, label: float) -> Tensor:
    logits = logits.float()
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, label))


def relativistic_mean(logits: Tensor, mean: RelativisticMean) -> Tensor:
    """E[logits]: a scalar (``global``) or the batch average per voxel, broadcastable (``batch``)."""
    if mean == "global":
        return logits.float().mean()
    if mean == "batch":
        return logits.float().mean(dim=0, keepdim=True)
    raise ValueError(f"relativistic mean must be 'global' or 'batch', got {mean!r}")


def ragan_discriminator_loss(real_logits: Tensor, synthetic_logits: Tensor, *,
                             mean: RelativisticMean = "global") -> Tensor:
    """½[BCE(D_r − E[D_s], 1) + BCE(D_s − E[D_r], 0)]; gradients flow into both logit maps."""
    real, synthetic = real_logits.float(), synthetic_logits.float()
    return 0.5 * (_bce(real - relativistic_mean(synthetic, mean), 1.0)
                  + _bce(synthetic - relativistic_mean(real, mean), 0.0))


def ragan_generator_loss(real_logits: Tensor, synthetic_logits: Tensor, *,
                         mean: RelativisticMean = "global") -> Tensor:
    """½[BCE(D_r − E[D_s], 0) + BCE(D_s − E[D_r], 1)] with ``real_logits`` detached here.

    The generator receives gradient through ``synthetic_logits`` in both terms (also via E[D_s]).
    """
    real, synthetic = real_logits.detach().float(), synthetic_logits.float()
    return 0.5 * (_bce(real - relativistic_mean(synthetic, mean), 0.0)
                  + _bce(synthetic - relativistic_mean(real, mean), 1.0))


def bce_discriminator_loss(real_logits: Tensor, synthetic_logits: Tensor) -> Tensor:
    """Standard (non-relativistic) GAN: ½[BCE(D_r, 1) + BCE(D_s, 0)]."""
    return 0.5 * (_bce(real_logits, 1.0) + _bce(synthetic_logits, 0.0))


def bce_generator_loss(real_logits: Tensor, synthetic_logits: Tensor) -> Tensor:
    """Non-saturating generator loss BCE(D_s, 1); ``real_logits`` is unused (same signature as RaGAN)."""
    del real_logits
    return _bce(synthetic_logits, 1.0)


def multilevel_loss(loss: str, real: Mapping[str, Tensor], synthetic: Mapping[str, Tensor],
                    weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0), *, side: Literal["discriminator", "generator"],
                    mean: RelativisticMean = "global") -> Tensor:
    """Σ_level w_level · loss(real[level], synthetic[level]) over the levels of ``synthetic``.

    Args:
        loss: ``ragan`` or ``bce``.
        real / synthetic: discriminator logits by level (``level_k`` → ``(B, 1, *spatial / 2**k)``).
        weights: per-level weights indexed by level (the release: 1 each, summed).
        side: which player's loss.
        mean: relativistic expectation (``ragan`` only).
    """
    total = torch.zeros((), dtype=torch.float32, device=next(iter(synthetic.values())).device)
    for key, synthetic_logits in synthetic.items():
        level = int(key.rsplit("_", 1)[-1])
        if level >= len(weights):
            raise ValueError(f"No adversarial weight for {key}: weights has {len(weights)} entries")
        weight = weights[level]
        if weight == 0:
            continue
        real_logits = real[key]
        if loss == "ragan":
            fn = ragan_discriminator_loss if side == "discriminator" else ragan_generator_loss
            value = fn(real_logits, synthetic_logits, mean=mean)
        elif loss == "bce":
            value = (bce_discriminator_loss if side == "discriminator" else bce_generator_loss)(
                real_logits, synthetic_logits)
        else:
            raise ValueError(f"Unknown adversarial loss {loss!r}; use 'ragan' or 'bce'")
        total = total + weight * value
    return total
