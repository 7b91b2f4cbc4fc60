"""Score a folder of predicted volumes against their targets: ``metrics.csv`` + ``summary.json`` (+ ``ceiling.csv``).

Inputs (``volsynth evaluate``):

- ``pred``: a folder written by ``volsynth predict`` (its ``predictions.json`` lists one output file per
  subject, and says which modality the model synthesises), or a plain folder of ``<subject>.<ext>`` or
  ``<subject>_synthetic-<modality>.<ext>`` files (``.nii.gz``, ``.nii``, ``.nrrd``, ``.mha``, ``.mhd``); every
  prediction found is scored, and only those.
- ``target``: a folder with the same subject names, or a volsynth manifest (JSON or CSV,
  :mod:`volsynth.data.manifest`) giving the target image (its ``target`` modality, or ``target_modality``) and
  optionally a mask and an ideal image per subject.
- ``mask``: an optional folder of ``<subject>.<ext>`` masks (binarised with ``> 0``, as SynthRAD does);
  without it, masks named in the manifest are used.

A model's output is only ever scored against its own target modality: when the predictions declare one
(``predictions.json`` or ``_synthetic-<modality>`` names) and it differs from the target's, evaluation stops
with a :class:`~volsynth.errors.DataError` naming both.

Prediction, target, mask and ideal image must share the voxel grid (shape, spacing, origin, direction); a
mismatch is an error that states both grids rather than a silent resample (the SynthRAD2025 evaluation code,
``SynthRAD2025/evaluation``, imposes the GT geometry on the prediction; we prefer to surface the mismatch).

**Ceiling.** A phantom manifest lists per subject an ``ideal`` image per contrast: E[noisy target | anatomy],
the best any prediction can do in mean squared error (:func:`volsynth.data.phantom.rician_mean`). When the
target modality has one, it is scored exactly like a prediction (same profile, normalisation and mask) and the
distance of the predictions to it is reported.

Outputs, written atomically to ``out_dir``:

- ``metrics.csv``: one row per subject, columns ``subject`` + :func:`~volsynth.metrics.metric_names`
  (+ ``lpips`` when available; + ``psnr_db_below_ceiling``, ``nmse_ratio_to_ceiling`` and, with a mask,
  ``nmse_mask_ratio_to_ceiling`` when ideal images exist); floats written with ``repr`` precision
  (``inf``/``nan`` spelled so).
- ``ceiling.csv`` (only with ideal images): the ideal image's metrics per subject, same columns as the metrics.
- ``summary.json``: ``{metric: {"mean", "std", "n"}}`` over the finite per-subject values (``std`` is the
  sample standard deviation, ddof = 1, as papers report; ``null`` when n == 1; ``n_nonfinite`` appears when
  values were left out), plus ``profile``, ``modality``, ``definitions``, ``normalise``,
  ``normalise_definition``, ``mask``, ``n_subjects``, ``std_definition``, ``target_modality``,
  ``prediction_modality``, ``pred_dir``, ``checkpoint``, ``predictions`` (what ``predictions.json`` said),
  ``lpips`` (``{"available": false, "reason": ...}`` when LPIPS could not be computed, never a 0 value) and,
  with ideal images, ``ceiling`` (same statistics) and ``distance_to_ceiling``.
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from volsynth.data.io import IMAGE_SUFFIXES, VolumeError, image_suffix, read_volume, strip_image_suffix
from volsynth.data.manifest import load_manifest
from volsynth.data.volume import DIRECTION_ATOL, Volume
from volsynth.errors import ConfigError, DataError, InputNotFoundError
from volsynth.evaluation.lpips import LPIPS, LPIPSConfig, LPIPSUnavailable, build_lpips, lpips_volume
from volsynth.metrics import (
    NORMALISATION_DEFINITIONS,
    NORMALISATIONS,
    PROFILE_DEFINITIONS,
    compute_metrics,
    ct_window_to_unit,
    metric_names,
    minmax_unit,
    resolve_profile,
    summarise,
)
from volsynth.registry import suggest
from volsynth.utils import atomic_write_text

VOLUME_EXTENSIONS: tuple[str, ...] = IMAGE_SUFFIXES
PREDICTIONS_FILE = "predictions.json"
PREDICTIONS_FORMAT = "volsynth-predictions"
# Earlier name of "target" (only the target min-max normalised), still accepted.
_LEGACY_NORMALISATIONS = {"minmax": "target"}
_SYNTHETIC_NAME = re.compile(r"^(?P<subject>.+)_synthetic-(?P<modality>[A-Za-z0-9]+)$")


@dataclass
class EvaluationResult:
    """What :func:`evaluate_predictions` computed and wrote.

    Attributes:
        per_subject: one dict per subject (``"subject"`` plus one float per metric), in CSV order.
        summary: the content of ``summary.json``.
        metrics_csv: path of the written ``metrics.csv``.
        summary_json: path of the written ``summary.json``.
        ceiling: the ideal image's rows (as ``per_subject``; empty without ideal images).
        ceiling_csv: path of the written ``ceiling.csv``, or None.
    """

    per_subject: list[dict[str, float | str]]
    summary: dict[str, Any]
    metrics_csv: Path | None = field(default=None)
    summary_json: Path | None = field(default=None)
    ceiling: list[dict[str, float | str]] = field(default_factory=list)
    ceiling_csv: Path | None = field(default=None)


@dataclass
class PredictionSet:
    """The predictions of a folder: ``files`` (subject → path), the modality they are (``modality``, None
    when nothing says), where that came from (``declared_by``) and ``predictions.json``'s content (``info``)."""

    files: dict[str, Path]
    modality: str | None
    declared_by: str
    info: dict[str, Any]


