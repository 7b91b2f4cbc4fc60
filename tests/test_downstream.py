"""Downstream protocols (tissue, segment, external): overlap measures, the tissue GMM, external segmenters, run
folders (predictions.json, staged runs), result files and the printed table. Tiny volumes throughout."""

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

from volsynth.data.segmenters import (
    CONTRAST_ORDERS,
    SEGMENTERS,
    ExternalSegmenter,
    GMMTissueSegmenter,
    Segmenter,
    SegmenterFailedError,
    SegmenterNotAvailableError,
    build_segmenter,
)
from volsynth.errors import ConfigError, DataError, InputNotFoundError
from volsynth.evaluation.downstream import (
    format_summary,
    load_run_inputs,
    protocol1,
    protocol2,
    result_files,
    run_downstream,
)
from volsynth.evaluation.downstream.segment import TrainingVolume, sample_patches
from volsynth.metrics import dice, volumetric_similarity

TISSUE_CSV, TISSUE_SUMMARY = result_files("tissue")
SEGMENT_CSV, SEGMENT_SUMMARY = result_files("segment")

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
    assert good["mean_dice"]["mean"] > 0.95 and good["mean_vs"]["mean"] > 0.95
    for cls in ("csf", "gm", "wm"):
        assert good["per_class"][f"dice_{cls}"]["mean"] > 0.9

    bad = protocol2(tissue_cohort["real"], tissue_cohort["swapped"], segmenter=seg, masks=tissue_cohort["mask"],
                    out_dir=tmp_path / "bad_out")
    assert bad["mean_dice"]["mean"] < good["mean_dice"]["mean"] - 0.3
    assert bad["per_class"]["dice_gm"]["mean"] < 0.2 and bad["per_class"]["dice_wm"]["mean"] < 0.2
    assert bad["per_class"]["dice_csf"]["mean"] > 0.9  # CSF is still the darkest class

    # files: CSV one row per subject with per-class columns, strict-JSON summary, saved label maps
    with open(tmp_path / "good_out" / TISSUE_CSV) as f:
        rows = list(csv.DictReader(f))
    assert [r["subject"] for r in rows] == ["S0", "S1"]
    assert list(rows[0]) == ["subject", "dice_csf", "dice_gm", "dice_wm", "vs_csf", "vs_gm", "vs_wm", "mean_dice",
                             "mean_vs"]
    summary = json.loads((tmp_path / "good_out" / TISSUE_SUMMARY).read_text())
    assert summary["protocol"] == "tissue"
    assert summary["mean_dice"]["mean"] == pytest.approx(good["mean_dice"]["mean"])
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
    assert summary["mean_dice"]["mean"] > 0.9

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
    assert json.loads((tmp_path / "a" / SEGMENT_SUMMARY).read_text())["protocol"] == "segment"
    with open(tmp_path / "a" / SEGMENT_CSV) as f:
        rows = list(csv.DictReader(f))
    assert [(r["model"], r["subject"]) for r in rows] == [("synthetic", "L2"), ("synthetic", "L3"),
                                                          ("real", "L2"), ("real", "L3")]
    assert rows[0]["dice"] == rows[0]["dice_wt"]  # headline = the region's Dice

    second = run(tmp_path / "b")
    assert first["synthetic"] == second["synthetic"]
    assert first["upper_bound"] == second["upper_bound"]
    assert first["final_train_loss"] == second["final_train_loss"]
    assert (tmp_path / "a" / SEGMENT_CSV).read_text() == (tmp_path / "b" / SEGMENT_CSV).read_text()


