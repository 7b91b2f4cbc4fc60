"""Preprocessed-volume cache.

Each subject is preprocessed once into ``.npy`` files under a cache folder (keyed by the files' sizes/mtimes and
every option that changes the result) and opened as read-only memory maps, so a sampler
(:mod:`volsynth.data.sampling`) streams items from any number of subjects without holding the cohort in memory.
Building an entry runs the same content checks as ``volsynth inspect`` (empty, constant, non-finite volumes are
refused with the file named), so training never silently learns from a broken scan.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from volsynth.data.discovery import check_pair, volume_problems
from volsynth.data.io import VolumeError, read_volume
from volsynth.data.manifest import Subject
from volsynth.data.preprocess import Grid, Preprocessor, PreprocessRecord, resample
from volsynth.data.volume import Volume
from volsynth.errors import DataError

# At most this many candidate centres are stored per subject (a uniform subsample keeps the distribution).
MAX_CENTRES = 200_000


@dataclass
class PreparedSubject:
    """A subject's preprocessed arrays (``(X, Y, Z)`` float32 on [0, 1], memory-mapped) and its record."""

    subject: str
    source: np.ndarray
    target: np.ndarray | None
    label: np.ndarray | None  # the label map named by data.sampling.labels (integer), if any
    mask: np.ndarray | None
    record: PreprocessRecord
    centres: dict[str, np.ndarray]  # "pair" | "source" | "target" → flat indices of foreground voxels

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in self.source.shape)  # type: ignore[return-value]


