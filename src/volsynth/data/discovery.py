"""Dataset discovery, paired-data QC, fingerprint and splits (``volsynth inspect``).

Recognised layouts (tried in this order; the first that finds subjects wins):

* a manifest file (JSON or CSV, see :mod:`volsynth.data.manifest`);
* IXI flat files ``IXI<id>-<site>-<n>-{T1,T2,PD}.nii.gz`` (not co-registered between contrasts: reported);
* SynthRAD2023 task folders ``[<region>/]<id>/{mr|cbct,ct,mask}.nii.gz``;
* BraTS-style folders ``<case>/<case>_{t1,t1ce,t2,flair,seg}.nii.gz`` (also the phantom's tree);
* a generic ``<subject>/<modality>.nii.gz`` tree.

QC reads every file once and reports *all* problems (missing files, unreadable/truncated files, 2D/4D images,
NaN/Inf, all-zero volumes, mismatched grids) instead of stopping at the first, as nnU-Net's fingerprinting does.
"""

from __future__ import annotations

import dataclasses
import random
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from volsynth.config import SplitConfig
from volsynth.data.io import IMAGE_SUFFIXES, VolumeError, image_suffix, read_volume, strip_image_suffix
from volsynth.data.manifest import Manifest, ManifestError, Subject, load_manifest
from volsynth.data.volume import Volume
from volsynth.errors import ConfigError, DataError

LABEL_NAMES = ("seg", "label", "labels")
MASK_NAMES = ("mask", "brainmask", "brain_mask")
IXI_PATTERN = re.compile(r"^(?P<subject>IXI\d+-[A-Za-z]+-\d+)-(?P<modality>T1|T2|PD|MRA|DTI)$", re.IGNORECASE)


@dataclass
class Problem:
    """One QC finding. ``severity`` is ``error`` (blocks use of the subject) or ``warning``."""

    subject: str
    file: str
    problem: str
    severity: str = "error"

    def __str__(self) -> str:
        return f"[{self.severity}] {self.subject}: {self.file}: {self.problem}"


