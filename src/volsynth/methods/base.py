"""The method contract: every translation method is a small ``nn.Module`` with four duties and a few hooks.

Duties:

1. build its networks in ``__init__`` from its own config dataclass;
2. ``configure_optimizers(train)`` returns named optimisers (the trainer adds schedules, AMP scaling, clipping,
   checkpointing and logging — identically for every method);
3. ``train_step(batch, ctx)`` does one iteration and returns a dict of float losses for the log;
4. ``translate(source, generators)`` maps a source item in [0, 1] to the target scale in [0, 1].

Hooks, each with a default that fits a 3D patch model, so a method overrides only what differs:

* ``sampling_kinds`` / ``check_data`` / ``shape_divisor``: which training items (3D patches or slabs of slices)
  the method accepts; a mismatch is a :class:`ConfigError` before any work.
* ``frozen_modules``: parts that are loaded but not trained; they stay in eval mode and stay in the checkpoint.
* ``load_pretrained``: how ``train.init_from`` weights enter (stages chained by checkpoints).
* ``make_inferer``: sliding windows (default) or slabs along the slice axis; ``stochastic`` methods take a seed.
* ``validation_scores``: what validation measures (a diffusion model validates with few steps on few slices).

The trainer never asks what kind of method it runs. Non-tensor state a method must checkpoint (an image pool, a
memory bank) goes in buffers or ``get_extra_state``/``set_extra_state``, which ``state_dict`` already carries.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from volsynth.config import DataConfig, InferenceConfig, MethodConfig, TrainConfig
from volsynth.errors import CheckpointError, ConfigError
from volsynth.inferers import Inferer, SlidingWindowInferer, run_inferer
from volsynth.nets.patchgan import smallest_input
from volsynth.registry import Registry


@dataclass
class Batch:
    """One training batch, each tensor ``(B, 1, *spatial)`` float32 on the run's device.

    Patch sampling gives ``(B, 1, X, Y, Z)`` cubes; slab sampling gives ``(B, 1, H, W, D)`` with the slice axis
    last (``D`` = slab depth). ``source`` and ``target`` are on the normalised [0, 1] scale. For unpaired methods
    ``target`` comes from *other* subjects than ``source``. ``mask`` is the foreground (source and target above
    the threshold, paired only); ``source_label`` / ``target_label`` are integer label maps of each side (the
    ``data.sampling.labels`` map), ``None`` when absent.
    """

    source: Tensor
    target: Tensor
    mask: Tensor | None = None
    source_label: Tensor | None = None
    target_label: Tensor | None = None

    @property
    def label(self) -> Tensor | None:
        """The source side's label map (the only one a paired batch needs)."""
        return self.source_label

    def to(self, device: torch.device) -> Batch:
        return Batch(*(t.to(device, non_blocking=True) if t is not None else None
                       for t in (self.source, self.target, self.mask, self.source_label, self.target_label)))

    def channels_last(self) -> Batch:
        """The same 5-D tensors in channels-last-3D memory format (values unchanged)."""
        return Batch(*(t.contiguous(memory_format=torch.channels_last_3d) if t is not None else None
                       for t in (self.source, self.target, self.mask, self.source_label, self.target_label)))


