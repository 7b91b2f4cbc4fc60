"""``evaluate_predictions``: folders/manifests of NIfTI volumes → metrics.csv + summary.json."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy.ndimage import gaussian_filter
from skimage.metrics import peak_signal_noise_ratio as sk_psnr
from skimage.metrics import structural_similarity as sk_ssim

from volsynth.data.manifest import Manifest, Subject, save_manifest
from volsynth.evaluation import LPIPSConfig, compute_metrics, evaluate_predictions
from volsynth.evaluation.lpips import VGG16_TAP_CHANNELS
from volsynth.nets.vgg import VGG

SPACING = (0.8, 1.2, 2.5)
ORIGIN = (-10.0, 5.0, 3.0)
SUBJECTS = ("sub-01", "sub-02", "sub-03")


@pytest.fixture(autouse=True)
def _single_torch_thread() -> Iterator[None]:
    # The small convolutions here run faster on one thread, and the shared CI cores stay free for others.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _write(
    path: Path,
    array_xyz: np.ndarray,
    spacing: tuple[float, ...] = SPACING,
    origin: tuple[float, ...] = ORIGIN,
) -> Path:
    image = sitk.GetImageFromArray(np.ascontiguousarray(array_xyz.transpose(2, 1, 0)))  # sitk wants (z, y, x)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return path


def _target(seed: int, shape: tuple[int, int, int] = (16, 17, 18)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    blobs = gaussian_filter(rng.random(shape), 2.0)
    return np.clip((blobs - blobs.min()) / np.ptp(blobs), 0, 1)


def _mask(shape: tuple[int, int, int]) -> np.ndarray:
    mask = np.zeros(shape, dtype=np.uint8)
    mask[4:12, 4:13, 4:14] = 1
    return mask


@pytest.fixture()
def dataset(tmp_path: Path) -> dict[str, Path]:
    """Three subjects: targets in [0, 1], predictions = target + noise, masks (a central box)."""
    rng = np.random.default_rng(11)
    for i, subject in enumerate(SUBJECTS):
        target = _target(i)
        _write(tmp_path / "target" / f"{subject}.nii.gz", target)
        _write(
            tmp_path / "pred" / f"{subject}.nii.gz",
            target + (0.02 + 0.03 * i) * rng.standard_normal(target.shape),
        )
        _write(tmp_path / "mask" / f"{subject}.nii.gz", _mask(target.shape))
    return {
        "pred": tmp_path / "pred",
        "target": tmp_path / "target",
        "mask": tmp_path / "mask",
        "root": tmp_path,
    }


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames or []), list(reader)


def _nib(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).get_fdata(), dtype=np.float64)  # an independent reader, (x, y, z)


def test_paper_profile_csv_and_summary(dataset: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = evaluate_predictions(dataset["pred"], dataset["target"], out_dir=out)
    columns, rows = _read_csv(out / "metrics.csv")
    assert columns == ["subject", "ssim", "psnr", "nmse", "mae"]
    assert [r["subject"] for r in rows] == list(SUBJECTS)
    for row in rows:
        t = _nib(dataset["target"] / f"{row['subject']}.nii.gz")
        p = _nib(dataset["pred"] / f"{row['subject']}.nii.gz")
        assert float(row["ssim"]) == pytest.approx(sk_ssim(t, p, data_range=1.0), abs=1e-6)
        assert float(row["psnr"]) == pytest.approx(sk_psnr(t, p, data_range=1.0), abs=1e-6)
        assert float(row["nmse"]) == pytest.approx(np.mean((p - t) ** 2) / np.var(t), rel=1e-9)
        assert float(row["mae"]) == pytest.approx(np.mean(np.abs(p - t)), rel=1e-9)
    summary = json.loads((out / "summary.json").read_text())
    for metric in ("ssim", "psnr", "nmse", "mae"):
        values = np.array([float(r[metric]) for r in rows])
        assert summary[metric]["mean"] == pytest.approx(values.mean(), rel=1e-12)
        assert summary[metric]["std"] == pytest.approx(values.std(ddof=1), rel=1e-12)
        assert summary[metric]["n"] == 3
    assert summary["profile"] == "paper" and summary["mask"] is False and summary["n_subjects"] == 3
    assert summary["lpips"] == {"available": False, "reason": "not requested"}
    assert result.summary == summary
    assert [r["subject"] for r in result.per_subject] == list(SUBJECTS)
    # Increasing noise per subject → decreasing PSNR (the rows are not all the same number).
    psnrs = [float(r["psnr"]) for r in rows]
    assert psnrs[0] > psnrs[1] > psnrs[2]
    assert sorted(p.name for p in out.iterdir()) == ["metrics.csv", "summary.json"]  # no *.tmp left behind


def test_masked_metrics_ignore_errors_outside_the_mask(tmp_path: Path) -> None:
    for i, subject in enumerate(SUBJECTS):
        target = _target(10 + i)
        mask = _mask(target.shape)
        pred = target.copy()
        pred[mask == 0] += 0.1 * (i + 1)  # errors only outside the mask
        _write(tmp_path / "t" / f"{subject}.nii.gz", target)
        _write(tmp_path / "p" / f"{subject}.nii.gz", pred)
        _write(tmp_path / "m" / f"{subject}.nii.gz", mask)
    evaluate_predictions(tmp_path / "p", tmp_path / "t", mask=tmp_path / "m", out_dir=tmp_path / "out")
    columns, rows = _read_csv(tmp_path / "out" / "metrics.csv")
    assert columns == [
        "subject",
        "ssim",
        "psnr",
        "nmse",
        "mae",
        "ssim_mask",
        "psnr_mask",
        "nmse_mask",
        "mae_mask",
    ]
    for i, row in enumerate(rows):
        assert float(row["mae_mask"]) == 0.0
        assert float(row["mae"]) > 0.01 * (i + 1)
        assert row["psnr_mask"] == "inf" and np.isfinite(float(row["psnr"]))
        assert float(row["ssim_mask"]) != float(row["ssim"])
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["mask"] is True
    # Infinite PSNRs are not averaged into a number; they are counted instead.
    assert summary["psnr_mask"] == {"mean": None, "std": None, "n": 0, "n_nonfinite": 3}
    assert summary["mae_mask"]["mean"] == 0.0


def test_grid_mismatch_states_both_grids(dataset: dict[str, Path]) -> None:
    target = _target(1)
    _write(dataset["pred"] / "sub-02.nii.gz", target, spacing=(0.8, 1.2, 3.5))
    with pytest.raises(ValueError, match="different grids") as info:
        evaluate_predictions(dataset["pred"], dataset["target"], out_dir=dataset["root"] / "out")
    message = str(info.value)
    assert "(0.8, 1.2, 3.5)" in message and "(0.8, 1.2, 2.5)" in message and "sub-02" in message
    assert not (dataset["root"] / "out" / "metrics.csv").exists()


def test_missing_counterparts_and_nan_name_the_file(dataset: dict[str, Path]) -> None:
    _write(dataset["pred"] / "sub-99.nii.gz", _target(0))
    with pytest.raises(FileNotFoundError, match="sub-99"):
        evaluate_predictions(dataset["pred"], dataset["target"], out_dir=dataset["root"] / "out")
    (dataset["pred"] / "sub-99.nii.gz").unlink()
    (dataset["mask"] / "sub-03.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"mask.*sub-03"):
        evaluate_predictions(
            dataset["pred"], dataset["target"], mask=dataset["mask"], out_dir=dataset["root"] / "o"
        )
    bad = _target(2)
    bad[3, 4, 5] = np.inf
    _write(dataset["pred"] / "sub-03.nii.gz", bad)
    with pytest.raises(ValueError, match=r"sub-03\.nii\.gz.*Inf"):
        evaluate_predictions(dataset["pred"], dataset["target"], out_dir=dataset["root"] / "out")
    bad[3, 4, 5] = np.nan
    _write(dataset["pred"] / "sub-03.nii.gz", bad)
    with pytest.raises(ValueError, match=r"sub-03\.nii\.gz.*NaN"):
        evaluate_predictions(dataset["pred"], dataset["target"], out_dir=dataset["root"] / "out")


def test_manifest_target_and_mask(dataset: dict[str, Path], tmp_path: Path) -> None:
    root = dataset["root"]

    def write_manifest(subjects: tuple[str, ...]) -> Path:
        entries = [
            Subject(
                s,
                images={"t1": dataset["pred"] / f"{s}.nii.gz", "t2": dataset["target"] / f"{s}.nii.gz"},
                mask=dataset["mask"] / f"{s}.nii.gz",
            )
            for s in subjects
        ]
        return save_manifest(Manifest(entries, source="t1", target="t2"), root / "manifest.json")

    path = write_manifest(SUBJECTS)
    via_manifest = evaluate_predictions(dataset["pred"], path, out_dir=tmp_path / "a")
    via_dirs = evaluate_predictions(
        dataset["pred"], dataset["target"], mask=dataset["mask"], out_dir=tmp_path / "b"
    )
    assert via_manifest.per_subject == via_dirs.per_subject
    assert "ssim_mask" in via_manifest.per_subject[0]
    # target_modality picks another image as the target: here the predictions themselves.
    itself = evaluate_predictions(dataset["pred"], path, out_dir=tmp_path / "c", target_modality="t1")
    assert all(row["mae"] == 0.0 for row in itself.per_subject)
    with pytest.raises(ValueError, match=r"modality 't3'.*t1, t2"):
        evaluate_predictions(dataset["pred"], path, out_dir=tmp_path / "d", target_modality="t3")
    write_manifest(SUBJECTS[:2])
    with pytest.raises(FileNotFoundError, match=r"sub-03.*manifest"):
        evaluate_predictions(dataset["pred"], path, out_dir=tmp_path / "e")


def test_minmax_normalisation_uses_the_target_range(tmp_path: Path) -> None:
    target = _target(4) * 800 + 100  # MR-like raw intensities
    lo, hi = target.min(), target.max()
    # volsynth's synthetic MR is on the normalised [0, 1] scale: only the target is rescaled
    pred = np.clip((target - lo) / (hi - lo) + 0.02 * np.random.default_rng(0).standard_normal(target.shape), 0, 1)
    _write(tmp_path / "t" / "a.nii.gz", target)
    _write(tmp_path / "p" / "a.nii.gz", pred)
    result = evaluate_predictions(
        tmp_path / "p", tmp_path / "t", out_dir=tmp_path / "out", normalise="minmax"
    )
    expected = compute_metrics(pred, (target - lo) / (hi - lo), profile="paper")
    assert result.per_subject[0]["ssim"] > 0.5
    for key, value in expected.items():
        assert result.per_subject[0][key] == pytest.approx(value, rel=1e-9)
    with pytest.raises(ValueError, match="Did you mean 'minmax'"):
        evaluate_predictions(tmp_path / "p", tmp_path / "t", out_dir=tmp_path / "x", normalise="minmx")
    with pytest.raises(ValueError, match="Did you mean 'synthrad2023'"):
        evaluate_predictions(tmp_path / "p", tmp_path / "t", out_dir=tmp_path / "x", profile="synthrad")


def test_synthrad2023_profile_in_hu(tmp_path: Path) -> None:
    target = _target(5) * 3600 - 1200
    pred = target + 40 * np.random.default_rng(1).standard_normal(target.shape)
    mask = _mask(target.shape)
    _write(tmp_path / "t" / "ct1.mha", target)
    _write(tmp_path / "p" / "ct1.mha", pred)
    _write(tmp_path / "m" / "ct1.mha", mask * 3)  # a label value, binarised with > 0
    result = evaluate_predictions(
        tmp_path / "p", tmp_path / "t", mask=tmp_path / "m", out_dir=tmp_path / "out", profile="synthrad2023"
    )
    columns, rows = _read_csv(tmp_path / "out" / "metrics.csv")
    assert columns == ["subject", "ssim", "psnr", "nmse", "mae"]
    expected = compute_metrics(pred, target, profile="synthrad2023", mask=mask > 0)
    for key, value in expected.items():
        assert float(rows[0][key]) == pytest.approx(value, rel=1e-9)
    m = mask > 0
    assert float(rows[0]["mae"]) == pytest.approx(np.mean(np.abs(pred[m] - target[m])), rel=1e-9)
    assert result.summary["modality"] == "ct" and "fe7e385" in result.summary["definitions"]


@pytest.fixture(scope="module")
def lpips_weights(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("lpips_eval")
    torch.manual_seed(0)
    torch.save(VGG(16).state_dict(), root / "vgg16.pth")
    torch.save(
        {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate(VGG16_TAP_CHANNELS)},
        root / "lin.pth",
    )
    return root / "vgg16.pth", root / "lin.pth"


def test_lpips_column_when_available_and_reason_when_not(
    dataset: dict[str, Path], tmp_path: Path, lpips_weights: tuple[Path, Path]
) -> None:
    vgg, lin = lpips_weights
    result = evaluate_predictions(
        dataset["pred"],
        dataset["target"],
        out_dir=tmp_path / "ok",
        lpips=LPIPSConfig(backbone_weights=vgg, linear_weights=lin, batch_size=8, max_slices_per_view=5),
    )
    columns, rows = _read_csv(tmp_path / "ok" / "metrics.csv")
    assert columns[-1] == "lpips"
    values = np.array([float(r["lpips"]) for r in rows])
    assert (values > 0).all() and values[0] < values[2]  # more noise → larger distance
    summary = json.loads((tmp_path / "ok" / "summary.json").read_text())
    assert summary["lpips"]["available"] is True
    assert summary["lpips"]["mean"] == pytest.approx(values.mean(), rel=1e-12)
    assert summary["lpips"]["n"] == 3 and result.summary["lpips"]["variant"] == "learned"

    missing = tmp_path / "absent_lpips_vgg.pth"
    evaluate_predictions(
        dataset["pred"],
        dataset["target"],
        out_dir=tmp_path / "no",
        lpips=LPIPSConfig(backbone_weights=vgg, linear_weights=missing),
    )
    columns, rows = _read_csv(tmp_path / "no" / "metrics.csv")
    assert "lpips" not in columns and all("lpips" not in r for r in rows)
    summary = json.loads((tmp_path / "no" / "summary.json").read_text())
    assert summary["lpips"]["available"] is False
    assert "absent_lpips_vgg.pth" in summary["lpips"]["reason"]
    assert "mean" not in summary["lpips"]
