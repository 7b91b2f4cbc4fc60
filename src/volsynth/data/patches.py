"""Preprocessed-volume cache and foreground-biased random patch sampling.

Each subject is preprocessed once into ``.npy`` files under a cache folder (keyed by the files' sizes/mtimes and
every option that changes the result) and opened as read-only memory maps, so a sampler streams patches from
any number of subjects without holding the cohort in memory. Sampling is a pure function of a numpy
``Generator``: the trainer derives one per iteration from ``(seed, iteration, rank)``, which makes runs
repeatable and resumable bit-exactly.
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

from volsynth.data.discovery import check_pair
from volsynth.data.io import read_volume
from volsynth.data.manifest import Subject
from volsynth.data.preprocess import Grid, Preprocessor, PreprocessRecord, resample

# At most this many candidate centres are stored per subject (a uniform subsample keeps the distribution).
MAX_CENTRES = 200_000


@dataclass
class PreparedSubject:
    """A subject's preprocessed arrays (``(X, Y, Z)`` float32 on [0, 1], memory-mapped) and its record."""

    subject: str
    source: np.ndarray
    target: np.ndarray | None
    label: np.ndarray | None
    mask: np.ndarray | None
    record: PreprocessRecord
    centres: dict[str, np.ndarray]  # "pair" | "source" | "target" → flat indices of foreground voxels


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
                    cache_dir: Path, resample_target: bool = False) -> PreparedSubject:
    """Preprocess one subject into the cache (or reuse the cached copy) and memory-map it."""
    config = preprocessor.config
    roles: dict[str, Path | None] = {"source": subject.image(source), "label": subject.label, "mask": subject.mask}
    if target is not None:
        roles["target"] = subject.image(target)
    for role in ("source", "target"):
        if role in roles and roles[role] is None:
            name = source if role == "source" else target
            raise FileNotFoundError(f"subject {subject.subject}: missing modality '{name}'")
    options = {"spacing": preprocessor.spacing, "divisor": preprocessor.divisor, "crop": preprocessor.crop_foreground,
               "source_kind": config.source_kind, "target_kind": config.target_kind,
               "norm": config.mr_normalisation, "pct": list(config.percentiles), "patch": list(config.patch_size),
               "threshold": config.foreground_threshold, "resample_target": resample_target, "version": 1}
    folder = cache_dir / f"{subject.subject}-{_fingerprint(subject, roles, options)}"
    if not (folder / "record.json").is_file():
        _build_cache(folder, subject, roles, preprocessor, resample_target)
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


def _build_cache(folder: Path, subject: Subject, roles: dict[str, Path | None], preprocessor: Preprocessor,
                 resample_target: bool) -> None:
    config = preprocessor.config
    source_volume = read_volume(roles["source"])  # type: ignore[arg-type]
    target_volume = read_volume(roles["target"]) if roles.get("target") else None
    if target_volume is not None:
        check_pair(source_volume, target_volume, resample_target=resample_target)
        if not source_volume.same_grid(target_volume):
            target_volume = resample(target_volume, Grid.of(source_volume))
    record = preprocessor.fit(source_volume, target_volume)
    arrays: dict[str, np.ndarray] = {"source": preprocessor.apply(source_volume, record, "source")}
    if target_volume is not None:
        arrays["target"] = preprocessor.apply(target_volume, record, "target")
    for role in ("label", "mask"):
        if roles.get(role):
            volume = read_volume(roles[role])  # type: ignore[arg-type]
            if not volume.same_grid(source_volume):
                raise ValueError(f"subject {subject.subject}: {role} {volume.path} is on a different grid than the "
                                 f"source: {volume.describe_grid()} vs {source_volume.describe_grid()}")
            arrays[role] = preprocessor.apply_label(volume.with_array(np.round(volume.array).astype(np.int16)),
                                                    record)
    rng = np.random.default_rng(0)
    threshold = config.foreground_threshold
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
                   cache_dir: Path, resample_target: bool = False, progress: bool = False) -> list[PreparedSubject]:
    """Prepare many subjects (see :func:`prepare_subject`), with an optional progress bar."""
    iterator = tqdm(subjects, desc="preprocess", unit="subject", disable=not progress, leave=False)
    return [prepare_subject(s, source=source, target=target, preprocessor=preprocessor, cache_dir=cache_dir,
                            resample_target=resample_target) for s in iterator]


