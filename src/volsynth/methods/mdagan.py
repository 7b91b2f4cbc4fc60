"""Multi-resolution guided 3D GAN (Ha et al., WACV 2025): 3D-mDAUNet generator + multi-resolution UNet D.

Generator loss (paper §3.3, Eq. 2; the authors' release juhha/3D-mADUNet, ``codes/loss/generator_loss.py``):
L_G = λ1 Σ_levels L1 + λ2 L_perception(level_0) + λ3 Σ_levels L_adv with λ = (1, 1, 1e-4); discriminator loss:
voxel-wise relativistic BCE at every level (eq. 1).

Per iteration (as the release's trainer): one generator forward; a discriminator step on the detached generator
outputs and the real target; a generator step re-using the same generator outputs, with D frozen.

Deliberate deviations from the release, each switchable back:

* The adversarial loss is the *intended* RaGAN: the release swaps the real/synthetic logits in the generator
  step (G receives zero adversarial gradient) and detaches D's synthetic logits in the D step
  (``codes/trainer/srgan_trainer.py``, ``codes/loss/discriminator_loss.py``).
  ``adversarial.release_compat: true`` reproduces both defects.
* No hard clip to [0, 1] before the losses (see :mod:`volsynth.nets.mdaunet`); ``generator.output_activation: clip``
  restores it. :meth:`MDAGAN.translate` always clips.
* The perception loss normalises grey→RGB→ImageNet in the right order (see
  :mod:`volsynth.losses.perception`).
* The release's discriminator file is not public; ours is documented in :mod:`volsynth.nets.discriminators`.
  Real images reach D as a pyramid built with the same resampling (``discriminator.pyramid``, nearest by
  default = the voxel loss's target resampling), synthetic ones as the generator's own multi-resolution
  outputs — so a generator that meets every level's L1 target is indistinguishable at every level.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from monai.networks.utils import eval_mode
from torch import Tensor, nn

from volsynth.config import ConfigError, MethodConfig, TrainConfig
from volsynth.losses.perception import PerceptionLoss25D
from volsynth.losses.relativistic import multilevel_loss
from volsynth.losses.voxel import multires_voxel_loss
from volsynth.methods.base import METHODS, Batch, StepContext, TranslationMethod, adam, set_requires_grad
from volsynth.nets.blocks import make_pyramid
from volsynth.nets.discriminators import BinaryDiscriminator, MultiResUNetDiscriminator
from volsynth.nets.mdaunet import DIVISOR, LEVELS, MDAUNet, level_key
from volsynth.nets.vgg import VGGWeightsUnavailable


@dataclass
class GeneratorConfig:
    """3D-mDAUNet options (paper §3.2, Fig. 1; release ``AttentionDenseUNet``); paper defaults (6,176,846 params)."""

    base_channels: int = 16  # level widths c, 2c, 4c, 8c
    growth_rates: tuple[int, int, int, int] = (8, 16, 32, 32)  # RDB growth per encoder level
    rdbs_per_block: int = 3  # RDBs per RRDB
    convs_per_rdb: int = 5
    residual_scale: float = 0.2
    cbam_reductions: tuple[int, int, int] = (8, 4, 2)  # decoder merges, deepest first
    multires_input: bool = True  # Table 2 "MR-input": input pyramid features into encoder levels 1..3
    multires_output: bool = True  # Table 2 "MR-output": 4 heads + L1/adversarial at 4 levels; off → level 0 only
    downsample: Literal["nearest", "linear"] = "nearest"  # between encoder levels (the paper: nearest)
    upsample: Literal["nearest", "linear"] = "nearest"  # between decoder levels (the paper: nearest)
    input_pyramid: Literal["nearest", "linear"] = "linear"  # how the input pyramid is built (release: trilinear)
    # none: linear heads, losses on the unclipped output, clip only in translate (our default: the release's
    # clip-before-loss can zero every gradient, see nets/mdaunet); clip: the release; sigmoid.
    output_activation: Literal["none", "clip", "sigmoid"] = "none"
    spectral_norm: bool = True  # on the feature and decoder convs (the release); off only in the CPU preset


@dataclass
class DiscriminatorConfig:
    """Discriminator options (paper §3.2; the release's file is not public, see nets/discriminators)."""

    # Table 2 "U-Net D.": voxel-wise multi-res UNet, or a global binary D (one logit per patch; patches >= 16³).
    kind: Literal["unet", "binary"] = "unet"
    base_channels: int = 8  # widths b, 2b, 4b, 8b
    multires_input: bool = True  # pyramid levels 1..3 into encoder levels 1..3 (unet only)
    # How real targets (and a single-level synthetic output) become D's pyramid: nearest = the same resampling
    # the voxel loss uses for its per-level targets. The release (probably) used trilinear for real images only.
    pyramid: Literal["nearest", "linear"] = "nearest"
    downsample: Literal["nearest", "linear"] = "nearest"
    upsample: Literal["nearest", "linear"] = "nearest"
    spectral_norm: bool = True  # on hidden convs (the paper: "after each activation layer")


@dataclass
class VoxelLossConfig:
    """Multi-resolution L1 (paper Eq. 3 at every level)."""

    weight: float = 1.0  # λ1
    level_weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)  # summed over levels, as the release
    # l1 = the paper. mse = squared error, whose minimiser is the conditional mean that PSNR/NMSE reward where the
    # source is ambiguous (L1's median picks one mode; the CPU preset says what it measured).
    distance: Literal["l1", "mse"] = "l1"


