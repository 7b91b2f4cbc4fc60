"""The ``volsynth`` command line. Each subcommand is a thin layer over a library function of the same name."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    name="volsynth",
    help="3D cross-modality medical image translation: inspect data, make a phantom cohort, train, predict, "
    "evaluate and compare methods.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _echo(text: str) -> None:
    typer.echo(text)


# ----------------------------------------------------------------------------------------------------------------
@app.command(epilog="Example: volsynth inspect data/BraTS2021 --source t2 --target flair --out manifest.json")
def inspect(
    path: Annotated[Path, typer.Argument(help="Dataset folder (BraTS, SynthRAD2023, IXI, <subject>/<modality>) "
                                              "or a JSON/CSV manifest")],
    source: Annotated[str, typer.Option(help="Source modality name, e.g. t1, mr, cbct")],
    target: Annotated[str, typer.Option(help="Target modality name, e.g. t2, ct")],
    out: Annotated[Path | None, typer.Option(help="Write the manifest (with splits) here")] = None,
    resample_target: Annotated[bool, typer.Option(help="Accept target grids that differ from the source")] = False,
    split: Annotated[str, typer.Option(help="paper | kfold | random | manifest")] = "paper",
    folds: Annotated[int, typer.Option(help="Number of folds (paper: 4 → 75/25)")] = 4,
    fold: Annotated[int, typer.Option(help="Which fold is the test set")] = 0,
    seed: Annotated[int, typer.Option(help="Seed for shuffled splits")] = 0,
    fingerprint_json: Annotated[Path | None, typer.Option("--json", help="Also write the fingerprint as JSON")] = None,
) -> None:
    """Find subjects, check every file, print an nnU-Net-style fingerprint and write a manifest.

    Exits with status 1 when any error-level problem was found (all problems are listed, not only the first).
    """
    from volsynth.config import SplitConfig, from_dict
    from volsynth.data.discovery import discover, inspect_cohort
    from volsynth.data.manifest import save_manifest
    from volsynth.utils import atomic_write_text

    split_config = from_dict(SplitConfig, {"mode": split, "folds": folds, "fold": fold, "seed": seed}, "split")
    manifest = discover(path, source=source, target=target)
    fingerprint = inspect_cohort(manifest, source=source, target=target, resample_target=resample_target,
                                 split=split_config, root=path)
    _echo(fingerprint.render())
    if out is not None:
        membership = {name: part for part, names in fingerprint.splits.items() for name in names}
        for subject in manifest.subjects:
            subject.split = membership.get(subject.subject)
        manifest.info["fingerprint"] = {k: v for k, v in fingerprint.to_dict().items() if k != "problems"}
        manifest.info["problems"] = [str(p) for p in fingerprint.problems]
        save_manifest(manifest, out)
        _echo(f"Manifest written to {out}")
    if fingerprint_json is not None:
        atomic_write_text(fingerprint_json, json.dumps(fingerprint.to_dict(), indent=2) + "\n")
    if fingerprint.errors:
        raise typer.Exit(1)


# ----------------------------------------------------------------------------------------------------------------
@app.command(epilog="Example: volsynth phantom --out phantom --subjects 20 --seed 0 --spacing 2")
def phantom(
    out: Annotated[Path, typer.Option(help="Output folder (BraTS-like tree + manifest.json)")],
    subjects: Annotated[int, typer.Option(help="Number of subjects")] = 10,
    seed: Annotated[int, typer.Option(help="Random seed (same seed → byte-identical files)")] = 0,
    spacing: Annotated[float, typer.Option(help="Isotropic voxel size in mm (1 = template resolution)")] = 2.0,
    lesions: Annotated[float, typer.Option(help="Probability that a subject has lesions")] = 0.5,
    contrasts: Annotated[str, typer.Option(help="Comma-separated contrasts")] = "t1,t2,pd,flair,t1ce",
    noise: Annotated[float, typer.Option(help="Rician noise level in percent of the reference signal")] = 3.0,
    montage: Annotated[bool, typer.Option(help="Write a tri-planar PNG per subject")] = True,
) -> None:
    """Simulate a paired multi-contrast brain MRI cohort with lesions and labels from the ICBM152 template."""
    from volsynth.data.phantom import make_phantom_cohort

    manifest = make_phantom_cohort(out, subjects, seed=seed, spacing=spacing, lesion_probability=lesions,
                                   contrasts=[c.strip() for c in contrasts.split(",") if c.strip()],
                                   noise_percent=noise, montage=montage, progress=True)
    _echo(f"Phantom cohort of {subjects} subjects written to {out} (manifest: {manifest})")


# ----------------------------------------------------------------------------------------------------------------
@app.command(epilog="Example: volsynth train --config mdagan-cpu --data phantom/manifest.json --out runs/mdagan "
                    "--set train.iterations=500")
def train(
    out: Annotated[Path, typer.Option(help="Run folder (checkpoints, logs, resolved config)")],
    config: Annotated[str | None, typer.Option(help="YAML file or preset name from configs/ (see `volsynth methods`)"
                                               )] = None,
    data: Annotated[Path | None, typer.Option(help="Manifest (shorthand for --set data.manifest=...)")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override, e.g. train.lr=2e-4 (repeatable)")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out from its last checkpoint")] = False,
) -> None:
    """Train a method with the one trainer."""
    from volsynth.config import load_config
    from volsynth.training.trainer import train as run_training

    overrides = list(set_ or [])
    if data is not None:
        overrides.insert(0, f"data.manifest={data.resolve()}")
    if config is None:
        saved = out / "config.yaml"
        if not (resume and saved.is_file()):
            raise typer.BadParameter("--config is required (except with --resume on a run that has config.yaml)")
        config = str(saved)
    experiment = load_config(config, overrides)
    result = run_training(experiment, out, resume=resume)
    _echo(f"Trained {experiment.method.name} for {result.iterations} iterations in {result.seconds:.1f} s; "
          f"checkpoints in {out / 'checkpoints'}")


@app.command(epilog="Example: volsynth methods --config configs/mdagan-paper.yaml")
def methods(
    config: Annotated[str | None, typer.Option(help="Count parameters for this preset's method settings")] = None,
) -> None:
    """List registered methods and their networks' parameter counts (default settings or a preset)."""
    import torch

    from volsynth.config import PRESET_DIR, load_config
    from volsynth.methods import METHODS, build_method

    chosen = load_config(config) if config else None
    rows = []
    for name in METHODS.names():
        cls = METHODS.get(name)
        if chosen is not None and chosen.method.name != name:
            continue
        method_config = chosen.method if chosen is not None else cls.config_class()
        try:
            with torch.device("meta"):  # counting parameters needs shapes only; frozen feature nets are not counted
                counts = build_method(method_config, inference=True).parameter_counts()
            sizes = ", ".join(f"{k} {v / 1e6:.3f} M" for k, v in counts.items())
        except Exception as error:  # e.g. perception weights unavailable for a preset
            sizes = f"(cannot build: {error})"
        presets = sorted(p.stem for p in PRESET_DIR.glob(f"{name}-*.yaml")) if PRESET_DIR.is_dir() else []
        paired = "paired" if cls.requires_paired_data else "unpaired"
        rows.append(f"{name:18s} {paired:8s} {sizes}\n{'':18s} {cls.description}\n{'':18s} presets: "
                    f"{', '.join(presets) or '-'}")
    _echo("\n".join(rows) if rows else "no methods registered")


