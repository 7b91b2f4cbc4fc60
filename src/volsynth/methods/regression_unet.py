"""Supervised regression UNet (L1, or MSE): the baseline every GAN must beat.

The SynthRAD 2023/2025 challenges were won by plain supervised UNets (see ecosystem notes); this is MONAI's
residual ``UNet`` trained with one voxel loss only (L1 as those winners; ``loss: mse`` for the conditional mean
that PSNR/NMSE score), on the same patches, trainer and inference as every other method.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from monai.networks.nets import UNet
from monai.networks.utils import eval_mode
from torch import Tensor

from volsynth.config import MethodConfig, TrainConfig
from volsynth.errors import ConfigError
from volsynth.losses.voxel import VOXEL_DISTANCES
from volsynth.methods.base import METHODS, Batch, StepContext, TranslationMethod, adam


@dataclass
class RegressionUNetConfig(MethodConfig):
    name: str = "regression_unet"
    channels: tuple[int, ...] = (16, 32, 64, 128)  # one entry per level
    # Stride of each level's first conv (one fewer than channels); None = 2 everywhere (MONAI's default). MONAI's UNet
    # then has no full-resolution stage: every output voxel is decoded from half-resolution features through a
    # one-channel residual unit, which learns voxel-wise contrast maps slowly. A first stride of 1 adds a
    # full-resolution stage (the demo uses it).
    strides: tuple[int, ...] | None = None
    num_res_units: int = 2
    # MONAI norm name; instance norm is the nnU-Net default for 3D patches; null = none (no batch or sample coupling)
    norm: str | None = "instance"
    dropout: float = 0.0
    loss: Literal["l1", "mse"] = "l1"  # l1: the median of the target given the source; mse: its mean
    # sigmoid squashes to [0, 1] (no hard clip that can zero all gradients); linear leaves the output free during
    # training (no saturation while the background is learnt) and clips only in translate.
    output: Literal["sigmoid", "linear"] = "sigmoid"


@METHODS.register("regression_unet")
class RegressionUNet(TranslationMethod):
    """MONAI residual UNet, L1 (or MSE) to the target, output squashed by a sigmoid to [0, 1] (or linear)."""

    config_class = RegressionUNetConfig
    description = "Supervised 3D UNet with an L1 (or MSE) loss (MONAI UNet); the SynthRAD-winning baseline"

    def __init__(self, config: RegressionUNetConfig, *, spatial_dims: int = 3) -> None:
        super().__init__(config, spatial_dims=spatial_dims)
        self.generator = UNet(
            spatial_dims=spatial_dims, in_channels=1, out_channels=1, channels=tuple(config.channels),
            strides=self.strides, num_res_units=config.num_res_units, norm=config.norm, dropout=config.dropout,
        )

    @property
    def strides(self) -> tuple[int, ...]:
        strides = self.config.strides or (2,) * (len(self.config.channels) - 1)
        if len(strides) != len(self.config.channels) - 1:
            raise ConfigError(f"method.strides needs {len(self.config.channels) - 1} values (one fewer than "
                              f"method.channels), got {list(strides)}")
        return tuple(strides)

    @property
    def patch_divisor(self) -> int:
        return int(np.prod(self.strides))

    def configure_optimizers(self, train: TrainConfig) -> dict[str, torch.optim.Optimizer]:
        return {"generator": adam(self.generator.parameters(), train)}

    def forward(self, source: Tensor) -> Tensor:
        output = self.generator(source)
        return torch.sigmoid(output) if self.config.output == "sigmoid" else output

    def train_step(self, batch: Batch, ctx: StepContext) -> dict[str, float]:
        with ctx.autocast():
            synthetic = self(batch.source)
            loss = VOXEL_DISTANCES[self.config.loss](synthetic.float(), batch.target)
        ctx.step(loss, "generator")
        return {"loss": float(loss.detach())}

    def translate(self, source: Tensor, generators: list[torch.Generator] | None = None) -> Tensor:
        with eval_mode(self):
            return self(source).clamp(0, 1)
