"""Downstream ("synthetic-to-real") evaluation: does a synthetic volume work where the real one would?

Two protocols, as in the seed paper (Ha et al., §3 "Synthetic-to-real applicability"; seed-reference §6.3):

- **Protocol 1** (labels available), :func:`protocol1`: train a segmenter on *synthetic* images with the *real*
  labels and test its Dice on *real* images; the upper bound is the same segmenter trained on the real images.
  The seed trains a MONAI UNet on the synthetic FLAIR of the fold-0 test subjects and tests on the real FLAIR
  of the other 75 %, reporting whole-tumour Dice (0.880 vs 0.898 upper bound); :func:`protocol1_from_run` sets
  up exactly that split from a run folder.
- **Protocol 2** (no labels), :func:`protocol2`: run one fixed segmenter on the real and on the synthetic
  volume and score the agreement of its two outputs, per class: Dice and volumetric similarity (VS). The seed
  does this with TotalSegmentator on CT; HiFi-Syn does it with FSL FAST tissue classes (GM/WM/CSF Dice and VS).
  The segmenters live in :mod:`volsynth.evaluation.segmenters`.

Conventions: volumes are ``(x, y, z)`` arrays; label maps are integers with 0 = background. Dice of a class that
is empty in both maps is undefined: it is NaN in Protocol 2 (the class is skipped in per-subject means, as
MONAI's ``ignore_empty``) and 1.0 in Protocol 1 (the seed's notebook sets NaN → 1: a tumour-free case
predicted tumour-free is a perfect result). Standard deviations are sample std (ddof = 1), as in
``volsynth evaluate``'s summary. All files are written atomically.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from volsynth.evaluation.segmenters import Segmenter
from volsynth.utils import atomic_write_text

VolumeInput = str | os.PathLike[str] | np.ndarray
"""A volume given as a file path (read with SimpleITK) or as an ``(x, y, z)`` array (spacing 1 mm)."""

PROTOCOL1_CSV = "downstream_protocol1.csv"
PROTOCOL1_SUMMARY = "downstream_protocol1_summary.json"
PROTOCOL2_CSV = "downstream_protocol2.csv"
PROTOCOL2_SUMMARY = "downstream_protocol2_summary.json"


# --------------------------------------------------------------------------------------------------------------
# overlap measures


def _check_pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(a)
    b = np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"label maps differ in shape: {a.shape} vs {b.shape}")
    return a, b


def dice(a: np.ndarray, b: np.ndarray, labels: Iterable[int], *, empty: float = math.nan) -> dict[int, float]:
    """Per-label Dice ``2|A∩B| / (|A| + |B|)`` between two label maps of equal shape.

    Args:
        a, b: integer label maps (any shape, equal).
        labels: the label values to score.
        empty: value when the label is absent from both maps (NaN: undefined, skipped by nan-means, like MONAI's
            ``ignore_empty=True``; 1.0: the seed's "NaN → 1"). A label present in only one map scores 0.

    Returns:
        label → Dice in [0, 1] (or ``empty``).
    """
    a, b = _check_pair(a, b)
    out: dict[int, float] = {}
    for label in labels:
        in_a = a == label
        in_b = b == label
        total = int(in_a.sum()) + int(in_b.sum())
        out[int(label)] = empty if total == 0 else 2.0 * int(np.logical_and(in_a, in_b).sum()) / total
    return out


def volumetric_similarity(a: np.ndarray, b: np.ndarray, labels: Iterable[int], *,
                          empty: float = math.nan) -> dict[int, float]:
    """Per-label volumetric similarity ``1 − |Va − Vb| / (Va + Vb)`` (voxel counts; both maps on one grid).

    VS compares only the sizes of the two segmentations, not their overlap (Taha & Hanbury 2015, used by
    HiFi-Syn next to Dice). ``empty`` is returned when the label is absent from both maps.
    """
    a, b = _check_pair(a, b)
    out: dict[int, float] = {}
    for label in labels:
        va = int((a == label).sum())
        vb = int((b == label).sum())
        out[int(label)] = empty if va + vb == 0 else 1.0 - abs(va - vb) / (va + vb)
    return out


def summarise(values: Iterable[float]) -> dict[str, float | int | None]:
    """``{"mean", "std", "n"}`` over the finite values, as ``volsynth evaluate``'s summary.json: sample std
    (ddof = 1, as papers report), None when n < 2; mean None when n = 0."""
    arr = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    return {"mean": float(arr.mean()) if arr.size else None,
            "std": float(arr.std(ddof=1)) if arr.size > 1 else None, "n": int(arr.size)}


def _nanmean(values: Iterable[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan


# --------------------------------------------------------------------------------------------------------------
# reading volumes, manifests and runs


@dataclass
class _Loaded:
    array: np.ndarray  # (x, y, z)
    spacing: tuple[float, ...]
    origin: tuple[float, ...] | None
    direction: tuple[float, ...] | None


def _load(source: VolumeInput, *, dtype: Any = np.float32) -> _Loaded:
    """Read a volume (path or array) into ``(x, y, z)`` order with its geometry."""
    if isinstance(source, np.ndarray):
        if source.ndim != 3:
            raise ValueError(f"expected a 3D (x, y, z) array, got shape {source.shape}")
        return _Loaded(np.asarray(source, dtype=dtype), (1.0, 1.0, 1.0), None, None)
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"volume not found: {path}")
    try:  # the toolkit's reader, when present, knows about every format the toolkit writes
        from volsynth.data.io import read_volume  # type: ignore[import-not-found]
    except ImportError:
        read_volume = None
    if read_volume is not None:
        vol = read_volume(path)
        return _Loaded(np.asarray(vol.array, dtype=dtype), tuple(float(s) for s in vol.spacing),
                       tuple(float(o) for o in vol.origin), tuple(float(d) for d in np.ravel(vol.direction)))
    import SimpleITK as sitk

    img = sitk.ReadImage(str(path))
    if img.GetDimension() != 3 or img.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(f"{path}: expected a 3D single-channel volume")
    array = sitk.GetArrayFromImage(img).transpose(2, 1, 0)  # SimpleITK gives (z, y, x)
    return _Loaded(np.asarray(array, dtype=dtype), img.GetSpacing(), img.GetOrigin(), img.GetDirection())


def _load_labels(source: VolumeInput) -> np.ndarray:
    arr = _load(source, dtype=np.float64).array
    return np.rint(arr).astype(np.int64)


def minmax(array: np.ndarray) -> np.ndarray:
    """Min-max scale to [0, 1] as float32 (a constant volume maps to zeros)."""
    array = np.asarray(array, dtype=np.float32)
    lo, hi = float(array.min()), float(array.max())
    if hi <= lo:
        return np.zeros_like(array)
    return (array - lo) / (hi - lo)


def read_run_config(run: str | os.PathLike[str]) -> dict[str, Any]:
    """The run's resolved ``config.yaml`` as a plain mapping (empty when absent)."""
    import yaml

    path = Path(run) / "config.yaml"
    if not path.is_file():
        return {}
    data = yaml.safe_load(path.read_text())
    return data if isinstance(data, dict) else {}


def resolve_manifest(run: str | os.PathLike[str], config: Mapping[str, Any] | None = None) -> Path | None:
    """Locate the manifest named by the run's ``data.manifest`` (absolute, or relative to the run or the CWD)."""
    run = Path(run)
    config = read_run_config(run) if config is None else config
    name = (config.get("data") or {}).get("manifest") if isinstance(config.get("data"), Mapping) else None
    if not name:
        return None
    candidates = [Path(name)] if Path(name).is_absolute() else [run / name, Path.cwd() / name,
                                                                 run.parent / name]
    return next((c.resolve() for c in candidates if c.is_file()), None)


def find_prediction(run: str | os.PathLike[str], subject: str) -> Path | None:
    """``RUN/predictions/<subject>.<ext>`` (NIfTI preferred), or None."""
    folder = Path(run) / "predictions"
    for ext in (".nii.gz", ".nii", ".mha", ".nrrd"):
        path = folder / f"{subject}{ext}"
        if path.is_file():
            return path
    return None


@dataclass
class RunInputs:
    """What the downstream protocols need from one run folder (every mapping is subject → path)."""

    run: Path
    target: str  # target modality name in the manifest
    synthetic: dict[str, Path]  # test subjects with a prediction
    real: dict[str, Path]  # their real target volumes
    masks: dict[str, Path] = field(default_factory=dict)
    labels: dict[str, Path] = field(default_factory=dict)  # "label" of every subject that has one
    tissue: dict[str, Path] = field(default_factory=dict)
    real_other: dict[str, Path] = field(default_factory=dict)  # real target of the non-test subjects
    test_subjects: list[str] = field(default_factory=list)
    other_subjects: list[str] = field(default_factory=list)


def load_run_inputs(run: str | os.PathLike[str]) -> RunInputs:
    """Collect real/synthetic/mask/label paths of a ``volsynth train`` run (config, splits, manifest, predictions).

    Test subjects come from ``splits.json`` (``test``; without it, every subject with a prediction); every
    other manifest subject is "other" (the seed's Protocol 1 tests on them). Raises ``FileNotFoundError`` with
    the reason when the run has no manifest or no predictions.
    """
    from volsynth.data.manifest import load_manifest

    run = Path(run)
    config = read_run_config(run)
    manifest_file = resolve_manifest(run, config)
    if manifest_file is None:
        raise FileNotFoundError(f"{run}: cannot find the manifest named in config.yaml (data.manifest)")
    manifest = load_manifest(manifest_file)
    target = str((config.get("data") or {}).get("target") or manifest.target or "target")
    splits_file = run / "splits.json"
    splits = json.loads(splits_file.read_text()) if splits_file.is_file() else {}
    test = set(splits["test"]) if "test" in splits else \
        {s.subject for s in manifest.subjects if find_prediction(run, s.subject) is not None}
    inputs = RunInputs(run=run, target=target, synthetic={}, real={})
    for subject in manifest.subjects:
        real = subject.image(target)
        if real is None:
            continue
        name = subject.subject
        if subject.mask is not None:
            inputs.masks[name] = Path(subject.mask)
        if subject.label is not None:
            inputs.labels[name] = Path(subject.label)
        if isinstance(subject.extra.get("tissue"), Path):
            inputs.tissue[name] = subject.extra["tissue"]
        if name in test:
            pred = find_prediction(run, name)
            if pred is not None:
                inputs.synthetic[name] = pred
                inputs.real[name] = Path(real)
        else:
            inputs.real_other[name] = Path(real)
    inputs.test_subjects = sorted(inputs.synthetic)
    inputs.other_subjects = sorted(inputs.real_other)
    if not inputs.synthetic:
        raise FileNotFoundError(f"{run}: no predictions for the test subjects in {run / 'predictions'}; "
                                f"run `volsynth predict` first")
    return inputs


# --------------------------------------------------------------------------------------------------------------
# writing


def _slug(text: str) -> str:
    return re.sub(r"[^0-9A-Za-z]+", "_", str(text)).strip("_").lower() or "x"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.6g}"
    return str(value)


