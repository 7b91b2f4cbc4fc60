"""Exponential moving average of the trained weights (``train.ema``), used for validation and prediction.

The average covers every parameter an optimiser updates. Checkpoints keep the live weights under ``model`` (what
resume continues) and the averaged ones under ``model_ema`` (what ``predict`` and ``train.init_from`` use), both
complete state dicts, so the method's own code never needs to know EMA exists.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import nn


class WeightAverage:
    """``average ← decay · average + (1 − decay) · weights`` after every step from iteration ``start`` on."""

    def __init__(self, model: nn.Module, parameters: Iterable[nn.Parameter], *, decay: float, start: int = 0) -> None:
        chosen = {id(p) for p in parameters}
        self.model = model
        self.decay = decay
        self.start = start
        # The parameter objects are kept (not looked up by name later): a distributed wrapper renames them.
        self.params = {name: p for name, p in model.named_parameters() if id(p) in chosen}
        self.names = list(self.params)
        self.average = {name: p.detach().clone() for name, p in self.params.items()}

    @torch.no_grad()
    def update(self, iteration: int) -> None:
        params = self.params
        for name in self.names:
            if iteration <= self.start:  # before averaging starts the average simply follows the weights
                self.average[name].copy_(params[name])
            else:
                self.average[name].lerp_(params[name].detach(), 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The model's full state dict with the averaged parameters in place of the live ones."""
        state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        state.update({name: value.clone() for name, value in self.average.items()})
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name in self.names:
            self.average[name].copy_(state[name])

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """Temporarily run the model with the averaged weights (validation)."""
        params = self.params
        live = {name: params[name].detach().clone() for name in self.names}
        with torch.no_grad():
            for name in self.names:
                params[name].copy_(self.average[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name in self.names:
                    params[name].copy_(live[name])
