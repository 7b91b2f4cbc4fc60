"""Typed experiment configuration, loaded strictly from YAML.

Every option lives in a dataclass with a default and a comment. Loading is strict: an unknown key is an error
with the closest valid key ("did you mean"), and a value of the wrong type names its dotted path. Command-line
overrides (``--set train.lr=2e-4``) are applied to the raw mapping *before* validation, so they pass through the
same checks. The resolved configuration (every default filled in) is written next to every output.

The ``method`` section is polymorphic: its ``name`` selects a registered method, whose own dataclass
(``TranslationMethod.config_class``) validates the remaining keys.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

from volsynth.registry import suggest

C = TypeVar("C")

# Presets ship in the repository's configs/ folder; a bare name like "mdagan-cpu" resolves there.
PRESET_DIR = Path(__file__).resolve().parents[2] / "configs"


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message names the dotted path and, if any, the file."""


# --------------------------------------------------------------------------------------------------------------
# Sections


@dataclass
class MethodConfig:
    """Base of every method's options; ``name`` picks the method from the registry."""

    name: str = "mdagan"


@dataclass
class SplitConfig:
    """How subjects are split into train / validation / test (deterministic for a given seed)."""

    # "paper": test = subjects whose index % folds == fold (the seed's 75/25 with folds=4); validation = the
    # first min(int(0.1 * |dev|), 5) remaining subjects. "kfold": the same after a seeded shuffle. "random":
    # shuffled by `seed`, cut by the fractions below. "manifest": each manifest entry's `split` field.
    mode: Literal["paper", "kfold", "random", "manifest"] = "paper"
    folds: int = 4
    fold: int = 0
    seed: int = 0
    val_fraction: float = 0.1
    test_fraction: float = 0.25
    max_val_subjects: int = 5


@dataclass
class DataConfig:
    """Where the cohort is and how volumes become training patches."""

    manifest: str = ""  # a manifest.json from `volsynth inspect` or `volsynth phantom` (relative to the config)
    source: str = "t1"  # modality names as in the manifest
    target: str = "t2"
    # Intensity model per side: MR is min-max (or percentile) scaled per volume; CT/CBCT are clipped to
    # [-1024, 3000] HU and scaled to [0, 1], which is invertible and keeps HU for the output.
    source_kind: Literal["mr", "ct", "cbct"] = "mr"
    target_kind: Literal["mr", "ct", "cbct"] = "mr"
    mr_normalisation: Literal["minmax", "percentile"] = "minmax"
    percentiles: tuple[float, float] = (0.5, 99.5)
    spacing: list[float] | None = None  # mm; None = the cohort's median spacing (as the paper)
    patch_size: tuple[int, int, int] = (32, 32, 32)
    patches_per_step: int = 3  # the paper samples 3 patches per iteration from one volume
    # Patch centres are drawn where source > t and target > t (after scaling), as the paper does.
    foreground_threshold: float = 0.1
    foreground_probability: float = 1.0  # chance a patch centre is foreground (the paper: always)
    resample_target: bool = False  # resample target onto the source grid instead of refusing mismatched grids
    cache_dir: str | None = None  # preprocessed-volume cache; None = <run>/cache
    split: SplitConfig = field(default_factory=SplitConfig)


@dataclass
class ScheduleConfig:
    """Learning-rate schedule applied to every optimiser of a method."""

    kind: Literal["constant", "multistep", "linear_decay"] = "constant"
    milestones: list[int] = field(default_factory=list)  # iterations (multistep)
    gamma: float = 0.5
    decay_start: int = 0  # iteration where linear decay to 0 begins (linear_decay, CycleGAN-style)


@dataclass
class TrainConfig:
    """The one trainer's options (every method)."""

    iterations: int = 1000
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    grad_clip: float | None = None  # max global grad norm per optimiser step; None = off
    precision: Literal["fp32", "bf16", "fp16", "auto"] = "fp32"  # auto = bf16 on CPU, fp16 on CUDA
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    checkpoint_every: int = 500
    val_every: int = 500
    log_every: int = 10
    tensorboard: bool = False
    progress: bool = True
    deterministic: bool = True  # torch.use_deterministic_algorithms where supported


@dataclass
class InferenceConfig:
    """Sliding-window inference defaults (the paper's values)."""

    roi_size: tuple[int, int, int] | None = None  # None = the training patch size
    overlap: float = 0.625
    sigma_scale: float = 0.125
    sw_batch_size: int = 4
    blend: Literal["gaussian", "constant"] = "gaussian"
    precision: Literal["fp32", "bf16"] = "fp32"


