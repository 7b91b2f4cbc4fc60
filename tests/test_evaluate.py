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
from volsynth.errors import DataError
from volsynth.evaluation.evaluate import evaluate_predictions
from volsynth.evaluation.lpips import VGG16_TAP_CHANNELS, LPIPSConfig
from volsynth.metrics import compute_metrics, metric_names
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


def _unit(array: np.ndarray) -> np.ndarray:
    return (array - array.min()) / (array.max() - array.min())


def test_paper_profile_csv_and_summary(dataset: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = evaluate_predictions(dataset["pred"], dataset["target"], out_dir=out)
    columns, rows = _read_csv(out / "metrics.csv")
    assert columns == ["subject", "ssim", "psnr", "nmse", "mae"]
    assert [r["subject"] for r in rows] == list(SUBJECTS)
    for row in rows:
        # The paper's evaluate_iqa.py: target and prediction each min-max normalised per volume (the default).
        t = _unit(_nib(dataset["target"] / f"{row['subject']}.nii.gz"))
        p = _unit(_nib(dataset["pred"] / f"{row['subject']}.nii.gz"))
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
    assert summary["normalise"] == "paper" and "evaluate_iqa.py" in summary["normalise_definition"]
    assert summary["target_modality"] is None and summary["checkpoint"] is None
    assert summary["pred_dir"] == str(dataset["pred"].resolve())
    assert "ceiling" not in summary and "distance_to_ceiling" not in summary
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
    evaluate_predictions(tmp_path / "p", tmp_path / "t", mask=tmp_path / "m", out_dir=tmp_path / "out",
                         normalise="none")
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
        tmp_path / "p", tmp_path / "t", out_dir=tmp_path / "out", normalise="target"
    )
    expected = compute_metrics(pred, (target - lo) / (hi - lo), profile="paper")
    assert result.per_subject[0]["ssim"] > 0.5
    for key, value in expected.items():
        assert result.per_subject[0][key] == pytest.approx(value, rel=1e-9)
    assert result.summary["normalise"] == "target"
    # "minmax", the option's earlier name, still means target-only.
    legacy = evaluate_predictions(tmp_path / "p", tmp_path / "t", out_dir=tmp_path / "o2", normalise="minmax")
    assert legacy.per_subject == result.per_subject and legacy.summary["normalise"] == "target"
    # The default (paper) normalises the prediction too: different numbers for the same files.
    paper = evaluate_predictions(tmp_path / "p", tmp_path / "t", out_dir=tmp_path / "o3")
    assert paper.summary["normalise"] == "paper"
    assert paper.per_subject[0]["psnr"] != pytest.approx(result.per_subject[0]["psnr"], abs=1e-3)
    with pytest.raises(ValueError, match="Did you mean 'target'"):
        evaluate_predictions(tmp_path / "p", tmp_path / "t", out_dir=tmp_path / "x", normalise="targt")
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


# ------------------------------------------------------------------------------------------------------------
# Ceiling (ideal images in a phantom-style manifest), predictions.json, modality checks


def _manifest(root: Path, subjects: dict[str, dict[str, Path]], *, target: str | None = "t2",
              ideal: dict[str, Path] | None = None, masks: dict[str, Path] | None = None) -> Path:
    """A volsynth manifest written by hand (paths relative to its folder), optionally with ideal images."""
    entries = []
    for name, images in subjects.items():
        entry: dict = {"subject": name, "images": {m: str(p.relative_to(root)) for m, p in images.items()}}
        if ideal is not None:
            entry["ideal"] = {target or "t2": str(ideal[name].relative_to(root))}
        if masks is not None:
            entry["mask"] = str(masks[name].relative_to(root))
        entries.append(entry)
    path = root / "manifest.json"
    path.write_text(json.dumps({"format": "volsynth-manifest", "version": 1, "dataset": "phantom",
                                "source": "t1", "target": target, "subjects": entries}))
    return path


