"""Experiments: loading a config with its method, checkpoints, and rebuilding a method from a checkpoint alone.

This layer sits above ``methods`` (it resolves the polymorphic ``method`` section through the registry) and below
``training``, ``inference`` and ``evaluation``, which all load checkpoints but never import each other for it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from volsynth.config import (
    ExperimentConfig,
    MethodConfig,
    from_dict,
    load_raw,
    to_dict,
    validate,
)
from volsynth.errors import CheckpointError, ConfigError
from volsynth.methods import METHODS
from volsynth.methods.base import TranslationMethod, build_method
from volsynth.registry import UnknownNameError
from volsynth.utils import atomic_path

FORMAT = "volsynth-checkpoint"


def method_config_class(data: Mapping[str, Any], where: str = "method") -> type[MethodConfig]:
    """The config dataclass of the method named in a raw ``method`` section."""
    name = data.get("name")
    if not name:
        raise ConfigError(f"{where}.name is not set: choose one of {', '.join(METHODS.names())} "
                          "(or start from a preset: `volsynth methods`)")
    try:
        return METHODS.get(str(name)).config_class
    except UnknownNameError as error:
        raise ConfigError(f"{where}.name: {error}") from None


def load_config(source: str | Path | Mapping[str, Any] | None = None, overrides: list[str] | None = None
                ) -> ExperimentConfig:
    """Load an :class:`ExperimentConfig` from a YAML file, preset name or mapping, then apply overrides.

    Unknown keys, wrong types and out-of-range values raise :class:`ConfigError` with the dotted path.
    """
    raw, origin = load_raw(source, overrides)
    raw.setdefault("method", {})
    try:
        return validate(from_dict(ExperimentConfig, raw, resolvers={MethodConfig: method_config_class}))
    except ConfigError as error:
        raise ConfigError(f"{error}{origin}") from None


# --------------------------------------------------------------------------------------------------------------
# Checkpoints


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` (plus format tags) to ``path`` atomically, flushed to disk before the rename."""
    with atomic_path(path, fsync=True) as tmp:
        torch.save({"format": FORMAT, "version": 1, **state}, tmp)
    return Path(path)


def load_checkpoint(path: str | Path, *, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint; raise :class:`CheckpointError` naming the file if it is missing, corrupt or foreign.

    Loading is always ``weights_only``: a checkpoint can hold tensors and plain containers only, never code.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder; pass a checkpoint file (.pt) or use --run for a run folder")
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file, not a checkpoint")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # truncated zip, wrong file type, a refused pickle global
        # torch's message suggests retrying with weights_only=False; that would execute arbitrary code from the
        # file, so only its first line is passed on.
        text = str(error).strip()
        if "weights only load failed" in text.lower() or "unsupported global" in text.lower():
            reason = "it holds Python objects other than tensors, which volsynth never unpickles"
        else:
            reason = (text.splitlines()[0] if text else type(error).__name__)[:200]
        raise CheckpointError(f"{path}: not a readable volsynth checkpoint ({reason})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a volsynth checkpoint (no '{FORMAT}' tag)")
    for key in ("config", "model", "iteration"):
        if key not in state:
            raise CheckpointError(f"{path}: checkpoint lacks '{key}'")
    return state


def checkpoint_config(state: Mapping[str, Any], path: str | Path) -> ExperimentConfig:
    """The resolved config saved in a checkpoint."""
    try:
        return load_config(state["config"])
    except ConfigError as error:
        raise CheckpointError(f"{path}: its saved config is invalid for this volsynth version: {error}") from None


def file_digest(path: str | Path, length: int = 16) -> str:
    """Hex SHA-256 prefix of a file (provenance: which checkpoint made an output)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:length]


def load_weights(method: TranslationMethod, weights: Mapping[str, torch.Tensor], path: str | Path) -> None:
    """``load_state_dict(strict=True)`` with a short message (not thousands of key names) on a mismatch."""
    try:
        method.load_state_dict(weights)
    except RuntimeError as error:
        text = str(error)
        missing = text.count("Missing key") and text.split("Missing key(s) in state_dict:")[-1][:160]
        hint = f" (first differences: {missing.strip()}…)" if missing else ""
        raise CheckpointError(f"{path}: weights do not fit method '{method.config.name}'{hint}") from None


def load_method(path: str | Path, *, device: torch.device | str = "cpu", use_ema: bool | None = None
                ) -> tuple[TranslationMethod, ExperimentConfig, dict[str, Any]]:
    """Rebuild the method saved in a checkpoint (eval mode) with its resolved config.

    When the checkpoint holds averaged weights (``train.ema``) they are used, unless ``use_ema`` (default: the
    saved ``inference.use_ema``) says otherwise.
    """
    state = load_checkpoint(path)
    config = checkpoint_config(state, path)
    method = build_method(config.method, inference=True)
    use_ema = config.inference.use_ema if use_ema is None else use_ema
    weights = state["model_ema"] if use_ema and state.get("model_ema") is not None else state["model"]
    load_weights(method, weights, path)
    method.to(device).eval()
    return method, config, state


def saved_method_config(state: Mapping[str, Any]) -> dict[str, Any]:
    """The method section of a checkpoint's config, as a plain mapping."""
    return dict(state["config"].get("method", {}))


__all__ = ["FORMAT", "checkpoint_config", "file_digest", "load_checkpoint", "load_config", "load_method",
           "load_weights", "method_config_class", "save_checkpoint", "saved_method_config", "to_dict"]