# ----------------------------------------------------------------------------------------------------------
# reading


def _read(path: Path, what: str) -> Volume:
    """Read a volume with :func:`volsynth.data.io.read_volume` (which rejects NaN/Inf, also the NaN that ITK's
    NIfTI reader would silently turn into 0) and say which role the file plays if it fails (one line)."""
    try:
        return read_volume(path)
    except VolumeError as error:
        problem = " ".join(str(error.problem).split())  # ITK reasons may span lines; the CLI prints one
        raise VolumeError(path, f"{what}: {problem}") from None


def _describe(volume: Volume, other: Volume) -> str:
    text = volume.describe_grid()
    if not np.allclose(volume.direction, other.direction, atol=DIRECTION_ATOL, rtol=0):
        # The orientation code alone can hide an oblique difference; show the cosines then.
        text += ", direction " + np.array2string(volume.direction.ravel(), precision=4, separator=", ")
    return text


def _check_grid(volume: Volume, reference: Volume, what: str) -> None:
    if not volume.same_grid(reference):
        raise DataError(
            f"{what} {volume.path} and target {reference.path} are on different grids:\n"
            f"  {what}: {_describe(volume, reference)}\n  target: {_describe(reference, volume)}"
        )


def _image_files(directory: Path) -> list[Path]:
    return [p for p in sorted(directory.iterdir())
            if p.is_file() and not p.name.startswith(".") and image_suffix(p) in VOLUME_EXTENSIONS]


def _load_predictions_json(path: Path, directory: Path) -> PredictionSet:
    try:
        document = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"{path}: not a readable predictions file ({' '.join(str(error).split())})") from None
    if not isinstance(document, dict) or document.get("format") != PREDICTIONS_FORMAT:
        raise DataError(f"{path}: not a volsynth predictions file (expected \"format\": \"{PREDICTIONS_FORMAT}\")")
    outputs = document.get("outputs")
    if not isinstance(outputs, dict) or not outputs:
        raise DataError(f"{path}: 'outputs' must map subject names to {{\"file\": ...}} entries")
    files: dict[str, Path] = {}
    for subject, entry in outputs.items():
        name = entry.get("file") if isinstance(entry, dict) else None
        if not isinstance(name, str) or not name:
            raise DataError(f"{path}: output of subject '{subject}' has no 'file'")
        file = Path(name) if Path(name).is_absolute() else directory / name
        if not file.is_file():
            raise InputNotFoundError(f"prediction {file} listed in {path} for subject '{subject}' not found")
        files[str(subject)] = file
    target = document.get("target")
    return PredictionSet(files=files, modality=str(target) if target else None,
                         declared_by=str(path), info=document)


