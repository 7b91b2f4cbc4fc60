"""Learning curve on a phantom: held-out brain L1, PSNR, SSIM, correlation and tissue Dice, next to predict-the-mean.

    python benchmarks/learning_curve.py --manifest M --method hifisyn --seconds 300 --chunk 500 --out curve.json
    python benchmarks/learning_curve.py --manifest M --method cyclegan3d --device cuda --set train.lr=2e-4 ...

``source_correlation`` asks how an unpaired method fails: a translation that keeps the source's contrast (T1's dark
CSF on a synthetic T2) correlates positively with the source and negatively with the target.

The issue-11 question, asked with more compute than a CI test has: does a method's translation of the held-out
subjects beat the constant that predicts their mean brain intensity, and how does its tissue Dice (built-in GMM
segmenter on the synthetic vs on the real target, inside the brain) compare with another method's at equal
iterations? It trains the ``<method>-<preset>`` preset with the real trainer in chunks of ``--chunk`` iterations
(``--resume`` between chunks, so the curve is one run), and after each chunk translates every ``test`` subject of
the manifest. It stops after the chunk that passes ``--seconds`` of training or at ``--iterations``.

Volumes are read as the toolkit's tests read them: each min-max scaled to [0, 1] on its own grid, x and y padded
to multiples of 8 (the slice methods' networks halve them three times). The brain is the tissue map's non-zero
voxels. One JSON line per chunk goes to stdout and the whole curve to ``--out`` (rewritten after each chunk).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch


def read_subject(manifest: Path, entry: dict[str, Any], source: str, target: str) -> dict[str, np.ndarray]:
    import nibabel as nib

    def read(path: str) -> np.ndarray:
        array = np.asarray(nib.load(manifest.parent / path).dataobj, dtype=np.float32)
        return np.pad(array, ((0, -array.shape[0] % 8), (0, -array.shape[1] % 8), (0, 0)))

    def scaled(path: str) -> np.ndarray:
        array = read(path)
        return (array - array.min()) / (array.max() - array.min())

    return {"source": scaled(entry["images"][source]), "target": scaled(entry["images"][target]),
            "tissue": read(entry["tissue"]).astype(np.int64)}


def tissue_dice(synthetic: np.ndarray, real: np.ndarray, brain: np.ndarray, contrast: str) -> float:
    """Mean Dice over CSF/GM/WM of the built-in GMM segmentations of ``synthetic`` and ``real`` inside ``brain``."""
    from volsynth.data.segmenters import GMMTissueSegmenter
    from volsynth.metrics import dice

    segmenter = GMMTissueSegmenter(contrast)
    a, b = segmenter.segment(synthetic, mask=brain), segmenter.segment(real, mask=brain)
    return float(np.mean(list(dice(a, b, (1, 2, 3), empty=0.0).values())))


def score(run: Path, subjects: list[dict[str, np.ndarray]], target: str, device: str) -> dict[str, float]:
    from volsynth.experiment import load_method

    method, config, _ = load_method(run / "checkpoints" / "last.pt", device=device)
    rows = []
    for subject in subjects:
        synthetic = method.infer(subject["source"], method.make_inferer(config.inference, config.data))
        brain = subject["tissue"] > 0
        rows.append({**brain_scores(synthetic, subject["target"], brain),
                     "tissue_dice": tissue_dice(synthetic, subject["target"], brain, target),
                     # > 0 while the target's is < 0: the translation kept the source's contrast
                     "source_correlation": correlation(synthetic[brain], subject["source"][brain])})
    return {key: float(np.mean([row[key] for row in rows])) for key in rows[0]}


def brain_scores(synthetic: np.ndarray, target: np.ndarray, brain: np.ndarray) -> dict[str, float]:
    """Inside ``brain``: L1 and PSNR (intensity, data range 1), SSIM (structure) and Pearson correlation; the
    correlation is 0 for a constant prediction, so it asks only whether the anatomy's contrast was translated."""
    from volsynth.metrics import psnr, ssim

    inside, real = synthetic[brain].astype(np.float64), target[brain].astype(np.float64)
    return {"brain_l1": float(np.abs(inside - real).mean()), "brain_psnr": psnr(synthetic, target, data_range=1.0,
            mask=brain), "brain_ssim": ssim(synthetic, target, data_range=1.0, mask=brain),
            "brain_correlation": correlation(inside, real)}


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two equal-size voxel sets; 0 when either is constant (it carries no contrast)."""
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return 0.0 if a.std() == 0 or b.std() == 0 else float(np.corrcoef(a, b)[0, 1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", type=Path, required=True, help="phantom manifest with train/test splits")
    parser.add_argument("--method", required=True)
    parser.add_argument("--preset", default="cpu", help="preset suffix: <method>-<preset> (default cpu)")
    parser.add_argument("--source", default="t1")
    parser.add_argument("--target", default="t2")
    parser.add_argument("--chunk", type=int, default=500, help="iterations between scorings")
    parser.add_argument("--iterations", type=int, default=100_000, help="stop at this many iterations")
    parser.add_argument("--seconds", type=float, default=300.0, help="stop after the chunk that passes this")
    parser.add_argument("--device", default="auto", help="train.device: auto | cpu | cuda")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config overrides")
    parser.add_argument("--run", type=Path, required=True, help="run folder (must not exist)")
    parser.add_argument("--out", type=Path, default=None, help="the curve as JSON")
    args = parser.parse_args(argv)
    if args.run.exists():
        print(f"error: {args.run}: run folder exists", file=sys.stderr)
        return 2

    from volsynth.experiment import load_config
    from volsynth.training.trainer import train

    entries = json.loads(args.manifest.read_text())["subjects"]
    subjects = [read_subject(args.manifest, e, args.source, args.target) for e in entries if e.get("split") == "test"]
    if not subjects:
        print(f"error: {args.manifest}: no subject has split 'test'", file=sys.stderr)
        return 2
    baseline = []  # the constant that predicts each subject's mean brain intensity
    for subject in subjects:
        brain = subject["tissue"] > 0
        constant = np.full_like(subject["target"], subject["target"][brain].mean())
        baseline.append(brain_scores(constant, subject["target"], brain))
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    curve: dict[str, Any] = {"method": args.method, "preset": f"{args.method}-{args.preset}", "overrides": args.set,
                             "device": device, "test_subjects": len(subjects),
                             **{f"predict_the_mean_{key}": float(np.mean([row[key] for row in baseline]))
                                for key in baseline[0]}, "points": []}
    print(json.dumps({k: v for k, v in curve.items() if k != "points"}), flush=True)
    trained = 0.0
    iteration = 0
    while iteration < args.iterations and trained < args.seconds:
        iteration = min(iteration + args.chunk, args.iterations)
        overrides = [f"data.manifest={args.manifest}", f"data.source={args.source}", f"data.target={args.target}",
                     "data.split.mode=manifest", f"train.iterations={iteration}", "train.val_every=1000000",
                     f"train.checkpoint_every={iteration}", "train.progress=false", f"train.device={device}",
                     *args.set]
        config = load_config(f"{args.method}-{args.preset}", overrides)
        start = time.perf_counter()
        train(config, args.run, resume=iteration > args.chunk)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        trained += time.perf_counter() - start
        point = {"iterations": iteration, "train_seconds": round(trained, 1),
                 **score(args.run, subjects, args.target, device)}
        curve["points"].append(point)
        print(json.dumps(point), flush=True)
        if args.out is not None:
            args.out.write_text(json.dumps(curve, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
