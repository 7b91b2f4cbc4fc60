"""Training items: patches and slabs, paired and unpaired, with label maps on both sides."""

from pathlib import Path

import numpy as np
import pytest

from volsynth.config import DataConfig, SamplingConfig
from volsynth.data.cache import PreparedSubject, prepare_subject
from volsynth.data.manifest import load_manifest
from volsynth.data.preprocess import Preprocessor
from volsynth.data.sampling import PatchSampler, SlabSampler, centred_start, label_centres, window
from volsynth.errors import DataError


def prepared(cohort: Path, tmp_path: Path, sampling: SamplingConfig, divisor: tuple = (8, 8, 8)
             ) -> list[PreparedSubject]:
    manifest = load_manifest(cohort)
    preprocessor = Preprocessor(DataConfig(sampling=sampling), divisor=divisor)
    return [prepare_subject(s, source="t1", target="t2", preprocessor=preprocessor, cache_dir=tmp_path / "c",
                            labels=sampling.labels) for s in manifest.subjects]


def locate(block: np.ndarray, volume: np.ndarray) -> list[tuple[int, ...]]:
    """Every corner where ``block`` occurs in ``volume`` (brute force, tiny arrays)."""
    size = block.shape
    return [c for c in np.ndindex(*(n - s + 1 for n, s in zip(volume.shape, size, strict=True)))
            if np.array_equal(volume[tuple(slice(a, a + s) for a, s in zip(c, size, strict=True))], block)]


def test_window_pads_outside_the_array() -> None:
    array = np.arange(1, 10, dtype=float).reshape(3, 3)
    np.testing.assert_array_equal(window(array, (-1, 1), (3, 3)), [[0, 0, 0], [2, 3, 0], [5, 6, 0]])
    assert centred_start(0, 4, 10) == 0 and centred_start(9, 4, 10) == 6 and centred_start(5, 4, 10) == 3
    assert centred_start(1, 6, 2) == -2  # smaller than the window: centred with zero padding


def test_patches_are_aligned_foreground_deterministic_and_carry_labels(cohort: Path, tmp_path: Path) -> None:
    sampling = SamplingConfig(patch_size=(8, 8, 8), foreground_threshold=0.3, labels="label")
    subjects = prepared(cohort, tmp_path, sampling)
    assert isinstance(subjects[0].source, np.memmap)  # streamed from disk, not held in memory
    sampler = PatchSampler(subjects, (8, 8, 8), per_step=3, threshold=0.3)
    a, b = sampler.sample(np.random.default_rng(5)), sampler.sample(np.random.default_rng(5))
    for key in ("source", "target", "mask", "source_label", "target_label"):
        np.testing.assert_array_equal(a[key], b[key])
    assert a["source"].shape == (3, 1, 8, 8, 8) and a["source_label"].dtype == np.int64
    np.testing.assert_array_equal(a["source_label"], a["target_label"])  # paired: one label map
    centre = (slice(None), 0, 4, 4, 4)
    for seed in range(10):
        items = sampler.sample(np.random.default_rng(seed))
        assert np.all((items["source"][centre] > 0.3) & (items["target"][centre] > 0.3))
    # Alignment: source, target and label come from the same corner of the same subject.
    items = sampler.sample(np.random.default_rng(1))
    hits = [(s, c) for s in subjects for c in locate(items["source"][0, 0], np.asarray(s.source))]
    assert hits
    subject, corner = hits[0]
    box = tuple(slice(c, c + 8) for c in corner)
    np.testing.assert_array_equal(np.asarray(subject.target)[box], items["target"][0, 0])
    np.testing.assert_array_equal(np.asarray(subject.label)[box], items["source_label"][0, 0])
    # A second preparation reuses the cache and yields identical arrays.
    again = prepared(cohort, tmp_path, sampling)
    np.testing.assert_array_equal(again[0].target, subjects[0].target)


