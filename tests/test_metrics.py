"""Metrics and LPIPS: golden tests against scikit-image, the SynthRAD2023 scorer's rules and a hand LPIPS."""

from __future__ import annotations

import urllib.error
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter
from skimage.metrics import peak_signal_noise_ratio as sk_psnr
from skimage.metrics import structural_similarity as sk_ssim
from skimage.util import crop as sk_crop

from volsynth.evaluation import lpips as lp
from volsynth.metrics import (
    NORMALISATIONS,
    compute_metrics,
    ct_window_to_unit,
    mae,
    metric_names,
    minmax_unit,
    nmse,
    normalise_pair,
    psnr,
    ssim,
    ssim_map,
)
from volsynth.nets.vgg import VGG

RNG_SEED = 1234


@pytest.fixture(autouse=True)
def _single_torch_thread() -> Iterator[None]:
    # The small convolutions here run faster on one thread, and the shared CI cores stay free for others.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _random_pair(shape: tuple[int, ...], noise: float, seed: int = RNG_SEED) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    target = rng.random(shape)
    return target + noise * rng.standard_normal(shape), target


def _structured_pair(shape: tuple[int, ...] = (24, 22, 20)) -> tuple[np.ndarray, np.ndarray]:
    """Smooth blobs on a dark background (an MR-like volume) and a blurred, noisy, biased prediction."""
    rng = np.random.default_rng(7)
    blobs = gaussian_filter(rng.random(shape), sigma=2.5)
    target = np.clip((blobs - blobs.min()) / np.ptp(blobs) * 1.4 - 0.2, 0, 1)
    synthetic = gaussian_filter(target, 0.8) * 0.95 + 0.02 + 0.03 * rng.standard_normal(shape)
    return synthetic, target


# ------------------------------------------------------------------------------------------------------------
# SSIM / PSNR golden tests against scikit-image


@pytest.mark.parametrize("shape", [(16, 16, 16), (20, 18, 24), (24, 24, 24)])
@pytest.mark.parametrize("noise", [0.05, 0.3])
def test_ssim_and_psnr_match_skimage_on_random_volumes(shape: tuple[int, ...], noise: float) -> None:
    synthetic, target = _random_pair(shape, noise)
    expected_ssim = sk_ssim(target, synthetic, data_range=1.0, win_size=7)
    expected_psnr = sk_psnr(target, synthetic, data_range=1.0)
    assert abs(ssim(synthetic, target, data_range=1.0) - expected_ssim) < 1e-6
    assert abs(psnr(synthetic, target, data_range=1.0) - expected_psnr) < 1e-6
    # Sanity of the fixture: a poor prediction must not look perfect.
    assert expected_ssim < 0.99


def test_ssim_and_psnr_match_skimage_on_structured_volume_and_other_ranges() -> None:
    synthetic, target = _structured_pair()
    for data_range, win in [(1.0, 7), (2.0, 5), (4024.0, 7)]:
        scale = data_range  # put the images on the scale the range describes
        expected = sk_ssim(target * scale, synthetic * scale, data_range=data_range, win_size=win)
        got = ssim(synthetic * scale, target * scale, data_range=data_range, win_size=win)
        assert abs(got - expected) < 1e-6, (data_range, win)
        assert (
            abs(
                psnr(synthetic * scale, target * scale, data_range=data_range)
                - sk_psnr(target * scale, synthetic * scale, data_range=data_range)
            )
            < 1e-6
        )
    full = sk_ssim(target, synthetic, data_range=1.0, full=True)[1]
    np.testing.assert_allclose(ssim_map(synthetic, target, data_range=1.0), full, rtol=0, atol=1e-9)
    assert 0.3 < ssim(synthetic, target, data_range=1.0) < 0.99


