"""Canonical orientation: an exact, invertible axis permutation and flip of a volume.

After reading, every volume is turned so its array axes point to the same anatomical directions (default RAS:
axis 0 towards the patient's right, 1 anterior, 2 superior), whatever the file format or scanner stored. Then
"axial" is array axis 2 for every subject, and a slice sampler or slab inferer means the same thing everywhere.
Nothing is interpolated: the array is transposed and reversed, and the geometry (spacing, origin, direction) is
updated so every voxel keeps its world position. Predictions are turned back with :meth:`Reorientation.invert`.

Axis codes follow MONAI/nibabel (the direction each axis *points to*); world coordinates are ITK's LPS, so
``L``, ``P``, ``S`` are the +x, +y, +z world directions and ``R``, ``A``, ``I`` their opposites. For oblique
volumes each axis is matched to its closest world axis (as nibabel's ``io_orientation``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from volsynth.data.volume import Volume

_WORLD = {"L": (0, 1.0), "R": (0, -1.0), "P": (1, 1.0), "A": (1, -1.0), "S": (2, 1.0), "I": (2, -1.0)}


def closest_world_axes(direction: np.ndarray) -> list[tuple[int, float]]:
    """For each array axis, (world axis, sign) of its closest world direction; always a permutation.

    Greedy on the largest absolute cosine first, so an oblique matrix cannot map two array axes onto one world
    axis.
    """
    magnitude = np.abs(np.asarray(direction, dtype=np.float64).reshape(3, 3))
    assignment: dict[int, tuple[int, float]] = {}
    free_world, free_axes = {0, 1, 2}, {0, 1, 2}
    while free_axes:
        world, axis = max(((w, a) for w in free_world for a in free_axes), key=lambda wa: magnitude[wa[0], wa[1]])
        sign = 1.0 if direction[world, axis] >= 0 else -1.0
        assignment[axis] = (world, sign)
        free_world.discard(world)
        free_axes.discard(axis)
    return [assignment[axis] for axis in range(3)]


def orientation_codes(direction: np.ndarray) -> str:
    """The axis codes (``RAS``, ``LPS``, …) of a direction matrix, closest axes."""
    names = {(0, 1.0): "L", (0, -1.0): "R", (1, 1.0): "P", (1, -1.0): "A", (2, 1.0): "S", (2, -1.0): "I"}
    return "".join(names[axis] for axis in closest_world_axes(direction))


@dataclass(frozen=True)
class Reorientation:
    """New axis ``k`` is old axis ``permutation[k]``, reversed when ``flips[k]``."""

    permutation: tuple[int, int, int] = (0, 1, 2)
    flips: tuple[bool, bool, bool] = (False, False, False)

    @classmethod
    def plan(cls, direction: np.ndarray, codes: str) -> Reorientation:
        """The reorientation that brings a volume with ``direction`` to axis codes ``codes`` (e.g. ``RAS``)."""
        current = closest_world_axes(direction)
        permutation, flips = [], []
        for letter in codes.upper():
            world, sign = _WORLD[letter]
            old_axis = next(a for a, (w, _) in enumerate(current) if w == world)
            permutation.append(old_axis)
            flips.append(current[old_axis][1] != sign)
        return cls((permutation[0], permutation[1], permutation[2]), (flips[0], flips[1], flips[2]))

    @property
    def is_identity(self) -> bool:
        return self.permutation == (0, 1, 2) and not any(self.flips)

    def apply_array(self, array: np.ndarray) -> np.ndarray:
        """Old array layout → new (exact; a view when possible)."""
        moved = np.transpose(array, self.permutation)
        flipped = [k for k, f in enumerate(self.flips) if f]
        return np.flip(moved, axis=flipped) if flipped else moved

    def invert_array(self, array: np.ndarray) -> np.ndarray:
        """New array layout → old (exact inverse of :meth:`apply_array`)."""
        flipped = [k for k, f in enumerate(self.flips) if f]
        unflipped = np.flip(array, axis=flipped) if flipped else array
        return np.transpose(unflipped, np.argsort(self.permutation))

    def apply(self, volume: Volume) -> Volume:
        """The same image with its axes reordered; every voxel keeps its world position."""
        if self.is_identity:
            return volume
        columns = volume.direction[:, list(self.permutation)].copy()
        spacing = np.asarray(volume.spacing)[list(self.permutation)]
        shape = np.asarray(volume.shape)[list(self.permutation)]
        origin = np.asarray(volume.origin, dtype=np.float64).copy()
        for k, flip in enumerate(self.flips):
            if flip:  # the new first voxel is the old last one along this axis
                origin += columns[:, k] * spacing[k] * (shape[k] - 1)
                columns[:, k] = -columns[:, k]
        array = np.ascontiguousarray(self.apply_array(volume.array))
        return Volume(array, tuple(spacing), tuple(origin), columns, path=volume.path)

    def to_dict(self) -> dict[str, list]:
        return {"permutation": list(self.permutation), "flips": list(self.flips)}

    @classmethod
    def from_dict(cls, data: dict) -> Reorientation:
        p, f = data["permutation"], data["flips"]
        return cls((int(p[0]), int(p[1]), int(p[2])), (bool(f[0]), bool(f[1]), bool(f[2])))