@dataclass
class PerceptionConfig:
    """2.5D VGG perception loss (paper Eq. 4)."""

    weight: float = 1.0  # λ2; 0 disables the loss and no VGG weights are needed
    # imagenet (torch hub cache, downloaded only if online) | a local torchvision vgg19 .pth | random (explicit
    # opt-in: random features are not a perceptual loss). Missing weights fail at build time with a how-to.
    weights: str = "imagenet"
    depth: Literal[16, 19] = 19
    layer: str = "relu5_4"  # features.35 of VGG-19, the release's tap
    slice_fraction: float = 1.0  # fraction of slices per view and step (1.0 = every slice, as the release)
    chunk_size: int = 64  # slices per VGG call
    checkpoint: bool = True  # gradient checkpointing per chunk (memory ∝ chunk, not ∝ all slices)


@dataclass
class AdversarialConfig:
    """Voxel-wise adversarial loss (paper Eqs. 1 and 5)."""

    mode: Literal["ragan", "bce", "none"] = "ragan"  # Table 2 "Relativistic": ragan vs plain bce; none = no D
    weight: float = 1e-4  # λ3
    level_weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)
    relativistic_mean: Literal["global", "batch"] = "global"  # E[D(.)]: scalar (release) or per-voxel batch mean
    # true reproduces the release's defects: G-step logits swapped (zero adversarial gradient to G) and D's
    # synthetic logits detached in the D step. For comparison runs only.
    release_compat: bool = False
    # ESRGAN's PSNR-oriented warm start (Wang et al. 2018, whose RRDBs this generator uses): the first
    # ``start_fraction`` of training (of train.iterations; of max_seconds under train.time_box when the clock runs
    # out first) train the generator on the voxel (and perception) losses alone, and D
    # is neither run nor trained. 0 = the paper (adversarial from the first step). A fraction, not an iteration, so
    # that `--set train.iterations=N` keeps the adversarial phase. Why: with λ3 = 1e-4 the early adversarial term
    # barely moves G, yet D costs nearly half of a CPU step (0.41 s vs 0.20 s per 4 × 16³ step of mdagan-cpu).
    start_fraction: float = 0.0


@dataclass
class MDAGANConfig(MethodConfig):
    """Options of the multi-resolution guided GAN ("mdagan")."""

    name: str = "mdagan"
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    voxel: VoxelLossConfig = field(default_factory=VoxelLossConfig)
    perception: PerceptionConfig = field(default_factory=PerceptionConfig)
    adversarial: AdversarialConfig = field(default_factory=AdversarialConfig)
    # Optimiser overrides; None = train.lr / train.betas (the paper: Adam 1e-4 for both).
    lr_generator: float | None = None
    lr_discriminator: float | None = None
    betas: tuple[float, float] | None = None


