"""Make-A-Volume (Zhu et al., MICCAI 2023): a 2D latent diffusion model made volume-aware by 1D slice convs.

Three training stages share one architecture (so every stage's checkpoint loads strictly into every other, and
the last one alone translates):

1. ``autoencoder``: a 2D KL autoencoder with down-sampling factor f = 4 [MAV §3 "pretrained KL autoencoder"],
   trained here on slices of *both* modalities (one encoder E compresses x_c and x [MAV §2.2]); L1 + KL (weight
   1e-6, LDM's KL-f4 recipe). LDM's adversarial term is an option (MONAI ``PatchDiscriminator``, hinge, off by
   default); its LPIPS term is not available offline (``perceptual_weight > 0`` is refused).
2. ``slice``: a 2D UNet predicts ε from the channel concatenation [z_t, z_c] [MAV §2.2], ε-MSE [MAV Eq. 4], one
   uniform t per slice [MAV §2.3]; the autoencoder is frozen and the volumetric layers are bypassed.
3. ``volumetric``: identity-initialised 1D convs along the slice axis after every 3×3 conv
   (:mod:`volsynth.nets.volumetric`, [MAV Eqs. 5–7]); a whole volume is one item, with one t per volume drawn
   from the multinomial with weight 2T − t [MAV §2.3]. Which parameters this stage trains is ambiguous in the
   paper: the abstract says the inserted layers are fine-tuned ("fine-tune them"), §2.3 and Fig. 1 say "fine-tune
   the U-Net". Default: the volumetric layers only; ``train_unet: true`` also unfreezes the 2D UNet.

Latent scale: LDM's ``scale_by_std``. The buffer ``latent_scale`` (0 = unset, saved in every checkpoint) is set to
1/std of the latents of the first diffusion-stage batch (source posterior means and target posterior samples,
encoded by the frozen autoencoder) at the first ``train_step`` of the ``slice`` stage, and kept from then on.

Sampling: T = 1000, LDM's linear schedule in √β (0.00085 → 0.012, MONAI ``scaled_linear_beta``); DDIM with
``steps`` steps (the paper's fast row: 200) and η (not in the paper; default 0), or the full 1000-step ancestral
DDPM chain (the paper's best row). The loop is written out below; every item's noise (z_T and any per-step noise)
comes from its own generator, so a volume's output does not depend on what it is batched with.

Not in the paper (see the presets' YAML comments): widths, optimiser, learning rates, iterations, η, the KL
weight, latent channels (3), the volumetric kernel (3) and insertion points, the optional ``window``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.nets import AutoencoderKL, DiffusionModelUNet, PatchDiscriminator
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler
from monai.networks.utils import eval_mode
from torch import Tensor, nn

from volsynth.config import DataConfig, InferenceConfig, MethodConfig, TrainConfig
from volsynth.errors import ConfigError
from volsynth.inferers import Inferer, SlabInferer, item_generator
from volsynth.methods.base import (
    METHODS,
    Batch,
    StepContext,
    TranslationMethod,
    fold_slices,
    set_requires_grad,
    to_data_scale,
    to_network_scale,
    unfold_slices,
)
from volsynth.nets.volumetric import VolumetricUNet, reset_to_identity

Stage = Literal["autoencoder", "slice", "volumetric"]


# --------------------------------------------------------------------------------------------------------------
# Losses and samplers (pure functions)


def epsilon_loss(predicted: Tensor, noise: Tensor, reduction: Literal["mean", "sum"] = "mean") -> Tensor:
    """[MAV Eq. 4] ‖ε − ε_θ‖² between the true noise and the prediction, both ``(N, c, h, w)`` (unitless).

    ``sum``: the printed norm, summed over each item's ``c·h·w`` elements and averaged over items (0 for a perfect
    prediction, E‖ε‖² = c·h·w for a zero prediction). ``mean``: the same divided by ``c·h·w`` (LDM's l2 loss, what
    training uses: same minimiser, a learning rate independent of the latent size).
    """
    squared = (noise.float() - predicted.float()) ** 2
    if reduction == "sum":
        return squared.flatten(1).sum(1).mean()
    return squared.mean()


def kl_divergence(mu: Tensor, sigma: Tensor) -> Tensor:
    """KL(N(μ, σ²) ‖ N(0, 1)) summed over each latent ``(N, c, h, w)`` and averaged over the N items (nats)."""
    kl = 0.5 * (mu.float() ** 2 + sigma.float() ** 2 - 2.0 * torch.log(sigma.float()) - 1.0)
    return kl.flatten(1).sum(1).mean()


def volume_timestep_weights(timesteps: int) -> Tensor:
    """Pre-normalised multinomial weights 2T − t of [MAV §2.3] for the 0-indexed timesteps k = t − 1 ∈ [0, T)."""
    t = torch.arange(1, timesteps + 1, dtype=torch.float64)
    return 2.0 * timesteps - t


def sample_volume_timesteps(num_volumes: int, timesteps: int, generator: torch.Generator | None = None) -> Tensor:
    """One 0-indexed timestep per volume, drawn with replacement with probability ∝ 2T − t [MAV §2.3]: small t are
    twice as likely as t = T (mean 443.93 for T = 1000, against 499.5 for uniform draws)."""
    return torch.multinomial(volume_timestep_weights(timesteps), num_volumes, replacement=True, generator=generator)


def ddim_update(sample: Tensor, predicted_noise: Tensor, alpha_bar: float, alpha_bar_prev: float, *,
                eta: float = 0.0, noise: Tensor | None = None) -> Tensor:
    """One DDIM step (Song et al. 2021, Eqs. 12 and 16) from z_t to z_{t_prev}, ε-prediction, no clipping.

    ``alpha_bar`` / ``alpha_bar_prev`` are ᾱ at the current and the next (smaller) timestep of the chain (1 after
    the last step). ``eta`` scales the step's noise (0 = deterministic); ``noise`` ~ N(0, I) is needed when > 0.
    """
    predicted_original = (sample - math.sqrt(1.0 - alpha_bar) * predicted_noise) / math.sqrt(alpha_bar)
    sigma = eta * math.sqrt((1.0 - alpha_bar_prev) / (1.0 - alpha_bar) * (1.0 - alpha_bar / alpha_bar_prev))
    direction = math.sqrt(max(1.0 - alpha_bar_prev - sigma**2, 0.0)) * predicted_noise
    previous = math.sqrt(alpha_bar_prev) * predicted_original + direction
    if sigma > 0:
        if noise is None:
            raise ValueError("ddim_update with eta > 0 needs noise")
        previous = previous + sigma * noise
    return previous


def ddpm_update(sample: Tensor, predicted_noise: Tensor, timestep: int, betas: Tensor, alphas_cumprod: Tensor, *,
                noise: Tensor | None = None) -> Tensor:
    """One ancestral DDPM step (Ho et al. 2020, Eqs. 6–7) from z_t to z_{t−1}, posterior variance β̃_t, no clipping
    (MONAI ``DDPMScheduler.step`` with ``fixed_small`` variance). ``noise`` is needed for ``timestep > 0``."""
    beta = float(betas[timestep])
    alpha_bar = float(alphas_cumprod[timestep])
    alpha_bar_prev = float(alphas_cumprod[timestep - 1]) if timestep > 0 else 1.0
    predicted_original = (sample - math.sqrt(1.0 - alpha_bar) * predicted_noise) / math.sqrt(alpha_bar)
    mean = (math.sqrt(alpha_bar_prev) * beta / (1.0 - alpha_bar)) * predicted_original \
        + (math.sqrt(1.0 - beta) * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar)) * sample
    if timestep == 0:
        return mean
    if noise is None:
        raise ValueError("ddpm_update with timestep > 0 needs noise")
    variance = max((1.0 - alpha_bar_prev) / (1.0 - alpha_bar) * beta, 1e-20)
    return mean + math.sqrt(variance) * noise


def _randn(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
    """Standard normal noise drawn on the generator's own device, then moved (CPU generators drive CUDA runs)."""
    where = generator.device if generator is not None else torch.device("cpu")
    return torch.randn(shape, generator=generator, device=where).to(device)


