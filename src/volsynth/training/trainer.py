"""The one trainer: runs every registered method the same way.

Iteration-based. Each iteration draws its patches from a numpy generator seeded by ``(seed, iteration, rank)``
and reseeds torch from the same triple, so a run stopped at iteration N and resumed gives bit-identical weights
to an uninterrupted run. The trainer owns everything that is not method-specific: device, AMP, optimiser
schedules, gradient clipping, validation, logging (CSV, optional TensorBoard, progress bar) and atomic
checkpoints (``last.pt`` every ``checkpoint_every`` iterations, ``best.pt`` on the best validation SSIM).

DDP-ready: only rank 0 logs and writes checkpoints; ranks draw different patches via the rank in the seed.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch
from tqdm import tqdm

from volsynth.config import ExperimentConfig, ScheduleConfig, save_config, to_dict
from volsynth.data.discovery import make_splits
from volsynth.data.manifest import Manifest, load_manifest
from volsynth.data.patches import PatchSampler, PreparedSubject, prepare_cohort
from volsynth.data.preprocess import Preprocessor
from volsynth.inference.sliding_window import translate_array
from volsynth.methods.base import Batch, StepContext, TranslationMethod, build_method
from volsynth.training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from volsynth.utils import atomic_write_text, resolve_device

log = logging.getLogger(__name__)


def distributed_context() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment (0, 1 when not distributed)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "fp16" if device.type == "cuda" else "bf16"
    if precision == "fp16" and device.type == "cpu":
        raise ValueError("precision fp16 needs CUDA; use bf16 on CPU")
    return precision


def median_spacing(manifest: Manifest, subjects: list[str], modality: str) -> list[float]:
    """Median voxel spacing of ``modality`` over ``subjects`` (headers only, no voxel data read)."""
    by_name = manifest.by_name()
    spacings = []
    for name in subjects:
        path = by_name[name].image(modality)
        if path is None:
            continue
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        spacings.append(reader.GetSpacing()[:3])
    if not spacings:
        raise ValueError(f"no '{modality}' images to compute the median spacing from")
    return [float(v) for v in np.median(np.asarray(spacings), axis=0)]


def make_scheduler(optimizer: torch.optim.Optimizer, schedule: ScheduleConfig, iterations: int
                   ) -> torch.optim.lr_scheduler.LRScheduler:
    """The configured schedule, stepped once per iteration (milestones are in iterations)."""
    if schedule.kind == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(schedule.milestones),
                                                    gamma=schedule.gamma)
    if schedule.kind == "linear_decay":
        start, span = schedule.decay_start, max(1, iterations - schedule.decay_start)
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: 1.0 if it < start
                                                 else max(0.0, 1.0 - (it - start) / span))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: 1.0)


def _iteration_seed(seed: int, iteration: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, iteration, rank]).generate_state(1, dtype=np.uint64)[0] % (2**63))


@dataclass
class TrainResult:
    out_dir: Path
    iterations: int
    last_checkpoint: Path
    best_checkpoint: Path | None
    best_ssim: float | None
    seconds: float


class Trainer:
    """Trains ``config.method`` on ``config.data`` and writes everything into ``out_dir``.

    Run folder: ``config.yaml`` (resolved), ``splits.json``, ``log.csv``, ``validation.csv``,
    ``checkpoints/{last,best}.pt``, ``cache/`` (preprocessed volumes, reusable).
    """

    def __init__(self, config: ExperimentConfig, out_dir: str | Path, *, resume: bool = False) -> None:
        self.config = config
        self.out_dir = Path(out_dir)
        self.resume = resume
        self.rank, self.world_size = distributed_context()
        self.is_main = self.rank == 0
        self.device = resolve_device(config.train.device)
        self.precision = resolve_precision(config.train.precision, self.device)
        if not config.data.manifest:
            raise ValueError("data.manifest is not set: pass --data MANIFEST (from `volsynth inspect` or "
                             "`volsynth phantom`) or --set data.manifest=PATH")

    # Setup ------------------------------------------------------------------------------------------------------
    def _prepare_data(self, method: TranslationMethod) -> tuple[list[PreparedSubject], list[PreparedSubject]]:
        data = self.config.data
        manifest = load_manifest(data.manifest)
        manifest.require(data.source, data.target)
        complete = [s.subject for s in manifest.subjects if data.source in s.images and data.target in s.images]
        assigned = {s.subject: s.split for s in manifest.subjects if s.split}
        splits = make_splits(complete, data.split, assigned)
        if not splits["train"]:
            raise ValueError(f"{data.manifest}: no training subjects after the split ({len(complete)} complete pairs)")
        if data.spacing is None:  # the paper resamples to the cohort's median spacing; freeze it into the config
            data.spacing = median_spacing(manifest, splits["train"], data.source)
        if self.is_main:
            atomic_write_text(self.out_dir / "splits.json", json.dumps(splits, indent=2) + "\n")
        if any(p % method.patch_divisor for p in data.patch_size):
            raise ValueError(f"data.patch_size {list(data.patch_size)} must be a multiple of "
                             f"{method.patch_divisor} for method '{self.config.method.name}'")
        self.preprocessor = Preprocessor(data, spacing=data.spacing, divisor=method.patch_divisor)
        cache = Path(data.cache_dir) if data.cache_dir else self.out_dir / "cache"
        by_name = manifest.by_name()
        prepare = lambda names: prepare_cohort(  # noqa: E731
            [by_name[n] for n in names], source=data.source, target=data.target, preprocessor=self.preprocessor,
            cache_dir=cache, resample_target=data.resample_target, progress=self.config.train.progress)
        return prepare(splits["train"]), prepare(splits["val"])

    # Validation -------------------------------------------------------------------------------------------------
    def validate(self, method: TranslationMethod, subjects: list[PreparedSubject]) -> dict[str, float]:
        """Full-volume SSIM/PSNR (data range 1, preprocessed space) averaged over validation subjects."""
        from volsynth.evaluation.metrics import psnr, ssim

        inference = self.config.inference
        roi = inference.roi_size or self.config.data.patch_size
        scores: dict[str, list[float]] = {"ssim": [], "psnr": []}
        for subject in subjects:
            synthetic = translate_array(method, np.asarray(subject.source), roi_size=roi, overlap=inference.overlap,
                                        sigma_scale=inference.sigma_scale, sw_batch_size=inference.sw_batch_size,
                                        blend=inference.blend, precision=inference.precision, device=self.device)
            target = np.asarray(subject.target)
            scores["ssim"].append(ssim(synthetic, target, data_range=1.0))
            scores["psnr"].append(psnr(synthetic, target, data_range=1.0))
        return {k: float(np.mean(v)) for k, v in scores.items()}

    # Main loop --------------------------------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        config, train = self.config, self.config.train
        self.out_dir.mkdir(parents=True, exist_ok=True)
        checkpoints = self.out_dir / "checkpoints"
        last_path, best_path = checkpoints / "last.pt", checkpoints / "best.pt"
        if train.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        torch.manual_seed(config.seed)  # network initialisation
        method = build_method(config.method).to(self.device)
        method.train()
        train_subjects, val_subjects = self._prepare_data(method)
        optimizers = method.configure_optimizers(train)
        schedulers = {k: make_scheduler(o, train.schedule, train.iterations) for k, o in optimizers.items()}
        scalers = {k: torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16") for k in optimizers}
        start, best_ssim = 0, None
        if self.resume:
            if not last_path.is_file():
                raise CheckpointError(f"{last_path}: nothing to resume from")
            state = load_checkpoint(last_path, map_location=self.device)
            if state["config"]["method"] != to_dict(config.method):
                raise CheckpointError(f"{last_path}: saved method config differs from the requested one; resume "
                                      "with the run's own config.yaml")
            method.load_state_dict(state["model"])
            for key, opt in optimizers.items():
                opt.load_state_dict(state["optimizers"][key])
                schedulers[key].load_state_dict(state["schedulers"][key])
                scalers[key].load_state_dict(state["scalers"][key])
            start, best_ssim = int(state["iteration"]), state.get("best_ssim")
        elif last_path.exists():
            raise FileExistsError(f"{self.out_dir} already holds a run (checkpoints/last.pt); pass --resume to "
                                  "continue it or choose another --out")
        if self.is_main:
            save_config(config, self.out_dir / "config.yaml")
        sampler = PatchSampler(train_subjects, config.data.patch_size, patches_per_step=config.data.patches_per_step,
                               foreground_probability=config.data.foreground_probability,
                               paired=method.requires_paired_data, threshold=config.data.foreground_threshold)
        logger = _RunLogger(self.out_dir, enabled=self.is_main, tensorboard=train.tensorboard, truncate_after=start)
        generator = torch.Generator()
        ctx = StepContext(device=self.device, precision=self.precision, optimizers=optimizers, scalers=scalers,
                          grad_clip=train.grad_clip, total_iterations=train.iterations, generator=generator)
        began = time.perf_counter()
        bar = tqdm(total=train.iterations, initial=start, desc=f"train {config.method.name}", unit="it",
                   disable=not (train.progress and self.is_main), dynamic_ncols=True)

        def checkpoint(path: Path, iteration: int) -> None:
            if not self.is_main:
                return
            save_checkpoint(path, {
                "iteration": iteration, "config": to_dict(config), "method": config.method.name,
                "model": method.state_dict(), "optimizers": {k: o.state_dict() for k, o in optimizers.items()},
                "schedulers": {k: s.state_dict() for k, s in schedulers.items()},
                "scalers": {k: s.state_dict() for k, s in scalers.items()}, "best_ssim": best_ssim,
            })

        for iteration in range(start + 1, train.iterations + 1):
            seed = _iteration_seed(config.seed, iteration, self.rank)
            patches = sampler.sample(np.random.default_rng(seed))
            torch.manual_seed(seed)  # dropout and any torch-side randomness, reproducible on resume
            generator.manual_seed(seed)
            batch = Batch(*(torch.from_numpy(np.ascontiguousarray(patches[k])) if patches[k] is not None else None
                            for k in ("source", "target", "mask", "label"))).to(self.device)
            ctx.iteration = iteration
            losses = method.train_step(batch, ctx)
            for scheduler in schedulers.values():
                scheduler.step()
            lr = next(iter(optimizers.values())).param_groups[0]["lr"]
            if not all(np.isfinite(v) for v in losses.values()):
                raise FloatingPointError(f"non-finite loss at iteration {iteration}: {losses}")
            if iteration % train.log_every == 0 or iteration == train.iterations:
                logger.log(iteration, time.perf_counter() - began, lr, losses)
            bar.update(1)
            bar.set_postfix({k: f"{v:.4g}" for k, v in list(losses.items())[:4]}, refresh=False)
            if val_subjects and (iteration % train.val_every == 0 or iteration == train.iterations):
                scores = self.validate(method, val_subjects)
                logger.log_validation(iteration, scores)
                if best_ssim is None or scores["ssim"] > best_ssim:
                    best_ssim = scores["ssim"]
                    checkpoint(best_path, iteration)
            if iteration % train.checkpoint_every == 0 or iteration == train.iterations:
                checkpoint(last_path, iteration)
        bar.close()
        logger.close()
        if start >= train.iterations and not last_path.exists():
            checkpoint(last_path, start)
        return TrainResult(self.out_dir, train.iterations, last_path, best_path if best_path.exists() else None,
                           best_ssim, time.perf_counter() - began)


class _RunLogger:
    """CSV (every loss), validation CSV and optional TensorBoard; silent on non-zero ranks."""

    def __init__(self, out_dir: Path, *, enabled: bool, tensorboard: bool, truncate_after: int) -> None:
        self.enabled = enabled
        self.path = out_dir / "log.csv"
        self.val_path = out_dir / "validation.csv"
        self.fields: list[str] | None = None
        self.writer: Any = None
        if enabled:
            for path in (self.path, self.val_path):
                _truncate_csv(path, truncate_after)  # a resumed run rewrites what followed its checkpoint
            if self.path.is_file():
                with self.path.open(newline="") as handle:
                    self.fields = next(csv.reader(handle), None)
            if tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter

                    self.writer = SummaryWriter(str(out_dir / "tensorboard"))
                except ImportError:
                    log.warning("tensorboard is not installed (pip install volsynth[tensorboard]); CSV logging only")

    def log(self, iteration: int, seconds: float, lr: float, losses: dict[str, float]) -> None:
        if not self.enabled:
            return
        row = {"iteration": iteration, "seconds": round(seconds, 3), "lr": lr, **losses}
        new = self.fields is None
        if new:
            self.fields = list(row)
        with self.path.open("a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=self.fields, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow(row)
        if self.writer is not None:
            for key, value in losses.items():
                self.writer.add_scalar(f"loss/{key}", value, iteration)
            self.writer.add_scalar("lr", lr, iteration)

    def log_validation(self, iteration: int, scores: dict[str, float]) -> None:
        if not self.enabled:
            return
        new = not self.val_path.is_file()
        with self.val_path.open("a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["iteration", *scores])
            if new:
                writer.writeheader()
            writer.writerow({"iteration": iteration, **scores})
        if self.writer is not None:
            for key, value in scores.items():
                self.writer.add_scalar(f"val/{key}", value, iteration)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _truncate_csv(path: Path, after: int) -> None:
    if not path.is_file():
        return
    if after == 0:
        path.unlink()
        return
    with path.open(newline="") as handle:
        rows = list(csv.reader(handle))
    kept = rows[:1] + [r for r in rows[1:] if r and int(r[0]) <= after]
    with path.open("w", newline="") as handle:
        csv.writer(handle).writerows(kept)


def train(config: ExperimentConfig, out_dir: str | Path, *, resume: bool = False) -> TrainResult:
    """Convenience wrapper: ``Trainer(config, out_dir, resume=resume).fit()``."""
    return Trainer(config, out_dir, resume=resume).fit()
