"""Tests for the synthetic phantom cohort (volsynth.data.phantom).

Everything runs at 4 mm (a 49×58×47 grid) so the template is resampled once and each subject takes well under
a second.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from volsynth.data import phantom
from volsynth.data.phantom import (
    CONTRASTS,
    REFERENCE_INTENSITY,
    SEG_LABELS,
    TISSUE_LABELS,
    TISSUES,
    PhantomSubject,
    make_phantom_cohort,
    simulate_subject,
)

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
    anatomy = phantom._anatomy(SPACING)
    identity = np.stack(np.meshgrid(*[np.arange(n) for n in anatomy.shape], indexing="ij")).astype(np.float32)
    for seed in range(5):
        coords = phantom._sample_deformation(np.random.default_rng([seed, 0, 1]), anatomy)
        assert coords.shape == (3, *anatomy.shape)
        jac = np.stack([np.stack(np.gradient(coords[i]), axis=0) for i in range(3)])  # (3, 3, X, Y, Z)
        det = np.linalg.det(np.moveaxis(jac, (0, 1), (-2, -1)))
        assert det.min() > 0.2, f"seed {seed}: Jacobian determinant down to {det.min():.3f}"
        residual = coords - identity
        residual -= residual.mean(axis=(1, 2, 3), keepdims=True)
        assert np.abs(residual).max() > 0.5  # a real, non-affine deformation


def test_resampled_grid_keeps_world_extent() -> None:
    anatomy = phantom._anatomy(SPACING)
    assert anatomy.shape == (49, 58, 47)
    np.testing.assert_allclose(np.diag(anatomy.affine)[:3], SPACING)
    # Same field-of-view centre as the 1 mm template: 197×233×189 voxels from (−98, −134, −72).
    centre = anatomy.affine[:3, 3] + (np.asarray(anatomy.shape) - 1) / 2 * SPACING
    np.testing.assert_allclose(centre, [0.0, -18.0, 22.0])


def test_cohort_files_manifest_and_determinism(tmp_path: Path) -> None:
    kwargs = {"seed": 11, "spacing": SPACING, "lesion_probability": 1.0, "noise_percent": 4.0,
              "contrasts": ("t1", "flair", "t1ce")}
    first = make_phantom_cohort(tmp_path / "a", 2, **kwargs)
    second = make_phantom_cohort(tmp_path / "b", 2, **kwargs)
    other = make_phantom_cohort(tmp_path / "c", 2, **{**kwargs, "seed": 12})
    files_a = sorted(p.relative_to(first.parent) for p in first.parent.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(second.parent) for p in second.parent.rglob("*") if p.is_file())
    assert files_a == files_b
    assert len(files_a) == 1 + 2 * (3 + 3 + 1)  # manifest + per subject: 3 contrasts, seg/tissue/mask, montage
    for rel in files_a:
        assert (first.parent / rel).read_bytes() == (second.parent / rel).read_bytes(), f"{rel} differs"

    manifest = json.loads(first.read_text())
    assert manifest["format"] == "volsynth-manifest" and manifest["version"] == 1
    assert manifest["dataset"] == "phantom"
    assert manifest["generator"] == {"seed": 11, "subjects": 2, "spacing": SPACING, "lesions": 1.0,
                                     "contrasts": ["t1", "flair", "t1ce"], "noise": 4.0,
                                     "volsynth_phantom_version": 1}
    assert [s["subject"] for s in manifest["subjects"]] == ["Phantom_00000", "Phantom_00001"]
    for entry in manifest["subjects"]:
        sub = simulate_subject(int(entry["subject"][-5:]), **kwargs)
        assert entry["has_lesion"] is True
        assert sorted(entry["images"]) == ["flair", "t1", "t1ce"]
        for c, rel in entry["images"].items():
            assert rel == f"{sub.subject}/{sub.subject}_{c}.nii.gz"
            img = nib.load(first.parent / rel)
            assert img.get_data_dtype() == np.float32
            np.testing.assert_array_equal(img.affine, sub.affine)
            assert int(img.header["qform_code"]) == 1 and int(img.header["sform_code"]) == 1
            np.testing.assert_array_equal(np.asarray(img.dataobj), sub.images[c])
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


def test_rerun_replaces_own_files_and_keeps_others(tmp_path: Path) -> None:
    make_phantom_cohort(tmp_path, 2, seed=0, spacing=SPACING, contrasts=("t1", "t2"), montage=False)
    (tmp_path / "notes.txt").write_text("keep me")
    (tmp_path / "Phantom_00001" / "extra.txt").write_text("keep me too")
    manifest = make_phantom_cohort(tmp_path, 1, seed=0, spacing=SPACING, contrasts=("t2",), montage=False)
    assert json.loads(manifest.read_text())["generator"]["subjects"] == 1
    assert not (tmp_path / "Phantom_00000" / "Phantom_00000_t1.nii.gz").exists()
    assert (tmp_path / "Phantom_00000" / "Phantom_00000_t2.nii.gz").exists()
    assert sorted(p.name for p in (tmp_path / "Phantom_00001").iterdir()) == ["extra.txt"]
    assert (tmp_path / "notes.txt").read_text() == "keep me"
    assert not list(tmp_path.rglob("*.tmp"))


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
    ],
)
def test_invalid_arguments_raise(tmp_path: Path, kwargs: dict, message: str) -> None:
    args = {"subjects": 1, "seed": 0, "spacing": SPACING, **kwargs}
    with pytest.raises(ValueError, match=message):
        make_phantom_cohort(tmp_path / "out", args.pop("subjects"), **args)
    assert not (tmp_path / "out" / "manifest.json").exists()
