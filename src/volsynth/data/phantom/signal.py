"""The phantom's MR signal model: tissue classes and parameters, pulse sequences, bias field and Rician mean.

Per-tissue T1/T2/PD (BrainWeb 1.5 T, jittered per subject) go through the spin-echo and inversion-recovery
equations and are mixed by tissue fraction (partial volume); each contrast is scaled so the brightest normal
tissue is :data:`REFERENCE_INTENSITY`. A smooth multiplicative bias field and Rician noise corrupt each contrast;
:func:`rician_mean` is the noise's expected magnitude (the ideal image).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.special import i0e, i1e

from volsynth.data.phantom.fields import tensor_field

CONTRASTS: tuple[str, ...] = ("t1", "t2", "pd", "flair", "t1ce")
"""Contrast names, also the file suffixes (BraTS spelling)."""

TISSUES: tuple[str, ...] = ("csf", "gm", "wm", "necrosis", "oedema", "enhancing")
"""Keys of :attr:`PhantomSubject.fractions`."""

TISSUE_LABELS: dict[str, int] = {"csf": 1, "gm": 2, "wm": 3, "necrosis": 4, "oedema": 5, "enhancing": 6}
"""Values of the tissue label map (0 = background)."""

SEG_LABELS: dict[str, int] = {"necrosis": 1, "oedema": 2, "enhancing": 4}
"""Values of the BraTS-style lesion label map (0 = no lesion)."""

REFERENCE_INTENSITY = 1000.0
"""Noise-free intensity of the brightest *normal* tissue (CSF/GM/WM) in every contrast.

The scale is fixed by the tissue parameters rather than by a percentile of the image so that adding a lesion
leaves every other voxel unchanged (the lesion test relies on it) and so the noise level has a fixed meaning.
"""


# --------------------------------------------------------------------------------------------------------------
# Tissue parameters.
#
# Normal tissue: the BrainWeb simulator's 1.5 T tissue parameters (Kwan, Evans & Pike, "MRI simulation-based
# evaluation of image-processing and classification methods", IEEE TMI 18(11):1085-1097, 1999; Cocosco et al.,
# "BrainWeb: online interface to a 3D MRI simulated brain database", NeuroImage 5(4):S425, 1997). T1/T2 in ms,
# PD relative to CSF.
# Lesions: values chosen for this phantom (plausible at 1.5 T, not taken from one source): oedema is free water
# added to white matter (long T1 and T2: bright on T2w and FLAIR); necrosis is near-CSF fluid but not nulled by
# FLAIR; the enhancing rim is solid tumour whose T1 is shortened by gadolinium in the T1ce contrast only.
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TissueParams:
    """Relaxation times in ms and proton density relative to CSF."""

    t1: float
    t2: float
    pd: float


BASE_TISSUE_PARAMS: dict[str, TissueParams] = {
    "csf": TissueParams(t1=2569.0, t2=329.0, pd=1.0),
    "gm": TissueParams(t1=833.0, t2=83.0, pd=0.86),
    "wm": TissueParams(t1=500.0, t2=70.0, pd=0.77),
    "necrosis": TissueParams(t1=2200.0, t2=450.0, pd=0.95),
    "oedema": TissueParams(t1=1200.0, t2=250.0, pd=0.90),
    "enhancing": TissueParams(t1=1100.0, t2=120.0, pd=0.88),
}

GADOLINIUM_T1_ENHANCING = 350.0
"""T1 (ms) of the enhancing rim after contrast agent: shorter than WM's 500 ms, so the rim is brightest on T1ce."""

# Per-subject multiplicative jitter of T1/T2 (relative standard deviation) and PD, truncated at ±2.5 σ.
_JITTER_RELAX = 0.05
_JITTER_PD = 0.03


@dataclass(frozen=True)
class PulseSequence:
    """Spin echo (``ti`` is None) or inversion recovery; times in ms."""

    tr: float
    te: float
    ti: float | None = None


# FLAIR inverts CSF so that it crosses zero at TI: 1 − 2·exp(−TI/T1) + exp(−TR/T1) = 0, i.e.
# TI = T1·ln(2 / (1 + exp(−TR/T1))), which is the textbook T1·ln 2 for TR ≫ T1. The protocol is fixed from the
# nominal CSF T1 like a scanner protocol is, so per-subject jitter leaves a little residual CSF signal.
_CSF_T1 = BASE_TISSUE_PARAMS["csf"].t1
_FLAIR_TR = 9000.0
_FLAIR_TI = _CSF_T1 * math.log(2.0 / (1.0 + math.exp(-_FLAIR_TR / _CSF_T1)))

SEQUENCES: dict[str, PulseSequence] = {
    "t1": PulseSequence(tr=500.0, te=12.0),
    "t2": PulseSequence(tr=4000.0, te=100.0),
    "pd": PulseSequence(tr=4000.0, te=12.0),
    "flair": PulseSequence(tr=_FLAIR_TR, te=120.0, ti=_FLAIR_TI),
    "t1ce": PulseSequence(tr=500.0, te=12.0),
}


# Bias field: exp(cubic polynomial), peak deviation inside the brain drawn in this range (±10–20 %).
_BIAS_RANGE = (0.10, 0.20)

# --------------------------------------------------------------------------------------------------------------


