"""Adversarial losses on raw discriminator outputs (logits), as pure functions.

Two criteria (``gan_mode`` of junyanz/pytorch-CycleGAN-and-pix2pix ``GANLoss``), with fixed target labels (no
cached random labels):

- ``"bce"`` — pix2pix's ``gan_mode='vanilla'``: ``BCEWithLogits(D(x), label)``; the critic has no sigmoid layer.
- ``"lsgan"`` — least squares (Mao et al. 2017): ``mean((D(x) − label)²)`` on the raw output, no activation. Used
  by CycleGAN, Ea-GAN, ResViT, PTNet3D.

The discriminator loss is halved, ``0.5·[L(D(real), real) + L(D(synthetic), fake)]``, as pix2pix/CycleGAN/Ea-GAN
do ("slows down the rate at which D learns relative to G"). Every function reduces to a scalar by the mean over
all patch logits and the batch, and computes in float32 so that autocast's bf16/fp16 logits do not lose
precision in the loss.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

GanLossKind = Literal["bce", "lsgan"]


def adversarial_loss(logits: Tensor, target_is_real: bool, kind: GanLossKind = "bce", *, real_label: float = 1.0,
                     fake_label: float = 0.0) -> Tensor:
    """Mean loss of critic outputs ``logits`` (any shape, e.g. ``(B, 1, *S')``) against the real or fake label."""
    logits = logits.float()
    target = torch.full_like(logits, real_label if target_is_real else fake_label)
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(logits, target)
    if kind == "lsgan":
        return F.mse_loss(logits, target)
    raise ValueError(f"GAN loss must be 'bce' or 'lsgan', got {kind!r}")


def generator_adversarial_loss(synthetic_logits: Tensor, kind: GanLossKind = "bce", *,
                               real_label: float = 1.0) -> Tensor:
    """The generator's term: the critic should call the synthetic image real. Logits at 0 give ln 2 (BCE);
    outputs at 0.5 give 0.25 (LSGAN)."""
    return adversarial_loss(synthetic_logits, True, kind, real_label=real_label)


def discriminator_adversarial_loss(real_logits: Tensor, synthetic_logits: Tensor, kind: GanLossKind = "bce", *,
                                   real_label: float = 1.0, fake_label: float = 0.0) -> Tensor:
    """``0.5·[L(real_logits, real) + L(synthetic_logits, fake)]``; pass ``synthetic_logits`` computed from a
    *detached* synthetic image. Logits at 0 give ln 2 (BCE); outputs at 0.5 give 0.25 (LSGAN)."""
    real = adversarial_loss(real_logits, True, kind, real_label=real_label, fake_label=fake_label)
    synthetic = adversarial_loss(synthetic_logits, False, kind, real_label=real_label, fake_label=fake_label)
    return 0.5 * (real + synthetic)
