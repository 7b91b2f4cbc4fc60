"""benchmarks/learning_curve.py: the curve is one resumed run, scored on the held-out subjects as read from disk."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import nibabel as nib
import numpy as np
import pytest


@pytest.fixture
def script(benchmark_script: Callable[[str], ModuleType]) -> ModuleType:
    return benchmark_script("learning_curve")


def test_correlation_is_pearsons_and_zero_for_a_constant(script: ModuleType) -> None:
    x = np.array([0.1, 0.4, 0.2, 0.9])
    assert script.correlation(x, 2 * x + 1) == pytest.approx(1.0)
    assert script.correlation(x, -x) == pytest.approx(-1.0)
    assert script.correlation(x, np.full(4, 0.3)) == 0.0
    y = np.array([0.3, 0.1, 0.5, 0.2])
    assert script.correlation(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1])


@pytest.mark.slow
def test_curve_resumes_one_run_and_scores_the_test_subject(script: ModuleType, tmp_path: Path,
                                                            benchmark_script: Callable[[str], ModuleType]) -> None:
    from volsynth.data.phantom import make_phantom_cohort
    from volsynth.experiment import load_checkpoint

    manifest = make_phantom_cohort(tmp_path / "phantom", 2, seed=3, spacing=4.0, contrasts=("t1", "t2"),
                                   montage=False)
    raw = json.loads(manifest.read_text())
    for entry, split in zip(raw["subjects"], ["train", "test"], strict=True):
        entry["split"] = split
    manifest.write_text(json.dumps(raw))
    run, out = tmp_path / "run", tmp_path / "curve.json"
    argv = ["--manifest", str(manifest), "--method", "hifisyn", "--chunk", "1", "--iterations", "2", "--device",
            "cpu", "--run", str(run), "--out", str(out)]
    assert script.main(argv) == 0
    curve = json.loads(out.read_text())
    assert [p["iterations"] for p in curve["points"]] == [1, 2] and curve["test_subjects"] == 1
    assert load_checkpoint(run / "checkpoints" / "last.pt")["iteration"] == 2  # one run, resumed

    # Predict-the-mean, recomputed from the files: min-max scaled T2, its mean inside the tissue map's brain.
    test = raw["subjects"][1]
    target = np.asarray(nib.load(manifest.parent / test["images"]["t2"]).dataobj, dtype=np.float64)
    brain = np.asarray(nib.load(manifest.parent / test["tissue"]).dataobj) > 0
    target = (target - target.min()) / (target.max() - target.min())
    expected = np.abs(target[brain] - target[brain].mean()).mean()
    assert curve["predict_the_mean_brain_l1"] == pytest.approx(expected, rel=1e-3)  # float32 sums
    variance = np.mean((target[brain] - target[brain].mean()) ** 2)  # the constant's MSE inside the brain
    assert curve["predict_the_mean_brain_psnr"] == pytest.approx(10 * np.log10(1 / variance), abs=1e-2)
    assert curve["predict_the_mean_brain_correlation"] == 0.0
    last = curve["points"][-1]
    assert 0 < last["brain_l1"] < 1 and 0 <= last["tissue_dice"] <= 1 and -1 <= last["brain_correlation"] <= 1
    assert -1 <= last["source_correlation"] <= 1

    assert script.main(argv) == 2  # the run folder exists now: never trained into twice

    # benchmarks/content_probe.py reads the same run: one code per content pixel inside the brain, per domain.
    from volsynth.methods.hifisyn import DOWNSAMPLE

    probe = benchmark_script("content_probe")
    codes = probe.content_codes(run, manifest, "t1", "t2")
    assert set(codes) == {(d, s) for d in probe.DOMAINS for s in ("train", "test")}
    features, classes = codes[("target", "test")]
    assert features.shape == (classes.size, 32) and set(np.unique(classes)) <= {1, 2, 3}  # hifisyn-cpu: 4 × 8
    # The test subject's labels pooled by hand: tumour labels as WM, x/y padded to multiples of 8, then the most
    # frequent class in each DOWNSAMPLE² block of each axial slice (ties to the lower class), background dropped.
    labels = np.minimum(np.asarray(nib.load(manifest.parent / test["tissue"]).dataobj).astype(np.int64), 3)
    labels = np.pad(labels, ((0, -labels.shape[0] % 8), (0, -labels.shape[1] % 8), (0, 0)))
    x, y, z = labels.shape
    blocks = labels.reshape(x // DOWNSAMPLE, DOWNSAMPLE, y // DOWNSAMPLE, DOWNSAMPLE, z)
    counts = np.stack([(blocks == k).sum(axis=(1, 3)) for k in range(4)])
    pooled = counts.argmax(axis=0)
    assert classes.size == np.count_nonzero(pooled)
    assert np.array_equal(np.bincount(classes, minlength=4), np.bincount(pooled.ravel(), minlength=4) * [0, 1, 1, 1])
