"""``volsynth predict``: checkpoint + native-geometry inputs → synthetic volumes on the inputs' grids.

Each input is preprocessed exactly as at training (the checkpoint's resolved config: orientation, working spacing,
intensity model, crop/pad), covered by the method's inferer (3D sliding windows or slabs along the slice axis),
and mapped back through the inverse preprocessing onto the input's own grid (shape, spacing, origin, direction).
Synthetic CT/CBCT returns to HU; synthetic MR stays on the normalised [0, 1] scale (a scanner scale cannot be
predicted).

What it writes, and never more: ``OUT/<name>_synthetic-<target>.nii.gz`` per input, marked synthetic in the
header (NIfTI ``descrip``) and in a JSON sidecar (method, checkpoint hash, config, version, date, input),
``OUT/predictions.json`` (the index ``evaluate`` reads) and ``OUT/config.yaml``. Every path is checked to be
inside ``OUT``; an existing output, an input, or another run's folder is never overwritten (``overwrite``
replaces earlier *predictions* only). Under ``torchrun`` or with ``shard=(k, n)`` each process translates its
share of the subjects; every subject is written once, atomically.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fcntl
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from volsynth import __version__
from volsynth.config import ExperimentConfig, save_config, to_dict
from volsynth.data.io import image_suffix, is_dicom_dir, read_volume, strip_image_suffix, write_volume
from volsynth.data.manifest import load_manifest
from volsynth.data.preprocess import Preprocessor, prediction_scaling
from volsynth.data.volume import Volume
from volsynth.errors import ConfigError, DataError, OutputError
from volsynth.experiment import file_digest, load_method
from volsynth.methods.base import TranslationMethod
from volsynth.run import RunFolder
from volsynth.utils import atomic_write_text, inside, native_bf16, resolve_device

INDEX = "predictions.json"
FORMAT = "volsynth-predictions"


@dataclass
class PredictionInput:
    name: str  # output stem (subject name for manifests)
    path: Path


def output_name(name: str, target: str, suffix: str = ".nii.gz") -> str:
    """``<name>_synthetic-<target><suffix>``: a synthetic scan never takes a real scan's file name."""
    return f"{name}_synthetic-{target}{suffix}"


def resolve_checkpoint(run: str | Path | None = None, checkpoint: str | Path | None = None,
                       which: str = "last") -> Path:
    """``--checkpoint`` wins; otherwise the run's ``checkpoints/{which}.pt`` (a staged run: its last stage)."""
    if checkpoint is not None:
        path = Path(checkpoint)
        if path.is_dir() and RunFolder.of(path).is_run():
            raise ConfigError(f"--checkpoint {path} is a run folder; use --run {path}")
        return path
    if run is None:
        raise ConfigError("give --run RUN_DIR or --checkpoint CKPT")
    if Path(run).is_file():
        raise ConfigError(f"--run {run} is a file; use --checkpoint {run}")
    folder = RunFolder.of(run)
    if not folder.root.is_dir():
        raise OutputError(f"{run}: run folder not found")
    path = folder.final().checkpoint(which)
    if not path.is_file():
        raise OutputError(f"{path}: no '{which}' checkpoint in run {run}")
    return path


def _modality_pattern(modality: str) -> re.Pattern[str]:
    # "<modality>", "<anything>_<modality>" or "<anything>-<modality>" (BraTS, SynthRAD, phantom, generic layouts)
    return re.compile(rf"(^|.*[_\-]){re.escape(modality)}$", re.IGNORECASE)


def collect_inputs(source: str | Path, *, modality: str, subjects: list[str] | None = None) -> list[PredictionInput]:
    """Inputs from a file, a DICOM series folder, a folder of image files, or a manifest (its ``modality``).

    A folder whose files name modalities (a subject folder: ``…_t1.nii.gz``, ``…_seg.nii.gz`` …) contributes
    only the files of the model's source ``modality``; label maps and other contrasts are never translated.
    """
    source = Path(source)
    if not source.exists():
        raise DataError(f"{source}: input not found")
    if source.is_file() and source.suffix.lower() in (".json", ".csv"):
        manifest = load_manifest(source)
        manifest.require(modality)
        chosen = [s for s in manifest.subjects if subjects is None or s.subject in subjects]
        missing = sorted(set(subjects or []) - {s.subject for s in chosen})
        if missing:
            raise DataError(f"{source}: subjects not in the manifest: {', '.join(missing)}")
        lacking = [s.subject for s in chosen if s.image(modality) is None]
        if lacking:
            raise DataError(f"{source}: subject(s) {', '.join(lacking[:5])} have no '{modality}' image to translate")
        return [PredictionInput(s.subject, s.image(modality)) for s in chosen]  # type: ignore[misc]
    if subjects is not None:
        raise ConfigError("--split needs a manifest as --input (subject names come from the manifest)")
    if source.is_file():
        return [PredictionInput(strip_image_suffix(source), source)]
    if is_dicom_dir(source):
        return [PredictionInput(source.name, source)]
    files = sorted(p for p in source.iterdir() if p.is_file() and image_suffix(p))
    pattern = _modality_pattern(modality)
    matching = [p for p in files if pattern.match(strip_image_suffix(p))]
    files = matching or files
    dicom = sorted(p for p in source.iterdir() if p.is_dir() and is_dicom_dir(p))
    inputs = [PredictionInput(strip_image_suffix(p), p) for p in files] + [PredictionInput(p.name, p) for p in dicom]
    if not inputs:
        raise DataError(f"{source}: no image files or DICOM series found (pass a manifest for a dataset folder)")
    return inputs


