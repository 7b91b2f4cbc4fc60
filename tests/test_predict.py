"""Prediction: native geometry and units, synthetic labelled as such, outputs only inside --out, shards."""

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter
from scipy.spatial.transform import Rotation

from volsynth.cli import main
from volsynth.data.io import VolumeError, read_description, read_volume, write_volume
from volsynth.data.manifest import Manifest, Subject, load_manifest, save_manifest
from volsynth.data.volume import Volume
from volsynth.errors import ConfigError, DataError, ManifestError, OutputError
from volsynth.experiment import load_config
from volsynth.inference.predict import collect_inputs, parse_shard, predict, translate_volume
from volsynth.methods.regression_unet import RegressionUNet
from volsynth.training.trainer import train

OBLIQUE = Rotation.from_euler("xyz", [10, -20, 5], degrees=True).as_matrix() @ np.diag([-1.0, -1.0, 1.0])


class IdentityUNet(RegressionUNet):
    """translate = identity: isolates preprocessing + inferer + inverse mapping."""

    def translate(self, source: torch.Tensor, generators: list[torch.Generator] | None = None) -> torch.Tensor:
        return source


def ct_like(seed: int, shape: tuple[int, int, int] = (22, 20, 14)) -> np.ndarray:
    field = gaussian_filter(np.random.default_rng(seed).standard_normal(shape), 2.5)
    return ((field - field.min()) / np.ptp(field) * 2800 - 1000).astype(np.float32)


def ct_config(**extra: str) -> list[str]:
    return ["data.source_kind=ct", "data.target_kind=ct", "data.sampling.patch_size=[8,8,8]", "inference.overlap=0.5",
            *(f"{k}={v}" for k, v in extra.items())]


@pytest.mark.parametrize("spacing", [None, [1.6, 1.6, 1.6]])
@pytest.mark.parametrize("orientation", ["RAS", None])
def test_identity_translation_returns_the_input_in_hu_on_its_grid(spacing: list | None, orientation: str | None
                                                                    ) -> None:
    config = load_config({"method": {"name": "regression_unet", "channels": [4, 8, 16, 32]}},
                         ct_config(**({"data.spacing": str(spacing)} if spacing else {}),
                                   **{"data.orientation": orientation or "null"}))
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


@pytest.fixture
def trained(tmp_path: Path) -> tuple[Path, Path, list[Subject]]:
    """A CT-target run (2 iterations) on an oblique MR→CT cohort; returns (run, manifest, subjects)."""
    subjects = []
    for i in range(4):
        mr = Volume(ct_like(i) + 1000, (1.1, 1.3, 2.2), (-40.0, 12.5, 80.0), OBLIQUE)
        ct = mr.with_array((ct_like(i) * 0.8).astype(np.int16).astype(np.float32))
        paths = {m: write_volume(v, tmp_path / "data" / f"s{i}" / f"s{i}_{m}.nii.gz") for m, v in (("mr", mr),
                                                                                                   ("ct", ct))}
        subjects.append(Subject(f"s{i}", images=paths))
    manifest = save_manifest(Manifest(subjects, source="mr", target="ct"), tmp_path / "data/manifest.json")
    run = tmp_path / "run"
    config = load_config("regression_unet-cpu", [f"data.manifest={manifest}", *ct_config(), "data.source_kind=mr",
                                                 "train.iterations=2", "train.progress=false", "method.channels=[4,8]",
                                                 "method.strides=[2]", "method.output=sigmoid"])  # never constant
    train(config, run)
    return run, manifest, subjects