def test_float32_inputs_are_scored_in_float64() -> None:
    synthetic, target = _structured_pair((16, 17, 18))
    s32, t32 = synthetic.astype(np.float32), target.astype(np.float32)
    expected = sk_ssim(t32.astype(np.float64), s32.astype(np.float64), data_range=1.0)
    assert abs(ssim(s32, t32, data_range=1.0) - expected) < 1e-9


def test_identical_volumes() -> None:
    _, target = _structured_pair()
    assert ssim(target, target, data_range=1.0) == pytest.approx(1.0, abs=1e-12)
    assert psnr(target, target, data_range=1.0) == float("inf")
    assert nmse(target, target) == 0.0
    assert mae(target, target) == 0.0


def test_nmse_and_mae_against_direct_formulas() -> None:
    synthetic, target = _structured_pair()
    n = target.size
    expected_nmse = np.sum((synthetic - target) ** 2) / np.sum((target - target.sum() / n) ** 2)
    assert nmse(synthetic, target) == pytest.approx(expected_nmse, rel=1e-12)
    assert mae(synthetic * 4024 - 1024, target * 4024 - 1024) == pytest.approx(
        np.abs(synthetic - target).sum() / n * 4024, rel=1e-12
    )
    mask = target > 0.5
    assert nmse(synthetic, target, mask) == pytest.approx(
        np.mean((synthetic[mask] - target[mask]) ** 2) / np.var(target[mask]), rel=1e-12
    )
    # Constant target: undefined (0/0 -> nan) or infinite, never a finite made-up number.
    const = np.full((8, 8, 8), 0.5)
    assert np.isnan(nmse(const, const))
    assert nmse(const + 0.1, const) == float("inf")


# ------------------------------------------------------------------------------------------------------------
# masks


def test_masked_psnr_and_ssim_use_only_mask_voxels() -> None:
    synthetic, target = _structured_pair()
    mask = np.zeros(target.shape, dtype=bool)
    mask[5:15, 4:18, 6:14] = True
    assert psnr(synthetic, target, data_range=1.0, mask=mask) == pytest.approx(
        sk_psnr(target[mask], synthetic[mask], data_range=1.0), abs=1e-9
    )
    # SynthRAD2023's rule: full map from scikit-image, mean over crop(mask, 3).
    full = sk_ssim(target, synthetic, data_range=1.0, full=True)[1]
    expected = sk_crop(full, 3)[sk_crop(mask, 3)].mean()
    assert ssim(synthetic, target, data_range=1.0, mask=mask) == pytest.approx(expected, abs=1e-9)


def test_masked_values_differ_when_errors_lie_outside_the_mask() -> None:
    rng = np.random.default_rng(3)
    target = gaussian_filter(rng.random((24, 24, 24)), 2)
    mask = np.zeros(target.shape, dtype=bool)
    mask[8:16, 8:16, 8:16] = True
    synthetic = target.copy()
    # Errors only in voxels more than a window radius (3) away from the mask.
    far = np.ones(target.shape, dtype=bool)
    far[4:20, 4:20, 4:20] = False
    synthetic[far] += 0.2 * rng.standard_normal(int(far.sum()))
    result = compute_metrics(synthetic, target, profile="paper", mask=mask)
    assert result["mae_mask"] == 0.0 and result["mae"] > 0.01
    assert result["nmse_mask"] == 0.0 and result["nmse"] > 0.0
    assert result["psnr_mask"] == float("inf") and np.isfinite(result["psnr"])
    assert result["ssim_mask"] == pytest.approx(1.0, abs=1e-12)
    assert result["ssim"] < 0.999
    assert list(result) == metric_names("paper", masked=True)


