"""The manifest: which files form each subject, written by ``inspect``/``phantom``, read by every other command.

Format (JSON, paths relative to the manifest's folder unless absolute)::

    {"format": "volsynth-manifest", "version": 1, "dataset": "brats", "source": "t1", "target": "t2",
     "subjects": [{"subject": "BraTS2021_00000",
                   "images": {"t1": "BraTS2021_00000/BraTS2021_00000_t1.nii.gz", ...},
                   "label": "...seg.nii.gz", "mask": null, "split": "train"}]}

Hand-written manifests may instead give ``source``/``target`` paths per subject (JSON list or CSV with columns
``subject,source,target[,mask][,label]``); :func:`load_manifest` accepts all of these.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from volsynth.errors import ManifestError
from volsynth.utils import atomic_write_text

FORMAT = "volsynth-manifest"
# Label maps a manifest entry may carry besides `images` (each a path); `label` is the segmentation (BraTS labels),
# `tissue` a tissue map (CSF/GM/WM …). Training can carry one of them in every batch (data.sampling.labels).
LABEL_KEYS = ("label", "tissue")
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")

__all__ = ["FORMAT", "LABEL_KEYS", "Manifest", "ManifestError", "Subject", "check_subject_name", "load_manifest",
           "save_manifest"]


def check_subject_name(name: str, where: str = "manifest") -> str:
    """A subject name is used in output file names: no separators, no ``..``, not absolute, no odd characters.

    Raises:
        ManifestError: naming ``where`` and the bad name (the probe wrote outside --out with ``../../x``).
    """
    if not isinstance(name, str) or not _NAME_PATTERN.match(name) or ".." in name:
        raise ManifestError(f"{where}: subject name {name!r} is not allowed; use letters, digits and . _ + - only "
                            "(no path separators, no '..', not absolute)")
    return name


@dataclass
class Subject:
    """One subject's files (absolute paths). ``images`` maps modality name → path."""

    subject: str
    images: dict[str, Path] = field(default_factory=dict)
    label: Path | None = None
    mask: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    split: str | None = None

    def image(self, modality: str) -> Path | None:
        return self.images.get(modality)

    def label_map(self, name: str) -> Path | None:
        """The label map called ``name`` (``label``: the segmentation; ``tissue`` …), or None."""
        if name == "label":
            return self.label
        value = self.extra.get(name)
        return value if isinstance(value, Path) else None

    def ideal(self, modality: str) -> Path | None:
        """A noise-free expected image of ``modality`` (phantom cohorts), or None."""
        ideal = self.extra.get("ideal")
        value = ideal.get(modality) if isinstance(ideal, dict) else None
        return value if isinstance(value, Path) else None


@dataclass
class Manifest:
    subjects: list[Subject]
    dataset: str = "generic"
    source: str | None = None
    target: str | None = None
    path: Path | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def modalities(self) -> list[str]:
        return sorted({m for s in self.subjects for m in s.images})

    def by_name(self) -> dict[str, Subject]:
        return {s.subject: s for s in self.subjects}

    def require(self, *modalities: str) -> None:
        """Raise if a modality is absent from every subject (a typo) — names the manifest and what exists."""
        from volsynth.registry import suggest

        known = self.modalities()
        for modality in modalities:
            if modality not in known:
                raise ManifestError(f"{self.path or 'manifest'}: no subject has modality '{modality}'."
                                    f"{suggest(modality, known)} Modalities present: {', '.join(known) or '(none)'}")


def _relative(path: Path | None, root: Path) -> str | None:
    if path is None:
        return None
    try:
        return str(Path(path).resolve().relative_to(root.resolve()))
    except ValueError:
        return str(Path(path).resolve())


