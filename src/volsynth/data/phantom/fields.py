"""Smooth random fields of the phantom: seeded streams and separable cubic B-spline / polynomial expansions."""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence

import numpy as np

# Random-stream identifiers (the third entropy word); never renumber them, that would change every cohort.
STREAM_ANATOMY = 1
STREAM_PARAMS = 2
STREAM_LESION = 3
STREAM_BIAS = 4
STREAM_NOISE = 5


def stream_rng(seed: int, index: int, stream: int, *extra: int) -> np.random.Generator:
    """The generator of one random stream of subject ``index`` (extra words: e.g. a contrast's :func:`name_key`)."""
    return np.random.default_rng([int(seed), int(index), stream, *extra])


def name_key(name: str) -> int:
    """A stable integer for a contrast name (independent of the order of :data:`CONTRASTS`)."""
    return zlib.crc32(name.encode())


def bspline_matrix(positions: np.ndarray, n_ctrl: int) -> np.ndarray:
    """Cubic B-spline basis, (len(positions), n_ctrl); ``positions`` in control units, control j sits at j − 1."""
    u = positions[:, None] - (np.arange(n_ctrl)[None, :] - 1.0)
    a = np.abs(u)
    out = np.where(a < 1.0, (4.0 - 6.0 * a**2 + 3.0 * a**3) / 6.0, np.where(a < 2.0, (2.0 - a) ** 3 / 6.0, 0.0))
    return out.astype(np.float32)


def tensor_field(coeffs: np.ndarray, mats: Sequence[np.ndarray]) -> np.ndarray:
    """Evaluate a separable tensor-product expansion: field[x,y,z] = Σ Mx[x,i] My[y,j] Mz[z,k] C[i,j,k].

    Contracting one axis at a time costs O(N·n_coefficients) instead of interpolating every voxel from
    scratch. ``einsum`` without path optimisation runs its own single-threaded loops: these products are
    small, and BLAS's thread start-up on a busy machine made ``tensordot`` 50× slower than the arithmetic.
    """
    mx, my, mz = mats
    out = np.einsum("ijk,zk->ijz", coeffs.astype(np.float32), mz)
    out = np.einsum("ijz,yj->iyz", out, my)
    return np.einsum("iyz,xi->xyz", out, mx)


def smooth_field(rng: np.random.Generator, shape: tuple[int, int, int], ctrl_spacing_vox: float,
                 scale: float = 1.0) -> np.ndarray:
    """A smooth random field on ``shape``: cubic B-spline of N(0, scale²) coefficients every ``ctrl_spacing_vox``."""
    n_ctrl = [math.ceil((n - 1) / ctrl_spacing_vox) + 3 for n in shape]
    coeffs = rng.standard_normal(n_ctrl) * scale
    mats = [bspline_matrix(np.arange(n) / ctrl_spacing_vox, k) for n, k in zip(shape, n_ctrl, strict=True)]
    return tensor_field(coeffs, mats)

