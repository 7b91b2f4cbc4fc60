"""The ``segment`` protocol (the seed paper's Protocol 1): train a segmenter on synthetic images, test on real ones.

A MONAI 3D UNet (softmax over background + the label values, DiceCE loss, AdamW) learns from patches of the
*synthetic* images with the *real* labels, then segments the *real* test images; Dice per class against their
labels. The upper bound trains the same network from the same seed on the *real* images of the same subjects.
The seed trains on the synthetic FLAIR of its fold-0 test subjects and tests on the real FLAIR of the other 75 %,
reporting whole-tumour Dice (0.880 vs 0.898 upper bound).

It reuses the toolkit's pieces: volumes come from :func:`~volsynth.data.io.read_volume`; patches are drawn as the
trainer draws them (:func:`~volsynth.data.sampling.random_centre`, :func:`~volsynth.data.sampling.centred_start`,
:func:`~volsynth.data.sampling.window`) from a generator seeded per iteration by
:func:`~volsynth.training.trainer.iteration_seed`; steps go through :class:`~volsynth.methods.base.StepContext`
with a :func:`~volsynth.training.optim.make_scheduler` schedule; whole volumes are segmented by
:class:`~volsynth.inferers.SlidingWindowInferer`. The same seed gives the same numbers.

Dice of a class empty in both maps is 1.0 here (the seed's notebook sets NaN → 1: a tumour-free case predicted
tumour-free is a perfect result).
"""

from __future__ import annotations

import math
import os
import time
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from volsynth.config import ScheduleConfig
from volsynth.data.sampling import centred_start, random_centre, window
from volsynth.errors import ConfigError, DataError
from volsynth.evaluation.downstream.inputs import VolumeInput, name_of, read_image, read_labels, unit_scaled
from volsynth.evaluation.downstream.results import column, label_names, nanmean, result_files, write_csv, write_json
from volsynth.metrics import dice, summarise

PROTOCOL = "segment"


@dataclass(frozen=True)
class TrainingVolume:
    """One training subject, ready for patch sampling: the attributes :func:`random_centre` reads of a
    :class:`~volsynth.data.cache.PreparedSubject` (``shape``, ``centres``) plus the image and its classes."""

    image: np.ndarray  # float32 on [0, 1]
    classes: np.ndarray  # uint8: 0 = background, k = the k-th label value
    centres: dict[str, np.ndarray]  # "pair" → flat indices of labelled voxels (foreground-centred patches)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in self.image.shape)  # type: ignore[return-value]


def _to_classes(label_map: np.ndarray, values: Sequence[int]) -> np.ndarray:
    # uint8 keeps a training set in memory at 5 bytes per voxel (float32 image + class index)
    if len(values) > 255:
        raise DataError(f"{PROTOCOL} protocol: at most 255 label values, got {len(values)}")
    out = np.zeros(label_map.shape, dtype=np.uint8)
    for index, value in enumerate(values, start=1):
        out[label_map == value] = index
    return out


def _prepare(images: Mapping[str, VolumeInput], labels: Mapping[str, VolumeInput], subjects: Sequence[str],
             values: Sequence[int]) -> list[TrainingVolume]:
    volumes = []
    for subject in subjects:
        image = unit_scaled(read_image(images[subject]).array)
        classes = _to_classes(read_labels(labels[subject]), values)
        if image.shape != classes.shape:
            raise DataError(f"subject '{subject}': image {image.shape} ({name_of(images[subject], subject)}) and "
                            f"label map {classes.shape} ({name_of(labels[subject], subject)}) differ in shape")
        volumes.append(TrainingVolume(image, classes, {"pair": np.flatnonzero(classes)}))
    return volumes


def sample_patches(volumes: Sequence[TrainingVolume], patch: Sequence[int], batch_size: int,
                   rng: np.random.Generator, foreground_probability: float) -> tuple[np.ndarray, np.ndarray]:
    """``(B, 1, *patch)`` float32 images and int64 classes: each patch from a random subject, centred on a
    labelled voxel with ``foreground_probability`` (labels are sparse), zero-padded where it leaves the volume,
    then flipped on each axis with probability 0.5 (the seed's RandFlip)."""
    images, classes = [], []
    for _ in range(batch_size):
        volume = volumes[int(rng.integers(len(volumes)))]
        centre = random_centre(volume, "pair", rng, foreground_probability)  # type: ignore[arg-type]
        start = [centred_start(c, p, n) for c, p, n in zip(centre, patch, volume.shape, strict=True)]
        x, y = window(volume.image, start, patch), window(volume.classes, start, patch)
        for axis in range(3):
            if rng.random() < 0.5:
                x, y = np.flip(x, axis), np.flip(y, axis)  # type: ignore[arg-type]
        images.append(np.ascontiguousarray(x))
        classes.append(np.ascontiguousarray(y))
    return np.stack(images)[:, None], np.stack(classes)[:, None].astype(np.int64)