@dataclass
class Fingerprint:
    """Cohort summary in the spirit of nnU-Net's dataset fingerprint."""

    dataset: str
    root: str
    subjects: int
    complete_pairs: int
    incomplete: list[str]
    modalities: dict[str, dict[str, Any]] = field(default_factory=dict)
    median_spacing: list[float] | None = None
    problems: list[Problem] = field(default_factory=list)
    splits: dict[str, list[str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    source: str | None = None
    target: str | None = None

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["problems"] = [asdict(p) for p in self.problems]
        return data

    def render(self) -> str:
        """Plain-text report for the terminal."""
        lines = [f"Dataset: {self.dataset} at {self.root}",
                 f"Task: {self.source} → {self.target} (written into the manifest; `volsynth train` uses it)",
                 f"Subjects: {self.subjects}  complete pairs: {self.complete_pairs}  "
                 f"incomplete: {len(self.incomplete)}"]
        if self.median_spacing:
            lines.append("Median spacing (mm): " + " x ".join(f"{s:.3g}" for s in self.median_spacing))
        for modality, stats in self.modalities.items():
            shapes = ", ".join(f"{k} x{v}" for k, v in list(stats["shapes"].items())[:4])
            orientations = ", ".join(f"{k} x{v}" for k, v in stats["orientations"].items())
            pct = stats.get("percentiles", {})
            pct_text = "  ".join(f"p{k}={v:.4g}" for k, v in pct.items())
            role = " (source)" if modality == self.source else " (target)" if modality == self.target else ""
            lines += [f"  {modality}{role}: {stats['count']} files; shapes {shapes}; orientations {orientations}",
                      f"      intensity {pct_text}"]
        for name, members in self.splits.items():
            lines.append(f"Split {name}: {len(members)} subjects")
        for note in self.notes:
            lines.append(f"Note: {note}")
        if self.problems:
            lines.append(f"Problems ({len(self.errors)} errors, {len(self.problems) - len(self.errors)} warnings):")
            lines += [f"  {p}" for p in self.problems]
        else:
            lines.append("Problems: none")
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Layout detectors


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and image_suffix(p) and not p.name.startswith("."))


def _assign(subject: Subject, name: str, path: Path) -> None:
    lowered = name.lower()
    if lowered in LABEL_NAMES:
        subject.label = path
    elif lowered in MASK_NAMES:
        subject.mask = path
    elif lowered == "tissue":
        subject.extra["tissue"] = path
    elif lowered.endswith("_ideal"):  # a phantom's noise-free expected image of a contrast (its physical ceiling)
        subject.extra.setdefault("ideal", {})[lowered[: -len("_ideal")]] = path
    else:
        subject.images[lowered] = path


def detect_ixi(root: Path) -> list[Subject]:
    subjects: dict[str, Subject] = {}
    for path in _image_files(root):
        match = IXI_PATTERN.match(strip_image_suffix(path))
        if match:
            name = match["subject"]
            subjects.setdefault(name, Subject(name)).images[match["modality"].lower()] = path
    return [subjects[k] for k in sorted(subjects)]


def detect_synthrad(root: Path) -> list[Subject]:
    def case(folder: Path) -> Subject | None:
        names = {strip_image_suffix(p).lower(): p for p in _image_files(folder)}
        if "ct" not in names or not ({"mr", "cbct"} & set(names)):
            return None
        subject = Subject(folder.name)
        for name, path in names.items():
            _assign(subject, name, path)
        return subject

    subjects = []
    for child in sorted(p for p in root.iterdir() if p.is_dir()):
        found = case(child)
        if found is not None:
            subjects.append(found)
            continue
        for grandchild in sorted(p for p in child.iterdir() if p.is_dir()):  # <region>/<id>/
            found = case(grandchild)
            if found is not None:
                subjects.append(found)
    return subjects


def detect_brats(root: Path) -> list[Subject]:
    subjects = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        prefix = folder.name + "_"
        files = [p for p in _image_files(folder) if p.name.startswith(prefix)]
        if not files:
            continue
        subject = Subject(folder.name)
        for path in files:
            _assign(subject, strip_image_suffix(path)[len(prefix):], path)
        subjects.append(subject)
    return subjects


def detect_generic(root: Path) -> list[Subject]:
    subjects = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = _image_files(folder)
        if not files:
            continue
        subject = Subject(folder.name)
        for path in files:
            _assign(subject, strip_image_suffix(path), path)
        subjects.append(subject)
    return subjects


DETECTORS = (("ixi", detect_ixi), ("synthrad2023", detect_synthrad), ("brats", detect_brats),
             ("generic", detect_generic))


def discover(path: str | Path, *, source: str | None = None, target: str | None = None) -> Manifest:
    """Find subjects under ``path`` (a folder of a known layout, or a manifest file)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if path.is_file():
        manifest = load_manifest(path)
        # A CSV/list manifest names its columns source/target: rename to the requested modality names.
        for subject in manifest.subjects:
            for role, name in (("source", source), ("target", target)):
                if name and name not in subject.images and role in subject.images:
                    subject.images[name] = subject.images.pop(role)
        manifest.source, manifest.target = source or manifest.source, target or manifest.target
        return manifest
    for dataset, detector in DETECTORS:
        subjects = detector(path)
        if subjects:
            return Manifest(subjects=subjects, dataset=dataset, source=source, target=target)
    raise ManifestError(f"{path}: found no subjects. Expected a BraTS, SynthRAD2023, IXI or <subject>/<modality>"
                        f"{IMAGE_SUFFIXES[0]} layout, or a JSON/CSV manifest")


# ----------------------------------------------------------------------------------------------------------------
# QC


def volume_problems(volume: Volume, *, label: bool = False) -> list[str]:
    """Content problems of an already-read volume (empty list when fine).

    For label maps and masks (``label``) a constant or empty map is legitimate (a subject without lesions has an
    empty BraTS segmentation), so only images are checked.
    """
    problems = []
    array = volume.array
    if label:
        return problems
    if not np.any(array):
        problems.append("all-zero volume")
    elif array.min() == array.max():
        problems.append(f"constant volume (every voxel = {array.min()})")
    return problems


def check_pair(source: Volume, target: Volume, *, resample_target: bool = False) -> None:
    """Raise :class:`DataError` stating both grids when source and target are not on the same voxel grid."""
    if source.same_grid(target) or resample_target:
        return
    raise DataError(f"source and target are on different grids: source {source.path} ({source.describe_grid()}) "
                    f"vs target {target.path} ({target.describe_grid()}); register/resample them first, or resample "
                    "the target onto the source grid (linear) with `inspect --resample-target` / `train --set "
                    "data.resample_target=true`")


def _percentiles(arrays: list[np.ndarray], rng: np.random.Generator) -> dict[str, float]:
    samples = []
    for array in arrays:
        flat = array.reshape(-1)
        nonzero = flat[flat != 0] if np.any(flat) else flat
        take = min(nonzero.size, 100_000)
        samples.append(rng.choice(nonzero, size=take, replace=False) if nonzero.size > take else nonzero)
    values = np.concatenate(samples).astype(np.float64)
    return {str(q): float(np.percentile(values, q)) for q in (0.5, 50, 99.5)}


def inspect_cohort(manifest: Manifest, *, source: str, target: str, resample_target: bool = False,
                   split: SplitConfig | None = None, root: str | Path = "") -> Fingerprint:
    """Read every file of the cohort once; return the fingerprint with all problems found.

    Subjects missing the source or target modality are "incomplete" (an error each). Complete subjects with any
    error are excluded from the splits.
    """
    problems: list[Problem] = []
    stats: dict[str, dict[str, Any]] = {}
    arrays: dict[str, list[np.ndarray]] = {}
    spacings: list[tuple[float, ...]] = []
    incomplete, usable = [], []
    modalities = manifest.modalities()
    if source not in modalities and target not in modalities:
        manifest.require(source, target)
    for subject in manifest.subjects:
        missing = [m for m in (source, target) if m not in subject.images]
        if missing:
            incomplete.append(subject.subject)
            for modality in missing:
                problems.append(Problem(subject.subject, f"<{modality}>", f"missing modality '{modality}'"))
        volumes: dict[str, Volume] = {}
        subject_ok = not missing
        entries = [*subject.images.items(), *(("label", p) for p in [subject.label] if p),
                   *(("mask", p) for p in [subject.mask] if p)]
        for modality, path in entries:
            try:
                volume = read_volume(path)
            except VolumeError as error:
                problems.append(Problem(subject.subject, str(path), error.problem))
                subject_ok = subject_ok and modality not in (source, target, "label", "mask")
                continue
            for problem in volume_problems(volume, label=modality in ("label", "mask")):
                severity = "error" if modality in (source, target) else "warning"
                problems.append(Problem(subject.subject, str(path), problem, severity))
                subject_ok = subject_ok and severity != "error"
            if modality in ("label", "mask"):
                if np.issubdtype(volume.array.dtype, np.floating) and not np.allclose(volume.array,
                                                                                      np.round(volume.array)):
                    problems.append(Problem(subject.subject, str(path), f"{modality} map has non-integer values"))
                    subject_ok = False
            else:
                entry = stats.setdefault(modality, {"count": 0, "shapes": Counter(), "orientations": Counter(),
                                                    "spacings": []})
                entry["count"] += 1
                entry["shapes"]["x".join(map(str, volume.shape))] += 1
                entry["orientations"][volume.orientation + (" (oblique)" if volume.is_oblique else "")] += 1
                entry["spacings"].append(volume.spacing)
                arrays.setdefault(modality, []).append(volume.array)
            volumes[modality] = volume
        reference = volumes.get(source)
        if reference is not None:
            spacings.append(reference.spacing)
            for modality, volume in volumes.items():
                if modality == source or reference.same_grid(volume):
                    continue
                if modality == target and resample_target:
                    problems.append(Problem(subject.subject, str(volume.path),
                                            "target grid differs from source; it will be resampled onto the source "
                                            "grid (--resample-target)", "warning"))
                    continue
                severity = "error" if modality in (target, "label", "mask") else "warning"
                problems.append(Problem(subject.subject, str(volume.path),
                                        f"grid differs from the source: {volume.describe_grid()} vs source "
                                        f"{reference.describe_grid()}"
                                        + (" (pass --resample-target to resample it)" if modality == target else ""),
                                        severity))
                subject_ok = subject_ok and severity != "error"
        if subject_ok:
            usable.append(subject.subject)
    rng = np.random.default_rng(0)
    for modality, entry in stats.items():
        entry["shapes"] = dict(entry["shapes"].most_common())
        entry["orientations"] = dict(entry["orientations"].most_common())
        entry["median_spacing"] = [float(v) for v in np.median(np.asarray(entry.pop("spacings")), axis=0)]
        entry["percentiles"] = _percentiles(arrays[modality], rng)
    notes = []
    if manifest.dataset == "ixi":
        notes.append("IXI contrasts are acquired separately and are NOT co-registered: register T1/T2/PD to a "
                     "common grid before paired training (or use an unpaired method such as cyclegan3d).")
    fingerprint = Fingerprint(
        dataset=manifest.dataset, root=str(root), subjects=len(manifest.subjects),
        complete_pairs=len(manifest.subjects) - len(incomplete), incomplete=incomplete, modalities=stats,
        median_spacing=[float(v) for v in np.median(np.asarray(spacings), axis=0)] if spacings else None,
        problems=problems, notes=notes, source=source, target=target,
    )
    if split is not None:
        fingerprint.splits = make_splits(usable, split)
    return fingerprint


# ----------------------------------------------------------------------------------------------------------------
# Splits


def make_splits(subjects: Sequence[str], config: SplitConfig, assigned: dict[str, str] | None = None
                ) -> dict[str, list[str]]:
    """Deterministic train/val/test split of subject names (sorted first, so file-system order never matters).

    * ``paper``: test = subjects whose index (sorted order) % folds == fold — the seed's 75/25 with 4 folds;
      validation = the first ``min(int(val_fraction * |dev|), max_val_subjects)`` remaining subjects (at least
      one when three or more remain, so tiny cohorts still get a best-checkpoint signal); train = the rest.
    * ``kfold``: the same after a seeded shuffle.
    * ``random``: seeded shuffle, then ``test_fraction`` and ``val_fraction`` cuts.
    * ``manifest``: the ``split`` field of each manifest entry (``assigned``).
    """
    names = sorted(subjects)
    if config.mode == "auto":  # the manifest's own split when it has one (what `inspect`/`phantom` wrote)
        config = dataclasses.replace(config, mode="manifest" if assigned else "paper")
    if config.mode == "manifest":
        if not assigned:
            raise ConfigError("data.split.mode 'manifest' needs a 'split' field in the manifest entries")
        return {part: [n for n in names if assigned.get(n) == part] for part in ("train", "val", "test")}
    if config.folds < 2 and config.mode != "random":
        raise ConfigError(f"split.folds must be >= 2, got {config.folds}")
    if not 0 <= config.fold < max(config.folds, 1):
        raise ConfigError(f"split.fold must be in [0, {config.folds - 1}], got {config.fold}")
    if config.mode in ("kfold", "random"):
        random.Random(config.seed).shuffle(names)
    if config.mode == "random":
        n_test = round(config.test_fraction * len(names))
        test, dev = names[:n_test], names[n_test:]
    else:
        test = [n for i, n in enumerate(names) if i % config.folds == config.fold]
        dev = [n for i, n in enumerate(names) if i % config.folds != config.fold]
    n_val = min(int(config.val_fraction * len(dev)), config.max_val_subjects)
    if n_val == 0 and len(dev) >= 3 and config.max_val_subjects > 0:
        n_val = 1
    return {"train": sorted(dev[n_val:]), "val": sorted(dev[:n_val]), "test": sorted(test)}