def jittered_params(rng: np.random.Generator) -> dict[str, TissueParams]:
    """Per-subject tissue parameters: BrainWeb values × (1 + truncated normal jitter)."""
    out: dict[str, TissueParams] = {}
    for name in TISSUES:  # fixed order: the stream does not depend on which tissues are present
        p = BASE_TISSUE_PARAMS[name]
        j = np.clip(rng.standard_normal(3), -2.5, 2.5)
        out[name] = TissueParams(t1=p.t1 * (1 + _JITTER_RELAX * j[0]), t2=p.t2 * (1 + _JITTER_RELAX * j[1]),
                                 pd=p.pd * (1 + _JITTER_PD * j[2]))
    return out


def tissue_signal(params: TissueParams, seq: PulseSequence) -> float:
    """Signed pure-tissue signal (PD units).

    Spin echo: PD·(1 − exp(−TR/T1))·exp(−TE/T2). Inversion recovery: PD·(1 − 2·exp(−TI/T1) + exp(−TR/T1))·
    exp(−TE/T2); the sign is kept so partial-volume voxels mix the signed (complex) signals, and the magnitude
    is taken afterwards, as a scanner does.
    """
    decay = math.exp(-seq.te / params.t2)
    if seq.ti is None:
        return params.pd * (1.0 - math.exp(-seq.tr / params.t1)) * decay
    return params.pd * (1.0 - 2.0 * math.exp(-seq.ti / params.t1) + math.exp(-seq.tr / params.t1)) * decay


def contrast_signals(contrast: str, params: dict[str, TissueParams]) -> dict[str, float]:
    """Pure-tissue intensities of one contrast, scaled so the brightest normal tissue is REFERENCE_INTENSITY."""
    seq = SEQUENCES[contrast]
    signals = {}
    for name in TISSUES:
        p = params[name]
        if contrast == "t1ce" and name == "enhancing":
            p = TissueParams(t1=GADOLINIUM_T1_ENHANCING, t2=p.t2, pd=p.pd)  # gadolinium shortens T1
        signals[name] = tissue_signal(p, seq)
    ref = max(abs(signals[t]) for t in ("csf", "gm", "wm"))
    return {k: v * REFERENCE_INTENSITY / ref for k, v in signals.items()}


def rician_mean(signal: np.ndarray | float, sigma: float) -> np.ndarray:
    """Mean of the Rician magnitude |ν + n₁ + i·n₂|, n₁, n₂ ~ N(0, σ²), for noise-free signal ν ≥ 0.

    E = σ·sqrt(π/2)·L_{1/2}(−ν²/(2σ²)) (Rice 1944; Gudbjartsson & Patz, "The Rician distribution of noisy MRI
    data", MRM 34(6):910-914, 1995, Eq. 5), with the Laguerre polynomial
    L_{1/2}(x) = exp(x/2)·[(1 − x)·I₀(−x/2) − x·I₁(−x/2)]. Writing t = ν²/(4σ²), the exponential is folded into
    the exponentially scaled Bessel functions, E = σ·sqrt(π/2)·[(1 + 2t)·i0e(t) + 2t·i1e(t)], which stays finite
    where I₀(t) overflows (t > ~700, i.e. ν/σ > ~53). Limits: E = σ·sqrt(π/2) at ν = 0 (Rayleigh) and
    E → sqrt(ν² + σ²) as ν/σ → ∞.

    Args:
        signal: noise-free magnitude ν (any shape, image units; the sign is ignored, as a magnitude image's is).
        sigma: Gaussian standard deviation of each noise component (same units, ≥ 0); 0 returns |ν|.

    Returns:
        float64 array of ``signal``'s shape.
    """
    nu = np.abs(np.asarray(signal, dtype=np.float64))
    sigma = float(sigma)
    if not (sigma >= 0.0 and math.isfinite(sigma)):
        raise ValueError(f"sigma must be a finite number >= 0, got {sigma!r}")
    if sigma == 0.0:
        return nu
    t = nu * nu / (4.0 * sigma * sigma)
    return sigma * math.sqrt(math.pi / 2.0) * ((1.0 + 2.0 * t) * i0e(t) + 2.0 * t * i1e(t))


def bias_field(rng: np.random.Generator, shape: tuple[int, int, int], roi: tuple[slice, ...],
               brain: np.ndarray) -> np.ndarray:
    """Smooth multiplicative intensity non-uniformity exp(cubic polynomial), evaluated on ``roi`` only.

    The polynomial (coordinates in [−1, 1] over the whole field of view ``shape``) is centred to mean 0 and
    scaled so its peak inside the brain (``brain``, the roi-shaped mask) is log(1 + a), a ~ U(0.10, 0.20): the
    field spans roughly ±10–20 % over the brain. Returns float32 of the roi's shape.
    """
    degree = 3
    coeffs = np.zeros((degree + 1,) * 3)
    for i in range(degree + 1):
        for j in range(degree + 1 - i):
            for k in range(degree + 1 - i - j):
                if i + j + k:
                    coeffs[i, j, k] = rng.standard_normal() / (i + j + k)
    amplitude = rng.uniform(*_BIAS_RANGE)
    mats = [np.vander(np.linspace(-1.0, 1.0, n)[sl], degree + 1, increasing=True).astype(np.float32)
            for n, sl in zip(shape, roi, strict=True)]
    log_field = tensor_field(coeffs, mats)
    inside = log_field[brain]
    if inside.size:
        log_field -= np.float32(inside.mean())
        peak = float(np.abs(log_field[brain]).max())
        if peak > 0:
            log_field *= np.float32(math.log1p(amplitude) / peak)
    return np.exp(log_field, dtype=np.float32)