@dataclass(frozen=True)
class SegmenterSettings:
    """The UNet, its training and its sliding-window inference (written to the summary)."""

    patch_size: tuple[int, int, int]
    iterations: int
    batch_size: int
    lr: float
    weight_decay: float
    channels: tuple[int, ...]
    num_res_units: int
    overlap: float
    sw_batch_size: int
    foreground_probability: float
    seed: int
    device: str
    schedule: str = "constant"


def _build_unet(n_classes: int, s: SegmenterSettings) -> Any:
    from monai.networks.nets import UNet

    return UNet(spatial_dims=3, in_channels=1, out_channels=n_classes + 1, channels=s.channels,
                strides=(2,) * (len(s.channels) - 1), num_res_units=s.num_res_units)


def train_segmenter(volumes: Sequence[TrainingVolume], n_classes: int, s: SegmenterSettings, *,
                    progress: bool = False, log: Callable[[str], None] | None = None) -> tuple[Any, list[float]]:
    """Train the UNet; returns it (eval mode) and the loss per iteration.

    Iteration ``i`` draws its patches from ``default_rng(iteration_seed(seed, i, 0))`` as the trainer does, so the
    synthetic-trained model and the upper bound (same labels and grids) see the same patches and flips and start
    from the same weights: they differ only by their training images. The caller's torch RNG state is restored.
    """
    import torch
    from monai.losses import DiceCELoss
    from tqdm import tqdm

    from volsynth.methods.base import StepContext
    from volsynth.training.optim import make_scheduler
    from volsynth.training.trainer import iteration_seed

    device = torch.device(s.device)
    forked = [device.index if device.index is not None else 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=forked):
        torch.manual_seed(s.seed)
        model = _build_unet(n_classes, s).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=s.weight_decay)
        scheduler = make_scheduler(optimizer, ScheduleConfig(kind=s.schedule), s.iterations)  # type: ignore[arg-type]
        ctx = StepContext(device=device, precision="fp32", optimizers={"segmenter": optimizer},
                          scalers={"segmenter": torch.amp.GradScaler(device.type, enabled=False)}, grad_clip=None,
                          total_iterations=s.iterations, generator=torch.Generator())
        loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
        losses: list[float] = []
        model.train()
        for iteration in tqdm(range(1, s.iterations + 1), desc=f"{PROTOCOL}: train UNet", unit="it",
                              disable=not progress, dynamic_ncols=True):
            seed = iteration_seed(s.seed, iteration, 0)
            x, y = sample_patches(volumes, s.patch_size, s.batch_size, np.random.default_rng(seed),
                                  s.foreground_probability)
            torch.manual_seed(seed)
            ctx.generator.manual_seed(seed)
            ctx.iteration = iteration
            with ctx.autocast():
                loss = loss_fn(model(torch.from_numpy(x).to(device)), torch.from_numpy(y).to(device))
            ctx.step(loss, "segmenter")
            scheduler.step()
            losses.append(float(loss.detach()))
            if log is not None and iteration % max(1, s.iterations // 10) == 0:
                log(f"iteration {iteration}/{s.iterations} loss {np.mean(losses[-10:]):.4f}")
    model.eval()
    return model, losses


def segment_volume(model: Any, image: np.ndarray, values: Sequence[int], s: SegmenterSettings) -> np.ndarray:
    """Label values of the arg-max of ``model`` over an ``(x, y, z)`` volume (min-max scaled first), covered by
    sliding windows of the training patch."""
    import torch

    from volsynth.inferers import SlidingWindowInferer

    # Constant blending and overlap 0.5: MONAI's sliding-window defaults, which the seed segments with.
    inferer = SlidingWindowInferer(roi_size=s.patch_size, overlap=s.overlap, batch=s.sw_batch_size, blend="constant")
    volume = torch.from_numpy(np.ascontiguousarray(unit_scaled(image)))[None, None].to(s.device)
    with torch.no_grad():
        logits = inferer(lambda items, _generators: model(items), volume)
    index = logits.argmax(dim=1)[0].cpu().numpy()
    return np.asarray([0, *values], dtype=np.int64)[index]


def _score(model: Any, images: Mapping[str, VolumeInput], labels: Mapping[str, VolumeInput], names: Mapping[int, str],
           regions: Mapping[str, Sequence[int]], s: SegmenterSettings, tag: str) -> list[dict[str, Any]]:
    rows = []
    values = list(names)
    for subject in sorted(images):
        prediction = segment_volume(model, read_image(images[subject]).array, values, s)
        truth = read_labels(labels[subject])
        if truth.shape != prediction.shape:
            raise DataError(f"subject '{subject}': label map {truth.shape} ({name_of(labels[subject], subject)}) "
                            f"and image {prediction.shape} differ in shape")
        truth = np.where(np.isin(truth, values), truth, 0)  # labels the model was not asked for are background
        row: dict[str, Any] = {"model": tag, "subject": subject}
        for label, score in dice(prediction, truth, values, empty=1.0).items():
            row[column("dice", names[label])] = score
        for region, members in regions.items():
            row[column("dice", region)] = dice(np.isin(prediction, members), np.isin(truth, members), [True],
                                               empty=1.0)[True]
        headline = [column("dice", r) for r in regions] or [column("dice", names[v]) for v in values]
        row["dice"] = nanmean(row[c] for c in headline)
        rows.append(row)
    return rows


def _check_inputs(train_real: Mapping[str, VolumeInput] | None, train_synthetic: Mapping[str, VolumeInput],
                  train_labels: Mapping[str, VolumeInput], test_real: Mapping[str, VolumeInput],
                  test_labels: Mapping[str, VolumeInput]) -> None:
    if not train_synthetic:
        raise DataError(f"{PROTOCOL} protocol: no synthetic training volumes")
    if not test_real:
        raise DataError(f"{PROTOCOL} protocol: no real test volumes")
    for what, subjects, present in (("label for training", train_synthetic, train_labels),
                                    ("label for test", test_real, test_labels),
                                    ("real training image (needed for the upper bound)", train_synthetic,
                                     train_real if train_real is not None else train_synthetic)):
        missing = sorted(set(subjects) - set(present))
        if missing:
            raise DataError(f"{PROTOCOL} protocol: no {what} subjects {', '.join(missing[:5])}")


def protocol1(train_real: Mapping[str, VolumeInput] | None, train_synthetic: Mapping[str, VolumeInput],
              train_labels: Mapping[str, VolumeInput], test_real: Mapping[str, VolumeInput],
              test_labels: Mapping[str, VolumeInput], *, out_dir: str | os.PathLike[str],
              label_values: Sequence[int] | Mapping[int, str] | None = None,
              regions: Mapping[str, Sequence[int]] | None = None,
              patch_size: Sequence[int] = (32, 32, 32), iterations: int = 500, batch_size: int = 2,
              lr: float = 1e-3, weight_decay: float = 1e-5, channels: Sequence[int] = (8, 16, 32, 64),
              num_res_units: int = 1, overlap: float = 0.5, sw_batch_size: int = 2,
              foreground_probability: float = 0.5, schedule: str = "constant", seed: int = 0, device: str = "cpu",
              save_models: bool = False, progress: bool = False,
              log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Synthetic-to-real segmentation and its real-to-real upper bound (module docstring).

    The seed's notebook trains 500 epochs at 224×224×144 on a GPU; the defaults here are a CPU-sized version
    (32³ patches, 500 iterations, channels 8–64): raise ``iterations``/``channels`` for a faithful run. Training
    volumes are held in memory (about 5 bytes per voxel); test volumes are read one at a time.

    Args:
        train_real: subject → real training image (None: no upper bound).
        train_synthetic: subject → synthetic training image (same subjects and grids as ``train_labels``).
        train_labels, test_labels: subject → integer label map.
        test_real: subject → real test image.
        out_dir: where ``segment.csv`` / ``segment_summary.json`` (and, with ``save_models``,
            ``segment_{synthetic,real}.pt``) go.
        label_values: classes to learn (values or value → name); default every non-zero value in the training
            labels. Other values are background.
        regions: named unions of label values scored on the prediction, e.g. ``{"WT": [1, 2, 4]}`` for BraTS
            whole tumour (the only Dice the seed reports). When given, the headline ``dice`` is their mean;
            otherwise the mean over ``label_values``.
        patch_size: training patch and sliding-window ROI, voxels (divisible by 2^(levels − 1)).
        iterations, batch_size, lr, weight_decay, channels, num_res_units: training / network size.
        overlap, sw_batch_size: sliding-window inference.
        foreground_probability: chance a training patch is centred on a labelled voxel.
        schedule: learning-rate schedule kind (:class:`~volsynth.config.ScheduleConfig`; default constant).
        seed: seeds the weights and every iteration's patches; one seed gives the same numbers.
        device: torch device string.
        progress: show a progress bar per training.
        log: optional callback for progress lines.

    Returns:
        The summary (also written as JSON): ``synthetic`` and ``upper_bound`` (or None) each map ``dice`` (the
        headline) and ``dice_<class>`` to ``{"mean", "std", "n"}`` over test subjects.
    """
    _check_inputs(train_real, train_synthetic, train_labels, test_real, test_labels)
    train_subjects, test_subjects = sorted(train_synthetic), sorted(test_real)
    names = label_names(label_values)
    if not names:
        found: set[int] = set()
        for subject in train_subjects:
            found |= set(np.unique(read_labels(train_labels[subject])).tolist())
        names = {v: str(v) for v in sorted(found - {0})}
    if not names:
        raise DataError(f"{PROTOCOL} protocol: the training label maps contain no foreground (no non-zero label)")
    regions = {str(k): [int(v) for v in members] for k, members in (regions or {}).items()}
    kinds = typing.get_args(typing.get_type_hints(ScheduleConfig)["kind"])
    if schedule not in kinds:
        raise ConfigError(f"schedule {schedule!r} is not a schedule kind ({', '.join(kinds)})")
    patch = tuple(int(p) for p in patch_size)
    divisor = 2 ** (len(channels) - 1)
    if len(patch) != 3 or any(p % divisor for p in patch):
        raise ConfigError(f"patch_size {tuple(patch_size)} must be 3 sizes divisible by {divisor} (2^(levels − 1) "
                          f"for a UNet with channels {tuple(channels)})")
    s = SegmenterSettings(patch, int(iterations), int(batch_size), float(lr), float(weight_decay),  # type: ignore[arg-type]
                          tuple(int(c) for c in channels), int(num_res_units), float(overlap), int(sw_batch_size),
                          float(foreground_probability), int(seed), str(device), str(schedule))
    values = list(names)
    out = Path(out_dir)
    started = time.perf_counter()
    trainings: list[tuple[str, Mapping[str, VolumeInput]]] = [("synthetic", train_synthetic)]
    if train_real is not None:
        trainings.append(("real", train_real))
    rows: list[dict[str, Any]] = []
    final_loss: dict[str, float] = {}
    for tag, images in trainings:
        if log is not None:
            log(f"{PROTOCOL}: training on {tag} images ({len(train_subjects)} subjects)")
        volumes = _prepare(images, train_labels, train_subjects, values)
        model, losses = train_segmenter(volumes, len(values), s, progress=progress, log=log)
        final_loss[tag] = float(np.mean(losses[-10:])) if losses else math.nan
        rows.extend(_score(model, test_real, test_labels, names, regions, s, tag))
        if save_models:
            import torch

            from volsynth.utils import atomic_path

            with atomic_path(out / f"{PROTOCOL}_{tag}.pt") as tmp:
                torch.save(model.state_dict(), tmp)
        del model, volumes

    class_columns = [column("dice", r) for r in regions] + [column("dice", names[v]) for v in values]
    csv_name, summary_name = result_files(PROTOCOL)
    write_csv(out / csv_name, rows, ["model", "subject", *class_columns, "dice"])

    def stats(tag: str) -> dict[str, Any] | None:
        chosen = [r for r in rows if r["model"] == tag]
        return {c: summarise(r[c] for r in chosen) for c in ["dice", *class_columns]} if chosen else None

    summary: dict[str, Any] = {
        "protocol": PROTOCOL,
        "description": "segmenter trained on synthetic images with real labels, Dice on real test images; "
                       "upper bound = same training on the real images",
        "labels": {str(v): n for v, n in names.items()},
        "regions": regions,
        "headline": list(regions) or [names[v] for v in values],
        "empty_dice": 1.0,
        "synthetic": stats("synthetic"),
        "upper_bound": stats("real"),
        "final_train_loss": final_loss,
        "subjects": {"train": train_subjects, "test": test_subjects},
        "settings": {**asdict(s), "network": "monai.networks.nets.UNet", "loss": "DiceCELoss(softmax)",
                     "optimizer": "AdamW", "normalisation": "min-max per volume"},
        "seconds": round(time.perf_counter() - started, 3),
        "folder": str(out.resolve()),
        "csv": csv_name,
    }
    write_json(out / summary_name, summary)
    return summary
