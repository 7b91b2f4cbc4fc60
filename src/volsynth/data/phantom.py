"""Synthetic multi-contrast brain phantom cohort (``volsynth phantom``).

Every subject is built from the ICBM152 2009a template that nilearn ships inside its package (T1 template,
grey- and white-matter probability maps; no download):

1. **Anatomy.** Brain mask = template T1 > 0 (the template is skull-stripped), GM and WM probabilities /255,
   CSF = mask − GM − WM clipped to [0, 1]; the maps are resampled once per spacing (cached in-process).
2. **Deformation.** A cubic B-spline free-form deformation (control points every 30 mm, coefficients bounded
   so the map cannot fold) composed with a random global scaling about the brain centre, applied identically
   to all tissue maps so every contrast of a subject stays aligned.
3. **Lesions** (probability ``lesion_probability`` per subject): 1–3 irregular tumour-like lesions, each a
   necrotic core inside an enhancing rim inside oedema, with one-voxel partial-volume edges. Lesion
   fractions take over the normal-tissue fractions, so the six fractions always sum to 1 inside the brain.
4. **Signal.** Per-tissue T1/T2/PD (BrainWeb 1.5 T, jittered per subject) through the spin-echo and
   inversion-recovery equations, mixed by tissue fraction (partial volume), scaled so the brightest normal
   tissue of each contrast is :data:`REFERENCE_INTENSITY`.
5. **Corruption.** A smooth multiplicative bias field and Rician noise, drawn independently per contrast.

Array order is nibabel's (x, y, z) with an axis-aligned, isotropic RAS affine (the template's orientation).
Every random draw comes from ``numpy.random.default_rng([seed, subject_index, stream, ...])`` with separate
streams for anatomy, tissue parameters, lesions and, per contrast, bias and noise: subject *k* is the same
whatever the number of subjects or the requested contrasts, and adding lesions changes nothing else.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import struct
import threading
import zlib
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

from volsynth.registry import suggest

__all__ = [
    "CONTRASTS",
    "REFERENCE_INTENSITY",
    "SEG_LABELS",
    "TISSUES",
    "TISSUE_LABELS",
    "PhantomSubject",
    "make_phantom_cohort",
    "simulate_subject",
]

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

PHANTOM_VERSION = 1
"""Bumped whenever the same arguments would produce different files."""

SUBJECT_PREFIX = "Phantom_"

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

# Random-stream identifiers (the third entropy word); never renumber them, that would change every cohort.
_STREAM_ANATOMY = 1
_STREAM_PARAMS = 2
_STREAM_LESION = 3
_STREAM_BIAS = 4
_STREAM_NOISE = 5

# Deformation: control-point spacing and displacement scale in mm. For a cubic B-spline a coefficient bound
# below 0.4 × control spacing keeps the map one-to-one (Choi & Lee, 2000); 0.3 leaves room for the scaling.
_CTRL_SPACING_MM = 30.0
_DISP_STD_MM = 3.0
_DISP_MAX_FRACTION = 0.3
_SCALE_RANGE = (0.9, 1.1)
_ANISO_RANGE = 0.03

# Bias field: exp(cubic polynomial), peak deviation inside the brain drawn in this range (±10–20 %).
_BIAS_RANGE = (0.10, 0.20)

_MAX_VOXELS = 1 << 26  # about 0.45 mm: beyond this the phantom would need tens of GB
_MIN_GRID = 8

_TEMPLATE_FILES = (
    "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
)


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

    @property
    def has_lesion(self) -> bool:
        """Whether the BraTS label map contains any lesion voxel."""
        return bool(self.seg.any())


# --------------------------------------------------------------------------------------------------------------
# Argument checking
# --------------------------------------------------------------------------------------------------------------


def _check_contrasts(contrasts: Sequence[str] | str) -> tuple[str, ...]:
    """Validate contrast names; returns them in canonical :data:`CONTRASTS` order (duplicates dropped)."""
    if isinstance(contrasts, str):
        contrasts = contrasts.split(",")
    names = [str(c).strip().lower() for c in contrasts]
    names = [n for n in names if n]
    if not names:
        raise ValueError(f"At least one contrast is required; choose from {', '.join(CONTRASTS)}")
    for name in names:
        if name not in CONTRASTS:
            raise ValueError(
                f"Unknown contrast '{name}'.{suggest(name, CONTRASTS)} Known contrasts: {', '.join(CONTRASTS)}"
            )
    return tuple(c for c in CONTRASTS if c in names)


def _check_args(seed: int, spacing: float, lesion_probability: float, noise_percent: float) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if not (isinstance(spacing, int | float | np.number) and spacing > 0 and math.isfinite(spacing)):
        raise ValueError(f"spacing must be a positive number of mm, got {spacing!r}")
    if not (isinstance(lesion_probability, int | float | np.number) and 0.0 <= lesion_probability <= 1.0):
        raise ValueError(f"lesion probability must be in [0, 1], got {lesion_probability!r}")
    if not (isinstance(noise_percent, int | float | np.number) and 0.0 <= noise_percent < math.inf):
        raise ValueError(f"noise must be a non-negative percentage, got {noise_percent!r}")


# --------------------------------------------------------------------------------------------------------------
# Template anatomy
# --------------------------------------------------------------------------------------------------------------


def _template_paths() -> tuple[Path, Path, Path]:
    """Paths of the ICBM152 2009a T1, GM and WM files inside the nilearn package.

    ``nilearn.datasets`` pulls in pandas and scikit-learn (about 3 s), while the files sit in the package
    directory, so look there first and fall back to nilearn's own constants if the layout ever changes.
    """
    import nilearn

    data_dir = Path(nilearn.__file__).parent / "datasets" / "data"
    paths = tuple(data_dir / name for name in _TEMPLATE_FILES)
    if all(p.is_file() for p in paths):
        return paths  # type: ignore[return-value]
    from nilearn.datasets import GM_MNI152_FILE_PATH, MNI152_FILE_PATH, WM_MNI152_FILE_PATH

    return Path(MNI152_FILE_PATH), Path(GM_MNI152_FILE_PATH), Path(WM_MNI152_FILE_PATH)


@dataclass(frozen=True)
class _Anatomy:
    """Template maps on the phantom grid: partial-volume brain mask, GM and WM (float32, read-only)."""

    affine: np.ndarray
    shape: tuple[int, int, int]
    spacing: float
    mask: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    centre_vox: np.ndarray  # brain centre of mass, voxel coordinates
    support: tuple[tuple[int, int], ...]  # per axis, first and last index where the mask is non-zero


def _grid_for_spacing(shape: tuple[int, ...], affine: np.ndarray, spacing: float) -> tuple[
        tuple[int, int, int], np.ndarray]:
    """Shape and affine of an isotropic grid covering the template's field of view with the same centre."""
    src_spacing = np.abs(np.diag(affine)[:3])
    extent = np.asarray(shape, dtype=float) * src_spacing  # voxel edge to voxel edge, mm
    new_shape = tuple(int(max(1, math.floor(e / spacing + 0.5))) for e in extent)
    centre = affine[:3, 3] + (np.asarray(shape) - 1) / 2.0 * np.diag(affine)[:3]
    new_affine = np.eye(4)
    new_affine[:3, :3] = np.diag([spacing] * 3)
    new_affine[:3, 3] = centre - (np.asarray(new_shape) - 1) / 2.0 * spacing
    return new_shape, new_affine  # type: ignore[return-value]


