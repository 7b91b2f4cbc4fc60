import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from volsynth.cli import main
from volsynth.config import SplitConfig
from volsynth.data.discovery import check_pair, discover, inspect_cohort, make_splits
from volsynth.data.io import write_volume
from volsynth.data.manifest import load_manifest
from volsynth.data.volume import Volume


def image(seed: int, shape: tuple[int, int, int] = (8, 9, 10), spacing: tuple = (1.0, 1.0, 1.5),
          dtype: type = np.float32) -> Volume:
    rng = np.random.default_rng(seed)
    return Volume((rng.random(shape) * 100 + 1).astype(dtype), spacing, (1.0, 2.0, 3.0))


def brats_tree(root: Path, n: int = 4) -> Path:
    for i in range(n):
        case = f"BraTS2021_{i:05d}"
        for k, modality in enumerate(("t1", "t1ce", "t2", "flair")):
            write_volume(image(10 * i + k), root / case / f"{case}_{modality}.nii.gz")
        write_volume(Volume((image(i).array > 50).astype(np.uint8), (1.0, 1.0, 1.5), (1.0, 2.0, 3.0)),
                     root / case / f"{case}_seg.nii.gz")
    return root


def synthrad_tree(root: Path, n: int = 3) -> Path:
    for i in range(n):
        case = root / "pelvis" / f"1PA{i:03d}"
        write_volume(image(i), case / "mr.nii.gz")
        write_volume(Volume((image(i + 50).array * 30 - 1000).astype(np.int16), (1.0, 1.0, 1.5), (1.0, 2.0, 3.0)),
                     case / "ct.nii.gz")
        write_volume(Volume(np.ones((8, 9, 10), np.uint8), (1.0, 1.0, 1.5), (1.0, 2.0, 3.0)), case / "mask.nii.gz")
    return root


