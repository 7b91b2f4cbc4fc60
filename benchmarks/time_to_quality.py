"""Time to quality: how many seconds of training each method needs to come within 6, 4 and 2 dB of the ceiling.

Every registered method (its CPU preset) and the flagship's ablations train on the same phantom (same seed, same
split), time-boxed by ``train.max_seconds``, validating often. Validation PSNR (whole volume, the target's own
min-max scale) is plotted against *training* seconds (validation time excluded) next to the phantom's physical
ceiling: the noise-free image scored the same way on the same validation subject. Runs go two at a time, one thread
each, on a 2-core machine.

    .venv/bin/python benchmarks/time_to_quality.py --seconds 600 --out ttq           # every method, 10 min each
    .venv/bin/python benchmarks/time_to_quality.py --methods mdagan,regression_unet --seconds 300

Writes ``OUT/ttq.csv`` (every validation point), ``OUT/ttq.png`` and prints the table for ``RESULTS.md``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ABLATIONS = {  # the flagship's ablations (after Ha et al. Table 2: multi-resolution in/out, binary D, BCE)
    "mdagan-no-multires": ["method.generator.multires_input=false", "method.generator.multires_output=false"],
    "mdagan-binary-D": ["method.discriminator.kind=binary"],
    "mdagan-bce": ["method.adversarial.mode=bce"],
}
STAGE_SHARE = {"autoencoder": 0.25, "slice": 0.6, "volumetric": 0.15}  # of a staged method's budget
# Stages whose validation scores a reconstruction (target → target), not a translation: plotted, never ranked.
RECONSTRUCTION_STAGES = {"autoencoder"}


# The flagship's CPU preset starts D after 90 % of its schedule (ESRGAN warm start). These runs have no fixed
# schedule (10^7 iterations, time-boxed), so D would never start and the D ablations would equal
# the full model: here the flagship and its ablations train adversarially from the first step, as the paper does.
FLAGSHIP_FROM_START = ["method.adversarial.start_fraction=0"]


def jobs(methods: list[str], ablations: bool) -> list[tuple[str, str, list[str]]]:
    listed = [(name, f"{name}-cpu", FLAGSHIP_FROM_START if name == "mdagan" else []) for name in methods]
    if ablations and "mdagan" in methods:
        listed += [(label, "mdagan-cpu", [*FLAGSHIP_FROM_START, *extra]) for label, extra in ABLATIONS.items()]
    return listed


def launch(label: str, preset: str, extra: list[str], manifest: Path, out: Path, seconds: float,
           val_every: int, seed: int) -> subprocess.Popen:
    """Start one time-boxed training (``volsynth train`` in its own process, one thread)."""
    import yaml

    from volsynth.config import resolve_config_path

    raw = yaml.safe_load(resolve_config_path(preset).read_text())
    settings = [f"train.val_every={val_every}", "train.checkpoint_every=1000000", "train.progress=false",
                f"seed={seed}", *extra]
    if raw.get("stages"):  # a staged method: each stage gets its share of the budget through its own overrides
        for stage in raw["stages"]:
            overrides = stage.setdefault("overrides", {})
            overrides["train.max_seconds"] = seconds * STAGE_SHARE.get(stage["name"], 1 / len(raw["stages"]))
            overrides["train.iterations"] = 10**7
    else:
        settings += [f"train.max_seconds={seconds}", f"train.iterations={10**7}"]
    config = out / f"{label}.yaml"
    config.write_text(yaml.safe_dump(raw))
    command = [sys.executable, "-m", "volsynth.cli", "train", "--config", str(config), "--data", str(manifest),
               "--out", str(out / "runs" / label), *(f"--set={o}" for o in settings)]
    log = (out / f"{label}.log").open("w")
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})


def ceiling_psnr(run: Path) -> float | None:
    """PSNR of the phantom's ideal image against the validation target, in the run's validation space."""
    from volsynth.data.io import read_volume
    from volsynth.data.manifest import load_manifest
    from volsynth.data.preprocess import Preprocessor, PreprocessRecord
    from volsynth.experiment import load_config
    from volsynth.metrics import psnr
    from volsynth.run import RunFolder

    folder = RunFolder.of(run).final()
    if not folder.config.is_file():
        return None
    config = load_config(folder.config)
    val = json.loads(folder.splits.read_text())["val"]
    if not val:
        return None
    subject = load_manifest(config.data.manifest).by_name()[val[0]]
    ideal = subject.ideal(config.data.target or "")
    entries = sorted(folder.cache.glob(f"{val[0]}-*/record.json")) if folder.cache.is_dir() else []
    if ideal is None or not entries:
        return None
    record = PreprocessRecord.from_dict(json.loads(entries[0].read_text()))
    target = np.load(entries[0].parent / "target.npy")
    ideal_array = Preprocessor(config.data, spacing=config.data.spacing).apply(read_volume(ideal), record, "target")
    return psnr(ideal_array, target, data_range=1.0)


def curve(run: Path) -> list[tuple[float, int, float, float, str]]:
    """(training seconds, iteration, psnr, ssim, stage) over every stage of a run, stage times added up."""
    from volsynth.run import RunFolder

    folders = RunFolder.of(run).stages() or [RunFolder.of(run)]
    points, offset = [], 0.0
    for folder in folders:
        if not folder.validation.is_file():
            continue
        rows = list(csv.DictReader(folder.validation.open()))
        for row in rows:
            seconds = float(row.get("train_seconds") or row["seconds"])
            points.append((offset + seconds, int(row["iteration"]), float(row["psnr"]), float(row["ssim"]),
                           folder.root.name.partition("-")[2] if folder.root != run else ""))  # "2-slice"
        if rows:
            offset += float(rows[-1].get("train_seconds") or rows[-1]["seconds"])
    return points


def seconds_to(points: list[tuple[float, int, float, float, str]], level: float) -> float | None:
    return next((s for s, _, p, _, _ in points if p >= level), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default="all", help="comma-separated methods, or 'all'")
    parser.add_argument("--no-ablations", action="store_true", help="skip the flagship's ablations")
    parser.add_argument("--seconds", type=float, default=600.0, help="training budget per method")
    parser.add_argument("--val-every", type=int, default=50, help="iterations between validations")
    parser.add_argument("--parallel", type=int, default=max(1, (os.cpu_count() or 2)), help="runs at a time")
    parser.add_argument("--subjects", type=int, default=8)
    parser.add_argument("--spacing", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("ttq"))
    args = parser.parse_args()

    from volsynth.data.phantom import make_phantom_cohort
    from volsynth.methods import METHODS

    methods = METHODS.names() if args.methods == "all" else [m.strip() for m in args.methods.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    manifest = args.out / "phantom" / "manifest.json"
    if not manifest.is_file():
        manifest = make_phantom_cohort(args.out / "phantom", args.subjects, seed=args.seed, spacing=args.spacing,
                                       progress=False)
    pending = [job for job in jobs(methods, not args.no_ablations) if not (args.out / "runs" / job[0]).exists()]
    running: list[tuple[str, subprocess.Popen]] = []
    began = time.perf_counter()
    while pending or running:
        while pending and len(running) < args.parallel:
            label, preset, extra = pending.pop(0)
            print(f"[{time.perf_counter() - began:6.0f} s] start {label}", flush=True)
            running.append((label, launch(label, preset, extra, manifest, args.out, args.seconds, args.val_every,
                                          args.seed)))
        time.sleep(5)
        for label, process in list(running):
            if process.poll() is not None:
                print(f"[{time.perf_counter() - began:6.0f} s] {label} exited with {process.returncode}", flush=True)
                running.remove((label, process))

    rows, table, ceiling = [], [], None
    for label, _, _ in jobs(methods, not args.no_ablations):
        run = args.out / "runs" / label
        points = curve(run)
        ceiling = ceiling if ceiling is not None else ceiling_psnr(run)
        rows += [{"method": label, "stage": stage, "train_seconds": round(s, 1), "iteration": i, "psnr": round(p, 3),
                  "ssim": round(q, 4)} for s, i, p, q, stage in points]
        points = [point for point in points if point[4] not in RECONSTRUCTION_STAGES]
        best = max((p for _, _, p, _, _ in points), default=float("nan"))
        reach = [seconds_to(points, ceiling - gap) if ceiling is not None else None for gap in (6, 4, 2)]
        table.append((label, best, *reach))
    with (args.out / "ttq.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["method", "stage", "train_seconds", "iteration", "psnr", "ssim"])
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, ceiling, args.out / "ttq.png")
    print(f"\nceiling (ideal image vs validation target): {ceiling:.2f} dB" if ceiling else "\nno ceiling")
    print(f"budget {args.seconds:g} s per method, {args.parallel} at a time, 1 thread each")
    print("| method | best val PSNR (dB) | s to ceiling − 6 dB | − 4 dB | − 2 dB |")
    print("|---|---|---|---|---|")
    for label, best, *reach in table:
        cells = [f"{r:.0f}" if r is not None else "not reached" for r in reach]
        print(f"| {label} | {best:.2f} | " + " | ".join(cells) + " |")


def plot(rows: list[dict], ceiling: float | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 4.5), dpi=110)
    for label in dict.fromkeys(r["method"] for r in rows):
        ranked = [(r["train_seconds"], r["psnr"]) for r in rows
                  if r["method"] == label and r["stage"] not in RECONSTRUCTION_STAGES]
        line, = axis.plot(*zip(*ranked, strict=True), marker=".", label=label)
        reconstruction = [(r["train_seconds"], r["psnr"]) for r in rows
                          if r["method"] == label and r["stage"] in RECONSTRUCTION_STAGES]
        if reconstruction:
            axis.plot(*zip(*reconstruction, strict=True), marker=".", linestyle=":", color=line.get_color(),
                      label=f"{label} ({'/'.join(sorted(RECONSTRUCTION_STAGES))}: reconstruction)")
    if ceiling is not None:
        axis.axhline(ceiling, color="k", linestyle="--", linewidth=1, label="phantom ceiling")
        for gap in (6, 4, 2):
            axis.axhline(ceiling - gap, color="0.7", linestyle=":", linewidth=0.8)
    axis.set_xlabel("training seconds (1 CPU thread, validation excluded)")
    axis.set_ylabel("validation PSNR (dB)")
    axis.legend(fontsize=7, ncol=2)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)


if __name__ == "__main__":
    main()
