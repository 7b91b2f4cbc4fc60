"""CycleGAN (Zhu et al., ICCV 2017) ported to 3D, trained on unpaired subjects.

Restated from the official 2D defaults (junyanz/pytorch-CycleGAN-and-pix2pix ``cycle_gan_model.py``,
``train_options.py``), with the layer types swapped for 3D:

- two generators, ``source_to_target`` and ``target_to_source``: ResNet generators
  (:class:`~volsynth.nets.resnet_generator.ResnetGenerator`; official ``resnet_9blocks``, ngf 64, InstanceNorm);
- two unconditional critics (one input channel): ``target_critic`` tells real from synthetic target images,
  ``source_critic`` real from synthetic source images; 70³ PatchGAN with InstanceNorm;
- losses: LSGAN; cycle L1 ``λ_cycle = 10`` in both directions; identity L1 ``λ_identity = 5`` (CycleGAN's
  ``λ_idt = 0.5`` times λ = 10) — ``‖G_s→t(y) − y‖₁`` and ``‖G_t→s(x) − x‖₁``, meaningful because source and target
  are both single-channel; each critic's loss is ``0.5·[LSGAN(real, 1) + LSGAN(pooled synthetic, 0)]`` and
  critics see synthetic images through a 50-image pool (one pool per domain);
- one optimiser for both generators, one for both critics; per iteration the generators step first (critics
  frozen), then the critics (as upstream's ``optimize_parameters``); Adam 2e-4, β1 0.5, 100 + 100 epochs with a
  linear decay (train config / presets).

Pairing: this method declares ``requires_paired_data = False``, so the trainer draws ``batch.target`` from other
subjects than ``batch.source``: even on a paired cohort the pairing is not used (the usual way to run CycleGAN on a
paired benchmark).

Scales: data on [0, 1] are mapped to the generators' [−1, 1] by ``x·2 − 1``; outputs back by ``(y + 1)/2``. The
cycle and identity L1 and the LSGAN terms are computed on [−1, 1], as upstream. InstanceNorm has no running
statistics, so train and eval mode compute the same function; ``translate`` still switches to eval mode.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from monai.networks.utils import eval_mode
from torch import Tensor, nn

from volsynth.config import DataConfig, MethodConfig, TrainConfig
from volsynth.losses.gan import discriminator_adversarial_loss, generator_adversarial_loss
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
from volsynth.nets.patchgan import ImagePool, PatchDiscriminator, init_gan_weights
from volsynth.nets.resnet_generator import ResnetGenerator


@dataclass
class CycleGAN3DConfig(MethodConfig):
    name: str = "cyclegan3d"
    # Generators: CycleGAN's ResNet generator (official resnet_9blocks, ngf 64: 34.1 M parameters each in 3D).
    channels: int = 32  # ngf
    n_blocks: int = 6
    norm: Literal["instance", "batch"] = "instance"
    # Critics: unconditional 70³ PatchGAN (one input channel), InstanceNorm as CycleGAN.
    discriminator_channels: int = 64
    discriminator_layers: int = 3
    discriminator_norm: Literal["instance", "batch", "none"] = "instance"
    # Losses (official defaults): LSGAN, cycle 10 each way, identity 0.5·10 = 5 each way, pool 50.
    gan_loss: Literal["lsgan", "bce"] = "lsgan"
    lambda_cycle: float = 10.0
    lambda_identity: float = 5.0  # absolute weight; 0 disables the identity passes (saves 2 generator passes)
    pool_size: int = 50
    init_std: float | None = 0.02  # CycleGAN init N(0, 0.02); null = PyTorch default




@METHODS.register("cyclegan3d")
class CycleGAN3D(TranslationMethod):
    """Unpaired 3D CycleGAN: two ResNet generators, two PatchGAN critics, LSGAN + cycle 10 + identity 5, pool 50."""

    config_class = CycleGAN3DConfig
    requires_paired_data = False
    description = "Unpaired 3D CycleGAN: 2 ResNet generators + 2 PatchGANs, LSGAN + cycle 10 + identity 5, pool 50"

    def __init__(self, config: CycleGAN3DConfig, *, spatial_dims: int = 3) -> None:
        super().__init__(config, spatial_dims=spatial_dims)

        def generator() -> ResnetGenerator:
            return ResnetGenerator(spatial_dims, 1, 1, channels=config.channels, n_blocks=config.n_blocks,
                                   norm=config.norm)

        def critic() -> PatchDiscriminator:
            return PatchDiscriminator(spatial_dims, in_channels=1, channels=config.discriminator_channels,
                                      n_layers=config.discriminator_layers, norm=config.discriminator_norm)

        self.source_to_target = generator()
        self.target_to_source = generator()
        self.target_critic = critic()  # real vs synthetic *target* images
        self.source_critic = critic()  # real vs synthetic *source* images
        self.synthetic_target_pool = ImagePool(config.pool_size)
        self.synthetic_source_pool = ImagePool(config.pool_size)
        if config.init_std is not None:
            for network in self.networks().values():
                init_gan_weights(network, config.init_std)

    @property
    def patch_divisor(self) -> int:
        return ResnetGenerator.divisor

    def check_data(self, data: DataConfig) -> None:
        super().check_data(data)
        config = self.config
        check_critic_fits(data, config.name, config.discriminator_layers, config.discriminator_norm)

    def networks(self) -> dict[str, nn.Module]:
        return {"source_to_target": self.source_to_target, "target_to_source": self.target_to_source,
                "target_critic": self.target_critic, "source_critic": self.source_critic}

    def configure_optimizers(self, train: TrainConfig) -> dict[str, torch.optim.Optimizer]:
        generators = [*self.source_to_target.parameters(), *self.target_to_source.parameters()]
        critics = [*self.target_critic.parameters(), *self.source_critic.parameters()]
        return {"generator": adam(generators, train), "discriminator": adam(critics, train)}

    def forward(self, source: Tensor) -> Tensor:
        """``(B, 1, *S)`` source in [0, 1] → synthetic target in [0, 1] (unclipped; tanh keeps it in range)."""
        return to_data_scale(self.source_to_target(to_network_scale(source)))

    def train_step(self, batch: Batch, ctx: StepContext) -> dict[str, float]:
        config = self.config
        kind = config.gan_loss
        source, target = to_network_scale(batch.source), to_network_scale(batch.target)
        critics = [self.target_critic, self.source_critic]

        set_requires_grad(critics, False)
        try:
            with ctx.autocast():
                synthetic_target = self.source_to_target(source)
                synthetic_source = self.target_to_source(target)
                adversarial = (generator_adversarial_loss(self.target_critic(synthetic_target), kind)
                               + generator_adversarial_loss(self.source_critic(synthetic_source), kind))
                cycle = (F.l1_loss(self.target_to_source(synthetic_target).float(), source)
                         + F.l1_loss(self.source_to_target(synthetic_source).float(), target))
                generator_loss = adversarial + config.lambda_cycle * cycle
                identity = torch.zeros((), device=source.device)
                if config.lambda_identity > 0:
                    identity = (F.l1_loss(self.source_to_target(target).float(), target)
                                + F.l1_loss(self.target_to_source(source).float(), source))
                    generator_loss = generator_loss + config.lambda_identity * identity
            ctx.step(generator_loss, "generator")
        finally:
            set_requires_grad(critics, True)

        with ctx.autocast():
            pooled_target = self.synthetic_target_pool.query(synthetic_target.detach(), ctx.generator)
            pooled_source = self.synthetic_source_pool.query(synthetic_source.detach(), ctx.generator)
            target_critic_loss = discriminator_adversarial_loss(
                self.target_critic(target), self.target_critic(pooled_target), kind)
            source_critic_loss = discriminator_adversarial_loss(
                self.source_critic(source), self.source_critic(pooled_source), kind)
            # The critics have disjoint parameters: one step on the sum equals upstream's two backward passes.
            critic_loss = target_critic_loss + source_critic_loss
        ctx.step(critic_loss, "discriminator")
        return {"generator": float(generator_loss.detach()), "adversarial": float(adversarial.detach()),
                "cycle": float(cycle.detach()), "identity": float(identity.detach()),
                "target_critic": float(target_critic_loss.detach()),
                "source_critic": float(source_critic_loss.detach()),
                "discriminator": float(critic_loss.detach())}

    def translate(self, source: Tensor, generators: list[torch.Generator] | None = None) -> Tensor:
        with eval_mode(self):
            return self(source).clamp(0, 1)
