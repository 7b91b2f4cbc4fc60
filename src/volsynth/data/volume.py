"""The :class:`Volume` type: a 3D array with the geometry that places it in the patient.

Arrays are indexed ``(x, y, z)`` — the ITK/NIfTI voxel index order — so ``array[i, j, k]`` sits at
``origin + direction @ (spacing * (i, j, k))`` in ITK's LPS world coordinates. (SimpleITK's
``GetArrayFromImage`` returns ``(z, y, x)``; the I/O layer transposes once so nothing else has to think about it.)
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import SimpleITK as sitk

# Geometry comparisons tolerate float noise from headers (NIfTI stores float32 affines).
SPACING_RTOL = 1e-4
ORIGIN_ATOL = 1e-3  # mm
DIRECTION_ATOL = 1e-4


@dataclass
class Volume:
    """A single-channel 3D image with its geometry.

    Attributes:
        array: ``(X, Y, Z)`` voxel values; dtype preserved from the file (labels stay integer).
        spacing: voxel size along each index axis, in mm.
        origin: world position of voxel ``(0, 0, 0)``, LPS, in mm.
        direction: ``(3, 3)`` direction cosines; column ``k`` is the world direction of index axis ``k``.
        path: where it was read from (for error messages), if anywhere.
    """

    array: np.ndarray
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))
    path: Path | None = None

    def __post_init__(self) -> None:
        if self.array.ndim != 3:
            raise ValueError(f"{self.name}: a Volume must be 3D, got an array of shape {self.array.shape}")
        self.spacing = tuple(float(s) for s in self.spacing)  # type: ignore[assignment]
        self.origin = tuple(float(o) for o in self.origin)  # type: ignore[assignment]
        self.direction = np.asarray(self.direction, dtype=np.float64).reshape(3, 3)
        if len(self.spacing) != 3 or len(self.origin) != 3:
            raise ValueError(f"{self.name}: spacing and origin need 3 values each")
        if min(self.spacing) <= 0:
            raise ValueError(f"{self.name}: spacing must be positive, got {self.spacing}")

    @property
    def name(self) -> str:
        return str(self.path) if self.path is not None else "volume"

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape)  # type: ignore[return-value]

    @property
    def affine(self) -> np.ndarray:
        """``(4, 4)`` voxel-index → LPS-world matrix (mm)."""
        matrix = np.eye(4)
        matrix[:3, :3] = self.direction * np.asarray(self.spacing)[None, :]
        matrix[:3, 3] = self.origin
        return matrix

    @property
    def orientation(self) -> str:
        """Three-letter orientation code (ITK convention, e.g. ``LPS``, ``RAS``) of the closest axes."""
        letters = (("L", "R"), ("P", "A"), ("S", "I"))  # +x in LPS points Left, +y Posterior, +z Superior
        code = ""
        for column in self.direction.T:
            axis = int(np.argmax(np.abs(column)))
            code += letters[axis][0] if column[axis] > 0 else letters[axis][1]
        return code

    @property
    def is_oblique(self) -> bool:
        return bool(np.abs(np.abs(self.direction) - np.round(np.abs(self.direction))).max() > DIRECTION_ATOL)

    def with_array(self, array: np.ndarray) -> Volume:
        """Same geometry, new voxel values (shape must match)."""
        if array.shape != self.array.shape:
            raise ValueError(f"{self.name}: new array shape {array.shape} differs from {self.array.shape}")
        return replace(self, array=array)

    def same_grid(self, other: Volume) -> bool:
        """True when shape, spacing, origin and direction agree within header float tolerance."""
        return (
            self.shape == other.shape
            and np.allclose(self.spacing, other.spacing, rtol=SPACING_RTOL, atol=0)
            and np.allclose(self.origin, other.origin, atol=ORIGIN_ATOL, rtol=0)
            and np.allclose(self.direction, other.direction, atol=DIRECTION_ATOL, rtol=0)
        )

    def describe_grid(self) -> str:
        """Human-readable grid, used in error messages comparing two volumes."""
        spacing = ", ".join(f"{s:.4g}" for s in self.spacing)
        origin = ", ".join(f"{o:.4g}" for o in self.origin)
        return f"shape {self.shape}, spacing ({spacing}) mm, origin ({origin}) mm, orientation {self.orientation}"

    # SimpleITK conversion -------------------------------------------------------------------------------------
    def to_sitk(self) -> sitk.Image:
        array = self.array.astype(np.uint8) if self.array.dtype == bool else self.array
        image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(tuple(self.direction.ravel()))
        return image

    @classmethod
    def from_sitk(cls, image: sitk.Image, path: Path | None = None) -> Volume:
        if image.GetDimension() != 3:
            raise ValueError(f"{path or 'image'}: expected a 3D image, got {image.GetDimension()}D")
        array = sitk.GetArrayFromImage(image).transpose(2, 1, 0)
        return cls(
            array=np.ascontiguousarray(array), spacing=image.GetSpacing(), origin=image.GetOrigin(),
            direction=np.asarray(image.GetDirection()).reshape(3, 3), path=path,
        )