def test_paper_profile_without_mask_matches_skimage_and_ct_is_windowed() -> None:
    synthetic, target = _structured_pair()
    got = compute_metrics(synthetic, target, profile="paper")
    assert list(got) == ["ssim", "psnr", "nmse", "mae"]
    assert got["ssim"] == pytest.approx(sk_ssim(target, synthetic, data_range=1.0), abs=1e-9)
    assert got["psnr"] == pytest.approx(sk_psnr(target, synthetic, data_range=1.0), abs=1e-9)
    # CT in HU: seed window (clip [-1024, 3000], (HU + 1024) / 4024) for SSIM/PSNR/NMSE, MAE in HU unclipped.
    hu_t = target * 3000 - 1100  # dips below -1024 so the clip matters
    hu_s = synthetic * 3000 - 1100
    ct = compute_metrics(hu_s, hu_t, profile="paper", modality="ct")
    wt, ws = (np.clip(hu_t, -1024, 3000) + 1024) / 4024, (np.clip(hu_s, -1024, 3000) + 1024) / 4024
    assert ct["ssim"] == pytest.approx(sk_ssim(wt, ws, data_range=1.0), abs=1e-9)
    assert ct["psnr"] == pytest.approx(sk_psnr(wt, ws, data_range=1.0), abs=1e-9)
    assert ct["mae"] == pytest.approx(np.mean(np.abs(hu_s - hu_t)), rel=1e-12)
    np.testing.assert_allclose(
        ct_window_to_unit(np.array([-2000.0, -1024.0, 988.0, 3000.0, 5000.0])), [0.0, 0.0, 0.5, 1.0, 1.0]
    )


def _seed_evaluate_iqa(gt: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """The seed's evaluate_iqa.py for an MR target, re-typed: each volume min-max normalised on its own, then
    scikit-image SSIM/PSNR with data_range 1 on the 3D array and NMSE = MSE / Var(GT)."""
    g = (gt - gt.min()) / (gt.max() - gt.min())
    p = (pred - pred.min()) / (pred.max() - pred.min())
    return {"ssim": sk_ssim(g, p, data_range=1.0), "psnr": sk_psnr(g, p, data_range=1.0),
            "nmse": np.mean((g - p) ** 2) / np.var(g)}


def test_paper_normalisation_reproduces_the_seed_evaluation() -> None:
    synthetic, target = _structured_pair()
    raw_target = target * 850.0 + 40.0  # MR-like scanner units
    raw_synthetic = synthetic * 0.9 + 0.1  # a prediction on its own [0, 1]-ish scale
    got = compute_metrics(raw_synthetic, raw_target, profile="paper", normalise="paper")
    expected = _seed_evaluate_iqa(raw_target, raw_synthetic)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-9), key
    assert NORMALISATIONS == ("paper", "target", "none")


def test_paper_normalisation_ignores_an_affine_change_of_the_prediction() -> None:
    """Golden: 0.8·x + 0.05 scores exactly as x under the paper's definition, not under target-only."""
    synthetic, target = _structured_pair()
    mask = np.zeros(target.shape, dtype=bool)
    mask[4:20, 4:18, 4:16] = True
    raw_target = target * 600.0 + 25.0
    plain = compute_metrics(synthetic, raw_target, profile="paper", normalise="paper", mask=mask)
    scaled = compute_metrics(0.8 * synthetic + 0.05, raw_target, profile="paper", normalise="paper", mask=mask)
    assert set(plain) == set(scaled) == set(metric_names("paper", masked=True))
    for key in plain:
        assert scaled[key] == pytest.approx(plain[key], rel=1e-12, abs=1e-13), key
    plain_t = compute_metrics(synthetic, raw_target, profile="paper", normalise="target", mask=mask)
    scaled_t = compute_metrics(0.8 * synthetic + 0.05, raw_target, profile="paper", normalise="target", mask=mask)
    for key in ("ssim", "psnr", "nmse", "mae", "psnr_mask"):
        assert abs(scaled_t[key] - plain_t[key]) > 1e-3 * max(1.0, abs(plain_t[key])), key
    # Target-only: the target is min-max normalised, the prediction is scored as given.
    t01 = (raw_target - raw_target.min()) / np.ptp(raw_target)
    assert plain_t["psnr"] == pytest.approx(sk_psnr(t01, synthetic, data_range=1.0), abs=1e-9)
    # none: as given; the default of the pure function (volsynth evaluate chooses "paper" for MR).
    assert compute_metrics(synthetic, t01, profile="paper") == compute_metrics(synthetic, t01, profile="paper",
                                                                              normalise="none")