def test_cli_predict_keeps_geometry_and_hu_and_labels_the_output_synthetic(trained, tmp_path: Path) -> None:
    run, manifest, subjects = trained
    assert main(["predict", "--run", str(run), "--input", str(manifest), "--split", "test", "--out",
                 str(tmp_path / "pred")]) == 0
    outputs = sorted((tmp_path / "pred").glob("*.nii.gz"))
    assert [p.name for p in outputs] == ["s0_synthetic-ct.nii.gz"]
    synthetic, source = read_volume(outputs[0]), read_volume(subjects[0].images["mr"])
    assert synthetic.same_grid(source)
    assert -1024 <= synthetic.array.min() and synthetic.array.max() <= 3000 and synthetic.array.std() > 0
    assert read_description(outputs[0]) == "volsynth synthetic ct from mr (regression_unet)"
    sidecar = json.loads((tmp_path / "pred/s0_synthetic-ct.json").read_text())
    assert sidecar["synthetic"] is True and sidecar["method"] == "regression_unet" and sidecar["target"] == "ct"
    assert sidecar["input"] == str(subjects[0].images["mr"].resolve()) and len(sidecar["checkpoint_sha256"]) == 16
    assert sidecar["config"]["data"]["target"] == "ct" and sidecar["volsynth_version"]
    index = json.loads((tmp_path / "pred/predictions.json").read_text())
    assert index["outputs"] == {"s0": {"file": "s0_synthetic-ct.nii.gz", "input": sidecar["input"]}}
    assert (tmp_path / "pred/config.yaml").is_file()
    # A DICOM series input, and a bad input named in one line.
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


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def test_predict_never_overwrites_inputs_runs_or_earlier_outputs(trained, tmp_path: Path) -> None:
    run, _manifest, subjects = trained
    checkpoint = run / "checkpoints/last.pt"
    inputs = tmp_path / "inplace"
    inputs.mkdir()
    for subject in subjects[:2]:
        (inputs / subject.images["mr"].name).write_bytes(subject.images["mr"].read_bytes())
    before = {p.name: p.read_bytes() for p in inputs.iterdir()}
    predict(checkpoint, inputs, inputs, progress=False)  # beside the inputs, under other names
    assert all((inputs / name).read_bytes() == data for name, data in before.items())
    with pytest.raises(OutputError, match="exists; pass --overwrite"):
        predict(checkpoint, inputs / "s0_mr.nii.gz", inputs, progress=False)
    predict(checkpoint, inputs / "s0_mr.nii.gz", inputs, progress=False, overwrite=True)
    run_files = snapshot(run)
    with pytest.raises(OutputError, match="is a training run folder"):
        predict(checkpoint, inputs / "s0_mr.nii.gz", run, progress=False)
    assert snapshot(run) == run_files
    collide = tmp_path / "collide"
    collide.mkdir()
    volume = read_volume(subjects[0].images["mr"])
    write_volume(volume, collide / "scan.nii.gz")
    write_volume(volume, collide / "scan.nrrd")
    with pytest.raises(DataError, match="would both be written to"):
        predict(checkpoint, collide, tmp_path / "c_out", progress=False)
    assert not (tmp_path / "c_out").exists()


def test_manifest_subject_names_cannot_leave_the_output_folder(trained, tmp_path: Path) -> None:
    _, manifest, _ = trained
    raw = json.loads(manifest.read_text())
    for name in ("../../../victim/scan", "/tmp/escaped", "a/b", ".."):
        raw["subjects"][0]["subject"] = name
        evil = manifest.parent / "evil.json"
        evil.write_text(json.dumps(raw))
        with pytest.raises(ManifestError, match=r"subject name .* is not allowed"):
            load_manifest(evil)


def test_a_subject_folder_contributes_only_the_source_modality(trained, tmp_path: Path) -> None:
    _, _, subjects = trained
    folder = subjects[0].images["mr"].parent
    write_volume(read_volume(subjects[0].images["ct"]), folder / "s0_seg.nii.gz")
    items = collect_inputs(folder, modality="mr")
    assert [i.path.name for i in items] == ["s0_mr.nii.gz"]
    plain = tmp_path / "plain"
    plain.mkdir()
    write_volume(read_volume(subjects[0].images["mr"]), plain / "patient7.nii.gz")
    assert [i.name for i in collect_inputs(plain, modality="mr")] == ["patient7"]  # no modality names: all files