def _resample(volume: np.ndarray, src_affine: np.ndarray, dst_affine: np.ndarray,
              dst_shape: tuple[int, int, int]) -> np.ndarray:
    """Linear resampling between axis-aligned grids; Gaussian pre-filter when coarsening.

    The pre-filter turns point sampling into (approximately) averaging over the larger voxel, which is what a
    partial-volume fraction at the coarse spacing means: σ² = (s_dst² − s_src²)/12, the variance difference
    of the two box profiles.
    """
    src_sp = np.diag(src_affine)[:3]
    dst_sp = np.diag(dst_affine)[:3]
    var = (dst_sp**2 - src_sp**2) / 12.0
    sigma = np.sqrt(np.maximum(var, 0.0)) / np.abs(src_sp)
    vol = volume.astype(np.float32)
    if np.any(sigma > 0):
        vol = ndi.gaussian_filter(vol, sigma=sigma, mode="constant", cval=0.0, truncate=3.0)
    matrix = dst_sp / src_sp
    offset = (dst_affine[:3, 3] - src_affine[:3, 3]) / src_sp
    if np.allclose(matrix, 1.0) and np.allclose(offset, 0.0) and vol.shape == tuple(dst_shape):
        return vol
    return ndi.affine_transform(vol, matrix, offset=offset, output_shape=dst_shape, order=1, mode="constant",
                                cval=0.0, output=np.float32)