@dataclass
class ExperimentConfig:
    """Everything a run needs; saved resolved as ``config.yaml`` in each run and output folder."""

    method: MethodConfig = field(default_factory=MethodConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    seed: int = 0


# --------------------------------------------------------------------------------------------------------------
# Strict conversion


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, where: str) -> Any:
    """Check/convert ``value`` to annotation ``tp``; raise :class:`ConfigError` naming ``where``."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None:
            if type(None) in options:
                return None
            raise ConfigError(f"{where}: must not be null")
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(value, option, where)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} matches none of {tp}")
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            hint = suggest(str(value), [str(a) for a in allowed])
            raise ConfigError(f"{where}: {value!r} is not one of {list(allowed)}.{hint}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, where)
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)} ({value!r})")
            return tuple(_convert(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
        item = args[0] if args else Any
        converted = [_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(converted) if origin is tuple else converted
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        key_tp, value_tp = get_args(tp) or (Any, Any)
        return {_convert(k, key_tp, where): _convert(v, value_tp, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    raise ConfigError(f"{where}: unsupported option type {_type_name(tp)}")


def from_dict(cls: type[C], data: Mapping[str, Any], where: str = "") -> C:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types raise :class:`ConfigError`."""
    if cls is MethodConfig:  # polymorphic: the registered method's own dataclass validates the section
        cls = method_config_class(str(data.get("name", MethodConfig.name)), where or "method")  # type: ignore[assignment]
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in fields:
            hint = suggest(str(key), list(fields))
            raise ConfigError(f"Unknown option '{path}'.{hint} Valid keys here: {', '.join(sorted(fields))}")
        kwargs[key] = _convert(value, hints[key], path)
    return cls(**kwargs)


def method_config_class(name: str, where: str = "method") -> type[MethodConfig]:
    """The config dataclass of the registered method ``name``."""
    from volsynth.methods import METHODS  # late import: methods import this module

    try:
        return METHODS.get(name).config_class
    except KeyError as error:
        raise ConfigError(f"{where}.name: {error}") from None


def to_dict(config: Any) -> Any:
    """Plain-python (YAML-safe) form of a config dataclass: tuples become lists."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return {f.name: to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, list | tuple):
        return [to_dict(v) for v in config]
    if isinstance(config, dict):
        return {k: to_dict(v) for k, v in config.items()}
    return config


# --------------------------------------------------------------------------------------------------------------
# Overrides and files


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.lr=2e-4"`` → (["train", "lr"], 2e-4); the value is parsed as YAML (lists, numbers, null)."""
    if "=" not in text:
        raise ConfigError(f"Override '{text}' must look like key.path=value")
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"Override '{text}' has an empty key")
    return parts, yaml.safe_load(raw) if raw.strip() else ""


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.path=value`` overrides to a raw config mapping (validated later, like file values)."""
    for text in overrides:
        parts, value = parse_override(text)
        node = raw
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"Override '{text}': '{part}' is not a section")
            node = child
        node[parts[-1]] = value
    return raw


def resolve_config_path(name_or_path: str | Path) -> Path:
    """A YAML path, or a preset name from ``configs/`` (``mdagan-cpu`` → ``configs/mdagan-cpu.yaml``)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    preset = PRESET_DIR / f"{name_or_path}.yaml"
    if preset.is_file():
        return preset
    presets = sorted(p.stem for p in PRESET_DIR.glob("*.yaml")) if PRESET_DIR.is_dir() else []
    raise ConfigError(
        f"Config not found: {path} (neither a file nor a preset).{suggest(str(name_or_path), presets)} "
        f"Presets: {', '.join(presets) or '(none)'}"
    )


def load_config(source: str | Path | Mapping[str, Any] | None = None, overrides: list[str] | None = None
                ) -> ExperimentConfig:
    """Load an :class:`ExperimentConfig` from a YAML file / preset name / mapping, then apply overrides.

    A relative ``data.manifest`` in a file is resolved against that file's folder, so configs travel with
    their cohorts.
    """
    origin = ""
    if source is None:
        raw: dict[str, Any] = {}
    elif isinstance(source, Mapping):
        raw = dict(source)
    else:
        path = resolve_config_path(source)
        origin = f" (in {path})"
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as error:
            raise ConfigError(f"Config {path} is not valid YAML: {error}") from None
        raw = loaded or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"Config {path} must be a mapping at the top level")
        manifest = raw.get("data", {}).get("manifest") if isinstance(raw.get("data"), dict) else None
        if isinstance(manifest, str) and manifest and not Path(manifest).is_absolute():
            candidate = (path.parent / manifest).resolve()
            if candidate.exists():
                raw["data"]["manifest"] = str(candidate)
    raw = apply_overrides(copy.deepcopy(raw), overrides or [])
    raw.setdefault("method", {})  # always resolve to the concrete method's dataclass
    try:
        return from_dict(ExperimentConfig, raw)
    except ConfigError as error:
        raise ConfigError(f"{error}{origin}") from None


def save_config(config: ExperimentConfig, path: str | Path) -> Path:
    """Write the resolved config as YAML atomically."""
    from volsynth.utils import atomic_write_text

    return atomic_write_text(Path(path), yaml.safe_dump(to_dict(config), sort_keys=False))

