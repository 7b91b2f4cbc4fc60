import gzip
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy.spatial.transform import Rotation

from volsynth.data.io import VolumeError, read_volume, write_volume
from volsynth.data.volume import Volume

OBLIQUE = Rotation.from_euler("xyz", [12, -25, 33], degrees=True).as_matrix()


def make(dtype: type = np.float32, direction: np.ndarray = OBLIQUE) -> Volume:
    rng = np.random.default_rng(1)
    array = (rng.random((6, 7, 5)) * 2000 - 1000).astype(dtype)
    return Volume(array, (0.7, 0.9, 2.5), (12.5, -30.25, 48.0), direction)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha", ".mhd"])
@pytest.mark.parametrize("direction", [OBLIQUE, np.diag([-1.0, -1.0, 1.0]), np.array([[0, 0, 1], [1, 0, 0],
                                                                                      [0, 1, 0.0]])])
def test_write_read_is_geometry_exact(tmp_path: Path, suffix: str, direction: np.ndarray) -> None:
    volume = make(direction=direction)
    back = read_volume(write_volume(volume, tmp_path / f"img{suffix}"))
    assert back.same_grid(volume)
    np.testing.assert_allclose(back.direction, volume.direction, atol=1e-6)
    np.testing.assert_allclose(back.origin, volume.origin, atol=1e-5)
    np.testing.assert_array_equal(back.array, volume.array)
    assert back.array.dtype == np.float32


def test_orientation_codes() -> None:
    assert make(direction=np.eye(3)).orientation == "LPS"
    assert make(direction=np.diag([-1.0, -1.0, 1.0])).orientation == "RAS"
    assert make(direction=OBLIQUE).is_oblique and not make(direction=np.eye(3)).is_oblique


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd"])
def test_labels_stay_integer(tmp_path: Path, suffix: str) -> None:
    labels = Volume(np.random.default_rng(0).integers(0, 5, (6, 6, 6)).astype(np.uint8))
    back = read_volume(write_volume(labels, tmp_path / f"seg{suffix}"))
    assert back.array.dtype == np.uint8
    np.testing.assert_array_equal(back.array, labels.array)
    boolean = read_volume(write_volume(Volume(labels.array > 2), tmp_path / f"mask{suffix}"))
    assert boolean.array.dtype == np.uint8 and set(np.unique(boolean.array)) <= {0, 1}


def test_dicom_series_roundtrip_keeps_geometry_and_hu(tmp_path: Path) -> None:
    ct = make(np.int16)
    back = read_volume(write_volume(ct, tmp_path / "ct_series"))
    assert back.same_grid(ct)
    np.testing.assert_array_equal(back.array, ct.array)
    mr = make(np.float32)
    back = read_volume(write_volume(mr, tmp_path / "mr_series"))
    assert back.same_grid(mr)
    # float data is quantised to 16 bits: error at most half a step of the largest magnitude / 32000
    assert np.abs(back.array - mr.array).max() <= np.abs(mr.array).max() / 32000 + 1e-6


def test_writes_are_atomic_and_leave_no_temporaries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "out.nii.gz"
    write_volume(make(), target)
    before = target.read_bytes()

    def failing(*args: object, **kwargs: object) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(sitk, "WriteImage", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        write_volume(make(np.int16), target)
    assert target.read_bytes() == before  # the old file is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.nii.gz"]


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(VolumeError, match=r"nope\.nii\.gz: file not found"):
        read_volume(tmp_path / "nope.nii.gz")


def test_truncated_file_is_named(tmp_path: Path) -> None:
    path = write_volume(make(), tmp_path / "t.nii.gz")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(VolumeError, match=r"t\.nii\.gz: unreadable or truncated"):
        read_volume(path)


@pytest.mark.parametrize(("name", "content", "reason"), [
    ("empty.nii.gz", b"", "empty file (0 bytes)"),
    ("text.nii.gz", b"hello, I am not an image\n" * 20, "not a gzip-compressed NIfTI file"),
    ("gztext.nii.gz", gzip.compress(b"hello, I am not an image\n" * 20), "not a NIfTI file (no NIfTI header)"),
    ("text.nii", b"hello, I am not an image\n" * 20, "not a NIfTI file (no NIfTI header)"),
    ("text.nrrd", b"hello, I am not an image\n" * 20, "not an NRRD file"),
])
def test_unreadable_files_get_a_reason_a_person_can_act_on(tmp_path: Path, name: str, content: bytes,
                                                            reason: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(VolumeError) as error:
        read_volume(path)
    message = str(error.value)
    assert message == f"{path}: {reason}" or message.startswith(f"{path}: {reason}")
    assert ".cxx" not in message and "sitk" not in message.lower()


def test_garbage_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "g.nii.gz"
    path.write_bytes(gzip.compress(b"not an image at all" * 10))
    with pytest.raises(VolumeError, match=r"g\.nii\.gz"):
        read_volume(path)


def test_nan_and_inf_are_rejected_with_the_file_name(tmp_path: Path) -> None:
    volume = make()
    volume.array[0, 0, 0] = np.nan
    volume.array[1, 0, 0] = np.inf
    path = write_volume(volume, tmp_path / "bad.nii.gz")
    with pytest.raises(VolumeError, match=r"bad\.nii\.gz: contains NaN and Inf values \(2 voxels\)"):
        read_volume(path)


def test_4d_and_2d_images_are_rejected(tmp_path: Path) -> None:
    four_d = sitk.GetImageFromArray(np.zeros((3, 4, 5, 6), np.float32), isVector=False)
    sitk.WriteImage(four_d, str(tmp_path / "four.nii.gz"))
    with pytest.raises(VolumeError, match=r"four\.nii\.gz: expected a 3D volume, got a 4D image"):
        read_volume(tmp_path / "four.nii.gz")
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 5), np.float32)), str(tmp_path / "flat.nii.gz"))
    with pytest.raises(VolumeError, match=r"flat\.nii\.gz: expected a 3D volume"):
        read_volume(tmp_path / "flat.nii.gz")
    rgb = sitk.GetImageFromArray(np.zeros((4, 5, 6, 3), np.uint8), isVector=True)
    sitk.WriteImage(rgb, str(tmp_path / "rgb.nii.gz"))
    with pytest.raises(VolumeError, match=r"rgb\.nii\.gz: expected a single-channel image"):
        read_volume(tmp_path / "rgb.nii.gz")


def test_unsupported_suffix(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(VolumeError, match="not a supported image file"):
        read_volume(path)


def test_dicom_io_leaves_the_process_locale_alone(tmp_path: Path) -> None:
    """GDCM switches the C locale to "C"; left so, every later default-encoding open() in the process is ASCII."""
    import locale

    before = locale.setlocale(locale.LC_ALL)
    folder = write_volume(Volume(np.arange(512, dtype=np.float32).reshape(8, 8, 8), (1.0, 1.0, 2.0)),
                          tmp_path / "series")
    assert locale.setlocale(locale.LC_ALL) == before
    read_volume(folder)
    assert locale.setlocale(locale.LC_ALL) == before