class PatchSampler:
    """Draws aligned ``(source, target, mask, label)`` patches from prepared subjects.

    Each call picks one subject and ``patches_per_step`` patches from it (the paper: 1 volume × 3 crops). A
    patch centre is a foreground voxel (source and target above the threshold) with probability
    ``foreground_probability``, otherwise uniform. For unpaired training the target patches come from a
    different, independently drawn subject and centres use each side's own foreground.
    """

    def __init__(self, subjects: Sequence[PreparedSubject], patch_size: Sequence[int], *, patches_per_step: int = 3,
                 foreground_probability: float = 1.0, paired: bool = True, threshold: float = 0.1) -> None:
        if not subjects:
            raise ValueError("no training subjects to sample patches from")
        self.subjects = list(subjects)
        self.patch_size = tuple(int(p) for p in patch_size)
        self.patches_per_step = patches_per_step
        self.foreground_probability = foreground_probability
        self.paired = paired
        self.threshold = threshold
        for s in self.subjects:
            if any(n < p for n, p in zip(s.source.shape, self.patch_size, strict=True)):
                raise ValueError(f"subject {s.subject}: preprocessed shape {s.source.shape} is smaller than the "
                                 f"patch size {self.patch_size}")

    def _corners(self, subject: PreparedSubject, key: str, rng: np.random.Generator, n: int) -> list[tuple[int, ...]]:
        shape = subject.source.shape
        centres = subject.centres.get(key)
        corners = []
        for _ in range(n):
            if centres is not None and len(centres) and rng.random() < self.foreground_probability:
                centre = np.unravel_index(int(centres[rng.integers(len(centres))]), shape)
            else:
                centre = tuple(int(rng.integers(n_)) for n_ in shape)
            # Clamp so the patch stays inside the volume (centres near the border shift inwards).
            corners.append(tuple(int(min(max(c - p // 2, 0), n_ - p))
                                 for c, p, n_ in zip(centre, self.patch_size, shape, strict=True)))
        return corners

    def _crop(self, array: np.ndarray | None, corners: list[tuple[int, ...]]) -> np.ndarray | None:
        if array is None:
            return None
        return np.stack([np.asarray(array[tuple(slice(c, c + p) for c, p in zip(corner, self.patch_size,
                                                                                 strict=True))])
                         for corner in corners])[:, None]

    def sample(self, rng: np.random.Generator) -> dict[str, np.ndarray | None]:
        """One step's patches: ``source``/``target`` float32 ``(B, 1, *patch)``, ``mask``/``label`` or None."""
        subject = self.subjects[int(rng.integers(len(self.subjects)))]
        if self.paired:
            corners = self._corners(subject, "pair", rng, self.patches_per_step)
            source = self._crop(subject.source, corners)
            target = self._crop(subject.target, corners)
            mask = self._crop(subject.mask, corners)
            if mask is None and target is not None:  # the paper's foreground: both sides above the threshold
                mask = ((source > self.threshold) & (target > self.threshold)).astype(np.float32)  # type: ignore[operator]
            label = self._crop(subject.label, corners)
        else:
            other = self.subjects[int(rng.integers(len(self.subjects)))]
            corners = self._corners(subject, "source", rng, self.patches_per_step)
            target_corners = self._corners(other, "target", rng, self.patches_per_step)
            source, target = self._crop(subject.source, corners), self._crop(other.target, target_corners)
            mask, label = None, None
        return {"source": source, "target": target, "mask": mask, "label": label}
