"""Tests for the synthetic phantom cohort (the volsynth.data.phantom package).

Everything runs at 4 mm (a 49×58×47 grid; the CLI tests at 6 mm) so the template is resampled once and each
subject takes well under a second. The ceiling ballpark at the demo's 3 mm is a slow test.
"""

from __future__ import annotations

import json
import stat
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from volsynth.config import SplitConfig
from volsynth.data import phantom
from volsynth.data.discovery import make_splits
from volsynth.data.manifest import load_manifest
from volsynth.data.phantom import (
    CONTRASTS,
    REFERENCE_INTENSITY,
    SEG_LABELS,
    TISSUE_LABELS,
    TISSUES,
    PhantomSubject,
    make_phantom_cohort,
    rician_mean,
    simulate_subject,
)
from volsynth.data.phantom.anatomy import sample_deformation, template_anatomy
from volsynth.errors import OutputError
from volsynth.utils import normal_file_mode

SPACING = 4.0


@pytest.fixture(scope="module")
def lesion_pair() -> tuple[PhantomSubject, PhantomSubject]:
    """The same subject simulated without and with lesions."""
    kwargs = {"seed": 7, "spacing": SPACING, "noise_percent": 3.0}
    return (simulate_subject(0, lesion_probability=0.0, **kwargs),
            simulate_subject(0, lesion_probability=1.0, **kwargs))


def _region_mean(subject: PhantomSubject, contrast: str, label: int) -> float:
    region = subject.tissue == label
    assert region.sum() >= 10, f"too few voxels with tissue label {label} to compare means"
    return float(subject.images[contrast][region].mean())


def test_tissue_contrast_ordering(lesion_pair: tuple[PhantomSubject, PhantomSubject]) -> None:
    sub = lesion_pair[1]
    csf, gm, wm, oedema = (TISSUE_LABELS[t] for t in ("csf", "gm", "wm", "oedema"))
    t1 = [_region_mean(sub, "t1", label) for label in (wm, gm, csf)]
    assert t1[0] > t1[1] > t1[2], f"T1w should have WM > GM > CSF, got {t1}"
    t2 = [_region_mean(sub, "t2", label) for label in (csf, gm, wm)]
    assert t2[0] > t2[1] > t2[2], f"T2w should have CSF > GM > WM, got {t2}"
    assert _region_mean(sub, "flair", csf) < _region_mean(sub, "flair", gm)
    assert _region_mean(sub, "flair", oedema) > _region_mean(sub, "flair", wm)
    # Gadolinium: the enhancing rim is the brightest class on T1ce but not on the plain T1w.
    enhancing = TISSUE_LABELS["enhancing"]
    assert _region_mean(sub, "t1ce", enhancing) > _region_mean(sub, "t1ce", wm)
    assert _region_mean(sub, "t1", enhancing) < _region_mean(sub, "t1", wm)


def test_flair_nulls_pure_csf() -> None:
    params = phantom.BASE_TISSUE_PARAMS
    flair = phantom.SEQUENCES["flair"]
    assert abs(phantom.tissue_signal(params["csf"], flair)) < 1e-6
    assert phantom.tissue_signal(params["gm"], flair) > 0.1


def test_fractions_sum_to_one_inside_brain(lesion_pair: tuple[PhantomSubject, PhantomSubject]) -> None:
    for sub in lesion_pair:
        assert set(sub.fractions) == set(TISSUES)
        stack = np.stack([sub.fractions[t] for t in TISSUES])
        assert stack.dtype == np.float32
        assert stack.min() >= 0.0 and stack.max() <= 1.0 + 1e-6
        total = stack.sum(axis=0)
        brain = sub.mask.astype(bool)
        assert brain.sum() > 1000
        np.testing.assert_allclose(total[brain], 1.0, atol=1e-5)
        assert np.all(total[~brain] == 0.0)
        assert np.all(sub.tissue[~brain] == 0) and np.all(sub.tissue[brain] > 0)


