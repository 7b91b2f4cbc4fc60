"""Typed experiment configuration, loaded strictly from YAML.

Every option lives in a dataclass with a default and a comment. Loading is strict: an unknown key is an error
with the closest valid key ("did you mean"), a value of the wrong type or out of range names its dotted path.
Command-line overrides (``--set train.lr=2e-4``) are applied to the raw mapping *before* validation, so they pass
through the same checks. The resolved configuration (every default filled in) is written next to every output.

This module is a leaf: it imports nothing from the rest of volsynth but the error types. The ``method`` section
is polymorphic (its ``name`` selects a registered method whose own dataclass validates the other keys); that
lookup needs the method registry, so :func:`volsynth.experiment.load_config` supplies it.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

from volsynth.errors import ConfigError
from volsynth.registry import suggest

C = TypeVar("C")

# Presets ship inside the package (package data), so a bare name like "mdagan-cpu" works after `pip install`.
PRESET_DIR = Path(str(resources.files("volsynth") / "configs"))

# Keys that moved, so an old config or a habit gets pointed at the new place instead of a bare "unknown option".
MOVED_KEYS = {
    "data.patch_size": "data.sampling.patch_size",
    "data.patches_per_step": "data.sampling.per_step",
    "data.foreground_threshold": "data.sampling.foreground_threshold",
    "data.foreground_probability": "data.sampling.foreground_probability",
}

__all__ = ["PRESET_DIR", "ConfigError", "DataConfig", "EMAConfig", "ExperimentConfig", "InferenceConfig",
           "MethodConfig", "SamplingConfig", "ScheduleConfig", "SplitConfig", "StageConfig", "TrainConfig",
           "apply_overrides", "from_dict", "load_raw", "resolve_config_path", "save_config", "to_dict", "validate"]


# --------------------------------------------------------------------------------------------------------------
# Sections


@dataclass
class MethodConfig:
    """Base of every method's options; ``name`` picks the method from the registry."""

    name: str = ""


@dataclass
class SplitConfig:
    """How subjects are split into train / validation / test (deterministic for a given seed)."""

    # "auto": the manifest's own split (what `volsynth inspect`/`phantom` wrote) when its entries carry one,
    # otherwise "paper". "paper": test = subjects whose index % folds == fold (the seed's 75/25 with folds=4);
    # validation = the first min(int(0.1 * |dev|), 5) remaining subjects. "kfold": the same after a seeded
    # shuffle. "random": shuffled by `seed`, cut by the fractions below. "manifest": each entry's `split` field.
    mode: Literal["auto", "paper", "kfold", "random", "manifest"] = "auto"
    folds: int = 4
    fold: int = 0
    seed: int = 0
    val_fraction: float = 0.1
    test_fraction: float = 0.25
    max_val_subjects: int = 5


@dataclass
class SamplingConfig:
    """What one training item is, chosen by the config and accepted (or refused) by the method.

    ``patch``: cubes of ``patch_size`` voxels (3D methods). ``slab``: ``depth`` consecutive slices along the
    canonical ``axis`` (after reorientation to ``data.orientation``; axis 2 is axial for RAS), each slice centre-
    padded or randomly cropped to ``in_plane``. ``depth: 1`` gives single 2D slices, ``depth: all`` whole volumes.
    """

    kind: Literal["patch", "slab"] = "patch"
    patch_size: tuple[int, int, int] = (32, 32, 32)  # patch: voxels per axis
    axis: Literal[0, 1, 2] = 2  # slab: slice axis in the canonical orientation (2 = inferior→superior)
    depth: int | Literal["all"] = 1  # slab: slices per item (1 = 2D slices, all = the whole volume)
    in_plane: tuple[int, int] = (64, 64)  # slab: every slice is padded / cropped to this size
    per_step: int = 3  # items (patches or slabs) per iteration; the paper samples 3 patches from one volume
    # Item centres are drawn where source > t and target > t (after scaling), as the paper does.
    foreground_threshold: float = 0.1
    foreground_probability: float = 1.0  # chance an item is centred on foreground (the paper: always)
    # patch: chance an item is centred on a voxel of one class of the `labels` map, the class drawn uniformly among
    # those in the subject (nnU-Net's oversampling; rare structures such as lesions are seen as often as big ones).
    class_probability: float = 0.0
    # Mirror each item (patch or slab) along each of these axes (canonical orientation; 0 = left-right) with chance
    # 1/2, source, target, mask and labels together (nnU-Net's mirroring / MONAI's RandFlipd). () = off.
    flip_axes: tuple[int, ...] = ()
    labels: str | None = None  # a manifest label map that travels with the batch on both sides: label | tissue
    # A subject without that map: "error" (refuse, naming it) or "segment" (tissue maps from the built-in GMM
    # segmenter on the source image within the subject's mask; CSF/GM/WM Dice 0.6–0.75 on the phantom).
    missing_labels: Literal["error", "segment"] = "error"