@pytest.fixture()
def ceiling_case(tmp_path: Path) -> dict[str, Path]:
    """Two subjects with the same target; constant offsets give hand-computable MSEs.

    prediction = target + 0.1 (a) / + 0.05 (b): MSE 1e-2 / 2.5e-3 → PSNR 20 / 26.0206 dB (data range 1).
    ideal      = target + 0.01 (a) / + 0.02 (b): MSE 1e-4 / 4e-4  → PSNR 40 / 33.9794 dB.
    """
    target = _target(21)
    mask = _mask(target.shape)
    files: dict[str, Path] = {}
    for name, pred_offset, ideal_offset in (("a", 0.1, 0.01), ("b", 0.05, 0.02)):
        files[f"t2_{name}"] = _write(tmp_path / "data" / name / "t2.nii.gz", target)
        files[f"t1_{name}"] = _write(tmp_path / "data" / name / "t1.nii.gz", 1.0 - target)
        files[f"ideal_{name}"] = _write(tmp_path / "data" / name / "t2_ideal.nii.gz", target + ideal_offset)
        files[f"mask_{name}"] = _write(tmp_path / "data" / name / "mask.nii.gz", mask)
        files[f"pred_{name}"] = _write(tmp_path / "pred" / f"{name}.nii.gz", target + pred_offset)
    files["manifest"] = _manifest(tmp_path / "data", {n: {"t1": files[f"t1_{n}"], "t2": files[f"t2_{n}"]}
                                                      for n in "ab"},
                                  ideal={n: files[f"ideal_{n}"] for n in "ab"},
                                  masks={n: files[f"mask_{n}"] for n in "ab"})
    files["root"] = tmp_path
    return files


def test_ceiling_and_distance_hand_computed(ceiling_case: dict[str, Path]) -> None:
    out = ceiling_case["root"] / "out"
    result = evaluate_predictions(ceiling_case["root"] / "pred", ceiling_case["manifest"], out_dir=out,
                                  normalise="none")
    psnr = {"a": (20.0, 40.0), "b": (10 * np.log10(1 / 2.5e-3), 10 * np.log10(1 / 4e-4))}
    columns, rows = _read_csv(out / "metrics.csv")
    assert columns[-3:] == ["psnr_db_below_ceiling", "nmse_ratio_to_ceiling", "nmse_mask_ratio_to_ceiling"]
    ceiling_columns, ceiling_rows = _read_csv(out / "ceiling.csv")
    assert ceiling_columns == ["subject", *metric_names("paper", masked=True)]
    for row, ceiling in zip(rows, ceiling_rows, strict=True):
        predicted, ideal = psnr[row["subject"]]
        assert float(row["psnr"]) == pytest.approx(predicted, abs=1e-9)
        assert float(row["psnr_mask"]) == pytest.approx(predicted, abs=1e-9)
        assert float(ceiling["psnr"]) == pytest.approx(ideal, abs=1e-9)
        assert float(row["psnr_db_below_ceiling"]) == pytest.approx(ideal - predicted, abs=1e-9)
    assert float(rows[0]["nmse_ratio_to_ceiling"]) == pytest.approx(100.0, rel=1e-9)  # 1e-2 / 1e-4
    assert float(rows[1]["nmse_ratio_to_ceiling"]) == pytest.approx(6.25, rel=1e-9)  # 2.5e-3 / 4e-4
    assert float(rows[1]["nmse_mask_ratio_to_ceiling"]) == pytest.approx(6.25, rel=1e-9)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ceiling"]["psnr"]["mean"] == pytest.approx((40.0 + psnr["b"][1]) / 2, abs=1e-9)
    assert summary["ceiling"]["psnr"]["n"] == 2 and summary["ceiling"]["ssim"]["mean"] > summary["ssim"]["mean"]
    distance = summary["distance_to_ceiling"]
    assert distance["psnr_db_below"] == pytest.approx((20.0 + psnr["b"][1] - psnr["b"][0]) / 2, abs=1e-9)
    # Same target (same variance) for both subjects: the ratio of mean NMSEs is the ratio of mean MSEs.
    assert distance["nmse_ratio"] == pytest.approx((1e-2 + 2.5e-3) / (1e-4 + 4e-4), rel=1e-9)
    assert distance["masked_nmse_ratio"] == pytest.approx(25.0, rel=1e-9)
    assert distance["n"] == 2 and summary["target_modality"] == "t2"
    assert result.summary == summary and [r["subject"] for r in result.ceiling] == ["a", "b"]