def test_lesion_labels_cover_changed_voxels(lesion_pair: tuple[PhantomSubject, PhantomSubject]) -> None:
    plain, lesioned = lesion_pair
    assert not plain.seg.any() and not plain.has_lesion
    assert lesioned.has_lesion
    assert set(np.unique(lesioned.seg)) <= {0, *SEG_LABELS.values()}
    assert {SEG_LABELS["oedema"], SEG_LABELS["enhancing"]} <= set(np.unique(lesioned.seg))
    # Same anatomy either way; lesions only take over tissue fractions.
    np.testing.assert_array_equal(plain.mask, lesioned.mask)
    lesion_fraction = sum(lesioned.fractions[t] for t in ("necrosis", "oedema", "enhancing"))
    untouched = lesion_fraction == 0
    assert untouched.sum() > 0.9 * untouched.size
    changed = np.zeros(plain.mask.shape, bool)
    for c in CONTRASTS:
        diff = np.abs(lesioned.clean[c] - plain.clean[c])
        assert np.all(diff[untouched] == 0), f"{c}: signal changed outside the lesion"
        # Bias field and noise are drawn independently of the lesions, so the noisy images agree too.
        np.testing.assert_array_equal(lesioned.images[c][untouched], plain.images[c][untouched])
        changed |= diff > 0.01 * REFERENCE_INTENSITY
    seg = lesioned.seg > 0
    assert np.all(changed[seg]), "every labelled lesion voxel must differ from the lesion-free signal"
    # Labelled voxels are those where the lesion occupies at least half the voxel.
    np.testing.assert_array_equal(seg, (lesion_fraction >= 0.5) & lesioned.mask.astype(bool))
    # Tissue labels agree with the BraTS labels on lesion classes.
    for name, seg_value in SEG_LABELS.items():
        np.testing.assert_array_equal(lesioned.seg == seg_value, lesioned.tissue == TISSUE_LABELS[name])


def test_lesion_classes_are_nested(lesion_pair: tuple[PhantomSubject, PhantomSubject]) -> None:
    from scipy import ndimage as ndi

    seg = lesion_pair[1].seg
    nec, oed, enh = SEG_LABELS["necrosis"], SEG_LABELS["oedema"], SEG_LABELS["enhancing"]
    core = seg == nec
    core_and_rim = core | (seg == enh)
    assert core.any()
    # The necrotic core is wrapped in enhancing rim and the rim in oedema. A 3–6 mm rim is about one 4 mm voxel,
    # so the labelled rim may have pinholes: require most of each shell, not all of it.
    core_shell = ndi.binary_dilation(core) & ~core
    assert np.mean(np.isin(seg[core_shell], [enh, nec])) > 0.6
    rim_shell = ndi.binary_dilation(core_and_rim) & ~core_and_rim
    assert np.mean(seg[rim_shell] == oed) > 0.9
    # 1–3 lesions per subject, each with oedema around it.
    labels, n = ndi.label(seg > 0)
    assert 1 <= n <= 3
    for k in range(1, n + 1):
        present = set(np.unique(seg[labels == k]))
        assert oed in present, f"lesion {k} has no oedema"


@pytest.mark.parametrize("noise_percent", [2.0, 5.0])
def test_background_noise_matches_requested_level(noise_percent: float) -> None:
    sub = simulate_subject(1, seed=3, spacing=SPACING, lesion_probability=0.0, noise_percent=noise_percent,
                           contrasts=("t1", "flair"))
    requested = noise_percent / 100.0 * REFERENCE_INTENSITY
    background = sub.mask == 0
    for c, image in sub.images.items():
        assert sub.noise_sigma[c] == pytest.approx(requested)
        assert np.all(sub.clean[c][background] == 0)
        values = image[background].astype(np.float64)
        # Zero signal → Rayleigh magnitudes: E[x²] = 2σ² and std = σ·sqrt((4 − π)/2).
        sigma_rms = np.sqrt(np.mean(values**2) / 2.0)
        sigma_std = values.std() / np.sqrt((4.0 - np.pi) / 2.0)
        assert sigma_rms == pytest.approx(requested, rel=0.10), c
        assert sigma_std == pytest.approx(requested, rel=0.10), c