@dataclass
class DataConfig:
    """Where the cohort is and how volumes become training items."""

    manifest: str = ""  # a manifest.json from `volsynth inspect` or `volsynth phantom` (relative to the config)
    # Modality names as in the manifest. None = the manifest's own source/target (what `inspect` was told). A
    # value that contradicts the manifest is an error unless `override_manifest` is true.
    source: str | None = None
    target: str | None = None
    override_manifest: bool = False  # allow source/target/split that differ from the manifest's
    # Intensity model per side: MR is min-max (or percentile) scaled per volume; CT/CBCT are clipped to
    # [-1024, 3000] HU and scaled to [0, 1], which is invertible and keeps HU for the output.
    source_kind: Literal["mr", "ct", "cbct"] = "mr"
    target_kind: Literal["mr", "ct", "cbct"] = "mr"
    mr_normalisation: Literal["minmax", "percentile"] = "minmax"
    percentiles: tuple[float, float] = (0.5, 99.5)
    spacing: list[float] | None = None  # mm; None = the cohort's median spacing (as the paper)
    # Volumes are reoriented to these axis codes after reading (the direction each array axis points to, as in
    # MONAI/nibabel: RAS = x to the right, y anterior, z superior), so "axial" is the same axis for every subject
    # and file format; predictions are turned back exactly before writing. null keeps each file's own order.
    orientation: str | None = "RAS"
    resample_target: bool = False  # resample target onto the source grid instead of refusing mismatched grids
    cache_dir: str | None = None  # preprocessed-volume cache; None = <run>/cache
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    split: SplitConfig = field(default_factory=SplitConfig)


@dataclass
class ScheduleConfig:
    """Learning-rate schedule applied to every optimiser of a method, stepped once per iteration."""

    # constant; multistep (× gamma at each milestone); linear_decay (to 0 from decay_start, CycleGAN-style);
    # cosine (to 0 at the last iteration); onecycle (linear warm-up to lr, then cosine to 0).
    kind: Literal["constant", "multistep", "linear_decay", "cosine", "onecycle"] = "constant"
    milestones: list[int] = field(default_factory=list)  # iterations (multistep)
    gamma: float = 0.5
    decay_start: int = 0  # iteration where linear decay to 0 begins (linear_decay)
    warmup: int = 0  # iterations of linear warm-up from 0 (every kind)


@dataclass
class EMAConfig:
    """Exponential moving average of the weights a method translates with (off when ``decay`` is null)."""

    decay: float | None = None  # e.g. 0.999; the averaged weights are used by validation and `predict`
    start: int = 0  # iteration where averaging starts (before it, the average copies the weights)


@dataclass
class TrainConfig:
    """The one trainer's options (every method)."""

    iterations: int = 1000
    max_seconds: float | None = None  # stop after this much training time (cumulative over resumes); None = off
    # With max_seconds: schedules (learning rate, a method's phases such as mdagan's adversarial start) follow
    # max(iterations done / iterations, seconds used / max_seconds), so a run the clock stops early still ends
    # annealed instead of cut mid-schedule. A run that finishes its iterations in time is unchanged (and exactly
    # reproducible); one the clock cuts depends on the machine's speed. The demo's time box uses it.
    time_box: bool = False
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    grad_clip: float | None = None  # max global grad norm per optimiser step; None = off
    precision: Literal["fp32", "bf16", "fp16", "auto"] = "fp32"  # auto = fp16 on CUDA, fp32 on CPU
    device: str = "auto"  # auto | cpu | cuda | cuda:N (under torchrun: one device per local rank)
    threads: int | None = None  # torch intra-op threads; None = torch's default
    # channels-last 3D memory format for 3D patch models: oneDNN's fast path for small-channel 3D convs on CPUs
    # (1.5–1.8× per mdagan step measured here); no effect on 2D/slab methods.
    channels_last: bool = False
    init_from: str | None = None  # a run folder or checkpoint whose weights start this run (stages)
    ema: EMAConfig = field(default_factory=EMAConfig)
    best_metric: str = "ssim"  # validation score that picks best.pt (higher is better unless it is a loss/error)
    checkpoint_every: int = 500
    val_every: int = 500
    log_every: int = 10
    tensorboard: bool = False
    progress: bool = True
    deterministic: bool = True  # torch.use_deterministic_algorithms where supported
    distributed_timeout: float = 600.0  # seconds a rank waits for the others before the job fails (torchrun)