def test_brats_layout_fingerprint_and_manifest(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = brats_tree(tmp_path / "brats")
    manifest = discover(root, source="t2", target="flair")
    assert manifest.dataset == "brats" and len(manifest.subjects) == 4
    assert manifest.subjects[0].label is not None and set(manifest.subjects[0].images) == {"t1", "t1ce", "t2", "flair"}
    out = tmp_path / "manifest.json"
    assert main(["inspect", str(root), "--source", "t2", "--target", "flair", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "Subjects: 4" in text and "complete pairs: 4" in text and "Median spacing (mm): 1 x 1 x 1.5" in text
    assert "Problems: none" in text
    loaded = load_manifest(out)
    assert [s.split for s in loaded.subjects] == ["test", "val", "train", "train"]  # >= 1 val when dev >= 3
    assert loaded.subjects[1].image("flair") == (root / "BraTS2021_00001" / "BraTS2021_00001_flair.nii.gz").resolve()
    document = json.loads(out.read_text())
    assert document["subjects"][0]["source"].endswith("_t2.nii.gz")


def test_synthrad_layout(tmp_path: Path) -> None:
    manifest = discover(synthrad_tree(tmp_path / "task1"), source="mr", target="ct")
    assert manifest.dataset == "synthrad2023" and [s.subject for s in manifest.subjects] == ["1PA000", "1PA001",
                                                                                              "1PA002"]
    assert all(s.mask is not None for s in manifest.subjects)
    fingerprint = inspect_cohort(manifest, source="mr", target="ct", split=SplitConfig())
    assert not fingerprint.problems
    assert fingerprint.modalities["ct"]["percentiles"]["0.5"] < -900


def test_ixi_layout_notes_missing_registration(tmp_path: Path) -> None:
    for subject in ("IXI002-Guys-0828", "IXI012-HH-1211"):
        for modality in ("T1", "T2"):
            write_volume(image(len(subject)), tmp_path / f"{subject}-{modality}.nii.gz")
    write_volume(image(3), tmp_path / "IXI013-HH-1212-PD.nii.gz")
    manifest = discover(tmp_path, source="t1", target="t2")
    assert manifest.dataset == "ixi" and len(manifest.subjects) == 3
    fingerprint = inspect_cohort(manifest, source="t1", target="t2")
    assert any("NOT co-registered" in note for note in fingerprint.notes)
    assert fingerprint.incomplete == ["IXI013-HH-1212"]


def test_generic_and_csv_manifest(tmp_path: Path) -> None:
    for subject in ("a", "b"):
        write_volume(image(1), tmp_path / "tree" / subject / "cbct.nii.gz")
        write_volume(image(2), tmp_path / "tree" / subject / "ct.mha")
    manifest = discover(tmp_path / "tree", source="cbct", target="ct")
    assert manifest.dataset == "synthrad2023"  # ct + cbct per folder is the SynthRAD task-2 layout
    csv_path = tmp_path / "list.csv"
    csv_path.write_text("subject,source,target\n"
                        f"a,{tmp_path / 'tree/a/cbct.nii.gz'},{tmp_path / 'tree/a/ct.mha'}\n")
    from_csv = discover(csv_path, source="cbct", target="ct")
    assert from_csv.subjects[0].image("cbct") == tmp_path / "tree/a/cbct.nii.gz"
    write_volume(image(1), tmp_path / "plain" / "s1" / "t1.nrrd")
    write_volume(image(2), tmp_path / "plain" / "s1" / "t2.nrrd")
    assert discover(tmp_path / "plain").dataset == "generic"


def test_all_problems_reported_in_one_pass(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = brats_tree(tmp_path / "brats", n=7)
    case = lambda i, m: root / f"BraTS2021_{i:05d}" / f"BraTS2021_{i:05d}_{m}.nii.gz"  # noqa: E731
    case(0, "flair").unlink()  # missing modality
    nan = image(1)
    nan.array[0, 0, 0] = np.nan
    write_volume(nan, case(1, "t2"))  # NaN
    write_volume(Volume(np.zeros((8, 9, 10), np.float32), (1.0, 1.0, 1.5), (1.0, 2.0, 3.0)), case(2, "flair"))
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((2, 10, 9, 8), np.float32), isVector=False), str(case(3, "t2")))
    data = case(4, "flair").read_bytes()
    case(4, "flair").write_bytes(data[: len(data) // 3])  # truncated
    write_volume(image(5, spacing=(1.0, 1.0, 3.0)), case(5, "flair"))  # different grid
    out = tmp_path / "m.json"
    code = main(["inspect", str(root), "--source", "t2", "--target", "flair", "--out", str(out)])
    text = capsys.readouterr().out
    assert code == 1
    assert "missing modality 'flair'" in text
    assert "BraTS2021_00001_t2.nii.gz: contains NaN" in text
    assert "BraTS2021_00002_flair.nii.gz: all-zero volume" in text
    assert "BraTS2021_00003_t2.nii.gz: expected a 3D volume, got a 4D image" in text
    assert "BraTS2021_00004_flair.nii.gz: unreadable or truncated" in text
    assert "grid differs from the source" in text and "spacing (1, 1, 3)" in text and "spacing (1, 1, 1.5)" in text
    document = json.loads(out.read_text())
    usable = [s["subject"] for s in document["subjects"] if s.get("split")]
    assert usable == ["BraTS2021_00006"]  # only the clean subject enters the splits
    # With --resample-target the grid mismatch becomes a warning, the others stay errors.
    main(["inspect", str(root), "--source", "t2", "--target", "flair", "--resample-target"])
    text = capsys.readouterr().out
    assert "[warning] BraTS2021_00005" in text


def test_check_pair_states_both_grids() -> None:
    source, target = image(0), image(1, spacing=(2.0, 2.0, 2.0))
    target.path = Path("target.nii.gz")
    with pytest.raises(ValueError, match=r"different grids[\s\S]*source[\s\S]*spacing \(1, 1, 1.5\)[\s\S]*"
                       r"target[\s\S]*spacing \(2, 2, 2\)"
                       r"[\s\S]*--resample-target"):
        check_pair(source, target)
    check_pair(source, target, resample_target=True)


def test_paper_split_and_seeded_splits() -> None:
    names = [f"s{i:02d}" for i in range(40)]
    split = make_splits(names, SplitConfig(mode="paper", folds=4, fold=1))
    assert split["test"] == [n for i, n in enumerate(names) if i % 4 == 1]
    assert len(split["test"]) == 10 and len(split["val"]) == 3  # min(int(0.1 * 30), 5)
    dev = [n for i, n in enumerate(names) if i % 4 != 1]
    assert split["val"] == dev[:3] and split["train"] == dev[3:]
    assert make_splits(names[::-1], SplitConfig(mode="paper")) == make_splits(names, SplitConfig(mode="paper"))
    a = make_splits(names, SplitConfig(mode="random", seed=3))
    assert a == make_splits(names, SplitConfig(mode="random", seed=3))
    assert a != make_splits(names, SplitConfig(mode="random", seed=4))
    assert sorted(a["train"] + a["val"] + a["test"]) == names
    folds = [set(make_splits(names, SplitConfig(mode="kfold", fold=f, seed=1))["test"]) for f in range(4)]
    assert set().union(*folds) == set(names) and sum(len(f) for f in folds) == 40


def test_a_manifest_with_images_as_a_list_is_a_one_line_error(tmp_path: Path) -> None:
    from volsynth.data.manifest import ManifestError, load_manifest

    path = tmp_path / "m.json"
    path.write_text('{"subjects": [{"subject": "s1", "images": ["a.nii.gz", "b.nii.gz"]}]}')
    with pytest.raises(ManifestError, match=r"m\.json: subject s1: 'images' must map modality names to paths"):
        load_manifest(path)