class StepContext:
    """What a method needs from the trainer inside ``train_step``: autocast, randomness and optimiser steps.

    ``step(loss, name)`` zeroes that optimiser's gradients, back-propagates (with AMP loss scaling on CUDA fp16),
    clips the gradient norm if configured and steps. Gradients a backward pass leaves on *other* networks (the
    discriminator during a generator step) are harmless: each optimiser zeroes its own before its step.
    """

    def __init__(self, *, device: torch.device, precision: str, optimizers: dict[str, torch.optim.Optimizer],
                 scalers: dict[str, torch.amp.GradScaler], grad_clip: float | None, iteration: int = 0,
                 total_iterations: int = 1, generator: torch.Generator | None = None) -> None:
        self.device = device
        self.precision = precision
        self.optimizers = optimizers
        self.scalers = scalers
        self.grad_clip = grad_clip
        self.iteration = iteration
        self.total_iterations = total_iterations
        # Fraction of train.max_seconds used, set by the trainer under train.time_box (else 0): progress follows
        # whichever of iterations and time runs out first.
        self.time_progress = 0.0
        # Method-side randomness (image pool draws, timesteps, noise) uses this generator, which the trainer
        # reseeds from (seed, iteration, rank) so a resumed run draws the same numbers.
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)

    @property
    def progress(self) -> float:
        """Fraction of training done, in [0, 1] (for loss-weight ramps and phases): iterations done over
        train.iterations, or the fraction of train.max_seconds used when train.time_box makes that larger."""
        return min(1.0, max(self.iteration / max(1, self.total_iterations), self.time_progress))

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """Mixed-precision context for forward passes and losses (no-op in fp32)."""
        return autocast(self.device, self.precision)

    def step(self, loss: Tensor, optimizer: str, *, retain_graph: bool = False) -> None:
        """Backward ``loss`` and step the named optimiser."""
        opt = self.optimizers[optimizer]
        scaler = self.scalers[optimizer]
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward(retain_graph=retain_graph)
        if self.grad_clip is not None:
            scaler.unscale_(opt)
            params = [p for group in opt.param_groups for p in group["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
        scaler.step(opt)
        scaler.update()


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """``torch.autocast`` for bf16/fp16, a null context for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


class TranslationMethod(nn.Module, ABC):
    """Base class of every method. Subclasses set ``config_class`` and register with ``@METHODS.register``."""

    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    requires_paired_data: ClassVar[bool] = True
    stochastic: ClassVar[bool] = False  # translate draws random numbers (samplers): predict takes --seed/--steps
    sampling_kinds: ClassVar[tuple[str, ...]] = ("patch",)  # data.sampling.kind values the method accepts
    description: ClassVar[str] = ""

    def __init__(self, config: MethodConfig, *, spatial_dims: int = 3) -> None:
        super().__init__()
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}, got "
                            f"{type(config).__name__}")
        self.config = config
        self.spatial_dims = spatial_dims
        self._compiled: Callable[[Tensor, list[torch.Generator] | None], Tensor] | None = None

    # Duties -----------------------------------------------------------------------------------------------------
    @abstractmethod
    def configure_optimizers(self, train: TrainConfig) -> dict[str, torch.optim.Optimizer]:
        """Named optimisers, e.g. ``{"generator": Adam(...), "discriminator": Adam(...)}``."""

    @abstractmethod
    def train_step(self, batch: Batch, ctx: StepContext) -> dict[str, float]:
        """One training iteration; returns the losses to log (python floats)."""

    @abstractmethod
    def translate(self, source: Tensor, generators: list[torch.Generator] | None = None) -> Tensor:
        """Map source items ``(B, 1, *spatial)`` in [0, 1] to the target scale, clipped to [0, 1].

        Called in eval mode under ``torch.inference_mode`` (see :meth:`infer`). Stochastic methods draw item
        ``b``'s noise from ``generators[b]``; deterministic methods ignore ``generators``.
        """

    # Data hooks -------------------------------------------------------------------------------------------------
    @property
    def patch_divisor(self) -> int:
        """Spatial sizes the networks see must be multiples of this (``2 ** number of down-samplings``)."""
        return 8

    def check_data(self, data: DataConfig) -> None:
        """Refuse training items the method cannot take (raises :class:`ConfigError` naming the option)."""
        sampling = data.sampling
        if sampling.kind not in self.sampling_kinds:
            raise ConfigError(f"data.sampling.kind: method '{self.config.name}' trains on "
                              f"{' or '.join(self.sampling_kinds)} items, not '{sampling.kind}'")
        if sampling.kind == "patch" and any(p % self.patch_divisor for p in sampling.patch_size):
            raise ConfigError(f"data.sampling.patch_size {list(sampling.patch_size)} must be a multiple of "
                              f"{self.patch_divisor} for method '{self.config.name}'")
        if sampling.kind == "slab" and any(p % self.patch_divisor for p in sampling.in_plane):
            raise ConfigError(f"data.sampling.in_plane {list(sampling.in_plane)} must be a multiple of "
                              f"{self.patch_divisor} for method '{self.config.name}'")

    def shape_divisor(self, data: DataConfig) -> tuple[int, int, int]:
        """Preprocessing pads each axis to a multiple of this (slab methods: not along the slice axis)."""
        divisor = [self.patch_divisor] * 3
        if data.sampling.kind == "slab":
            divisor[data.sampling.axis] = 1
        return (divisor[0], divisor[1], divisor[2])

    # Training hooks ---------------------------------------------------------------------------------------------
    def frozen_modules(self) -> list[nn.Module]:
        """Modules that are part of the method but not trained in this configuration (kept in eval mode)."""
        return []

    def train(self, mode: bool = True) -> TranslationMethod:
        super().train(mode)
        for module in self.frozen_modules():  # dropout/normalisation of frozen parts must not change behaviour
            module.eval()
        return self

    def load_pretrained(self, weights: Mapping[str, Tensor], source: MethodConfig, path: str) -> None:
        """Start from another run's weights (``train.init_from``); default: same method, every key must fit."""
        if source.name != self.config.name:
            raise CheckpointError(f"{path}: train.init_from holds a '{source.name}' model, this run trains "
                                  f"'{self.config.name}'")
        try:
            self.load_state_dict(weights)
        except RuntimeError as error:
            first = str(error).splitlines()[0][:200]
            raise CheckpointError(f"{path}: its weights do not fit this '{self.config.name}' ({first})") from None

    @classmethod
    def inference_config(cls, config: MethodConfig) -> MethodConfig:
        """The config to rebuild the method for inference/counting: drop training-only parts that need external
        resources (e.g. pretrained perceptual networks). The saved weights must still load into it."""
        return config

    def networks(self) -> dict[str, nn.Module]:
        """The method's networks by name (for parameter counts); default: its direct sub-modules."""
        return dict(self.named_children())

    def parameter_counts(self) -> dict[str, int]:
        return {name: sum(p.numel() for p in net.parameters()) for name, net in self.networks().items()}

    # Inference hooks --------------------------------------------------------------------------------------------
    def make_inferer(self, inference: InferenceConfig, data: DataConfig) -> Inferer:
        """How a whole volume is covered; default: Gaussian sliding windows of the training patch size."""
        if inference.steps is not None and not self.stochastic:
            raise ConfigError(f"inference.steps (--steps): method '{self.config.name}' is deterministic and has no "
                              "sampling steps")
        roi = tuple(inference.roi_size or data.sampling.patch_size)
        if any(r % self.patch_divisor for r in roi):
            raise ConfigError(f"inference.roi_size {list(roi)} must be a multiple of {self.patch_divisor} for "
                              f"method '{self.config.name}'")
        return SlidingWindowInferer(roi_size=(roi[0], roi[1], roi[2]), overlap=inference.overlap,
                                    sigma_scale=inference.sigma_scale, batch=inference.sw_batch_size,
                                    blend=inference.blend)

    @torch.no_grad()
    def infer(self, source: np.ndarray, inferer: Inferer, *, device: torch.device | None = None,
              precision: str = "fp32", seed: int = 0, channels_last: bool = False,
              compile: bool = False, mirror_axes: Sequence[int] = ()) -> np.ndarray:
        """Translate a preprocessed ``(X, Y, Z)`` array on [0, 1] with ``inferer``; float32 on [0, 1].

        The method runs in eval mode under ``inference_mode`` and ``precision`` autocast; its previous mode and
        memory format are restored afterwards, so validation in the middle of training changes nothing.
        ``channels_last`` runs 3D items in channels-last-3D memory (oneDNN's faster path for 3D convs on CPUs).
        ``compile`` runs :meth:`translate` through ``torch.compile`` with frozen weights (see
        :meth:`compiled_translate`); for inference only, never in the middle of training. ``mirror_axes``:
        test-time mirroring, the mean over flips along every subset of these volume axes (see ``run_inferer``).
        """
        device = device or next(self.parameters()).device
        was_training = self.training
        translate = self.compiled_translate() if compile else self.translate

        def predictor(items: Tensor, generators: list[torch.Generator] | None) -> Tensor:
            if channels_last and items.ndim == 5:
                items = items.contiguous(memory_format=torch.channels_last_3d)
            with autocast(device, precision):
                return translate(items, generators).float().contiguous()

        self.eval()
        if channels_last:
            set_3d_memory_format(self, torch.channels_last_3d)
        try:
            with torch.inference_mode():
                return run_inferer(inferer, predictor, source, device=device, seed=seed, mirror_axes=mirror_axes)
        finally:
            if channels_last:
                set_3d_memory_format(self, torch.contiguous_format)
            self.train(was_training)

    def compiled_translate(self) -> Callable[[Tensor, list[torch.Generator] | None], Tensor]:
        """:meth:`translate` compiled by inductor with its weights frozen into the graph (built once per method).

        Why: inductor fuses the many small element-wise ops of these generators and pre-packs conv weights for
        oneDNN, for a one-off compile of 1–3 min per window shape. Measured on a 2-core AVX2 CPU
        (``benchmarks/inference.py``): 1.08× per paper-size volume (conv-bound at 96³ windows), 1.7× on
        single 48³ windows (one thread), where eager dispatch weighs more. Frozen weights are constants: the
        method must not be trained afterwards. Every call gets the first call's batch size (a short last batch is
        padded by repeating its last item) so that a sliding window compiles once. Stochastic samplers are not
        compiled.
        """
        if self.stochastic:
            raise ConfigError(f"inference.compile (--compile): method '{self.config.name}' samples stochastically; "
                              "compile applies to deterministic methods")
        if self._compiled is None:
            compiled = torch.compile(self.translate, dynamic=False, options={"freezing": True})
            batch: list[int] = []  # the first call's batch size

            def run(items: Tensor, generators: list[torch.Generator] | None = None) -> Tensor:
                count = items.shape[0]
                if not batch:
                    batch.append(count)
                if count < batch[0]:  # one compiled shape for every window batch
                    items = torch.cat([items, items[-1:].expand(batch[0] - count, *items.shape[1:])]).contiguous(
                        memory_format=_memory_format_of(items))
                try:
                    return compiled(items, generators)[:count]
                except Exception as error:  # inductor needs a working C++ compiler; say so instead of its trace
                    if type(error).__name__ in ("BackendCompilerFailed", "InductorError", "CppCompileError"):
                        raise ConfigError(f"inference.compile (--compile): torch.compile failed "
                                          f"({str(error).splitlines()[0][:200]}); run without --compile") from error
                    raise

            self._compiled = run
        return self._compiled

    def validation_scores(self, source: np.ndarray, target: np.ndarray, inferer: Inferer, *,
                          device: torch.device, precision: str = "fp32", seed: int = 0) -> dict[str, float]:
        """Scores of one validation subject (preprocessed arrays); default: whole-volume SSIM and PSNR."""
        from volsynth.metrics import psnr, ssim

        synthetic = self.infer(source, inferer, device=device, precision=precision, seed=seed)
        return {"ssim": ssim(synthetic, target, data_range=1.0), "psnr": psnr(synthetic, target, data_range=1.0)}


METHODS: Registry[type[TranslationMethod]] = Registry("method")


def build_method(config: MethodConfig, *, spatial_dims: int = 3, inference: bool = False) -> TranslationMethod:
    """Instantiate the registered method named ``config.name`` (``inference``: without training-only parts)."""
    cls = METHODS.get(config.name)
    return cls(cls.inference_config(config) if inference else config, spatial_dims=spatial_dims)


def _memory_format_of(tensor: Tensor) -> torch.memory_format:
    if tensor.ndim == 5 and tensor.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def set_3d_memory_format(module: nn.Module, memory_format: torch.memory_format) -> None:
    """Put every 5-D parameter and buffer (3D conv weights) in ``memory_format``; 2-D layers are left alone."""
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            if tensor.dim() == 5:
                tensor.data = tensor.data.contiguous(memory_format=memory_format)


def set_requires_grad(modules: nn.Module | list[nn.Module], flag: bool) -> None:
    """Freeze/unfreeze networks (skips D's weight gradients during the generator step, saving time)."""
    for module in modules if isinstance(modules, list) else [modules]:
        for p in module.parameters():
            p.requires_grad_(flag)


def adam(params: Iterator[nn.Parameter] | list[nn.Parameter], train: TrainConfig, *, lr: float | None = None,
         betas: tuple[float, float] | None = None) -> torch.optim.Adam:
    """Adam with the trainer-level defaults unless the method overrides lr/betas."""
    return torch.optim.Adam(list(params), lr=train.lr if lr is None else lr,
                            betas=train.betas if betas is None else betas, weight_decay=train.weight_decay)


def check_critic_fits(data: DataConfig, method: str, n_layers: int, norm: str, padding: int = 1) -> None:
    """Refuse patches too small for a method's instance-normalised PatchGAN critic (a clear ConfigError instead of a
    norm-layer traceback at the first training step; batch norm also pools over the batch, so it is left alone)."""
    patch = list(data.sampling.patch_size)
    need = smallest_input(n_layers, padding)
    if norm == "instance" and data.sampling.kind == "patch" and min(patch) < need:
        raise ConfigError(f"data.sampling.patch_size {patch} is too small for method '{method}': its {n_layers}-layer "
                          f"PatchGAN critic needs at least {need} voxels per axis (use larger patches or fewer "
                          "method.discriminator_layers)")


def to_network_scale(image: Tensor) -> Tensor:
    """[0, 1] data scale → [−1, 1], the scale of tanh-output GANs (pix2pix, CycleGAN, DRIT++)."""
    return image * 2.0 - 1.0


def to_data_scale(image: Tensor) -> Tensor:
    """[−1, 1] network scale → [0, 1] data scale."""
    return (image + 1.0) * 0.5


def fold_slices(x: Tensor) -> Tensor:
    """``(B, C, H, W, D)`` slab → ``(B·D, C, H, W)`` 2D items (slice axis folded into the batch)."""
    return x.movedim(-1, 1).flatten(0, 1)


def unfold_slices(x: Tensor, depth: int) -> Tensor:
    """Inverse of :func:`fold_slices`: ``(B·D, C, H, W)`` → ``(B, C, H, W, D)``."""
    return x.unflatten(0, (-1, depth)).movedim(1, -1)