def test_protocol1_validates_inputs(tmp_path: Path) -> None:
    data = lesion_cohort(tmp_path, n_subjects=2)
    with pytest.raises(DataError, match="segment protocol: no label for test subjects L1"):
        protocol1(None, {"L0": data["synthetic"]["L0"]}, {"L0": data["label"]["L0"]}, {"L1": data["real"]["L1"]},
                  {}, out_dir=tmp_path / "o")
    with pytest.raises(ConfigError, match=r"patch_size \(12, 12, 12\) must be 3 sizes divisible by 8"):
        protocol1(None, {"L0": data["synthetic"]["L0"]}, {"L0": data["label"]["L0"]}, {"L1": data["real"]["L1"]},
                  {"L1": data["label"]["L1"]}, out_dir=tmp_path / "o", patch_size=(12, 12, 12),
                  channels=(4, 8, 16, 32))
    empty = {"L0": np.zeros((8, 8, 8), np.uint8)}
    with pytest.raises(DataError, match="contain no foreground"):
        protocol1(None, {"L0": data["synthetic"]["L0"]}, empty, {"L1": data["real"]["L1"]},
                  {"L1": data["label"]["L1"]}, out_dir=tmp_path / "o")
    with pytest.raises(ConfigError, match="schedule 'cosin'"):
        protocol1(None, {"L0": data["synthetic"]["L0"]}, {"L0": data["label"]["L0"]}, {"L1": data["real"]["L1"]},
                  {"L1": data["label"]["L1"]}, out_dir=tmp_path / "o", schedule="cosin")
    assert not (tmp_path / "o").exists()  # refused before any work


def test_segment_patches_are_foreground_centred_padded_and_seeded() -> None:
    """Patches come from the trainer's sampling helpers: centred on a labelled voxel, zero-padded at the edge."""
    image = np.arange(6 * 6 * 6, dtype=np.float32).reshape(6, 6, 6) / 216
    classes = np.zeros((6, 6, 6), np.uint8)
    classes[0, 1, 5] = 1  # one labelled voxel in a corner: an 8³ patch around it leaves the volume on every axis
    volume = TrainingVolume(image, classes, {"pair": np.flatnonzero(classes)})
    x, y = sample_patches([volume], (8, 8, 8), 4, np.random.default_rng(0), foreground_probability=1.0)
    assert x.shape == (4, 1, 8, 8, 8) and x.dtype == np.float32 and y.dtype == np.int64
    for patch, labels in zip(x[:, 0], y[:, 0], strict=True):
        assert labels.sum() == 1  # the labelled voxel is in every patch …
        assert patch[labels == 1][0] == image[0, 1, 5]  # … with its own image value (image and labels aligned)
        assert np.count_nonzero(patch) == 6 * 6 * 6 - 1  # the whole volume (minus its zero voxel) plus padding
    again = sample_patches([volume], (8, 8, 8), 4, np.random.default_rng(0), foreground_probability=1.0)
    np.testing.assert_array_equal(x, again[0])
    np.testing.assert_array_equal(y, again[1])


# --------------------------------------------------------------------------------------------------------------
# tissue protocol: each class on its own, hand-computed


class LabelCopy:
    """A "segmenter" that returns its input's labels, so real and synthetic label maps are scored directly."""

    def __init__(self) -> None:
        self.name = "copy"
        self.labels = {1: "CSF", 2: "GM", 3: "WM"}
        self.normalise_input = False

    def segment(self, image: np.ndarray, **_: object) -> np.ndarray:
        return np.rint(image).astype(np.uint16)


# Subject A: CSF 2 real / 3 synthetic voxels sharing 1 → Dice 2·1/5 = 0.4, VS 1 − 1/5 = 0.8; GM 4 / 6 sharing 4 →
# Dice 8/10 = 0.8, VS 1 − 2/10 = 0.8; WM 6 / 3 sharing 3 → Dice 6/9 = 2/3, VS 1 − 3/9 = 2/3.
REAL_A = [[1, 1, 2, 2], [2, 2, 3, 3], [3, 3, 3, 3], [0, 0, 0, 0]]
SYNTHETIC_A = [[1, 2, 2, 2], [2, 2, 2, 3], [3, 3, 0, 1], [1, 0, 0, 0]]
# Subject B: identical maps without CSF → GM and WM Dice = VS = 1, CSF undefined (left out).
REAL_B = [[2, 2, 3, 3], [2, 2, 3, 3], [0, 0, 0, 0], [0, 0, 0, 0]]


