"""The method contract: every translation method is a small ``nn.Module`` with four duties.

1. build its networks in ``__init__`` from its own config dataclass;
2. ``configure_optimizers(train)`` returns named optimisers (the trainer adds schedules, AMP scaling, clipping,
   checkpointing and logging — identically for every method);
3. ``train_step(batch, ctx)`` does one iteration and returns a dict of float losses for the log;
4. ``translate(source)`` maps a source patch/volume tensor in [0, 1] to the target scale in [0, 1].

The trainer never asks what kind of method it runs: GANs step several optimisers through ``ctx.step``; a
regression model steps one. Non-tensor state a method must checkpoint (an image pool, a ramp counter) goes in
``get_extra_state``/``set_extra_state`` of the module that owns it, which ``state_dict`` already carries.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from volsynth.config import MethodConfig
from volsynth.registry import Registry

if TYPE_CHECKING:
    from volsynth.config import TrainConfig


@dataclass
class Batch:
    """One training batch of aligned patches, each ``(B, 1, X, Y, Z)`` float32 on the run's device.

    ``source`` and ``target`` are on the normalised [0, 1] scale. For unpaired methods the trainer draws
    ``target`` from *other* subjects than ``source``. ``mask`` is the foreground (source and target above the
    threshold) and ``label`` an optional integer label map (both ``None`` when absent).
    """

    source: Tensor
    target: Tensor
    mask: Tensor | None = None
    label: Tensor | None = None

    def to(self, device: torch.device) -> Batch:
        return Batch(*(t.to(device, non_blocking=True) if t is not None else None
                       for t in (self.source, self.target, self.mask, self.label)))


class StepContext:
    """What a method needs from the trainer inside ``train_step``: autocast and one optimiser step.

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
        # Method-side randomness (image pool draws, slice sampling) uses this generator, which the trainer
        # reseeds from (seed, iteration) so a resumed run draws the same numbers.
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        self.grad_norms: dict[str, float] = {}

    @property
    def progress(self) -> float:
        """Fraction of training done, in [0, 1] (for loss-weight ramps)."""
        return min(1.0, self.iteration / max(1, self.total_iterations))

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
            norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
            self.grad_norms[optimizer] = float(norm)
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
    description: ClassVar[str] = ""

    def __init__(self, config: MethodConfig, *, spatial_dims: int = 3) -> None:
        super().__init__()
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}, got "
                            f"{type(config).__name__}")
        self.config = config
        self.spatial_dims = spatial_dims

    @abstractmethod
    def configure_optimizers(self, train: TrainConfig) -> dict[str, torch.optim.Optimizer]:
        """Named optimisers, e.g. ``{"generator": Adam(...), "discriminator": Adam(...)}``."""

    @abstractmethod
    def train_step(self, batch: Batch, ctx: StepContext) -> dict[str, float]:
        """One training iteration; returns the losses to log (python floats)."""

    @abstractmethod
    def translate(self, source: Tensor) -> Tensor:
        """Map ``(B, 1, X, Y, Z)`` source in [0, 1] to the target scale, clipped to [0, 1] (eval mode)."""

    @classmethod
    def inference_config(cls, config: MethodConfig) -> MethodConfig:
        """The config to rebuild the method for inference/counting: drop training-only parts that need external
        resources (e.g. pretrained perceptual networks). The saved weights must still load into it."""
        return config

    def networks(self) -> dict[str, nn.Module]:
        """The method's networks by name (for parameter counts); default: its direct sub-modules."""
        return dict(self.named_children())

    @property
    def patch_divisor(self) -> int:
        """Patch/ROI sizes must be multiples of this (``2 ** number of down-samplings``)."""
        return 8

    def parameter_counts(self) -> dict[str, int]:
        return {name: sum(p.numel() for p in net.parameters()) for name, net in self.networks().items()}


METHODS: Registry[type[TranslationMethod]] = Registry("method")


def build_method(config: MethodConfig, *, spatial_dims: int = 3, inference: bool = False) -> TranslationMethod:
    """Instantiate the registered method named ``config.name`` (``inference``: without training-only parts)."""
    cls = METHODS.get(config.name)
    return cls(cls.inference_config(config) if inference else config, spatial_dims=spatial_dims)


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