@dataclass
class InferenceConfig:
    """Inference defaults. The method chooses the inferer (3D sliding window, or slabs along the slice axis)."""

    roi_size: tuple[int, int, int] | None = None  # sliding window: None = the training patch size
    overlap: float = 0.625  # sliding window: fraction of a window shared with its neighbour (the paper's)
    sigma_scale: float = 0.125
    sw_batch_size: int = 4  # windows or slabs per forward pass
    blend: Literal["gaussian", "constant"] = "gaussian"
    precision: Literal["fp32", "bf16", "auto"] = "fp32"  # auto = bf16 where the CPU has native bf16 (AVX-512)
    seed: int = 0  # stochastic methods (samplers): the same seed gives the same output
    steps: int | None = None  # stochastic methods: sampling steps (None = the method's default)
    use_ema: bool = True  # translate with the averaged weights when the checkpoint has them
    # 3D windows in channels-last memory: the same values (within float rounding), faster 3D convs on CPUs.
    channels_last: bool = True
    # torch.compile (inductor, frozen weights): a one-off compile of 1–3 min and a C++ compiler, then the same
    # outputs; 1.08× per paper-size volume on a 2-core AVX2 CPU (benchmarks/RESULTS.md). Deterministic methods only.
    compile: bool = False
    # Test-time mirroring (nnU-Net's default): also predict the source flipped along every subset of these axes
    # (0, 1, 2 = the volume's x, y, z) and average; 2 ** len(axes) passes. () = off (the papers' presets).
    mirror_axes: tuple[int, ...] = ()


@dataclass
class StageConfig:
    """One stage of a method trained in stages (e.g. autoencoder → slice diffusion → volumetric layers).

    ``overrides`` are dotted keys applied like ``--set`` on top of the preset for that stage. ``volsynth train``
    runs every stage in order into ``RUN/<n>-<name>/``, each starting from the previous stage's weights; with
    ``--set method.stage=<name>`` it runs that stage alone (with its overrides) into ``--out``.
    """

    name: str = ""
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class ExperimentConfig:
    """Everything a run needs; saved resolved as ``config.yaml`` in each run and output folder."""

    method: MethodConfig = field(default_factory=MethodConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    stages: list[StageConfig] = field(default_factory=list)  # empty: a single-stage method
    seed: int = 0


# --------------------------------------------------------------------------------------------------------------
# Strict conversion

Resolver = Callable[[Mapping[str, Any], str], type]


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, where: str, resolvers: Mapping[type, Resolver]) -> Any:
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
                return _convert(value, option, where, resolvers)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} is not valid here ("
                          + "; ".join(e.split(": ", 1)[-1] for e in errors) + ")")
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed or type(value) is not type(allowed[allowed.index(value)]):
            hint = suggest(str(value), [str(a) for a in allowed])
            raise ConfigError(f"{where}: {value!r} is not one of {list(allowed)}.{hint}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, where, resolvers=resolvers)
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)} ({value!r})")
            return tuple(_convert(v, a, f"{where}[{i}]", resolvers)
                         for i, (v, a) in enumerate(zip(value, args, strict=True)))
        item = args[0] if args else Any
        converted = [_convert(v, item, f"{where}[{i}]", resolvers) for i, v in enumerate(value)]
        return tuple(converted) if origin is tuple else converted
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        key_tp, value_tp = get_args(tp) or (Any, Any)
        return {_convert(k, key_tp, where, resolvers): _convert(v, value_tp, f"{where}.{k}", resolvers)
                for k, v in value.items()}
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
        number: float | None = None
        if isinstance(value, int | float) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if not math.isfinite(number):
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    raise ConfigError(f"{where}: unsupported option type {_type_name(tp)}")


