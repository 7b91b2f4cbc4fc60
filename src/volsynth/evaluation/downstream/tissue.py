"""The ``tissue`` protocol (the seed paper's Protocol 2): one fixed segmenter on the real and the synthetic volume.

The agreement of its two outputs is scored per class: Dice and volumetric similarity (VS), each class on its own
(HiFi-Syn's tissue table [HFS Tab. 3] reports GM and WM Dice and VS from FSL FAST; here CSF, GM and WM from the
built-in Gaussian-mixture segmenter, :class:`~volsynth.data.segmenters.GMMTissueSegmenter`), and their mean
per subject. The seed does the same with TotalSegmentator on CT (``external`` protocol: any command-line tool).

A class absent from both maps of a subject has no Dice: it is NaN there and left out of that subject's mean (as
MONAI's ``ignore_empty``). Standard deviations are over subjects, sample std (ddof = 1).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from volsynth.data.io import write_volume
from volsynth.data.segmenters import TISSUE_LABELS, Segmenter
from volsynth.data.volume import Volume
from volsynth.errors import DataError
from volsynth.evaluation.downstream.inputs import VolumeInput, name_of, read_image, read_labels, unit_scaled
from volsynth.evaluation.downstream.results import (
    column,
    label_names,
    nanmean,
    result_files,
    write_csv,
    write_json,
)
from volsynth.metrics import dice, summarise, volumetric_similarity


def _region(source: VolumeInput, subject: str, like: Volume, what: str) -> np.ndarray:
    region = read_labels(source) != 0
    if region.shape != like.shape:
        raise DataError(f"{name_of(source, subject)}: {what} of shape {region.shape} does not match the volume "
                        f"{like.shape} of subject '{subject}'")
    return region


def protocol2(real: Mapping[str, VolumeInput], synthetic: Mapping[str, VolumeInput], *, segmenter: Segmenter,
              out_dir: str | os.PathLike[str], masks: Mapping[str, VolumeInput] | None = None,
              exclude: Mapping[str, VolumeInput] | None = None,
              labels: Sequence[int] | Mapping[int, str] | None = None, normalise: bool | None = None,
              save_segmentations: bool = False, protocol: str = "tissue") -> dict[str, Any]:
    """Agreement of one segmenter's output on real vs synthetic volumes: Dice and VS per class and subject.

    Args:
        real, synthetic: subject → volume; subjects in both are scored (same grid required).
        segmenter: any :class:`~volsynth.data.segmenters.Segmenter` (e.g. ``GMMTissueSegmenter("t1")``).
        out_dir: where ``<protocol>.csv`` and ``<protocol>_summary.json`` go.
        masks: subject → region mask (e.g. the brain mask) given to the segmenter for *both* images, so the two
            segmentations cover the same voxels. Recommended for the tissue GMM; without one it thresholds each
            image itself.
        exclude: subject → map whose non-zero voxels are left out (e.g. the tumour labels, so that a tissue
            segmenter sees normal tissue only, as HiFi-Syn's GM/WM/CSF): removed from the mask and set to 0 in
            both segmentations before scoring.
        labels: classes to score (values or value → name); default the segmenter's ``labels``; when both are
            empty, every non-zero label found in either map of a subject.
        normalise: min-max scale each volume to [0, 1] before segmenting; default the segmenter's
            ``normalise_input`` (True for MR tools: the real MR is in scanner units, the synthetic on [0, 1]).
        save_segmentations: also write ``segmentations/<subject>_{real,synthetic}.nii.gz``.
        protocol: the name written into the results and their file names (``tissue``, or ``external`` for an
            external tool).

    Returns:
        The summary (also written as JSON): ``per_class`` = ``{"dice_<class>": {mean, std, n}, "vs_<class>": …}``
        (each class separately), ``mean_dice`` / ``mean_vs`` = mean ± std over subjects of the per-subject mean
        over classes, ``per_subject`` = subject → every column, ``labels``, ``subjects`` and the settings.
    """
    out = Path(out_dir)
    subjects = sorted(set(real) & set(synthetic))
    if not subjects:
        raise DataError(f"{protocol} protocol: no subject has both a real and a synthetic volume")
    names = label_names(labels) or dict(getattr(segmenter, "labels", {}) or {})
    do_normalise = bool(getattr(segmenter, "normalise_input", True)) if normalise is None else bool(normalise)

    rows: list[dict[str, Any]] = []
    seen: dict[int, str] = dict(names)
    started = time.perf_counter()
    for subject in subjects:
        volumes = read_image(real[subject]), read_image(synthetic[subject])
        if volumes[0].shape != volumes[1].shape:
            raise DataError(f"subject '{subject}': real {volumes[0].shape} ({name_of(real[subject], subject)}) and "
                            f"synthetic {volumes[1].shape} ({name_of(synthetic[subject], subject)}) volumes differ "
                            "in shape; predictions must be on the native grid")
        mask = _region(masks[subject], subject, volumes[0], "mask") if masks and subject in masks else None
        excluded = (_region(exclude[subject], subject, volumes[0], "exclusion map")
                    if exclude and subject in exclude else None)
        if mask is not None and excluded is not None:
            mask = mask & ~excluded
        segmentations = []
        for volume in volumes:
            image = unit_scaled(volume.array) if do_normalise else volume.array
            segmentation = np.asarray(segmenter.segment(image, mask=mask, spacing=volume.spacing, origin=volume.origin,
                                                        direction=tuple(volume.direction.ravel())))
            if segmentation.shape != image.shape:
                raise DataError(f"subject '{subject}': segmenter '{segmenter.name}' returned shape "
                                f"{segmentation.shape} for a volume of shape {image.shape}")
            segmentation = segmentation.astype(np.int64)
            if excluded is not None:
                segmentation[excluded] = 0
            segmentations.append(segmentation)
        if names:
            present = list(names)
        else:  # score what the tool found (e.g. TotalSegmentator structures present in either image)
            present = sorted(set(np.unique(segmentations[0]).tolist()) | set(np.unique(segmentations[1]).tolist()))
            present = [v for v in present if v != 0]
            for value in present:
                seen.setdefault(int(value), str(value))
        overlap = dice(segmentations[0], segmentations[1], present)
        similarity = volumetric_similarity(segmentations[0], segmentations[1], present)
        row: dict[str, Any] = {"subject": subject}
        row.update({column("dice", seen[v]): overlap[v] for v in present})
        row.update({column("vs", seen[v]): similarity[v] for v in present})
        row["mean_dice"] = nanmean(overlap.values())
        row["mean_vs"] = nanmean(similarity.values())
        rows.append(row)
        if save_segmentations:
            for tag, segmentation, volume in zip(("real", "synthetic"), segmentations, volumes, strict=True):
                write_volume(volume.with_array(segmentation.astype(np.uint16)),
                             out / "segmentations" / f"{subject}_{tag}.nii.gz")

    seen = dict(sorted(seen.items()))
    class_columns = [column(kind, name) for kind in ("dice", "vs") for name in seen.values()]
    csv_name, summary_name = result_files(protocol)
    write_csv(out / csv_name, rows, ["subject", *class_columns, "mean_dice", "mean_vs"])
    summary: dict[str, Any] = {
        "protocol": protocol,
        "description": "one fixed segmenter on real and on synthetic volumes; Dice and volumetric similarity "
                       "between its two outputs, per class, and their mean over classes per subject",
        "segmenter": getattr(segmenter, "name", type(segmenter).__name__),
        "segmenter_repr": repr(segmenter),
        "normalised_input": do_normalise,
        "masked": masks is not None,
        "excluded": exclude is not None,
        "labels": {str(k): n for k, n in seen.items()},
        "per_class": {c: summarise(r.get(c, math.nan) for r in rows) for c in class_columns},
        "mean_dice": summarise(r["mean_dice"] for r in rows),
        "mean_vs": summarise(r["mean_vs"] for r in rows),
        "per_subject": {r["subject"]: {k: v for k, v in r.items() if k != "subject"} for r in rows},
        "n_subjects": len(rows),
        "subjects": subjects,
        "unpaired_subjects": sorted(set(real) ^ set(synthetic)),
        "seconds": round(time.perf_counter() - started, 3),
        "folder": str(out.resolve()),
        "csv": csv_name,
    }
    write_json(out / summary_name, summary)
    return summary


def tissue_order_from_maps(images: Mapping[str, Path], tissue: Mapping[str, Path]) -> tuple[int, int, int] | None:
    """CSF/GM/WM order (darkest first) measured on the first real image that has a tissue map (phantom cohorts)."""
    for subject in sorted(set(images) & set(tissue)):
        image = read_image(images[subject]).array
        labels = read_labels(tissue[subject])
        means = {c: float(image[labels == c].mean()) for c in TISSUE_LABELS if np.any(labels == c)}
        if len(means) == len(TISSUE_LABELS):
            return tuple(sorted(means, key=means.__getitem__))  # type: ignore[return-value]
    return None