# ----------------------------------------------------------------------------------------------------------------
@app.command(epilog="Example: volsynth predict --run runs/mdagan --input phantom/manifest.json --split test "
                    "--out runs/mdagan/predictions")
def predict(
    input_: Annotated[Path, typer.Option("--input", help="Image file, DICOM folder, folder of images, or manifest")],
    out: Annotated[Path, typer.Option(help="Output folder (one volume per input, named after it)")],
    run: Annotated[Path | None, typer.Option(help="Run folder (uses checkpoints/<which>.pt)")] = None,
    checkpoint: Annotated[Path | None, typer.Option(help="Checkpoint file (instead of --run)")] = None,
    which: Annotated[str, typer.Option(help="last | best (with --run)")] = "last",
    split: Annotated[str | None, typer.Option(help="With a manifest and --run: only this split (train/val/test)")
                     ] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    overlap: Annotated[float | None, typer.Option(help="Sliding-window overlap (default from the config: 0.625)")
                       ] = None,
    sw_batch_size: Annotated[int | None, typer.Option(help="Windows per forward pass")] = None,
    precision: Annotated[str | None, typer.Option(help="fp32 | bf16")] = None,
) -> None:
    """Translate volumes with a trained checkpoint, back onto each input's own grid and units."""
    from volsynth.inference.predict import predict as run_predict
    from volsynth.inference.predict import resolve_checkpoint

    if precision not in (None, "fp32", "bf16"):
        raise typer.BadParameter(f"--precision must be fp32 or bf16, got {precision}")
    subjects = None
    if split is not None:
        if run is None:
            raise typer.BadParameter("--split needs --run (its splits.json)")
        subjects = json.loads((run / "splits.json").read_text())[split]
    path = resolve_checkpoint(run, checkpoint, which)
    written = run_predict(path, input_, out, device=device, overlap=overlap, sw_batch_size=sw_batch_size,
                          precision=precision, subjects=subjects)
    _echo(f"Wrote {len(written)} synthetic volume(s) to {out}")


