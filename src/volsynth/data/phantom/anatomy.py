"""The phantom's anatomy: the ICBM152 2009a template on the phantom grid and its random deformation.

Brain mask = template T1 > 0 (the template is skull-stripped), GM and WM probabilities /255, CSF = mask − GM − WM
(never stored: it follows from the other maps after every linear operation). The maps are resampled once per
spacing (cached in-process) and warped per subject by a cubic B-spline free-form deformation composed with a
random global scaling about the brain centre, applied identically to all tissue maps so every contrast of a subject
stays aligned.

The resampler is the phantom's own, not :func:`volsynth.data.preprocess.resample`: it low-pass filters before
coarsening (a partial-volume fraction at the coarse spacing is an average over the larger voxel), which a plain
linear resampler does not; the two differ by up to 0.56 in a mask fraction at 6 mm.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

from volsynth.data.phantom.fields import bspline_matrix, tensor_field
from volsynth.errors import ConfigError

# Deformation: control-point spacing and displacement scale in mm. For a cubic B-spline a coefficient bound
# below 0.4 × control spacing keeps the map one-to-one (Choi & Lee, 2000); 0.3 leaves room for the scaling.
_CTRL_SPACING_MM = 30.0
_DISP_STD_MM = 3.0
_DISP_MAX_FRACTION = 0.3
_SCALE_RANGE = (0.9, 1.1)
_ANISO_RANGE = 0.03

_MAX_VOXELS = 1 << 26  # about 0.45 mm: beyond this the phantom would need tens of GB
_MIN_GRID = 8

_TEMPLATE_FILES = (
    "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
)


def template_paths() -> tuple[Path, Path, Path]:
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
class Anatomy:
    """Template maps on the phantom grid: partial-volume brain mask, GM and WM (float32, read-only)."""

    affine: np.ndarray
    shape: tuple[int, int, int]
    spacing: float
    mask: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    centre_vox: np.ndarray  # brain centre of mass, voxel coordinates
    support: tuple[tuple[int, int], ...]  # per axis, first and last index where the mask is non-zero


def grid_for_spacing(shape: tuple[int, ...], affine: np.ndarray, spacing: float) -> tuple[
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


def resample_template(volume: np.ndarray, src_affine: np.ndarray, dst_affine: np.ndarray,
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
def template_anatomy(spacing: float) -> Anatomy:
    """Template maps resampled to ``spacing`` mm (cached per spacing: 20 subjects load the template once)."""
    t1_path, gm_path, wm_path = template_paths()
    t1_img = nib.load(t1_path)
    affine = np.asarray(t1_img.affine, dtype=float)
    if not np.allclose(affine[:3, :3], np.diag(np.diag(affine)[:3])) or np.any(np.diag(affine)[:3] <= 0):
        raise RuntimeError(f"Unexpected template orientation in {t1_path}: {affine}")
    shape, new_affine = grid_for_spacing(t1_img.shape[:3], affine, spacing)
    n_vox = int(np.prod(shape))
    if n_vox > _MAX_VOXELS:
        finest = math.ceil(spacing * (n_vox / _MAX_VOXELS) ** (1 / 3) * 100) / 100
        raise ConfigError(f"spacing {spacing} mm is too fine: the grid would be {shape} ({n_vox} voxels, more than "
                          f"{_MAX_VOXELS}); the finest spacing allowed is about {finest} mm")
    if min(shape) < _MIN_GRID:
        raise ConfigError(f"spacing {spacing} mm is too coarse: the grid would be only {shape} voxels")
    mask = (np.asarray(t1_img.dataobj) > 0).astype(np.float32)
    # Probabilities are stored as 0–255; outside the skull-stripped mask they are dropped (background).
    gm = np.asarray(nib.load(gm_path).dataobj, dtype=np.float32) / 255.0 * mask
    wm = np.asarray(nib.load(wm_path).dataobj, dtype=np.float32) / 255.0 * mask
    # GM + WM ≤ 1 in the template, so CSF = mask − GM − WM ≥ 0 already; clipping guards against rounding. CSF is
    # not stored: it follows from mask − GM − WM after every linear operation (resampling, warping).
    maps = [resample_template(m, affine, new_affine, shape) for m in (mask, gm, wm)]
    for m in maps:
        np.clip(m, 0.0, 1.0, out=m)
        m.setflags(write=False)
    centre = np.asarray(ndi.center_of_mass(maps[0]), dtype=float)
    support = tuple((int(i.min()), int(i.max())) for i in np.nonzero(maps[0] > 0))
    return Anatomy(affine=new_affine, shape=shape, spacing=float(spacing), mask=maps[0], gm=maps[1], wm=maps[2],
                   centre_vox=centre, support=support)


def sample_deformation(rng: np.random.Generator, anatomy: Anatomy) -> np.ndarray:
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
    mats = [bspline_matrix(np.arange(n) / ctrl, k) for n, k in zip(anatomy.shape, n_ctrl, strict=True)]
    coords = np.empty((3, *anatomy.shape), dtype=np.float32)
    for axis in range(3):
        coords[axis] = tensor_field(coeffs[axis], mats)
        lin = anatomy.centre_vox[axis] + (np.arange(anatomy.shape[axis]) - anatomy.centre_vox[axis]) / scale[axis]
        view = [1, 1, 1]
        view[axis] = -1
        coords[axis] += lin.astype(np.float32).reshape(view)
    return coords


def support_roi(coords: np.ndarray, support: tuple[tuple[int, int], ...]) -> tuple[slice, ...]:
    """Bounding box (slices) of the output voxels whose sampling point can hit the template's support."""
    inside = np.ones(coords.shape[1:], dtype=bool)
    for axis, (lo, hi) in enumerate(support):
        c = coords[axis]
        inside &= (c > lo - 1) & (c < hi + 1)  # order-1 interpolation reaches one voxel beyond the support
    if not inside.any():
        return tuple(slice(0, 1) for _ in support)
    return tuple(slice(int(i.min()), int(i.max()) + 1) for i in np.nonzero(inside))


def embed(sub: np.ndarray, shape: tuple[int, int, int], roi: tuple[slice, ...]) -> np.ndarray:
    """Place a roi-shaped array into a zero array of the full grid."""
    out = np.zeros(shape, sub.dtype)
    out[roi] = sub
    return out

