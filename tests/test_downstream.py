"""Downstream protocols: overlap measures, the tissue GMM, external segmenters, Protocols 1 and 2 (tiny volumes)."""

from __future__ import annotations

import csv
import json
import math
import stat
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from volsynth.evaluation.downstream import (
    PROTOCOL1_CSV,
    PROTOCOL1_SUMMARY,
    PROTOCOL2_CSV,
    PROTOCOL2_SUMMARY,
    dice,
    load_run_inputs,
    protocol1,
    protocol2,
    run_downstream,
    volumetric_similarity,
)
from volsynth.evaluation.segmenters import (
    CONTRAST_ORDERS,
    SEGMENTERS,
    ExternalSegmenter,
    GMMTissueSegmenter,
    Segmenter,
    SegmenterFailedError,
    SegmenterNotAvailableError,
    build_segmenter,
)

# --------------------------------------------------------------------------------------------------------------
# helpers


def write_nifti(path: Path, array: np.ndarray, spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> Path:
    """Write an (x, y, z) array as NIfTI (SimpleITK wants (z, y, x))."""
    img = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(array).transpose(2, 1, 0)))
    img.SetSpacing(spacing)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path))
    return path


def tissue_phantom(n: int = 24, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Nested spheres: WM core (3), GM shell (2), CSF shell (1), background 0 outside. Returns (tissue, mask)."""
    rng = np.random.default_rng(seed)
    c = (n - 1) / 2 + rng.uniform(-1, 1, 3)
    x, y, z = np.meshgrid(*(np.arange(n) - ci for ci in c), indexing="ij")
    r = np.sqrt(x**2 + y**2 + (z * 1.1) ** 2)
    tissue = np.zeros((n, n, n), dtype=np.int64)
    tissue[r < 0.45 * n] = 1
    tissue[r < 0.36 * n] = 2
    tissue[r < 0.24 * n] = 3
    return tissue, tissue > 0


T1_MEANS = {1: 0.2, 2: 0.5, 3: 0.8}  # CSF < GM < WM
T2_MEANS = {1: 0.85, 2: 0.55, 3: 0.3}  # WM < GM < CSF


def render(tissue: np.ndarray, means: dict[int, float], *, noise: float = 0.03, seed: int = 0,
           scale: float = 1.0, offset: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = np.zeros(tissue.shape, dtype=np.float32)
    for label, mean in means.items():
        image[tissue == label] = mean
    image[tissue > 0] += rng.normal(0, noise, int((tissue > 0).sum())).astype(np.float32)
    return image * scale + offset


# --------------------------------------------------------------------------------------------------------------
# Dice and volumetric similarity


def test_dice_hand_computed() -> None:
    a = np.array([1, 1, 1, 0, 2, 0])
    b = np.array([1, 0, 1, 1, 0, 0])
    d = dice(a, b, [1, 2, 3])
    assert d[1] == pytest.approx(2 * 2 / (3 + 3))  # |A∩B| = 2
    assert d[2] == 0.0  # only in a
    assert math.isnan(d[3])  # in neither: undefined by default
    assert dice(a, b, [3], empty=1.0)[3] == 1.0  # the seed's NaN → 1
    with pytest.raises(ValueError, match="shape"):
        dice(a, b[:-1], [1])


def test_volumetric_similarity_hand_computed() -> None:
    a = np.array([1, 1, 1, 0, 2, 0])
    b = np.array([0, 0, 1, 1, 1, 2])
    vs = volumetric_similarity(a, b, [1, 2, 5])
    assert vs[1] == pytest.approx(1.0)  # 3 vs 3 voxels: same volume, no overlap needed
    assert vs[2] == pytest.approx(1.0)
    vs2 = volumetric_similarity(np.array([1, 1, 1, 0]), np.array([1, 0, 0, 0]), [1])
    assert vs2[1] == pytest.approx(1 - 2 / 4)
    assert math.isnan(vs[5])


def test_dice_matches_monai_compute_dice() -> None:
    from monai.metrics import compute_dice

    rng = np.random.default_rng(3)
    a = rng.integers(0, 4, size=(10, 9, 8))
    b = np.where(rng.random(a.shape) < 0.7, a, rng.integers(0, 4, size=a.shape))
    ours = dice(a, b, [1, 2, 3])

    def onehot(x: np.ndarray) -> torch.Tensor:
        return torch.nn.functional.one_hot(torch.from_numpy(x), 4).permute(3, 0, 1, 2)[None].float()

    ref = compute_dice(onehot(a), onehot(b), include_background=False, ignore_empty=False)[0]
    np.testing.assert_allclose([ours[1], ours[2], ours[3]], ref.numpy(), rtol=1e-6)


# --------------------------------------------------------------------------------------------------------------
# GMM tissue segmenter


def test_gmm_segmenter_registry_and_protocol() -> None:
    assert "gmm_tissue" in SEGMENTERS and "external" in SEGMENTERS
    seg = build_segmenter("gmm_tissue", contrast="t2")
    assert isinstance(seg, Segmenter) and seg.labels == {1: "CSF", 2: "GM", 3: "WM"}
    with pytest.raises(ValueError, match="Did you mean 'flair'"):
        GMMTissueSegmenter("fliar")
    with pytest.raises(ValueError, match="permutation"):
        GMMTissueSegmenter(order=(1, 1, 2))


@pytest.mark.parametrize(("contrast", "means"), [
    ("t1", T1_MEANS),
    ("t2", T2_MEANS),
    ("flair", {1: 0.15, 2: 0.75, 3: 0.5}),  # CSF nulled, GM brighter than WM
])
def test_gmm_class_order_follows_contrast(contrast: str, means: dict[int, float]) -> None:
    tissue, mask = tissue_phantom()
    image = render(tissue, means, scale=800.0, offset=50.0)  # scanner units: the GMM must not care
    seg = GMMTissueSegmenter(contrast).segment(image, mask=mask)
    assert seg.dtype == np.uint16 and seg.shape == tissue.shape
    assert np.all(seg[~mask] == 0)
    d = dice(seg, tissue, [1, 2, 3])
    assert min(d.values()) > 0.95, d
    # The wrong contrast names the same clusters differently: the classes whose rank differs swap.
    wrong = "t2" if contrast == "t1" else "t1"
    moved = [c for c in (1, 2, 3) if CONTRAST_ORDERS[wrong].index(c) != CONTRAST_ORDERS[contrast].index(c)]
    assert len(moved) >= 2
    d_wrong = dice(GMMTissueSegmenter(wrong).segment(image, mask=mask), tissue, moved)
    assert max(d_wrong.values()) < 0.2, d_wrong


def test_gmm_without_mask_thresholds_background() -> None:
    tissue, _ = tissue_phantom()
    seg = GMMTissueSegmenter("t1", smoothing_sigma=0).segment(render(tissue, T1_MEANS))  # voxel-wise arg-max
    assert min(dice(seg, tissue, [1, 2, 3]).values()) > 0.9
    with pytest.raises(ValueError, match="smoothing_sigma"):
        GMMTissueSegmenter(smoothing_sigma=-1)


# --------------------------------------------------------------------------------------------------------------
# Protocol 2


@pytest.fixture()
def tissue_cohort(tmp_path: Path) -> dict[str, dict[str, Path]]:
    """Two subjects: real T1 in scanner units, a faithful synthetic on [0, 1], a GM/WM-swapped synthetic."""
    out: dict[str, dict[str, Path]] = {"real": {}, "good": {}, "swapped": {}, "mask": {}, "tissue": {}}
    for i in range(2):
        subject = f"S{i}"
        tissue, mask = tissue_phantom(seed=i)
        out["real"][subject] = write_nifti(tmp_path / "real" / f"{subject}.nii.gz",
                                           render(tissue, T1_MEANS, seed=i, scale=900.0, offset=30.0))
        out["good"][subject] = write_nifti(tmp_path / "good" / f"{subject}.nii.gz",
                                           render(tissue, T1_MEANS, seed=100 + i))
        swapped = {1: T1_MEANS[1], 2: T1_MEANS[3], 3: T1_MEANS[2]}
        out["swapped"][subject] = write_nifti(tmp_path / "swapped" / f"{subject}.nii.gz",
                                              render(tissue, swapped, seed=200 + i))
        out["mask"][subject] = write_nifti(tmp_path / "mask" / f"{subject}.nii.gz", mask.astype(np.uint8))
        out["tissue"][subject] = write_nifti(tmp_path / "tissue" / f"{subject}.nii.gz", tissue.astype(np.uint8))
    return out


def test_protocol2_gmm_identical_vs_swapped(tissue_cohort: dict[str, dict[str, Path]], tmp_path: Path) -> None:
    seg = GMMTissueSegmenter("t1")
    good = protocol2(tissue_cohort["real"], tissue_cohort["good"], segmenter=seg, masks=tissue_cohort["mask"],
                     out_dir=tmp_path / "good_out", save_segmentations=True)
    assert good["n_subjects"] == 2 and good["segmenter"] == "gmm_tissue"
    assert good["dice"]["mean"] > 0.95 and good["vs"]["mean"] > 0.95
    for cls in ("csf", "gm", "wm"):
        assert good["per_class"][f"dice_{cls}"]["mean"] > 0.9

    bad = protocol2(tissue_cohort["real"], tissue_cohort["swapped"], segmenter=seg, masks=tissue_cohort["mask"],
                    out_dir=tmp_path / "bad_out")
    assert bad["dice"]["mean"] < good["dice"]["mean"] - 0.3
    assert bad["per_class"]["dice_gm"]["mean"] < 0.2 and bad["per_class"]["dice_wm"]["mean"] < 0.2
    assert bad["per_class"]["dice_csf"]["mean"] > 0.9  # CSF is still the darkest class

    # files: CSV one row per subject with per-class columns, strict-JSON summary, saved label maps
    with open(tmp_path / "good_out" / PROTOCOL2_CSV) as f:
        rows = list(csv.DictReader(f))
    assert [r["subject"] for r in rows] == ["S0", "S1"]
    assert {"dice_csf", "vs_gm", "dice", "vs"} <= set(rows[0])
    summary = json.loads((tmp_path / "good_out" / PROTOCOL2_SUMMARY).read_text())
    assert summary["dice"]["mean"] == pytest.approx(good["dice"]["mean"])
    saved = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "good_out" / "segmentations" / "S0_real.nii.gz")))
    assert set(np.unique(saved)) == {0, 1, 2, 3}


def test_protocol2_rejects_mismatched_grids(tmp_path: Path) -> None:
    real = {"a": np.zeros((8, 8, 8), np.float32)}
    synth = {"a": np.zeros((8, 8, 6), np.float32)}
    with pytest.raises(ValueError, match="native grid"):
        protocol2(real, synth, segmenter=GMMTissueSegmenter(), out_dir=tmp_path)
    with pytest.raises(ValueError, match="no subject"):
        protocol2(real, {"b": synth["a"]}, segmenter=GMMTissueSegmenter(), out_dir=tmp_path)


# --------------------------------------------------------------------------------------------------------------
# external segmenters

THRESHOLD_TOOL = """\
import sys
import numpy as np
import SimpleITK as sitk
img = sitk.ReadImage(sys.argv[1])
arr = sitk.GetArrayFromImage(img)
lab = (arr > 0.35).astype(np.uint8) + (arr > 0.65).astype(np.uint8)
out = sitk.GetImageFromArray(lab)
out.CopyInformation(img)
sitk.WriteImage(out, sys.argv[2])
"""


def test_external_segmenter_missing_executable() -> None:
    seg = ExternalSegmenter("TotalSegmentator -i {input} -o {output} --ml", name="totalseg")
    assert isinstance(seg, Segmenter)
    with pytest.raises(SegmenterNotAvailableError, match=r"'TotalSegmentator'.*pip install TotalSegmentator"):
        seg.segment(np.zeros((4, 4, 4), np.float32))
    with pytest.raises(SegmenterNotAvailableError, match="volsynth-no-such-tool"):
        ExternalSegmenter("volsynth-no-such-tool {input} {output}").check_available()
    with pytest.raises(ValueError, match="output"):
        ExternalSegmenter("tool {input}")


def test_external_segmenter_end_to_end(tmp_path: Path, tissue_cohort: dict[str, dict[str, Path]]) -> None:
    script = tmp_path / "threshold_tool.py"
    script.write_text(THRESHOLD_TOOL)
    seg = ExternalSegmenter([sys.executable, str(script), "{input}", "{output}"], name="thresh",
                            normalise_input=True)
    tissue, mask = tissue_phantom()
    image = render(tissue, T1_MEANS, noise=0.0)
    labels = seg.segment(image, spacing=(1.0, 1.2, 1.5))
    assert labels.shape == image.shape
    np.testing.assert_array_equal(labels, (image > 0.35).astype(int) + (image > 0.65))
    assert np.all(seg.segment(image, mask=np.zeros_like(mask))[...] == 0)  # mask applied afterwards

    # In Protocol 2 without declared labels, every non-zero label found is scored.
    summary = protocol2(tissue_cohort["real"], tissue_cohort["good"], segmenter=seg, out_dir=tmp_path / "ext")
    assert set(summary["labels"]) == {"1", "2"}
    assert summary["dice"]["mean"] > 0.9

    failing = tmp_path / "fail.py"
    failing.write_text("import sys; sys.exit('boom')\n")
    with pytest.raises(SegmenterFailedError, match="boom"):
        ExternalSegmenter([sys.executable, str(failing), "{input}", "{output}"]).segment(image)


def test_external_segmenter_executable_path(tmp_path: Path) -> None:
    tool = tmp_path / "mytool"
    tool.write_text(f"#!{sys.executable}\n" + THRESHOLD_TOOL)
    tool.chmod(tool.stat().st_mode | stat.S_IXUSR)
    seg = ExternalSegmenter(f"{tool} {{input}} {{output}}")
    assert seg.check_available() == str(tool)


# --------------------------------------------------------------------------------------------------------------
# Protocol 1


def lesion_cohort(tmp_path: Path, n_subjects: int = 4, n: int = 16) -> dict[str, dict[str, Path]]:
    """Bright blobs (label 1) with a core (label 2) on a noisy brain; synthetic = a rescaled, re-noised copy."""
    out: dict[str, dict[str, Path]] = {"real": {}, "synthetic": {}, "label": {}}
    for i in range(n_subjects):
        rng = np.random.default_rng(i)
        c = rng.uniform(5, n - 6, 3)
        x, y, z = np.meshgrid(*(np.arange(n) - ci for ci in c), indexing="ij")
        r = np.sqrt(x**2 + y**2 + z**2)
        label = np.zeros((n, n, n), np.uint8)
        label[r < 4] = 1
        label[r < 2] = 2
        real = 200 + 100 * rng.random((n, n, n)) + 400 * (label == 1) + 700 * (label == 2)
        synth = real / 1000 + 0.05 * rng.random((n, n, n))
        subject = f"L{i}"
        out["real"][subject] = write_nifti(tmp_path / "p1" / f"{subject}_real.nii.gz", real.astype(np.float32))
        out["synthetic"][subject] = write_nifti(tmp_path / "p1" / f"{subject}_syn.nii.gz", synth.astype(np.float32))
        out["label"][subject] = write_nifti(tmp_path / "p1" / f"{subject}_seg.nii.gz", label)
    return out


def test_protocol1_tiny_and_deterministic(tmp_path: Path) -> None:
    data = lesion_cohort(tmp_path)
    train = ["L0", "L1"]
    test = ["L2", "L3"]

    def run(out: Path) -> dict:
        return protocol1({s: data["real"][s] for s in train}, {s: data["synthetic"][s] for s in train},
                         {s: data["label"][s] for s in train}, {s: data["real"][s] for s in test},
                         {s: data["label"][s] for s in test}, out_dir=out, label_values={1: "edema", 2: "core"},
                         regions={"WT": [1, 2]}, patch_size=(16, 16, 16), iterations=4, batch_size=2,
                         channels=(4, 8), num_res_units=0, seed=0)

    first = run(tmp_path / "a")
    for key in ("synthetic", "upper_bound"):
        block = first[key]
        assert set(block) == {"dice", "dice_edema", "dice_core", "dice_wt"}
        for stats in block.values():
            assert stats["n"] == 2 and math.isfinite(stats["mean"]) and 0.0 <= stats["mean"] <= 1.0
    assert first["headline"] == ["WT"]
    assert (tmp_path / "a" / PROTOCOL1_SUMMARY).is_file()
    with open(tmp_path / "a" / PROTOCOL1_CSV) as f:
        rows = list(csv.DictReader(f))
    assert [(r["model"], r["subject"]) for r in rows] == [("synthetic", "L2"), ("synthetic", "L3"),
                                                          ("real", "L2"), ("real", "L3")]
    assert rows[0]["dice"] == rows[0]["dice_wt"]  # headline = the region's Dice

    second = run(tmp_path / "b")
    assert first["synthetic"] == second["synthetic"]
    assert first["upper_bound"] == second["upper_bound"]
    assert first["final_train_loss"] == second["final_train_loss"]
    assert (tmp_path / "a" / PROTOCOL1_CSV).read_text() == (tmp_path / "b" / PROTOCOL1_CSV).read_text()


def test_protocol1_validates_inputs(tmp_path: Path) -> None:
    data = lesion_cohort(tmp_path, n_subjects=2)
    with pytest.raises(ValueError, match="no label for test"):
        protocol1(None, {"L0": data["synthetic"]["L0"]}, {"L0": data["label"]["L0"]}, {"L1": data["real"]["L1"]},
                  {}, out_dir=tmp_path / "o")
    with pytest.raises(ValueError, match="divisible"):
        protocol1(None, {"L0": data["synthetic"]["L0"]}, {"L0": data["label"]["L0"]}, {"L1": data["real"]["L1"]},
                  {"L1": data["label"]["L1"]}, out_dir=tmp_path / "o", patch_size=(12, 12, 12),
                  channels=(4, 8, 16, 32))


# --------------------------------------------------------------------------------------------------------------
# from a run folder


def make_run(tmp_path: Path, target: str = "t1") -> Path:
    """A run folder: manifest of 4 phantom subjects (t1 + mask + tissue + label), test split P2, P3 predicted."""
    data = tmp_path / "data"
    subjects = []
    for i in range(4):
        s = f"P{i}"
        tissue, mask = tissue_phantom(seed=i)
        write_nifti(data / s / "t1.nii.gz", render(tissue, T1_MEANS, seed=i, scale=500.0))
        write_nifti(data / s / "mask.nii.gz", mask.astype(np.uint8))
        write_nifti(data / s / "tissue.nii.gz", tissue.astype(np.uint8))
        lesion = np.zeros_like(tissue, dtype=np.uint8)
        lesion[10:13, 10:13, 10:13] = 2  # a small "tumour" label, left out by the tissue protocol
        write_nifti(data / s / "seg.nii.gz", lesion)
        subjects.append({"subject": s, "images": {target: f"{s}/t1.nii.gz"}, "mask": f"{s}/mask.nii.gz",
                         "tissue": f"{s}/tissue.nii.gz", "label": f"{s}/seg.nii.gz"})
    (data / "manifest.json").write_text(json.dumps({"format": "volsynth-manifest", "version": 1,
                                                    "subjects": subjects}))
    run = tmp_path / "run"
    (run / "predictions").mkdir(parents=True)
    (run / "config.yaml").write_text(f"method:\n  name: unet\ndata:\n  manifest: {data / 'manifest.json'}\n"
                                     f"  source: t2\n  target: {target}\n")
    (run / "splits.json").write_text(json.dumps({"train": ["P0"], "val": ["P1"], "test": ["P2", "P3"]}))
    for i in (2, 3):
        write_nifti(run / "predictions" / f"P{i}.nii.gz", render(tissue_phantom(seed=i)[0], T1_MEANS, seed=9 + i))
    return run


def test_load_run_inputs_and_tissue_protocol(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    inputs = load_run_inputs(run)
    assert inputs.test_subjects == ["P2", "P3"] and inputs.other_subjects == ["P0", "P1"]
    assert inputs.real["P2"] == (tmp_path / "data" / "P2" / "t1.nii.gz").resolve()
    assert set(inputs.masks) == set(inputs.tissue) == set(inputs.labels) == {"P0", "P1", "P2", "P3"}

    summary = run_downstream(run, protocol="tissue", save_segmentations=True)
    assert summary["masked"] and summary["excluded"] and summary["n_subjects"] == 2
    assert summary["dice"]["mean"] > 0.9
    saved = sitk.GetArrayFromImage(sitk.ReadImage(str(run / "downstream" / "segmentations" / "P2_synthetic.nii.gz")))
    assert np.all(saved[10:13, 10:13, 10:13] == 0) and set(np.unique(saved)) == {0, 1, 2, 3}
    with pytest.raises(ValueError, match="Did you mean 'tissue'"):
        run_downstream(run, protocol="tisue")
    with pytest.raises(SegmenterNotAvailableError, match="TotalSegmentator"):
        run_downstream(run, protocol="external", command="TotalSegmentator -i {input} -o {output} --ml")


def test_tissue_protocol_infers_order_for_unknown_contrast(tmp_path: Path) -> None:
    run = make_run(tmp_path, target="mystery")  # not a known contrast: order measured on the tissue maps
    summary = run_downstream(run, protocol="tissue")
    assert "order=(1, 2, 3)" in summary["segmenter_repr"] and summary["dice"]["mean"] > 0.9


def test_segment_protocol_from_run(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    summary = run_downstream(run, protocol="segment", iterations=2, patch_size=(16, 16, 16), channels=(4, 8),
                             num_res_units=0)
    assert summary["subjects"] == {"train": ["P2", "P3"], "test": ["P0", "P1"]}
    assert summary["headline"] == ["whole"] and summary["upper_bound"] is not None
    assert math.isfinite(summary["synthetic"]["dice"]["mean"])
    assert (run / "downstream" / PROTOCOL1_CSV).is_file()