@app.command(epilog="Example: volsynth evaluate --pred runs/mdagan/predictions --target phantom/manifest.json "
                    "--out runs/mdagan/evaluation")
def evaluate(
    pred: Annotated[Path, typer.Option(help="Folder of predictions named <subject>.nii.gz")],
    target: Annotated[Path, typer.Option(help="Folder of targets with the same names, or a manifest")],
    out: Annotated[Path, typer.Option(help="Output folder for metrics.csv and summary.json")],
    mask: Annotated[Path | None, typer.Option(help="Folder of masks <subject>.nii.gz (default: manifest masks)")
                    ] = None,
    profile: Annotated[str, typer.Option(help="paper | synthrad2023")] = "paper",
    target_modality: Annotated[str | None, typer.Option(help="Target modality in the manifest (default: the "
                                                              "manifest's target)")] = None,
    modality: Annotated[str | None, typer.Option(help="mr | ct: units of the volumes (default: mr for the paper "
                                                      "profile, ct for synthrad2023)")] = None,
    normalise: Annotated[str | None, typer.Option(help="none | minmax: how an MR target is brought to [0, 1] for "
                                                       "the paper profile (default: minmax for MR, none for CT)")
                         ] = None,
    lpips_backbone: Annotated[str | None, typer.Option(help="LPIPS: VGG-16 weights (local .pth or 'imagenet' "
                                                            "from the torch hub cache); off when not given")] = None,
    lpips_linear: Annotated[str | None, typer.Option(help="LPIPS: the lpips package's vgg.pth (local path or "
                                                          "'hub')")] = "hub",
) -> None:
    """Image-quality metrics per subject (SSIM, PSNR, NMSE, MAE, masked variants, LPIPS when available)."""
    from volsynth.evaluation.evaluate import evaluate_predictions
    from volsynth.evaluation.lpips import LPIPSConfig

    if normalise is None:
        normalise = "minmax" if profile == "paper" and modality in (None, "mr") else "none"
    lpips = LPIPSConfig(backbone_weights=lpips_backbone, linear_weights=lpips_linear) if lpips_backbone else None
    result = evaluate_predictions(pred, target, out_dir=out, mask=mask, profile=profile, modality=modality,
                                  target_modality=target_modality, normalise=normalise, lpips=lpips, progress=True)
    for metric, stats in result.summary.items():
        if isinstance(stats, dict) and stats.get("mean") is not None:
            spread = f" ± {stats['std']:.4f}" if stats.get("std") is not None else ""
            _echo(f"{metric:10s} {stats['mean']:.4f}{spread} (n={stats['n']})")
        elif isinstance(stats, dict) and stats.get("available") is False:
            _echo(f"{metric:10s} unavailable: {stats.get('reason')}")
    _echo(f"Metrics written to {out}")