def coded_subject(index: int, shape: tuple[int, int, int]) -> PreparedSubject:
    """A subject whose voxel values encode (subject, x, y, z); 0 only in padding."""
    x, y, z = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    code = (index * 1_000_000 + x * 10_000 + y * 100 + z + 1).astype(np.float64)
    return PreparedSubject(f"s{index}", code, code + 0.5, (z % 3 + 1).astype(np.int16), None, None,  # type: ignore[arg-type]
                           {"pair": np.arange(code.size), "source": np.arange(code.size),
                            "target": np.arange(code.size)})


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_slabs_are_consecutive_slices_with_the_slice_axis_last(axis: int) -> None:
    subjects = [coded_subject(1, (20, 9, 14)), coded_subject(2, (20, 9, 14))]
    sampler = SlabSampler(subjects, axis=axis, depth=3, in_plane=(12, 12), per_step=5)
    items = sampler.sample(np.random.default_rng(axis))
    assert items["source"].shape == (5, 1, 12, 12, 3)
    np.testing.assert_array_equal(items["target"] - items["source"], np.where(items["source"] > 0, 0.5, 0))
    for item in items["source"][:, 0]:
        inside = item[item > 0].astype(np.int64) - 1
        subject, rest = np.divmod(inside, 1_000_000)
        coords = np.stack([rest // 10_000, rest // 100 % 100, rest % 100])
        assert len(set(subject.tolist())) == 1  # one subject per slab
        # along the last axis of the item: consecutive slices of the subject's `axis`, in order
        for k in range(2):
            a, b = item[..., k], item[..., k + 1]
            both = (a > 0) & (b > 0)
            np.testing.assert_array_equal(b[both] - a[both], {0: 10_000, 1: 100, 2: 1}[axis])
        plane = [c for c in range(3) if c != axis]
        assert np.ptp(coords[plane[0]]) <= 11 and np.ptp(coords[plane[1]]) <= 11
    if axis == 2:  # the 9-voxel y axis is centred in the 12-voxel item: one zero row before, two after
        rows = items["source"][0, 0].any(axis=(0, 2))
        np.testing.assert_array_equal(rows, [False] + [True] * 9 + [False] * 2)
    np.testing.assert_array_equal(items["source_label"], items["target_label"])


def test_whole_volume_slabs_and_unpaired_labels_on_both_sides(cohort: Path, tmp_path: Path) -> None:
    sampling = SamplingConfig(kind="slab", depth="all", in_plane=(32, 32), per_step=2, labels="tissue")
    subjects = prepared(cohort, tmp_path, sampling, divisor=(8, 8, 1))
    sampler = SlabSampler(subjects, axis=2, depth="all", in_plane=(32, 32), per_step=2, paired=False)
    items = sampler.sample(np.random.default_rng(3))
    depth = max(s.shape[2] for s in subjects)
    assert items["source"].shape == (2, 1, 32, 32, depth) and items["mask"] is None
    assert items["source_label"] is not None and items["target_label"] is not None
    # Unpaired: each side's label map belongs to its own image (label > 0 exactly where that image is brain).
    for side in ("source", "target"):
        brain = items[f"{side}_label"] > 0
        assert np.all(items[side][brain] > 0)
    rng = np.random.default_rng(0)
    pairs = [SlabSampler(subjects, depth=1, in_plane=(32, 32), per_step=1, paired=False).sample(rng)
             for _ in range(20)]
    assert any(not np.array_equal(p["source_label"], p["target_label"]) for p in pairs)


def test_unpaired_sampling_needs_a_target_somewhere(cohort: Path, tmp_path: Path) -> None:
    subjects = prepared(cohort, tmp_path, SamplingConfig(patch_size=(8, 8, 8)))
    no_target = [PreparedSubject(s.subject, s.source, None, None, None, s.record, s.centres) for s in subjects]
    with pytest.raises(DataError, match="no training subject has a target image"):
        PatchSampler(no_target, (8, 8, 8), paired=False)
    with pytest.raises(DataError, match="trains on registered pairs"):
        PatchSampler([*subjects, no_target[0]], (8, 8, 8), paired=True)


def test_missing_tissue_maps_are_refused_or_segmented(cohort: Path, tmp_path: Path) -> None:
    manifest = load_manifest(cohort)
    subject = manifest.subjects[0]
    subject.extra.pop("tissue")  # this subject has no tissue map
    sampling = SamplingConfig(kind="slab", in_plane=(32, 32), labels="tissue")
    preprocessor = Preprocessor(DataConfig(sampling=sampling), divisor=(8, 8, 1))
    with pytest.raises(DataError, match=f"subject {subject.subject}: no 'tissue' map.*missing_labels=segment"):
        prepare_subject(subject, source="t1", target="t2", preprocessor=preprocessor, cache_dir=tmp_path / "c",
                        labels="tissue")
    made = prepare_subject(subject, source="t1", target="t2", preprocessor=preprocessor, cache_dir=tmp_path / "c",
                           labels="tissue", missing_labels="segment")
    labels = np.asarray(made.label)
    assert set(np.unique(labels)) <= {0, 1, 2, 3} and {1, 2, 3} <= set(np.unique(labels))
    # The segmenter's classes follow the source intensity order of T1: CSF darkest, WM brightest.
    source = np.asarray(made.source)
    means = [source[labels == k].mean() for k in (1, 2, 3)]
    assert means[0] < means[1] < means[2]


def test_label_centres_list_each_class_above_zero() -> None:
    label = np.array([[[0, 2], [5, 2]], [[0, 0], [2, 5]]], dtype=np.int16)
    centres = label_centres(label)
    assert [c.tolist() for c in centres] == [[1, 3, 6], [2, 7]]  # class 2, then class 5 (flat C order)
    assert label_centres(None) == []


def test_class_balanced_patches_see_a_rare_class_as_often_as_a_common_one() -> None:
    """nnU-Net's oversampling: with class_probability 1, each present class centres a third of the patches,
    although class 3 holds 1 voxel of 512; with 0 the class never decides (foreground draws as before)."""
    shape = (8, 8, 8)
    label = np.ones(shape, dtype=np.int16)
    label[:, :, 4:] = 2
    label[6, 6, 6] = 3  # a one-voxel "lesion"
    code = np.arange(np.prod(shape), dtype=np.float64).reshape(shape) + 1
    subject = PreparedSubject("s", code, code + 0.5, label, None, None,  # type: ignore[arg-type]
                              {"pair": np.arange(code.size)})
    sampler = PatchSampler([subject], (1, 1, 1), per_step=3000, class_probability=1.0)
    centres = sampler.sample(np.random.default_rng(0))["source_label"].ravel()
    counts = np.bincount(centres, minlength=4)[1:] / centres.size
    assert counts == pytest.approx([1 / 3] * 3, abs=0.03)
    plain = PatchSampler([subject], (1, 1, 1), per_step=3000, class_probability=0.0)
    reference = PatchSampler([subject], (1, 1, 1), per_step=3000)
    drawn = plain.sample(np.random.default_rng(0))["source"]
    np.testing.assert_array_equal(drawn, reference.sample(np.random.default_rng(0))["source"])
    assert (plain.sample(np.random.default_rng(1))["source_label"] == 3).mean() < 0.01


def test_class_probability_needs_a_label_map_and_patches() -> None:
    from volsynth.errors import ConfigError
    from volsynth.experiment import load_config

    with pytest.raises(ConfigError, match=r"data\.sampling\.class_probability must be 0 unless"):
        load_config("regression_unet-cpu", ["data.sampling.class_probability=0.3"])
    with pytest.raises(ConfigError, match=r"class_probability must be in \[0, 1\]"):
        load_config("regression_unet-cpu", ["data.sampling.labels=tissue", "data.sampling.class_probability=2"])
    config = load_config("regression_unet-cpu", ["data.sampling.labels=tissue", "data.sampling.class_probability=0.3"])
    assert config.data.sampling.class_probability == 0.3


def test_flipped_patches_keep_pairs_aligned_and_flip_each_axis_half_the_time() -> None:
    """data.sampling.flip_axes: every array of an item is mirrored alike (source, target, mask and labels stay
    voxel-aligned), each listed axis about half the time, the others never; off, the stream is unchanged."""
    shape = (6, 6, 6)
    code = np.arange(np.prod(shape), dtype=np.float64).reshape(shape) + 1
    label = (np.arange(np.prod(shape)).reshape(shape) % 7).astype(np.int16)
    subject = PreparedSubject("s", code, code * 10, label, None, None,  # type: ignore[arg-type]
                              {"pair": np.arange(code.size)})
    whole = (6, 6, 6)  # the whole volume, so every flip is visible against the original
    items = PatchSampler([subject], whole, per_step=400, flip_axes=(0, 2)).sample(np.random.default_rng(0))
    source, target, labels = items["source"], items["target"], items["source_label"]
    np.testing.assert_array_equal(target, source * 10)  # the pair flipped alike
    flipped = {axis: 0 for axis in range(3)}
    for item, item_labels in zip(source[:, 0], labels[:, 0], strict=True):
        matched = [f for f in ((), (0,), (2,), (0, 2)) if np.array_equal(item, np.flip(code, axis=f) if f else code)]
        assert len(matched) == 1  # exactly one combination of the listed axes, never axis 1
        np.testing.assert_array_equal(item_labels, np.flip(label, axis=matched[0]) if matched[0] else label)
        for axis in matched[0]:
            flipped[axis] += 1
    assert flipped[1] == 0 and 0.4 < flipped[0] / 400 < 0.6 and 0.4 < flipped[2] / 400 < 0.6
    plain = PatchSampler([subject], (3, 3, 3), per_step=5).sample(np.random.default_rng(1))["source"]
    off = PatchSampler([subject], (3, 3, 3), per_step=5, flip_axes=()).sample(np.random.default_rng(1))["source"]
    np.testing.assert_array_equal(plain, off)


def test_flip_axes_are_checked() -> None:
    from volsynth.errors import ConfigError
    from volsynth.experiment import load_config

    assert load_config("regression_unet-cpu", ["data.sampling.flip_axes=[0]"]).data.sampling.flip_axes == (0,)
    with pytest.raises(ConfigError, match=r"flip_axes must be distinct axes among 0, 1, 2"):
        load_config("regression_unet-cpu", ["data.sampling.flip_axes=[3]"])

def test_flipped_slabs_mirror_the_named_canonical_axis() -> None:
    """A slab's arrays are (H, W, D) with the slice axis last: canonical axis 2 (the slice axis here) flips D,
    canonical axis 0 flips H; the pair stays aligned."""
    shape = (4, 5, 6)
    code = np.arange(np.prod(shape), dtype=np.float64).reshape(shape) + 1
    subject = PreparedSubject("s", code, code * 10, None, None, None,  # type: ignore[arg-type]
                              {"pair": np.arange(code.size)})
    for axis, position in ((2, 2), (0, 0)):
        sampler = SlabSampler([subject], axis=2, depth="all", in_plane=(4, 5), per_step=200, flip_axes=(axis,))
        items = sampler.sample(np.random.default_rng(0))
        np.testing.assert_array_equal(items["target"], items["source"] * 10)
        flips = [np.array_equal(item, np.flip(code, position)) for item in items["source"][:, 0]]
        plain = [np.array_equal(item, code) for item in items["source"][:, 0]]
        assert all(f != p for f, p in zip(flips, plain, strict=True)) and 0.4 < np.mean(flips) < 0.6
