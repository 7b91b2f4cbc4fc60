"""Training items drawn from prepared subjects: 3D patches or slabs of slices, paired or unpaired.

Sampling is a pure function of a numpy ``Generator``: the trainer derives one per iteration from
``(seed, iteration, rank)``, which makes runs repeatable and resumable bit-exactly, and gives every rank of a
distributed run different items.

* :class:`PatchSampler` — cubes from one subject per step (the paper: 1 volume × 3 foreground-centred crops).
* :class:`SlabSampler` — ``depth`` consecutive slices along the canonical slice axis (``all`` = the whole
  volume), each item from its own subject, every slice padded or cropped to ``in_plane``. The slice axis is moved
  last: items are ``(B, 1, H, W, D)``.

Every sampler returns ``source``, ``target``, ``mask``, ``source_label`` and ``target_label`` (``None`` when
absent). Unpaired sampling draws the target side from another subject, with that subject's own label map.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

import numpy as np

from volsynth.config import SamplingConfig
from volsynth.errors import ConfigError, DataError

if TYPE_CHECKING:  # the cache reads images (SimpleITK); sampling itself needs only arrays
    from volsynth.data.cache import PreparedSubject

Items = dict[str, np.ndarray | None]
KEYS = ("source", "target", "mask", "source_label", "target_label")


class Sampler(Protocol):
    def sample(self, rng: np.random.Generator) -> Items: ...


def window(array: np.ndarray | None, start: Sequence[int], size: Sequence[int]) -> np.ndarray | None:
    """``array[start : start + size]`` per axis, zero-padded where the window leaves the array."""
    if array is None:
        return None
    inside = tuple(slice(max(s, 0), min(s + n, dim)) for s, n, dim in zip(start, size, array.shape, strict=True))
    block = np.asarray(array[inside])
    before = [max(0, -s) for s in start]
    after = [n - b - k for n, b, k in zip(size, before, block.shape, strict=True)]
    if any(before) or any(after):
        block = np.pad(block, list(zip(before, after, strict=True)))
    return block


def centred_start(centre: int, size: int, length: int) -> int:
    """First index of a ``size`` window around ``centre``: kept inside the array when it fits, else centred."""
    if length >= size:
        return int(min(max(centre - size // 2, 0), length - size))
    return -((size - length) // 2)  # smaller than the window: centre the array inside it (zero padding)


class HasCentres(Protocol):
    """What centre drawing needs of a subject: its shape and flat indices of foreground voxels per key."""

    @property
    def shape(self) -> tuple[int, int, int]: ...

    centres: dict[str, np.ndarray]


def label_centres(label: np.ndarray | None) -> list[np.ndarray]:
    """Flat indices of each label value above 0 present in ``label`` (ascending values); [] without a map."""
    if label is None:
        return []
    flat = np.asarray(label).ravel()
    return [np.flatnonzero(flat == value) for value in np.unique(flat) if value > 0]


def random_centre(subject: HasCentres, key: str, rng: np.random.Generator, foreground_probability: float,
                  class_probability: float = 0.0, classes: Sequence[np.ndarray] = ()) -> tuple[int, int, int]:
    """An item centre for ``subject``, drawn in this order of chances:

    * ``class_probability``: a voxel of one label class, the class drawn uniformly among ``classes`` (nnU-Net's
      class-balanced oversampling: small structures such as lesions are seen as often as large ones);
    * ``foreground_probability``: a voxel of the subject's ``key`` foreground;
    * otherwise any voxel.
    """
    pool = None  # flat voxel indices to draw the centre from
    if class_probability > 0 and classes and rng.random() < class_probability:
        pool = classes[int(rng.integers(len(classes)))]
    else:
        centres = subject.centres.get(key)
        if centres is not None and len(centres) and rng.random() < foreground_probability:
            pool = centres
    if pool is None:
        return tuple(int(rng.integers(n)) for n in subject.shape)  # type: ignore[return-value]
    index = np.unravel_index(int(pool[rng.integers(len(pool))]), subject.shape)
    return int(index[0]), int(index[1]), int(index[2])


def _target_subjects(subjects: list[PreparedSubject], paired: bool) -> list[PreparedSubject]:
    """Subjects that can give a target item (unpaired cohorts may hold source-only subjects)."""
    targets = [s for s in subjects if s.target is not None]
    if not targets:
        raise DataError("no training subject has a target image")
    if paired and len(targets) != len(subjects):
        missing = next(s.subject for s in subjects if s.target is None)
        raise DataError(f"subject {missing}: no target image, but the method trains on registered pairs")
    return targets


def _stack(blocks: list[np.ndarray | None], dtype: type) -> np.ndarray | None:
    if any(b is None for b in blocks):
        return None
    return np.stack([np.asarray(b, dtype=dtype) for b in blocks])[:, None]  # type: ignore[arg-type]


class PatchSampler:
    """Aligned 3D patches from one subject per step (paired), or from two subjects (unpaired)."""

    def __init__(self, subjects: Sequence[PreparedSubject], patch_size: Sequence[int], *, per_step: int = 3,
                 foreground_probability: float = 1.0, class_probability: float = 0.0, paired: bool = True,
                 threshold: float = 0.1, flip_axes: Sequence[int] = ()) -> None:
        if not subjects:
            raise DataError("no training subjects to sample patches from")
        self.flip_axes = tuple(int(a) for a in flip_axes)
        self.subjects = list(subjects)
        self.patch_size = tuple(int(p) for p in patch_size)
        self.per_step = per_step
        self.foreground_probability = foreground_probability
        self.class_probability = class_probability
        # Per subject, the voxels of each label class (built on first use: only class-balanced sampling needs it).
        self._classes: dict[str, list[np.ndarray]] = {}
        self.paired = paired
        self.threshold = threshold
        self.targets = _target_subjects(self.subjects, paired)
        for s in self.subjects:
            if any(n < p for n, p in zip(s.shape, self.patch_size, strict=True)):
                raise DataError(f"subject {s.subject}: preprocessed shape {s.shape} is smaller than the patch size "
                                f"{self.patch_size}")

    def _starts(self, subject: PreparedSubject, key: str, rng: np.random.Generator) -> list[tuple[int, ...]]:
        starts = []
        classes = self._label_classes(subject)
        for _ in range(self.per_step):
            centre = random_centre(subject, key, rng, self.foreground_probability, self.class_probability, classes)
            starts.append(tuple(centred_start(c, p, n) for c, p, n in zip(centre, self.patch_size, subject.shape,
                                                                            strict=True)))
        return starts

    def _label_classes(self, subject: PreparedSubject) -> list[np.ndarray]:
        if self.class_probability <= 0:
            return []
        if subject.subject not in self._classes:
            self._classes[subject.subject] = label_centres(subject.label)
        return self._classes[subject.subject]

    def _crop(self, array: np.ndarray | None, starts: list[tuple[int, ...]], dtype: type = np.float32
              ) -> np.ndarray | None:
        return _stack([window(array, s, self.patch_size) for s in starts], dtype) if array is not None else None

    def sample(self, rng: np.random.Generator) -> Items:
        """One step's patches: float32 ``(B, 1, *patch)`` images, int64 label maps, or None; each item mirrored
        along each of ``flip_axes`` with chance 1/2 (all its arrays alike)."""
        items = self._sample(rng)
        return mirror_items(items, self.flip_axes, rng) if self.flip_axes else items

    def _sample(self, rng: np.random.Generator) -> Items:
        subject = self.subjects[int(rng.integers(len(self.subjects)))]
        if self.paired:
            starts = self._starts(subject, "pair", rng)
            source, target = self._crop(subject.source, starts), self._crop(subject.target, starts)
            mask = self._crop(subject.mask, starts)
            if mask is None and target is not None:  # the paper's foreground: both sides above the threshold
                mask = ((source > self.threshold) & (target > self.threshold)).astype(np.float32)  # type: ignore[operator]
            label = self._crop(subject.label, starts, np.int64)
            return {"source": source, "target": target, "mask": mask, "source_label": label, "target_label": label}
        other = self.targets[int(rng.integers(len(self.targets)))]
        starts, target_starts = self._starts(subject, "source", rng), self._starts(other, "target", rng)
        return {"source": self._crop(subject.source, starts), "target": self._crop(other.target, target_starts),
                "mask": None, "source_label": self._crop(subject.label, starts, np.int64),
                "target_label": self._crop(other.label, target_starts, np.int64)}


def mirror_items(items: Items, axes: Sequence[int], rng: np.random.Generator) -> Items:
    """Flip item ``b`` of every ``(B, 1, X, Y, Z)`` array in ``items`` along spatial axis ``a`` when a draw of
    ``rng`` (one per item and axis, in that order) is below 1/2. The source, target, mask and labels of an item
    are flipped alike, so a pair stays aligned. The input arrays are left as they are."""
    out = {key: (None if array is None else array.copy()) for key, array in items.items()}
    present = [array for array in out.values() if array is not None]
    for b in range(present[0].shape[0] if present else 0):
        for axis in axes:
            if rng.random() < 0.5:
                for array in present:
                    array[b] = np.flip(array[b], axis=1 + axis).copy()  # a copy: source and destination overlap
    return out


class SlabSampler:
    """Slabs of ``depth`` slices along ``axis`` (``"all"``: the whole volume), each from its own subject.

    In-plane, a slice larger than ``in_plane`` is cropped around the drawn foreground voxel (DRIT++'s random crop,
    foreground-biased); a smaller one is centred and zero-padded. With ``depth="all"`` the slabs of one batch are
    zero-padded along the slice axis to the deepest of them.
    """

    def __init__(self, subjects: Sequence[PreparedSubject], *, axis: int = 2, depth: int | str = 1,
                 in_plane: Sequence[int] = (64, 64), per_step: int = 3, foreground_probability: float = 1.0,
                 paired: bool = True, threshold: float = 0.1, flip_axes: Sequence[int] = ()) -> None:
        if not subjects:
            raise DataError("no training subjects to sample slabs from")
        self.subjects = list(subjects)
        self.axis = int(axis)
        self.depth = depth
        self.in_plane = (int(in_plane[0]), int(in_plane[1]))
        self.per_step = per_step
        self.foreground_probability = foreground_probability
        self.paired = paired
        self.threshold = threshold
        self.targets = _target_subjects(self.subjects, paired)
        self.plane_axes = [a for a in range(3) if a != self.axis]
        # Canonical axes → positions in a (H, W, D) slab (the slice axis is moved last).
        self.flip_positions = tuple(self.plane_axes.index(a) if a in self.plane_axes else 2 for a in flip_axes)

    def _item(self, subject: PreparedSubject, key: str, rng: np.random.Generator) -> tuple[int, ...]:
        """Start index per axis (in the subject's own axis order) of one slab."""
        centre = random_centre(subject, key, rng, self.foreground_probability)
        starts = [0, 0, 0]
        for a, size in zip(self.plane_axes, self.in_plane, strict=True):
            starts[a] = centred_start(centre[a], size, subject.shape[a])
        length = subject.shape[self.axis]
        depth = length if self.depth == "all" else int(self.depth)
        starts[self.axis] = 0 if self.depth == "all" else centred_start(centre[self.axis], depth, length)
        return tuple(starts)

    def _size(self, subject: PreparedSubject) -> list[int]:
        size = [0, 0, 0]
        for a, n in zip(self.plane_axes, self.in_plane, strict=True):
            size[a] = n
        size[self.axis] = subject.shape[self.axis] if self.depth == "all" else int(self.depth)
        return size

    def _crop(self, subject: PreparedSubject, array: np.ndarray | None, start: tuple[int, ...], depth: int,
              dtype: type = np.float32) -> np.ndarray | None:
        if array is None:
            return None
        size = self._size(subject)
        size[self.axis] = depth  # "all": pad to the batch's deepest slab
        block = window(array, start, size)
        return np.moveaxis(block, self.axis, -1).astype(dtype)  # type: ignore[union-attr]

    def sample(self, rng: np.random.Generator) -> Items:
        """One step's slabs: float32 ``(B, 1, H, W, D)`` images, int64 label maps, or None; each item mirrored
        along each of ``flip_axes`` with chance 1/2 (all its arrays alike)."""
        items = self._sample(rng)
        return mirror_items(items, self.flip_positions, rng) if self.flip_positions else items

    def _sample(self, rng: np.random.Generator) -> Items:
        picks = []
        for _ in range(self.per_step):
            subject = self.subjects[int(rng.integers(len(self.subjects)))]
            other = subject if self.paired else self.targets[int(rng.integers(len(self.targets)))]
            source_start = self._item(subject, "pair" if self.paired else "source", rng)
            target_start = source_start if self.paired else self._item(other, "target", rng)
            picks.append((subject, source_start, other, target_start))
        depth = max(max(s.shape[self.axis], o.shape[self.axis]) for s, _, o, _ in picks) if self.depth == "all" \
            else int(self.depth)
        source = _stack([self._crop(s, s.source, a, depth) for s, a, _, _ in picks], np.float32)
        target = _stack([self._crop(o, o.target, b, depth) for _, _, o, b in picks], np.float32)
        source_label = _stack([self._crop(s, s.label, a, depth, np.int64) for s, a, _, _ in picks], np.int64)
        target_label = _stack([self._crop(o, o.label, b, depth, np.int64) for _, _, o, b in picks], np.int64)
        mask = None
        if self.paired and source is not None and target is not None:
            mask = ((source > self.threshold) & (target > self.threshold)).astype(np.float32)
        return {"source": source, "target": target, "mask": mask, "source_label": source_label,
                "target_label": target_label}


def build_sampler(sampling: SamplingConfig, subjects: Sequence[PreparedSubject], *, paired: bool) -> Sampler:
    """The sampler ``data.sampling`` describes, over prepared training subjects."""
    if sampling.kind == "patch":
        return PatchSampler(subjects, sampling.patch_size, per_step=sampling.per_step,
                            foreground_probability=sampling.foreground_probability,
                            class_probability=sampling.class_probability, paired=paired,
                            threshold=sampling.foreground_threshold, flip_axes=sampling.flip_axes)
    if sampling.kind == "slab":
        return SlabSampler(subjects, axis=sampling.axis, depth=sampling.depth, in_plane=sampling.in_plane,
                           per_step=sampling.per_step, foreground_probability=sampling.foreground_probability,
                           paired=paired, threshold=sampling.foreground_threshold, flip_axes=sampling.flip_axes)
    raise ConfigError(f"data.sampling.kind: unknown kind {sampling.kind!r}")
