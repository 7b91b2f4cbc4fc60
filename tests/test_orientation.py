"""Canonical orientation: exact, invertible, the same anatomical axes for every file (checked against ITK)."""

import itertools
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy.spatial.transform import Rotation

from volsynth.config import DataConfig, SamplingConfig
from volsynth.data.io import read_volume, write_volume
from volsynth.data.orientation import Reorientation, orientation_codes
from volsynth.data.preprocess import Preprocessor
from volsynth.data.volume import Volume

OBLIQUE = Rotation.from_euler("xyz", [12, -9, 17], degrees=True).as_matrix()
# LPS world: identity direction points L, P, S.
FLIPPED_LAS = np.diag([1.0, -1.0, 1.0])  # axis 1 points anterior
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


def signed_permutations() -> list[np.ndarray]:
    matrices = []
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product((1.0, -1.0), repeat=3):
            matrix = np.zeros((3, 3))
            for column, (row, sign) in enumerate(zip(perm, signs, strict=True)):
                matrix[row, column] = sign
            matrices.append(matrix)
    return matrices


def world_points(volume: Volume, indices: np.ndarray) -> np.ndarray:
    return volume.origin + (volume.direction @ (np.asarray(volume.spacing)[:, None] * indices.T)).T


@pytest.mark.parametrize("direction", [*signed_permutations(), OBLIQUE, OBLIQUE @ LPS_TO_RAS, OBLIQUE[:, [2, 0, 1]]])
def test_reorientation_keeps_every_voxel_in_place_and_inverts_exactly(direction: np.ndarray) -> None:
    rng = np.random.default_rng(0)
    volume = Volume(rng.random((5, 7, 4)).astype(np.float32), (1.0, 1.5, 2.5), (3.0, -7.0, 11.0), direction)
    plan = Reorientation.plan(volume.direction, "RAS")
    turned = plan.apply(volume)
    assert orientation_codes(turned.direction) == "RAS"
    # Every voxel value sits at the same world position before and after.
    old_index = np.array(list(itertools.product(*(range(n) for n in volume.shape))))
    new_volume_positions = world_points(volume, old_index)
    new_index = np.rint(np.linalg.solve(turned.direction * np.asarray(turned.spacing)[None, :],
                                        (new_volume_positions - turned.origin).T).T).astype(int)
    np.testing.assert_array_equal(turned.array[tuple(new_index.T)], volume.array[tuple(old_index.T)])
    np.testing.assert_array_equal(plan.invert_array(turned.array), volume.array)


@pytest.mark.parametrize("direction", [np.eye(3), FLIPPED_LAS, LPS_TO_RAS, np.diag([-1.0, 1.0, -1.0])])
def test_agrees_with_simpleitk_dicomorient(direction: np.ndarray) -> None:
    rng = np.random.default_rng(1)
    volume = Volume(rng.random((6, 5, 4)).astype(np.float32), (1.0, 2.0, 3.0), (1.0, 2.0, 3.0), direction)
    ours = Reorientation.plan(volume.direction, "RAS").apply(volume)
    # SimpleITK's DICOMOrient uses the same "axis points to" codes in LPS world (identity direction = "LPS").
    theirs = Volume.from_sitk(sitk.DICOMOrient(volume.to_sitk(), "RAS"))
    np.testing.assert_array_equal(ours.array, theirs.array)
    np.testing.assert_allclose(ours.direction, theirs.direction, atol=1e-12)
    np.testing.assert_allclose(ours.origin, theirs.origin, atol=1e-9)


def test_axial_is_the_same_axis_for_lps_ras_and_oblique_files(tmp_path: Path) -> None:
    """The same anatomy stored three ways gives the same preprocessed array (axis 2 = inferior → superior)."""
    rng = np.random.default_rng(2)
    anatomy = (rng.random((12, 10, 8)) * 100).astype(np.float32)  # RAS-ordered array
    ras = Volume(anatomy, (2.0, 2.0, 2.0), (0.0, 0.0, 0.0), LPS_TO_RAS)
    lps = Reorientation.plan(ras.direction, "LPS").apply(ras)  # same image, stored as LPS
    sar = Reorientation.plan(ras.direction, "SAR").apply(ras)  # stored with the slice axis first
    config = DataConfig(sampling=SamplingConfig(patch_size=(8, 8, 8)))
    preprocessor = Preprocessor(config, divisor=1, crop_foreground=False)
    arrays = []
    for name, volume in (("ras", ras), ("lps", lps), ("sar", sar)):
        path = write_volume(volume, tmp_path / f"{name}.nii.gz")
        read = read_volume(path)
        record = preprocessor.fit(read)
        arrays.append(preprocessor.apply(read, record, "source"))
        back = preprocessor.invert(arrays[-1], record, role="source")
        assert back.same_grid(read)
        np.testing.assert_allclose(back.array, read.array, rtol=1e-5, atol=1e-3)
    np.testing.assert_array_equal(arrays[0], arrays[1])
    np.testing.assert_array_equal(arrays[0], arrays[2])
    assert arrays[0].shape == (12, 10, 8)


def test_orientation_off_keeps_the_file_order() -> None:
    volume = Volume(np.arange(24, dtype=np.float32).reshape(2, 3, 4) + 1, (1, 1, 1), (0, 0, 0), FLIPPED_LAS)
    config = DataConfig(orientation=None, sampling=SamplingConfig(patch_size=(1, 1, 1)))
    preprocessor = Preprocessor(config, divisor=1, crop_foreground=False)
    record = preprocessor.fit(volume)
    assert preprocessor.apply(volume, record, "source").shape == (2, 3, 4)
    turned = Preprocessor(DataConfig(sampling=SamplingConfig(patch_size=(1, 1, 1))), divisor=1,
                          crop_foreground=False)
    record = turned.fit(volume)
    flipped = turned.apply(volume, record, "source")
    np.testing.assert_array_equal(flipped, np.flip(preprocessor.apply(volume, preprocessor.fit(volume), "source"),
                                                   axis=(0,)))