def find_predictions(directory: str | Path) -> PredictionSet:
    """The predictions in ``directory``: through ``predictions.json``'s ``outputs`` when present, else every
    ``<subject>.<ext>`` / ``<subject>_synthetic-<modality>.<ext>`` volume in it.

    Raises:
        InputNotFoundError: no such folder, no volume in it, or a listed output is missing.
        DataError: a malformed ``predictions.json``, two files for one subject, or files naming several modalities.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise InputNotFoundError(f"prediction directory not found: {directory}")
    listing = directory / PREDICTIONS_FILE
    if listing.is_file():
        return _load_predictions_json(listing, directory)
    found: dict[str, Path] = {}
    modalities: dict[str, str] = {}
    for path in _image_files(directory):
        subject = strip_image_suffix(path)
        match = _SYNTHETIC_NAME.match(subject)
        if match:
            subject = match["subject"]
            modalities.setdefault(match["modality"], path.name)
        if subject in found:
            raise DataError(f"prediction directory {directory} has two files for subject '{subject}': "
                            f"{found[subject].name} and {path.name}")
        found[subject] = path
    if not found:
        raise InputNotFoundError(f"no prediction volumes ({', '.join(VOLUME_EXTENSIONS)}) found in {directory}")
    if len(modalities) > 1:
        examples = ", ".join(f"{name} ({m})" for m, name in sorted(modalities.items()))
        raise DataError(f"prediction directory {directory} mixes synthetic modalities: {examples}")
    modality = next(iter(modalities), None)
    return PredictionSet(files=found, modality=modality,
                         declared_by=f"file names in {directory}" if modality else "", info={})


def _find_counterpart(directory: Path, subject: str, what: str, pred_path: Path) -> Path:
    existing = [p for p in (directory / f"{subject}{ext}" for ext in VOLUME_EXTENSIONS) if p.is_file()]
    if not existing:
        raise InputNotFoundError(
            f"no {what} for prediction {pred_path}: expected {directory / (subject + '.nii.gz')} "
            f"(or {', '.join(VOLUME_EXTENSIONS[1:])})"
        )
    if len(existing) > 1:
        raise DataError(
            f"{what} directory {directory} has several files for '{subject}': "
            f"{', '.join(p.name for p in existing)}"
        )
    return existing[0]


def _ideal_path(subject: Any, modality: str, root: Path) -> Path | None:
    """The manifest entry's ideal image of ``modality`` (``"ideal": {modality: path}``), or None."""
    ideal = subject.extra.get("ideal") if isinstance(subject.extra, dict) else None
    value = ideal.get(modality) if isinstance(ideal, dict) else None
    if value in (None, ""):
        return None
    path = Path(value).expanduser()
    return path if path.is_absolute() else root / path


@dataclass
class _Pair:
    prediction: Path
    target: Path
    mask: Path | None
    ideal: Path | None


def _resolve_target_modality(target: Path, manifest_target: str | None, explicit: str | None,
                             predictions: PredictionSet, pred: Path) -> str | None:
    """The modality the predictions are scored against; refuses a model's output against another modality."""
    chosen = explicit or manifest_target or predictions.modality
    declared = predictions.modality
    if declared and chosen and declared.lower() != chosen.lower():
        where = "--target-modality" if explicit else f"the target of manifest {target}"
        raise DataError(
            f"predictions in {pred} are synthetic '{declared}' (per {predictions.declared_by}) but the target "
            f"modality is '{chosen}' ({where}); a model is scored only against the modality it synthesises: "
            f"pass --target-modality {declared}, or the predictions of a model of '{chosen}'"
        )
    return chosen


# ----------------------------------------------------------------------------------------------------------
# scoring


def _own_minmax(array: np.ndarray) -> np.ndarray:
    # The LPIPS input of the 3D-mDAUNet release (juhha/3D-mADUNet ``example/evaluate_lpips.ipynb``): each volume
    # min-max normalised on its own; a constant volume becomes all zeros rather than a division by zero.
    return minmax_unit(array, constant="zeros")


def _format(value: float | str) -> str:
    return value if isinstance(value, str) else repr(float(value))


def _summarise(rows: list[dict[str, float | str]], columns: list[str]) -> dict[str, dict]:
    """Per column ``{"mean", "std", "n"}`` over the finite values (and how many were not finite)."""
    summary: dict[str, dict] = {}
    for column in columns:
        values = [float(row[column]) for row in rows]
        entry: dict[str, Any] = dict(summarise(values))
        if entry["n"] != len(values):
            entry["n_nonfinite"] = len(values) - entry["n"]
        summary[column] = entry
    return summary


def _csv_text(rows: list[dict[str, float | str]], columns: list[str]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["subject", *columns])
    for row in rows:
        writer.writerow([row["subject"], *(_format(row.get(c, float("nan"))) for c in columns)])
    return buffer.getvalue()


def _ratio(numerator: float, denominator: float) -> float:
    if not (np.isfinite(numerator) and np.isfinite(denominator)) or denominator == 0:
        return float("nan")
    return numerator / denominator