def test_zero_noise_gives_bias_only_images() -> None:
    sub = simulate_subject(0, seed=3, spacing=SPACING, noise_percent=0.0, contrasts=("t2",))
    img, clean = sub.images["t2"], sub.clean["t2"]
    assert np.all(img[sub.mask == 0] == 0)
    ratio = img[clean > 50] / clean[clean > 50]
    assert 0.75 < ratio.min() < 1.0 < ratio.max() < 1.3  # a smooth ±10–20 % bias field, not identity
    assert not np.array_equal(img, clean)


def test_subject_does_not_depend_on_other_requests() -> None:
    full = simulate_subject(2, seed=5, spacing=SPACING, lesion_probability=0.5)
    only_t2 = simulate_subject(2, seed=5, spacing=SPACING, lesion_probability=0.5, contrasts=["t2"])
    assert list(only_t2.images) == ["t2"]
    np.testing.assert_array_equal(full.images["t2"], only_t2.images["t2"])
    np.testing.assert_array_equal(full.seg, only_t2.seg)


def test_different_seeds_give_different_anatomy() -> None:
    a = simulate_subject(0, seed=1, spacing=SPACING, lesion_probability=0.0, contrasts=("t1",))
    b = simulate_subject(0, seed=2, spacing=SPACING, lesion_probability=0.0, contrasts=("t1",))
    c = simulate_subject(1, seed=1, spacing=SPACING, lesion_probability=0.0, contrasts=("t1",))
    for other in (b, c):
        differ = np.mean(a.mask != other.mask)
        assert differ > 0.005, f"only {differ:.4f} of the mask voxels differ"
        assert np.abs(a.fractions["wm"] - other.fractions["wm"]).max() > 0.5


def test_deformation_does_not_fold() -> None:
    anatomy = template_anatomy(SPACING)
    identity = np.stack(np.meshgrid(*[np.arange(n) for n in anatomy.shape], indexing="ij")).astype(np.float32)
    for seed in range(5):
        coords = sample_deformation(np.random.default_rng([seed, 0, 1]), anatomy)
        assert coords.shape == (3, *anatomy.shape)
        jac = np.stack([np.stack(np.gradient(coords[i]), axis=0) for i in range(3)])  # (3, 3, X, Y, Z)
        det = np.linalg.det(np.moveaxis(jac, (0, 1), (-2, -1)))
        assert det.min() > 0.2, f"seed {seed}: Jacobian determinant down to {det.min():.3f}"
        residual = coords - identity
        residual -= residual.mean(axis=(1, 2, 3), keepdims=True)
        assert np.abs(residual).max() > 0.5  # a real, non-affine deformation


def test_resampled_grid_keeps_world_extent() -> None:
    anatomy = template_anatomy(SPACING)
    assert anatomy.shape == (49, 58, 47)
    np.testing.assert_allclose(np.diag(anatomy.affine)[:3], SPACING)
    # Same field-of-view centre as the 1 mm template: 197×233×189 voxels from (−98, −134, −72).
    centre = anatomy.affine[:3, 3] + (np.asarray(anatomy.shape) - 1) / 2 * SPACING
    np.testing.assert_allclose(centre, [0.0, -18.0, 22.0])


