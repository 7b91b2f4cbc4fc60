"""Modality-aware, invertible preprocessing.

Forward: (optionally resample the target onto the source grid) → reorient to the canonical axis codes (an exact
permutation/flip, :mod:`volsynth.data.orientation`) → resample to the working spacing (linear for images, nearest
for labels) → crop to the source foreground → pad each axis to a multiple of the network's divisor (and at least
the patch size) → scale intensities to [0, 1]. Every step's parameters go into a
:class:`PreprocessRecord` (JSON-serialisable), so :meth:`Preprocessor.invert` maps a prediction back onto the
input's exact grid (shape, spacing, origin, direction) and units (HU for CT).

Intensity models:

* MR: per-volume min-max to [0, 1] (the paper), or robust percentiles (default 0.5–99.5) with clipping.
* CT/CBCT: clip to [−1024, 3000] HU, then (HU + 1024) / 4024 — a fixed map, so synthetic CT returns to HU.

A synthetic MR has no "original units" (the scanner scale is arbitrary and the target is unknown at prediction
time); it is returned on the normalised [0, 1] scale, which is what the paper's metrics use.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import SimpleITK as sitk

from volsynth.config import DataConfig
from volsynth.data.orientation import Reorientation
from volsynth.data.volume import Volume

CT_RANGE = (-1024.0, 3000.0)
Kind = Literal["mr", "ct", "cbct"]


@dataclass
class IntensityScaling:
    """``scaled = (clip(x, low, high) - low) / (high - low)``; ``clip`` only for CT and percentile MR."""

    kind: str  # minmax | percentile | ct
    low: float
    high: float

    @classmethod
    def fit(cls, array: np.ndarray, kind: Kind, *, mr_normalisation: str = "minmax",
            percentiles: Sequence[float] = (0.5, 99.5)) -> IntensityScaling:
        if kind in ("ct", "cbct"):
            return cls("ct", *CT_RANGE)
        if mr_normalisation == "percentile":
            low, high = (float(v) for v in np.percentile(array, percentiles))
            return cls("percentile", low, high if high > low else low + 1.0)
        low, high = float(array.min()), float(array.max())
        return cls("minmax", low, high if high > low else low + 1.0)

    def apply(self, array: np.ndarray) -> np.ndarray:
        """Any-shape array in original units → float32 on [0, 1] (exactly, for minmax on the fitted volume)."""
        scaled = (array.astype(np.float64) - self.low) / (self.high - self.low)
        return np.clip(scaled, 0.0, 1.0).astype(np.float32)

    def invert(self, scaled: np.ndarray) -> np.ndarray:
        """[0, 1] → original units (HU for CT); values outside [0, 1] are clipped first."""
        return (np.clip(scaled.astype(np.float64), 0.0, 1.0) * (self.high - self.low) + self.low).astype(np.float32)


@dataclass
class Grid:
    """A voxel grid: shape (X, Y, Z), spacing (mm), origin (mm, LPS) and row-major 3×3 direction."""

    shape: list[int]
    spacing: list[float]
    origin: list[float]
    direction: list[float]

    @classmethod
    def of(cls, volume: Volume) -> Grid:
        return cls(list(volume.shape), list(volume.spacing), list(volume.origin), volume.direction.ravel().tolist())

    def reference(self) -> sitk.Image:
        image = sitk.Image([int(s) for s in self.shape], sitk.sitkUInt8)
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image

    def volume(self, array: np.ndarray) -> Volume:
        return Volume(array, tuple(self.spacing), tuple(self.origin), np.asarray(self.direction).reshape(3, 3))


@dataclass
class PreprocessRecord:
    """Everything needed to undo preprocessing for one subject."""

    original: Grid  # the source's grid as read
    working: Grid  # after reorientation and resampling to the working spacing (before crop/pad)
    crop_start: list[int]
    crop_stop: list[int]
    pad_before: list[int]
    pad_after: list[int]
    intensity: dict[str, IntensityScaling] = field(default_factory=dict)  # role → scaling (source, target)
    oriented: Grid | None = None  # the source's grid after reorientation (None: not reoriented)
    orientation: dict[str, list] | None = None  # Reorientation.to_dict()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PreprocessRecord:
        oriented = data.get("oriented")
        return cls(original=Grid(**data["original"]), working=Grid(**data["working"]),
                   crop_start=list(data["crop_start"]), crop_stop=list(data["crop_stop"]),
                   pad_before=list(data["pad_before"]), pad_after=list(data["pad_after"]),
                   intensity={k: IntensityScaling(**v) for k, v in data.get("intensity", {}).items()},
                   oriented=Grid(**oriented) if oriented else None, orientation=data.get("orientation"))

    @property
    def reorientation(self) -> Reorientation:
        return Reorientation.from_dict(self.orientation) if self.orientation else Reorientation()

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the preprocessed arrays."""
        return tuple(b - a + p + q for a, b, p, q in zip(self.crop_start, self.crop_stop, self.pad_before,
                                                          self.pad_after, strict=True))


