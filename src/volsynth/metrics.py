"""Image-similarity metrics for 3D volumes: SSIM, PSNR, NMSE, MAE, each optionally restricted to a mask.

All functions are pure and take numpy arrays of any dimensionality (the toolkit passes ``(x, y, z)`` volumes);
they compute in float64 whatever the input dtype. ``synthetic`` is the prediction, ``target`` the reference.

Why not scikit-image / MONAI directly: scikit-image's SSIM and PSNR take no mask (ganslate's masked-array trick in
``ganslate/utils/metrics/val_test_metrics.py`` silently scores the whole image) and MONAI's regression metrics take none
either. SSIM is therefore written here with the same numerics as ``skimage.metrics.structural_similarity`` (uniform
window, sample covariance, K1 = 0.01, K2 = 0.03, border of ``(win_size - 1) // 2`` voxels excluded from the mean) so
that the SSIM map is available for masked means; the tests pin it to scikit-image to 1e-6.

Two profiles (:func:`compute_metrics`) fix the definitions:

- ``paper``: the seed study's evaluation (``evaluate_iqa.py``): whole volume, ``data_range = 1``; NMSE =
  MSE / Var(target). For MR the target AND the prediction are each min-max normalised per volume to [0, 1]
  first (``normalise="paper"``, :data:`NORMALISATIONS`); CT is put on [0, 1] with a fixed HU window. With a
  mask, the same metrics inside the mask are added as ``*_mask``.
- ``synthrad2023``: the SynthRAD2023 challenge scorer (``SynthRAD2023/metrics``
  ``functions/image_metrics.py`` at commit ``fe7e385``, "non-negative and masked SSIM fix"), inputs in HU.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
from scipy.ndimage import uniform_filter

from volsynth.registry import suggest

PROFILES: tuple[str, ...] = ("paper", "synthrad2023")
MODALITIES: tuple[str, ...] = ("mr", "ct")

# How MR volumes are brought to the [0, 1] scale of the paper profile (data_range 1), before any metric.
NORMALISATION_DEFINITIONS: dict[str, str] = {
    "paper": (
        "target and prediction each min-max normalised per volume to [0, 1] (the seed's evaluate_iqa.py, as "
        "in the paper); a constant prediction becomes all zeros (NOT IN PAPER: the seed would divide by zero)"
    ),
    "target": (
        "only the target min-max normalised per volume to [0, 1]; the prediction is scored as given (taken "
        "to be on [0, 1] already, as volsynth predict writes synthetic MR)"
    ),
    "none": "no normalisation: both volumes scored as given (already on the [0, 1] scale)",
}
NORMALISATIONS: tuple[str, ...] = tuple(NORMALISATION_DEFINITIONS)

# SynthRAD2023 fixed population range in HU (SynthRAD2023/metrics ``functions/image_metrics.py``); Ha et al. use
# the same CT window to put CT on [0, 1] (paper §3.1 "Intensity scaling"; their release's ``evaluate_iqa.py``
# clips GT to [-1024, 3000] and scales by (HU + 1024) / 4024).
CT_WINDOW_HU: tuple[float, float] = (-1024.0, 3000.0)
CT_WINDOW_WIDTH_HU: float = CT_WINDOW_HU[1] - CT_WINDOW_HU[0]  # 4024

# Human-readable versions of the definitions, written to summary.json: metric definitions changed
# mid-challenge in SynthRAD2023 (SynthRAD2023/metrics commit fe7e385), so results must say which ones they used.
PROFILE_DEFINITIONS: dict[str, str] = {
    "paper": (
        "the seed's evaluate_iqa.py: whole volume on the [0,1] scale (see normalise_definition), data_range 1, "
        "3D SSIM (7^3 uniform window, sample covariance), PSNR, NMSE = MSE/Var(target), MAE; *_mask = same "
        "inside the mask (NOT IN PAPER)"
    ),
    "synthrad2023": (
        "SynthRAD2023/metrics image_metrics.py @ fe7e385: MAE in mask unclipped (HU); PSNR clipped to "
        "[-1024,3000] in mask, data_range 4024; SSIM clipped, outside mask -1024, +1024, data_range 4024, "
        "mean of the map over the mask after a 3-voxel crop; NMSE (not a challenge metric) in mask, unclipped"
    ),
}


# ----------------------------------------------------------------------------------------------------------
# validation


def _as_float64(name: str, array: np.ndarray) -> np.ndarray:
    out = np.asarray(array, dtype=np.float64)
    if not np.all(np.isfinite(out)):
        n_nan = int(np.isnan(out).sum())
        n_inf = int(np.isinf(out).sum())
        raise ValueError(
            f"{name} contains non-finite values ({n_nan} NaN, {n_inf} Inf); metrics need finite data"
        )
    return out


def _check_pair(synthetic: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    synthetic_shape, target_shape = np.shape(synthetic), np.shape(target)
    if synthetic_shape != target_shape:
        raise ValueError(
            f"synthetic and target must have the same shape, got synthetic {synthetic_shape} "
            f"and target {target_shape}"
        )
    if len(target_shape) == 0 or np.size(target) == 0:
        raise ValueError(f"synthetic and target must be non-empty arrays, got shape {target_shape}")
    return _as_float64("synthetic", synthetic), _as_float64("target", target)


def _check_mask(mask: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray | None:
    if mask is None:
        return None
    mask = np.asarray(mask)
    if mask.dtype != np.bool_:
        # A float/int mask is ambiguous (labels? probabilities?); SynthRAD binarises with `> 0`, and so does
        # volsynth.evaluation.evaluate when reading mask files; the pure metrics insist on an explicit bool.
        raise TypeError(f"mask must be a boolean array (e.g. `mask > 0`), got dtype {mask.dtype}")
    if mask.shape != shape:
        raise ValueError(f"mask shape {mask.shape} does not match the image shape {shape}")
    if not mask.any():
        raise ValueError("mask is empty (no True voxels); metrics inside it are undefined")
    return mask


def _check_data_range(data_range: float) -> float:
    value = float(data_range)
    if not np.isfinite(value) or value <= 0:
        raise ValueError(f"data_range must be a positive finite number, got {data_range!r}")
    return value


# ----------------------------------------------------------------------------------------------------------
# SSIM


def ssim_map(
    synthetic: np.ndarray, target: np.ndarray, *, data_range: float, win_size: int = 7
) -> np.ndarray:
    """Local SSIM at every voxel, as ``skimage.metrics.structural_similarity(..., full=True)[1]``.

    Uniform ``win_size``-wide window in every dimension (scipy ``uniform_filter``, ``mode="reflect"``), sample
    covariance (normalised by ``N - 1`` with ``N = win_size ** ndim``), ``K1 = 0.01``, ``K2 = 0.03``.

    Args:
        synthetic: prediction, any shape (``(x, y, z)`` for volumes), in the units ``data_range`` refers to.
        target: reference, same shape.
        data_range: the range of possible values (1 for [0, 1] images, 4024 for the SynthRAD HU window).
        win_size: odd window side length, at most the smallest image side.

    Returns:
        float64 array of the input shape; the ``(win_size - 1) // 2`` border voxels are included but are
        influenced by the reflected padding and excluded from :func:`ssim`'s means.
    """
    x, y = _check_pair(synthetic, target)
    r = _check_data_range(data_range)
    if win_size < 1 or win_size % 2 != 1:
        raise ValueError(f"win_size must be a positive odd integer, got {win_size}")
    if min(x.shape) < win_size:
        raise ValueError(
            f"win_size {win_size} exceeds the image extent {x.shape}; use a smaller odd win_size"
        )
    n = win_size**x.ndim
    cov_norm = n / (n - 1)  # sample covariance, scikit-image's default (use_sample_covariance=True)
    ux = uniform_filter(x, size=win_size)
    uy = uniform_filter(y, size=win_size)
    uxx = uniform_filter(x * x, size=win_size)
    uyy = uniform_filter(y * y, size=win_size)
    uxy = uniform_filter(x * y, size=win_size)
    vx = cov_norm * (uxx - ux * ux)
    vy = cov_norm * (uyy - uy * uy)
    vxy = cov_norm * (uxy - ux * uy)
    c1 = (0.01 * r) ** 2
    c2 = (0.03 * r) ** 2
    # Same operation order as scikit-image so the results agree to rounding error.
    a1, a2 = 2 * ux * uy + c1, 2 * vxy + c2
    b1, b2 = ux**2 + uy**2 + c1, vx + vy + c2
    return (a1 * a2) / (b1 * b2)


def _crop(array: np.ndarray, pad: int) -> np.ndarray:
    return array[tuple(slice(pad, s - pad) for s in array.shape)]


def ssim(
    synthetic: np.ndarray,
    target: np.ndarray,
    *,
    data_range: float,
    mask: np.ndarray | None = None,
    win_size: int = 7,
) -> float:
    """Mean structural similarity (N-D, here 3D) between ``synthetic`` and ``target``.

    Without a mask this equals ``skimage.metrics.structural_similarity(target, synthetic,
    data_range=data_range, win_size=win_size)`` on float64 inputs: the mean of :func:`ssim_map` after cropping
    ``(win_size - 1) // 2`` voxels at every border. With a mask, the mean is taken over the mask voxels inside
    that cropped region (the rule ``crop(map, 3)[crop(mask, 3)]`` of the SynthRAD2023 evaluation code); the
    map itself is computed on the whole image, so voxels near the mask edge see outside context.

    Args:
        synthetic, target: same-shape arrays in the units of ``data_range``.
        data_range: value range (1 on the [0, 1] scale).
        mask: optional boolean array of the same shape.
        win_size: odd window side (default 7, scikit-image's).

    Raises:
        ValueError: shape mismatch, non-finite values, empty mask, or no mask voxel left after the crop.
    """
    smap = ssim_map(synthetic, target, data_range=data_range, win_size=win_size)
    mask = _check_mask(mask, smap.shape)
    pad = (win_size - 1) // 2
    cropped = _crop(smap, pad)
    if mask is None:
        return float(cropped.mean(dtype=np.float64))
    inside = _crop(mask, pad)
    if not inside.any():
        raise ValueError(
            f"mask has no voxel at least {pad} voxels away from the image border; masked SSIM is undefined"
        )
    return float(cropped[inside].mean(dtype=np.float64))


# ----------------------------------------------------------------------------------------------------------
# PSNR / NMSE / MAE


def _mse(x: np.ndarray, y: np.ndarray, mask: np.ndarray | None) -> float:
    diff = x - y if mask is None else x[mask] - y[mask]
    return float(np.mean(diff * diff))


def psnr(
    synthetic: np.ndarray, target: np.ndarray, *, data_range: float, mask: np.ndarray | None = None
) -> float:
    """Peak signal-to-noise ratio in dB: ``10 log10(data_range**2 / MSE)``.

    Equals ``skimage.metrics.peak_signal_noise_ratio(target, synthetic, data_range=data_range)``; with a mask,
    the MSE is taken over the mask voxels only (SynthRAD2023 does the same by indexing ``gt[mask == 1]``).

    Args:
        synthetic, target: same-shape arrays in the units of ``data_range``.
        data_range: peak value range (1 on the [0, 1] scale, 4024 for the SynthRAD HU window).
        mask: optional boolean array of the same shape.

    Returns:
        PSNR in dB; ``inf`` when the MSE is exactly 0 (identical images), as scikit-image returns.
    """
    x, y = _check_pair(synthetic, target)
    r = _check_data_range(data_range)
    mask = _check_mask(mask, x.shape)
    mse = _mse(x, y, mask)
    if mse == 0.0:
        return float("inf")
    return float(10.0 * np.log10(r * r / mse))


def nmse(synthetic: np.ndarray, target: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Normalised MSE: ``MSE(synthetic, target) / Var(target)`` (population variance).

    The definition of the 3D-mDAUNet release's ``evaluate_iqa.py`` (juhha/3D-mADUNet). With a mask, both the MSE
    and the variance are taken over the mask voxels. Unitless.

    Returns:
        The NMSE. A constant target (zero variance) gives ``inf`` when ``synthetic`` differs from it and
        ``nan`` when it matches exactly (0 / 0 is undefined).
    """
    x, y = _check_pair(synthetic, target)
    mask = _check_mask(mask, x.shape)
    mse = _mse(x, y, mask)
    var = float(np.var(y if mask is None else y[mask]))
    if var == 0.0:
        return float("nan") if mse == 0.0 else float("inf")
    return mse / var


def mae(synthetic: np.ndarray, target: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Mean absolute error in the units of the inputs (HU for CT); over the mask voxels when one is given."""
    x, y = _check_pair(synthetic, target)
    mask = _check_mask(mask, x.shape)
    diff = x - y if mask is None else x[mask] - y[mask]
    return float(np.mean(np.abs(diff)))


# ----------------------------------------------------------------------------------------------------------
# profiles


def minmax_unit(array: np.ndarray, what: str = "volume", *, constant: str = "error") -> np.ndarray:
    """``(array − min) / (max − min)`` in float64: the volume's own range mapped to [0, 1].

    Args:
        array: any shape, finite.
        what: how to name the array in the error message.
        constant: a constant array has no range: ``"error"`` raises ValueError, ``"zeros"`` returns zeros.
    """
    x = np.asarray(array, dtype=np.float64)
    lo, hi = float(x.min()), float(x.max())
    if hi <= lo:
        if constant == "zeros":
            return np.zeros_like(x)
        raise ValueError(f"{what} is constant ({lo}); min-max normalisation is undefined")
    return (x - lo) / (hi - lo)


def normalise_pair(synthetic: np.ndarray, target: np.ndarray, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """Bring an MR prediction and its target to the paper profile's [0, 1] scale (:data:`NORMALISATIONS`).

    ``"paper"``: each volume min-max normalised on its own (the seed's ``evaluate_iqa.py``), so an affine
    intensity change of the prediction (a·x + b, a > 0) does not change any metric. ``"target"``: only the target.
    ``"none"``: both as given. A constant target raises ValueError (its range is undefined); a constant prediction
    becomes zeros under ``"paper"``.
    """
    if mode not in NORMALISATIONS:
        raise ValueError(f"Unknown normalisation '{mode}'.{suggest(mode, NORMALISATIONS)} "
                         f"Known: {', '.join(NORMALISATIONS)}")
    x, y = _check_pair(synthetic, target)
    if mode == "none":
        return x, y
    y = minmax_unit(y, "target")
    if mode == "paper":
        x = minmax_unit(x, "prediction", constant="zeros")
    return x, y


def ct_window_to_unit(hu: np.ndarray) -> np.ndarray:
    """The 3D-mDAUNet release's CT normalisation (``evaluate_iqa.py``): clip to [-1024, 3000] HU, (HU + 1024) / 4024."""
    lo, hi = CT_WINDOW_HU
    return (np.clip(np.asarray(hu, dtype=np.float64), lo, hi) - lo) / CT_WINDOW_WIDTH_HU


def resolve_profile(profile: str, modality: str | None) -> tuple[str, str]:
    """Validate ``profile`` and ``modality``; ``None`` = the profile's own (paper: mr, synthrad2023: ct)."""
    if profile not in PROFILES:
        raise ValueError(
            f"Unknown metric profile '{profile}'.{suggest(profile, PROFILES)} "
            f"Known profiles: {', '.join(PROFILES)}"
        )
    if modality is None:
        modality = "ct" if profile == "synthrad2023" else "mr"
    if modality not in MODALITIES:
        raise ValueError(
            f"Unknown modality '{modality}'.{suggest(modality, MODALITIES)} Known modalities: "
            f"{', '.join(MODALITIES)}"
        )
    if profile == "synthrad2023" and modality != "ct":
        raise ValueError("the synthrad2023 profile scores synthetic CT in HU; modality must be 'ct'")
    return profile, modality


def metric_names(profile: str, *, masked: bool) -> list[str]:
    """Keys :func:`compute_metrics` returns, in CSV column order."""
    names = ["ssim", "psnr", "nmse", "mae"]
    if profile == "paper" and masked:
        names += [f"{n}_mask" for n in ("ssim", "psnr", "nmse", "mae")]
    return names


def compute_metrics(
    synthetic: np.ndarray,
    target: np.ndarray,
    *,
    profile: str,
    mask: np.ndarray | None = None,
    modality: str | None = None,
    normalise: str = "none",
) -> dict[str, float]:
    """All metrics of one subject under a named profile.

    ``paper`` (the seed's ``evaluate_iqa.py``):
        - ``modality="mr"`` (default): inputs brought to [0, 1] by ``normalise`` (:func:`normalise_pair`):
          ``"paper"`` = each volume min-max normalised on its own, as the paper did; ``"target"`` = the target
          only; ``"none"`` (default here) = both already on [0, 1]. ``mae`` is on the normalised scale.
        - ``modality="ct"``: both inputs in HU; they are put on [0, 1] with the seed's CT window
          (:func:`ct_window_to_unit`) for SSIM/PSNR/NMSE, while ``mae`` is reported in HU on the unclipped
          inputs (the issue asks for MAE in HU for CT).
        - ``ssim`` (7³ window), ``psnr`` (data_range 1), ``nmse`` (MSE / Var(target)), ``mae`` over the whole
          volume; with a mask also ``ssim_mask``, ``psnr_mask``, ``nmse_mask``, ``mae_mask`` inside it.

    ``synthrad2023`` (SynthRAD2023 evaluation code; inputs in HU, modality must be ``ct``):
        - ``mae``: in mask, no clipping, HU.
        - ``psnr``: both clipped to [-1024, 3000], in mask, ``data_range = 4024``.
        - ``ssim``: both clipped, voxels outside the mask set to -1024, shifted by +1024,
          ``data_range = 4024``, mean of the 7³ SSIM map over the mask after a 3-voxel crop.
        - ``nmse``: not a challenge metric; kept for a uniform table: in mask, unclipped HU.
        - Without a mask, the whole volume acts as the mask (the scorer's ``mask=None`` behaviour).
        - The challenge casts to float32 before scoring; this computes in float64 (differences ~1e-6).

    Args:
        synthetic: prediction, ``(x, y, z)``.
        target: reference, same shape.
        profile: ``"paper"`` or ``"synthrad2023"``.
        mask: optional boolean ``(x, y, z)`` mask.
        modality: ``"mr"`` or ``"ct"``: the units of the inputs (see above); ``None`` = the profile's default.
        normalise: MR only (paper profile): ``"paper"``, ``"target"`` or ``"none"`` (see above). CT and the
            synthrad2023 profile have fixed HU windows and accept only ``"none"``.

    Returns:
        ``{name: value}`` with the keys of :func:`metric_names`; PSNR may be ``inf`` and NMSE ``nan``/``inf``
        in degenerate cases (see :func:`psnr`, :func:`nmse`).
    """
    profile, modality = resolve_profile(profile, modality)
    x, y = _check_pair(synthetic, target)
    mask = _check_mask(mask, x.shape)
    if normalise != "none":
        if profile != "paper" or modality != "mr":
            raise ValueError(f"normalise='{normalise}' applies to the paper profile on MR only (CT is scored on a "
                             "fixed HU window); use 'none'")
        x, y = normalise_pair(x, y, normalise)

    if profile == "synthrad2023":
        region = mask if mask is not None else np.ones(x.shape, dtype=bool)
        lo, hi = CT_WINDOW_HU
        xc, yc = np.clip(x, lo, hi), np.clip(y, lo, hi)
        # SSIM: outside-mask voxels to the window floor, then shift to non-negative (commit fe7e385).
        xs = np.where(region, xc, lo) - lo
        ys = np.where(region, yc, lo) - lo
        return {
            "ssim": ssim(xs, ys, data_range=CT_WINDOW_WIDTH_HU, mask=region),
            "psnr": psnr(xc, yc, data_range=CT_WINDOW_WIDTH_HU, mask=region),
            "nmse": nmse(x, y, mask=region),
            "mae": mae(x, y, mask=region),
        }

    hu_x, hu_y = x, y
    if modality == "ct":
        x, y = ct_window_to_unit(x), ct_window_to_unit(y)
    smap = ssim_map(x, y, data_range=1.0)
    pad = 3
    out = {
        "ssim": float(_crop(smap, pad).mean(dtype=np.float64)),
        "psnr": psnr(x, y, data_range=1.0),
        "nmse": nmse(x, y),
        "mae": mae(hu_x, hu_y),
    }
    if mask is not None:
        inside = _crop(mask, pad)
        if not inside.any():
            raise ValueError(
                "mask has no voxel at least 3 voxels away from the image border; masked SSIM is undefined"
            )
        out.update(
            ssim_mask=float(_crop(smap, pad)[inside].mean(dtype=np.float64)),
            psnr_mask=psnr(x, y, data_range=1.0, mask=mask),
            nmse_mask=nmse(x, y, mask=mask),
            mae_mask=mae(hu_x, hu_y, mask=mask),
        )
    return out


# --------------------------------------------------------------------------------------------------------------
# Overlap measures (segmentations of real vs synthetic) and summaries


def _check_label_pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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
    a, b = _check_label_pair(a, b)
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
    a, b = _check_label_pair(a, b)
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