def test_ceiling_is_scored_like_the_predictions(ceiling_case: dict[str, Path], tmp_path: Path) -> None:
    """target-only: the ideal image (in target units) is put on the target's min-max scale, like a model's output;
    paper: it is min-max normalised on its own, so an affine copy of the target is a perfect score."""
    raw = _target(21) * 200.0 + 50.0  # target in scanner-like units, range 200
    unit = (raw - raw.min()) / np.ptp(raw)
    _write(tmp_path / "d" / "s" / "t2.nii.gz", raw)
    _write(tmp_path / "d" / "s" / "t2_ideal.nii.gz", raw + 2.0)  # 2 / 200 = 0.01 on the unit scale
    _write(tmp_path / "p" / "s.nii.gz", unit + 0.1)
    manifest = _manifest(tmp_path / "d", {"s": {"t2": tmp_path / "d" / "s" / "t2.nii.gz"}},
                         ideal={"s": tmp_path / "d" / "s" / "t2_ideal.nii.gz"})
    target_only = evaluate_predictions(tmp_path / "p", manifest, out_dir=tmp_path / "o1", normalise="target")
    assert target_only.ceiling[0]["psnr"] == pytest.approx(40.0, abs=1e-6)
    assert target_only.per_subject[0]["psnr"] == pytest.approx(20.0, abs=1e-6)
    assert target_only.summary["distance_to_ceiling"]["psnr_db_below"] == pytest.approx(20.0, abs=1e-6)
    paper = evaluate_predictions(tmp_path / "p", manifest, out_dir=tmp_path / "o2")
    # Equal up to rounding after each volume's own min-max (PSNR ~ 300 dB rather than inf).
    assert paper.ceiling[0]["psnr"] > 200 and paper.ceiling[0]["ssim"] == pytest.approx(1.0, abs=1e-12)
    # ... and so is the prediction (unit + 0.1 is affine in the target too): the paper's definition forgives it.
    assert paper.summary["normalise"] == "paper" and paper.per_subject[0]["psnr"] > 200
    # Without ideal images: no ceiling.csv (and a stale one from an earlier run in the same folder is removed).
    manifest.write_text(manifest.read_text().replace('"ideal"', '"unused"'))
    again = evaluate_predictions(tmp_path / "p", manifest, out_dir=tmp_path / "o2")
    assert "ceiling" not in again.summary and not (tmp_path / "o2" / "ceiling.csv").exists()


def _predictions_json(folder: Path, outputs: dict[str, str], *, target: str = "t2") -> Path:
    path = folder / "predictions.json"
    path.write_text(json.dumps({
        "format": "volsynth-predictions", "version": 1, "method": "mdagan", "source": "t1", "target": target,
        "checkpoint": "/abs/run/checkpoints/last.pt", "checkpoint_sha256": "0" * 64,
        "created": "2025-01-01T00:00:00", "volsynth_version": "0.0.test",
        "outputs": {s: {"file": f, "input": f"/abs/{s}_t1.nii.gz"} for s, f in outputs.items()}}))
    return path