def test_shards_write_every_subject_once_identical_to_one_run(trained, tmp_path: Path) -> None:
    run, manifest, _ = trained
    checkpoint = run / "checkpoints/last.pt"
    whole = predict(checkpoint, manifest, tmp_path / "whole", progress=False)
    for k in range(3):
        predict(checkpoint, manifest, tmp_path / "sharded", shard=(k, 3), progress=False)
    names = sorted(p.name for p in (tmp_path / "sharded").glob("*.nii.gz"))
    assert names == sorted(p.name for p in whole)
    for path in whole:
        np.testing.assert_array_equal(read_volume(tmp_path / "sharded" / path.name).array, read_volume(path).array)
    index = json.loads((tmp_path / "sharded/predictions.json").read_text())
    assert sorted(index["outputs"]) == ["s0", "s1", "s2", "s3"]
    os.environ["RANK"], os.environ["WORLD_SIZE"] = "1", "2"  # what torchrun sets
    try:
        written = predict(checkpoint, manifest, tmp_path / "rank1", progress=False)
    finally:
        del os.environ["RANK"], os.environ["WORLD_SIZE"]
    assert [p.name for p in written] == ["s1_synthetic-ct.nii.gz", "s3_synthetic-ct.nii.gz"]
    assert parse_shard("2/4") == (2, 4)
    for bad in ("4/4", "x", "1/0", "-1/3"):
        with pytest.raises(ConfigError, match="--shard"):
            parse_shard(bad)


def test_cli_mirror_axes_reach_the_inferer_and_the_sidecar(trained, tmp_path: Path, capsys) -> None:
    run, manifest, _ = trained
    common = ["predict", "--run", str(run), "--input", str(manifest), "--split", "test"]
    assert main([*common, "--out", str(tmp_path / "plain")]) == 0
    assert main([*common, "--out", str(tmp_path / "mirrored"), "--mirror-axes", "0,2"]) == 0
    assert main([*common, "--out", str(tmp_path / "off"), "--mirror-axes", "none"]) == 0
    name = "s0_synthetic-ct"
    plain, mirrored, off = (read_volume(tmp_path / d / f"{name}.nii.gz") for d in ("plain", "mirrored", "off"))
    assert mirrored.same_grid(plain) and not np.allclose(mirrored.array, plain.array)
    np.testing.assert_array_equal(off.array, plain.array)
    sidecar = json.loads((tmp_path / "mirrored" / f"{name}.json").read_text())
    assert sidecar["config"]["inference"]["mirror_axes"] == [0, 2]
    for bad, message in (("0,0", "inference.mirror_axes"), ("3", "inference.mirror_axes"), ("x", "--mirror-axes")):
        capsys.readouterr()
        assert main([*common, "--out", str(tmp_path / f"bad{bad}"), "--mirror-axes", bad]) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / f"bad{bad}").exists()


def test_deterministic_methods_refuse_sampler_options(trained, tmp_path: Path) -> None:
    run, manifest, _ = trained
    with pytest.raises(ConfigError, match="deterministic and has no sampling steps"):
        predict(run / "checkpoints/last.pt", manifest, tmp_path / "p", steps=5, progress=False)
    assert not (tmp_path / "p").exists()


@pytest.mark.slow
def test_compiled_inference_equals_eager_and_pads_the_short_last_window_batch(trained, tmp_path: Path) -> None:
    run, _, _ = trained
    from volsynth.experiment import load_method

    method, config, _ = load_method(run / "checkpoints/last.pt", device=torch.device("cpu"))
    source = np.random.default_rng(0).random((16, 16, 16), dtype=np.float32)
    inferer = method.make_inferer(dataclasses.replace(config.inference, roi_size=(8, 8, 8), overlap=0.5,
                                                      sw_batch_size=4), config.data)  # 27 windows: 4 × 6 + 3
    seen: list[int] = []
    original = method.translate

    def counting(items: torch.Tensor, generators: list[torch.Generator] | None = None) -> torch.Tensor:
        seen.append(items.shape[0])
        return original(items, generators)

    method.translate = counting  # type: ignore[method-assign]
    eager = method.infer(source, inferer, channels_last=True)
    compiled = method.infer(source, inferer, channels_last=True, compile=True)
    np.testing.assert_allclose(compiled, eager, atol=1e-5)
    assert not np.allclose(eager, eager.mean())  # a real output, not a constant both could agree on
    assert seen[:7] == [4, 4, 4, 4, 4, 4, 3]  # eager: the short last batch as it is
    assert set(seen[7:]) == {4}  # compiled: traced with full batches only (the short one padded)


def test_stochastic_methods_refuse_compile() -> None:
    from volsynth.methods import build_method

    method = build_method(load_config("make_a_volume-cpu").method)
    with pytest.raises(ConfigError, match="--compile"):
        method.compiled_translate()
