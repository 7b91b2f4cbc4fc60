"""What a run trains on: the task and split from the manifest, and the prepared subjects.

The manifest is the truth. ``volsynth inspect --source t2 --target flair`` (or ``volsynth phantom``) writes the
task and the split into the manifest; a config that leaves ``data.source``/``data.target``/``data.split`` at their
defaults takes them from there, and a config that names other values is refused (naming both) unless it says
``data.override_manifest: true``. Subjects that ``inspect`` left without a split (they failed its checks) are
never used.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from volsynth.config import DataConfig, ExperimentConfig
from volsynth.data.cache import PreparedSubject, prepare_cohort
from volsynth.data.discovery import make_splits
from volsynth.data.manifest import Manifest, load_manifest
from volsynth.data.preprocess import Preprocessor
from volsynth.errors import ConfigError, DataError


@dataclass
class Task:
    """The resolved task: modalities, split, working spacing (frozen into the saved config)."""

    manifest: Manifest
    source: str
    target: str
    splits: dict[str, list[str]]
    spacing: list[float]


def resolve_task(config: ExperimentConfig, *, paired: bool) -> tuple[ExperimentConfig, Task]:
    """Reconcile the config with its manifest; returns the config with source/target/spacing filled in.

    Raises:
        ConfigError: the config names a task or split that contradicts the manifest (without override).
        ManifestError / DataError: the manifest lacks the modalities or yields no training subjects.
    """
    data = config.data
    if not data.manifest:
        raise ConfigError("data.manifest is not set: pass --data MANIFEST (from `volsynth inspect` or "
                          "`volsynth phantom`) or --set data.manifest=PATH")
    path = Path(data.manifest)
    if path.is_dir():
        if (path / "manifest.json").is_file():
            path = path / "manifest.json"
        else:
            raise ConfigError(f"data.manifest: {path} is a folder without manifest.json; run `volsynth inspect "
                              f"{path} --source S --target T --out {path}/manifest.json` first")
    manifest = load_manifest(path)
    source = _choose(data.source, manifest.source, "source", path, data.override_manifest)
    target = _choose(data.target, manifest.target, "target", path, data.override_manifest)
    if source == target:
        raise ConfigError(f"data.source and data.target are both '{source}': nothing to translate")
    manifest.require(source, target)
    assigned = {s.subject: s.split for s in manifest.subjects if s.split}
    if assigned and data.split.mode not in ("auto", "manifest") and not data.override_manifest:
        raise ConfigError(f"data.split.mode is '{data.split.mode}' but {path} already has a split (written by "
                          "`volsynth inspect`/`phantom`); remove the split option to use it, or set "
                          "data.override_manifest=true to re-split")
    if assigned:
        # Subjects inspect rejected carry no split; under "auto"/"manifest" they are never used.
        usable = [s.subject for s in manifest.subjects if s.split]
    else:
        usable = [s.subject for s in manifest.subjects]
    complete = [n for n in usable if _has(manifest, n, source) and (_has(manifest, n, target) or not paired)]
    splits = make_splits(complete, data.split, assigned if data.split.mode in ("auto", "manifest") else None)
    if not splits["train"]:
        raise DataError(f"{path}: no training subjects after the split ({len(complete)} subjects have both "
                        f"'{source}' and '{target}'; split mode {data.split.mode})")
    spacing = data.spacing if data.spacing is not None else median_spacing(manifest, splits["train"], source)
    resolved = dataclasses.replace(config, data=dataclasses.replace(data, manifest=str(path.resolve()),
                                                                     source=source, target=target, spacing=spacing))
    return resolved, Task(manifest, source, target, splits, spacing)


def _has(manifest: Manifest, name: str, modality: str) -> bool:
    return manifest.by_name()[name].image(modality) is not None


def _choose(configured: str | None, recorded: str | None, role: str, path: Path, override: bool) -> str:
    if configured is None:
        if recorded is None:
            raise ConfigError(f"{path} does not say which modality is the {role}: set data.{role} (e.g. --set "
                              f"data.{role}=t1), or write the manifest with `volsynth inspect --source … --target …`")
        return recorded
    if recorded is not None and configured != recorded and not override:
        raise ConfigError(f"data.{role} is '{configured}' but {path} says {role} '{recorded}'; remove data.{role} to "
                          f"use the manifest's, or set data.override_manifest=true to train {role} '{configured}'")
    return configured


def median_spacing(manifest: Manifest, subjects: list[str], modality: str) -> list[float]:
    """Median voxel spacing of ``modality`` over ``subjects`` (headers only, no voxel data read)."""
    from volsynth.data.io import VolumeError, read_volume

    by_name = manifest.by_name()
    spacings = []
    for name in subjects:
        path = by_name[name].image(modality)
        if path is None:
            continue
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        try:
            reader.ReadImageInformation()
        except RuntimeError:
            read_volume(path)  # raises a VolumeError that names the file and the problem
            raise VolumeError(path, "unreadable image header") from None
        if reader.GetDimension() < 3:
            raise VolumeError(path, f"expected a 3D volume, got a {reader.GetDimension()}D image")
        spacings.append(reader.GetSpacing()[:3])
    if not spacings:
        raise DataError(f"no '{modality}' images to compute the median spacing from")
    return [float(v) for v in np.median(np.asarray(spacings), axis=0)]


def prepare_subjects(config: ExperimentConfig, task: Task, names: list[str], *, divisor: tuple[int, int, int],
                     cache_dir: Path, paired: bool, progress: bool) -> list[PreparedSubject]:
    """Preprocess (or reuse from the cache) the named subjects; unpaired subjects may lack the target."""
    data: DataConfig = config.data
    preprocessor = Preprocessor(data, spacing=task.spacing, divisor=divisor)
    by_name = task.manifest.by_name()
    subjects = [by_name[n] for n in names]
    with_target = [s for s in subjects if s.image(task.target) is not None]
    prepared = prepare_cohort(with_target, source=task.source, target=task.target, preprocessor=preprocessor,
                              cache_dir=cache_dir, resample_target=data.resample_target,
                              labels=data.sampling.labels, missing_labels=data.sampling.missing_labels,
                              progress=progress)
    if not paired:
        source_only = [s for s in subjects if s.image(task.target) is None]
        prepared += prepare_cohort(source_only, source=task.source, target=None, preprocessor=preprocessor,
                                   cache_dir=cache_dir, labels=data.sampling.labels,
                                   missing_labels=data.sampling.missing_labels, progress=progress)
    return prepared