def test_tissue_reports_each_class_separately_hand_computed(tmp_path: Path) -> None:
    def volume(rows: list[list[int]]) -> np.ndarray:
        return np.asarray(rows, np.float32)[:, :, None]

    summary = protocol2({"A": volume(REAL_A), "B": volume(REAL_B)}, {"A": volume(SYNTHETIC_A), "B": volume(REAL_B)},
                        segmenter=LabelCopy(), out_dir=tmp_path)
    per_subject = summary["per_subject"]
    expected_a = {"dice_csf": 0.4, "dice_gm": 0.8, "dice_wm": 2 / 3, "vs_csf": 0.8, "vs_gm": 0.8, "vs_wm": 2 / 3,
                  "mean_dice": (0.4 + 0.8 + 2 / 3) / 3, "mean_vs": (0.8 + 0.8 + 2 / 3) / 3}
    assert per_subject["A"] == pytest.approx(expected_a)
    assert math.isnan(per_subject["B"]["dice_csf"]) and math.isnan(per_subject["B"]["vs_csf"])
    assert per_subject["B"]["mean_dice"] == 1.0 and per_subject["B"]["mean_vs"] == 1.0  # CSF left out of B's mean

    per_class = summary["per_class"]
    assert per_class["dice_csf"] == {"mean": pytest.approx(0.4), "std": None, "n": 1}
    assert per_class["vs_csf"]["mean"] == pytest.approx(0.8)
    assert per_class["dice_gm"] == {"mean": pytest.approx(0.9), "std": pytest.approx(0.2 / math.sqrt(2)), "n": 2}
    assert per_class["vs_gm"]["mean"] == pytest.approx(0.9)
    assert per_class["dice_wm"] == {"mean": pytest.approx(5 / 6), "std": pytest.approx(1 / 3 / math.sqrt(2)), "n": 2}
    assert per_class["vs_wm"]["mean"] == pytest.approx(5 / 6)
    assert summary["mean_dice"]["mean"] == pytest.approx((expected_a["mean_dice"] + 1) / 2)
    assert summary["mean_vs"]["mean"] == pytest.approx((expected_a["mean_vs"] + 1) / 2)

    with open(tmp_path / TISSUE_CSV) as f:
        rows = {r["subject"]: r for r in csv.DictReader(f)}
    assert float(rows["A"]["dice_wm"]) == pytest.approx(2 / 3, abs=1e-6) and rows["B"]["dice_csf"] == "nan"
    saved = json.loads((tmp_path / TISSUE_SUMMARY).read_text())
    assert saved["per_subject"]["B"]["dice_csf"] is None  # strict JSON: NaN → null
    assert saved["per_class"]["dice_gm"]["mean"] == pytest.approx(0.9)

    table = format_summary(summary).splitlines()
    assert table[0].startswith("tissue: copy on real vs synthetic, 2 subjects")
    assert table[1].split() == ["class", "Dice", "VS"]
    assert table[2].split() == ["CSF", "0.400", "0.800"]
    assert table[3].split() == ["GM", "0.900", "±", "0.141", "0.900", "±", "0.141"]
    assert table[4].split()[:4] == ["WM", "0.833", "±", "0.236"]
    assert table[5].split()[0] == "mean" and table[-1] == f"per subject: {tmp_path.resolve() / TISSUE_CSV}"


# --------------------------------------------------------------------------------------------------------------
# from a run folder


def make_cohort(tmp_path: Path, target: str = "t1") -> Path:
    """A manifest of 4 phantom-like subjects (t1 + mask + tissue + label); returns its path."""
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
    return data / "manifest.json"


def write_run_files(folder: Path, manifest: Path, target: str = "t1") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(f"method:\n  name: regression_unet\ndata:\n  manifest: {manifest}\n"
                                        f"  source: t2\n  target: {target}\n")
    (folder / "splits.json").write_text(json.dumps({"train": ["P0"], "val": ["P1"], "test": ["P2", "P3"]}))


def synthetic_of(i: int) -> np.ndarray:
    return render(tissue_phantom(seed=i)[0], T1_MEANS, seed=9 + i)


