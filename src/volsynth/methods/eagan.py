"""Ea-GAN (Yu et al., IEEE TMI 2019): 3D pix2pix with LSGAN plus a Sobel edge L1 term.

Restated from the official code (by-lab/Ea-GANs ``gea_gan_model.py``,
``dea_gan_model.py``, ``networks.py``, ``train.py``, ``train_gEaGAN.sh``):

- generator: pix2pix U-Net (:class:`~volsynth.nets.pix2pix_unet.Pix2PixUNet`; official ``unet_128``: 7 down-
  samplings, ngf 64, BatchNorm, dropout 0.5 via ``--use_dropout``), tanh output;
- critic: 70³ PatchGAN, BatchNorm, padding 2. **gEa-GAN** (default) shows it ``(source, image)``; **dEa-GAN**
  shows it ``(source, image, edge(image))`` (3 channels). Synthetic critic inputs go through an image pool
  (``pool_size`` 4 in the official options);
- losses: LSGAN; ``G = LSGAN(D(synthetic), real) + λ_L1·L1(G(x), y) + λ_edge·L1(edge(G(x)), edge(y))`` with
  λ_L1 = 300 and λ_edge = 100; critic ``0.5·[LSGAN(real) + LSGAN(synthetic)]``; Adam 2e-4, β1 0.5, 100 + 50 epochs
  (linear decay); the edge map is Sobel → ``tanh(·)·2 − 1`` (:mod:`volsynth.losses.edges`);
- edge-weight ramp (``--rise_sobelLoss``): λ_edge = 0 during the first epoch and ``100/20·e`` after epoch
  ``e`` ≤ 20, i.e. a linear rise over the first 20 of 150 epochs. Here it is continuous in training progress
  ``p`` (:func:`edge_weight`): ``λ_edge(p) = λ_edge·min(1, p / ramp_end)`` with ``ramp_end = 20/150``; at
  ``p = e/150`` this gives the official ``5·e``.

Deliberate deviations (documented in the presets too):

- label smoothing (``--labelSmooth`` in the official script) draws one random target per side on the first call
  and caches it (real ∈ [0.7, 1.2], fake ∈ [0, 0.3]). We expose fixed ``real_label``/``fake_label`` instead; the
  paper preset uses their expected values 0.95 / 0.15;
- dEa-GAN's official code also pushes *real* triplets through the fake-image pool; we pool synthetic inputs only;
- convs followed by BatchNorm have no bias (current pix2pix; Ea-GAN's older code kept it — redundant under BN).

Scales: as every GAN here, the networks work on [−1, 1]; source and target are mapped by ``x·2 − 1`` and the output
back by ``(y + 1)/2``. All losses (L1, edge, GAN) are computed on [−1, 1], as in Ea-GAN, so the λ's keep their
meaning; the Sobel pad value −1 is the background on that scale. ``translate`` runs the generator in eval mode
(BatchNorm running statistics, dropout off), as Ea-GAN's test mode does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from monai.networks.utils import eval_mode
from torch import Tensor, nn

from volsynth.config import DataConfig, MethodConfig, TrainConfig
from volsynth.losses.edges import eagan_edge_map, edge_l1_loss
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
from volsynth.nets.pix2pix_unet import Pix2PixUNet
from volsynth.nets.resunet import ResUNet


@dataclass
class EaGANConfig(MethodConfig):
    name: str = "eagan"
    variant: Literal["gea", "dea"] = "gea"  # gEa-GAN: edges in G's loss only; dEa-GAN: critic sees edges too
    # Generator: pix2pix U-Net (official: unet_128 = 7 down-samplings, ngf 64, 167 M parameters). The default is
    # compact: 5 down-samplings (unet_32, patch multiple of 32), ngf 16.
    generator: Literal["unet", "resunet"] = "unet"  # resunet = volsynth.nets.resunet.ResUNet (not Ea-GAN's)
    num_downs: int = 5  # unet only
    channels: int = 16  # ngf (unet); resunet uses channels · (1, 2, 4, 8)
    norm: Literal["batch", "instance"] = "batch"
    dropout: float = 0.5  # official script passes --use_dropout (0.5 in the inner 8·ngf decoder blocks)
    # Critic: 70³ PatchGAN, BatchNorm, Ea-GAN's padding 2.
    discriminator_channels: int = 64
    discriminator_layers: int = 3
    discriminator_norm: Literal["batch", "instance", "none"] = "batch"
    discriminator_padding: int = 2
    pool_size: int = 4  # Ea-GAN's default --pool_size
    # Losses (official train_gEaGAN.sh): LSGAN, λ_L1 300, λ_sobel 100 ramped over the first 20/150 of training.
    gan_loss: Literal["bce", "lsgan"] = "lsgan"
    lambda_l1: float = 300.0
    lambda_edge: float = 100.0
    edge_ramp_end: float = 20 / 150  # progress at which λ_edge reaches its full value; 0 = no ramp
    real_label: float = 1.0
    fake_label: float = 0.0
    init_std: float | None = 0.02  # Ea-GAN/pix2pix init N(0, 0.02); null = PyTorch default


def edge_weight(progress: float, *, weight: float = 100.0, ramp_end: float = 20 / 150) -> float:
    """Ea-GAN's rising Sobel weight at training progress ``progress`` ∈ [0, 1]: linear from 0 to ``weight`` at
    ``ramp_end``, then constant (``ramp_end ≤ 0``: constant ``weight``)."""
    if ramp_end <= 0:
        return weight
    return weight * min(1.0, max(0.0, progress) / ramp_end)




@METHODS.register("eagan")
class EaGAN(TranslationMethod):
    """Edge-aware 3D pix2pix: U-Net + PatchGAN, LSGAN + 300·L1 + ramped 100·Sobel-L1 (gEa-GAN / dEa-GAN)."""

    config_class = EaGANConfig
    description = "Ea-GAN: 3D pix2pix (U-Net + PatchGAN, LSGAN) + 300·L1 + ramped 100·Sobel edge L1; gEa/dEa"

    def __init__(self, config: EaGANConfig, *, spatial_dims: int = 3) -> None:
        super().__init__(config, spatial_dims=spatial_dims)
        self.generator: nn.Module
        if config.generator == "unet":
            self.generator = Pix2PixUNet(spatial_dims, 1, 1, num_downs=config.num_downs, channels=config.channels,
                                         norm=config.norm, dropout=config.dropout)
        else:
            self.generator = ResUNet(spatial_dims, 1, 1, channels=tuple(config.channels * m for m in (1, 2, 4, 8)),
                                     norm=config.norm)
        critic_inputs = 3 if config.variant == "dea" else 2
        self.discriminator = PatchDiscriminator(spatial_dims, in_channels=critic_inputs,
                                                channels=config.discriminator_channels,
                                                n_layers=config.discriminator_layers, norm=config.discriminator_norm,
                                                padding=config.discriminator_padding)
        self.pool = ImagePool(config.pool_size)
        if config.init_std is not None:
            init_gan_weights(self.generator, config.init_std)
            init_gan_weights(self.discriminator, config.init_std)

    @property
    def patch_divisor(self) -> int:
        return int(self.generator.divisor)

    def check_data(self, data: DataConfig) -> None:
        super().check_data(data)
        config = self.config
        check_critic_fits(data, config.name, config.discriminator_layers, config.discriminator_norm,
                          config.discriminator_padding)

    def networks(self) -> dict[str, nn.Module]:
        return {"generator": self.generator, "discriminator": self.discriminator}

    def configure_optimizers(self, train: TrainConfig) -> dict[str, torch.optim.Optimizer]:
        return {"discriminator": adam(self.discriminator.parameters(), train),
                "generator": adam(self.generator.parameters(), train)}

    def forward(self, source: Tensor) -> Tensor:
        """``(B, 1, *S)`` source in [0, 1] → synthetic target in [0, 1] (unclipped; tanh keeps it in range)."""
        return to_data_scale(self.generator(to_network_scale(source)))

    def critic_input(self, source: Tensor, image: Tensor) -> Tensor:
        """``(source, image)`` for gEa-GAN, ``(source, image, edge(image))`` for dEa-GAN; all on [−1, 1]."""
        parts = [source, image]
        if self.config.variant == "dea":
            parts.append(eagan_edge_map(image).to(image.dtype))
        return torch.cat(parts, dim=1)

    def train_step(self, batch: Batch, ctx: StepContext) -> dict[str, float]:
        config = self.config
        source, target = to_network_scale(batch.source), to_network_scale(batch.target)
        with ctx.autocast():
            synthetic = self.generator(source)
            pooled = self.pool.query(self.critic_input(source, synthetic.detach()), ctx.generator)
            critic_loss = discriminator_adversarial_loss(
                self.discriminator(self.critic_input(source, target)), self.discriminator(pooled), config.gan_loss,
                real_label=config.real_label, fake_label=config.fake_label)
        ctx.step(critic_loss, "discriminator")

        weight = edge_weight(ctx.progress, weight=config.lambda_edge, ramp_end=config.edge_ramp_end)
        set_requires_grad(self.discriminator, False)
        try:
            with ctx.autocast():
                adversarial = generator_adversarial_loss(self.discriminator(self.critic_input(source, synthetic)),
                                                         config.gan_loss, real_label=config.real_label)
                l1 = F.l1_loss(synthetic.float(), target)
                edges = edge_l1_loss(synthetic, target)
                generator_loss = adversarial + config.lambda_l1 * l1 + weight * edges
            ctx.step(generator_loss, "generator")
        finally:
            set_requires_grad(self.discriminator, True)
        return {"generator": float(generator_loss.detach()), "adversarial": float(adversarial.detach()),
                "l1": float(l1.detach()), "edge": float(edges.detach()), "edge_weight": weight,
                "discriminator": float(critic_loss.detach())}

    def translate(self, source: Tensor, generators: list[torch.Generator] | None = None) -> Tensor:
        # BatchNorm running statistics and no dropout, as Ea-GAN's test mode
        with eval_mode(self):
            return self(source).clamp(0, 1)