@lru_cache(maxsize=4)
def _anatomy(spacing: float) -> _Anatomy:
    """Template maps resampled to ``spacing`` mm (cached per spacing: 20 subjects load the template once)."""
    t1_path, gm_path, wm_path = _template_paths()
    t1_img = nib.load(t1_path)
    affine = np.asarray(t1_img.affine, dtype=float)
    if not np.allclose(affine[:3, :3], np.diag(np.diag(affine)[:3])) or np.any(np.diag(affine)[:3] <= 0):
        raise RuntimeError(f"Unexpected template orientation in {t1_path}: {affine}")
    shape, new_affine = _grid_for_spacing(t1_img.shape[:3], affine, spacing)
    n_vox = int(np.prod(shape))
    if n_vox > _MAX_VOXELS:
        raise ValueError(f"spacing {spacing} mm is too fine: the grid would be {shape} ({n_vox} voxels)")
    if min(shape) < _MIN_GRID:
        raise ValueError(f"spacing {spacing} mm is too coarse: the grid would be only {shape} voxels")
    mask = (np.asarray(t1_img.dataobj) > 0).astype(np.float32)
    # Probabilities are stored as 0–255; outside the skull-stripped mask they are dropped (background).
    gm = np.asarray(nib.load(gm_path).dataobj, dtype=np.float32) / 255.0 * mask
    wm = np.asarray(nib.load(wm_path).dataobj, dtype=np.float32) / 255.0 * mask
    # GM + WM ≤ 1 in the template, so CSF = mask − GM − WM ≥ 0 already; clipping guards against rounding. CSF is
    # not stored: it follows from mask − GM − WM after every linear operation (resampling, warping).
    maps = [_resample(m, affine, new_affine, shape) for m in (mask, gm, wm)]
    for m in maps:
        np.clip(m, 0.0, 1.0, out=m)
        m.setflags(write=False)
    centre = np.asarray(ndi.center_of_mass(maps[0]), dtype=float)
    support = tuple((int(i.min()), int(i.max())) for i in np.nonzero(maps[0] > 0))
    return _Anatomy(affine=new_affine, shape=shape, spacing=float(spacing), mask=maps[0], gm=maps[1], wm=maps[2],
                    centre_vox=centre, support=support)


# --------------------------------------------------------------------------------------------------------------
# Random fields
# --------------------------------------------------------------------------------------------------------------


def _rng(seed: int, index: int, stream: int, *extra: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(index), stream, *extra])


def _name_key(name: str) -> int:
    """A stable integer for a contrast name (independent of the order of :data:`CONTRASTS`)."""
    return zlib.crc32(name.encode())


def _bspline_matrix(positions: np.ndarray, n_ctrl: int) -> np.ndarray:
    """Cubic B-spline basis, (len(positions), n_ctrl); ``positions`` in control units, control j sits at j − 1."""
    u = positions[:, None] - (np.arange(n_ctrl)[None, :] - 1.0)
    a = np.abs(u)
    out = np.where(a < 1.0, (4.0 - 6.0 * a**2 + 3.0 * a**3) / 6.0, np.where(a < 2.0, (2.0 - a) ** 3 / 6.0, 0.0))
    return out.astype(np.float32)


def _tensor_field(coeffs: np.ndarray, mats: Sequence[np.ndarray]) -> np.ndarray:
    """Evaluate a separable tensor-product expansion: field[x,y,z] = Σ Mx[x,i] My[y,j] Mz[z,k] C[i,j,k].

    Contracting one axis at a time costs O(N·n_coefficients) instead of interpolating every voxel from
    scratch. ``einsum`` without path optimisation runs its own single-threaded loops: these products are
    small, and BLAS's thread start-up on a busy machine made ``tensordot`` 50× slower than the arithmetic.
    """
    mx, my, mz = mats
    out = np.einsum("ijk,zk->ijz", coeffs.astype(np.float32), mz)
    out = np.einsum("ijz,yj->iyz", out, my)
    return np.einsum("iyz,xi->xyz", out, mx)


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int, int], ctrl_spacing_vox: float,
                  scale: float = 1.0) -> np.ndarray:
    """A smooth random field on ``shape``: cubic B-spline of N(0, scale²) coefficients every ``ctrl_spacing_vox``."""
    n_ctrl = [math.ceil((n - 1) / ctrl_spacing_vox) + 3 for n in shape]
    coeffs = rng.standard_normal(n_ctrl) * scale
    mats = [_bspline_matrix(np.arange(n) / ctrl_spacing_vox, k) for n, k in zip(shape, n_ctrl, strict=True)]
    return _tensor_field(coeffs, mats)


