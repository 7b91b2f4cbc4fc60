"""Supervised regression UNet (L1): the baseline every GAN must beat.

The SynthRAD 2023/2025 challenges were won by plain supervised UNets (see ecosystem notes); this is MONAI's
residual ``UNet`` trained with L1 only, on the same patches, trainer and inference as every other method.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from monai.networks.nets import UNet
from torch import Tensor

from volsynth.config import MethodConfig, TrainConfig
from volsynth.methods.base import METHODS, Batch, StepContext, TranslationMethod, adam


@dataclass
class RegressionUNetConfig(MethodConfig):
    name: str = "regression_unet"
    channels: tuple[int, ...] = (16, 32, 64, 128)  # one entry per level; 3 down-samplings → patch multiple of 8
    num_res_units: int = 2
    norm: str = "instance"  # MONAI norm name; instance norm is the nnU-Net default for 3D patches
    dropout: float = 0.0
    loss: Literal["l1", "mse"] = "l1"


@METHODS.register("regression_unet")
class RegressionUNet(TranslationMethod):
    """MONAI residual UNet, L1 to the target, output squashed by a sigmoid to [0, 1]."""

    config_class = RegressionUNetConfig
    description = "Supervised 3D UNet with L1 loss (MONAI UNet); the SynthRAD-winning baseline"

    def __init__(self, config: RegressionUNetConfig, *, spatial_dims: int = 3) -> None:
        super().__init__(config, spatial_dims=spatial_dims)
        self.generator = UNet(
            spatial_dims=spatial_dims, in_channels=1, out_channels=1, channels=tuple(config.channels),
            strides=(2,) * (len(config.channels) - 1), num_res_units=config.num_res_units, norm=config.norm,
            dropout=config.dropout,
        )

    @property
    def patch_divisor(self) -> int:
        return 2 ** (len(self.config.channels) - 1)

    def configure_optimizers(self, train: TrainConfig) -> dict[str, torch.optim.Optimizer]:
        return {"generator": adam(self.generator.parameters(), train)}

    def forward(self, source: Tensor) -> Tensor:
        # A sigmoid keeps the output in [0, 1] without the hard clip that can zero all gradients.
        return torch.sigmoid(self.generator(source))

    def train_step(self, batch: Batch, ctx: StepContext) -> dict[str, float]:
        with ctx.autocast():
            synthetic = self(batch.source)
            distance = F.l1_loss if self.config.loss == "l1" else F.mse_loss
            loss = distance(synthetic.float(), batch.target)
        ctx.step(loss, "generator")
        return {"loss": float(loss.detach())}

    @torch.no_grad()
    def translate(self, source: Tensor) -> Tensor:
        return self(source).clamp(0, 1)
