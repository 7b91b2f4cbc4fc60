"""One simulated subject: anatomy → lesions → signal → bias field and Rician noise (no file I/O).

Every random draw comes from ``numpy.random.default_rng([seed, subject_index, stream, ...])`` with separate
streams for anatomy, tissue parameters, lesions and, per contrast, bias and noise (:mod:`.fields`): subject *k* is
the same whatever the number of subjects or the requested contrasts, and adding lesions changes nothing else.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from volsynth.data.phantom.anatomy import embed, sample_deformation, support_roi, template_anatomy
from volsynth.data.phantom.fields import (
    STREAM_ANATOMY,
    STREAM_BIAS,
    STREAM_LESION,
    STREAM_NOISE,
    STREAM_PARAMS,
    name_key,
    stream_rng,
)
from volsynth.data.phantom.lesions import draw_lesions
from volsynth.data.phantom.signal import (
    CONTRASTS,
    REFERENCE_INTENSITY,
    SEG_LABELS,
    TISSUE_LABELS,
    TISSUES,
    bias_field,
    contrast_signals,
    jittered_params,
    rician_mean,
)
from volsynth.errors import ConfigError
from volsynth.registry import suggest

SUBJECT_PREFIX = "Phantom_"


@dataclass(frozen=True)
class PhantomSubject:
    """One simulated subject, in memory. Arrays are (x, y, z) in nibabel order on the grid of ``affine``.

    ``images``: noisy, bias-corrupted float32 images per contrast (noise-free brightest tissue ≈ 1000).
    ``clean``: the same contrasts without bias field and noise (same scale).
    ``fractions``: float32 tissue fractions for :data:`TISSUES`; they sum to 1 inside ``mask``, 0 outside.
    ``tissue``: uint8 labels (:data:`TISSUE_LABELS`); ``seg``: uint8 BraTS labels (:data:`SEG_LABELS`), both
    defined where the lesion fraction is ≥ 0.5 (lesion) or by the largest normal-tissue fraction.
    ``mask``: uint8 brain mask (0/1). ``affine``: 4×4 voxel → world (mm) matrix.
    ``noise_sigma``: the Gaussian σ of the Rician noise per contrast, in image units.
    ``biased``: the noise-free signal after the bias field, per contrast (what the noise is added to).
    """

    subject: str
    images: dict[str, np.ndarray]
    clean: dict[str, np.ndarray]
    fractions: dict[str, np.ndarray]
    tissue: np.ndarray
    seg: np.ndarray
    mask: np.ndarray
    affine: np.ndarray
    noise_sigma: dict[str, float]
    biased: dict[str, np.ndarray]

    @property
    def has_lesion(self) -> bool:
        """Whether the BraTS label map contains any lesion voxel."""
        return bool(self.seg.any())

    def ideal(self, contrast: str) -> np.ndarray:
        """E[noisy image | anatomy, bias field] of ``contrast``: float32 :func:`rician_mean` of ``biased``.

        The best prediction of ``images[contrast]`` in mean squared error, hence the ceiling of any translation
        scored against the noisy image. Computed on demand (the cohort writer does it on a worker thread).
        """
        signal = self.biased[contrast]
        out = np.full(signal.shape, rician_mean(0.0, self.noise_sigma[contrast]), np.float32)
        inside = signal > 0  # only brain voxels need the Bessel functions; elsewhere the Rayleigh mean
        out[inside] = rician_mean(signal[inside], self.noise_sigma[contrast])
        return out


# --------------------------------------------------------------------------------------------------------------
# Argument checking
# --------------------------------------------------------------------------------------------------------------


def check_contrasts(contrasts: Sequence[str] | str) -> tuple[str, ...]:
    """Validate contrast names; returns them in canonical :data:`CONTRASTS` order (duplicates dropped)."""
    if isinstance(contrasts, str):
        contrasts = contrasts.split(",")
    names = [str(c).strip().lower() for c in contrasts]
    names = [n for n in names if n]
    if not names:
        raise ConfigError(f"At least one contrast is required; choose from {', '.join(CONTRASTS)}")
    for name in names:
        if name not in CONTRASTS:
            raise ConfigError(
                f"Unknown contrast '{name}'.{suggest(name, CONTRASTS)} Known contrasts: {', '.join(CONTRASTS)}"
            )
    return tuple(c for c in CONTRASTS if c in names)


def check_args(seed: int, spacing: float, lesion_probability: float, noise_percent: float) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
    if not (isinstance(spacing, int | float | np.number) and spacing > 0 and math.isfinite(spacing)):
        raise ConfigError(f"spacing must be a positive number of mm, got {spacing!r}")
    if not (isinstance(lesion_probability, int | float | np.number) and 0.0 <= lesion_probability <= 1.0):
        raise ConfigError(f"lesion probability must be in [0, 1], got {lesion_probability!r}")
    if not (isinstance(noise_percent, int | float | np.number) and 0.0 <= noise_percent < math.inf):
        raise ConfigError(f"noise must be a non-negative percentage, got {noise_percent!r}")


def subject_name(index: int) -> str:
    """``Phantom_00000`` style identifier of subject ``index``."""
    return f"{SUBJECT_PREFIX}{index:05d}"


def simulate_subject(index: int, *, seed: int, spacing: float = 2.0, lesion_probability: float = 0.5,
                     contrasts: Sequence[str] = CONTRASTS, noise_percent: float = 3.0) -> PhantomSubject:
    """Simulate subject ``index`` of the cohort defined by ``seed`` (deterministic; no file I/O).

    Args:
        index: subject number (≥ 0); subject *k* is the same whatever the cohort size.
        seed: cohort seed (≥ 0).
        spacing: isotropic voxel size in mm; the grid covers the template's 197×233×189 mm field of view.
        lesion_probability: probability that this subject has lesions (1–3 of them).
        contrasts: any of :data:`CONTRASTS` (only those are simulated; the others' random streams are unused).
        noise_percent: Rician noise level: the Gaussian σ is ``noise_percent``/100 × REFERENCE_INTENSITY, i.e. a
            percentage of the brightest normal tissue of each contrast (BrainWeb's definition).

    Returns:
        A :class:`PhantomSubject` with (X, Y, Z) arrays, about 99×117×95 at 2 mm.
    """
    if isinstance(index, bool) or not isinstance(index, int | np.integer) or index < 0:
        raise ConfigError(f"subject index must be a non-negative integer, got {index!r}")
    names = check_contrasts(contrasts)
    check_args(seed, spacing, lesion_probability, noise_percent)
    anatomy = template_anatomy(float(spacing))
    shape = anatomy.shape

    # Anatomy: warp mask/GM/WM with one sampling grid so all maps (hence all contrasts) stay aligned. Only the
    # box of output voxels that sample the template's brain support can be non-zero; the rest of the field of
    # view is background (noise only), so everything up to the noise is computed on that box ("roi").
    coords = sample_deformation(stream_rng(seed, index, STREAM_ANATOMY), anatomy)
    roi = support_roi(coords, anatomy.support)
    sub_coords = coords[(slice(None), *roi)]
    del coords
    mask_pv, gm, wm = (ndi.map_coordinates(m, sub_coords, order=1, mode="constant", cval=0.0, output=np.float32)
                       for m in (anatomy.mask, anatomy.gm, anatomy.wm))
    del sub_coords
    brain = mask_pv >= 0.5
    # Renormalise inside the brain (the partial-volume brain edge becomes a sharp skull-stripped edge).
    inv = np.zeros(brain.shape, np.float32)
    np.divide(1.0, mask_pv, out=inv, where=brain)
    gm = np.clip(gm * inv, 0.0, 1.0)
    wm = np.minimum(np.clip(wm * inv, 0.0, 1.0), 1.0 - gm)
    csf = np.where(brain, 1.0 - gm - wm, 0.0).astype(np.float32)

    # Lesions: presence and shapes come from their own stream, so a cohort with and without lesions shares
    # the anatomy, tissue parameters, bias fields and noise exactly.
    lesion_rng = stream_rng(seed, index, STREAM_LESION)
    has_lesion = bool(lesion_rng.random() < lesion_probability)
    if has_lesion:
        a, b, c = draw_lesions(lesion_rng, anatomy, roi, brain, wm)
        keep = 1.0 - a
        sub_fractions = {"csf": csf * keep, "gm": gm * keep, "wm": wm * keep,
                         "necrosis": c, "oedema": a - b, "enhancing": b - c}
        lesion_total = a
    else:
        zeros = np.zeros(brain.shape, np.float32)
        sub_fractions = {"csf": csf, "gm": gm, "wm": wm, "necrosis": zeros, "oedema": zeros, "enhancing": zeros}
        lesion_total = zeros

    # Labels: a voxel is lesion when the lesion occupies at least half of it, then the dominant lesion class;
    # otherwise the dominant normal tissue.
    normal = np.stack([sub_fractions[t] for t in ("csf", "gm", "wm")])
    lesion = np.stack([sub_fractions[t] for t in ("necrosis", "oedema", "enhancing")])
    is_lesion = brain & (lesion_total >= 0.5)
    sub_tissue = np.zeros(brain.shape, np.uint8)
    sub_tissue[brain] = (np.argmax(normal[:, brain], axis=0) + 1).astype(np.uint8)
    lesion_class = np.argmax(lesion[:, is_lesion], axis=0)
    sub_tissue[is_lesion] = (lesion_class + TISSUE_LABELS["necrosis"]).astype(np.uint8)
    sub_seg = np.zeros(brain.shape, np.uint8)
    seg_values = np.asarray([SEG_LABELS[t] for t in ("necrosis", "oedema", "enhancing")], np.uint8)
    sub_seg[is_lesion] = seg_values[lesion_class]
    del normal, lesion

    params = jittered_params(stream_rng(seed, index, STREAM_PARAMS))
    sigma = float(noise_percent) / 100.0 * REFERENCE_INTENSITY
    present = [t for t in TISSUES if t in ("csf", "gm", "wm") or has_lesion]
    clean: dict[str, np.ndarray] = {}
    images: dict[str, np.ndarray] = {}
    biased: dict[str, np.ndarray] = {}
    for name in names:
        levels = contrast_signals(name, params)
        signal = np.zeros(brain.shape, np.float32)
        for t in present:  # same summation order with and without lesions: unchanged voxels stay bit-equal
            signal += np.float32(levels[t]) * sub_fractions[t]
        np.abs(signal, out=signal)
        clean[name] = embed(signal, shape, roi)
        signal *= bias_field(stream_rng(seed, index, STREAM_BIAS, name_key(name)), shape, roi, brain)
        biased[name] = embed(signal, shape, roi)
        if sigma > 0:
            noise_rng = stream_rng(seed, index, STREAM_NOISE, name_key(name))
            real = noise_rng.standard_normal(shape, dtype=np.float32)
            real *= np.float32(sigma)
            real[roi] += signal
            imag = noise_rng.standard_normal(shape, dtype=np.float32)
            imag *= np.float32(sigma)
            images[name] = np.hypot(real, imag)  # Rician magnitude |S + n1 + i·n2|
        else:
            images[name] = biased[name]

    fractions = {t: embed(sub_fractions[t], shape, roi) for t in TISSUES}
    return PhantomSubject(subject=subject_name(index), images=images, clean=clean, fractions=fractions,
                          tissue=embed(sub_tissue, shape, roi), seg=embed(sub_seg, shape, roi),
                          mask=embed(brain.astype(np.uint8), shape, roi), affine=anatomy.affine.copy(),
                          noise_sigma={n: sigma for n in names}, biased=biased)

