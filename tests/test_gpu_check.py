"""benchmarks/gpu_check.py: its CPU smoke run in a Python where SimpleITK, nibabel and nilearn cannot be imported
(as on a bare GPU machine), and the small pieces it is built from.

The smoke run makes its phantom with ``--make-phantom`` (which needs the full dependencies) in a normal process,
then runs the check with a shim folder first on ``PYTHONPATH`` whose ``SimpleITK.py``/``nibabel.py``/``nilearn.py``
raise ImportError: a module-level import of any of them on the check's path makes the run, and this test, fail.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from volsynth.experiment import load_config
from volsynth.methods import METHODS

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
BLOCKED = ("SimpleITK", "nibabel", "nilearn")


@functools.cache
def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses resolve their module through sys.modules
    spec.loader.exec_module(module)
    return module


def environment(shim: Path | None = None) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUTF8": "1"}
    if shim is not None:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(shim), os.environ.get("PYTHONPATH", "")) if p)
    return env


def make_shim(folder: Path) -> Path:
    folder.mkdir()
    for name in BLOCKED:
        (folder / f"{name}.py").write_text(f"raise ImportError('{name} is not installed on this bare machine')\n")
    return folder


# ----------------------------------------------------------------------------------------------------------------
# Pieces


def test_crop_pads_where_the_window_leaves_the_array() -> None:
    crop = load_script().crop
    array = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    block = crop(array, [-1, 3, 4], (3, 3, 3))
    expected = np.zeros((3, 3, 3), np.float32)  # hand-placed: rows -1..1, columns 3..5, slices 4..6
    expected[1:, :2, :2] = array[0:2, 3:5, 4:6]
    np.testing.assert_array_equal(block, expected)
    np.testing.assert_array_equal(crop(array, [1, 1, 1], (2, 2, 2)), array[1:3, 1:3, 1:3])


def test_patches_are_centred_on_the_foreground() -> None:
    script = load_script()
    config = load_config("mdagan-cpu", ["data.sampling.patch_size=[4,4,4]", "data.sampling.per_step=3"])
    source = np.zeros((10, 10, 10), np.float32)
    target = np.zeros_like(source)
    source[7, 2, 5] = target[7, 2, 5] = 1.0  # the only voxel where both exceed the 0.1 threshold
    centres = [np.flatnonzero((source > 0.1) & (target > 0.1))]
    batch = script.sample_patches(np.random.default_rng(0), [source], [target], centres, config)
    assert tuple(batch.source.shape) == (3, 1, 4, 4, 4)
    for item in range(3):  # centre (7, 2, 5), patch 4 → start (5, 0, 3): the voxel sits at (2, 2, 2)
        assert float(batch.source[item, 0, 2, 2, 2]) == 1.0 and float(batch.source[item].sum()) == 1.0
        assert float(batch.mask[item, 0, 2, 2, 2]) == 1.0 and float(batch.mask[item].sum()) == 1.0


def test_builtin_phantom_is_seeded_with_inverse_t1_t2_contrast() -> None:
    builtin = load_script().builtin_phantom
    first, again, other = (builtin(2, (40, 48, 40), seed) for seed in (0, 0, 1))
    for key in ("t1", "t2", "mask"):
        assert len(first[key]) == 2 and first[key][0].shape == (40, 48, 40)
        np.testing.assert_array_equal(first[key][1], again[key][1])
    assert not np.array_equal(first["t1"][0], other["t1"][0])
    t1, t2 = first["t1"][0], first["t2"][0]
    assert 0.0 <= t1.min() and t1.max() == pytest.approx(1.0) and t2.max() == pytest.approx(1.0)
    centre = (20, 24, 20)  # white matter of subject 0 (even subjects have no lesion): bright in T1, dark in T2
    assert t1[centre] > 0.6 and t2[centre] < 0.55
    assert not first["mask"][0][0, 0, 0] and first["mask"][0][centre]


# ----------------------------------------------------------------------------------------------------------------
# The whole check, CPU smoke mode, without image libraries


@pytest.mark.slow
def test_cpu_smoke_runs_every_method_without_image_libraries(tmp_path: Path) -> None:
    phantom = tmp_path / "phantom.npz"
    made = subprocess.run([sys.executable, str(SCRIPT), "--make-phantom", str(phantom), "--phantom-subjects", "4",
                           "--phantom-spacing", "4"], cwd=ROOT, env=environment(), capture_output=True, text=True,
                          timeout=300)
    assert made.returncode == 0, made.stderr[-3000:]

    shim = make_shim(tmp_path / "shim")
    for name in BLOCKED:  # the shim really blocks, so a new module-level import on the check's path fails it
        probe = subprocess.run([sys.executable, "-c", f"import {name}"], env=environment(shim), capture_output=True,
                               text=True, timeout=60)
        assert probe.returncode != 0 and "bare machine" in probe.stderr
    out = tmp_path / "tmp" / "gpu.json"
    result = subprocess.run([sys.executable, str(SCRIPT), "--cpu-smoke", "--phantom", str(phantom), "--out", str(out),
                             "--depth-all", "8"], cwd=ROOT, env=environment(shim), capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-5000:]
    report = json.loads(out.read_text())
    assert report["mode"] == "cpu-smoke" and report["summary"]["ok"], report["summary"]
    assert report["summary"]["image_io_modules_loaded"] == []

    # Every registered method (every stage of a staged one) took finite fp32 training steps (a CPU's default; bf16
    # steps on a CPU are opt-in: torch 2.13's CPU bf16 conv3d backward is wrong for 2³ outputs).
    steps = report["training_steps"]
    assert {e["method"] for e in steps} == set(METHODS.names())
    for name in METHODS.names():
        stages = load_config(f"{name}-paper").stages
        for stage, overrides in [(s.name, s.overrides) for s in stages] or [(None, {})]:
            sampling = load_config(f"{name}-paper", [f"{k}={json.dumps(v)}" for k, v in overrides.items()]
                                   ).data.sampling
            for precision in ("fp32",):
                found = [e for e in steps if (e["method"], e["stage"], e["precision"]) == (name, stage, precision)]
                assert len(found) == 1, (name, stage, precision)
                entry = found[0]
                assert entry["status"] == "ok", entry.get("error")
                assert entry["losses"] and all(math.isfinite(v) for v in entry["losses"].values()), entry["losses"]
                assert entry["seconds"]["median"] > 0 and sum(entry["parameters"].values()) > 0
                shape = entry["item_shape"]
                assert len(shape) == 5 and shape[1] == 1 and 1 <= shape[0] <= 2
                if sampling.kind == "slab":  # slice axis last: the preset's depth, or --depth-all slices
                    assert shape[-1] == (8 if sampling.depth == "all" else sampling.depth)

    predict = report["predict"]
    fp32 = next(e for e in predict["results"] if e["precision"] == "fp32")
    assert fp32["status"] == "ok" and fp32["seconds"]["median"] > 0 and fp32["windows"] > 0

    # Phantom training: the paper split (subject 0 of 4 held out) scored on the arrays of the .npz. The identity
    # scores (source as the prediction) are recomputed here with scikit-image from the file itself.
    training = report["phantom_training"]
    assert training["status"] == "ok" and training["iterations"] >= 1
    assert training["data"]["test"] == ["Phantom_00000"] and training["data"]["subjects"] == 4
    scores = training["test"][0]
    assert -1.0 < scores["ssim"] <= 1.0 and math.isfinite(scores["psnr"]) and scores["psnr"] > 0
    with np.load(phantom) as data:
        source, target = data["t1"][0].astype(np.float32), data["t2"][0].astype(np.float32)
    assert scores["identity_ssim"] == pytest.approx(structural_similarity(target, source, data_range=1.0), abs=1e-5)
    assert scores["identity_psnr"] == pytest.approx(peak_signal_noise_ratio(target, source, data_range=1.0),
                                                    abs=1e-4)

    # The precision check reruns the same trained network on that subject: its fp32 run is the scored one.
    check = training["precision_check"]
    assert check["subject"] == "Phantom_00000" and check["reference"] == training["evaluation_precision"] == "fp32"
    assert check["fp32"]["max_abs"] == 0.0 and check["fp32"]["psnr"] == pytest.approx(scores["psnr"], abs=1e-9)
    assert check["reference_std"] > 0  # a trained output, not the random net's clipped constant