def test_cohort_files_manifest_and_determinism(tmp_path: Path) -> None:
    kwargs = {"seed": 11, "spacing": SPACING, "lesion_probability": 1.0, "noise_percent": 4.0,
              "contrasts": ("t1", "flair", "t1ce")}
    roles = {"source": "t1ce", "target": "flair"}
    first = make_phantom_cohort(tmp_path / "a", 2, **kwargs, **roles)
    second = make_phantom_cohort(tmp_path / "b", 2, **kwargs, **roles)
    other = make_phantom_cohort(tmp_path / "c", 2, **{**kwargs, "seed": 12}, **roles)
    files_a = sorted(p.relative_to(first.parent) for p in first.parent.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(second.parent) for p in second.parent.rglob("*") if p.is_file())
    assert files_a == files_b
    # manifest + per subject: 3 contrasts, their 3 ideal images, seg/tissue/mask, montage
    assert len(files_a) == 1 + 2 * (3 + 3 + 3 + 1)
    for rel in files_a:
        assert (first.parent / rel).read_bytes() == (second.parent / rel).read_bytes(), f"{rel} differs"

    manifest = json.loads(first.read_text())
    assert manifest["format"] == "volsynth-manifest" and manifest["version"] == 1
    assert manifest["dataset"] == "phantom"
    assert manifest["generator"] == {"seed": 11, "subjects": 2, "spacing": SPACING, "lesions": 1.0,
                                     "contrasts": ["t1", "flair", "t1ce"], "noise": 4.0,
                                     "volsynth_phantom_version": 2}
    assert (manifest["source"], manifest["target"]) == ("t1ce", "flair")
    assert [s["subject"] for s in manifest["subjects"]] == ["Phantom_00000", "Phantom_00001"]
    for entry in manifest["subjects"]:
        sub = simulate_subject(int(entry["subject"][-5:]), **kwargs)
        assert entry["has_lesion"] is True
        assert sorted(entry["images"]) == ["flair", "t1", "t1ce"]
        assert sorted(entry["ideal"]) == ["flair", "t1", "t1ce"]
        for c, rel in entry["images"].items():
            assert rel == f"{sub.subject}/{sub.subject}_{c}.nii.gz"
            img = nib.load(first.parent / rel)
            assert img.get_data_dtype() == np.float32
            np.testing.assert_array_equal(img.affine, sub.affine)
            assert int(img.header["qform_code"]) == 1 and int(img.header["sform_code"]) == 1
            np.testing.assert_array_equal(np.asarray(img.dataobj), sub.images[c])
            ideal_rel = entry["ideal"][c]
            assert ideal_rel == f"{sub.subject}/{sub.subject}_{c}_ideal.nii.gz"
            ideal = nib.load(first.parent / ideal_rel)
            assert ideal.get_data_dtype() == np.float32
            np.testing.assert_array_equal(ideal.affine, sub.affine)
            np.testing.assert_array_equal(np.asarray(ideal.dataobj), sub.ideal(c))
        for key, array in (("label", sub.seg), ("tissue", sub.tissue), ("mask", sub.mask)):
            img = nib.load(first.parent / entry[key])
            assert img.get_data_dtype() == np.uint8
            np.testing.assert_array_equal(np.asarray(img.dataobj), array)
        assert entry["label"].endswith("_seg.nii.gz") and entry["mask"].endswith("_mask.nii.gz")
        png = first.parent / entry["subject"] / f"{entry['subject']}_montage.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Another seed: different anatomy in the files themselves.
    mask_a = np.asarray(nib.load(first.parent / "Phantom_00000/Phantom_00000_mask.nii.gz").dataobj)
    mask_c = np.asarray(nib.load(other.parent / "Phantom_00000/Phantom_00000_mask.nii.gz").dataobj)
    assert np.mean(mask_a != mask_c) > 0.005