def translate_volume(method: TranslationMethod, config: ExperimentConfig, source: Volume, *,
                     device: torch.device | None = None, precision: str | None = None) -> Volume:
    """Translate one native-geometry source volume; the result lies on the same grid, in target units."""
    data = config.data
    preprocessor = Preprocessor(data, spacing=data.spacing, divisor=method.shape_divisor(data))
    record = preprocessor.fit(source)
    array = preprocessor.apply(source, record, "source")
    inferer = method.make_inferer(config.inference, data)
    synthetic = method.infer(array, inferer, device=device, precision=precision or resolve_inference_precision(
        config.inference.precision, device or torch.device("cpu")), seed=config.inference.seed,
        channels_last=config.inference.channels_last, compile=config.inference.compile,
        mirror_axes=config.inference.mirror_axes)
    result = preprocessor.invert(synthetic, record, scaling=prediction_scaling(data.target_kind))
    return Volume(result.array, source.spacing, source.origin, source.direction)


def resolve_inference_precision(precision: str, device: torch.device) -> str:
    """``auto``: bf16 where the hardware computes it natively (CUDA with bf16, CPUs with AVX-512 BF16/AMX)."""
    if precision != "auto":
        return precision
    return "bf16" if native_bf16(device) else "fp32"


def parse_axes(text: str | None) -> tuple[int, ...] | None:
    """``--mirror-axes``: ``"0,1,2"`` → ``(0, 1, 2)``, ``"none"`` → ``()`` (off), ``None`` → the config's."""
    if text is None:
        return None
    if text.strip().lower() == "none":
        return ()
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise ConfigError(f"--mirror-axes {text!r}: expected axes like 0,1,2 (x, y, z) or none") from None


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``"K/N"`` → (K, N), 0 ≤ K < N (SLURM: ``--shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT``)."""
    if text is None:
        return None
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match or not 0 <= int(match.group(1)) < int(match.group(2)):
        raise ConfigError(f"--shard {text!r}: expected K/N with 0 <= K < N, e.g. 0/4")
    return int(match.group(1)), int(match.group(2))


def _shard_from_env() -> tuple[int, int] | None:
    world = int(os.environ.get("WORLD_SIZE", 1))
    return (int(os.environ.get("RANK", 0)), world) if world > 1 else None


@contextlib.contextmanager
def _index_lock(out_dir: Path) -> Iterator[None]:
    """Shards writing into one folder update predictions.json one at a time (a lock on the folder itself)."""
    fd = os.open(out_dir, os.O_RDONLY)
    try:
        with contextlib.suppress(OSError):  # network file systems may refuse locks; shards then race benignly
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _check_out_dir(out_dir: Path, inputs: list[PredictionInput], names: dict[str, str], overwrite: bool,
                   mine: set[str]) -> None:
    """Refuse before any work: a run folder, a foreign folder, name collisions, inputs, existing outputs (of
    this shard: other shards write theirs)."""
    if RunFolder.of(out_dir).is_run() and not (out_dir / INDEX).is_file():
        raise OutputError(f"{out_dir} is a training run folder; write predictions elsewhere (e.g. {out_dir}/"
                          "predictions)")
    if (out_dir / "config.yaml").is_file() and not (out_dir / INDEX).is_file():
        raise OutputError(f"{out_dir} holds a config.yaml that volsynth predict did not write; choose another --out")
    seen: dict[str, Path] = {}
    resolved_inputs = {item.path.resolve() for item in inputs}
    for item in inputs:
        file = names[item.name]
        if file in seen:
            raise DataError(f"inputs {seen[file]} and {item.path} would both be written to {out_dir / file}; rename "
                            "one of them")
        seen[file] = item.path
        target = inside(out_dir / file, out_dir)
        if target in resolved_inputs or any(target == p or p in target.parents for p in resolved_inputs):
            raise OutputError(f"{target}: refusing to overwrite an input")
        if item.name in mine and target.exists() and not overwrite:
            raise OutputError(f"{target} exists; pass --overwrite to replace earlier predictions")


def predict(checkpoint: str | Path, inputs: str | Path, out_dir: str | Path, *, device: str = "auto",
            overlap: float | None = None, sw_batch_size: int | None = None, precision: str | None = None,
            subjects: list[str] | None = None, seed: int | None = None, steps: int | None = None,
            shard: tuple[int, int] | None = None, overwrite: bool = False, progress: bool = True,
            compile_network: bool | None = None, mirror_axes: tuple[int, ...] | None = None) -> list[Path]:
    """Translate every input of this shard into ``out_dir``; returns the written volume paths.

    Args:
        checkpoint: a volsynth checkpoint (``resolve_checkpoint`` finds it from a run folder).
        inputs: an image file, a DICOM folder, a folder of images, or a manifest (its source modality).
        subjects: with a manifest, only these subjects (e.g. a run's test split).
        overlap / sw_batch_size / precision / seed / steps: inference overrides of the saved config.
        shard: ``(k, n)``: translate only subjects ``i`` with ``i % n == k`` (default: torchrun's rank/world).
        overwrite: replace existing predictions of the same names in ``out_dir``.
        compile_network: override ``inference.compile`` (torch.compile with frozen weights).
        mirror_axes: override ``inference.mirror_axes`` (test-time mirroring; ``()`` turns it off).
    """
    torch_device = resolve_device(device)  # a missing GPU fails before any work
    if torch_device.type == "cuda" and torch_device.index is None and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        torch_device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))  # one GPU per torchrun rank
    method, config, state = load_method(checkpoint, device=torch_device)
    changes: dict[str, Any] = {k: v for k, v in (("overlap", overlap), ("sw_batch_size", sw_batch_size),
                                                   ("precision", precision), ("seed", seed), ("steps", steps),
                                                   ("compile", compile_network), ("mirror_axes", mirror_axes))
                               if v is not None}
    config = dataclasses.replace(config, inference=dataclasses.replace(config.inference, **changes))
    from volsynth.config import validate

    validate(config)
    method.make_inferer(config.inference, config.data)  # refuses options the method cannot take (e.g. --steps)
    if config.inference.compile:
        method.compiled_translate()  # refuses stochastic methods before any work (compiling itself is lazy)
    items = collect_inputs(inputs, modality=config.data.source or "", subjects=subjects)
    target = config.data.target or "target"
    out_dir = Path(out_dir)
    suffix = ".nii.gz"
    names = {item.name: output_name(item.name, target, suffix) for item in items}
    shard = shard or _shard_from_env()
    chosen = items if shard is None else [item for index, item in enumerate(sorted(items, key=lambda i: i.name))
                                          if index % shard[1] == shard[0]]
    _check_out_dir(out_dir, items, names, overwrite, {item.name for item in chosen})
    items = chosen
    out_dir.mkdir(parents=True, exist_ok=True)
    digest = file_digest(checkpoint)
    created = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    provenance = {"method": config.method.name, "source": config.data.source, "target": target,
                  "checkpoint": str(Path(checkpoint).resolve()), "checkpoint_sha256": digest,
                  "checkpoint_iteration": int(state["iteration"]), "volsynth_version": __version__, "created": created,
                  "seed": config.inference.seed, "steps": config.inference.steps}
    description = f"volsynth synthetic {target} from {config.data.source} ({config.method.name})"
    precision_used = resolve_inference_precision(config.inference.precision, torch_device)
    written = []
    for item in tqdm(items, desc="predict", unit="volume", disable=not progress):
        volume = read_volume(item.path)
        synthetic = translate_volume(method, config, volume, device=torch_device, precision=precision_used)
        path = inside(out_dir / names[item.name], out_dir)
        write_volume(synthetic, path, description=description)
        sidecar = {"format": "volsynth-synthetic", "synthetic": True, **provenance, "input": str(item.path.resolve()),
                   "precision": precision_used, "config": to_dict(config)}
        atomic_write_text(path.with_name(path.name[: -len(suffix)] + ".json"), json.dumps(sidecar, indent=2) + "\n")
        written.append(path)
    with _index_lock(out_dir):
        index_path = out_dir / INDEX
        index = json.loads(index_path.read_text()) if index_path.is_file() else {}
        outputs = dict(index.get("outputs", {})) if index.get("checkpoint_sha256") == digest else {}
        outputs.update({item.name: {"file": names[item.name], "input": str(item.path.resolve())} for item in items})
        save_config(config, out_dir / "config.yaml")
        atomic_write_text(index_path, json.dumps({"format": FORMAT, "version": 1, **provenance, "outputs": outputs},
                                                 indent=2) + "\n")
    return written
