from pathlib import Path

import numpy as np
import pytest
import torch
from monai.inferers import sliding_window_inference
from scipy.ndimage import gaussian_filter
from scipy.spatial.transform import Rotation

from volsynth.cli import main
from volsynth.config import load_config
from volsynth.data.io import VolumeError, read_volume, write_volume
from volsynth.data.manifest import Manifest, Subject, save_manifest
from volsynth.data.volume import Volume
from volsynth.inference.predict import predict, translate_volume
from volsynth.inference.sliding_window import translate_array
from volsynth.methods import build_method
from volsynth.methods.regression_unet import RegressionUNet

OBLIQUE = Rotation.from_euler("xyz", [10, -20, 5], degrees=True).as_matrix() @ np.diag([-1.0, -1.0, 1.0])


class IdentityUNet(RegressionUNet):
    """translate = identity: isolates preprocessing + sliding window + inverse mapping."""

    def translate(self, source: torch.Tensor) -> torch.Tensor:
        return source


def ct_like(seed: int, shape: tuple[int, int, int] = (22, 20, 14)) -> np.ndarray:
    field = gaussian_filter(np.random.default_rng(seed).standard_normal(shape), 2.5)
    return ((field - field.min()) / np.ptp(field) * 2800 - 1000).astype(np.float32)


def ct_config(**extra: str) -> list[str]:
    return ["data.source_kind=ct", "data.target_kind=ct", "data.patch_size=[8,8,8]", "inference.overlap=0.5",
            *(f"{k}={v}" for k, v in extra.items())]


@pytest.mark.parametrize("spacing", [None, [1.6, 1.6, 1.6]])
def test_identity_translation_returns_the_input_in_hu_on_its_grid(spacing: list | None) -> None:
    config = load_config({"method": {"name": "regression_unet", "channels": [4, 8, 16, 32]}},
                         ct_config(**({"data.spacing": str(spacing)} if spacing else {})))
    method = IdentityUNet(config.method).eval()
    hu = ct_like(0)
    source = Volume(hu, (1.1, 1.3, 2.2), (-40.0, 12.5, 80.0), OBLIQUE)
    synthetic = translate_volume(method, config, source)
    assert synthetic.same_grid(source)
    error = np.abs(synthetic.array - hu)
    if spacing is None:
        assert error.max() < 0.5  # HU, float rounding only
    else:
        assert error.mean() < 0.01 * 2800  # linear resampling there and back (anisotropic → 1.6 mm)


def test_sliding_window_matches_a_plain_monai_call() -> None:
    torch.manual_seed(0)
    config = load_config({"method": {"name": "regression_unet", "channels": [4, 8, 16, 32]}})
    method = build_method(config.method).eval()
    array = np.random.default_rng(0).random((24, 32, 16)).astype(np.float32)
    ours = translate_array(method, array, roi_size=(16, 16, 16), overlap=0.625, sigma_scale=0.125, sw_batch_size=3)
    with torch.no_grad():
        plain = sliding_window_inference(torch.from_numpy(array)[None, None], (16, 16, 16), 3, method.translate,
                                         overlap=0.625, mode="gaussian", sigma_scale=0.125)[0, 0].numpy()
    np.testing.assert_allclose(ours, np.clip(plain, 0, 1), atol=1e-6)
    with pytest.raises(ValueError, match="multiple of 8"):
        translate_array(method, array, roi_size=(12, 8, 8))


def test_cli_predict_from_run_keeps_geometry_and_hu(tmp_path: Path) -> None:
    subjects = []
    for i in range(4):
        mr = Volume(ct_like(i) + 1000, (1.1, 1.3, 2.2), (-40.0, 12.5, 80.0), OBLIQUE)
        ct = mr.with_array((ct_like(i) * 0.8).astype(np.int16).astype(np.float32))
        paths = {m: write_volume(v, tmp_path / "data" / f"s{i}" / f"{m}.nii.gz") for m, v in (("mr", mr), ("ct", ct))}
        subjects.append(Subject(f"s{i}", images=paths))
    manifest = save_manifest(Manifest(subjects, source="mr", target="ct"), tmp_path / "data/manifest.json")
    run = tmp_path / "run"
    overrides = [f"--set={o}" for o in [*ct_config(), "data.source_kind=mr", "train.iterations=2",
                                        "train.progress=false", "method.channels=[4,8]"]]
    assert main(["train", "--config", str(Path(__file__).parents[1] / "configs/regression_unet-cpu.yaml"),
                 "--data", str(manifest), "--out", str(run), "--set", "data.source=mr", "--set", "data.target=ct",
                 *overrides]) == 0
    assert main(["predict", "--run", str(run), "--input", str(manifest), "--split", "test", "--out",
                 str(tmp_path / "pred")]) == 0
    outputs = sorted((tmp_path / "pred").glob("*.nii.gz"))
    assert [p.name for p in outputs] == ["s0.nii.gz"]
    synthetic, source = read_volume(outputs[0]), read_volume(subjects[0].images["mr"])
    assert synthetic.same_grid(source)
    assert -1024 <= synthetic.array.min() and synthetic.array.max() <= 3000 and synthetic.array.std() > 0
    assert (tmp_path / "pred/config.yaml").is_file()
    # Single file and DICOM series inputs, and a bad input.
    dicom = write_volume(read_volume(subjects[1].images["mr"]), tmp_path / "dicom_in")
    written = predict(run / "checkpoints/last.pt", dicom, tmp_path / "pred2", progress=False)
    assert read_volume(written[0]).same_grid(read_volume(dicom))
    bad = read_volume(subjects[2].images["mr"])
    bad.array[0, 0, 0] = np.nan
    write_volume(bad, tmp_path / "bad.nii.gz")
    with pytest.raises(VolumeError, match=r"bad\.nii\.gz: contains NaN"):
        predict(run / "checkpoints/last.pt", tmp_path / "bad.nii.gz", tmp_path / "pred3", progress=False)
    assert main(["predict", "--checkpoint", str(tmp_path / "nope.pt"), "--input", str(dicom), "--out",
                 str(tmp_path / "p4")]) == 2