def test_predictions_json_lists_the_outputs(ceiling_case: dict[str, Path]) -> None:
    root = ceiling_case["root"]
    folder = root / "predict_out"
    for name in "ab":
        _write(folder / f"{name}_synthetic-t2.nii.gz", _nib(ceiling_case[f"pred_{name}"]))
    _write(folder / "a.nii.gz", _target(99))  # a stray file not listed in predictions.json: not scored
    _predictions_json(folder, {n: f"{n}_synthetic-t2.nii.gz" for n in "ab"})
    result = evaluate_predictions(folder, ceiling_case["manifest"], out_dir=root / "o", normalise="none")
    assert [r["psnr"] for r in result.per_subject] == pytest.approx([20.0, 10 * np.log10(400)], abs=1e-9)
    summary = result.summary
    assert summary["checkpoint"] == "/abs/run/checkpoints/last.pt" and summary["pred_dir"] == str(folder.resolve())
    assert summary["prediction_modality"] == "t2" and summary["target_modality"] == "t2"
    assert summary["predictions"]["method"] == "mdagan" and summary["predictions"]["checkpoint_sha256"] == "0" * 64
    # Missing listed output, malformed listing: one line naming the file.
    (folder / "b_synthetic-t2.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"b_synthetic-t2\.nii\.gz listed in .*predictions\.json"):
        evaluate_predictions(folder, ceiling_case["manifest"], out_dir=root / "o")
    (folder / "predictions.json").write_text("{not json")
    with pytest.raises(DataError, match=r"predictions\.json: not a readable predictions file") as info:
        evaluate_predictions(folder, ceiling_case["manifest"], out_dir=root / "o")
    assert "\n" not in str(info.value)


def test_refuses_to_score_a_model_against_another_modality(ceiling_case: dict[str, Path]) -> None:
    """The probe scored a synthetic T2 against FLAIR without a word; now it is an error naming both."""
    root = ceiling_case["root"]
    folder = root / "predict_out"
    for name in "ab":
        _write(folder / f"{name}_synthetic-t2.nii.gz", _nib(ceiling_case[f"pred_{name}"]))
    _predictions_json(folder, {n: f"{n}_synthetic-t2.nii.gz" for n in "ab"})
    subjects = {n: {"t2": ceiling_case[f"t2_{n}"], "flair": ceiling_case[f"t1_{n}"]} for n in "ab"}
    flair_manifest = _manifest(root / "data", subjects, target="flair")
    with pytest.raises(DataError, match=r"synthetic 't2'.*target modality is 'flair'"):
        evaluate_predictions(folder, flair_manifest, out_dir=root / "o1")
    with pytest.raises(DataError, match=r"synthetic 't2'.*'flair' \(--target-modality\)"):
        evaluate_predictions(folder, ceiling_case["manifest"], out_dir=root / "o2", target_modality="flair")
    assert not (root / "o1").exists() and not (root / "o2").exists()
    # The modality in the file names counts as a declaration too (a plain folder, no predictions.json) ...
    (folder / "predictions.json").unlink()
    with pytest.raises(DataError, match=r"synthetic 't2' \(per file names in .*\) but the target modality is"):
        evaluate_predictions(folder, flair_manifest, out_dir=root / "o3")
    # ... which also finds the subjects, and picks the target of a manifest that names none.
    undeclared = _manifest(root / "data", subjects, target=None)
    result = evaluate_predictions(folder, undeclared, out_dir=root / "o4", normalise="none")
    assert [r["subject"] for r in result.per_subject] == ["a", "b"]
    assert result.summary["target_modality"] == "t2" and result.per_subject[0]["psnr"] == pytest.approx(20.0)
    # An explicit --target-modality equal to the predictions' wins over the manifest's target.
    ok = evaluate_predictions(folder, flair_manifest, out_dir=root / "o5", target_modality="t2", normalise="none")
    assert ok.per_subject == result.per_subject
    _write(folder / "c_synthetic-flair.nii.gz", _target(3))
    with pytest.raises(DataError, match="mixes synthetic modalities"):
        evaluate_predictions(folder, undeclared, out_dir=root / "o6")


def test_unreadable_inputs_give_one_line_naming_the_file(dataset: dict[str, Path]) -> None:
    for content in (b"", b"this is not an image\nsecond line\n"):
        (dataset["pred"] / "sub-02.nii.gz").write_bytes(content)
        with pytest.raises(DataError) as info:
            evaluate_predictions(dataset["pred"], dataset["target"], out_dir=dataset["root"] / "out")
        message = str(info.value)
        assert "\n" not in message and str(dataset["pred"] / "sub-02.nii.gz") in message and "prediction" in message


def test_cli_prints_the_ceiling_and_the_distance(ceiling_case: dict[str, Path],
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from volsynth.cli import main

    code = main(["evaluate", "--pred", str(ceiling_case["root"] / "pred"), "--target",
                 str(ceiling_case["manifest"]), "--out", str(ceiling_case["root"] / "cli"), "--normalise", "none"])
    text = capsys.readouterr().out
    assert code == 0
    assert "ideal (phantom ceiling): " in text and "psnr 36.9897" in text  # (40 + 33.9794) / 2
    assert "distance to ceiling: PSNR 13.98 dB below the ideal; NMSE 25.00× the ideal's" in text
    assert main(["evaluate", "--help"]) == 0
    assert "what the paper's evaluate_iqa.py does" in " ".join(capsys.readouterr().out.split())


def test_folder_targets_are_checked_against_an_explicit_modality(dataset: dict[str, Path]) -> None:
    folder = dataset["root"] / "named"
    for subject in SUBJECTS:
        _write(folder / f"{subject}_synthetic-t2.nii.gz", _nib(dataset["pred"] / f"{subject}.nii.gz"))
    result = evaluate_predictions(folder, dataset["target"], out_dir=dataset["root"] / "o1")
    plain = evaluate_predictions(dataset["pred"], dataset["target"], out_dir=dataset["root"] / "o2")
    assert result.per_subject == plain.per_subject
    assert result.summary["prediction_modality"] == "t2" and result.summary["target_modality"] is None
    with pytest.raises(DataError, match=r"synthetic 't2'.*'pd' \(--target-modality\)"):
        evaluate_predictions(folder, dataset["target"], out_dir=dataset["root"] / "o3", target_modality="pd")