def _fingerprint(subject: Subject, roles: dict[str, Path | None], options: dict) -> str:
    digest = hashlib.sha256(json.dumps(options, sort_keys=True, default=str).encode())
    for role, path in sorted(roles.items()):
        if path is None:
            continue
        stat = Path(path).stat()
        digest.update(f"{role}:{Path(path).resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def _centres(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    flat = np.flatnonzero(mask)
    if flat.size > MAX_CENTRES:
        flat = np.sort(rng.choice(flat, size=MAX_CENTRES, replace=False))
    return flat.astype(np.int64)


def prepare_subject(subject: Subject, *, source: str, target: str | None, preprocessor: Preprocessor,
                    cache_dir: Path, resample_target: bool = False, labels: str | None = None,
                    missing_labels: str = "error") -> PreparedSubject:
    """Preprocess one subject into the cache (or reuse the cached copy) and memory-map it.

    ``labels`` names a label map of the subject (``label``, ``tissue``) to carry along. A subject without it is an
    error naming the subject (a method that needs tissue maps must not silently train without them), unless
    ``missing_labels="segment"``: then the built-in tissue segmenter makes a CSF/GM/WM map from the source image.
    """
    config = preprocessor.config
    roles: dict[str, Path | None] = {"source": subject.image(source), "mask": subject.mask}
    segment_source: str | None = None
    if labels is not None:
        roles["label"] = subject.label_map(labels)
        if roles["label"] is None:
            if missing_labels != "segment":
                raise DataError(f"subject {subject.subject}: no '{labels}' map in the manifest (data.sampling.labels "
                                "asks for it; set data.sampling.missing_labels=segment to make tissue maps with the "
                                "built-in segmenter)")
            segment_source = source
    if target is not None:
        roles["target"] = subject.image(target)
    for role in ("source", "target"):
        if role in roles and roles[role] is None:
            name = source if role == "source" else target
            raise DataError(f"subject {subject.subject}: missing modality '{name}'")
    options = {**preprocessor.options(), "threshold": config.sampling.foreground_threshold,
               "resample_target": resample_target, "labels": labels, "segmented": segment_source, "version": 2}
    folder = cache_dir / f"{subject.subject}-{_fingerprint(subject, roles, options)}"
    if not (folder / "record.json").is_file():
        _build_cache(folder, subject, roles, preprocessor, resample_target, segment_source)
    record = PreprocessRecord.from_dict(json.loads((folder / "record.json").read_text()))

    def load(name: str) -> np.ndarray | None:
        path = folder / f"{name}.npy"
        return np.load(path, mmap_mode="r") if path.is_file() else None

    centres = {key: np.load(folder / f"centres_{key}.npy", mmap_mode="r")
               for key in ("pair", "source", "target") if (folder / f"centres_{key}.npy").is_file()}
    source_array = load("source")
    assert source_array is not None
    return PreparedSubject(subject.subject, source_array, load("target"), load("label"), load("mask"), record,
                           centres)


def _segmented_tissue(volume: Volume, mask: Volume | None, modality: str) -> Volume:
    """CSF/GM/WM labels of ``volume`` from the built-in GMM segmenter (the contrast decides the class order)."""
    from volsynth.data.segmenters import CONTRAST_ORDERS, GMMTissueSegmenter

    contrast = modality.lower() if modality.lower() in CONTRAST_ORDERS else "t1"
    segmenter = GMMTissueSegmenter(contrast, random_state=0)
    labels = segmenter.segment(volume.array.astype(np.float32), mask=None if mask is None else mask.array > 0)
    return volume.with_array(labels.astype(np.int16))


def _build_cache(folder: Path, subject: Subject, roles: dict[str, Path | None], preprocessor: Preprocessor,
                 resample_target: bool, segment_source: str | None = None) -> None:
    config = preprocessor.config
    source_volume = read_volume(roles["source"])  # type: ignore[arg-type]
    target_volume = read_volume(roles["target"]) if roles.get("target") else None
    for volume in (source_volume, target_volume):  # the same content checks as `volsynth inspect`
        problems = volume_problems(volume) if volume is not None else []
        if problems:
            raise VolumeError(volume.path, f"{'; '.join(problems)}: refusing to train on it")  # type: ignore[union-attr]
    if target_volume is not None:
        check_pair(source_volume, target_volume, resample_target=resample_target)
        if not source_volume.same_grid(target_volume):
            target_volume = resample(target_volume, Grid.of(source_volume))
    record = preprocessor.fit(source_volume, target_volume)
    arrays: dict[str, np.ndarray] = {"source": preprocessor.apply(source_volume, record, "source")}
    if target_volume is not None:
        arrays["target"] = preprocessor.apply(target_volume, record, "target")
    if segment_source is not None:
        mask_volume = read_volume(roles["mask"]) if roles.get("mask") else None  # type: ignore[arg-type]
        tissue = _segmented_tissue(source_volume, mask_volume, segment_source)
        arrays["label"] = preprocessor.apply_label(tissue, record)
    for role in ("label", "mask"):
        if roles.get(role):
            volume = read_volume(roles[role])  # type: ignore[arg-type]
            if not volume.same_grid(source_volume):
                raise DataError(f"subject {subject.subject}: {role} {volume.path} is on a different grid than the "
                                f"source: {volume.describe_grid()} vs {source_volume.describe_grid()}")
            arrays[role] = preprocessor.apply_label(volume.with_array(np.round(volume.array).astype(np.int16)),
                                                    record)
    rng = np.random.default_rng(0)
    threshold = config.sampling.foreground_threshold
    source_fg = arrays["source"] > threshold
    centres = {"source": _centres(source_fg, rng)}
    if "target" in arrays:
        target_fg = arrays["target"] > threshold
        centres["target"] = _centres(target_fg, rng)
        centres["pair"] = _centres(source_fg & target_fg, rng)
    staging = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for name, array in arrays.items():
        np.save(staging / f"{name}.npy", np.ascontiguousarray(array))
    for name, array in centres.items():
        np.save(staging / f"centres_{name}.npy", array)
    (staging / "record.json").write_text(json.dumps(record.to_dict()))
    try:
        os.replace(staging, folder)  # the whole entry appears at once
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)  # another process built it first
        if not (folder / "record.json").is_file():
            raise


def prepare_cohort(subjects: Sequence[Subject], *, source: str, target: str | None, preprocessor: Preprocessor,
                   cache_dir: Path, resample_target: bool = False, labels: str | None = None,
                   missing_labels: str = "error", progress: bool = False) -> list[PreparedSubject]:
    """Prepare many subjects (see :func:`prepare_subject`), with an optional progress bar."""
    iterator = tqdm(subjects, desc="preprocess", unit="subject", disable=not progress, leave=False)
    return [prepare_subject(s, source=source, target=target, preprocessor=preprocessor, cache_dir=cache_dir,
                            resample_target=resample_target, labels=labels, missing_labels=missing_labels)
            for s in iterator]