@app.command(epilog="Example: volsynth report --runs runs/mdagan runs/regression_unet --out report")
def report(
    runs: Annotated[list[Path], typer.Option(help="Run folders to compare (--runs A B C or --runs A --runs B)")],
    out: Annotated[Path, typer.Option(help="Output folder for index.html and PNGs")],
    more_runs: Annotated[list[Path] | None, typer.Argument(help="More run folders", show_default=False)] = None,
    subjects: Annotated[int, typer.Option(help="Subjects shown in tri-planar figures")] = 3,
) -> None:
    """A static HTML comparison (Table-1 style, box plots, tri-planar figures, training curves)."""
    from volsynth.evaluation.report import build_report

    index = build_report([*runs, *(more_runs or [])], out, subjects_to_show=subjects)
    _echo(f"Report: {index}")


@app.command(epilog="Example: volsynth downstream --run runs/mdagan --protocol tissue")
def downstream(
    run: Annotated[Path, typer.Option(help="Run folder with predictions/ (from volsynth predict)")],
    protocol: Annotated[str, typer.Option(help="tissue (fixed GMM segmenter on real vs synthetic) | segment "
                                               "(train a UNet on synthetic, test on real)")] = "tissue",
    out: Annotated[Path | None, typer.Option(help="Output folder (default RUN/downstream)")] = None,
    iterations: Annotated[int, typer.Option(help="Segmenter training iterations (protocol 'segment')")] = 200,
) -> None:
    """Synthetic-to-real evaluation: does the synthetic scan work for segmentation?"""
    from volsynth.evaluation.downstream import run_downstream

    summary = run_downstream(run, protocol=protocol, out_dir=out, iterations=iterations)
    _echo(json.dumps(summary, indent=2))


@app.command(epilog="Example: volsynth demo --out demo_output")
def demo(
    out: Annotated[Path, typer.Option(help="Output folder")] = Path("demo_output"),
    subjects: Annotated[int, typer.Option(help="Phantom subjects")] = 8,
    iterations: Annotated[int, typer.Option(help="Training iterations per method")] = 600,
    spacing: Annotated[float, typer.Option(help="Phantom voxel size in mm (coarser = faster)")] = 3.0,
    methods_: Annotated[str, typer.Option("--methods", help="Comma-separated methods to train and compare")
                        ] = "mdagan,regression_unet",
) -> None:
    """The main job: phantom cohort → train → predict the test subjects → evaluate → HTML report."""
    from volsynth.demo import run_demo

    index = run_demo(out, subjects=subjects, iterations=iterations, spacing=spacing,
                     methods=[m.strip() for m in methods_.split(",") if m.strip()])
    _echo(f"Demo finished. Open the report: {index}")


# ----------------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    """Entry point: known user errors print one clear line (no traceback) and exit with status 2."""
    from volsynth.config import ConfigError
    from volsynth.data.io import VolumeError
    from volsynth.data.manifest import ManifestError
    from volsynth.training.checkpoint import CheckpointError

    try:
        # click returns Exit codes (rather than raising) when not in standalone mode
        result = app(args=argv, standalone_mode=False)
        if isinstance(result, int):
            return result
    except typer.Exit as exit_:
        return int(exit_.exit_code or 0)
    except (ConfigError, VolumeError, ManifestError, CheckpointError, FileNotFoundError, FileExistsError,
            ValueError, KeyError) as error:
        message = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
        typer.echo(f"error: {message}", err=True)
        return 2
    except Exception as error:
        # Usage errors from typer's (vendored) click carry their own formatting and exit code.
        if hasattr(error, "show") and isinstance(getattr(error, "exit_code", None), int):
            error.show()
            return int(error.exit_code)
        if type(error).__name__ == "Abort":
            return 1
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