def test_overwrite_replaces_own_files_and_keeps_others(tmp_path: Path) -> None:
    make_phantom_cohort(tmp_path, 2, seed=0, spacing=SPACING, contrasts=("t1", "t2"), montage=False)
    (tmp_path / "notes.txt").write_text("keep me")
    (tmp_path / "Phantom_00001" / "extra.txt").write_text("keep me too")
    manifest = make_phantom_cohort(tmp_path, 1, seed=0, spacing=SPACING, contrasts=("t2", "pd"), montage=False,
                                   source="pd", target="t2", overwrite=True)
    assert json.loads(manifest.read_text())["generator"]["subjects"] == 1
    assert not (tmp_path / "Phantom_00000" / "Phantom_00000_t1.nii.gz").exists()
    assert not (tmp_path / "Phantom_00000" / "Phantom_00000_t1_ideal.nii.gz").exists()
    assert (tmp_path / "Phantom_00000" / "Phantom_00000_t2.nii.gz").exists()
    assert (tmp_path / "Phantom_00000" / "Phantom_00000_t2_ideal.nii.gz").exists()
    assert sorted(p.name for p in (tmp_path / "Phantom_00001").iterdir()) == ["extra.txt"]
    assert (tmp_path / "notes.txt").read_text() == "keep me"
    assert not list(tmp_path.rglob(".*.tmp*"))  # no temporary file of an atomic write is left behind


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"contrasts": ("t1", "t2w")}, "Did you mean 't2'"),
        ({"contrasts": ()}, "At least one contrast"),
        ({"subjects": 0}, "subjects"),
        ({"spacing": 0.0}, "spacing"),
        ({"spacing": -2.0}, "spacing"),
        ({"spacing": float("nan")}, "spacing"),
        ({"spacing": 40.0}, "too coarse"),
        ({"lesion_probability": 1.5}, "lesion probability"),
        ({"noise_percent": -1.0}, "noise"),
        ({"seed": -1}, "seed"),
        ({"contrasts": ("t1", "t2"), "target": "flair"}, r"target contrast 'flair' is not among .*\(t1, t2\)"),
        ({"source": "t2", "target": "t2"}, "both 't2'"),
        ({"spacing": 0.3}, r"too fine.*finest spacing allowed is about 0\.5"),
    ],
)
def test_invalid_arguments_raise(tmp_path: Path, kwargs: dict, message: str) -> None:
    args = {"subjects": 1, "seed": 0, "spacing": SPACING, **kwargs}
    with pytest.raises(ValueError, match=message):
        make_phantom_cohort(tmp_path / "out", args.pop("subjects"), **args)
    assert not (tmp_path / "out" / "manifest.json").exists()


# ------------------------------------------------------------------------------------------------------------
# The ideal image (Rician mean) and the ceiling it sets


@pytest.mark.parametrize("snr", [0.0, 0.5, 1.0, 2.0, 4.0, 10.0])
def test_rician_mean_matches_monte_carlo(snr: float) -> None:
    """Closed form vs the sample mean of simulated magnitudes |ν + n₁ + i·n₂| (within 3 standard errors)."""
    sigma, n = 7.0, 400_000
    nu = snr * sigma
    rng = np.random.default_rng([2024, int(snr * 10)])
    samples = np.hypot(nu + sigma * rng.standard_normal(n), sigma * rng.standard_normal(n))
    standard_error = samples.std(ddof=1) / np.sqrt(n)
    expected = float(rician_mean(nu, sigma))
    assert abs(samples.mean() - expected) < 3 * standard_error, (snr, samples.mean(), expected, standard_error)
    # A wrong formula would be caught: the naive guesses ν and sqrt(ν² + σ²) differ by > 3 SE below ν/σ = 4.
    if snr < 4:
        assert abs(expected - nu) > 3 * standard_error and abs(expected - np.hypot(nu, sigma)) > 3 * standard_error


def test_rician_mean_limits() -> None:
    # ν = 0: the Rayleigh mean σ·sqrt(π/2).
    assert float(rician_mean(0.0, 3.0)) == pytest.approx(3.0 * np.sqrt(np.pi / 2), rel=1e-14)
    # High SNR: ν + σ²/(2ν) + σ⁴/(8ν³) + O(σ⁶/ν⁵), finite where I₀ itself overflows (ν/σ ≫ 53).
    nu = np.array([100.0, 1e3, 1e6])
    np.testing.assert_allclose(rician_mean(nu, 1.0), nu + 1.0 / (2.0 * nu) + 1.0 / (8.0 * nu**3), rtol=1e-11)
    # σ = 0: the signal itself; the sign of ν does not matter (a magnitude); shape is kept.
    np.testing.assert_array_equal(rician_mean(np.array([[-2.0, 5.0]]), 0.0), [[2.0, 5.0]])
    assert rician_mean(np.zeros((2, 3)), 1.0).shape == (2, 3)
    with pytest.raises(ValueError, match="sigma"):
        rician_mean(1.0, -1.0)


