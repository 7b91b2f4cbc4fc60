"""The ``volsynth`` command line. Each subcommand is a thin layer over a library function of the same name.

Imports are lazy: ``volsynth --help`` and usage errors answer without loading torch or MONAI. User errors
(:class:`volsynth.errors.VolsynthError`) print one line naming the file or option and exit with status 2; anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations

import json
import shlex
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from volsynth import __version__

app = typer.Typer(
    name="volsynth",
    help="3D cross-modality medical image translation. Data: inspect, phantom. Training: train, methods. "
    "Inference: predict. Evaluation: evaluate, downstream, report. Everything: demo.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


class Split(StrEnum):
    train = "train"
    val = "val"
    test = "test"


class Which(StrEnum):
    last = "last"
    best = "best"


class Precision(StrEnum):
    fp32 = "fp32"
    bf16 = "bf16"
    auto = "auto"


class Protocol(StrEnum):
    tissue = "tissue"
    segment = "segment"


def _echo(text: str) -> None:
    typer.echo(text)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"volsynth {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit")] = False,
) -> None:
    """3D cross-modality medical image translation."""


# ----------------------------------------------------------------------------------------------------------------
@app.command(epilog="Example: volsynth inspect data/BraTS2021 --source t2 --target flair --out manifest.json")
def inspect(
    path: Annotated[Path, typer.Argument(help="Dataset folder (BraTS, SynthRAD2023, IXI, <subject>/<modality>) "
                                              "or a JSON/CSV manifest")],
    source: Annotated[str, typer.Option(help="Source modality name, e.g. t1, mr, cbct")],
    target: Annotated[str, typer.Option(help="Target modality name, e.g. t2, ct")],
    out: Annotated[Path | None, typer.Option(help="Write the manifest (with splits) here")] = None,
    resample_target: Annotated[bool, typer.Option(help="Accept target grids that differ from the source")] = False,
    split: Annotated[str, typer.Option(help="paper | kfold | random | manifest (test = index % folds == fold)")
                     ] = "paper",
    folds: Annotated[int, typer.Option(help="Number of folds (paper: 4 → 75/25)")] = 4,
    fold: Annotated[int, typer.Option(help="Which fold is the test set")] = 0,
    seed: Annotated[int, typer.Option(help="Seed for shuffled splits")] = 0,
    fingerprint_json: Annotated[Path | None, typer.Option("--json", help="Also write the fingerprint as JSON")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out manifest")] = False,
) -> None:
    """Find subjects, check every file, print an nnU-Net-style fingerprint and write a manifest.

    The manifest records the task (--source, --target) and the split; `volsynth train` takes them from there.

    Exits with status 1 when any error-level problem was found (all problems are listed, not only the first).
    """
    from volsynth.config import SplitConfig, from_dict
    from volsynth.data.discovery import discover, inspect_cohort
    from volsynth.data.manifest import save_manifest
    from volsynth.errors import OutputError
    from volsynth.utils import atomic_write_text

    for destination in (out, fingerprint_json):
        if destination is not None and destination.exists() and not overwrite:
            raise OutputError(f"{destination} exists; pass --overwrite to replace it")
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
    source: Annotated[str, typer.Option(help="Source contrast written to the manifest (what train translates "
                                             "from)")] = "t1",
    target: Annotated[str, typer.Option(help="Target contrast written to the manifest (what train translates "
                                             "to)")] = "t2",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Write into a folder that holds other files (an "
                                                                "existing manifest.json is replaced; other files "
                                                                "are kept)")] = False,
    ideal: Annotated[bool, typer.Option(help="Also write each image's noise-free expected ('ideal') image, which "
                                             "evaluate scores as the ceiling (about a third more CPU time)")] = True,
) -> None:
    """Simulate a paired multi-contrast brain MRI cohort with lesions and labels from the ICBM152 template.

    Writes per subject the noisy images, their noise-free expected ("ideal") images, label maps and a mask, and a
    manifest.json with the source/target contrasts and the paper's train/val/test split (every 4th subject is a
    test subject), so `volsynth train --data OUT/manifest.json` trains what the manifest says.
    """
    from volsynth.data.phantom import make_phantom_cohort

    manifest = make_phantom_cohort(out, subjects, seed=seed, spacing=spacing, lesion_probability=lesions,
                                   contrasts=[c.strip() for c in contrasts.split(",") if c.strip()],
                                   noise_percent=noise, montage=montage, progress=True, source=source,
                                   target=target, overwrite=overwrite, ideal=ideal)
    _echo(f"Phantom cohort of {subjects} subjects ({source} → {target}) written to {out} (manifest: {manifest})")


# ----------------------------------------------------------------------------------------------------------------
@app.command(epilog="Examples:\n\n  volsynth train --config mdagan-cpu --data phantom/manifest.json --out "
                    "runs/mdagan\n\n  volsynth train --config make_a_volume-cpu --data phantom/manifest.json "
                    "--out runs/mav  (all stages)\n\n  volsynth train --out runs/mdagan --resume --set "
                    "train.iterations=2000")
def train(
    out: Annotated[Path, typer.Option(help="Run folder: new or empty (checkpoints, logs, resolved config)")],
    config: Annotated[str | None, typer.Option(help="YAML file or preset name (see `volsynth methods`)")] = None,
    data: Annotated[Path | None, typer.Option(help="Manifest (shorthand for --set data.manifest=...)")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", metavar="KEY=VALUE",
                                                   help="Override, e.g. train.lr=2e-4 (repeatable)")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out from its last checkpoint")] = False,
) -> None:
    """Train a method with the one trainer.

    Source, target and split come from the manifest (what `volsynth inspect`/`phantom` wrote); a config that
    names others is refused unless it sets data.override_manifest=true. A preset with stages trains them all in
    order into OUT/<n>-<stage>/ unless --set method.stage=NAME picks one.
    """
    from volsynth.training.stages import plan, single, train_stages
    from volsynth.training.trainer import train as run_training

    overrides = list(set_ or [])
    if data is not None:
        overrides.insert(0, f"data.manifest={data.resolve()}")
    provenance = {"command": shlex.join(["volsynth", *sys.argv[1:]]) if sys.argv[1:2] == ["train"] else None,
                  "config": config, "overrides": overrides}
    if config is None:
        saved = out / "config.yaml"
        if not resume:
            raise typer.BadParameter("--config is required (except with --resume on an existing run)")
        if not saved.is_file() and not (out / "stages.json").is_file():
            raise typer.BadParameter(f"--resume: {out} holds no run (no config.yaml); pass --config too")
        if saved.is_file():
            config = str(saved)
    if config is None:  # a staged run resumed without --config: each stage resumes from its own config.yaml
        stages = json.loads((out / "stages.json").read_text())["stages"]
        for stage in stages:
            folder = out / stage["folder"]
            if (folder / "config.yaml").is_file():
                run_training(single(str(folder / "config.yaml"), overrides), folder, resume=True, echo=_echo,
                             provenance=provenance)
        return
    plans = plan(config, overrides)
    if plans is not None:
        train_stages(plans, out, resume=resume, echo=_echo, provenance=provenance)
        return
    run_training(single(config, overrides), out, resume=resume, echo=_echo, provenance=provenance)


@app.command(epilog="Example: volsynth methods --config mdagan-paper")
def methods(
    config: Annotated[str | None, typer.Option(help="Count parameters for this preset's method settings")] = None,
) -> None:
    """List registered methods, their networks' parameter counts (default settings or a preset) and presets."""
    import torch

    from volsynth.config import preset_names
    from volsynth.experiment import load_config
    from volsynth.methods import METHODS, build_method

    chosen = load_config(config) if config else None
    rows = []
    for name in METHODS.names():
        cls = METHODS.get(name)
        if chosen is not None and chosen.method.name != name:
            continue
        presets = [p for p in preset_names() if p.startswith(f"{name}-")]
        method_config = chosen.method if chosen is not None else (
            load_config(presets[0]).method if presets else cls.config_class())
        try:
            with torch.device("meta"):  # counting parameters needs shapes only; frozen feature nets are not counted
                counts = build_method(method_config, inference=True).parameter_counts()
            sizes = ", ".join(f"{k} {v / 1e6:.3f} M" for k, v in counts.items())
        except Exception as error:  # a listing must not fail on one method's optional weights
            sizes = f"(cannot build: {error})"
        kind = "paired" if cls.requires_paired_data else "unpaired"
        items = "/".join(cls.sampling_kinds) + (", stochastic" if cls.stochastic else "")
        rows.append(f"{name:18s} {kind:8s} {items}\n{'':18s} {cls.description}\n{'':18s} {sizes}\n{'':18s} "
                    f"presets: {', '.join(presets) or '-'}")
    _echo("\n".join(rows) if rows else "no methods registered")


