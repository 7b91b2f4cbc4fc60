"""``volsynth predict``: checkpoint + native-geometry inputs → synthetic volumes on the inputs' grids.

Each input is preprocessed exactly as at training (the checkpoint's resolved config: working spacing, intensity
model, crop/pad), translated with Gaussian-blended sliding windows, and mapped back through the inverse
preprocessing onto the input's own grid (shape, spacing, origin, direction). Synthetic CT/CBCT returns to HU;
synthetic MR stays on the normalised [0, 1] scale (a scanner scale cannot be predicted).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from volsynth.config import ExperimentConfig, save_config
from volsynth.data.io import image_suffix, is_dicom_dir, read_volume, strip_image_suffix, write_volume
from volsynth.data.manifest import load_manifest
from volsynth.data.preprocess import Preprocessor, prediction_scaling
from volsynth.data.volume import Volume
from volsynth.inference.sliding_window import translate_array
from volsynth.methods.base import TranslationMethod
from volsynth.training.checkpoint import load_method
from volsynth.utils import resolve_device


@dataclass
class PredictionInput:
    name: str  # output stem
    path: Path


def resolve_checkpoint(run: str | Path | None = None, checkpoint: str | Path | None = None,
                       which: str = "last") -> Path:
    """``--checkpoint`` wins; otherwise ``RUN/checkpoints/{which}.pt`` (the paper uses the last checkpoint)."""
    if checkpoint is not None:
        return Path(checkpoint)
    if run is None:
        raise ValueError("give --run RUN_DIR or --checkpoint CKPT")
    path = Path(run) / "checkpoints" / f"{which}.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no '{which}' checkpoint in run {run}")
    return path


def collect_inputs(source: str | Path, *, modality: str, subjects: list[str] | None = None) -> list[PredictionInput]:
    """Inputs from a file, a DICOM series folder, a folder of image files, or a manifest (its ``modality``)."""
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"{source}: input not found")
    if source.is_file() and source.suffix.lower() in (".json", ".csv"):
        manifest = load_manifest(source)
        manifest.require(modality)
        chosen = [s for s in manifest.subjects if subjects is None or s.subject in subjects]
        missing = sorted(set(subjects or []) - {s.subject for s in chosen})
        if missing:
            raise ValueError(f"{source}: subjects not in the manifest: {', '.join(missing)}")
        return [PredictionInput(s.subject, p) for s in chosen if (p := s.image(modality)) is not None]
    if source.is_file():
        return [PredictionInput(strip_image_suffix(source), source)]
    if is_dicom_dir(source):
        return [PredictionInput(source.name, source)]
    files = sorted(p for p in source.iterdir() if p.is_file() and image_suffix(p))
    dicom = sorted(p for p in source.iterdir() if p.is_dir() and is_dicom_dir(p))
    inputs = [PredictionInput(strip_image_suffix(p), p) for p in files] + [PredictionInput(p.name, p) for p in dicom]
    if not inputs:
        raise FileNotFoundError(f"{source}: no image files or DICOM series found")
    return inputs


def translate_volume(method: TranslationMethod, config: ExperimentConfig, source: Volume, *,
                     overlap: float | None = None, sw_batch_size: int | None = None, precision: str | None = None,
                     device: torch.device | None = None) -> Volume:
    """Translate one native-geometry source volume; the result lies on the same grid, in target units."""
    inference, data = config.inference, config.data
    preprocessor = Preprocessor(data, spacing=data.spacing, divisor=method.patch_divisor)
    record = preprocessor.fit(source)
    array = preprocessor.apply(source, record, "source")
    synthetic = translate_array(
        method, array, roi_size=inference.roi_size or data.patch_size,
        overlap=inference.overlap if overlap is None else overlap, sigma_scale=inference.sigma_scale,
        sw_batch_size=inference.sw_batch_size if sw_batch_size is None else sw_batch_size, blend=inference.blend,
        precision=precision or inference.precision, device=device,
    )
    result = preprocessor.invert(synthetic, record, scaling=prediction_scaling(data.target_kind))
    return Volume(result.array, source.spacing, source.origin, source.direction)


def predict(checkpoint: str | Path, inputs: str | Path, out_dir: str | Path, *, device: str = "auto",
            overlap: float | None = None, sw_batch_size: int | None = None, precision: str | None = None,
            subjects: list[str] | None = None, progress: bool = True, suffix: str = ".nii.gz") -> list[Path]:
    """Translate every input; writes ``out_dir/<name><suffix>`` and ``out_dir/config.yaml``. Returns the paths."""
    torch_device = resolve_device(device)
    method, config, _ = load_method(checkpoint, device=torch_device)
    items = collect_inputs(inputs, modality=config.data.source, subjects=subjects)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, out_dir / "config.yaml")
    written = []
    for item in tqdm(items, desc="predict", unit="volume", disable=not progress):
        source = read_volume(item.path)
        synthetic = translate_volume(method, config, source, overlap=overlap, sw_batch_size=sw_batch_size,
                                     precision=precision, device=torch_device)
        written.append(write_volume(synthetic, out_dir / f"{item.name}{suffix}"))
    (out_dir / "predictions.json").write_text(json.dumps(
        {"checkpoint": str(Path(checkpoint).resolve()), "inputs": {i.name: str(i.path) for i in items}}, indent=2))
    return written