# --------------------------------------------------------------------------------------------------------------
# Config


@dataclass
class AutoencoderConfig:
    """2D KL autoencoder (MONAI ``AutoencoderKL``); defaults: LDM's KL-f4 (ch 128, mult 1-2-4, z = 3)."""

    channels: tuple[int, ...] = (128, 256, 512)  # one per level; f = 2 ** (levels − 1) must be 4 [MAV §3]
    num_res_blocks: int = 2
    attention_levels: tuple[bool, ...] = (False, False, False)
    mid_attention: bool = True  # LDM's non-local attention in the encoder/decoder middle
    latent_channels: int = 3  # c (not in the paper; LDM KL-f4)
    norm_num_groups: int = 32
    kl_weight: float = 1e-6  # LDM KL-f4; relative to the per-image L1 sum, as LDM weighs them
    # LDM's PatchGAN term (hinge, MONAI PatchDiscriminator). Off by default; when > 0 a discriminator is trained
    # with the autoencoder (autoencoder stage only; it is dropped for inference).
    adversarial_weight: float = 0.0
    adversarial_start: int = 0  # first iteration of the adversarial term (LDM's disc_start)
    discriminator_channels: int = 64
    discriminator_layers: int = 3
    # LDM's LPIPS term needs pretrained network weights, which volsynth never downloads: must stay 0.
    perceptual_weight: float = 0.0
    batch: int = 16  # slices per encoder/decoder call at inference (memory bound)