def _write_csv(path: Path, rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_fmt(row.get(c, math.nan)) for c in columns])
    atomic_write_text(path, buf.getvalue())


def _json_clean(obj: Any) -> Any:
    """NaN/inf → None (strict JSON), Paths → str, numpy scalars → python."""
    if isinstance(obj, Mapping):
        return {str(k): _json_clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_clean(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, os.PathLike):
        return str(obj)
    return obj


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    atomic_write_text(path, json.dumps(_json_clean(data), indent=2) + "\n")


def _label_names(labels: Sequence[int] | Mapping[int, str] | None) -> dict[int, str]:
    if labels is None:
        return {}
    if isinstance(labels, Mapping):
        return {int(k): str(v) for k, v in labels.items()}
    return {int(v): str(int(v)) for v in labels}


# --------------------------------------------------------------------------------------------------------------
# Protocol 2: one fixed segmenter on real and synthetic


def protocol2(real: Mapping[str, VolumeInput], synthetic: Mapping[str, VolumeInput], *, segmenter: Segmenter,
              out_dir: str | os.PathLike[str], masks: Mapping[str, VolumeInput] | None = None,
              exclude: Mapping[str, VolumeInput] | None = None,
              labels: Sequence[int] | Mapping[int, str] | None = None, normalise: bool | None = None,
              save_segmentations: bool = False) -> dict[str, Any]:
    """Agreement of one segmenter's output on real vs synthetic volumes: per-class Dice and VS per subject.

    Args:
        real, synthetic: subject → volume; subjects in both are scored (same grid required).
        segmenter: any :class:`~volsynth.evaluation.segmenters.Segmenter` (e.g. ``GMMTissueSegmenter("t1")``).
        out_dir: where ``downstream_protocol2.csv`` and ``downstream_protocol2_summary.json`` go.
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

    Returns:
        The summary (also written as JSON): ``dice`` / ``vs`` = mean ± std over subjects of the per-subject mean
        over classes, ``per_class`` = ``{"dice_<name>": {...}, "vs_<name>": {...}}``, ``subjects``, settings.
        A class absent from both maps of a subject is NaN there and left out of the means.
    """
    out = Path(out_dir)
    subjects = sorted(set(real) & set(synthetic))
    if not subjects:
        raise ValueError("protocol2: no subject has both a real and a synthetic volume")
    missing = sorted(set(real) ^ set(synthetic))
    names = _label_names(labels) or dict(getattr(segmenter, "labels", {}) or {})
    do_normalise = bool(getattr(segmenter, "normalise_input", True)) if normalise is None else bool(normalise)

    rows: list[dict[str, Any]] = []
    seen: dict[int, str] = dict(names)
    started = time.perf_counter()
    for subject in subjects:
        r = _load(real[subject])
        s = _load(synthetic[subject])
        if r.array.shape != s.array.shape:
            raise ValueError(f"{subject}: real {r.array.shape} and synthetic {s.array.shape} volumes differ in shape;"
                             f" predictions must be on the native grid")
        mask = None
        if masks is not None and subject in masks:
            mask = _load(masks[subject], dtype=np.float32).array > 0.5
            if mask.shape != r.array.shape:
                raise ValueError(f"{subject}: mask shape {mask.shape} differs from the volume {r.array.shape}")
        excluded = None
        if exclude is not None and subject in exclude:
            excluded = _load_labels(exclude[subject]) != 0
            if excluded.shape != r.array.shape:
                raise ValueError(f"{subject}: exclusion map {excluded.shape} differs from the volume {r.array.shape}")
            if mask is not None:
                mask = mask & ~excluded
        segs = []
        for vol in (r, s):
            image = minmax(vol.array) if do_normalise else vol.array
            seg = np.asarray(segmenter.segment(image, mask=mask, spacing=vol.spacing, origin=vol.origin,
                                               direction=vol.direction))
            if seg.shape != image.shape:
                raise ValueError(f"{subject}: segmenter '{segmenter.name}' returned shape {seg.shape} for "
                                 f"{image.shape}")
            seg = seg.astype(np.int64)
            if excluded is not None:
                seg[excluded] = 0
            segs.append(seg)
        if names:
            present = list(names)
        else:  # score what the tool found (e.g. TotalSegmentator structures present in either image)
            present = sorted((set(np.unique(segs[0]).tolist()) | set(np.unique(segs[1]).tolist())) - {0})
            for v in present:
                seen.setdefault(int(v), str(v))
        d = dice(segs[0], segs[1], present)
        v = volumetric_similarity(segs[0], segs[1], present)
        row: dict[str, Any] = {"subject": subject}
        for label in present:
            row[f"dice_{_slug(seen[label])}"] = d[label]
            row[f"vs_{_slug(seen[label])}"] = v[label]
        row["dice"] = _nanmean(d.values())
        row["vs"] = _nanmean(v.values())
        rows.append(row)
        if save_segmentations:
            for tag, seg, vol in (("real", segs[0], r), ("synthetic", segs[1], s)):
                _write_label_map(out / "segmentations" / f"{subject}_{tag}.nii.gz", seg, vol)

    class_cols = [f"{kind}_{_slug(name)}" for name in seen.values() for kind in ("dice", "vs")]
    columns = ["subject", *class_cols, "dice", "vs"]
    _write_csv(out / PROTOCOL2_CSV, rows, columns)
    summary: dict[str, Any] = {
        "protocol": 2,
        "description": "one fixed segmenter on real and on synthetic volumes; Dice and volumetric similarity "
                       "between its two outputs, per class, mean over classes per subject",
        "segmenter": getattr(segmenter, "name", type(segmenter).__name__),
        "segmenter_repr": repr(segmenter),
        "normalised_input": do_normalise,
        "masked": masks is not None,
        "excluded": exclude is not None,
        "labels": {str(k): n for k, n in seen.items()},
        "dice": summarise(r["dice"] for r in rows),
        "vs": summarise(r["vs"] for r in rows),
        "per_class": {c: summarise(r.get(c, math.nan) for r in rows) for c in class_cols},
        "n_subjects": len(rows),
        "subjects": subjects,
        "unpaired_subjects": missing,
        "seconds": round(time.perf_counter() - started, 3),
        "csv": PROTOCOL2_CSV,
    }
    _write_json(out / PROTOCOL2_SUMMARY, summary)
    return summary


def _write_label_map(path: Path, labels: np.ndarray, like: _Loaded) -> None:
    import SimpleITK as sitk

    from volsynth.utils import atomic_path

    img = sitk.GetImageFromArray(np.ascontiguousarray(labels.astype(np.uint16).transpose(2, 1, 0)))
    img.SetSpacing(tuple(float(s) for s in like.spacing))
    if like.origin is not None:
        img.SetOrigin(like.origin)
    if like.direction is not None:
        img.SetDirection(like.direction)
    with atomic_path(path) as tmp:
        sitk.WriteImage(img, str(tmp))


def protocol2_from_run(run: str | os.PathLike[str], *, segmenter: Segmenter, out_dir: str | os.PathLike[str] | None
                       = None, use_masks: bool = True, **options: Any) -> dict[str, Any]:
    """:func:`protocol2` on a run's test predictions vs their real targets; output in ``RUN/downstream``."""
    inputs = load_run_inputs(run)
    masks = {s: p for s, p in inputs.masks.items() if s in inputs.synthetic} if use_masks and inputs.masks else None
    return protocol2(inputs.real, inputs.synthetic, segmenter=segmenter, masks=masks,
                     out_dir=out_dir if out_dir is not None else Path(run) / "downstream", **options)


# --------------------------------------------------------------------------------------------------------------
# Protocol 1: train on synthetic with real labels, test on real


@dataclass
class _SegData:
    """Volumes ready for training: min-max scaled images and class-index maps, padded to the patch size."""

    images: list[np.ndarray]
    classes: list[np.ndarray]  # 0 = background, 1..K = label_values order
    foreground: list[np.ndarray]  # flat indices of non-background voxels (for foreground-centred patches)


def _pad_to(array: np.ndarray, size: Sequence[int]) -> np.ndarray:
    pads = [(0, max(0, int(p) - s)) for s, p in zip(array.shape, size, strict=True)]
    return np.pad(array, pads) if any(p[1] for p in pads) else array


def _to_classes(label_map: np.ndarray, values: Sequence[int]) -> np.ndarray:
    # uint8 keeps a training set in memory at 5 bytes per voxel (float32 image + class index)
    if len(values) > 255:
        raise ValueError(f"at most 255 label values, got {len(values)}")
    out = np.zeros(label_map.shape, dtype=np.uint8)
    for index, value in enumerate(values, start=1):
        out[label_map == value] = index
    return out


def _prepare(images: Sequence[VolumeInput], labels: Sequence[VolumeInput], values: Sequence[int],
             patch: Sequence[int]) -> _SegData:
    data = _SegData([], [], [])
    for image_src, label_src in zip(images, labels, strict=True):
        image = minmax(_load(image_src).array)
        classes = _to_classes(_load_labels(label_src), values)
        if image.shape != classes.shape:
            raise ValueError(f"image {image.shape} and label {classes.shape} differ in shape")
        image, classes = _pad_to(image, patch), _pad_to(classes, patch)
        data.images.append(image)
        data.classes.append(classes)
        data.foreground.append(np.flatnonzero(classes))
    return data


def _sample_batch(data: _SegData, patch: Sequence[int], batch_size: int, rng: np.random.Generator,
                  foreground_probability: float) -> tuple[np.ndarray, np.ndarray]:
    """Random patches: half centred on a labelled voxel (labels are sparse), random flips on the 3 axes."""
    xs, ys = [], []
    for _ in range(batch_size):
        i = int(rng.integers(len(data.images)))
        image, classes, fg = data.images[i], data.classes[i], data.foreground[i]
        shape = image.shape
        if fg.size and rng.random() < foreground_probability:
            centre = np.unravel_index(int(fg[rng.integers(fg.size)]), shape)
            start = [int(np.clip(c - p // 2, 0, s - p)) for c, p, s in zip(centre, patch, shape, strict=True)]
        else:
            start = [int(rng.integers(s - p + 1)) for p, s in zip(patch, shape, strict=True)]
        sl = tuple(slice(a, a + p) for a, p in zip(start, patch, strict=True))
        x, y = image[sl], classes[sl]
        for axis in range(3):  # the seed's RandFlip on each axis, p = 0.5
            if rng.random() < 0.5:
                x, y = np.flip(x, axis), np.flip(y, axis)
        xs.append(np.ascontiguousarray(x))
        ys.append(np.ascontiguousarray(y))
    return np.stack(xs)[:, None], np.stack(ys)[:, None].astype(np.int64)


@dataclass
class _Settings:
    patch_size: tuple[int, int, int]
    iterations: int
    batch_size: int
    lr: float
    weight_decay: float
    channels: tuple[int, ...]
    num_res_units: int
    overlap: float
    sw_batch_size: int
    foreground_probability: float
    seed: int
    device: str


def _build_unet(n_classes: int, s: _Settings) -> Any:
    from monai.networks.nets import UNet

    return UNet(spatial_dims=3, in_channels=1, out_channels=n_classes + 1, channels=s.channels,
                strides=(2,) * (len(s.channels) - 1), num_res_units=s.num_res_units)


def _train_segmenter(data: _SegData, n_classes: int, s: _Settings,
                     log: Callable[[str], None] | None) -> tuple[Any, list[float]]:
    import torch
    from monai.losses import DiceCELoss

    # Same seed → same initial weights and the same patch/flip sequence for the synthetic-trained model and the
    # upper bound (both sets share labels and grids), so the two differ only by the training images. fork_rng
    # restores the caller's global torch RNG afterwards.
    rng = np.random.default_rng(s.seed)
    device = torch.device(s.device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(s.seed)
        model = _build_unet(n_classes, s).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    losses: list[float] = []
    model.train()
    for it in range(s.iterations):
        x, y = _sample_batch(data, s.patch_size, s.batch_size, rng, s.foreground_probability)
        xt = torch.from_numpy(x).to(device)
        yt = torch.from_numpy(y).to(device)
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(xt), yt)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if log is not None and (it + 1) % max(1, s.iterations // 10) == 0:
            log(f"iteration {it + 1}/{s.iterations} loss {np.mean(losses[-10:]):.4f}")
    model.eval()
    return model, losses


def _segment_volume(model: Any, image: np.ndarray, values: Sequence[int], s: _Settings) -> np.ndarray:
    """Sliding-window argmax of ``model`` on a min-max scaled ``(x, y, z)`` volume → label values."""
    import torch
    from monai.inferers import sliding_window_inference

    x = torch.from_numpy(np.ascontiguousarray(minmax(image)))[None, None].to(s.device)
    with torch.no_grad():
        logits = sliding_window_inference(x, roi_size=s.patch_size, sw_batch_size=s.sw_batch_size,
                                          predictor=model, overlap=s.overlap)
    index = logits.argmax(dim=1)[0].cpu().numpy()
    lut = np.asarray([0, *values], dtype=np.int64)
    return lut[index]


def _evaluate(model: Any, images: Mapping[str, VolumeInput], labels: Mapping[str, VolumeInput],
              names: Mapping[int, str], regions: Mapping[str, Sequence[int]], s: _Settings,
              tag: str) -> list[dict[str, Any]]:
    rows = []
    values = list(names)
    for subject in sorted(images):
        pred = _segment_volume(model, _load(images[subject]).array, values, s)
        truth = _load_labels(labels[subject])
        truth = np.where(np.isin(truth, values), truth, 0)  # labels the model was not asked for are background
        row: dict[str, Any] = {"model": tag, "subject": subject}
        for label, d in dice(pred, truth, values, empty=1.0).items():
            row[f"dice_{_slug(names[label])}"] = d
        for region, members in regions.items():
            row[f"dice_{_slug(region)}"] = dice(np.isin(pred, members), np.isin(truth, members), [True],
                                                empty=1.0)[True]
        primary = [f"dice_{_slug(r)}" for r in regions] or [f"dice_{_slug(names[v])}" for v in values]
        row["dice"] = _nanmean(row[c] for c in primary)
        rows.append(row)
    return rows


def protocol1(train_real: Mapping[str, VolumeInput] | None, train_synthetic: Mapping[str, VolumeInput],
              train_labels: Mapping[str, VolumeInput], test_real: Mapping[str, VolumeInput],
              test_labels: Mapping[str, VolumeInput], *, out_dir: str | os.PathLike[str],
              label_values: Sequence[int] | Mapping[int, str] | None = None,
              regions: Mapping[str, Sequence[int]] | None = None,
              patch_size: Sequence[int] = (32, 32, 32), iterations: int = 500, batch_size: int = 2,
              lr: float = 1e-3, weight_decay: float = 1e-5, channels: Sequence[int] = (8, 16, 32, 64),
              num_res_units: int = 1, overlap: float = 0.5, sw_batch_size: int = 2,
              foreground_probability: float = 0.5, seed: int = 0, device: str = "cpu",
              save_models: bool = False, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Synthetic-to-real segmentation (the seed paper's Protocol 1) and its real-to-real upper bound.

    A MONAI 3D UNet (softmax over background + ``label_values``, DiceCE loss, AdamW) is trained on random
    patches (``foreground_probability`` of them centred on a labelled voxel; random flips on the three axes, as
    the seed) of the *synthetic* images with the *real* labels, then segments the *real* test images by sliding
    window (overlap 0.5, as the seed); Dice per class against the real labels. With ``train_real`` the same
    network, seed and patch sequence is also trained on the real images (the upper bound). Every image is
    min-max scaled to [0, 1] first (synthetic MR is on [0, 1], real MR in scanner units).

    The seed's notebook trains 500 epochs at 224×224×144 on a GPU; the defaults here are a CPU-sized version
    (32³ patches, 500 iterations, channels 8–64): raise ``iterations``/``channels`` for a faithful run. The
    training volumes are held in memory (about 5 bytes per voxel); test volumes are read one at a time.

    Args:
        train_real: subject → real training image (None: skip the upper bound).
        train_synthetic: subject → synthetic training image (same subjects and grids as ``train_labels``).
        train_labels, test_labels: subject → integer label map.
        test_real: subject → real test image.
        out_dir: where ``downstream_protocol1.csv`` / ``downstream_protocol1_summary.json`` (and, with
            ``save_models``, ``protocol1_{synthetic,real}.pt``) go.
        label_values: classes to learn (values or value → name); default every non-zero value in the training
            labels. Other values are background.
        regions: named unions of label values scored on the prediction, e.g. ``{"WT": [1, 2, 4]}`` for BraTS
            whole tumour (the only Dice the seed reports). When given, the headline ``dice`` is their mean;
            otherwise the mean over ``label_values``.
        patch_size: training patch and sliding-window ROI, voxels.
        iterations, batch_size, lr, weight_decay, channels, num_res_units: training / network size.
        overlap, sw_batch_size: sliding-window inference.
        foreground_probability: chance a training patch is centred on a labelled voxel.
        seed: seeds torch (weights) and the patch sampler; two runs with one seed give the same numbers.
        device: torch device string.
        log: optional callback for progress lines.

    Returns:
        The summary (also written as JSON): ``synthetic`` and ``upper_bound`` (or None) each map ``dice`` and
        ``dice_<class>`` to ``{"mean", "std", "n"}`` over test subjects; Dice of a class empty in both maps is 1.
    """
    import torch

    train_subjects = sorted(train_synthetic)
    if not train_subjects:
        raise ValueError("protocol1: no synthetic training volumes")
    missing = [s for s in train_subjects if s not in train_labels]
    if missing:
        raise ValueError(f"protocol1: no label for training subjects {missing[:5]}")
    test_subjects = sorted(test_real)
    missing = [s for s in test_subjects if s not in test_labels]
    if missing:
        raise ValueError(f"protocol1: no label for test subjects {missing[:5]}")
    if not test_subjects:
        raise ValueError("protocol1: no real test volumes")
    if train_real is not None:
        missing = [s for s in train_subjects if s not in train_real]
        if missing:
            raise ValueError(f"protocol1: no real training image for {missing[:5]} (needed for the upper bound)")

    names = _label_names(label_values)
    if not names:
        found: set[int] = set()
        for subject in train_subjects:
            found |= set(np.unique(_load_labels(train_labels[subject])).tolist())
        names = {v: str(v) for v in sorted(found - {0})}
    if not names:
        raise ValueError("protocol1: the training labels contain no foreground")
    regions = {str(k): [int(v) for v in members] for k, members in (regions or {}).items()}
    patch = tuple(int(p) for p in patch_size)
    if len(patch) != 3:
        raise ValueError(f"patch_size must have 3 values, got {patch_size}")
    divisor = 2 ** (len(channels) - 1)
    if any(p % divisor for p in patch):
        raise ValueError(f"patch_size {patch} must be divisible by {divisor} (2^(levels-1)) for the UNet")
    s = _Settings(patch, int(iterations), int(batch_size), float(lr), float(weight_decay),
                  tuple(int(c) for c in channels), int(num_res_units), float(overlap), int(sw_batch_size),
                  float(foreground_probability), int(seed), str(device))
    values = list(names)
    out = Path(out_dir)
    started = time.perf_counter()

    label_list = [train_labels[k] for k in train_subjects]
    trainings: list[tuple[str, Mapping[str, VolumeInput]]] = [("synthetic", train_synthetic)]
    if train_real is not None:
        trainings.append(("real", train_real))
    rows: list[dict[str, Any]] = []
    final_loss: dict[str, float] = {}
    for tag, images in trainings:
        if log is not None:
            log(f"protocol 1: training on {tag} images ({len(train_subjects)} subjects)")
        data = _prepare([images[k] for k in train_subjects], label_list, values, patch)
        model, losses = _train_segmenter(data, len(values), s, log)
        final_loss[tag] = float(np.mean(losses[-10:])) if losses else math.nan
        rows.extend(_evaluate(model, test_real, test_labels, names, regions, s, tag))
        if save_models:
            from volsynth.utils import atomic_path

            with atomic_path(out / f"protocol1_{tag}.pt") as tmp:
                torch.save(model.state_dict(), tmp)
        del model, data

    class_cols = [f"dice_{_slug(names[v])}" for v in values] + [f"dice_{_slug(r)}" for r in regions]
    columns = ["model", "subject", *class_cols, "dice"]
    _write_csv(out / PROTOCOL1_CSV, rows, columns)

    def stats(tag: str) -> dict[str, Any] | None:
        sel = [r for r in rows if r["model"] == tag]
        if not sel:
            return None
        return {c: summarise(r[c] for r in sel) for c in ["dice", *class_cols]}

    summary: dict[str, Any] = {
        "protocol": 1,
        "description": "segmenter trained on synthetic images with real labels, Dice on real test images; "
                       "upper bound = same training on the real images",
        "labels": {str(v): n for v, n in names.items()},
        "regions": regions,
        "headline": list(regions) or [names[v] for v in values],
        "empty_dice": 1.0,
        "synthetic": stats("synthetic"),
        "upper_bound": stats("real"),
        "final_train_loss": final_loss,
        "subjects": {"train": train_subjects, "test": test_subjects},
        "settings": {**s.__dict__, "network": "monai.networks.nets.UNet", "loss": "DiceCELoss(softmax)",
                     "optimizer": "AdamW", "normalisation": "min-max per volume"},
        "seconds": round(time.perf_counter() - started, 3),
        "csv": PROTOCOL1_CSV,
    }
    _write_json(out / PROTOCOL1_SUMMARY, summary)
    return summary


def protocol1_from_run(run: str | os.PathLike[str], *, label_field: str = "label", upper_bound: bool = True,
                       out_dir: str | os.PathLike[str] | None = None, max_test_subjects: int | None = None,
                       **options: Any) -> dict[str, Any]:
    """The seed's split: train on the run's synthetic test-set volumes with their real labels, test on the real
    volumes of every *other* manifest subject (the seed: fold-0 test cases → the other 75 %).

    Args:
        run: a ``volsynth train`` run with ``predictions/``.
        label_field: manifest key of the label map (``label``: BraTS-style segmentation; ``tissue``: phantom).
        upper_bound: also train on the real images of the same subjects.
        out_dir: default ``RUN/downstream``.
        max_test_subjects: cap on the real test subjects (first ones by name) to keep CPU runs short.
        options: passed to :func:`protocol1` (``label_values``, ``regions``, ``iterations``, ...).
    """
    inputs = load_run_inputs(run)
    labels = {"label": inputs.labels, "tissue": inputs.tissue}.get(label_field)
    if labels is None:
        raise ValueError(f"label_field must be 'label' or 'tissue', got {label_field!r}")
    train = [s for s in inputs.test_subjects if s in labels]
    test = [s for s in inputs.other_subjects if s in labels][:max_test_subjects]
    if not train or not test:
        raise ValueError(f"{run}: protocol 1 needs '{label_field}' maps for the test subjects (training) and the "
                         f"other subjects (testing); found {len(train)} and {len(test)}")
    return protocol1(
        {s: inputs.real[s] for s in train} if upper_bound else None,
        {s: inputs.synthetic[s] for s in train},
        {s: labels[s] for s in train},
        {s: inputs.real_other[s] for s in test},
        {s: labels[s] for s in test},
        out_dir=out_dir if out_dir is not None else Path(run) / "downstream",
        **options,
    )


# --------------------------------------------------------------------------------------------------------------
# one entry point for the CLI

PROTOCOLS: dict[str, str] = {
    "tissue": "Protocol 2 with the built-in GMM tissue segmenter (CSF/GM/WM Dice and VS, real vs synthetic)",
    "segment": "Protocol 1: UNet trained on synthetic images with real labels, tested on real (+ upper bound)",
    "external": "Protocol 2 with an external command (pass command=..., e.g. TotalSegmentator)",
}


def _infer_tissue_order(images: Mapping[str, Path], tissue: Mapping[str, Path]) -> tuple[int, int, int] | None:
    """CSF/GM/WM order by mean intensity of the first real target that has a tissue map (phantom cohorts)."""
    from volsynth.evaluation.segmenters import TISSUE_LABELS

    for subject in sorted(set(images) & set(tissue)):
        image = _load(images[subject]).array
        labels = _load_labels(tissue[subject])
        means = {c: float(image[labels == c].mean()) for c in TISSUE_LABELS if np.any(labels == c)}
        if len(means) == len(TISSUE_LABELS):
            return tuple(sorted(means, key=means.__getitem__))  # type: ignore[return-value]
    return None


def run_downstream(run: str | os.PathLike[str], *, protocol: str = "tissue",
                   out_dir: str | os.PathLike[str] | None = None, iterations: int = 200,
                   contrast: str | None = None, command: str | None = None,
                   log: Callable[[str], None] | None = None, **options: Any) -> dict[str, Any]:
    """Run a downstream protocol on a run folder (``volsynth downstream``); writes into ``RUN/downstream``.

    Args:
        run: a ``volsynth train`` run whose test subjects have ``predictions/``.
        protocol: ``tissue`` (Protocol 2, GMM tissue segmenter, brain masks from the manifest when present,
            tumour ``label`` voxels left out),
            ``segment`` (Protocol 1 on the manifest's ``label`` maps, else its ``tissue`` maps; with ``label``
            maps the headline is whole-foreground Dice, the seed's whole tumour), or ``external`` (Protocol 2
            with ``command``, a template with ``{input}`` and ``{output}``).
        out_dir: default ``RUN/downstream``.
        iterations: segmenter training iterations (``segment``).
        contrast: MR contrast of the target for ``tissue`` (t1/t1ce/t2/flair/pd); default the run's target
            modality name, else the order measured on the phantom's tissue maps.
        command: the external tool's command template (``external``).
        options: passed on to :func:`protocol1` / :func:`protocol2` / the segmenter.

    Returns:
        The protocol's summary (also written as JSON).
    """
    from volsynth.evaluation.segmenters import CONTRAST_ORDERS, ExternalSegmenter, GMMTissueSegmenter
    from volsynth.registry import suggest

    if protocol not in PROTOCOLS:
        raise ValueError(f"Unknown downstream protocol '{protocol}'.{suggest(protocol, list(PROTOCOLS))} "
                         f"Known: {', '.join(PROTOCOLS)}")
    out = Path(out_dir) if out_dir is not None else Path(run) / "downstream"
    inputs = load_run_inputs(run)
    if protocol == "segment":
        label_field = "label" if any(s in inputs.labels for s in inputs.test_subjects) else "tissue"
        if label_field == "label" and "regions" not in options:
            values: set[int] = set()
            for subject in inputs.test_subjects:
                if subject in inputs.labels:
                    values |= set(np.unique(_load_labels(inputs.labels[subject])).tolist())
            options["regions"] = {"whole": sorted(values - {0})}
        return protocol1_from_run(run, label_field=label_field, out_dir=out, iterations=iterations, log=log,
                                  **options)

    masks = {s: inputs.masks[s] for s in inputs.test_subjects if s in inputs.masks} or None
    if protocol == "external":
        if not command:
            raise ValueError("protocol 'external' needs command='TOOL ... {input} ... {output}'")
        seg_options = {k: options.pop(k) for k in ("name", "labels", "normalise_input", "timeout", "env")
                       if k in options}
        external = ExternalSegmenter(command, **seg_options)
        external.check_available()  # fail before reading any volume
        segmenter: Segmenter = external
    else:
        if contrast is None and inputs.target.lower() in CONTRAST_ORDERS:
            contrast = inputs.target.lower()
        order = None
        if contrast is None:
            order = _infer_tissue_order(inputs.real, inputs.tissue)
            if order is None:
                raise ValueError(f"Cannot tell the tissue contrast of target '{inputs.target}': pass contrast= one "
                                 f"of {', '.join(CONTRAST_ORDERS)}")
        seg_options = {k: options.pop(k) for k in ("smoothing_sigma", "max_fit_voxels", "background_threshold",
                                                   "random_state") if k in options}
        segmenter = GMMTissueSegmenter(contrast or "t1", order=order, **seg_options)
    if log is not None:
        log(f"protocol 2 with {segmenter!r} on {len(inputs.synthetic)} subjects")
    if protocol == "tissue" and "exclude" not in options:
        # Tissue classes are for normal tissue: lesion voxels (the BraTS-style label map) are left out.
        options["exclude"] = {s: inputs.labels[s] for s in inputs.test_subjects if s in inputs.labels} or None
    return protocol2(inputs.real, inputs.synthetic, segmenter=segmenter, masks=masks, out_dir=out, **options)