def resample(volume: Volume, reference: Grid, *, label: bool = False) -> Volume:
    """Resample onto ``reference`` (linear for images, nearest for labels).

    Points just outside the input's voxel centres (the half-voxel rim a spacing change creates) take the nearest
    voxel's value instead of a fill value, so a round trip does not darken the border.
    """
    image = volume.to_sitk()
    if not label and image.GetPixelID() not in (sitk.sitkFloat32, sitk.sitkFloat64):
        image = sitk.Cast(image, sitk.sitkFloat32)
    default = 0.0 if label else float(volume.array.min())
    interpolator = sitk.sitkNearestNeighbor if label else sitk.sitkLinear
    out = sitk.Resample(image, reference.reference(), sitk.Transform(), interpolator, default,
                        image.GetPixelID(), True)
    return Volume.from_sitk(out, path=volume.path)


def working_grid(volume: Volume, spacing: Sequence[float] | None) -> Grid:
    """The grid with the same origin/direction and the requested spacing covering the same extent."""
    grid = Grid.of(volume)
    if spacing is None or np.allclose(spacing, volume.spacing, rtol=1e-4):
        return grid
    shape = [max(1, round(n * s / t)) for n, s, t in zip(volume.shape, volume.spacing, spacing, strict=True)]
    return Grid(shape, [float(s) for s in spacing], grid.origin, grid.direction)


