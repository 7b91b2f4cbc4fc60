"""What a translation of the phantom can reach from its source image: a ladder of oracles below the ceiling.

    python benchmarks/phantom_bounds.py                      # the demo's cohort: seed 0, 8 subjects, 3 mm, T1 → T2
    python benchmarks/phantom_bounds.py --seed 1 --spacing 2 --source t2 --target flair --out bounds.csv

The phantom's ceiling (the ideal image, E[noisy target | anatomy, target bias field]) knows three things that no
translation can see in the source: the target's own bias field (drawn independently per contrast), the subject's
jittered tissue parameters, and the noise-free anatomy. This script scores, on the test subjects of the paper
split, predictions that know less and less, with evaluate's definitions (target min-max normalised to [0, 1], the
prediction put on that scale; masked NMSE over the brain mask; PSNR with data range 1):

1. the ideal image (the ceiling as ``volsynth evaluate`` reports it);
2. the noise-free anatomy with the subject's tissue parameters, without the target's bias field;
3. the same with the population's (un-jittered BrainWeb) tissue parameters;
4. a per-intensity lookup table E[target | source intensity], fitted on the train subjects, applied to the noise-free
   source without its bias field, to the noisy source divided by its true bias field (a perfect N4), and to the
   noisy source itself (what a voxel-wise model sees).

Rows 2–3 bound any method from above (they know the anatomy); rows 4 show how far a voxel-wise map gets and what the
source's noise and bias field cost it. Everything is recomputed from the phantom's random streams (no files).
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path
from typing import Any

import numpy as np

BINS = 256


def _bias(subject: Any, contrast: str) -> np.ndarray:
    """The multiplicative bias field of ``contrast`` inside the brain (1 where the noise-free signal is 0)."""
    clean, biased = subject.clean[contrast], subject.biased[contrast]
    return np.where(clean != 0, biased / np.where(clean != 0, clean, 1.0), 1.0)


def _unit(array: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """``array`` on ``reference``'s min-max scale (how evaluate puts a prediction on the target's scale)."""
    return (np.asarray(array, np.float64) - float(reference.min())) / float(np.ptp(reference))


def lookup_table(pairs: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """E[target | source bin] over all voxels of ``pairs`` (source, target on [0, 1]); empty bins interpolated."""
    sums, counts = np.zeros(BINS), np.zeros(BINS)
    for source, target in pairs:
        index = _bin(source)
        sums += np.bincount(index.ravel(), target.ravel(), BINS)
        counts += np.bincount(index.ravel(), None, BINS)
    filled = counts > 0
    grid = np.arange(BINS)
    return np.interp(grid, grid[filled], sums[filled] / counts[filled])


def _bin(source: np.ndarray) -> np.ndarray:
    return np.clip((source * BINS).astype(np.int64), 0, BINS - 1)


def source_views(subject: Any, source: str) -> dict[str, np.ndarray]:
    """The source as a voxel-wise model would see it under three assumptions, each min-max scaled like the input."""
    from volsynth.data.phantom.signal import rician_mean

    noisy = subject.images[source].astype(np.float64)
    return {"noise-free source, no bias field": _unit(rician_mean(subject.clean[source], subject.noise_sigma[source]),
                                                      noisy),
            "noisy source / its true bias field (a perfect N4)": _unit(noisy / _bias(subject, source), noisy),
            "noisy source (the input)": _unit(noisy, noisy)}


def anatomy_oracles(subject: Any, target: str) -> dict[str, np.ndarray]:
    """Predictions that know the anatomy (rows 1–3), on the noisy target's min-max scale."""
    from volsynth.data.phantom.signal import BASE_TISSUE_PARAMS, TISSUES, contrast_signals, rician_mean

    noisy, sigma = subject.images[target], subject.noise_sigma[target]
    population = contrast_signals(target, BASE_TISSUE_PARAMS)
    mixed = np.abs(sum(subject.fractions[name] * population[name] for name in TISSUES))
    return {"ideal image (the ceiling)": _unit(subject.ideal(target), noisy),
            "anatomy + subject's tissue parameters, no target bias field": _unit(
                rician_mean(subject.clean[target], sigma), noisy),
            "anatomy + population tissue parameters, no bias field": _unit(rician_mean(mixed, sigma), noisy)}


def bounds(*, seed: int, subjects: int, spacing: float, source: str, target: str) -> list[dict[str, Any]]:
    """One row per (predictor, test subject) plus a mean row per predictor."""
    from volsynth.config import SplitConfig
    from volsynth.data.discovery import make_splits
    from volsynth.data.phantom.subject import simulate_subject, subject_name
    from volsynth.metrics import nmse, psnr

    split = make_splits([subject_name(i) for i in range(subjects)], SplitConfig(mode="paper"))
    simulated = {name: simulate_subject(int(name.rsplit("_", 1)[1]), seed=seed, spacing=spacing,
                                        contrasts=(source, target)) for name in [*split["train"], *split["test"]]}

    def unit_target(name: str) -> np.ndarray:
        noisy = simulated[name].images[target]
        return _unit(noisy, noisy)

    tables = {view: lookup_table([(source_views(simulated[name], source)[view], unit_target(name))
                                  for name in split["train"]])
              for view in source_views(simulated[split["train"][0]], source)}
    rows: list[dict[str, Any]] = []
    for name in split["test"]:
        subject, truth = simulated[name], unit_target(name)
        brain = subject.mask > 0
        predictions = dict(anatomy_oracles(subject, target))
        for view, array in source_views(subject, source).items():
            predictions[f"lookup table on the {view}"] = tables[view][_bin(array)]
        for predictor, prediction in predictions.items():
            rows.append({"predictor": predictor, "subject": name, "nmse_mask": nmse(prediction, truth, brain),
                         "psnr": psnr(prediction, truth, data_range=1.0)})
    for predictor in dict.fromkeys(row["predictor"] for row in rows):
        mine = [row for row in rows if row["predictor"] == predictor]
        rows.append({"predictor": predictor, "subject": "mean",
                     **{k: float(np.mean([row[k] for row in mine])) for k in ("nmse_mask", "psnr")}})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--subjects", type=int, default=8)
    parser.add_argument("--spacing", type=float, default=3.0)
    parser.add_argument("--source", default="t1")
    parser.add_argument("--target", default="t2")
    parser.add_argument("--out", type=Path, default=None, help="CSV of every row (default: print only)")
    args = parser.parse_args(argv)
    rows = bounds(seed=args.seed, subjects=args.subjects, spacing=args.spacing, source=args.source,
                  target=args.target)
    subjects = list(dict.fromkeys(row["subject"] for row in rows))
    print("| predictor | " + " | ".join(f"{s} NMSE / PSNR" for s in subjects) + " |")
    print("|---|" + "---|" * len(subjects))
    for predictor in dict.fromkeys(row["predictor"] for row in rows):
        cells = {row["subject"]: row for row in rows if row["predictor"] == predictor}
        print(f"| {predictor} | " + " | ".join(f"{cells[s]['nmse_mask']:.3f} / {cells[s]['psnr']:.2f}"
                                              for s in subjects) + " |")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        temporary = args.out.with_name(args.out.name + ".tmp")
        with temporary.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["predictor", "subject", "nmse_mask", "psnr"])
            writer.writeheader()
            writer.writerows(rows)
        temporary.replace(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
