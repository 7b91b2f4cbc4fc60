"""Score a folder of predicted volumes against their targets: ``metrics.csv`` + ``summary.json``.

Inputs (``volsynth evaluate``):

- ``pred``: a directory of ``<subject>.nii.gz`` (also ``.nii``, ``.nrrd``, ``.mha``, ``.mhd``) files; every
  file found is scored, and only those.
- ``target``: a directory with the same naming, or a volsynth manifest (JSON or CSV,
  :mod:`volsynth.data.manifest`) giving the target image (its ``target`` modality, or ``target_modality``) and
  optionally a mask per subject.
- ``mask``: an optional directory of ``<subject>.<ext>`` masks (binarised with ``> 0``, as SynthRAD does);
  without it, masks named in the manifest are used.

Prediction, target and mask must share the voxel grid (shape, spacing, origin, direction); a mismatch is an
error that states both grids rather than a silent resample (SynthRAD2025 imposes the GT geometry on the
prediction, ecosystem-anchors §3.2; we prefer to surface the mismatch).

Outputs, written atomically to ``out_dir``:

- ``metrics.csv``: one row per subject, columns ``subject`` +
  :func:`~volsynth.evaluation.metrics.metric_names` (+ ``lpips`` when available); floats written with
  ``repr`` precision (``inf``/``nan`` spelled so).
- ``summary.json``: ``{metric: {"mean", "std", "n"}}`` over the finite per-subject values (``std`` is the
  sample standard deviation, ddof = 1, as papers report; ``null`` when n == 1; ``n_nonfinite`` appears when
  values were left out), plus ``profile``, ``modality``, ``definitions``, ``normalise``, ``mask``,
  ``n_subjects``, ``std_definition`` and ``lpips`` (``{"available": false, "reason": ...}`` when LPIPS
  could not be computed, never a 0 value).
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from volsynth.data.io import IMAGE_SUFFIXES, VolumeError, image_suffix, read_volume, strip_image_suffix
from volsynth.data.manifest import load_manifest
from volsynth.data.volume import DIRECTION_ATOL, Volume
from volsynth.evaluation.lpips import LPIPS, LPIPSConfig, LPIPSUnavailable, build_lpips, lpips_volume
from volsynth.evaluation.metrics import (
    PROFILE_DEFINITIONS,
    compute_metrics,
    ct_window_to_unit,
    metric_names,
    resolve_profile,
)
from volsynth.registry import suggest
from volsynth.utils import atomic_write_text

VOLUME_EXTENSIONS: tuple[str, ...] = IMAGE_SUFFIXES
NORMALISATIONS: tuple[str, ...] = ("none", "minmax")


@dataclass
class EvaluationResult:
    """What :func:`evaluate_predictions` computed and wrote.

    Attributes:
        per_subject: one dict per subject (``"subject"`` plus one float per metric), in CSV order.
        summary: the content of ``summary.json``.
        metrics_csv: path of the written ``metrics.csv``.
        summary_json: path of the written ``summary.json``.
    """

    per_subject: list[dict[str, float | str]]
    summary: dict[str, Any]
    metrics_csv: Path | None = field(default=None)
    summary_json: Path | None = field(default=None)


# ----------------------------------------------------------------------------------------------------------
# reading


def _read(path: Path, what: str) -> Volume:
    """Read a volume with :func:`volsynth.data.io.read_volume` (which rejects NaN/Inf, also the NaN that ITK's
    NIfTI reader would silently turn into 0) and say which role the file plays if it fails."""
    try:
        return read_volume(path)
    except VolumeError as error:
        raise VolumeError(path, f"{what}: {error.problem}") from None


def _describe(volume: Volume, other: Volume) -> str:
    text = volume.describe_grid()
    if not np.allclose(volume.direction, other.direction, atol=DIRECTION_ATOL, rtol=0):
        # The orientation code alone can hide an oblique difference; show the cosines then.
        text += ", direction " + np.array2string(volume.direction.ravel(), precision=4, separator=", ")
    return text


def _check_grid(volume: Volume, reference: Volume, what: str) -> None:
    if not volume.same_grid(reference):
        raise ValueError(
            f"{what} {volume.path} and target {reference.path} are on different grids:\n"
            f"  {what}: {_describe(volume, reference)}\n  target: {_describe(reference, volume)}"
        )


def _list_volumes(directory: Path, what: str) -> dict[str, Path]:
    if not directory.is_dir():
        raise FileNotFoundError(f"{what} directory not found: {directory}")
    found: dict[str, Path] = {}
    for path in sorted(directory.iterdir()):
        if not path.is_file() or path.name.startswith(".") or image_suffix(path) not in VOLUME_EXTENSIONS:
            continue
        subject = strip_image_suffix(path)
        if subject in found:
            raise ValueError(
                f"{what} directory {directory} has two files for subject '{subject}': "
                f"{found[subject].name} and {path.name}"
            )
        found[subject] = path
    return found


def _find_counterpart(directory: Path, subject: str, what: str, pred_path: Path) -> Path:
    existing = [p for p in (directory / f"{subject}{ext}" for ext in VOLUME_EXTENSIONS) if p.is_file()]
    if not existing:
        raise FileNotFoundError(
            f"no {what} for prediction {pred_path}: expected {directory / (subject + '.nii.gz')} "
            f"(or {', '.join(VOLUME_EXTENSIONS[1:])})"
        )
    if len(existing) > 1:
        raise ValueError(
            f"{what} directory {directory} has several files for '{subject}': "
            f"{', '.join(p.name for p in existing)}"
        )
    return existing[0]


def _manifest_pairs(
    manifest_path: Path, target_modality: str | None
) -> tuple[dict[str, Path | None], dict[str, Path | None], str]:
    """``({subject: target path}, {subject: mask path}, target modality)`` from a volsynth manifest."""
    manifest = load_manifest(manifest_path)
    modality = target_modality or manifest.target
    if modality is None:
        raise ValueError(
            f"manifest {manifest_path} names no target modality; pass target_modality (one of "
            f"{', '.join(manifest.modalities()) or 'none'})"
        )
    manifest.require(modality)
    targets = {s.subject: s.image(modality) for s in manifest.subjects}
    masks = {s.subject: s.mask for s in manifest.subjects}
    return targets, masks, modality


# ----------------------------------------------------------------------------------------------------------
# scoring


def _minmax(array: np.ndarray, lo: float, hi: float, what: str) -> np.ndarray:
    if hi <= lo:
        raise ValueError(f"{what} is constant ({lo}); min-max normalisation is undefined")
    return (array - lo) / (hi - lo)


def _own_minmax(array: np.ndarray) -> np.ndarray:
    # The seed's LPIPS input (seed-reference §6.2): each volume min-max normalised on its own; a constant
    # volume becomes all zeros rather than a division by zero.
    lo, hi = float(array.min()), float(array.max())
    return np.zeros_like(array) if hi <= lo else (array - lo) / (hi - lo)


def _format(value: float | str) -> str:
    return value if isinstance(value, str) else repr(float(value))


def _summarise(rows: list[dict[str, float | str]], columns: list[str]) -> dict[str, dict]:
    summary: dict[str, dict] = {}
    for column in columns:
        values = np.array([float(row[column]) for row in rows], dtype=np.float64)
        finite = values[np.isfinite(values)]
        entry: dict[str, float | int | None] = {
            "mean": float(finite.mean()) if finite.size else None,
            "std": float(finite.std(ddof=1)) if finite.size > 1 else None,
            "n": int(finite.size),
        }
        if finite.size != values.size:
            entry["n_nonfinite"] = int(values.size - finite.size)
        summary[column] = entry
    return summary


def evaluate_predictions(
    pred: Path,
    target: Path,
    *,
    out_dir: Path,
    mask: Path | None = None,
    profile: str = "paper",
    modality: str | None = None,
    lpips: LPIPSConfig | LPIPS | None = None,
    normalise: str = "none",
    target_modality: str | None = None,
    progress: bool = False,
) -> EvaluationResult:
    """Score every prediction in ``pred`` against its target and write ``metrics.csv`` and ``summary.json``.

    Args:
        pred: directory of ``<subject>.<ext>`` predicted volumes.
        target: directory of ``<subject>.<ext>`` targets, or a manifest file
            (:func:`volsynth.data.manifest.load_manifest`; the target is its ``target`` modality).
        out_dir: where the two files are written (created if needed).
        mask: optional directory of ``<subject>.<ext>`` masks; default: the manifest's masks, if any.
        profile: ``"paper"`` or ``"synthrad2023"`` (:func:`volsynth.evaluation.metrics.compute_metrics`).
        modality: units of the volumes: ``"mr"`` (normalised scale) or ``"ct"`` (HU); ``None`` = the
            profile's default (paper: mr, synthrad2023: ct).
        lpips: ``None`` (not computed), an :class:`LPIPSConfig` (built here; unavailable weights are recorded
            in the summary, never scored as 0) or a ready :class:`LPIPS` model (default slicing options).
        normalise: for ``paper``/``mr`` only: ``"none"`` (volumes already on [0, 1]) or ``"minmax"`` (the target
            is min-max scaled by its own range, the scale of volsynth's training targets; predictions are taken
            as already on [0, 1], as ``volsynth predict`` writes synthetic MR).
        target_modality: with a manifest, which image is the target (default: the manifest's ``target``).
        progress: show a progress bar.

    Returns:
        The per-subject rows and the summary, as written.

    Raises:
        FileNotFoundError: a directory, manifest, target or mask is missing (the message names the file).
        ValueError: different grids (both are stated), bad options; :class:`volsynth.data.io.VolumeError` (a
            ``ValueError``) for unreadable files or NaN/Inf voxels, naming the file.
    """
    pred, target, out_dir = Path(pred), Path(target), Path(out_dir)
    profile, modality = resolve_profile(profile, modality)
    if normalise not in NORMALISATIONS:
        raise ValueError(
            f"Unknown normalise '{normalise}'.{suggest(normalise, NORMALISATIONS)} "
            f"Known: {', '.join(NORMALISATIONS)}"
        )
    if normalise == "minmax" and (profile != "paper" or modality != "mr"):
        raise ValueError("normalise='minmax' applies to the paper profile on MR only (CT is scored in HU)")

    predictions = _list_volumes(pred, "prediction")
    if not predictions:
        raise FileNotFoundError(f"no prediction volumes ({', '.join(VOLUME_EXTENSIONS)}) found in {pred}")

    # Resolve every counterpart before scoring, so a missing file fails fast rather than after an hour.
    pairs: dict[str, tuple[Path, Path, Path | None]] = {}
    manifest_targets: dict[str, Path | None] | None = None
    manifest_masks: dict[str, Path | None] = {}
    if target.is_file():
        manifest_targets, manifest_masks, target_modality = _manifest_pairs(target, target_modality)
    elif not target.is_dir():
        raise FileNotFoundError(f"target directory or manifest not found: {target}")
    use_manifest_masks = mask is None and any(manifest_masks.get(s) is not None for s in predictions)
    for subject, pred_path in predictions.items():
        if manifest_targets is not None:
            if subject not in manifest_targets:
                raise FileNotFoundError(
                    f"no target for prediction {pred_path}: subject '{subject}' is not in manifest {target}"
                )
            target_path = manifest_targets[subject]
            if target_path is None or not target_path.is_file():
                raise FileNotFoundError(
                    f"target for prediction {pred_path} not found: manifest {target} gives "
                    f"{target_path or f'no {target_modality!r} image'} for subject '{subject}'"
                )
        else:
            target_path = _find_counterpart(target, subject, "target", pred_path)
        mask_path: Path | None = None
        if mask is not None:
            mask_path = _find_counterpart(Path(mask), subject, "mask", pred_path)
        elif use_manifest_masks:
            mask_path = manifest_masks.get(subject)
            if mask_path is None:
                raise FileNotFoundError(
                    f"no mask for prediction {pred_path}: manifest {target} gives masks for some subjects "
                    f"but none for '{subject}'"
                )
            if not mask_path.is_file():
                raise FileNotFoundError(f"mask for prediction {pred_path} not found: {mask_path}")
        pairs[subject] = (pred_path, target_path, mask_path)
    masked = any(m is not None for _, _, m in pairs.values())

    model: LPIPS | None = None
    lpips_info: dict[str, object]
    views, batch_size, max_slices = LPIPSConfig.views, LPIPSConfig.batch_size, LPIPSConfig.max_slices_per_view
    if lpips is None:
        lpips_info = {"available": False, "reason": "not requested"}
    elif isinstance(lpips, LPIPS):
        model, lpips_info = lpips, {"available": True, "variant": lpips.variant}
    else:
        views, batch_size, max_slices = lpips.views, lpips.batch_size, lpips.max_slices_per_view
        try:
            model = build_lpips(lpips)
            lpips_info = {"available": True, **lpips.describe()}
        except LPIPSUnavailable as error:
            lpips_info = {"available": False, "reason": error.reason, **lpips.describe()}

    rows: list[dict[str, float | str]] = []
    subjects = sorted(pairs)
    if progress:
        from tqdm import tqdm

        subjects = tqdm(subjects, desc="evaluate", unit="subject")
    for subject in subjects:
        pred_path, target_path, mask_path = pairs[subject]
        pred_volume = _read(pred_path, "prediction")
        target_volume = _read(target_path, "target")
        _check_grid(pred_volume, target_volume, "prediction")
        syn = np.asarray(pred_volume.array, dtype=np.float64)
        ref = np.asarray(target_volume.array, dtype=np.float64)
        region: np.ndarray | None = None
        if mask_path is not None:
            mask_volume = _read(mask_path, "mask")
            _check_grid(mask_volume, target_volume, "mask")
            region = (
                np.asarray(mask_volume.array) > 0
            )  # binarised as in SynthRAD2023 (ecosystem-anchors §3.1)
            if not region.any():
                raise ValueError(f"mask {mask_path} is empty")
        if normalise == "minmax":
            lo, hi = float(ref.min()), float(ref.max())
            # volsynth writes synthetic MR on the normalised [0, 1] scale (a scanner scale cannot be predicted), the
            # scale the training targets had after their own per-volume min-max; bring the target there too.
            ref = _minmax(ref, lo, hi, f"target {target_path}")
        try:
            values = compute_metrics(syn, ref, profile=profile, mask=region, modality=modality)
        except ValueError as error:
            raise ValueError(f"subject '{subject}' ({pred_path}): {error}") from error
        row: dict[str, float | str] = {"subject": subject, **values}
        if model is not None:
            if profile == "paper":
                lp_syn, lp_ref = _own_minmax(syn), _own_minmax(ref)
            else:
                # Not a challenge metric: the fixed CT window keeps offsets between sCT and CT visible.
                lp_syn, lp_ref = ct_window_to_unit(syn), ct_window_to_unit(ref)
            row["lpips"] = lpips_volume(
                lp_syn,
                lp_ref,
                model=model,
                views=views,
                batch_size=batch_size,
                max_slices_per_view=max_slices,
            )
        rows.append(row)

    columns = metric_names(profile, masked=masked) + (["lpips"] if model is not None else [])
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["subject", *columns])
    for row in rows:
        writer.writerow([row["subject"], *(_format(row[c]) for c in columns)])
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = atomic_write_text(out_dir / "metrics.csv", buffer.getvalue())

    summary: dict[str, Any] = _summarise(rows, columns)
    if model is not None:
        summary["lpips"] = {**summary["lpips"], **lpips_info}
    else:
        summary["lpips"] = lpips_info
    summary_out: dict = {
        **summary,
        "profile": profile,
        "modality": modality,
        "definitions": PROFILE_DEFINITIONS[profile],
        "normalise": normalise,
        "mask": masked,
        "n_subjects": len(rows),
        "std_definition": "sample standard deviation (ddof=1) over finite values; null when n == 1",
    }
    json_path = atomic_write_text(
        out_dir / "summary.json", json.dumps(summary_out, indent=2, allow_nan=False) + "\n"
    )
    return EvaluationResult(
        per_subject=rows, summary=summary_out, metrics_csv=csv_path, summary_json=json_path
    )