class Preprocessor:
    """Applies (and inverts) the preprocessing described by a :class:`DataConfig`.

    Args:
        config: the data section (kinds, normalisation, orientation, sampling, foreground threshold).
        spacing: working spacing in mm (``None`` keeps each volume's own spacing).
        divisor: pad each axis to a multiple of this (the method's ``shape_divisor``; an int means all axes).
        crop_foreground: crop to the source's non-background bounding box (+ 2 voxels).
    """

    def __init__(self, config: DataConfig, *, spacing: Sequence[float] | None = None,
                 divisor: int | Sequence[int] = 8, crop_foreground: bool = True) -> None:
        self.config = config
        self.spacing = list(spacing) if spacing is not None else None
        self.divisor = [int(divisor)] * 3 if isinstance(divisor, int) else [int(d) for d in divisor]
        self.crop_foreground = crop_foreground

    @property
    def minimum_shape(self) -> list[int]:
        """Each preprocessed volume is at least a patch (patch sampling); slabs are padded by their sampler."""
        sampling = self.config.sampling
        return list(sampling.patch_size) if sampling.kind == "patch" else [1, 1, 1]

    def options(self) -> dict[str, Any]:
        """Everything that changes the preprocessed arrays (the cache key)."""
        config = self.config
        return {"spacing": self.spacing, "divisor": self.divisor, "crop": self.crop_foreground,
                "minimum": self.minimum_shape, "orientation": config.orientation,
                "source_kind": config.source_kind, "target_kind": config.target_kind,
                "norm": config.mr_normalisation, "pct": list(config.percentiles)}

    # Forward ------------------------------------------------------------------------------------------------
    def reorientation(self, volume: Volume) -> Reorientation:
        codes = self.config.orientation
        return Reorientation.plan(volume.direction, codes) if codes else Reorientation()

    def fit(self, source: Volume, target: Volume | None = None) -> PreprocessRecord:
        """Decide orientation, grids, crop/pad and intensity scalings from the source (and target) volumes."""
        reorientation = self.reorientation(source)
        oriented = reorientation.apply(source)
        working = working_grid(oriented, self.spacing)
        intensity = {"source": IntensityScaling.fit(source.array, self.config.source_kind,
                                                    mr_normalisation=self.config.mr_normalisation,
                                                    percentiles=self.config.percentiles)}
        if target is not None:
            intensity["target"] = IntensityScaling.fit(target.array, self.config.target_kind,
                                                       mr_normalisation=self.config.mr_normalisation,
                                                       percentiles=self.config.percentiles)
        resampled = self._to_working(oriented, working, label=False)
        shape = resampled.shape
        start, stop = [0, 0, 0], list(shape)
        if self.crop_foreground:
            foreground = intensity["source"].apply(resampled.array) > 0
            if foreground.any():
                coords = np.nonzero(foreground)
                margin = 2
                start = [max(0, int(c.min()) - margin) for c in coords]
                stop = [min(n, int(c.max()) + 1 + margin) for c, n in zip(coords, shape, strict=True)]
        before, after = [], []
        for a, b, m, d in zip(start, stop, self.minimum_shape, self.divisor, strict=True):
            size = b - a
            padded = -(-max(m, size) // d) * d
            before.append((padded - size) // 2)
            after.append(padded - size - (padded - size) // 2)
        return PreprocessRecord(Grid.of(source), working, start, stop, before, after, intensity,
                                oriented=Grid.of(oriented), orientation=reorientation.to_dict())

    def _to_working(self, volume: Volume, working: Grid, *, label: bool) -> Volume:
        if Grid.of(volume) == working:
            return volume
        return resample(volume, working, label=label)

    def _crop_pad(self, array: np.ndarray, record: PreprocessRecord) -> np.ndarray:
        box = tuple(slice(a, b) for a, b in zip(record.crop_start, record.crop_stop, strict=True))
        return np.pad(array[box], list(zip(record.pad_before, record.pad_after, strict=True)))

    def apply(self, volume: Volume, record: PreprocessRecord, role: str) -> np.ndarray:
        """An image (``role`` = ``source``/``target``) → float32 [0, 1] array of ``record.shape``."""
        working = self._to_working(record.reorientation.apply(volume), record.working, label=False)
        scaled = record.intensity[role].apply(working.array)
        return self._crop_pad(scaled, record)

    def apply_label(self, volume: Volume, record: PreprocessRecord) -> np.ndarray:
        """A label map or mask → integer array of ``record.shape`` (nearest-neighbour resampling)."""
        working = self._to_working(record.reorientation.apply(volume), record.working, label=True)
        return self._crop_pad(working.array, record)

    # Inverse -------------------------------------------------------------------------------------------------
    def invert(self, array: np.ndarray, record: PreprocessRecord, *, role: str = "target",
               scaling: IntensityScaling | None = None, label: bool = False) -> Volume:
        """A preprocessed-space array → a volume on the original grid, in original units when known.

        Args:
            array: ``record.shape`` array on the [0, 1] scale (or labels when ``label``).
            role: whose intensity scaling to invert (``target`` for predictions).
            scaling: overrides the record's scaling (``None`` and no record entry → stays on [0, 1]).
        """
        if tuple(array.shape) != record.shape:
            raise ValueError(f"array shape {array.shape} does not match the preprocessed shape {record.shape}")
        inner = tuple(slice(p, n - q) for p, q, n in zip(record.pad_before, record.pad_after, array.shape,
                                                           strict=True))
        working = np.zeros(record.working.shape, dtype=array.dtype)
        box = tuple(slice(a, b) for a, b in zip(record.crop_start, record.crop_stop, strict=True))
        working[box] = array[inner]
        volume = record.working.volume(working)
        oriented = record.oriented or record.original
        if record.working != oriented:
            volume = resample(volume, oriented, label=label)
        # Undo the reorientation exactly; the original grid's geometry is restored verbatim (no float drift).
        values = np.ascontiguousarray(record.reorientation.invert_array(volume.array))
        volume = record.original.volume(values)
        if label:
            return volume
        scaling = scaling or record.intensity.get(role)
        restored = scaling.invert(volume.array) if scaling is not None else np.clip(volume.array, 0, 1)
        return volume.with_array(restored.astype(np.float32))


def prediction_scaling(kind: Kind) -> IntensityScaling | None:
    """How a synthetic volume of this modality kind returns to units: HU for CT/CBCT, [0, 1] for MR."""
    return IntensityScaling("ct", *CT_RANGE) if kind in ("ct", "cbct") else None
