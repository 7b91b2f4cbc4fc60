"""3D UNet-residual GAN with a PatchGAN critic (FLAIR → T1 on AdelaideMRI, 3D pix2pix-style).

The paper (§2, Figs. 2–3, Eq. 1; "Adam, learning rate 0.0001, 100 epochs"):

- generator: UNet with residual blocks of "3×3×3 Conv+BN+ReLU (×2)", max-pool ×2 down, up-sampling ×2, skip
  connections, "1×1×1 Conv + Tanh" (:class:`~volsynth.nets.resunet.ResUNet`; the open choices are listed there);
- discriminator: "based on PatchGAN", fed the pair (source, real or synthetic target), real → 1, synthetic → 0
  (:class:`~volsynth.nets.patchgan.PatchDiscriminator` on ``concat(source, image)``, 2 channels). Fig. 3's legend
  also shows a "Dense Layer + Bn", which a PatchGAN does not have; we follow the text ("based on PatchGAN");
- loss (Eq. 1): ``E[log D(x, y)] + E[log(1 − D(x, G(x)))] + E‖y − G(x)‖₁``, i.e. the BCE ("vanilla") GAN plus L1.
  The paper prints no weight on the L1 term; we use pix2pix's λ = 100 (junyanz ``pix2pix_model.py`` ``lambda_L1``).

Training follows pix2pix's iteration (junyanz ``pix2pix_model.py`` ``optimize_parameters``): one generator forward,
one critic step on (real, detached synthetic), then one generator step with the critic frozen. Critic loss halved, as
pix2pix.

Scales: data arrive on [0, 1]; the networks work on [−1, 1] (``tanh`` output), so source and target are mapped by
``x·2 − 1`` and the output back by ``(y + 1)/2``. All losses are computed on the [−1, 1] scale, as in pix2pix,
so λ keeps its original meaning (an L1 of 0.01 on [−1, 1] is 0.005 on [0, 1]).

BatchNorm at inference: ``translate`` always runs the generator in eval mode, i.e. with the running statistics.
In 3D the batch is one or a few patches, so train-mode BN normalises each window by its own statistics (close to
instance norm); at inference that would make a window's output depend on the other windows stacked in the same
sliding-window batch and on ``sw_batch_size``. Running statistics make each window a fixed function of its own
voxels, so the stitched volume does not depend on how windows are batched. (pix2pix's ``test.py`` only does this
with ``--eval``; by default it tests with batch statistics.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from monai.networks.utils import eval_mode
from torch import Tensor, nn

from volsynth.config import DataConfig, MethodConfig, TrainConfig
from volsynth.losses.gan import GanLossKind, discriminator_adversarial_loss, generator_adversarial_loss
from volsynth.methods.base import (
    METHODS,
    Batch,
    StepContext,
    TranslationMethod,
    adam,
    check_critic_fits,
    set_requires_grad,
    to_data_scale,
    to_network_scale,
)
from volsynth.nets.patchgan import PatchDiscriminator, init_gan_weights
from volsynth.nets.resunet import ResUNet


@dataclass
class ResUNetPatchGANConfig(MethodConfig):
    name: str = "resunet_patchgan"
    # Generator (the paper's Fig. 2). Widths per level are not in the paper: 32-64-128-256 is the 3D U-Net of
    # Çiçek et al. (2016); 3 max-pools → patch sizes must be multiples of 8.
    channels: tuple[int, ...] = (32, 64, 128, 256)
    norm: Literal["batch", "instance"] = "batch"  # the paper's "Bn"
    upsample: Literal["linear", "nearest", "transposed"] = "linear"  # "Up Sampling (by 2)": trilinear
    # Discriminator: pix2pix's 70³ PatchGAN (ndf 64, 3 stride-2 layers, BatchNorm).
    discriminator_channels: int = 64
    discriminator_layers: int = 3
    discriminator_norm: Literal["batch", "instance", "none"] = "batch"
    # Losses: Eq. 1 is the log-loss GAN (BCE on logits) + L1; λ_L1 from pix2pix (the paper prints none).
    gan_loss: Literal["bce", "lsgan"] = "bce"
    lambda_l1: float = 100.0
    # pix2pix init: conv weights ~ N(0, init_std), BN scale ~ N(1, init_std); null = PyTorch's default init.
    init_std: float | None = 0.02




@METHODS.register("resunet_patchgan")
class ResUNetPatchGAN(TranslationMethod):
    """Residual 3D UNet generator + conditional PatchGAN, BCE GAN + 100·L1 (UNet-residual GAN paper / pix2pix)."""

    config_class = ResUNetPatchGANConfig
    description = "3D residual UNet + PatchGAN on (source, image), BCE GAN + 100·L1 (paper 002, pix2pix-style)"

    def __init__(self, config: ResUNetPatchGANConfig, *, spatial_dims: int = 3) -> None:
        super().__init__(config, spatial_dims=spatial_dims)
        self.generator = ResUNet(spatial_dims, 1, 1, channels=tuple(config.channels), norm=config.norm,
                                 upsample=config.upsample)
        self.discriminator = PatchDiscriminator(spatial_dims, in_channels=2, channels=config.discriminator_channels,
                                                n_layers=config.discriminator_layers,
                                                norm=config.discriminator_norm)
        if config.init_std is not None:
            init_gan_weights(self.generator, config.init_std)
            init_gan_weights(self.discriminator, config.init_std)

    @property
    def patch_divisor(self) -> int:
        return self.generator.divisor

    def check_data(self, data: DataConfig) -> None:
        super().check_data(data)
        config = self.config
        check_critic_fits(data, config.name, config.discriminator_layers, config.discriminator_norm)

    def networks(self) -> dict[str, nn.Module]:
        return {"generator": self.generator, "discriminator": self.discriminator}

    def configure_optimizers(self, train: TrainConfig) -> dict[str, torch.optim.Optimizer]:
        # The paper's Adam at lr 1e-4 comes from train.lr; β's from train.betas (presets: pix2pix's (0.5, 0.999)).
        return {"discriminator": adam(self.discriminator.parameters(), train),
                "generator": adam(self.generator.parameters(), train)}

    def forward(self, source: Tensor) -> Tensor:
        """``(B, 1, *S)`` source in [0, 1] → synthetic target in [0, 1] (unclipped; tanh keeps it in range)."""
        return to_data_scale(self.generator(to_network_scale(source)))

    def train_step(self, batch: Batch, ctx: StepContext) -> dict[str, float]:
        kind: GanLossKind = self.config.gan_loss
        source, target = to_network_scale(batch.source), to_network_scale(batch.target)
        with ctx.autocast():
            synthetic = self.generator(source)
            real_logits = self.discriminator(torch.cat([source, target], dim=1))
            synthetic_logits = self.discriminator(torch.cat([source, synthetic.detach()], dim=1))
            critic_loss = discriminator_adversarial_loss(real_logits, synthetic_logits, kind)
        ctx.step(critic_loss, "discriminator")

        set_requires_grad(self.discriminator, False)  # the generator step needs no critic weight gradients
        try:
            with ctx.autocast():
                adversarial = generator_adversarial_loss(
                    self.discriminator(torch.cat([source, synthetic], dim=1)), kind)
                l1 = F.l1_loss(synthetic.float(), target)
                generator_loss = adversarial + self.config.lambda_l1 * l1
            ctx.step(generator_loss, "generator")
        finally:
            set_requires_grad(self.discriminator, True)
        return {"generator": float(generator_loss.detach()), "adversarial": float(adversarial.detach()),
                "l1": float(l1.detach()), "discriminator": float(critic_loss.detach())}

    def translate(self, source: Tensor, generators: list[torch.Generator] | None = None) -> Tensor:
        # BN running statistics: see the module docstring
        with eval_mode(self):
            return self(source).clamp(0, 1)