@app.command(epilog="Examples:\n\n  volsynth predict --run runs/mdagan --input phantom/manifest.json --split test "
                    "--out runs/mdagan/predictions\n\n  volsynth predict --run runs/mav --input scan_t1.nii.gz --out "
                    "out --seed 0 --steps 50\n\n  volsynth predict ... --shard $SLURM_ARRAY_TASK_ID/"
                    "$SLURM_ARRAY_TASK_COUNT  (one share of the subjects per array task)")
def predict(
    input_: Annotated[Path, typer.Option("--input", help="Image file, DICOM folder, folder of images, or manifest "
                                                         "(only the model's source modality is translated)")],
    out: Annotated[Path, typer.Option(help="Output folder: <name>_synthetic-<target>.nii.gz + a JSON sidecar each")],
    run: Annotated[Path | None, typer.Option(help="Run folder (uses checkpoints/<which>.pt of its last stage)")
                   ] = None,
    checkpoint: Annotated[Path | None, typer.Option(help="Checkpoint file (instead of --run)")] = None,
    which: Annotated[Which, typer.Option(help="Checkpoint of --run")] = Which.last,
    split: Annotated[Split | None, typer.Option(help="With a manifest and --run: only this split")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")] = "auto",
    overlap: Annotated[float | None, typer.Option(help="Sliding-window overlap (default: the config's)")] = None,
    sw_batch_size: Annotated[int | None, typer.Option(min=1, help="Windows or slabs per forward pass")] = None,
    precision: Annotated[Precision | None, typer.Option(help="auto = bf16 where the hardware has it")] = None,
    seed: Annotated[int | None, typer.Option(help="Stochastic methods: same seed, same output (default 0)")] = None,
    steps: Annotated[int | None, typer.Option(min=1, help="Stochastic methods: sampling steps")] = None,
    shard: Annotated[str | None, typer.Option(help="K/N: translate only share K of N (cluster array jobs)")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace existing predictions in --out")] = False,
    compile_network: Annotated[bool | None, typer.Option(
        "--compile/--no-compile", help="torch.compile with frozen weights: a one-off compile of 1-3 min, then "
                                       "the same outputs (8% faster per paper-size volume on a 2-core AVX2 CPU); "
                                       "needs a C++ compiler (default: the config's)")
                               ] = None,
    mirror_axes: Annotated[str | None, typer.Option(
        help="Test-time mirroring (nnU-Net's): average the predictions of the input flipped along every subset of "
             "these axes, e.g. 0 (x, 2 passes) or 0,1,2 (8 passes); none = off (default: the config's)")] = None,
) -> None:
    """Translate volumes with a trained checkpoint, back onto each input's own grid and units.

    Synthetic MR is written on the normalised [0, 1] scale; synthetic CT/CBCT in HU. Every output is marked
    synthetic (NIfTI descrip + JSON sidecar) and never takes an input's file name.
    """
    from volsynth.errors import ConfigError
    from volsynth.inference.predict import parse_axes, parse_shard, resolve_checkpoint
    from volsynth.inference.predict import predict as run_predict
    from volsynth.run import RunFolder

    subjects = None
    if split is not None:
        if run is None:
            raise ConfigError("--split needs --run (the run's splits.json says which subjects are in it)")
        subjects = RunFolder.of(run).read_splits()[split.value]
    path = resolve_checkpoint(run, checkpoint, which.value)
    written = run_predict(path, input_, out, device=device, overlap=overlap, sw_batch_size=sw_batch_size,
                          precision=precision.value if precision else None, subjects=subjects, seed=seed,
                          steps=steps, shard=parse_shard(shard), overwrite=overwrite,
                          compile_network=compile_network, mirror_axes=parse_axes(mirror_axes))
    _echo(f"Wrote {len(written)} synthetic volume(s) to {out}")


@app.command(epilog="Example: volsynth evaluate --pred runs/mdagan/predictions --target phantom/manifest.json "
                    "--out runs/mdagan/evaluation")
def evaluate(
    pred: Annotated[Path, typer.Option(help="Predictions folder from `volsynth predict` (its predictions.json), or "
                                            "a folder of <subject>.nii.gz / <subject>_synthetic-<modality>.nii.gz")],
    target: Annotated[Path, typer.Option(help="Folder of targets <subject>.nii.gz, or a manifest")],
    out: Annotated[Path, typer.Option(help="Output folder for metrics.csv, summary.json (and ceiling.csv)")],
    mask: Annotated[Path | None, typer.Option(help="Folder of masks <subject>.nii.gz (default: manifest masks)")
                    ] = None,
    profile: Annotated[str, typer.Option(help="paper | synthrad2023")] = "paper",
    target_modality: Annotated[str | None, typer.Option(help="Target modality in the manifest (default: the "
                                                              "manifest's target, else the predictions'); must be "
                                                              "the modality the predictions synthesise")] = None,
    modality: Annotated[str | None, typer.Option(help="mr | ct: units of the volumes (default: mr for the paper "
                                                      "profile, ct for synthrad2023)")] = None,
    normalise: Annotated[str | None, typer.Option(
        help="paper | target | none: how MR volumes are brought to [0, 1] for the paper profile. paper (the "
             "default for MR; what the paper's evaluate_iqa.py does): target AND prediction each min-max "
             "normalised per volume. target: only the target (predictions taken to be on [0, 1] already). none: "
             "as given (the default for CT, which uses a fixed HU window)")] = None,
    lpips_backbone: Annotated[str | None, typer.Option(help="LPIPS: VGG-16 weights (local .pth or 'imagenet' "
                                                            "from the torch hub cache); off when not given")] = None,
    lpips_linear: Annotated[str | None, typer.Option(help="LPIPS: the lpips package's vgg.pth (local path or "
                                                          "'hub')")] = "hub",
) -> None:
    """Image-quality metrics per subject (SSIM, PSNR, NMSE, MAE, masked variants, LPIPS when available).

    With a phantom manifest, the noise-free ideal image of the target is scored the same way: the best any model
    can do (the ceiling), and how far the predictions are from it.
    """
    from volsynth.evaluation.evaluate import evaluate_predictions
    from volsynth.evaluation.lpips import LPIPSConfig

    lpips = LPIPSConfig(backbone_weights=lpips_backbone, linear_weights=lpips_linear) if lpips_backbone else None
    result = evaluate_predictions(pred, target, out_dir=out, mask=mask, profile=profile, modality=modality,
                                  target_modality=target_modality, normalise=normalise, lpips=lpips, progress=True)
    summary = result.summary
    _echo(f"{summary['n_subjects']} subject(s), {summary['prediction_modality'] or 'predictions'} vs "
          f"{summary['target_modality'] or 'targets'}, profile {summary['profile']}, normalise "
          f"{summary['normalise']}{', in mask' if summary['mask'] else ''}")
    for metric, stats in summary.items():
        if isinstance(stats, dict) and stats.get("mean") is not None:
            spread = f" ± {stats['std']:.4f}" if stats.get("std") is not None else ""
            _echo(f"{metric:10s} {stats['mean']:.4f}{spread} (n={stats['n']})")
        elif isinstance(stats, dict) and stats.get("available") is False:
            _echo(f"{metric:10s} unavailable: {stats.get('reason')}")
    ceiling, distance = summary.get("ceiling"), summary.get("distance_to_ceiling")
    if ceiling and distance:
        shown = [f"{name} {ceiling[name]['mean']:.4f}" for name in ("ssim", "psnr", "nmse", "ssim_mask", "psnr_mask",
                                                                    "nmse_mask")
                 if name in ceiling and ceiling[name].get("mean") is not None]
        _echo(f"ideal (phantom ceiling): {', '.join(shown)} (n={distance['n']})")
        parts = []
        if distance.get("psnr_db_below") is not None:
            parts.append(f"PSNR {distance['psnr_db_below']:.2f} dB below the ideal")
        if distance.get("nmse_ratio") is not None:
            parts.append(f"NMSE {distance['nmse_ratio']:.2f}× the ideal's")
        if distance.get("masked_nmse_ratio") is not None:
            parts.append(f"masked NMSE {distance['masked_nmse_ratio']:.2f}×")
        _echo(f"distance to ceiling: {'; '.join(parts) or 'undefined'}")
    _echo(f"Metrics written to {out}")


@app.command(epilog="Example: volsynth report --runs runs/mdagan runs/regression_unet --out report")
def report(
    runs: Annotated[list[Path], typer.Option(metavar="RUN", help="Run folders to compare (--runs A B C)")],
    out: Annotated[Path, typer.Option(help="Output folder for index.html and PNGs")],
    more_runs: Annotated[list[Path] | None, typer.Argument(metavar="[RUN]...", help="More run folders",
                                                           show_default=False)] = None,
    subjects: Annotated[int, typer.Option(min=0, help="Subjects shown in tri-planar figures")] = 3,
) -> None:
    """A static HTML comparison (Table-1 style, per-subject table, ceiling, figures, training curves)."""
    from volsynth.evaluation.report import build_report

    index = build_report([*runs, *(more_runs or [])], out, subjects_to_show=subjects)
    _echo(f"Report: {index}")


@app.command(epilog="Example: volsynth downstream --run runs/mdagan --protocol tissue")
def downstream(
    run: Annotated[Path, typer.Option(help="Run folder with predictions/ (from volsynth predict)")],
    protocol: Annotated[Protocol, typer.Option(help="tissue: a fixed segmenter on real vs synthetic (Dice, VS); "
                                                    "segment: train a UNet on synthetic, test on real")
                        ] = Protocol.tissue,
    out: Annotated[Path | None, typer.Option(help="Output folder (default RUN/downstream)")] = None,
    iterations: Annotated[int, typer.Option(min=1, help="Segmenter training iterations (protocol segment)")] = 200,
) -> None:
    """Synthetic-to-real evaluation: does the synthetic scan work for segmentation?"""
    from volsynth.evaluation.downstream import format_summary, run_downstream

    summary = run_downstream(run, protocol=protocol.value, out_dir=out, iterations=iterations)
    _echo(format_summary(summary))


@app.command(epilog="Example: volsynth demo --out demo_output --seed 0")
def demo(
    out: Annotated[Path, typer.Option(help="Output folder")] = Path("demo_output"),
    seed: Annotated[int, typer.Option(help="Phantom and training seed")] = 0,
    subjects: Annotated[int | None, typer.Option(min=4, help="Phantom subjects (default: the demo's)")] = None,
    iterations: Annotated[int | None, typer.Option(min=1, help="Training iterations per method")] = None,
    spacing: Annotated[float | None, typer.Option(help="Phantom voxel size in mm (coarser = faster)")] = None,
    methods_: Annotated[str | None, typer.Option("--methods", help="Comma-separated methods to train and compare")
                        ] = None,
) -> None:
    """The main job: phantom cohort → train → predict the test subjects → evaluate → HTML report."""
    from volsynth.demo import run_demo

    index = run_demo(out, seed=seed, subjects=subjects, iterations=iterations, spacing=spacing,
                     methods=[m.strip() for m in methods_.split(",") if m.strip()] if methods_ else None)
    _echo(f"Demo finished. Open the report: {index}")


# ----------------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    """Entry point: user errors print one clear line (no traceback) and exit with status 2."""
    from volsynth.errors import VolsynthError
    from volsynth.utils import keep_freed_memory

    keep_freed_memory()  # before torch allocates: 3D convolutions stop page-faulting their buffers back in
    try:
        # click returns Exit codes (rather than raising) when not in standalone mode
        result = app(args=argv, standalone_mode=False)
        if isinstance(result, int):
            return result
    except typer.Exit as exit_:
        return int(exit_.exit_code or 0)
    except VolsynthError as error:
        message = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
        typer.echo(f"error: {' '.join(message.split())}", err=True)
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