def _sample_deformation(rng: np.random.Generator, anatomy: _Anatomy) -> np.ndarray:
    """Pull-back sampling coordinates (3, X, Y, Z), float32, in template voxel units.

    Output voxel x samples the template at c + (x − c)/s + u(x): a global per-axis scaling s about the brain
    centre c and a cubic B-spline displacement u whose coefficients are bounded by 0.3 × control spacing
    (< 0.4, the sufficient condition for a one-to-one B-spline map), so the warp never folds.
    """
    sp = anatomy.spacing
    ctrl = _CTRL_SPACING_MM / sp
    iso = rng.uniform(*_SCALE_RANGE)
    scale = iso * (1.0 + rng.uniform(-_ANISO_RANGE, _ANISO_RANGE, size=3))
    n_ctrl = [math.ceil((n - 1) / ctrl) + 3 for n in anatomy.shape]
    bound = _DISP_MAX_FRACTION * ctrl
    coeffs = np.clip(rng.standard_normal((3, *n_ctrl)) * (_DISP_STD_MM / sp), -bound, bound)
    mats = [_bspline_matrix(np.arange(n) / ctrl, k) for n, k in zip(anatomy.shape, n_ctrl, strict=True)]
    coords = np.empty((3, *anatomy.shape), dtype=np.float32)
    for axis in range(3):
        coords[axis] = _tensor_field(coeffs[axis], mats)
        lin = anatomy.centre_vox[axis] + (np.arange(anatomy.shape[axis]) - anatomy.centre_vox[axis]) / scale[axis]
        view = [1, 1, 1]
        view[axis] = -1
        coords[axis] += lin.astype(np.float32).reshape(view)
    return coords


def _bias_field(rng: np.random.Generator, shape: tuple[int, int, int], roi: tuple[slice, ...],
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
    log_field = _tensor_field(coeffs, mats)
    inside = log_field[brain]
    if inside.size:
        log_field -= np.float32(inside.mean())
        peak = float(np.abs(log_field[brain]).max())
        if peak > 0:
            log_field *= np.float32(math.log1p(amplitude) / peak)
    return np.exp(log_field, dtype=np.float32)


# --------------------------------------------------------------------------------------------------------------
# Lesions
# --------------------------------------------------------------------------------------------------------------


def _soft_inside(dist: np.ndarray, boundary: np.ndarray, radius_vox: float) -> np.ndarray:
    """Partial-volume occupancy of {dist < boundary} with a one-voxel linear ramp.

    ``dist`` and ``boundary`` are normalised by the lesion radius, so ``radius_vox`` converts them to voxels.
    """
    return np.clip(0.5 - (dist - boundary) * np.float32(radius_vox), 0.0, 1.0).astype(np.float32)


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    """Uniformly random 3×3 rotation (normalised Gaussian quaternion; avoids LAPACK for a 3×3 problem)."""
    w, x, y, z = (float(v) for v in rng.standard_normal(4))
    n = math.sqrt(w * w + x * x + y * y + z * z) or 1.0
    w, x, y, z = w / n, x / n, y / n, z / n
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ])