@dataclass
class DenoiserConfig:
    """2D diffusion UNet (MONAI ``DiffusionModelUNet``) plus volumetric layers; defaults: the LDM-4 layout."""

    channels: tuple[int, ...] = (224, 448, 672, 896)  # LDM-4: 224 × (1, 2, 3, 4)
    attention_levels: tuple[bool, ...] = (False, True, True, True)  # LDM-4: attention at latent/2, /4, /8
    num_res_blocks: int = 2
    num_head_channels: int = 32
    norm_num_groups: int = 32
    volumetric_kernel: int = 3  # 1D kernel along the slices (not in the paper; 1 could not mix slices)


@dataclass
class MakeAVolumeConfig(MethodConfig):
    """Options of Make-A-Volume ("make_a_volume")."""

    name: str = "make_a_volume"
    stage: Stage = "volumetric"  # what train_step trains; the architecture is the same in every stage
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    unet: DenoiserConfig = field(default_factory=DenoiserConfig)
    timesteps: int = 1000  # T ("Ours 1000 steps" [MAV Tab. 1])
    beta_start: float = 0.00085  # LDM linear schedule in √β
    beta_end: float = 0.012
    sampler: Literal["ddim", "ddpm"] = "ddim"  # ddpm = the full T-step ancestral chain (the paper's best row)
    steps: int = 200  # DDIM steps (the paper's 200); inference.steps / --steps overrides; ddpm always runs T
    eta: float = 0.0  # DDIM η (not in the paper)
    validation_steps: int = 10  # DDIM steps of the in-training validation
    validation_slices: int = 4  # central contiguous slices validated (a small volume for the 1D convs)
    train_unet: bool = False  # volumetric stage: also fine-tune the 2D UNet (see the module docstring)
    # volumetric stage: None = whole volumes [MAV §2.3]. An int = slabs of that many slices (DEVIATION), with
    # window_overlap slices shared by consecutive slabs at inference (the earlier slab's slices are kept).
    window: int | None = None
    window_overlap: int = 0
    # volumetric stage timestep draw: linear = weight 2T − t [MAV §2.3]; uniform = ablation only.
    timestep_weighting: Literal["linear", "uniform"] = "linear"
    lr_discriminator: float | None = None  # None = train.lr


# --------------------------------------------------------------------------------------------------------------
# Method