def from_dict(cls: type[C], data: Mapping[str, Any], where: str = "", *,
              resolvers: Mapping[type, Resolver] | None = None) -> C:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types raise :class:`ConfigError`.

    ``resolvers`` maps a base dataclass to a function ``(data, where) -> concrete subclass`` for polymorphic
    sections (the ``method`` section resolves through the method registry).
    """
    resolvers = resolvers or {}
    if cls in resolvers:
        cls = resolvers[cls](data, where)  # type: ignore[assignment]
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in fields:
            if path in MOVED_KEYS:
                raise ConfigError(f"Option '{path}' moved to '{MOVED_KEYS[path]}'")
            hint = suggest(str(key), list(fields))
            raise ConfigError(f"Unknown option '{path}'.{hint} Valid keys here: {', '.join(sorted(fields))}")
        kwargs[key] = _convert(value, hints[key], path, resolvers)
    return cls(**kwargs)


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
# Range checks (after types): a bad value fails at load time with its dotted path, before any work starts.


def require(condition: bool, path: str, requirement: str, value: Any) -> None:
    """Raise ConfigError "<path> must be <requirement>, got <value>" unless ``condition``."""
    if not condition:
        raise ConfigError(f"{path} must be {requirement}, got {value!r}")


def validate(config: ExperimentConfig) -> ExperimentConfig:
    """Check numeric ranges and combinations that types cannot express; returns ``config``."""
    train, data, sampling, inference = config.train, config.data, config.data.sampling, config.inference
    for key in ("iterations", "checkpoint_every", "val_every", "log_every"):
        require(getattr(train, key) >= 1, f"train.{key}", ">= 1", getattr(train, key))
    require(train.lr > 0, "train.lr", "> 0", train.lr)
    require(train.max_seconds is None or train.max_seconds > 0, "train.max_seconds", "> 0 or null",
             train.max_seconds)
    require(not train.time_box or train.max_seconds is not None, "train.time_box",
            "false unless train.max_seconds is set (the schedule needs a time budget to follow)", train.time_box)
    require(train.weight_decay >= 0, "train.weight_decay", ">= 0", train.weight_decay)
    require(all(0 <= b < 1 for b in train.betas), "train.betas", "in [0, 1)", list(train.betas))
    require(train.grad_clip is None or train.grad_clip > 0, "train.grad_clip", "> 0 or null", train.grad_clip)
    require(train.threads is None or train.threads >= 1, "train.threads", ">= 1 or null", train.threads)
    require(train.schedule.warmup >= 0, "train.schedule.warmup", ">= 0", train.schedule.warmup)
    require(train.schedule.gamma > 0, "train.schedule.gamma", "> 0", train.schedule.gamma)
    require(train.distributed_timeout > 0, "train.distributed_timeout", "> 0", train.distributed_timeout)
    decay = train.ema.decay
    require(decay is None or 0 < decay < 1, "train.ema.decay", "in (0, 1) or null", decay)
    require(train.ema.start >= 0, "train.ema.start", ">= 0", train.ema.start)
    require(all(p >= 1 for p in sampling.patch_size), "data.sampling.patch_size", "positive",
             list(sampling.patch_size))
    require(all(p >= 1 for p in sampling.in_plane), "data.sampling.in_plane", "positive", list(sampling.in_plane))
    require(sampling.depth == "all" or sampling.depth >= 1, "data.sampling.depth", ">= 1 or 'all'", sampling.depth)
    require(sampling.per_step >= 1, "data.sampling.per_step", ">= 1", sampling.per_step)
    require(0 <= sampling.foreground_probability <= 1, "data.sampling.foreground_probability", "in [0, 1]",
             sampling.foreground_probability)
    require(0 <= sampling.class_probability <= 1, "data.sampling.class_probability", "in [0, 1]",
            sampling.class_probability)
    require(sampling.class_probability == 0 or (sampling.labels is not None and sampling.kind == "patch"),
            "data.sampling.class_probability", "0 unless data.sampling.labels names a label map and kind is patch",
            sampling.class_probability)
    require(len(set(sampling.flip_axes)) == len(sampling.flip_axes) and set(sampling.flip_axes) <= {0, 1, 2},
            "data.sampling.flip_axes", "distinct axes among 0, 1, 2", list(sampling.flip_axes))
    require(data.spacing is None or (len(data.spacing) == 3 and all(s > 0 for s in data.spacing)),
             "data.spacing", "three positive numbers (mm) or null", data.spacing)
    require(data.percentiles[0] < data.percentiles[1] and 0 <= data.percentiles[0] and data.percentiles[1] <= 100,
             "data.percentiles", "an increasing pair in [0, 100]", list(data.percentiles))
    if data.orientation is not None:
        from_orientation_codes(data.orientation, "data.orientation")
    split = data.split
    require(split.folds >= 2 or split.mode in ("random", "manifest", "auto"), "data.split.folds", ">= 2",
             split.folds)
    require(0 <= split.fold < max(split.folds, 1), "data.split.fold", f"in [0, {split.folds - 1}]", split.fold)
    require(0 <= split.val_fraction < 1, "data.split.val_fraction", "in [0, 1)", split.val_fraction)
    require(0 <= split.test_fraction < 1, "data.split.test_fraction", "in [0, 1)", split.test_fraction)
    require(inference.roi_size is None or all(r >= 1 for r in inference.roi_size), "inference.roi_size",
             "positive or null", inference.roi_size)
    require(0 <= inference.overlap < 1, "inference.overlap", "in [0, 1)", inference.overlap)
    require(inference.sigma_scale > 0, "inference.sigma_scale", "> 0", inference.sigma_scale)
    require(inference.sw_batch_size >= 1, "inference.sw_batch_size", ">= 1", inference.sw_batch_size)
    require(len(set(inference.mirror_axes)) == len(inference.mirror_axes) and set(inference.mirror_axes) <= {0, 1, 2},
            "inference.mirror_axes", "distinct axes among 0, 1, 2", inference.mirror_axes)
    require(inference.steps is None or inference.steps >= 1, "inference.steps", ">= 1 or null", inference.steps)
    return config


def from_orientation_codes(codes: str, where: str = "orientation") -> str:
    """Validate axis codes such as ``RAS`` or ``LPI``: one of R/L, A/P, S/I each; returns them upper-cased."""
    upper = str(codes).upper()
    groups = [set("RL"), set("AP"), set("SI")]
    if len(upper) != 3 or any(sum(c in g for c in upper) != 1 for g in groups):
        raise ConfigError(f"{where}: {codes!r} is not an orientation; use three letters with one of R/L, A/P "
                          "and S/I each, e.g. RAS")
    return upper


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
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as error:
        raise ConfigError(f"Override '{text}': the value is not valid YAML ({error})") from None
    return parts, value


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


def preset_names() -> list[str]:
    """Names of the shipped presets (``mdagan-cpu`` …)."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml")) if PRESET_DIR.is_dir() else []


def resolve_config_path(name_or_path: str | Path) -> Path:
    """A YAML path, or a preset name shipped with volsynth (``mdagan-cpu`` → ``volsynth/configs/mdagan-cpu.yaml``)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    preset = PRESET_DIR / f"{name_or_path}.yaml"
    if preset.is_file():
        return preset
    presets = preset_names()
    raise ConfigError(
        f"Config not found: {path} (neither a file nor a preset).{suggest(str(name_or_path), presets)} "
        f"Presets: {', '.join(presets) or '(none)'}"
    )


def load_raw(source: str | Path | Mapping[str, Any] | None = None, overrides: list[str] | None = None
             ) -> tuple[dict[str, Any], str]:
    """The raw mapping of a YAML file / preset name / mapping with overrides applied, and where it came from.

    A relative ``data.manifest`` in a file is resolved against that file's folder, so configs travel with
    their cohorts. Override errors say "(from --set)" rather than blaming the file.
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
    return raw, origin


def save_config(config: ExperimentConfig, path: str | Path) -> Path:
    """Write the resolved config as YAML atomically."""
    from volsynth.utils import atomic_write_text

    return atomic_write_text(Path(path), yaml.safe_dump(to_dict(config), sort_keys=False))