def _finite_mean(values: list[float]) -> float | None:
    finite = [v for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else None


def _distance_summary(rows: list[dict[str, float | str]], ceiling: dict[str, dict[str, float | str]],
                      masked: bool) -> dict[str, Any]:
    """Distance of the predictions to the ideal image over the subjects that have one: mean per-subject dB and
    SSIM gaps, and the ratio of mean NMSEs (a ratio of means, so one near-perfect subject cannot dominate)."""
    paired = [(row, ceiling[str(row["subject"])]) for row in rows if str(row["subject"]) in ceiling]

    def gap(key: str) -> float | None:
        return _finite_mean([float(c[key]) - float(r[key]) for r, c in paired])

    def ratio(key: str) -> float | None:
        both = [(float(r[key]), float(c[key])) for r, c in paired
                if np.isfinite(float(r[key])) and np.isfinite(float(c[key]))]
        if not both:
            return None
        value = _ratio(float(np.mean([b[0] for b in both])), float(np.mean([b[1] for b in both])))
        return value if np.isfinite(value) else None

    out: dict[str, Any] = {"psnr_db_below": gap("psnr"), "ssim_below": gap("ssim"), "nmse_ratio": ratio("nmse")}
    if masked:
        out.update(masked_psnr_db_below=gap("psnr_mask"), masked_nmse_ratio=ratio("nmse_mask"))
    out["n"] = len(paired)
    out["definition"] = ("psnr_db_below / ssim_below: mean over subjects of (ideal − prediction); nmse_ratio: mean "
                         "prediction NMSE / mean ideal NMSE (1 = at the ceiling)")
    return out


def _check_options(profile: str, modality: str | None, normalise: str | None) -> tuple[str, str, str]:
    try:
        profile, modality = resolve_profile(profile, modality)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if normalise is None:
        normalise = "paper" if profile == "paper" and modality == "mr" else "none"
    normalise = _LEGACY_NORMALISATIONS.get(normalise, normalise)
    if normalise not in NORMALISATIONS:
        raise ConfigError(f"Unknown normalise '{normalise}'.{suggest(normalise, NORMALISATIONS)} "
                          f"Known: {', '.join(NORMALISATIONS)}")
    if normalise != "none" and (profile != "paper" or modality != "mr"):
        raise ConfigError(f"normalise='{normalise}' applies to the paper profile on MR only (CT is scored on a "
                          "fixed HU window); use 'none'")
    return profile, modality, normalise


def evaluate_predictions(
    pred: Path,
    target: Path,
    *,
    out_dir: Path,
    mask: Path | None = None,
    profile: str = "paper",
    modality: str | None = None,
    lpips: LPIPSConfig | LPIPS | None = None,
    normalise: str | None = None,
    target_modality: str | None = None,
    progress: bool = False,
) -> EvaluationResult:
    """Score every prediction in ``pred`` against its target and write ``metrics.csv`` and ``summary.json``
    (and ``ceiling.csv`` when the manifest has ideal images of the target modality).

    Args:
        pred: a ``volsynth predict`` folder (``predictions.json``) or a folder of ``<subject>.<ext>`` /
            ``<subject>_synthetic-<modality>.<ext>`` volumes (:func:`find_predictions`).
        target: directory of ``<subject>.<ext>`` targets, or a manifest file
            (:func:`volsynth.data.manifest.load_manifest`; the target is its ``target`` modality).
        out_dir: where the files are written (created if needed).
        mask: optional directory of ``<subject>.<ext>`` masks; default: the manifest's masks, if any.
        profile: ``"paper"`` or ``"synthrad2023"`` (:func:`volsynth.metrics.compute_metrics`).
        modality: units of the volumes: ``"mr"`` (normalised scale) or ``"ct"`` (HU); ``None`` = the
            profile's default (paper: mr, synthrad2023: ct).
        lpips: ``None`` (not computed), an :class:`LPIPSConfig` (built here; unavailable weights are recorded
            in the summary, never scored as 0) or a ready :class:`LPIPS` model (default slicing options).
        normalise: MR under the paper profile (:data:`volsynth.metrics.NORMALISATIONS`): ``"paper"`` (default
            there: target and prediction each min-max normalised per volume, as the paper's evaluation did),
            ``"target"`` (only the target; predictions taken to be on [0, 1] already; ``"minmax"`` is an older
            name for it) or ``"none"`` (default for CT). An ideal image is scored like a prediction: under
            ``"target"`` it is first put on the prediction scale with the target's own min-max (what a perfect
            model trained on min-max normalised targets outputs).
        target_modality: the modality scored against (default: the manifest's ``target``, else the modality the
            predictions declare). Must match the modality the predictions declare, if any.
        progress: show a progress bar.

    Returns:
        The per-subject rows, the ceiling rows and the summary, as written.

    Raises:
        InputNotFoundError (a ``FileNotFoundError``): a folder, manifest, target, mask or ideal image is missing
            (the message names it).
        DataError (a ``ValueError``): different grids (both are stated), predictions of another modality than
            the target, unreadable files or NaN/Inf voxels (:class:`volsynth.data.io.VolumeError`), naming the file.
        ConfigError (a ``ValueError``): unknown profile, modality or normalisation.
    """
    pred, target, out_dir = Path(pred), Path(target), Path(out_dir)
    profile, modality, normalise = _check_options(profile, modality, normalise)
    predictions = find_predictions(pred)

    # Resolve every counterpart before scoring, so a missing file fails fast rather than after an hour.
    manifest = None
    if target.is_file():
        manifest = load_manifest(target)
    elif not target.is_dir():
        raise InputNotFoundError(f"target directory or manifest not found: {target}")
    chosen = _resolve_target_modality(target, manifest.target if manifest else None, target_modality,
                                      predictions, pred)
    # A folder of targets has no modality of its own: only an explicit one is recorded.
    target_modality = chosen if manifest is not None else target_modality
    entries = {}
    if manifest is not None:
        if target_modality is None:
            raise DataError(f"manifest {target} names no target modality; pass --target-modality (one of "
                            f"{', '.join(manifest.modalities()) or 'none'})")
        manifest.require(target_modality)
        entries = manifest.by_name()
    use_manifest_masks = mask is None and any(
        entries[s].mask is not None for s in predictions.files if s in entries)
    pairs: dict[str, _Pair] = {}
    for subject, pred_path in predictions.files.items():
        ideal_path: Path | None = None
        if manifest is not None:
            if subject not in entries:
                raise InputNotFoundError(
                    f"no target for prediction {pred_path}: subject '{subject}' is not in manifest {target}")
            target_path = entries[subject].image(target_modality)
            if target_path is None or not target_path.is_file():
                raise InputNotFoundError(
                    f"target for prediction {pred_path} not found: manifest {target} gives "
                    f"{target_path or f'no {target_modality!r} image'} for subject '{subject}'")
            ideal_path = _ideal_path(entries[subject], target_modality, target.parent)
            if ideal_path is not None and not ideal_path.is_file():
                raise InputNotFoundError(f"ideal image {ideal_path} of subject '{subject}' (manifest {target}) "
                                         "not found")
        else:
            target_path = _find_counterpart(target, subject, "target", pred_path)
        mask_path: Path | None = None
        if mask is not None:
            mask_path = _find_counterpart(Path(mask), subject, "mask", pred_path)
        elif use_manifest_masks:
            mask_path = entries[subject].mask
            if mask_path is None:
                raise InputNotFoundError(
                    f"no mask for prediction {pred_path}: manifest {target} gives masks for some subjects "
                    f"but none for '{subject}'")
            if not mask_path.is_file():
                raise InputNotFoundError(f"mask for prediction {pred_path} not found: {mask_path}")
        pairs[subject] = _Pair(pred_path, target_path, mask_path, ideal_path)
    masked = any(p.mask is not None for p in pairs.values())
    with_ceiling = any(p.ideal is not None for p in pairs.values())

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

    def score(subject: str, syn: np.ndarray, ref: np.ndarray, region: np.ndarray | None,
              path: Path) -> dict[str, float | str]:
        try:
            values = compute_metrics(syn, ref, profile=profile, mask=region, modality=modality,
                                     normalise=normalise)
        except ValueError as error:
            raise DataError(f"subject '{subject}' ({path}): {error}") from None
        row: dict[str, float | str] = {"subject": subject, **values}
        if model is not None:
            if profile == "paper":
                lp_syn, lp_ref = _own_minmax(syn), _own_minmax(ref)
            else:
                # Not a challenge metric: the fixed CT window keeps offsets between sCT and CT visible.
                lp_syn, lp_ref = ct_window_to_unit(syn), ct_window_to_unit(ref)
            row["lpips"] = lpips_volume(lp_syn, lp_ref, model=model, views=views, batch_size=batch_size,
                                        max_slices_per_view=max_slices)
        return row

    rows: list[dict[str, float | str]] = []
    ceiling: dict[str, dict[str, float | str]] = {}
    subjects = sorted(pairs)
    if progress:
        from tqdm import tqdm

        subjects = tqdm(subjects, desc="evaluate", unit="subject")
    for subject in subjects:
        pair = pairs[subject]
        pred_volume = _read(pair.prediction, "prediction")
        target_volume = _read(pair.target, "target")
        _check_grid(pred_volume, target_volume, "prediction")
        ref = np.asarray(target_volume.array, dtype=np.float64)
        region: np.ndarray | None = None
        if pair.mask is not None:
            mask_volume = _read(pair.mask, "mask")
            _check_grid(mask_volume, target_volume, "mask")
            region = np.asarray(mask_volume.array) > 0  # binarised (mask > 0) as SynthRAD2023/metrics does
            if not region.any():
                raise DataError(f"mask {pair.mask} is empty")
        rows.append(score(subject, np.asarray(pred_volume.array, dtype=np.float64), ref, region, pair.prediction))
        if pair.ideal is not None:
            ideal_volume = _read(pair.ideal, "ideal image")
            _check_grid(ideal_volume, target_volume, "ideal image")
            ideal = np.asarray(ideal_volume.array, dtype=np.float64)
            if normalise == "target":
                # Predictions are taken to be on the target's min-max scale already: put the ideal image there.
                ideal = (ideal - ref.min()) / max(float(np.ptp(ref)), np.finfo(float).tiny)
            ceiling[subject] = score(subject, ideal, ref, region, pair.ideal)

    columns = metric_names(profile, masked=masked) + (["lpips"] if model is not None else [])
    distance_columns: list[str] = []
    if with_ceiling:
        distance_columns = ["psnr_db_below_ceiling", "nmse_ratio_to_ceiling"]
        if masked:
            distance_columns.append("nmse_mask_ratio_to_ceiling")
        for row in rows:
            best = ceiling.get(str(row["subject"]))
            row["psnr_db_below_ceiling"] = float(best["psnr"]) - float(row["psnr"]) if best else float("nan")
            row["nmse_ratio_to_ceiling"] = _ratio(float(row["nmse"]), float(best["nmse"])) if best else float("nan")
            if masked:
                row["nmse_mask_ratio_to_ceiling"] = (_ratio(float(row["nmse_mask"]), float(best["nmse_mask"]))
                                                     if best else float("nan"))
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = atomic_write_text(out_dir / "metrics.csv", _csv_text(rows, columns + distance_columns))
    ceiling_rows = [ceiling[s] for s in sorted(ceiling)]
    ceiling_path = None
    if with_ceiling:
        ceiling_path = atomic_write_text(out_dir / "ceiling.csv", _csv_text(ceiling_rows, columns))
    else:
        (out_dir / "ceiling.csv").unlink(missing_ok=True)  # an earlier run's ceiling would not match these rows

    summary: dict[str, Any] = _summarise(rows, columns)
    summary["lpips"] = {**summary["lpips"], **lpips_info} if model is not None else lpips_info
    info = predictions.info
    summary.update({
        "profile": profile,
        "modality": modality,
        "definitions": PROFILE_DEFINITIONS[profile],
        "normalise": normalise,
        "normalise_definition": NORMALISATION_DEFINITIONS[normalise],
        "mask": masked,
        "n_subjects": len(rows),
        "std_definition": "sample standard deviation (ddof=1) over finite values; null when n == 1",
        "target_modality": target_modality,
        "prediction_modality": predictions.modality,
        "pred_dir": str(pred.resolve()),
        "checkpoint": info.get("checkpoint"),
        "predictions": {k: info.get(k) for k in ("method", "source", "target", "checkpoint", "checkpoint_sha256",
                                                 "created", "volsynth_version")} if info else None,
    })
    if with_ceiling:
        summary["ceiling"] = _summarise(ceiling_rows, columns)
        summary["ceiling_definition"] = ("the manifest's ideal image of the target (its expected value given the "
                                         "anatomy: a noise-free phantom image) scored exactly like the predictions")
        summary["distance_to_ceiling"] = _distance_summary(rows, ceiling, masked)
    json_path = atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=2, allow_nan=False) + "\n")
    return EvaluationResult(per_subject=rows, summary=summary, metrics_csv=csv_path, summary_json=json_path,
                            ceiling=ceiling_rows, ceiling_csv=ceiling_path)