@METHODS.register("mdagan")
class MDAGAN(TranslationMethod):
    """3D-mDAUNet generator, multi-resolution UNet discriminator, multi-level L1 + 2.5D VGG + voxel-wise RaGAN."""

    config_class = MDAGANConfig
    description = "Multi-resolution guided 3D GAN (3D-mDAUNet + voxel-wise UNet D), Ha et al. WACV 2025"
    config: MDAGANConfig

    def __init__(self, config: MDAGANConfig, *, spatial_dims: int = 3) -> None:
        super().__init__(config, spatial_dims=spatial_dims)
        if not 0 <= config.adversarial.start_fraction < 1:
            raise ConfigError(f"method.adversarial.start_fraction must be in [0, 1), got "
                              f"{config.adversarial.start_fraction}")
        g = config.generator
        self.generator = MDAUNet(
            spatial_dims, 1, 1, base_channels=g.base_channels, growth_rates=g.growth_rates,
            rdbs_per_block=g.rdbs_per_block, convs_per_rdb=g.convs_per_rdb, residual_scale=g.residual_scale,
            cbam_reductions=g.cbam_reductions, multires_input=g.multires_input, multires_output=g.multires_output,
            downsample=g.downsample, upsample=g.upsample, input_pyramid=g.input_pyramid,
            output_activation=g.output_activation, spectral_norm=g.spectral_norm,
        )
        self.discriminator: nn.Module | None = None
        if config.adversarial.mode != "none":
            d = config.discriminator
            if d.kind == "unet":
                self.discriminator = MultiResUNetDiscriminator(
                    spatial_dims, 1, base_channels=d.base_channels, multires_input=d.multires_input,
                    pyramid=d.pyramid, downsample=d.downsample, upsample=d.upsample, spectral=d.spectral_norm,
                )
            else:
                self.discriminator = BinaryDiscriminator(spatial_dims, 1, base_channels=d.base_channels,
                                                         spectral=d.spectral_norm)
        self.perception: PerceptionLoss25D | None = None
        p = config.perception
        if p.weight > 0:
            try:
                self.perception = PerceptionLoss25D.from_weights(
                    p.weights, depth=p.depth, layer=p.layer, slice_fraction=p.slice_fraction,
                    chunk_size=p.chunk_size, checkpoint=p.checkpoint,
                )
            except VGGWeightsUnavailable as error:
                raise VGGWeightsUnavailable(
                    f"mdagan's perception loss (method.perception.weights={p.weights!r}) needs VGG-{p.depth} "
                    f"weights: {error} To train without it, set method.perception.weight=0."
                ) from error

    @classmethod
    def inference_config(cls, config: MethodConfig) -> MethodConfig:
        # The perception loss is training-only and its VGG weights are not in the checkpoint: prediction from a
        # paper-preset checkpoint must not need ImageNet weights.
        assert isinstance(config, MDAGANConfig)
        return dataclasses.replace(config, perception=dataclasses.replace(config.perception, weight=0.0))

    # ----------------------------------------------------------------------------------------------------------
    # Contract

    @property
    def patch_divisor(self) -> int:
        return DIVISOR

    def networks(self) -> dict[str, nn.Module]:
        """Trainable networks only (the frozen VGG is neither counted nor optimised nor checkpointed)."""
        nets: dict[str, nn.Module] = {"generator": self.generator}
        if self.discriminator is not None:
            nets["discriminator"] = self.discriminator
        return nets

    def configure_optimizers(self, train: TrainConfig) -> dict[str, torch.optim.Optimizer]:
        cfg = self.config
        optimizers = {"generator": adam(self.generator.parameters(), train, lr=cfg.lr_generator, betas=cfg.betas)}
        if self.discriminator is not None:
            optimizers["discriminator"] = adam(self.discriminator.parameters(), train, lr=cfg.lr_discriminator,
                                               betas=cfg.betas)
        return optimizers

    def forward(self, source: Tensor) -> dict[str, Tensor]:
        """Generator outputs by level (``level_0``: ``(B, 1, *spatial)``, ``level_k``: spatial / 2**k)."""
        return self.generator(source)

    def translate(self, source: Tensor, generators: list[torch.Generator] | None = None) -> Tensor:
        """``(B, 1, X, Y, Z)`` source in [0, 1] → full-resolution synthetic target, eval mode, clipped to [0, 1]."""
        with eval_mode(self.generator):
            return self.generator(source)[level_key(0)].float().clamp(0.0, 1.0)

    # ----------------------------------------------------------------------------------------------------------
    # Losses

    def discriminator_input(self, images: Tensor | Mapping[str, Tensor], *, detach: bool = False
                            ) -> dict[str, Tensor]:
        """What D sees: a full-resolution tensor becomes a pyramid; a complete generator output dict is used as is.

        A generator without multi-resolution output yields only ``level_0``; its pyramid is then built like the
        real image's, so real and synthetic always reach D the same way.
        """
        levels = {level_key(0): images} if isinstance(images, Tensor) else dict(images)
        if detach:
            levels = {key: value.detach() for key, value in levels.items()}
        unet = isinstance(self.discriminator, MultiResUNetDiscriminator)
        if not (unet and self.config.discriminator.multires_input):
            return {level_key(0): levels[level_key(0)]}
        if len(levels) < LEVELS:
            levels = {**make_pyramid(levels[level_key(0)], LEVELS, self.config.discriminator.pyramid), **levels}
        return levels

    def _run_discriminator(self, real: Mapping[str, Tensor], synthetic: Mapping[str, Tensor]
                           ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        # One D call on [real; synthetic] stacked along the batch: D has no batch-coupled layers, so this equals
        # two calls, at half the launches and one spectral-norm power iteration per step.
        assert self.discriminator is not None
        batch = next(iter(real.values())).shape[0]
        logits = self._critic({key: torch.cat([real[key], synthetic[key]]) for key in real})
        return ({key: value[:batch] for key, value in logits.items()},
                {key: value[batch:] for key, value in logits.items()})

    def discriminator_loss(self, outputs: Mapping[str, Tensor], target: Tensor) -> Tensor:
        """D loss on detached generator ``outputs`` and the real ``target`` (eq. 1 at every level)."""
        adv = self.config.adversarial
        real, synthetic = self._run_discriminator(self.discriminator_input(target),
                                                  self.discriminator_input(outputs, detach=True))
        if adv.release_compat:
            # Release defect (codes/loss/discriminator_loss.py): the synthetic logits are detached inside the loss,
            # so D learns only from its real-logit terms.
            synthetic = {key: value.detach() for key, value in synthetic.items()}
        return multilevel_loss(adv.mode, real, synthetic, adv.level_weights, side="discriminator",
                               mean=adv.relativistic_mean)

    def _critic(self, inputs: Mapping[str, Tensor]) -> Any:
        """D in fp32 even under autocast: spectral norm's power iteration in bf16 can collapse to a zero norm and
        turn every logit into NaN; D is small (0.4 M parameters), so fp32 costs little."""
        assert self.discriminator is not None
        device_type = next(iter(inputs.values())).device.type
        with torch.autocast(device_type=device_type, enabled=False):
            return self.discriminator({key: value.float() for key, value in inputs.items()})

    def generator_adversarial_loss(self, outputs: Mapping[str, Tensor], target: Tensor) -> Tensor:
        """Unweighted adversarial G loss (eq. 5 at every level); D(real) is detached, D(G(x)) is attached."""
        assert self.discriminator is not None
        adv = self.config.adversarial
        synthetic = self._critic(self.discriminator_input(outputs))
        with torch.no_grad():
            real = self._critic(self.discriminator_input(target))
        if adv.release_compat:
            # Release defect (codes/trainer/srgan_trainer.py): the trainer passes D(G(x)) as "real" (which the loss
            # detaches) and D(target) as "synthetic", so no adversarial gradient reaches the generator.
            real, synthetic = synthetic, real
        return multilevel_loss(adv.mode, real, synthetic, adv.level_weights, side="generator",
                               mean=adv.relativistic_mean)

    # ----------------------------------------------------------------------------------------------------------
    # Training

    def train_step(self, batch: Batch, ctx: StepContext) -> dict[str, float]:
        cfg = self.config
        target = batch.target
        with ctx.autocast():
            outputs = self.generator(batch.source)

        adv_d = torch.zeros(())
        fraction = cfg.adversarial.start_fraction
        warm = fraction > 0 and ctx.progress <= fraction
        adversarial = self.discriminator is not None and not warm
        if adversarial:
            set_requires_grad(self.discriminator, True)
            with ctx.autocast():
                adv_d = self.discriminator_loss(outputs, target)
            ctx.step(adv_d, "discriminator")

        zero = torch.zeros((), device=target.device)
        with ctx.autocast():
            voxel = multires_voxel_loss(outputs, target, cfg.voxel.level_weights, distance=cfg.voxel.distance)
            perception = (self.perception(outputs[level_key(0)], target, generator=ctx.generator)
                          if self.perception is not None else zero)
            adv_g = zero
            if adversarial and cfg.adversarial.weight > 0:
                # Frozen D: the backward still flows through D to G, but computes no D weight gradients.
                set_requires_grad(self.discriminator, False)
                adv_g = self.generator_adversarial_loss(outputs, target)
            total = cfg.voxel.weight * voxel + cfg.perception.weight * perception + cfg.adversarial.weight * adv_g
        try:
            ctx.step(total, "generator")
        finally:
            if self.discriminator is not None:
                set_requires_grad(self.discriminator, True)
        return {cfg.voxel.distance: float(voxel.detach()), "perception": float(perception.detach()),
                "adv_g": float(adv_g.detach()), "adv_d": float(adv_d.detach()), "total": float(total.detach())}
