"""What the downstream protocols read: volumes (through :func:`volsynth.data.io.read_volume`) and run folders.

A run folder (:class:`volsynth.run.RunFolder`; a staged run is read through its final stage) names its manifest in
``config.yaml`` (``data.manifest``), its test subjects in ``splits.json`` and holds the synthetic volumes in
``predictions/``, found through ``predictions/predictions.json`` (``outputs[subject]["file"]``, what
``volsynth predict`` writes) or, without that index, by name: ``<subject>_synthetic-<target>.nii.gz`` or
``<subject>.nii.gz`` (any image suffix).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from volsynth.data.io import IMAGE_SUFFIXES, read_volume
from volsynth.data.manifest import load_manifest
from volsynth.data.volume import Volume
from volsynth.errors import DataError, InputNotFoundError
from volsynth.metrics import minmax_unit
from volsynth.run import RunFolder, resolve_manifest

VolumeInput = str | os.PathLike[str] | np.ndarray | Volume
"""A volume as a file path, a :class:`~volsynth.data.volume.Volume`, or an ``(x, y, z)`` array (1 mm, identity)."""

PREDICTIONS_INDEX = "predictions.json"  # written by volsynth.inference.predict (not imported: it needs torch)


def _volume(source: VolumeInput) -> Volume:
    if isinstance(source, Volume):
        return source
    if isinstance(source, np.ndarray):
        if source.ndim != 3:
            raise DataError(f"expected a 3D (x, y, z) array, got shape {source.shape}")
        return Volume(source)
    return read_volume(source)


def read_image(source: VolumeInput) -> Volume:
    """The volume of a path, a Volume or an array, with float32 values (geometry kept)."""
    volume = _volume(source)
    return volume.with_array(np.asarray(volume.array, dtype=np.float32))


def read_labels(source: VolumeInput) -> np.ndarray:
    """An integer (int64) label map; float files are rounded to the nearest label."""
    array = np.asarray(_volume(source).array)
    if np.issubdtype(array.dtype, np.integer) or array.dtype == bool:
        return array.astype(np.int64)
    return np.rint(array).astype(np.int64)


def unit_scaled(array: np.ndarray) -> np.ndarray:
    """Min-max scaled to [0, 1], float32 (a constant volume gives zeros): real MR is in scanner units."""
    return minmax_unit(array, constant="zeros").astype(np.float32)


def name_of(source: VolumeInput, subject: str) -> str:
    """How to name an input in an error message: its file, else the subject."""
    if isinstance(source, Volume) and source.path is not None:
        return str(source.path)
    return str(source) if isinstance(source, str | os.PathLike) else f"subject '{subject}'"


# --------------------------------------------------------------------------------------------------------------
# run folders


@dataclass
class RunInputs:
    """What the downstream protocols need from one run folder (every mapping is subject → path)."""

    run: Path
    manifest: Path
    target: str  # target modality name in the manifest
    synthetic: dict[str, Path]  # test subjects with a prediction
    real: dict[str, Path]  # their real target volumes
    masks: dict[str, Path] = field(default_factory=dict)
    labels: dict[str, Path] = field(default_factory=dict)  # "label" map of every subject that has one
    tissue: dict[str, Path] = field(default_factory=dict)  # "tissue" map of every subject that has one
    real_other: dict[str, Path] = field(default_factory=dict)  # real target of the non-test subjects
    test_subjects: list[str] = field(default_factory=list)
    other_subjects: list[str] = field(default_factory=list)


def _index_outputs(index: Path) -> dict[str, str]:
    try:
        outputs = json.loads(index.read_text(encoding="utf-8")).get("outputs", {})
        return {str(subject): str(entry["file"]) for subject, entry in outputs.items()}
    except (OSError, ValueError, AttributeError, KeyError, TypeError) as error:
        raise DataError(f"{index}: not a readable predictions index ({type(error).__name__}: {error})") from None


def find_predictions(folder: Path, subjects: list[str], target: str) -> dict[str, Path]:
    """Subject → synthetic volume in ``folder``: through its ``predictions.json`` when present (the index is the
    truth: files of an earlier checkpoint it no longer lists are ignored), else by file name."""
    index = folder / PREDICTIONS_INDEX
    found: dict[str, Path] = {}
    if index.is_file():
        outputs = _index_outputs(index)
        for subject in subjects:
            if subject in outputs:
                path = folder / outputs[subject]
                if not path.is_file():
                    raise InputNotFoundError(f"{path}: listed in {index} for subject '{subject}' but not found")
                found[subject] = path
        return found
    for subject in subjects:
        names = [f"{subject}_synthetic-{target}{suffix}" for suffix in IMAGE_SUFFIXES]
        names += [f"{subject}{suffix}" for suffix in IMAGE_SUFFIXES]
        path = next((folder / n for n in names if (folder / n).is_file()), None)
        if path is not None:
            found[subject] = path
    return found


def load_run_inputs(run: str | os.PathLike[str]) -> RunInputs:
    """Real, synthetic, mask and label paths of a ``volsynth train`` run whose test subjects were predicted.

    Test subjects come from ``splits.json`` (``test``; without it, every subject with a prediction); every other
    manifest subject is "other" (the segment protocol tests on them). Predictions are looked for in
    ``RUN/predictions``, then in the final stage's ``predictions``.

    Raises:
        InputNotFoundError: no run folder, no manifest, no predictions folder, or no prediction of a test subject.
    """
    root = Path(run)
    if not root.is_dir():
        raise InputNotFoundError(f"--run {root}: run folder not found")
    folder = RunFolder.of(root)
    final = folder.final()
    config: Any = folder.read_config_text() or {}
    data: Mapping[str, Any] = config.get("data") if isinstance(config.get("data"), Mapping) else {}
    manifest_file = resolve_manifest(root, data.get("manifest"))
    if manifest_file is None:
        raise InputNotFoundError(f"{final.config}: cannot find the manifest named by data.manifest "
                                 f"({data.get('manifest')!r})")
    manifest = load_manifest(manifest_file)
    target = str(data.get("target") or manifest.target or "target")
    predictions = next((f.predictions for f in (folder, final) if f.predictions.is_dir()), None)
    if predictions is None:
        raise InputNotFoundError(f"{folder.predictions}: no predictions; run `volsynth predict` with "
                                 f"--out {folder.predictions} first")
    names = [s.subject for s in manifest.subjects]
    found = find_predictions(predictions, names, target)
    test = set(json.loads(final.splits.read_text(encoding="utf-8")).get("test", [])) if final.splits.is_file() \
        else set(found)
    inputs = RunInputs(run=root, manifest=manifest_file, target=target, synthetic={}, real={})
    for subject in manifest.subjects:
        real = subject.image(target)
        if real is None:
            continue
        name = subject.subject
        if subject.mask is not None:
            inputs.masks[name] = subject.mask
        for key, paths in (("label", inputs.labels), ("tissue", inputs.tissue)):
            label_map = subject.label_map(key)
            if label_map is not None:
                paths[name] = label_map
        if name in test:
            if name in found:
                inputs.synthetic[name] = found[name]
                inputs.real[name] = real
        else:
            inputs.real_other[name] = real
    inputs.test_subjects = sorted(inputs.synthetic)
    inputs.other_subjects = sorted(inputs.real_other)
    if not inputs.synthetic:
        raise InputNotFoundError(f"{predictions}: no prediction of a test subject ({', '.join(sorted(test)[:5])}); "
                                 "run `volsynth predict` on the test split first")
    return inputs