@METHODS.register("make_a_volume")
class MakeAVolume(TranslationMethod):
    """KL-f4 autoencoder + 2D latent diffusion UNet with identity-initialised volumetric 1D convs."""

    config_class = MakeAVolumeConfig
    stochastic = True
    sampling_kinds = ("slab",)
    description = ("Make-A-Volume: 2D latent diffusion (KL-f4 + UNet) with volumetric 1D convs, Zhu et al. "
                   "MICCAI 2023")
    config: MakeAVolumeConfig

    def __init__(self, config: MakeAVolumeConfig, *, spatial_dims: int = 3) -> None:
        super().__init__(config, spatial_dims=spatial_dims)
        if spatial_dims != 3:
            raise ConfigError(f"make_a_volume translates 3D volumes (its networks are 2D by design), not "
                              f"spatial_dims={spatial_dims}")
        ae, net = config.autoencoder, config.unet
        if len(ae.channels) != 3:
            raise ConfigError(f"method.autoencoder.channels: Make-A-Volume's autoencoder has f = 4, i.e. 3 levels "
                              f"[MAV §3], got {len(ae.channels)}")
        if ae.perceptual_weight > 0:
            raise ConfigError("method.autoencoder.perceptual_weight: LDM's LPIPS term needs pretrained network "
                              "weights, which volsynth does not download; keep it 0")
        if config.window is not None and not 0 <= config.window_overlap < config.window:
            raise ConfigError(f"method.window_overlap must be in [0, window), got {config.window_overlap}")
        self.autoencoder = AutoencoderKL(
            spatial_dims=2, in_channels=1, out_channels=1, channels=tuple(ae.channels),
            num_res_blocks=ae.num_res_blocks, attention_levels=tuple(ae.attention_levels),
            latent_channels=ae.latent_channels, norm_num_groups=ae.norm_num_groups,
            with_encoder_nonlocal_attn=ae.mid_attention, with_decoder_nonlocal_attn=ae.mid_attention,
        )
        latent = ae.latent_channels
        self.unet = VolumetricUNet(DiffusionModelUNet(
            spatial_dims=2, in_channels=2 * latent, out_channels=latent, channels=tuple(net.channels),
            attention_levels=tuple(net.attention_levels), num_res_blocks=net.num_res_blocks,
            num_head_channels=net.num_head_channels, norm_num_groups=net.norm_num_groups,
        ), kernel_size=net.volumetric_kernel)
        # Training-only: exists in the autoencoder stage when the adversarial term is on; load_state_dict ignores
        # its keys elsewhere, so stage checkpoints still load into one another.
        self.discriminator: nn.Module | None = None
        if config.stage == "autoencoder" and ae.adversarial_weight > 0:
            self.discriminator = PatchDiscriminator(spatial_dims=2, channels=ae.discriminator_channels,
                                                    in_channels=1, num_layers_d=ae.discriminator_layers)
        self.register_buffer("latent_scale", torch.zeros(()))  # 0 = unset (see the module docstring)
        schedule = {"schedule": "scaled_linear_beta", "beta_start": config.beta_start, "beta_end": config.beta_end}
        self.ddpm = DDPMScheduler(num_train_timesteps=config.timesteps, clip_sample=False, **schedule)
        self.ddim = DDIMScheduler(num_train_timesteps=config.timesteps, clip_sample=False, **schedule)
        # The schedule as CPU float32 constants (MONAI's add_noise moves its own copy to the data's device).
        self._betas = self.ddpm.betas.clone()
        self._alphas_cumprod = self.ddpm.alphas_cumprod.clone()
        self._sampler: str = config.sampler
        self._steps: int = config.steps
        self._eta: float = config.eta
        stage = config.stage
        set_requires_grad(self.autoencoder, stage == "autoencoder")
        for p in self.unet.spatial_parameters():
            p.requires_grad_(stage == "slice" or (stage == "volumetric" and config.train_unet))
        for p in self.unet.volumetric_parameters():
            p.requires_grad_(stage == "volumetric")

    # Contract hooks ---------------------------------------------------------------------------------------------
    @property
    def patch_divisor(self) -> int:
        """The autoencoder's f = 4 times the UNet's down-samplings."""
        return 2 ** (len(self.config.autoencoder.channels) - 1) * 2 ** (len(self.config.unet.channels) - 1)

    def check_data(self, data: DataConfig) -> None:
        super().check_data(data)
        config, depth = self.config, data.sampling.depth
        if config.stage != "volumetric":
            return  # any depth: the slices of an item are folded into the batch and diffused independently
        if config.window is None and depth != "all":
            raise ConfigError(f"data.sampling.depth: stage 'volumetric' of make_a_volume trains on whole volumes "
                              f"[MAV §2.3]; set depth: all (or method.window, a deviation), got {depth!r}")
        if config.window is not None and depth != config.window:
            raise ConfigError(f"data.sampling.depth: stage 'volumetric' with method.window={config.window} trains "
                              f"on slabs of {config.window} slices; set depth: {config.window}, got {depth!r}")

    def frozen_modules(self) -> list[nn.Module]:
        stage = self.config.stage
        return [self.unet] if stage == "autoencoder" else [self.autoencoder]

    def networks(self) -> dict[str, nn.Module]:
        nets: dict[str, nn.Module] = {"autoencoder": self.autoencoder, "unet": self.unet}
        if self.discriminator is not None:
            nets["discriminator"] = self.discriminator
        return nets

    def parameter_counts(self) -> dict[str, int]:
        """Autoencoder, 2D UNet and volumetric layers counted separately (the UNet count excludes the 1D convs)."""
        counts = {"autoencoder": sum(p.numel() for p in self.autoencoder.parameters()),
                  "unet": sum(p.numel() for p in self.unet.spatial_parameters()),
                  "volumetric": sum(p.numel() for p in self.unet.volumetric_parameters())}
        if self.discriminator is not None:
            counts["discriminator"] = sum(p.numel() for p in self.discriminator.parameters())
        return counts

    @classmethod
    def inference_config(cls, config: MethodConfig) -> MethodConfig:
        assert isinstance(config, MakeAVolumeConfig)
        autoencoder = dataclasses.replace(config.autoencoder, adversarial_weight=0.0, perceptual_weight=0.0)
        return dataclasses.replace(config, autoencoder=autoencoder)

    def load_state_dict(self, state_dict: Mapping[str, Tensor], strict: bool = True, assign: bool = False
                        ) -> nn.modules.module._IncompatibleKeys:
        """Strict for the translation model; discriminator weights load only where a discriminator exists."""
        if self.discriminator is None:
            state_dict = {k: v for k, v in state_dict.items() if not k.startswith("discriminator.")}
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def load_pretrained(self, weights: Mapping[str, Tensor], source: MethodConfig, path: str) -> None:
        """The previous stage's weights (``train.init_from``). Volumetric layers coming from a stage that did not
        train them are reset to the identity, so stage 3 starts exactly at the stage-2 model [MAV §2.3]."""
        super().load_pretrained(weights, source, path)
        if getattr(source, "stage", None) != "volumetric":
            for layer in self.unet.volumetric_layers():
                reset_to_identity(layer.volumetric)

    # Training ---------------------------------------------------------------------------------------------------
    def configure_optimizers(self, train: TrainConfig) -> dict[str, torch.optim.Optimizer]:
        def adamw(params: Iterator[nn.Parameter], lr: float | None = None) -> torch.optim.AdamW:
            return torch.optim.AdamW(list(params), lr=train.lr if lr is None else lr, betas=train.betas,
                                     weight_decay=train.weight_decay)

        stage = self.config.stage
        if stage == "autoencoder":
            optimizers = {"autoencoder": adamw(self.autoencoder.parameters())}
            if self.discriminator is not None:
                optimizers["discriminator"] = adamw(self.discriminator.parameters(), self.config.lr_discriminator)
            return optimizers
        if stage == "slice":
            return {"unet": adamw(self.unet.spatial_parameters())}
        trained = list(self.unet.volumetric_parameters())
        if self.config.train_unet:
            trained += list(self.unet.spatial_parameters())
        return {"volumetric": adamw(iter(trained))}

    def train_step(self, batch: Batch, ctx: StepContext) -> dict[str, float]:
        if self.config.stage == "autoencoder":
            return self._train_autoencoder(batch, ctx)
        return self._train_diffusion(batch, ctx)

    def _train_autoencoder(self, batch: Batch, ctx: StepContext) -> dict[str, float]:
        ae = self.config.autoencoder
        # One autoencoder for both modalities: E encodes the source x_c and the target x [MAV §2.2].
        images = to_network_scale(torch.cat([fold_slices(batch.source), fold_slices(batch.target)]))
        pixels = images[0].numel()
        adversarial = self.discriminator is not None and ctx.iteration >= ae.adversarial_start
        with ctx.autocast():
            mu, sigma = self.autoencoder.encode(images)
            latent = mu + sigma * _randn(tuple(mu.shape), ctx.generator, mu.device).to(mu.dtype)
            reconstruction = self.autoencoder.decode(latent).float()
            l1 = F.l1_loss(reconstruction, images)
            # LDM sums both terms per image; dividing both by the pixel count keeps its KL/L1 ratio.
            kl = kl_divergence(mu, sigma) / pixels
            loss = l1 + ae.kl_weight * kl
            if adversarial:
                assert self.discriminator is not None
                set_requires_grad(self.discriminator, False)
                generator_adversarial = -self.discriminator(reconstruction)[-1].float().mean()  # hinge, G side
                loss = loss + ae.adversarial_weight * generator_adversarial
        ctx.step(loss, "autoencoder")
        losses = {"loss": float(loss.detach()), "l1": float(l1.detach()), "kl": float(kl.detach())}
        if adversarial:
            assert self.discriminator is not None
            set_requires_grad(self.discriminator, True)
            with ctx.autocast():
                real = self.discriminator(images)[-1].float()
                synthetic = self.discriminator(reconstruction.detach())[-1].float()
                discriminator_loss = 0.5 * (F.relu(1.0 - real).mean() + F.relu(1.0 + synthetic).mean())
            ctx.step(discriminator_loss, "discriminator")
            losses["discriminator"] = float(discriminator_loss.detach())
        return losses

    @torch.no_grad()
    def _encode(self, images: Tensor, *, generator: torch.Generator | None = None, sample: bool = False) -> Tensor:
        """Unscaled latents of ``(N, 1, H, W)`` slices on [0, 1]: posterior means, or samples when ``sample``."""
        latents = []
        for chunk in images.split(max(1, self.config.autoencoder.batch)):
            mu, sigma = self.autoencoder.encode(to_network_scale(chunk))
            if sample:
                mu = mu + sigma * _randn(tuple(mu.shape), generator, mu.device).to(mu.dtype)
            latents.append(mu.float())
        return torch.cat(latents)

    @torch.no_grad()
    def _set_latent_scale(self, latents: Tensor) -> None:
        """LDM's scale_by_std: 1/std of the first diffusion batch's latents (all ranks agree under DDP)."""
        variance = latents.float().var()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(variance)
            variance /= torch.distributed.get_world_size()
        self.latent_scale.fill_(float(1.0 / variance.sqrt().clamp_min(1e-8)))

    def _train_diffusion(self, batch: Batch, ctx: StepContext) -> dict[str, float]:
        config = self.config
        volumes, depth = batch.source.shape[0], batch.source.shape[-1]
        source_latents = self._encode(fold_slices(batch.source))  # z_c: the source posterior mean (deterministic)
        target_latents = self._encode(fold_slices(batch.target), generator=ctx.generator, sample=True)  # z (LDM)
        if float(self.latent_scale) <= 0:
            self._set_latent_scale(torch.cat([source_latents, target_latents]))
        scale = self.latent_scale
        condition, clean = source_latents * scale, target_latents * scale
        device, slices = clean.device, clean.shape[0]
        if config.stage == "slice":  # an independent uniform t for every slice [MAV §2.3]
            timesteps = torch.randint(0, config.timesteps, (slices,), generator=ctx.generator).to(device)
            num_slices = None
        else:  # one t per volume, shared by its slices [MAV §2.3]
            if config.timestep_weighting == "linear":
                per_volume = sample_volume_timesteps(volumes, config.timesteps, ctx.generator)
            else:
                per_volume = torch.randint(0, config.timesteps, (volumes,), generator=ctx.generator)
            timesteps = per_volume.repeat_interleave(depth).to(device)
            num_slices = depth
        noise = _randn(tuple(clean.shape), ctx.generator, device)
        noisy = self.ddpm.add_noise(clean, noise, timesteps)  # [MAV Eq. 2]
        with ctx.autocast():
            predicted = self.unet(torch.cat([noisy, condition], dim=1), timesteps, num_slices)
            loss = epsilon_loss(predicted, noise)  # [MAV Eq. 4]
        ctx.step(loss, "unet" if config.stage == "slice" else "volumetric")
        return {"loss": float(loss.detach()), "t_mean": float(timesteps.float().mean())}

    # Inference --------------------------------------------------------------------------------------------------
    def _require_diffusion_model(self) -> None:
        if self.config.stage == "autoencoder":
            raise ConfigError("this make_a_volume model is from the 'autoencoder' stage and cannot translate yet: "
                              "train the 'slice' stage from it (method.stage=slice, train.init_from=<this run>)")
        if float(self.latent_scale) <= 0:
            raise ConfigError("this make_a_volume model has no latent scale (it never trained a diffusion stage): "
                              "train the 'slice' stage first")

    def make_inferer(self, inference: InferenceConfig, data: DataConfig) -> Inferer:
        """Slabs along ``data.sampling.axis``: single slices (stages 1–2) or whole volumes (stage 3; ``window``
        slices when set), and the sampler for this inference (``inference.steps`` overrides ``method.steps``)."""
        config = self.config
        steps = inference.steps if inference.steps is not None else config.steps
        if config.sampler == "ddpm" and inference.steps is not None and inference.steps != config.timesteps:
            raise ConfigError(f"inference.steps (--steps): method.sampler ddpm runs all {config.timesteps} steps; "
                              "use method.sampler=ddim for fewer")
        if not 1 <= steps <= config.timesteps:
            raise ConfigError(f"inference.steps (--steps) must be in [1, {config.timesteps}], got {steps}")
        self._sampler, self._steps, self._eta = config.sampler, steps, config.eta
        if config.stage != "volumetric":
            return SlabInferer(axis=data.sampling.axis, depth=1, batch=inference.sw_batch_size)
        if config.window is None:
            return SlabInferer(axis=data.sampling.axis, depth="all", batch=inference.sw_batch_size)
        return SlabInferer(axis=data.sampling.axis, depth=config.window, overlap=config.window_overlap,
                           batch=inference.sw_batch_size)

    @contextlib.contextmanager
    def sampling(self, sampler: Literal["ddim", "ddpm"], steps: int, eta: float = 0.0) -> Iterator[None]:
        """Use another sampler for the calls inside (validation: few DDIM steps)."""
        saved = self._sampler, self._steps, self._eta
        self._sampler, self._steps, self._eta = sampler, steps, eta
        try:
            yield
        finally:
            self._sampler, self._steps, self._eta = saved

    def predict_noise(self, noisy: Tensor, condition: Tensor, timestep: int, num_slices: int | None) -> Tensor:
        """ε̂ for latents ``(b_v·n, c, h, w)`` at one timestep; input channels [z_t, z_c] (LDM ``concat``)."""
        timesteps = torch.full((noisy.shape[0],), int(timestep), dtype=torch.long, device=noisy.device)
        return self.unet(torch.cat([noisy, condition], dim=1), timesteps, num_slices).float()

    def denoise(self, condition: Tensor, slices_per_item: int, generators: list[torch.Generator], *,
                num_slices: int | None) -> Tensor:
        """Run the reverse chain from z_T ~ N(0, I) given z_c ``(B·n, c, h, w)``; item ``b`` (``n`` slices) draws
        all its noise from ``generators[b]``. Returns the scaled latents ẑ_0."""
        device, shape = condition.device, tuple(condition.shape[1:])

        def item_noise() -> Tensor:
            return torch.cat([_randn((slices_per_item, *shape), g, device) for g in generators])

        sample = item_noise()  # z_T
        if self._sampler == "ddpm":
            for t in range(self.config.timesteps - 1, -1, -1):
                predicted = self.predict_noise(sample, condition, t, num_slices)
                sample = ddpm_update(sample, predicted, t, self._betas, self._alphas_cumprod,
                                     noise=item_noise() if t > 0 else None)
            return sample
        self.ddim.set_timesteps(self._steps)
        timesteps = [int(t) for t in self.ddim.timesteps]
        for index, t in enumerate(timesteps):
            previous = timesteps[index + 1] if index + 1 < len(timesteps) else -1
            alpha_bar = float(self._alphas_cumprod[t])
            alpha_bar_prev = float(self._alphas_cumprod[previous]) if previous >= 0 else 1.0
            predicted = self.predict_noise(sample, condition, t, num_slices)
            sample = ddim_update(sample, predicted, alpha_bar, alpha_bar_prev, eta=self._eta,
                                 noise=item_noise() if self._eta > 0 else None)
        return sample

    def translate(self, source: Tensor, generators: list[torch.Generator] | None = None) -> Tensor:
        """Encode every slice → z_c, denoise each item's slices jointly (the volumetric layers see n = its slice
        count in stage 3), decode slice by slice; ``(B, 1, H, W, D)`` on [0, 1]."""
        self._require_diffusion_model()
        items, depth = source.shape[0], source.shape[-1]
        if generators is None:
            generators = [item_generator(0, b, source.device) for b in range(items)]
        if len(generators) != items:
            raise ValueError(f"{items} items need {items} generators, got {len(generators)}")
        height, width = source.shape[2:4]
        divisor = self.patch_divisor
        padded = F.pad(source, (0, 0, 0, -width % divisor, 0, -height % divisor))
        with eval_mode(self), torch.no_grad():
            scale = float(self.latent_scale)
            condition = self._encode(fold_slices(padded)) * scale
            num_slices = depth if self.config.stage == "volumetric" else None
            latents = self.denoise(condition, depth, generators, num_slices=num_slices) / scale
            decoded = torch.cat([self.autoencoder.decode(chunk.to(condition.dtype)).float()
                                 for chunk in latents.split(max(1, self.config.autoencoder.batch))])
        synthetic = to_data_scale(decoded).clamp(0, 1)[..., :height, :width]
        return unfold_slices(synthetic, depth)

    def validation_scores(self, source: np.ndarray, target: np.ndarray, inferer: Inferer, *,
                          device: torch.device, precision: str = "fp32", seed: int = 0) -> dict[str, float]:
        """Autoencoder stage: reconstruction of every target slice. Diffusion stages: DDIM with
        ``validation_steps`` on the ``validation_slices`` central contiguous slices. SSIM per slice (2D, data
        range 1) averaged; PSNR and MAE over the validated slices."""
        from volsynth.metrics import psnr, ssim

        axis = int(getattr(inferer, "axis", 2))
        source, target = np.moveaxis(source, axis, -1), np.moveaxis(target, axis, -1)
        if self.config.stage == "autoencoder":
            synthetic = self._reconstruct(target, device=device)
        else:
            count = min(self.config.validation_slices, target.shape[-1])
            first = (target.shape[-1] - count) // 2
            source, target = source[..., first:first + count], target[..., first:first + count]
            depth: int | Literal["all"] = "all" if self.config.stage == "volumetric" else 1
            with self.sampling("ddim", self.config.validation_steps):
                synthetic = self.infer(source, SlabInferer(axis=2, depth=depth, batch=count), device=device,
                                       precision=precision, seed=seed)
        slice_ssim = [ssim(synthetic[..., k], target[..., k], data_range=1.0) for k in range(target.shape[-1])]
        return {"ssim": float(np.mean(slice_ssim)), "psnr": psnr(synthetic, target, data_range=1.0),
                "mae": float(np.mean(np.abs(synthetic - target)))}

    @torch.no_grad()
    def _reconstruct(self, volume: np.ndarray, *, device: torch.device) -> np.ndarray:
        """Autoencoder reconstruction (posterior mean) of every slice of ``(H, W, D)`` on [0, 1]."""
        slices = torch.from_numpy(np.ascontiguousarray(np.moveaxis(volume, -1, 0), dtype=np.float32))[:, None]
        height, width = slices.shape[-2:]
        divisor = 2 ** (len(self.config.autoencoder.channels) - 1)
        padded = F.pad(slices, (0, -width % divisor, 0, -height % divisor)).to(device)
        was_training = self.training
        self.eval()
        try:
            outputs = []
            for chunk in padded.split(max(1, self.config.autoencoder.batch)):
                mu, _ = self.autoencoder.encode(to_network_scale(chunk))
                outputs.append(to_data_scale(self.autoencoder.decode(mu)).float().clamp(0, 1))
        finally:
            self.train(was_training)
        reconstruction = torch.cat(outputs)[:, 0, :height, :width].cpu().numpy()
        return np.moveaxis(reconstruction, 0, -1)