def _draw_lesions(rng: np.random.Generator, anatomy: _Anatomy, roi: tuple[slice, ...], brain: np.ndarray,
                  wm: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """1–3 nested tumour-like lesions in the region ``roi`` of the grid (``brain``/``wm`` have the roi's shape).

    Returns (a, b, c) cumulative occupancies, float32 arrays of the roi's shape.

    ``a`` = inside the outer (oedema) boundary, ``b`` = inside the enhancing rim's outer boundary, ``c`` = inside
    the necrotic core, with c ≤ b ≤ a ≤ brain; so necrosis = c, enhancing = b − c, oedema = a − b. Each boundary
    is a rotated ellipsoid whose radius is perturbed by its own smooth random field (irregular shapes).
    """
    sp = anatomy.spacing
    shape = brain.shape
    a = np.zeros(shape, np.float32)
    b = np.zeros(shape, np.float32)
    c = np.zeros(shape, np.float32)
    # Centres in deep white matter above the tentorium (world z ≥ −5 mm ≈ supratentorial in MNI space), where
    # gliomas mostly arise; fall back to any white matter on tiny grids.
    z_world = anatomy.affine[2, 3] + np.arange(roi[2].start, roi[2].stop) * anatomy.affine[2, 2]
    candidates = np.flatnonzero((wm >= 0.6) & brain & (z_world >= -5.0)[None, None, :])
    if candidates.size == 0:
        candidates = np.flatnonzero((wm >= 0.5) & brain)
    if candidates.size == 0:
        candidates = np.flatnonzero(brain)
    n_lesions = int(rng.integers(1, 4))
    for _ in range(n_lesions):
        centre = np.asarray(np.unravel_index(candidates[rng.integers(candidates.size)], shape), dtype=float)
        radius_mm = rng.uniform(10.0, 22.0)  # mean outer (oedema) radius
        radius = radius_mm / sp  # voxels
        axes = radius * rng.uniform(0.75, 1.25, size=3)
        rot = _random_rotation(rng)
        rim_ratio = rng.uniform(0.45, 0.65)  # enhancing outer radius / oedema radius
        # Enhancing rims of gliomas are a few mm thick; keep at least a small core inside.
        rim_mm = min(rng.uniform(3.0, 6.0), 0.5 * rim_ratio * radius_mm)
        noise_ctrl = max(radius / 2.0, 1.0)  # several bumps per lesion

        half = np.ceil(axes.max() * 1.5 + 2).astype(int)
        lo = np.maximum(centre.astype(int) - half, 0)
        hi = np.minimum(centre.astype(int) + half + 1, shape)
        sl = tuple(slice(int(lo_), int(h)) for lo_, h in zip(lo, hi, strict=True))
        box = tuple(x.stop - x.start for x in sl)
        # Independent irregularity fields for the three boundaries (the box, hence the number of draws, depends
        # only on the anatomy and earlier lesion draws, so the stream stays reproducible).
        bumps_a, bumps_b, bumps_c = (_smooth_field(rng, box, noise_ctrl, scale=s) for s in (0.35, 0.25, 0.5))

        # Ellipsoid-normalised distance from the centre: ≈ (distance in voxels) / radius.
        rel = np.stack(np.meshgrid(*[np.arange(x.start, x.stop, dtype=np.float32) - np.float32(c0)
                                     for x, c0 in zip(sl, centre, strict=True)], indexing="ij"))
        local = np.einsum("ji,jxyz->ixyz", rot.astype(np.float32), rel)  # into the ellipsoid frame
        dist = np.sqrt(sum((local[i] * np.float32(radius / axes[i])) ** 2 for i in range(3))) / np.float32(radius)

        # Boundaries as normalised radii that vary with direction (irregular shapes). The rim's inner boundary
        # follows its outer one at a varying thickness, and the oedema extends at least 4 mm beyond the rim and
        # further along white-matter tracts than into cortex (finger-like extensions).
        r_b = rim_ratio * (1.0 - bumps_b)
        r_c = r_b - rim_mm / radius_mm * np.clip(1.0 + bumps_c, 0.5, 1.5)
        r_a = np.maximum(1.0 - bumps_a + 0.3 * (wm[sl] - 0.5), r_b + 4.0 / radius_mm)
        la = _soft_inside(dist, r_a, radius)
        lb = np.minimum(_soft_inside(dist, r_b, radius), la)
        lc = np.minimum(_soft_inside(dist, r_c, radius), lb)
        inside = brain[sl]
        # Maximum keeps the nesting c ≤ b ≤ a when lesions overlap.
        np.maximum(a[sl], la * inside, out=a[sl])
        np.maximum(b[sl], lb * inside, out=b[sl])
        np.maximum(c[sl], lc * inside, out=c[sl])
    return a, b, c


# --------------------------------------------------------------------------------------------------------------
# Signal model
# --------------------------------------------------------------------------------------------------------------


def _jittered_params(rng: np.random.Generator) -> dict[str, TissueParams]:
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


def _contrast_signals(contrast: str, params: dict[str, TissueParams]) -> dict[str, float]:
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


# --------------------------------------------------------------------------------------------------------------
# Subject simulation
# --------------------------------------------------------------------------------------------------------------


def _support_roi(coords: np.ndarray, support: tuple[tuple[int, int], ...]) -> tuple[slice, ...]:
    """Bounding box (slices) of the output voxels whose sampling point can hit the template's support."""
    inside = np.ones(coords.shape[1:], dtype=bool)
    for axis, (lo, hi) in enumerate(support):
        c = coords[axis]
        inside &= (c > lo - 1) & (c < hi + 1)  # order-1 interpolation reaches one voxel beyond the support
    if not inside.any():
        return tuple(slice(0, 1) for _ in support)
    return tuple(slice(int(i.min()), int(i.max()) + 1) for i in np.nonzero(inside))


def _embed(sub: np.ndarray, shape: tuple[int, int, int], roi: tuple[slice, ...]) -> np.ndarray:
    """Place a roi-shaped array into a zero array of the full grid."""
    out = np.zeros(shape, sub.dtype)
    out[roi] = sub
    return out


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
        raise ValueError(f"subject index must be a non-negative integer, got {index!r}")
    names = _check_contrasts(contrasts)
    _check_args(seed, spacing, lesion_probability, noise_percent)
    anatomy = _anatomy(float(spacing))
    shape = anatomy.shape

    # Anatomy: warp mask/GM/WM with one sampling grid so all maps (hence all contrasts) stay aligned. Only the
    # box of output voxels that sample the template's brain support can be non-zero; the rest of the field of
    # view is background (noise only), so everything up to the noise is computed on that box ("roi").
    coords = _sample_deformation(_rng(seed, index, _STREAM_ANATOMY), anatomy)
    roi = _support_roi(coords, anatomy.support)
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
    lesion_rng = _rng(seed, index, _STREAM_LESION)
    has_lesion = bool(lesion_rng.random() < lesion_probability)
    if has_lesion:
        a, b, c = _draw_lesions(lesion_rng, anatomy, roi, brain, wm)
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

    params = _jittered_params(_rng(seed, index, _STREAM_PARAMS))
    sigma = float(noise_percent) / 100.0 * REFERENCE_INTENSITY
    present = [t for t in TISSUES if t in ("csf", "gm", "wm") or has_lesion]
    clean: dict[str, np.ndarray] = {}
    images: dict[str, np.ndarray] = {}
    for name in names:
        levels = _contrast_signals(name, params)
        signal = np.zeros(brain.shape, np.float32)
        for t in present:  # same summation order with and without lesions: unchanged voxels stay bit-equal
            signal += np.float32(levels[t]) * sub_fractions[t]
        np.abs(signal, out=signal)
        clean[name] = _embed(signal, shape, roi)
        signal *= _bias_field(_rng(seed, index, _STREAM_BIAS, _name_key(name)), shape, roi, brain)
        if sigma > 0:
            noise_rng = _rng(seed, index, _STREAM_NOISE, _name_key(name))
            real = noise_rng.standard_normal(shape, dtype=np.float32)
            real *= np.float32(sigma)
            real[roi] += signal
            imag = noise_rng.standard_normal(shape, dtype=np.float32)
            imag *= np.float32(sigma)
            images[name] = np.hypot(real, imag)  # Rician magnitude |S + n1 + i·n2|
        else:
            images[name] = _embed(signal, shape, roi)

    fractions = {t: _embed(sub_fractions[t], shape, roi) for t in TISSUES}
    return PhantomSubject(subject=subject_name(index), images=images, clean=clean, fractions=fractions,
                          tissue=_embed(sub_tissue, shape, roi), seg=_embed(sub_seg, shape, roi),
                          mask=_embed(brain.astype(np.uint8), shape, roi), affine=anatomy.affine.copy(),
                          noise_sigma={n: sigma for n in names})


# --------------------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _atomic(path: Path) -> Iterator[Path]:
    """A temporary file beside ``path``, renamed onto it on success (readers never see a half-written file).

    Not ``tempfile.mkstemp`` (as in volsynth.utils, which also imports torch): that creates 0600 files, while
    a data set should get the usual umask permissions. The name is unique per process and thread.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _write_bytes(path: Path, data: bytes) -> None:
    with _atomic(path) as tmp:
        tmp.write_bytes(data)


def nifti_bytes(data: np.ndarray, affine: np.ndarray) -> bytes:
    """Deterministic ``.nii.gz`` bytes: header codes fixed, gzip header without time stamp or file name."""
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)  # scanner coordinates, mm; sform identical so every reader agrees
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    img.header.set_data_dtype(data.dtype)
    return _gzip(img.to_bytes())


def _gzip(data: bytes) -> bytes:
    """gzip container with a fixed header (no file name, mtime 0) around a run-length-only deflate stream.

    Z_RLE skips LZ77 string matching: the noisy float images (Rician background) shrink to ~89 % whatever
    the effort, and RLE gets there 3× faster than level 1 while compressing the label maps better (~20×).
    """
    deflate = zlib.compressobj(1, zlib.DEFLATED, -15, 9, zlib.Z_RLE)
    body = deflate.compress(data) + deflate.flush()
    header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"  # magic, deflate, no flags, mtime 0, OS unknown
    return header + body + struct.pack("<II", zlib.crc32(data), len(data) & 0xFFFFFFFF)


def _write_nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    _write_bytes(path, nifti_bytes(data, affine))


def _subject_files(subject: str, contrasts: Sequence[str]) -> dict[str, str]:
    """Relative (POSIX) paths of a subject's files, keyed by role."""
    files = {c: f"{subject}/{subject}_{c}.nii.gz" for c in contrasts}
    files.update(seg=f"{subject}/{subject}_seg.nii.gz", tissue=f"{subject}/{subject}_tissue.nii.gz",
                 mask=f"{subject}/{subject}_mask.nii.gz", montage=f"{subject}/{subject}_montage.png")
    return files


def _old_phantom_files(out_dir: Path) -> set[str]:
    """Files listed by an existing phantom manifest in ``out_dir`` (relative paths; empty when none)."""
    path = out_dir / "manifest.json"
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return set()
    if not isinstance(old, dict) or old.get("format") != "volsynth-manifest" or old.get("dataset") != "phantom":
        return set()
    found: set[str] = set()
    for entry in old.get("subjects", []) if isinstance(old.get("subjects"), list) else []:
        if not isinstance(entry, dict) or not str(entry.get("subject", "")).startswith(SUBJECT_PREFIX):
            continue
        sub = str(entry["subject"])
        images = entry.get("images", {})
        found.update(_subject_files(sub, list(images) if isinstance(images, dict) else []).values())
    return found


def _remove_stale(out_dir: Path, stale: set[str]) -> None:
    """Delete files an earlier phantom run wrote that this run does not (so a scan of the tree sees no
    leftovers); only plain files inside ``out_dir`` named like phantom files, then their empty folders."""
    root = out_dir.resolve()
    dirs = set()
    for rel in sorted(stale):
        path = (out_dir / rel).resolve()
        if root not in path.parents or not path.name.startswith(SUBJECT_PREFIX) or not path.is_file():
            continue
        path.unlink()
        dirs.add(path.parent)
    for d in sorted(dirs):
        with contextlib.suppress(OSError):
            d.rmdir()  # only succeeds when empty: unrelated files keep their folder


_TISSUE_COLOURS = np.array([
    [0, 0, 0],  # background
    [70, 130, 230],  # CSF
    [150, 150, 150],  # GM
    [235, 235, 235],  # WM
    [200, 40, 40],  # necrosis
    [60, 200, 60],  # oedema
    [250, 220, 40],  # enhancing
], dtype=np.float32) / 255.0
_SEG_COLOURS = {1: _TISSUE_COLOURS[4], 2: _TISSUE_COLOURS[5], 4: _TISSUE_COLOURS[6]}


def _tri_planar(volume: np.ndarray, point: Sequence[int]) -> list[np.ndarray]:
    """Axial, coronal, sagittal slices through ``point``, oriented for display (anterior/superior up)."""
    i, j, k = point
    return [np.flipud(volume[:, :, k].swapaxes(0, 1)),  # axial: x right, y up
            np.flipud(volume[:, j, :].swapaxes(0, 1)),  # coronal: x right, z up
            np.flipud(volume[i, :, :].swapaxes(0, 1))]  # sagittal: y right, z up


def _montage_point(subject: PhantomSubject) -> list[int]:
    """Voxel the montage slices pass through: inside the largest lesion near its centroid, else brain centre."""
    if subject.seg.any():
        box = ndi.find_objects((subject.seg > 0).astype(np.uint8))[0]  # label only the lesions' bounding box
        labels, _ = ndi.label(subject.seg[box] > 0)
        largest = int(np.argmax(np.bincount(labels.ravel())[1:])) + 1
        voxels = np.argwhere(labels == largest) + np.array([sl.start for sl in box])
        centroid = voxels.mean(axis=0)
        # A crescent-shaped lesion's centroid may lie outside it: take the lesion voxel closest to it.
        return [int(v) for v in voxels[np.argmin(((voxels - centroid) ** 2).sum(axis=1))]]
    if subject.mask.any():
        return [round(v) for v in ndi.center_of_mass(subject.mask)]
    return [n // 2 for n in subject.mask.shape]


def montage_png(subject: PhantomSubject) -> bytes:
    """Tri-planar PNG: one row per contrast, then tissue labels, then the BraTS labels over the last contrast.

    Slices pass through the lesion centroid when there is one, else through the brain's centre of mass.
    Rows are windowed from 0 to the 99.5th percentile of the brain pixels shown.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    point = _montage_point(subject)
    rows: list[tuple[str, list[np.ndarray]]] = []
    brain = np.concatenate([s.ravel() for s in _tri_planar(subject.mask > 0, point)])
    for name, img in subject.images.items():
        slices = _tri_planar(img, point)
        shown = np.concatenate([s.ravel() for s in slices])
        top = float(np.percentile(shown[brain], 99.5)) if brain.any() else float(shown.max())
        rows.append((name, [np.repeat(np.clip(s / max(top, 1e-6), 0.0, 1.0)[..., None], 3, axis=2)
                            for s in slices]))
    rows.append(("tissue", [_TISSUE_COLOURS[s] for s in _tri_planar(subject.tissue, point)]))
    base = rows[len(subject.images) - 1][1]
    overlay = []
    for rgb, seg in zip(base, _tri_planar(subject.seg, point), strict=True):
        out = rgb.copy()
        for value, colour in _SEG_COLOURS.items():
            sel = seg == value
            out[sel] = 0.45 * out[sel] + 0.55 * colour
        overlay.append(out)
    rows.append(("seg", overlay))

    heights = max(t.shape[0] for _, tiles in rows for t in tiles)
    widths = [max(tiles[col].shape[1] for _, tiles in rows) for col in range(3)]
    gap = 2
    canvas = np.zeros((len(rows) * (heights + gap), sum(widths) + 2 * gap, 3), np.float32)
    for r, (_, tiles) in enumerate(rows):
        x0 = 0
        for col, tile in enumerate(tiles):
            y = r * (heights + gap) + (heights - tile.shape[0]) // 2
            x = x0 + (widths[col] - tile.shape[1]) // 2
            canvas[y:y + tile.shape[0], x:x + tile.shape[1]] = tile
            x0 += widths[col] + gap

    mag = max(1, round(200 / heights))  # readable rows whatever the spacing, nearest-neighbour enlargement
    margin_left, margin_top, dpi = 70, 24, 100
    big = np.repeat(np.repeat(canvas, mag, axis=0), mag, axis=1)
    w_px, h_px = big.shape[1] + margin_left, big.shape[0] + margin_top
    # matplotlib draws only the captions; the slices are pasted into its pixel buffer unchanged, which avoids
    # matplotlib's image resampling (most of the time of an imshow-based montage).
    fig = Figure(figsize=(w_px / dpi, h_px / dpi), dpi=dpi, facecolor="black")
    canvas_agg = FigureCanvasAgg(fig)
    for r, (label, _) in enumerate(rows):
        y_px = (r * (heights + gap) + heights / 2) * mag + margin_top  # from the top
        fig.text(margin_left / 2 / w_px, 1.0 - y_px / h_px, label, color="white", ha="center", va="center",
                 fontsize=10)
    x0 = 0
    for col, title in enumerate(("axial", "coronal", "sagittal")):
        x_px = margin_left + (x0 + widths[col] / 2) * mag
        fig.text(x_px / w_px, 1.0 - margin_top / 2 / h_px, title, color="white", ha="center", va="center",
                 fontsize=10)
        x0 += widths[col] + gap
    fig.text(0.01, 1.0 - margin_top / 2 / h_px, subject.subject, color="0.7", ha="left", va="center", fontsize=7)
    canvas_agg.draw()
    text = np.asarray(canvas_agg.buffer_rgba())[..., :3]
    pixels = np.zeros((h_px, w_px, 3), np.uint8)
    th, tw = min(h_px, text.shape[0]), min(w_px, text.shape[1])
    pixels[:th, :tw] = text[:th, :tw]
    pixels[margin_top:, margin_left:] = np.round(big * 255.0).astype(np.uint8)

    from PIL import Image  # matplotlib's own PNG writer

    buf = io.BytesIO()
    # No metadata (so the bytes are reproducible); compress_level 1 encodes 4× faster than the default 6.
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def make_phantom_cohort(out_dir: str | Path, subjects: int, *, seed: int = 0, spacing: float = 2.0,
                        lesion_probability: float = 0.5, contrasts: Sequence[str] = CONTRASTS,
                        noise_percent: float = 3.0, montage: bool = True, progress: bool = False) -> Path:
    """Write a BraTS-style phantom cohort to ``out_dir`` and return the path of its ``manifest.json``.

    Layout: ``out_dir/Phantom_00000/Phantom_00000_{t1,t2,pd,flair,t1ce,seg,tissue,mask}.nii.gz`` (+ a
    ``_montage.png`` when ``montage``), one folder per subject, and ``manifest.json`` listing every file with a
    path relative to ``out_dir``. Images are float32 (brightest normal tissue ≈ 1000), label maps uint8. Same
    arguments → byte-identical NIfTI files and manifest. Files written by an earlier phantom run into the same
    folder that this run does not write are removed; other files are left alone.

    Args:
        out_dir: destination folder (created).
        subjects: number of subjects (≥ 1).
        seed, spacing, lesion_probability, contrasts, noise_percent: see :func:`simulate_subject`.
        montage: also write a tri-planar PNG per subject.
        progress: show a tqdm progress bar.
    """
    if isinstance(subjects, bool) or not isinstance(subjects, int | np.integer) or subjects < 1:
        raise ValueError(f"subjects must be an integer ≥ 1, got {subjects!r}")
    names = _check_contrasts(contrasts)
    _check_args(seed, spacing, lesion_probability, noise_percent)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output path {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    _anatomy(float(spacing))  # fail on an impossible spacing before touching anything
    stale = _old_phantom_files(out)

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
            files = _subject_files(sub.subject, names)
            volumes: dict[str, np.ndarray] = dict(sub.images)
            volumes.update(seg=sub.seg, tissue=sub.tissue, mask=sub.mask)
            pending = [pool.submit(_write_nifti, out / files[role], data, sub.affine)
                       for role, data in volumes.items()]
            written.update(files[role] for role in volumes)
            if montage:
                _write_bytes(out / files["montage"], montage_png(sub))
                written.add(files["montage"])
            entries.append({"subject": sub.subject, "images": {c: files[c] for c in names},
                            "label": files["seg"], "tissue": files["tissue"], "mask": files["mask"],
                            "has_lesion": sub.has_lesion})
        for future in pending:
            future.result()

    _remove_stale(out, stale - written)
    manifest = {
        "format": "volsynth-manifest",
        "version": 1,
        "dataset": "phantom",
        "generator": {"seed": int(seed), "subjects": int(subjects), "spacing": float(spacing),
                      "lesions": float(lesion_probability), "contrasts": list(names),
                      "noise": float(noise_percent), "volsynth_phantom_version": PHANTOM_VERSION},
        "subjects": entries,
    }
    manifest_path = out / "manifest.json"
    _write_bytes(manifest_path, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
    return manifest_path
