"""Tumour-like lesions of the phantom: nested necrotic core, enhancing rim and oedema with irregular boundaries.

1–3 lesions per lesioned subject, each a necrotic core inside an enhancing rim inside oedema, with one-voxel
partial-volume edges. Lesion fractions take over the normal-tissue fractions, so the six fractions always sum to
1 inside the brain.
"""

from __future__ import annotations

import math

import numpy as np

from volsynth.data.phantom.anatomy import Anatomy
from volsynth.data.phantom.fields import smooth_field


def soft_inside(dist: np.ndarray, boundary: np.ndarray, radius_vox: float) -> np.ndarray:
    """Partial-volume occupancy of {dist < boundary} with a one-voxel linear ramp.

    ``dist`` and ``boundary`` are normalised by the lesion radius, so ``radius_vox`` converts them to voxels.
    """
    return np.clip(0.5 - (dist - boundary) * np.float32(radius_vox), 0.0, 1.0).astype(np.float32)


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    """Uniformly random 3×3 rotation (normalised Gaussian quaternion; avoids LAPACK for a 3×3 problem)."""
    w, x, y, z = (float(v) for v in rng.standard_normal(4))
    n = math.sqrt(w * w + x * x + y * y + z * z) or 1.0
    w, x, y, z = w / n, x / n, y / n, z / n
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ])


def draw_lesions(rng: np.random.Generator, anatomy: Anatomy, roi: tuple[slice, ...], brain: np.ndarray,
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
        rot = random_rotation(rng)
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
        bumps_a, bumps_b, bumps_c = (smooth_field(rng, box, noise_ctrl, scale=s) for s in (0.35, 0.25, 0.5))

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
        la = soft_inside(dist, r_a, radius)
        lb = np.minimum(soft_inside(dist, r_b, radius), la)
        lc = np.minimum(soft_inside(dist, r_c, radius), lb)
        inside = brain[sl]
        # Maximum keeps the nesting c ≤ b ≤ a when lesions overlap.
        np.maximum(a[sl], la * inside, out=a[sl])
        np.maximum(b[sl], lb * inside, out=b[sl])
        np.maximum(c[sl], lc * inside, out=c[sl])
    return a, b, c

