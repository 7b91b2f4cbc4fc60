
import numpy as np
import pytest
from scipy.ndimage import gaussian_filter
from scipy.spatial.transform import Rotation

from volsynth.config import DataConfig, SamplingConfig
from volsynth.data.preprocess import CT_RANGE, IntensityScaling, Preprocessor
from volsynth.data.volume import Volume

OBLIQUE = Rotation.from_euler("xyz", [8, -15, 20], degrees=True).as_matrix()


def smooth(shape: tuple[int, int, int] = (30, 26, 18), low: float = 0.0, high: float = 1.0) -> np.ndarray:
    field = gaussian_filter(np.random.default_rng(0).standard_normal(shape), 3)
    return (low + (field - field.min()) / (field.max() - field.min()) * (high - low)).astype(np.float32)


def test_intensity_models_closed_form() -> None:
    array = np.array([-2000.0, -1024.0, 0.0, 1000.0, 3000.0, 5000.0])
    ct = IntensityScaling.fit(array, "ct")
    np.testing.assert_allclose(ct.apply(array), [0, 0, 1024 / 4024, 2024 / 4024, 1, 1], atol=1e-7)
    np.testing.assert_allclose(ct.invert(ct.apply(array)), np.clip(array, *CT_RANGE), atol=1e-3)
    mr = IntensityScaling.fit(np.array([10.0, 20.0, 110.0]), "mr")
    np.testing.assert_allclose(mr.apply(np.array([10.0, 60.0, 110.0])), [0, 0.5, 1])
    values = np.arange(1001, dtype=float)
    robust = IntensityScaling.fit(values, "mr", mr_normalisation="percentile", percentiles=(0.5, 99.5))
    assert robust.low == pytest.approx(5.0) and robust.high == pytest.approx(995.0)
    assert robust.apply(values).max() == 1.0 and robust.apply(values)[500] == pytest.approx(495 / 990)


@pytest.mark.parametrize("spacing", [None, (1.5, 1.5, 1.5)])
def test_ct_roundtrip_returns_hu_on_the_original_grid(spacing: tuple | None) -> None:
    hu = smooth(low=-1000, high=2500)
    volume = Volume(hu, (1.0, 1.2, 2.0), (5.0, -6.0, 7.0), OBLIQUE)
    config = DataConfig(source_kind="ct", target_kind="ct", sampling=SamplingConfig(patch_size=(16, 16, 16)))
    preprocessor = Preprocessor(config, spacing=spacing)
    record = preprocessor.fit(volume, volume)
    array = preprocessor.apply(volume, record, "target")
    assert array.shape == record.shape and all(n % 8 == 0 and n >= 16 for n in array.shape)
    assert 0.0 <= array.min() and array.max() <= 1.0
    back = preprocessor.invert(array, record, role="target")
    assert back.same_grid(volume)
    error = np.abs(back.array - hu)
    if spacing is None:  # no resampling: exact up to float32 rounding of the HU map
        assert error.max() < 0.01
    else:  # linear resampling there and back: interpolation tolerance on a smooth image
        assert error.mean() < 0.005 * 3500 and np.percentile(error, 95) < 0.015 * 3500


def test_mr_roundtrip_and_label_nearest() -> None:
    mr = smooth(low=100, high=900)
    volume = Volume(mr, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), OBLIQUE)
    labels = Volume((mr > 500).astype(np.uint8) * 3, volume.spacing, volume.origin, OBLIQUE)
    preprocessor = Preprocessor(DataConfig(sampling=SamplingConfig(patch_size=(8, 8, 8))), spacing=(1.3, 1.3, 1.3))
    record = preprocessor.fit(volume, volume)
    label_array = preprocessor.apply_label(labels, record)
    assert set(np.unique(label_array)) <= {0, 3}  # nearest neighbour: no invented label values
    back = preprocessor.invert(preprocessor.apply(volume, record, "source"), record, role="source")
    assert back.same_grid(volume) and np.abs(back.array - mr).mean() < 5
    back_labels = preprocessor.invert(label_array, record, label=True)
    assert (back_labels.array == labels.array).mean() > 0.95


def test_foreground_crop_is_undone() -> None:
    array = np.zeros((40, 40, 40), np.float32)
    array[10:25, 12:30, 5:20] = smooth((15, 18, 15), 1, 2)
    volume = Volume(array)
    preprocessor = Preprocessor(DataConfig(sampling=SamplingConfig(patch_size=(8, 8, 8))))
    record = preprocessor.fit(volume)
    assert record.shape[0] < 40  # cropped to the foreground (+ margin), padded to a multiple of 8
    back = preprocessor.invert(preprocessor.apply(volume, record, "source"), record, role="source")
    np.testing.assert_allclose(back.array, array, atol=1e-5)