def test_normalisation_edge_cases() -> None:
    target = np.linspace(0.0, 3.0, 8 * 8 * 8).reshape(8, 8, 8)
    np.testing.assert_allclose(minmax_unit(target), target / 3.0, rtol=1e-15)
    # A constant prediction has no range: zeros (the seed would divide by zero); a constant target is an error.
    x, y = normalise_pair(np.full(target.shape, 5.0), target, "paper")
    assert np.all(x == 0.0) and y.max() == 1.0
    with pytest.raises(ValueError, match=r"target is constant \(2\.0\)"):
        normalise_pair(target, np.full(target.shape, 2.0), "target")
    with pytest.raises(ValueError, match="Did you mean 'target'"):
        normalise_pair(target, target, "targt")
    with pytest.raises(ValueError, match="MR only"):
        compute_metrics(target, target, profile="paper", modality="ct", normalise="paper")
    with pytest.raises(ValueError, match="MR only"):
        compute_metrics(target, target, profile="synthrad2023", normalise="target")


def _synthrad2023_reference(gt: np.ndarray, pred: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """SynthRAD2023/metrics image_metrics.py @ fe7e385, re-typed with scikit-image (float64, array mask)."""
    lo, hi = -1024.0, 3000.0
    m = np.where(mask > 0, 1.0, 0.0)
    mae_v = np.sum(np.abs(gt * m - pred * m)) / m.sum()
    g, p = np.clip(gt, lo, hi), np.clip(pred, lo, hi)
    psnr_v = sk_psnr(g[m == 1], p[m == 1], data_range=hi - lo)
    g2, p2 = np.where(m == 0, lo, g) - lo, np.where(m == 0, lo, p) - lo
    _, smap = sk_ssim(g2, p2, data_range=hi - lo, full=True)
    ssim_v = sk_crop(smap, 3)[sk_crop(m, 3).astype(bool)].mean(dtype=np.float64)
    return {"mae": mae_v, "psnr": psnr_v, "ssim": ssim_v}


def test_synthrad2023_profile_matches_the_challenge_rules() -> None:
    synthetic, target = _structured_pair((20, 22, 24))
    gt = target * 4000 - 1500  # values beyond both ends of [-1024, 3000]
    pred = synthetic * 4200 - 1450
    mask = np.zeros(gt.shape, dtype=bool)
    mask[4:16, 5:18, 3:20] = True
    mask &= target > 0.05  # an irregular body outline inside the box
    expected = _synthrad2023_reference(gt, pred, mask)
    got = compute_metrics(pred, gt, profile="synthrad2023", mask=mask)
    assert list(got) == ["ssim", "psnr", "nmse", "mae"]
    for key in ("ssim", "psnr"):
        assert got[key] == pytest.approx(expected[key], abs=1e-6), key
    assert got["mae"] == pytest.approx(expected["mae"], rel=1e-12)
    assert got["nmse"] == pytest.approx(np.mean((pred[mask] - gt[mask]) ** 2) / np.var(gt[mask]), rel=1e-12)
    # The mask must matter (the ganslate failure mode: silently ignoring it).
    whole = compute_metrics(pred, gt, profile="synthrad2023")
    assert abs(whole["ssim"] - got["ssim"]) > 1e-3 and abs(whole["mae"] - got["mae"]) > 1.0
    # Without a mask the whole volume is the region: plain clipped, shifted SSIM.
    g, p = np.clip(gt, -1024, 3000) + 1024, np.clip(pred, -1024, 3000) + 1024
    assert whole["ssim"] == pytest.approx(sk_ssim(g, p, data_range=4024.0), abs=1e-9)


# ------------------------------------------------------------------------------------------------------------
# validation


def test_validation_errors() -> None:
    a = np.zeros((8, 8, 8))
    with pytest.raises(ValueError, match=r"\(8, 8, 8\).*\(8, 8, 9\)"):
        ssim(a, np.zeros((8, 8, 9)), data_range=1.0)
    bad = a.copy()
    bad[1, 2, 3] = np.nan
    with pytest.raises(ValueError, match=r"synthetic.*NaN"):
        psnr(bad, a, data_range=1.0)
    bad[1, 2, 3] = np.inf
    with pytest.raises(ValueError, match=r"target.*Inf"):
        mae(a, bad)
    with pytest.raises(TypeError, match="boolean"):
        mae(a, a, mask=np.ones((8, 8, 8)))
    with pytest.raises(ValueError, match="mask shape"):
        mae(a, a, mask=np.ones((8, 8, 7), dtype=bool))
    with pytest.raises(ValueError, match="empty"):
        nmse(a, a, mask=np.zeros((8, 8, 8), dtype=bool))
    edge = np.zeros((8, 8, 8), dtype=bool)
    edge[0] = True
    with pytest.raises(ValueError, match="border"):
        ssim(a, a, data_range=1.0, mask=edge)
    with pytest.raises(ValueError, match="odd"):
        ssim(a, a, data_range=1.0, win_size=4)
    with pytest.raises(ValueError, match="exceeds"):
        ssim(np.zeros((8, 8, 5)), np.zeros((8, 8, 5)), data_range=1.0)
    with pytest.raises(ValueError, match="data_range"):
        psnr(a, a, data_range=0.0)
    with pytest.raises(ValueError, match="Did you mean 'paper'"):
        compute_metrics(a, a, profile="papr")
    with pytest.raises(ValueError, match="synthrad2023"):
        compute_metrics(a, a, profile="synthrad2023", modality="mr")
    with pytest.raises(ValueError, match="Did you mean 'ct'"):
        compute_metrics(a, a, profile="paper", modality="cct")


# ------------------------------------------------------------------------------------------------------------
# LPIPS


@pytest.fixture(scope="module")
def lpips_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A random VGG-16 checkpoint (torchvision layout) and random positive lin weights, written to disk."""
    root = tmp_path_factory.mktemp("lpips")
    torch.manual_seed(0)
    vgg = VGG(16)
    torch.save(vgg.state_dict(), root / "vgg16.pth")
    lin = {
        f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) + 0.05 for i, c in enumerate(lp.VGG16_TAP_CHANNELS)
    }
    torch.save(lin, root / "lpips_vgg.pth")
    return {"vgg": root / "vgg16.pth", "lin": root / "lpips_vgg.pth", "root": root}


@pytest.fixture(scope="module")
def lpips_model(lpips_files: dict[str, Path]) -> lp.LPIPS:
    return lp.build_lpips(
        lp.LPIPSConfig(backbone_weights=lpips_files["vgg"], linear_weights=lpips_files["lin"])
    )


def _hand_lpips(model: lp.LPIPS, lin: dict[str, torch.Tensor], img0: np.ndarray, img1: np.ndarray) -> float:
    """The LPIPS formula written out: scaling, VGG relu taps, unit-normalise, diff², lin weights, mean."""
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)

    def taps(img: np.ndarray) -> list[torch.Tensor]:
        x = torch.from_numpy(img).float()[None, None].repeat(1, 3, 1, 1) * 2 - 1
        x = (x - shift) / scale
        out = []
        for index, layer in enumerate(model.backbone.features):
            x = layer(x)
            if index in (3, 8, 15, 22, 29):
                out.append(x.clone().double())
            if index == 29:  # relu5_3; the final pool would fail on small slices
                break
        return out

    total = 0.0
    with torch.no_grad():
        for i, (f0, f1) in enumerate(zip(taps(img0), taps(img1), strict=True)):
            n0 = f0 / (f0.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            n1 = f1 / (f1.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            w = lin[f"lin{i}.model.1.weight"].double().view(1, -1, 1, 1)
            total += float(((n0 - n1) ** 2 * w).sum(1).mean())
    return total


def test_lpips_matches_the_formula_by_hand(lpips_model: lp.LPIPS, lpips_files: dict[str, Path]) -> None:
    rng = np.random.default_rng(0)
    img0 = gaussian_filter(rng.random((32, 24)), 1.5)
    img1 = np.clip(img0 + 0.1 * rng.standard_normal(img0.shape), 0, 1)
    lin = torch.load(lpips_files["lin"], weights_only=True)
    expected = _hand_lpips(lpips_model, lin, img0, img1)
    x0 = torch.from_numpy(img0).float()[None, None].repeat(1, 3, 1, 1) * 2 - 1
    x1 = torch.from_numpy(img1).float()[None, None].repeat(1, 3, 1, 1) * 2 - 1
    with torch.no_grad():
        got = float(lpips_model(x0, x1)[0])
    assert expected > 1e-3
    assert got == pytest.approx(expected, abs=1e-6)


def test_lpips_volume_zero_for_identical_and_grows_with_noise(lpips_model: lp.LPIPS) -> None:
    _, target = _structured_pair((16, 18, 20))
    assert lp.lpips_volume(target, target, model=lpips_model) == 0.0
    rng = np.random.default_rng(5)
    noise = rng.standard_normal(target.shape)
    values = [
        lp.lpips_volume(np.clip(target + s * noise, 0, 1), target, model=lpips_model, max_slices_per_view=6)
        for s in (0.02, 0.08, 0.3)
    ]
    assert 0 < values[0] < values[1] < values[2]


def test_lpips_views_slice_the_right_axes(lpips_model: lp.LPIPS) -> None:
    rng = np.random.default_rng(9)
    target = gaussian_filter(rng.random((16, 17, 18)), 1.0)
    synthetic = target.copy()
    synthetic[5] = np.clip(synthetic[5] + 0.3 * rng.standard_normal(synthetic[5].shape), 0, 1)  # one x plane
    full = lp.lpips_views(synthetic, target, model=lpips_model, views=("sagittal",), batch_size=5)
    x0 = torch.from_numpy(synthetic[5]).float()[None, None].repeat(1, 3, 1, 1) * 2 - 1
    x1 = torch.from_numpy(target[5]).float()[None, None].repeat(1, 3, 1, 1) * 2 - 1
    with torch.no_grad():
        one = float(lpips_model(x0, x1)[0])
    # Sagittal = fixed x: only slice 5 of 16 differs.
    assert one > 1e-3
    assert full["sagittal"] == pytest.approx(one / 16, rel=1e-5)
    # Three evenly spaced slices per view: x = 0, 8, 15 miss the changed plane; all z and y slices cross it.
    sub = lp.lpips_views(synthetic, target, model=lpips_model, max_slices_per_view=3)
    assert sub["sagittal"] == 0.0
    assert sub["axial"] > 0 and sub["coronal"] > 0
    assert lp.lpips_volume(synthetic, target, model=lpips_model, max_slices_per_view=3) == pytest.approx(
        np.mean(list(sub.values())), rel=1e-12
    )
    with pytest.raises(ValueError, match="at least 16"):
        lp.lpips_views(np.zeros((16, 16, 8)), np.zeros((16, 16, 8)), model=lpips_model)
    with pytest.raises(ValueError, match="Did you mean 'axial'"):
        lp.lpips_views(target, target, model=lpips_model, views=("axail",))


def test_lpips_unavailable_names_the_file(lpips_files: dict[str, Path], tmp_path: Path) -> None:
    missing = tmp_path / "nowhere_lin.pth"
    with pytest.raises(lp.LPIPSUnavailable, match=r"nowhere_lin\.pth"):
        lp.build_lpips(lp.LPIPSConfig(backbone_weights=lpips_files["vgg"], linear_weights=missing))
    corrupt = tmp_path / "corrupt_lin.pth"
    corrupt.write_bytes(b"not a checkpoint at all")
    with pytest.raises(lp.LPIPSUnavailable, match=r"corrupt_lin\.pth") as info:
        lp.build_lpips(lp.LPIPSConfig(backbone_weights=lpips_files["vgg"], linear_weights=corrupt))
    assert "corrupt_lin.pth" in info.value.reason
    with pytest.raises(lp.LPIPSUnavailable, match=r"missing_vgg\.pth"):
        lp.build_lpips(
            lp.LPIPSConfig(backbone_weights=tmp_path / "missing_vgg.pth", linear_weights=lpips_files["lin"])
        )
    # lpips_volume with a config builds the model and raises the same way.
    vol = np.zeros((16, 16, 16))
    with pytest.raises(lp.LPIPSUnavailable, match=r"nowhere_lin\.pth"):
        lp.lpips_volume(
            vol, vol, model=lp.LPIPSConfig(backbone_weights=lpips_files["vgg"], linear_weights=missing)
        )
    wrong = tmp_path / "wrong_lin.pth"
    torch.save({"lin0.model.1.weight": torch.rand(1, 64, 1, 1)}, wrong)
    with pytest.raises(lp.LPIPSUnavailable, match=r"wrong_lin.pth.*lin1\.model\.1\.weight"):
        lp.build_lpips(lp.LPIPSConfig(backbone_weights=lpips_files["vgg"], linear_weights=wrong))
    negative = tmp_path / "negative_lin.pth"
    torch.save(
        {f"lin{i}.model.1.weight": -torch.rand(1, c, 1, 1) for i, c in enumerate(lp.VGG16_TAP_CHANNELS)},
        negative,
    )
    with pytest.raises(lp.LPIPSUnavailable, match="negative"):
        lp.build_lpips(lp.LPIPSConfig(backbone_weights=lpips_files["vgg"], linear_weights=negative))
    with pytest.raises(lp.LPIPSUnavailable, match="baseline"):
        lp.build_lpips(lp.LPIPSConfig(backbone_weights=lpips_files["vgg"], linear_weights=None))
    with pytest.raises(ValueError, match="Did you mean 'learned'"):
        lp.build_lpips(lp.LPIPSConfig(backbone_weights=lpips_files["vgg"], variant="learnd"))


def test_lpips_hub_offline_is_unavailable_without_downloading(
    lpips_files: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[str, str | None]] = []

    def offline(url: str, *args: object, file_name: str | None = None, **kwargs: object) -> None:
        calls.append((url, file_name))
        raise urllib.error.URLError("network unreachable")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(lp.LPIPSUnavailable, match=r"lpips_vgg_v0\.1\.pth"):
        lp.build_lpips(lp.LPIPSConfig(backbone_weights=lpips_files["vgg"], linear_weights="hub"))
    assert calls == [(lp.LPIPS_VGG_URL, "lpips_vgg_v0.1.pth")]


def test_lpips_baseline_variant_uses_uniform_weights(lpips_files: dict[str, Path]) -> None:
    model = lp.build_lpips(
        lp.LPIPSConfig(backbone_weights=lpips_files["vgg"], linear_weights=None, variant="baseline")
    )
    assert model.variant == "baseline"
    rng = np.random.default_rng(2)
    img0, img1 = rng.random((16, 16)), rng.random((16, 16))
    ones = {f"lin{i}.model.1.weight": torch.ones(1, c, 1, 1) for i, c in enumerate(lp.VGG16_TAP_CHANNELS)}
    x0 = torch.from_numpy(img0).float()[None, None].repeat(1, 3, 1, 1) * 2 - 1
    x1 = torch.from_numpy(img1).float()[None, None].repeat(1, 3, 1, 1) * 2 - 1
    with torch.no_grad():
        got = float(model(x0, x1)[0])
    assert got == pytest.approx(_hand_lpips(model, ones, img0, img1), abs=1e-6)