def test_ideal_image_is_the_conditional_mean_of_the_noisy_image() -> None:
    sub = simulate_subject(0, seed=4, spacing=SPACING, lesion_probability=0.0, noise_percent=3.0,
                           contrasts=("t2",))
    sigma = sub.noise_sigma["t2"]
    noisy, ideal, biased = (a.astype(np.float64) for a in (sub.images["t2"], sub.ideal("t2"), sub.biased["t2"]))
    np.testing.assert_allclose(ideal, rician_mean(biased, sigma), rtol=1e-6)
    background = sub.mask == 0
    assert np.all(ideal[background & (biased == 0)] == np.float32(sigma * np.sqrt(np.pi / 2)))
    # Residuals of the noisy image around its ideal image average to zero, inside and outside the brain ...
    for region in (sub.mask > 0, background):
        residual = (noisy - ideal)[region]
        assert abs(residual.mean()) < 3 * residual.std() / np.sqrt(residual.size)
    # ... and their mean square is the Rician variance ν² + 2σ² − E² (≈ σ² in the brain, (2 − π/2)σ² outside).
    brain = sub.mask > 0
    variance = biased**2 + 2 * sigma**2 - ideal**2
    assert np.mean((noisy - ideal)[brain] ** 2) == pytest.approx(variance[brain].mean(), rel=0.03)
    # The noise-free signal itself (the naive "ideal") is a worse predictor than the Rician mean.
    assert np.mean((noisy - biased) ** 2) > 1.2 * np.mean((noisy - ideal) ** 2)


def test_zero_noise_ideal_is_the_image() -> None:
    sub = simulate_subject(0, seed=3, spacing=SPACING, noise_percent=0.0, contrasts=("t1",))
    np.testing.assert_array_equal(sub.ideal("t1"), sub.images["t1"])


@pytest.mark.slow
def test_ceiling_ballpark_at_the_demo_settings() -> None:
    """Ideal T2 vs noisy T2 at 3 mm, 3 % noise, the demo's test subjects (0 and 4 under the paper split of 8).

    Measured (target-only normalisation, the ideal put on the target's min-max scale): subject 0 SSIM 0.834,
    PSNR 33.47 dB, masked NMSE 0.0494; subject 4 0.883, 34.09 dB, 0.0448. Under the paper's normalisation (both
    volumes min-max normalised) the ideal image's Rayleigh floor (σ·sqrt(π/2)) is mapped to 0 while the noisy
    background keeps its mean, so whole-volume SSIM/PSNR drop (0.43/0.56, 28.2/29.4 dB).
    """
    from volsynth.metrics import compute_metrics

    expected = {0: {"ssim": 0.834, "psnr": 33.47, "nmse_mask": 0.0494},
                4: {"ssim": 0.883, "psnr": 34.09, "nmse_mask": 0.0448}}
    for index, values in expected.items():
        sub = simulate_subject(index, seed=0, spacing=3.0, contrasts=("t2",))
        noisy, ideal = sub.images["t2"].astype(np.float64), sub.ideal("t2").astype(np.float64)
        on_target_scale = (ideal - noisy.min()) / np.ptp(noisy)
        target_only = compute_metrics(on_target_scale, noisy, profile="paper", mask=sub.mask > 0,
                                      normalise="target")
        for key, value in values.items():
            assert target_only[key] == pytest.approx(value, abs=0.002 if key != "psnr" else 0.02), (index, key)
        paper = compute_metrics(ideal, noisy, profile="paper", mask=sub.mask > 0, normalise="paper")
        assert paper["psnr"] < target_only["psnr"] - 3.0 and paper["ssim"] < 0.6


# ------------------------------------------------------------------------------------------------------------
# The manifest is the truth: roles, splits, and an output folder that is not silently reused


