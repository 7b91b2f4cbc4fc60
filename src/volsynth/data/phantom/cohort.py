"""``volsynth phantom``: write a BraTS-style phantom cohort (volumes, label maps, ideal images, montages, manifest).

The manifest is written here rather than by :func:`volsynth.data.manifest.save_manifest`: that writer orders keys
differently and adds per-subject ``source``/``target`` paths, so its bytes would differ from every cohort written so
far (same arguments → same bytes is a promise of this module; :data:`PHANTOM_VERSION` would have to change).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import numpy as np

from volsynth.data.phantom.anatomy import template_anatomy
from volsynth.data.phantom.files import (
    check_out_dir,
    ideal_role,
    old_phantom_files,
    remove_stale,
    subject_files,
    write_bytes,
    write_ideal,
    write_nifti,
)
from volsynth.data.phantom.montage import montage_png
from volsynth.data.phantom.signal import CONTRASTS
from volsynth.data.phantom.subject import check_args, check_contrasts, simulate_subject, subject_name
from volsynth.errors import ConfigError, OutputError
from volsynth.registry import suggest

PHANTOM_VERSION = 2
"""Bumped whenever the same arguments would produce different files (2: ideal images, source/target, splits)."""


def _check_role(role: str, value: str | None, names: tuple[str, ...]) -> str | None:
    if value is None:
        return None
    name = str(value).strip().lower()
    if name not in names:
        raise ConfigError(f"{role} contrast '{value}' is not among the simulated contrasts ({', '.join(names)})."
                          f"{suggest(name, names)} Pass --contrasts with it or another --{role}")
    return name


def make_phantom_cohort(out_dir: str | Path, subjects: int, *, seed: int = 0, spacing: float = 2.0,
                        lesion_probability: float = 0.5, contrasts: Sequence[str] = CONTRASTS,
                        noise_percent: float = 3.0, montage: bool = True, progress: bool = False,
                        source: str | None = "t1", target: str | None = "t2", overwrite: bool = False,
                        ideal: bool = True) -> Path:
    """Write a BraTS-style phantom cohort to ``out_dir`` and return the path of its ``manifest.json``.

    Layout: ``out_dir/Phantom_00000/Phantom_00000_{t1,t2,pd,flair,t1ce,seg,tissue,mask}.nii.gz``, the ideal
    images ``Phantom_00000_<contrast>_ideal.nii.gz`` (:meth:`PhantomSubject.ideal`), a ``_montage.png`` when
    ``montage``, one folder per subject, and ``manifest.json`` listing every file with a path relative to
    ``out_dir``, the translation direction (top-level ``source``/``target``) and each subject's ``split``
    (:func:`volsynth.data.discovery.make_splits`, the paper's rule: every 4th subject is a test subject). Images
    are float32 (brightest normal tissue ≈ 1000), label maps uint8. Same arguments → byte-identical NIfTI files
    and manifest.

    ``out_dir`` must be empty, absent, or hold a phantom written with the same arguments; otherwise an
    :class:`~volsynth.errors.OutputError` names the first file in the way, unless ``overwrite``: then files
    written by an earlier phantom run that this run does not write are removed, and other files are left alone.

    Args:
        out_dir: destination folder (created).
        subjects: number of subjects (≥ 1).
        seed, spacing, lesion_probability, contrasts, noise_percent: see :func:`simulate_subject`.
        montage: also write a tri-planar PNG per subject.
        progress: show a tqdm progress bar.
        source, target: the translation the manifest describes (contrast names among ``contrasts``; None
            leaves the role unset).
        overwrite: replace whatever ``out_dir`` holds (see above).
        ideal: also write the ideal images (about a third more CPU time, spent on the writer threads).

    Raises:
        ConfigError (a ValueError): bad arguments. OutputError: ``out_dir`` holds other files and ``overwrite``
            is False, or is a file.
    """
    if isinstance(subjects, bool) or not isinstance(subjects, int | np.integer) or subjects < 1:
        raise ConfigError(f"subjects must be an integer ≥ 1, got {subjects!r}")
    names = check_contrasts(contrasts)
    check_args(seed, spacing, lesion_probability, noise_percent)
    source_name = _check_role("source", source, names)
    target_name = _check_role("target", target, names)
    if source_name is not None and source_name == target_name:
        raise ConfigError(f"source and target are both '{source_name}'; a translation needs two contrasts")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise OutputError(f"output path {out} exists and is not a folder")
    generator = {"seed": int(seed), "subjects": int(subjects), "spacing": float(spacing),
                 "lesions": float(lesion_probability), "contrasts": list(names), "noise": float(noise_percent),
                 "volsynth_phantom_version": PHANTOM_VERSION}
    check_out_dir(out, {"generator": generator, "source": source_name, "target": target_name}, overwrite)
    template_anatomy(float(spacing))  # fail on an impossible spacing before touching anything
    out.mkdir(parents=True, exist_ok=True)
    stale = old_phantom_files(out)

    from volsynth.config import SplitConfig
    from volsynth.data.discovery import make_splits

    split_config = SplitConfig(mode="paper")
    membership = {sub: part for part, subs in make_splits([subject_name(i) for i in range(int(subjects))],
                                                           split_config).items() for sub in subs}

    from tqdm import tqdm

    written: set[str] = set()
    entries = []
    # zlib releases the GIL, so the volumes are compressed on worker threads while the montage and the next
    # subject are computed. At most one subject's writes are in flight (bounded memory); each file's bytes do
    # not depend on the scheduling.
    with ThreadPoolExecutor(max_workers=2) as pool:
        pending: list[Future[None]] = []
        for index in tqdm(range(int(subjects)), desc="phantom", unit="subject", disable=not progress):
            sub = simulate_subject(index, seed=int(seed), spacing=float(spacing),
                                   lesion_probability=float(lesion_probability), contrasts=names,
                                   noise_percent=float(noise_percent))
            for future in pending:
                future.result()
            files = subject_files(sub.subject, names)
            volumes: dict[str, np.ndarray] = dict(sub.images)
            volumes.update(seg=sub.seg, tissue=sub.tissue, mask=sub.mask)
            pending = [pool.submit(write_nifti, out / files[role], data, sub.affine)
                       for role, data in volumes.items()]
            if ideal:
                pending += [pool.submit(write_ideal, out / files[ideal_role(c)], sub, c) for c in names]
                written.update(files[ideal_role(c)] for c in names)
            written.update(files[role] for role in volumes)
            if montage:
                write_bytes(out / files["montage"], montage_png(sub))
                written.add(files["montage"])
            entry: dict[str, object] = {"subject": sub.subject, "images": {c: files[c] for c in names},
                                        "label": files["seg"], "tissue": files["tissue"], "mask": files["mask"],
                                        "has_lesion": sub.has_lesion, "split": membership[sub.subject]}
            if ideal:
                entry["ideal"] = {c: files[ideal_role(c)] for c in names}
            entries.append(entry)
        for future in pending:
            future.result()

    remove_stale(out, stale - written)
    manifest = {
        "format": "volsynth-manifest",
        "version": 1,
        "dataset": "phantom",
        "source": source_name,
        "target": target_name,
        "generator": generator,
        # How the `split` fields were made, so `train` (split mode auto/manifest) trains what this file says.
        "split_config": asdict(split_config),
        "subjects": entries,
    }
    manifest_path = out / "manifest.json"
    write_bytes(manifest_path, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
    return manifest_path