def make_run(tmp_path: Path, target: str = "t1") -> Path:
    """A run folder: test split P2, P3, predicted as ``<subject>.nii.gz`` without a predictions.json."""
    run = tmp_path / "run"
    write_run_files(run, make_cohort(tmp_path, target), target)
    for i in (2, 3):
        write_nifti(run / "predictions" / f"P{i}.nii.gz", synthetic_of(i))
    return run


def test_load_run_inputs_and_tissue_protocol(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    inputs = load_run_inputs(run)
    assert inputs.test_subjects == ["P2", "P3"] and inputs.other_subjects == ["P0", "P1"]
    assert inputs.real["P2"] == (tmp_path / "data" / "P2" / "t1.nii.gz").resolve()
    assert inputs.synthetic["P3"] == run / "predictions" / "P3.nii.gz"
    assert set(inputs.masks) == set(inputs.tissue) == set(inputs.labels) == {"P0", "P1", "P2", "P3"}

    summary = run_downstream(run, protocol="tissue", save_segmentations=True)
    assert summary["protocol"] == "tissue" and summary["masked"] and summary["excluded"]
    assert summary["n_subjects"] == 2 and summary["mean_dice"]["mean"] > 0.9
    for name in ("csf", "gm", "wm"):  # HiFi-Syn's columns, each class on its own
        assert summary["per_class"][f"dice_{name}"]["n"] == 2 and summary["per_class"][f"vs_{name}"]["n"] == 2
    assert sorted(p.name for p in (run / "downstream").glob("*.*")) == ["tissue.csv", "tissue_summary.json"]
    saved = sitk.GetArrayFromImage(sitk.ReadImage(str(run / "downstream" / "segmentations" / "P2_synthetic.nii.gz")))
    assert np.all(saved[10:13, 10:13, 10:13] == 0) and set(np.unique(saved)) == {0, 1, 2, 3}


def test_run_errors_name_the_option_or_file(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    with pytest.raises(ConfigError, match=r"--protocol 'tisue': unknown downstream protocol\. Did you mean 'tissue'"):
        run_downstream(run, protocol="tisue")
    with pytest.raises(ConfigError, match="--protocol external needs command="):
        run_downstream(run, protocol="external")
    with pytest.raises(SegmenterNotAvailableError, match="TotalSegmentator"):
        run_downstream(run, protocol="external", command="TotalSegmentator -i {input} -o {output} --ml")
    with pytest.raises(InputNotFoundError, match=r"--run .*nowhere: run folder not found"):
        run_downstream(tmp_path / "nowhere")
    empty = tmp_path / "empty_run"
    write_run_files(empty, tmp_path / "data" / "manifest.json")
    with pytest.raises(InputNotFoundError, match=r"empty_run/predictions: no predictions"):
        run_downstream(empty)
    (empty / "config.yaml").write_text("data:\n  manifest: missing.json\n")
    with pytest.raises(InputNotFoundError, match=r"config\.yaml: cannot find the manifest named by data\.manifest"):
        load_run_inputs(empty)


def test_predictions_are_found_through_predictions_json(tmp_path: Path) -> None:
    run = tmp_path / "run"
    write_run_files(run, make_cohort(tmp_path))
    predictions = run / "predictions"
    write_nifti(predictions / "P2_synthetic-t1.nii.gz", synthetic_of(2))
    write_nifti(predictions / "elsewhere" / "third.nii.gz", synthetic_of(3))
    write_nifti(predictions / "P3.nii.gz", np.zeros((24, 24, 24), np.float32))  # an older file the index dropped
    index = {"format": "volsynth-predictions", "version": 1, "outputs": {
        "P2": {"file": "P2_synthetic-t1.nii.gz"}, "P3": {"file": "elsewhere/third.nii.gz"}}}
    (predictions / "predictions.json").write_text(json.dumps(index))
    inputs = load_run_inputs(run)
    assert inputs.synthetic == {"P2": predictions / "P2_synthetic-t1.nii.gz",
                                "P3": predictions / "elsewhere" / "third.nii.gz"}
    assert run_downstream(run, protocol="tissue")["mean_dice"]["mean"] > 0.9

    del index["outputs"]["P3"]  # the index is the truth: P3.nii.gz beside it is not P3's prediction
    (predictions / "predictions.json").write_text(json.dumps(index))
    assert load_run_inputs(run).test_subjects == ["P2"]
    index["outputs"]["P3"] = {"file": "gone.nii.gz"}
    (predictions / "predictions.json").write_text(json.dumps(index))
    with pytest.raises(InputNotFoundError, match=r"gone\.nii\.gz: listed in .*predictions\.json for subject 'P3'"):
        load_run_inputs(run)
    (predictions / "predictions.json").write_text("{not json")
    with pytest.raises(DataError, match=r"predictions\.json: not a readable predictions index"):
        load_run_inputs(run)

    (predictions / "predictions.json").unlink()  # without an index: the names predict and users give
    inputs = load_run_inputs(run)
    assert inputs.synthetic == {"P2": predictions / "P2_synthetic-t1.nii.gz", "P3": predictions / "P3.nii.gz"}


def test_staged_run_reads_its_final_stage(tmp_path: Path) -> None:
    """A staged run keeps config and splits in its stage folders; predictions and results stay at the top."""
    run = tmp_path / "staged"
    manifest = make_cohort(tmp_path)
    (run / "1-autoencoder").mkdir(parents=True)
    (run / "1-autoencoder" / "config.yaml").write_text("data:\n  manifest: missing.json\n")  # not the final stage
    write_run_files(run / "2-volumetric", manifest)
    (run / "stages.json").write_text(json.dumps({"stages": [{"folder": "1-autoencoder"}, {"folder": "2-volumetric"}]}))
    for i in (2, 3):
        write_nifti(run / "predictions" / f"P{i}_synthetic-t1.nii.gz", synthetic_of(i))
    inputs = load_run_inputs(run)
    assert inputs.manifest == manifest.resolve() and inputs.test_subjects == ["P2", "P3"]
    summary = run_downstream(run, protocol="tissue")
    assert (run / "downstream" / TISSUE_SUMMARY).is_file() and summary["n_subjects"] == 2
    assert not (run / "2-volumetric" / "downstream").exists()


def test_tissue_protocol_infers_order_for_unknown_contrast(tmp_path: Path) -> None:
    run = make_run(tmp_path, target="mystery")  # not a known contrast: order measured on the tissue maps
    summary = run_downstream(run, protocol="tissue")
    assert "order=(1, 2, 3)" in summary["segmenter_repr"] and summary["mean_dice"]["mean"] > 0.9


def test_segment_protocol_from_run(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    summary = run_downstream(run, protocol="segment", iterations=2, patch_size=(16, 16, 16), channels=(4, 8),
                             num_res_units=0, progress=False)
    assert summary["protocol"] == "segment"
    assert summary["subjects"] == {"train": ["P2", "P3"], "test": ["P0", "P1"]}
    assert summary["labels"] == {"2": "ED"} and summary["regions"] == {"whole": [2]}  # BraTS names
    assert summary["headline"] == ["whole"] and summary["upper_bound"] is not None
    assert math.isfinite(summary["synthetic"]["dice"]["mean"])
    assert (run / "downstream" / SEGMENT_CSV).is_file()
    table = format_summary(summary).splitlines()
    assert table[0] == "segment: UNet trained on synthetic images of 2 subjects, Dice on the real images of 2 subjects"
    assert [line.split()[0] for line in table[1:5]] == ["class", "whole", "ED", "headline"]


def test_cli_prints_the_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from volsynth.cli import main

    run = make_run(tmp_path)
    assert main(["downstream", "--run", str(run), "--protocol", "tissue"]) == 0
    printed = capsys.readouterr().out
    assert "class" in printed and "GM" in printed and "mean" in printed and "{" not in printed
    assert main(["downstream", "--run", str(tmp_path / "nowhere")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "run folder not found" in error