def test_manifest_roles_and_paper_splits(tmp_path: Path) -> None:
    path = make_phantom_cohort(tmp_path / "ph", 5, seed=1, spacing=6.0, contrasts=("t2", "flair"),
                               source="t2", target="flair", montage=False, ideal=False)
    raw = json.loads(path.read_text())
    assert (raw["source"], raw["target"]) == ("t2", "flair")
    assert all("ideal" not in e for e in raw["subjects"]) and not list(path.parent.rglob("*_ideal.nii.gz"))
    assert raw["split_config"]["mode"] == "paper"
    names = [f"Phantom_{i:05d}" for i in range(5)]
    splits = make_splits(names, SplitConfig(mode="paper"))
    # Paper rule with 4 folds: subjects 0 and 4 are the test set; one of the three others validates.
    assert splits["test"] == ["Phantom_00000", "Phantom_00004"]
    assert {e["subject"]: e["split"] for e in raw["subjects"]} == {
        n: part for part, members in splits.items() for n in members}
    loaded = load_manifest(path)
    assert (loaded.source, loaded.target) == ("t2", "flair")
    assert [s.split for s in loaded.subjects] == ["test", "val", "train", "train", "test"]


def test_refuses_a_folder_with_a_users_manifest(tmp_path: Path) -> None:
    user = tmp_path / "userdata"
    user.mkdir()
    (user / "manifest.json").write_text('{"my": "precious manifest"}')
    with pytest.raises(OutputError, match=r"userdata/manifest\.json already exists and is not a volsynth phantom"):
        make_phantom_cohort(user, 1, spacing=6.0, montage=False)
    assert (user / "manifest.json").read_text() == '{"my": "precious manifest"}'
    assert sorted(p.name for p in user.iterdir()) == ["manifest.json"]  # nothing was added either
    make_phantom_cohort(user, 1, spacing=6.0, montage=False, overwrite=True)
    assert json.loads((user / "manifest.json").read_text())["dataset"] == "phantom"


def test_refuses_other_files_and_other_settings_but_reruns_the_same(tmp_path: Path) -> None:
    folder = tmp_path / "data"
    (folder / "scans").mkdir(parents=True)
    (folder / "scans" / "scan.nii.gz").write_bytes(b"not mine")
    with pytest.raises(OutputError, match=r"scans/scan\.nii\.gz is not part of a phantom"):
        make_phantom_cohort(folder, 1, spacing=6.0, montage=False)
    assert not (folder / "manifest.json").exists()

    folder = tmp_path / "ph"
    first = make_phantom_cohort(folder, 2, spacing=6.0, montage=False)
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    make_phantom_cohort(folder, 2, spacing=6.0, montage=False)  # same settings: allowed, same bytes
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before
    with pytest.raises(OutputError, match=r"ph/manifest\.json holds a phantom made with other settings \(generator"):
        make_phantom_cohort(folder, 3, spacing=6.0, montage=False)
    with pytest.raises(OutputError, match=r"other settings \(target differ"):
        make_phantom_cohort(folder, 2, spacing=6.0, montage=False, target="pd")
    (folder / "Phantom_00000" / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match=r"Phantom_00000/notes\.txt is not part of a phantom"):
        make_phantom_cohort(folder, 2, spacing=6.0, montage=False)
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file() and p.name != "notes.txt"} == before
    assert first.is_file()
    # A data set gets the permissions an ordinary write would give (not mkstemp's 0600).
    assert {stat.S_IMODE(p.stat().st_mode) for p in before} == {normal_file_mode()}


def test_cli_phantom_roles_and_refusal(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from volsynth.cli import main

    out = tmp_path / "ph"
    args = ["phantom", "--out", str(out), "--subjects", "2", "--spacing", "6", "--no-montage",
            "--contrasts", "t1,t2,flair"]
    assert main([*args, "--source", "t2", "--target", "flair"]) == 0
    raw = json.loads((out / "manifest.json").read_text())
    assert (raw["source"], raw["target"]) == ("t2", "flair")
    assert all(set(e["ideal"]) == {"t1", "t2", "flair"} for e in raw["subjects"])
    # The probe's data loss: a user's manifest.json was overwritten. Now: one line naming the file, exit 2.
    user = tmp_path / "userdata"
    user.mkdir()
    (user / "manifest.json").write_text("{}")
    capsys.readouterr()
    assert main(["phantom", "--out", str(user), "--subjects", "1", "--spacing", "6", "--no-montage"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and str(user / "manifest.json") in error and "--overwrite" in error
    assert (user / "manifest.json").read_text() == "{}"
