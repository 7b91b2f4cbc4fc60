"""End-to-end: the flagship learns T1 → T2 on phantom subjects (slow; CI runs it once)."""

from pathlib import Path

import numpy as np
import pytest
import torch

from volsynth.data.cache import prepare_subject
from volsynth.data.manifest import load_manifest
from volsynth.data.phantom import make_phantom_cohort
from volsynth.data.preprocess import Preprocessor
from volsynth.experiment import load_config, load_method
from volsynth.inferers import SlidingWindowInferer
from volsynth.methods import TranslationMethod, build_method
from volsynth.training.trainer import train


@pytest.mark.slow
def test_mdagan_cpu_halves_validation_l1_and_beats_the_mean(tmp_path: Path) -> None:
    manifest = make_phantom_cohort(tmp_path / "phantom", 2, seed=3, spacing=4.0, lesion_probability=0.0,
                                   contrasts=("t1", "t2"), montage=False)
    overrides = [f"data.manifest={manifest}", "data.split.mode=manifest",
                 "data.sampling.patch_size=[16,16,16]", "train.iterations=300", "train.val_every=1000",
                 "train.checkpoint_every=1000", "train.progress=false", "train.lr=1e-3", "inference.overlap=0.5",
                 "inference.sw_batch_size=8"]
    # Subject 0 trains, subject 1 validates.
    document = load_manifest(manifest)
    import json

    raw = json.loads(manifest.read_text())
    for entry, split in zip(raw["subjects"], ("train", "val"), strict=True):
        entry["split"] = split
    raw["source"], raw["target"] = "t1", "t2"
    manifest.write_text(json.dumps(raw))
    config = load_config("mdagan-cpu", overrides)
    torch.manual_seed(config.seed)
    initial = build_method(config.method).eval()
    train(config, tmp_path / "run")
    trained, trained_config, _ = load_method(tmp_path / "run/checkpoints/last.pt")
    preprocessor = Preprocessor(trained_config.data, spacing=trained_config.data.spacing, divisor=8)
    inferer = SlidingWindowInferer(roi_size=(16, 16, 16), overlap=0.5, batch=8)
    val = prepare_subject(document.by_name()["Phantom_00001"], source="t1", target="t2", preprocessor=preprocessor,
                          cache_dir=tmp_path / "cache")
    source, target = np.asarray(val.source), np.asarray(val.target)

    def l1(method: TranslationMethod) -> float:
        synthetic = method.infer(source, inferer, device=torch.device("cpu"))
        return float(np.abs(synthetic - target).mean())

    before, after = l1(initial), l1(trained)
    mean_baseline = float(np.abs(target - target.mean()).mean())
    print(f"validation L1: initial {before:.4f} trained {after:.4f} predict-the-mean {mean_baseline:.4f}")
    assert after <= 0.5 * before
    assert after < mean_baseline