def save_manifest(manifest: Manifest, path: str | Path) -> Path:
    """Write ``manifest`` as JSON atomically, with paths relative to its folder."""
    path = Path(path)
    root = path.parent
    subjects = []
    for s in manifest.subjects:
        entry: dict[str, Any] = {"subject": s.subject,
                                 "images": {m: _relative(p, root) for m, p in sorted(s.images.items())}}
        if manifest.source and manifest.source in s.images:
            entry["source"] = _relative(s.images[manifest.source], root)
        if manifest.target and manifest.target in s.images:
            entry["target"] = _relative(s.images[manifest.target], root)
        entry["label"] = _relative(s.label, root)
        entry["mask"] = _relative(s.mask, root)
        if s.split:
            entry["split"] = s.split
        for key, value in s.extra.items():
            if isinstance(value, Path):
                value = _relative(value, root)
            elif isinstance(value, dict):
                value = {k: _relative(v, root) if isinstance(v, Path) else v for k, v in value.items()}
            entry[key] = value
        subjects.append(entry)
    document = {"format": FORMAT, "version": 1, "dataset": manifest.dataset, "source": manifest.source,
                "target": manifest.target, **manifest.info, "subjects": subjects}
    atomic_write_text(path, json.dumps(document, indent=2, sort_keys=False) + "\n")
    manifest.path = path
    return path


def load_manifest(path: str | Path) -> Manifest:
    """Read a JSON (volsynth format or a list of entries) or CSV manifest; paths become absolute."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: manifest not found")
    root = path.parent.resolve()
    try:
        if path.suffix.lower() == ".csv":
            with path.open(newline="") as handle:
                rows: list[dict[str, Any]] = list(csv.DictReader(handle))
            document: dict[str, Any] = {"subjects": rows}
        else:
            loaded = json.loads(path.read_text())
            document = {"subjects": loaded} if isinstance(loaded, list) else loaded
    except (json.JSONDecodeError, UnicodeDecodeError, csv.Error) as error:
        raise ManifestError(f"{path}: not a valid JSON/CSV manifest ({error})") from None
    if not isinstance(document, dict) or not isinstance(document.get("subjects"), list):
        raise ManifestError(f"{path}: expected a 'subjects' list (see volsynth.data.manifest for the format)")

    def resolve(value: Any) -> Path | None:
        if value in (None, ""):
            return None
        candidate = Path(str(value)).expanduser()
        return candidate if candidate.is_absolute() else root / candidate

    subjects = []
    for index, entry in enumerate(document["subjects"]):
        if not isinstance(entry, dict) or not entry.get("subject"):
            raise ManifestError(f"{path}: subject entry {index} lacks a 'subject' name")
        check_subject_name(entry["subject"], f"{path}: subject entry {index}")
        raw_images = entry.get("images") or {}
        if not isinstance(raw_images, dict):
            raise ManifestError(f"{path}: subject {entry['subject']}: 'images' must map modality names to paths, "
                                f"got {type(raw_images).__name__}")
        images = {str(m): p for m, v in raw_images.items() if (p := resolve(v)) is not None}
        for role, default_name in (("source", document.get("source")), ("target", document.get("target"))):
            value = resolve(entry.get(role))
            if value is not None:
                images.setdefault(str(default_name or role), value)
        known = {"subject", "images", "source", "target", "label", "mask", "split"}
        extra = {k: (resolve(v) if k in LABEL_KEYS else v) for k, v in entry.items() if k not in known}
        if isinstance(extra.get("ideal"), dict):
            extra["ideal"] = {str(m): resolve(v) for m, v in extra["ideal"].items()}
        split = entry.get("split") or None
        if split not in (None, "train", "val", "test"):
            raise ManifestError(f"{path}: subject {entry['subject']}: split {split!r} is not train, val or test")
        subjects.append(Subject(subject=str(entry["subject"]), images=images, label=resolve(entry.get("label")),
                                mask=resolve(entry.get("mask")), extra=extra, split=split))
    names = [s.subject for s in subjects]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ManifestError(f"{path}: duplicate subject names: {', '.join(duplicates[:5])}")
    info = {k: v for k, v in document.items() if k not in {"format", "version", "dataset", "source", "target",
                                                           "subjects"}}
    return Manifest(subjects=subjects, dataset=str(document.get("dataset", "manifest")),
                    source=document.get("source"), target=document.get("target"), path=path, info=info)
