"""Checkpoints: atomic save, validated load, and rebuilding a method from a checkpoint alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from volsynth.config import ExperimentConfig, load_config
from volsynth.methods.base import TranslationMethod, build_method
from volsynth.utils import atomic_path

FORMAT = "volsynth-checkpoint"


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt or incompatible; the message names the file."""


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` (plus format tags) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        torch.save({"format": FORMAT, "version": 1, **state}, tmp)
    return Path(path)


def load_checkpoint(path: str | Path, *, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint; raise :class:`CheckpointError` naming the file if it is missing, corrupt or foreign."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        # Checkpoints hold only tensors and plain python containers; numpy RNG state is stored as lists.
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # truncated zip, wrong file type, pickle refusal
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(error).__name__}: {error})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a volsynth checkpoint (no '{FORMAT}' tag)")
    for key in ("config", "model", "iteration"):
        if key not in state:
            raise CheckpointError(f"{path}: checkpoint lacks '{key}'")
    return state


def load_method(path: str | Path, *, device: torch.device | str = "cpu"
                ) -> tuple[TranslationMethod, ExperimentConfig, dict[str, Any]]:
    """Rebuild the method saved in a checkpoint (eval mode) with its resolved config."""
    state = load_checkpoint(path)
    try:
        config = load_config(state["config"])
    except ValueError as error:
        raise CheckpointError(f"{path}: its saved config is invalid for this volsynth version: {error}") from None
    method = build_method(config.method, inference=True)
    try:
        method.load_state_dict(state["model"])
    except RuntimeError as error:
        raise CheckpointError(f"{path}: weights do not fit method '{config.method.name}': {error}") from None
    method.to(device).eval()
    return method, config, state
