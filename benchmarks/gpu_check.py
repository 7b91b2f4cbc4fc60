"""GPU check: every method's paper preset for one training step, paper-size prediction, a short real training.

    python benchmarks/gpu_check.py --out gpu_check.json [--phantom phantom.npz] [--train-seconds 120]
    python benchmarks/gpu_check.py --cpu-smoke --out tmp/gpu.json        # tiny sizes, CPU only, ~1-2 min
    python benchmarks/gpu_check.py --make-phantom phantom.npz            # needs volsynth's full dependencies

Needs only torch, MONAI, numpy, scikit-image (and PyYAML, which reads the presets): ``pip install -e . --no-deps``
plus those on a bare GPU machine. It imports no volsynth module that reads images (SimpleITK, nibabel, nilearn):
not ``volsynth.data.*``, ``volsynth.training.trainer`` or ``volsynth.inference`` (only ``--make-phantom`` does,
where volsynth is fully installed). Its training loop is a small copy of the trainer's per-iteration work (method
contract, schedules, weight averaging) and its patch sampler a copy of the paper's foreground-centred crops.

One JSON (``--out``, rewritten after every case, so a run cut short still leaves its results) with:

* ``environment``: torch/MONAI/CUDA versions, device name and memory, bf16 support, determinism settings;
* ``training_steps``: every registered method (each stage of staged methods) at its ``<name>-paper`` preset, one
  training iteration on a random batch of the preset's item shape, in fp16 (GradScaler) and bf16 autocast on
  CUDA (fp32 on a CPU): losses, seconds per step (median after a warm-up), peak GPU memory per case;
* ``predict``: the mdagan paper generator on a 160×192×160 volume through ``method.make_inferer`` +
  ``method.infer`` in fp32/fp16/bf16: seconds, peak memory, difference to fp32;
* ``phantom_training``: mdagan trained for ``--train-seconds`` on a phantom (``--phantom``: an ``.npz`` from
  ``--make-phantom``; otherwise a built-in numpy phantom), then SSIM/PSNR on held-out subjects;
* ``paper``: the paper's memory figures next to ours (Ha et al., WACV 2025, implementation details: one A40 40 GB,
  about 35 GB during training with batch 3 × 96³ and fp16 mixed precision, 1.6 GB during inference).

The paper preset's perception loss needs ImageNet VGG-19 weights, which are not downloaded: it runs with random
weights (``method.perception.weights=random``): the same network and FLOPs, only the loss values differ.
Exit status 0 when every case ran with finite losses, 1 otherwise (the JSON says which), 2 on a usage error.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import resource
import statistics
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from volsynth import __version__
from volsynth.config import ConfigError, ExperimentConfig, load_raw
from volsynth.experiment import load_config
from volsynth.methods import METHODS, Batch, StepContext, build_method
from volsynth.methods.base import autocast
from volsynth.training.ema import WeightAverage
from volsynth.training.optim import make_scheduler
from volsynth.utils import atomic_write_text, resolve_precision

FLAGSHIP = "mdagan"
# The VGG-19 ImageNet weights are not available offline; random weights keep the network and its cost.
RANDOM_VGG = ["method.perception.weights=random"]
# Modules a bare GPU machine lacks; the check must not need them (recorded if something loaded them anyway).
IMAGE_IO_MODULES = ("SimpleITK", "nibabel", "nilearn")
PAPER = {
    "reference": "Ha et al., WACV 2025, implementation details",
    "gpu": "one NVIDIA A40 40 GB (training and testing)",
    "training_vram_gb": 35.0,
    "training_min_vram_gb": 16.0,
    "inference_vram_gb": 1.6,
    "training_setting": "batch 3 × 96³ patches, fp16 mixed precision (the release autocasts only the losses, "
                        "generator and discriminator run in fp32, and has no gradient checkpointing)",
    "how_they_measured": "not stated; a GPU monitor reports the CUDA context plus PyTorch's cache, closest to our "
                         "peak reserved memory plus the context (~0.5 GB)",
}
# --cpu-smoke: the paper presets' data/train/inference/stages with the -cpu presets' networks and item sizes.
SMOKE_KEEP_PAPER = {FLAGSHIP: ("perception.weight", "perception.weights")}  # keep the perception loss running
# The flagship's VGG dominates a CPU step: a 16³ patch and an early VGG tap run the same code at a fraction of it.
SMOKE_FLAGSHIP = ["method.perception.layer=relu2_2", "inference.overlap=0.25"]
SMOKE = {"flagship_patch": 16, "per_step": 2, "depth_all": 8, "predict_shape": (32, 40, 32), "train_seconds": 10.0,
         "steps": 1, "warmup": 1, "predict_repeats": 1, "phantom_shape": (48, 56, 48), "phantom_subjects": 4}
STARTED = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - STARTED:7.1f} s] {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------------------
# Device bookkeeping: every timing is bracketed by synchronize, every case starts from a clean memory peak.


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fresh_memory(device: torch.device) -> None:
    """Free what earlier cases left and restart the peak counters (one case's peak is its own)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def memory(device: torch.device) -> dict[str, float | None]:
    """Peak GPU memory since :func:`fresh_memory` in GiB (allocated by tensors / reserved by the cache); on a CPU
    the process's peak resident memory so far (not per case)."""
    if device.type == "cuda":
        return {"peak_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30,
                "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30}
    return {"peak_allocated_gib": None, "peak_reserved_gib": None,
            "process_peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def timed(device: torch.device, fn: Any) -> tuple[float, Any]:
    synchronize(device)
    start = time.perf_counter()
    value = fn()
    synchronize(device)
    return time.perf_counter() - start, value


def seconds_summary(times: list[float], warmup: list[float]) -> dict[str, Any]:
    return {"median": statistics.median(times) if times else None, "mean": statistics.fmean(times) if times else None,
            "all": times, "warmup": warmup}


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0][:300] if text else ''}"


def cpu_has_bf16() -> bool:
    """Native bf16 on this CPU (AVX-512 BF16 / AMX); without it bf16 convolutions take a reference path that can
    be 10-100× slower than fp32 (the check then keeps bf16 to correctness tests)."""
    path = Path("/proc/cpuinfo")
    flags = path.read_text() if path.is_file() else ""
    return "avx512_bf16" in flags or "amx_bf16" in flags


def environment(device: torch.device, deterministic: bool) -> dict[str, Any]:
    import monai
    import skimage

    info: dict[str, Any] = {
        "python": platform.python_version(), "platform": platform.platform(), "volsynth": __version__,
        "torch": torch.__version__, "monai": monai.__version__, "numpy": np.__version__,
        "scikit_image": skimage.__version__, "torch_cuda": torch.version.cuda, "device": str(device),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "deterministic": deterministic,
        "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update({"device_name": props.name, "device_memory_gib": props.total_memory / 2**30,
                     "compute_capability": f"{props.major}.{props.minor}", "device_count": torch.cuda.device_count(),
                     "bf16_supported": torch.cuda.is_bf16_supported(), "cudnn": torch.backends.cudnn.version(),
                     "cudnn_benchmark": torch.backends.cudnn.benchmark, "tf32_conv": torch.backends.cudnn.allow_tf32,
                     "tf32_matmul": torch.backends.cuda.matmul.allow_tf32})
    else:
        info.update({"device_name": platform.processor() or "cpu", "bf16_supported": cpu_has_bf16()})
    return info


# ----------------------------------------------------------------------------------------------------------------
# Training steps


@dataclass
class Case:
    label: str  # "mdagan", "make_a_volume/slice"
    method: str
    stage: str | None
    preset: str
    overrides: list[str]
    config: ExperimentConfig
    precisions: list[str] = field(default_factory=list)


def dotted(section: dict[str, Any], prefix: str) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for key, value in section.items():
        path = f"{prefix}.{key}"
        out += dotted(value, path) if isinstance(value, dict) else [(path, value)]
    return out


def smoke_width_overrides(name: str) -> list[str]:
    """The ``<name>-cpu`` preset's network section as overrides (the project's own small version of each method)."""
    try:
        raw, _ = load_raw(f"{name}-cpu")
    except ConfigError:  # a method without a CPU preset keeps its paper widths
        return []
    keep = SMOKE_KEEP_PAPER.get(name, ())
    widths = [f"{key}={json.dumps(value)}" for key, value in dotted(raw.get("method", {}), "method")
              if key.removeprefix("method.") not in ("name", "stage", *keep)]
    return widths + (SMOKE_FLAGSHIP if name == FLAGSHIP else [])


def round_up(value: int, divisor: int) -> int:
    return -(-value // divisor) * divisor


def smoke_sizes(name: str, overrides: list[str]) -> list[str]:
    """The ``-cpu`` preset's item sizes (which its small networks accept; the flagship's patch is smaller), rounded
    up to the method's ``patch_divisor``, at most ``SMOKE["per_step"]`` items."""
    config = load_config(f"{name}-paper", overrides)
    try:
        small = load_config(f"{name}-cpu").data.sampling
    except ConfigError:
        small = config.data.sampling
    with torch.device("meta"):  # shapes only: nothing is initialised
        divisor = build_method(config.method, inference=True).patch_divisor
    patch = [SMOKE["flagship_patch"]] * 3 if name == FLAGSHIP else small.patch_size
    patch, plane = [round_up(p, divisor) for p in patch], [round_up(p, divisor) for p in small.in_plane]
    per_step = min(config.data.sampling.per_step, small.per_step, SMOKE["per_step"])
    return [f"data.sampling.patch_size={patch}", f"data.sampling.in_plane={plane}",
            f"data.sampling.per_step={per_step}", "inference.roi_size=null"]


def method_cases(names: list[str], precisions: list[str], *, smoke: bool, cuda: bool) -> list[Case]:
    """One case per method, or per stage of a staged method, each at its paper preset."""
    cases = []
    for name in names:
        preset = f"{name}-paper"
        base = RANDOM_VGG if name == FLAGSHIP else []
        widths = smoke_width_overrides(name) if smoke else []
        stages = load_config(preset, [*widths, *base]).stages
        for stage in stages or [None]:
            staged = [f"{k}={json.dumps(v)}" for k, v in stage.overrides.items()] if stage is not None else []
            overrides = [*widths, *staged, *base]
            if smoke:
                overrides += smoke_sizes(name, overrides)
            label = f"{name}/{stage.name}" if stage is not None else name
            cases.append(Case(label, name, stage.name if stage else None, preset, overrides,
                              load_config(preset, overrides), list(precisions)))
        if name == FLAGSHIP and cuda and not smoke:
            # The release has no gradient checkpointing in its perception loss: this is the memory to set beside
            # the paper's 35 GB (our preset checkpoints per slice chunk, a DEVIATION for memory only).
            overrides = [*base, "method.perception.checkpoint=false"]
            cases.append(Case(f"{name} (perception.checkpoint=false)", name, None, preset, overrides,
                              load_config(preset, overrides), ["fp16"]))
    return cases


def item_shape(config: ExperimentConfig, depth_all: int) -> tuple[int, ...]:
    """``data.sampling``'s item: patch → (B, 1, X, Y, Z); slab → (B, 1, H, W, D), slice axis last."""
    sampling = config.data.sampling
    if sampling.kind == "patch":
        return (sampling.per_step, 1, *sampling.patch_size)
    depth = depth_all if sampling.depth == "all" else int(sampling.depth)
    return (sampling.per_step, 1, *sampling.in_plane, depth)


def random_batch(config: ExperimentConfig, *, paired: bool, depth_all: int, seed: int) -> Batch:
    """Images on [0, 1]; the paired foreground mask; integer label maps when ``data.sampling.labels`` asks."""
    generator = torch.Generator().manual_seed(seed)
    shape = item_shape(config, depth_all)
    source, target = torch.rand(shape, generator=generator), torch.rand(shape, generator=generator)
    threshold = config.data.sampling.foreground_threshold
    mask = ((source > threshold) & (target > threshold)).float() if paired else None
    labels = None
    if config.data.sampling.labels is not None:  # tissue classes 0-3 (background, CSF, GM, WM)
        labels = (torch.randint(0, 4, shape, generator=generator), torch.randint(0, 4, shape, generator=generator))
    return Batch(source, target, mask, *(labels or (None, None)))


def training_step_case(case: Case, precision: str, device: torch.device, *, steps: int, warmup: int,
                       depth_all: int) -> dict[str, Any]:
    """Build the method on ``device`` and run ``warmup + steps`` iterations as the trainer does."""
    config = case.config
    entry: dict[str, Any] = {"case": case.label, "method": case.method, "stage": case.stage, "preset": case.preset,
                             "overrides": case.overrides, "precision": precision, "status": "error"}
    fresh_memory(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            torch.manual_seed(config.seed)  # network initialisation, as the trainer
            method = build_method(config.method)
            method.check_data(config.data)
            method.to(device).train()
            entry["parameters"] = method.parameter_counts()
            optimizers = method.configure_optimizers(config.train)
            scalers = {k: torch.amp.GradScaler(device.type, enabled=precision == "fp16") for k in optimizers}
            schedulers = [make_scheduler(o, config.train.schedule, config.train.iterations)
                          for o in optimizers.values()]
            trained = [p for o in optimizers.values() for group in o.param_groups for p in group["params"]]
            average = (WeightAverage(method, trained, decay=config.train.ema.decay, start=config.train.ema.start)
                       if config.train.ema.decay is not None else None)
            generator = torch.Generator()
            ctx = StepContext(device=device, precision=precision, optimizers=optimizers, scalers=scalers,
                              grad_clip=config.train.grad_clip, total_iterations=config.train.iterations,
                              generator=generator)
            batch = random_batch(config, paired=method.requires_paired_data, depth_all=depth_all,
                                 seed=config.seed).to(device)
            entry["item_shape"] = list(batch.source.shape)
            if device.type == "cuda":
                entry["allocated_after_build_gib"] = torch.cuda.memory_allocated(device) / 2**30

            def iteration_(index: int) -> dict[str, float]:
                torch.manual_seed(index)
                generator.manual_seed(index)
                ctx.iteration = index
                losses = method.train_step(batch, ctx)
                for scheduler in schedulers:
                    scheduler.step()
                if average is not None:
                    average.update(index)
                return losses

            times, warm, history = [], [], []
            for index in range(1, warmup + steps + 1):
                seconds, losses = timed(device, lambda index=index: iteration_(index))
                (warm if index <= warmup else times).append(seconds)
                history.append(losses)
            finite = all(math.isfinite(v) for losses in history for v in losses.values())
            entry.update({"status": "ok" if finite else "non-finite", "finite": finite, "losses": history[-1],
                          "loss_history": history, "seconds": seconds_summary(times, warm),
                          "items_per_second": entry["item_shape"][0] / statistics.median(times) if times else None})
        except torch.OutOfMemoryError as error:
            entry.update({"status": "oom", "error": first_line(error)})
        except Exception as error:  # one failing method must not hide the others' results
            entry.update({"status": "error", "error": first_line(error),
                          "traceback": traceback.format_exc(limit=-4)[-2000:]})
    entry.update(memory(device))
    entry["warnings"] = sorted({str(w.message).splitlines()[0][:240] for w in caught})[:12]
    return entry


# ----------------------------------------------------------------------------------------------------------------
# Paper-size prediction


def predict_section(device: torch.device, *, shape: tuple[int, int, int], precisions: list[str], repeats: int,
                    overrides: list[str]) -> dict[str, Any]:
    """The flagship's paper generator (random weights: timing and memory only) on one ``shape`` volume."""
    config = load_config(f"{FLAGSHIP}-paper", overrides)
    fresh_memory(device)
    torch.manual_seed(config.seed)
    method = build_method(config.method, inference=True).to(device).eval()  # no perception loss, no VGG
    inferer = method.make_inferer(config.inference, config.data)
    volume = np.random.default_rng(0).random(shape, dtype=np.float32)
    windows = [0]
    method.generator.register_forward_pre_hook(lambda _m, args: windows.__setitem__(0, windows[0] + len(args[0])))
    section: dict[str, Any] = {
        "method": FLAGSHIP, "preset": f"{FLAGSHIP}-paper", "overrides": overrides, "volume_shape": list(shape),
        "parameters": method.parameter_counts(), "inferer": repr(inferer), "paper_inference_vram_gb": 1.6,
        "results": [],
    }
    reference: np.ndarray | None = None
    for precision in precisions:
        entry: dict[str, Any] = {"precision": precision, "status": "error"}
        try:
            # One untimed batch of windows through the predictor: kernel selection and allocator warm-up.
            warm = torch.rand(config.inference.sw_batch_size, 1, *getattr(inferer, "roi_size", shape), device=device)
            with torch.inference_mode(), autocast(device, precision):
                entry["warmup_seconds"] = timed(device, lambda w=warm: method.translate(w))[0]
            del warm
            times = []
            output = None
            for _ in range(repeats):
                fresh_memory(device)
                windows[0] = 0
                seconds, output = timed(device, lambda p=precision: method.infer(volume, inferer, device=device,
                                                                                  precision=p, seed=0))
                times.append(seconds)
            assert output is not None
            finite = bool(np.isfinite(output).all())
            entry.update({"status": "ok" if finite else "non-finite", "finite": finite, "windows": windows[0],
                          "seconds": seconds_summary(times, [entry["warmup_seconds"]]), **memory(device),
                          "output_std": float(output.std())})
            if reference is None and precision == "fp32":
                reference = output
            elif reference is not None and reference.std() == 0:
                # Random weights can drive every voxel past the [0, 1] clip: equal outputs then prove nothing
                # about the precision (seen on an H200). phantom_training's precision_check measures it.
                entry["vs_fp32"] = "not informative: the random-weight fp32 output is constant (clipped)"
            elif reference is not None:
                difference = np.abs(output - reference)
                entry["vs_fp32"] = {"max_abs": float(difference.max()), "mean_abs": float(difference.mean())}
        except torch.OutOfMemoryError as error:
            entry.update({"status": "oom", "error": first_line(error), **memory(device)})
        except Exception as error:
            entry.update({"status": "error", "error": first_line(error),
                          "traceback": traceback.format_exc(limit=-4)[-2000:]})
        section["results"].append(entry)
        log(f"predict {precision}: {entry['status']} {entry.get('seconds', {}).get('median')}")
    return section


# ----------------------------------------------------------------------------------------------------------------
# Phantoms


def make_phantom(path: Path, *, subjects: int, spacing: float, seed: int) -> Path:
    """``volsynth phantom`` subjects, preprocessed as training does (RAS, min-max to [0, 1], padded to a multiple
    of 8, no foreground crop so all share one grid), saved as float16 t1/t2, uint8 mask: a few MB per subject.
    Needs volsynth's full dependencies (nibabel, SimpleITK): run it where volsynth is installed completely."""
    import tempfile

    from volsynth.config import DataConfig
    from volsynth.data.io import read_volume
    from volsynth.data.phantom import make_phantom_cohort
    from volsynth.data.preprocess import Preprocessor

    preprocessor = Preprocessor(DataConfig(), divisor=8, crop_foreground=False)
    arrays: dict[str, list[np.ndarray]] = {"t1": [], "t2": [], "mask": []}
    with tempfile.TemporaryDirectory() as tmp:
        manifest_path = make_phantom_cohort(Path(tmp) / "cohort", subjects, seed=seed, spacing=spacing,
                                            contrasts=["t1", "t2"], montage=False, ideal=False)
        manifest = json.loads(Path(manifest_path).read_text())
        root = Path(manifest_path).parent
        names, spacings = [], []
        for subject in manifest["subjects"]:
            t1, t2 = (read_volume(root / subject["images"][m]) for m in ("t1", "t2"))
            record = preprocessor.fit(t1, t2)
            arrays["t1"].append(preprocessor.apply(t1, record, "source").astype(np.float16))
            arrays["t2"].append(preprocessor.apply(t2, record, "target").astype(np.float16))
            arrays["mask"].append(preprocessor.apply_label(read_volume(root / subject["mask"]), record) > 0)
            names.append(subject["subject"])
            spacings.append(record.working.spacing)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, t1=np.stack(arrays["t1"]), t2=np.stack(arrays["t2"]),
                        mask=np.stack(arrays["mask"]).astype(np.uint8), spacing=np.asarray(spacings[0], np.float32),
                        subjects=np.asarray(names))
    return path


def builtin_phantom(subjects: int, shape: tuple[int, int, int], seed: int) -> dict[str, Any]:
    """A numpy-only stand-in when no ``--phantom`` is given: ellipsoidal heads with CSF/GM/WM (wavy boundaries),
    ventricles, a lesion in half the subjects, a smooth bias field and noise; T1 and T2 contrasts of the same
    anatomy (T1: WM bright, CSF dark; T2 the reverse). Same seed, same arrays."""
    axes = [np.linspace(-1.0, 1.0, n, dtype=np.float32) for n in shape]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    t1_of = np.array([0.0, 0.25, 0.6, 0.85, 0.4], np.float32)  # background, CSF, GM, WM, lesion
    t2_of = np.array([0.0, 1.0, 0.65, 0.45, 0.9], np.float32)
    out: dict[str, list[np.ndarray]] = {"t1": [], "t2": [], "mask": []}  # per subject: (X, Y, Z)
    for index in range(subjects):
        rng = np.random.default_rng([seed, index])
        rx, ry, rz = 0.85 * (1 + 0.06 * rng.standard_normal(3))
        radius = np.sqrt((x / rx) ** 2 + (y / ry) ** 2 + (z / rz) ** 2)
        wave = 0.04 * np.sin(7 * x + rng.uniform(0, 6)) * np.cos(5 * y + rng.uniform(0, 6)) * np.sin(6 * z)
        labels = np.zeros(shape, np.int64)
        labels[radius < 1.0] = 1  # CSF and skull band
        labels[radius < 0.88 + wave] = 2  # grey matter
        labels[radius < 0.62 + 2 * wave] = 3  # white matter
        for side in (-1, 1):  # lateral ventricles
            labels[((x - 0.15 * side) / 0.09) ** 2 + (y / 0.3) ** 2 + ((z - 0.05) / 0.12) ** 2 < 1] = 1
        if index % 2:
            (cx, cy, cz), size = rng.uniform(-0.3, 0.3, 3), rng.uniform(0.08, 0.14)
            labels[(x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2 < size**2] = 4
        bias = 1 + 0.1 * (rng.standard_normal() * x + rng.standard_normal() * y + rng.standard_normal() * z)
        for key, table in (("t1", t1_of), ("t2", t2_of)):
            image = np.abs(table[labels] * bias + 0.02 * rng.standard_normal(shape, dtype=np.float32))
            out[key].append((image / image.max()).astype(np.float32))
        out["mask"].append(labels > 0)
    return {**out, "spacing": None, "subjects": [f"builtin_{i:03d}" for i in range(subjects)]}


def unit_scale(array: np.ndarray) -> np.ndarray:
    """float32 on [0, 1]; arrays outside [0, 1] are min-max scaled per volume (as volsynth's MR preprocessing)."""
    array = np.asarray(array, dtype=np.float32)
    low, high = float(array.min()), float(array.max())
    return array if low >= 0 and high <= 1 else (array - low) / max(high - low, 1e-12)


def load_phantom(path: Path) -> dict[str, Any]:
    with np.load(path, allow_pickle=False) as data:
        missing = {"t1", "t2", "mask"} - set(data.files)
        if missing:
            raise SystemExit(f"error: {path} lacks arrays {sorted(missing)} (expected t1, t2, mask of shape "
                             "(N, X, Y, Z) and spacing)")
        t1, t2, mask = data["t1"], data["t2"], data["mask"]
        spacing = data["spacing"].tolist() if "spacing" in data.files else None
        names = [str(n) for n in data["subjects"]] if "subjects" in data.files else None
    if t1.ndim != 4 or t1.shape != t2.shape or t1.shape != mask.shape or len(t1) < 2:
        raise SystemExit(f"error: {path}: t1 {t1.shape}, t2 {t2.shape}, mask {mask.shape}: expected equal shapes "
                         "(N, X, Y, Z) with N >= 2")
    return {"t1": [unit_scale(v) for v in t1], "t2": [unit_scale(v) for v in t2], "mask": [m > 0 for m in mask],
            "spacing": spacing, "subjects": names or [f"subject_{i:03d}" for i in range(len(t1))]}


def crop(array: np.ndarray, start: list[int], size: tuple[int, ...]) -> np.ndarray:
    """``array[start : start + size]``, zero-padded where the window leaves the array."""
    inner = tuple(slice(max(s, 0), min(s + n, d)) for s, n, d in zip(start, size, array.shape, strict=True))
    block = array[inner]
    before = [max(0, -s) for s in start]
    after = [n - b - k for n, b, k in zip(size, before, block.shape, strict=True)]
    return np.pad(block, list(zip(before, after, strict=True))) if any(before) or any(after) else block


def sample_patches(rng: np.random.Generator, sources: list[np.ndarray], targets: list[np.ndarray],
                   centres: list[np.ndarray], config: ExperimentConfig) -> Batch:
    """The paper's sampling: one subject per step, ``per_step`` patches centred on foreground voxels."""
    sampling = config.data.sampling
    index = int(rng.integers(len(sources)))
    source, target, candidates = sources[index], targets[index], centres[index]
    size = tuple(sampling.patch_size)
    starts = []
    for _ in range(sampling.per_step):
        if len(candidates) and rng.random() < sampling.foreground_probability:
            centre = np.unravel_index(int(candidates[rng.integers(len(candidates))]), source.shape)
        else:
            centre = tuple(int(rng.integers(n)) for n in source.shape)
        # Inside the volume when the patch fits (as volsynth's sampler), else the volume centred in the patch.
        starts.append([-((p - n) // 2) if n < p else int(min(max(int(c) - p // 2, 0), n - p))
                       for c, p, n in zip(centre, size, source.shape, strict=True)])
    stack = [np.stack([crop(a, s, size) for s in starts])[:, None] for a in (source, target)]
    tensors = [torch.from_numpy(np.ascontiguousarray(a)) for a in stack]
    threshold = sampling.foreground_threshold
    return Batch(tensors[0], tensors[1], ((tensors[0] > threshold) & (tensors[1] > threshold)).float())


def phantom_training(device: torch.device, *, data: dict[str, Any], origin: str, seconds: float, overrides: list[str],
                     precision: str) -> dict[str, Any]:
    """Train the flagship for ``seconds`` on the phantom's training subjects, then score the held-out ones."""
    from volsynth.metrics import mae, nmse, psnr, ssim

    config = load_config(f"{FLAGSHIP}-paper", overrides)
    if config.data.sampling.kind != "patch":
        raise SystemExit("error: the phantom training samples 3D patches; keep data.sampling.kind=patch")
    n = len(data["t1"])
    test = [i for i in range(n) if i % 4 == 0]  # the paper's split rule: every 4th subject is a test subject
    train = [i for i in range(n) if i not in test]
    threshold = config.data.sampling.foreground_threshold
    sources, targets = [data["t1"][i] for i in train], [data["t2"][i] for i in train]
    centres = [np.flatnonzero((s > threshold) & (t > threshold)) for s, t in zip(sources, targets, strict=True)]
    section: dict[str, Any] = {
        "method": FLAGSHIP, "preset": f"{FLAGSHIP}-paper", "overrides": overrides, "precision": precision,
        "data": {"origin": origin, "subjects": n, "shape": list(data["t1"][0].shape), "spacing": data["spacing"],
                 "train": [data["subjects"][i] for i in train], "test": [data["subjects"][i] for i in test]},
        "seconds_budget": seconds, "status": "error",
    }
    fresh_memory(device)
    torch.manual_seed(config.seed)
    method = build_method(config.method).to(device).train()
    optimizers = method.configure_optimizers(config.train)
    scalers = {k: torch.amp.GradScaler(device.type, enabled=precision == "fp16") for k in optimizers}
    schedulers = [make_scheduler(o, config.train.schedule, config.train.iterations) for o in optimizers.values()]
    generator = torch.Generator()
    ctx = StepContext(device=device, precision=precision, optimizers=optimizers, scalers=scalers,
                      grad_clip=config.train.grad_clip, total_iterations=config.train.iterations, generator=generator)
    curve, iteration, began = [], 0, time.perf_counter()
    losses: dict[str, float] = {}
    while time.perf_counter() - began < seconds and iteration < config.train.iterations:
        iteration += 1
        seed = int(np.random.SeedSequence([config.seed, iteration]).generate_state(1)[0])
        batch = sample_patches(np.random.default_rng(seed), sources, targets, centres, config).to(device)
        torch.manual_seed(seed)
        generator.manual_seed(seed)
        ctx.iteration = iteration
        losses = method.train_step(batch, ctx)
        for scheduler in schedulers:
            scheduler.step()
        if iteration % 10 == 0 or iteration == 1:
            curve.append({"iteration": iteration, "seconds": time.perf_counter() - began, **losses})
        if not all(math.isfinite(v) for v in losses.values()):
            section.update({"status": "diverged", "error": f"non-finite loss at iteration {iteration}: {losses}"})
            break
    synchronize(device)
    trained_for = time.perf_counter() - began
    section.update({"iterations": iteration, "seconds": trained_for, "seconds_per_iteration": trained_for / iteration,
                    "last_losses": losses, "loss_curve": curve, **memory(device)})
    log(f"phantom training: {iteration} iterations in {trained_for:.1f} s ({precision})")
    if section["status"] == "diverged":
        return section
    inferer = method.make_inferer(config.inference, config.data)
    evaluation = config.inference.precision
    if evaluation == "auto":
        evaluation = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    scores = []
    for i in test:
        source, target, mask = data["t1"][i], data["t2"][i], data["mask"][i]
        seconds_, synthetic = timed(device, lambda s=source: method.infer(s, inferer, device=device,
                                                                            precision=evaluation, seed=0))
        scores.append({
            "subject": data["subjects"][i], "predict_seconds": seconds_,
            "ssim": ssim(synthetic, target, data_range=1.0), "psnr": psnr(synthetic, target, data_range=1.0),
            "mae": mae(synthetic, target), "nmse": nmse(synthetic, target),
            "ssim_mask": ssim(synthetic, target, data_range=1.0, mask=mask),
            "psnr_mask": psnr(synthetic, target, data_range=1.0, mask=mask),
            # The source itself as the "translation": what a model must beat to have learnt anything.
            "identity_ssim": ssim(source, target, data_range=1.0),
            "identity_psnr": psnr(source, target, data_range=1.0),
        })
    keys = [k for k in scores[0] if k != "subject"]
    finite = all(math.isfinite(s[k]) for s in scores for k in ("ssim", "psnr"))
    section["precision_check"] = precision_check(method, inferer, device, data, test[0], evaluation)
    section.update({"status": "ok" if finite else "non-finite", "evaluation_precision": evaluation,
                    "metrics": "volsynth.metrics (whole volume, data_range 1; *_mask inside the phantom mask)",
                    "test": scores, "mean": {k: float(np.mean([s[k] for s in scores])) for k in keys}})
    return section


def precision_check(method: Any, inferer: Any, device: torch.device, data: dict[str, Any], subject: int,
                    reference_precision: str) -> dict[str, Any]:
    """The trained flagship on one test subject in each autocast precision the device runs natively, against
    ``reference_precision``: max/mean absolute difference of the synthetic volumes and their PSNR to the target."""
    from volsynth.metrics import psnr

    precisions = ["fp32", "fp16", "bf16"] if device.type == "cuda" else ["fp32", "bf16"] if cpu_has_bf16() else []
    source, target = data["t1"][subject], data["t2"][subject]
    outputs = {p: method.infer(source, inferer, device=device, precision=p, seed=0)
               for p in dict.fromkeys([reference_precision, *precisions])}
    reference = outputs[reference_precision]
    check: dict[str, Any] = {"subject": data["subjects"][subject], "reference": reference_precision,
                             "reference_std": float(reference.std())}
    for precision, output in outputs.items():
        difference = np.abs(output - reference)
        check[precision] = {"psnr": psnr(output, target, data_range=1.0), "max_abs": float(difference.max()),
                            "mean_abs": float(difference.mean())}
    return check


# ----------------------------------------------------------------------------------------------------------------
# Main


def paper_comparison(document: dict[str, Any]) -> dict[str, Any]:
    """Our peak memory beside the paper's VRAM figures (GiB; the paper's 'GB' as printed) and their ratio."""

    def row(entry: dict[str, Any], paper: float) -> dict[str, Any]:
        reserved = entry.get("peak_reserved_gib")
        return {"peak_reserved_gib": reserved, "peak_allocated_gib": entry.get("peak_allocated_gib"),
                "reserved_over_paper": reserved / paper if reserved is not None else None,
                "item_shape": entry.get("item_shape"), "seconds": (entry.get("seconds") or {}).get("median")}

    steps = [e for e in document.get("training_steps", []) if e["method"] == FLAGSHIP and e["status"] == "ok"]
    predict = [e for e in document.get("predict", {}).get("results", []) if e["status"] == "ok"]
    return {
        "paper_training_vram_gb": PAPER["training_vram_gb"], "paper_inference_vram_gb": PAPER["inference_vram_gb"],
        "training_mdagan": {f"{e['case']} {e['precision']}": row(e, PAPER["training_vram_gb"]) for e in steps},
        "inference_mdagan": {e["precision"]: row(e, PAPER["inference_vram_gb"]) for e in predict},
    }


def summarise(document: dict[str, Any]) -> dict[str, Any]:
    failures = [f"training step {e['case']} {e['precision']}: {e['status']} {e.get('error', '')}".strip()
                for e in document.get("training_steps", []) if e["status"] != "ok"]
    failures += [f"predict {e['precision']}: {e['status']} {e.get('error', '')}".strip()
                 for e in document.get("predict", {}).get("results", []) if e["status"] != "ok"]
    phantom = document.get("phantom_training")
    if phantom is not None and phantom.get("status") != "ok":
        failures.append(f"phantom training: {phantom.get('status')} {phantom.get('error', '')}".strip())
    return {"ok": not failures, "failures": failures, "seconds": time.perf_counter() - STARTED,
            "image_io_modules_loaded": [m for m in IMAGE_IO_MODULES if m in sys.modules]}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"), help="the JSON report")
    parser.add_argument("--device", default="auto", help="auto | cuda | cuda:N | cpu")
    parser.add_argument("--cpu-smoke", action="store_true", help="CPU, tiny networks and sizes (~1-2 min)")
    parser.add_argument("--sections", nargs="+", default=["steps", "predict", "train"],
                        choices=["steps", "predict", "train"])
    parser.add_argument("--methods", nargs="+", default=None, help="registered methods (default: all)")
    parser.add_argument("--precisions", nargs="+", default=None, choices=["fp32", "fp16", "bf16"],
                        help="training-step autocast (default: fp16 bf16 on CUDA, fp32 on a CPU)")
    parser.add_argument("--steps", type=int, default=None, help="timed training steps per case (default 3)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 1)")
    parser.add_argument("--depth-all", type=int, default=None, help="slices of a depth-'all' slab (default 64)")
    parser.add_argument("--predict-shape", type=int, nargs=3, default=None, help="default 160 192 160")
    parser.add_argument("--predict-precisions", nargs="+", default=None, choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--predict-repeats", type=int, default=None, help="timed runs per precision (default 2)")
    parser.add_argument("--phantom", type=Path, default=None, help="phantom .npz (t1, t2, mask: (N, X, Y, Z))")
    parser.add_argument("--train-seconds", type=float, default=None, help="phantom training time (default 120)")
    parser.add_argument("--train-precision", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                        help="auto: fp16 on CUDA, bf16 on a CPU with native bf16, else fp32")
    parser.add_argument("--train-set", action="append", default=[], metavar="KEY=VALUE",
                        help="overrides of the phantom training (default: method.perception.weight=0)")
    parser.add_argument("--deterministic", action=argparse.BooleanOptionalAction, default=True,
                        help="torch.use_deterministic_algorithms(warn_only) as train.deterministic (default on)")
    parser.add_argument("--make-phantom", type=Path, default=None, metavar="PATH.npz",
                        help="write a phantom .npz (needs volsynth's full dependencies) and exit")
    parser.add_argument("--phantom-subjects", type=int, default=8)
    parser.add_argument("--phantom-spacing", type=float, default=2.0, help="mm (2: ~104×120×96 voxels)")
    parser.add_argument("--phantom-seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.make_phantom is not None:
        path = make_phantom(args.make_phantom, subjects=args.phantom_subjects, spacing=args.phantom_spacing,
                            seed=args.phantom_seed)
        log(f"phantom written to {path} ({path.stat().st_size / 2**20:.1f} MiB)")
        return 0
    smoke = args.cpu_smoke
    if smoke:
        device = torch.device("cpu")
    elif args.device == "auto":
        if not torch.cuda.is_available():
            print("error: no CUDA device; pass --cpu-smoke for a tiny CPU run (or --device cpu for paper sizes on "
                  "the CPU, which takes hours)", file=sys.stderr)
            return 2
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device(args.device)
    if device.type == "cuda":
        if device.index is None:  # "cuda" → the current device, so that set_device and the counters take it
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    cuda = device.type == "cuda"
    if args.deterministic:  # what `volsynth train` does with train.deterministic (the presets' default)
        torch.use_deterministic_algorithms(True, warn_only=True)

    def pick(value: Any, small: Any, large: Any) -> Any:
        return value if value is not None else (small if smoke else large)

    steps, warmup = pick(args.steps, SMOKE["steps"], 3), pick(args.warmup, SMOKE["warmup"], 1)
    depth_all = pick(args.depth_all, SMOKE["depth_all"], 64)
    # CPU: fp32 only by default. torch 2.13's CPU bf16 conv3d backward returns wrong or non-finite weight gradients
    # whenever a conv's output is 2³ (31 + 5 of 40 trials on an AVX-512 BF16 EPYC; the smoke networks have such
    # convs), so a bf16 step there tests torch, not volsynth. `--precisions fp32 bf16` still runs it.
    precisions = args.precisions or (["fp16", "bf16"] if cuda else ["fp32"])
    names = args.methods or METHODS.names()
    unknown = sorted(set(names) - set(METHODS.names()))
    if unknown:
        print(f"error: unknown methods {unknown}; registered: {METHODS.names()}", file=sys.stderr)
        return 2
    document: dict[str, Any] = {
        "format": "volsynth-gpu-check", "version": 1, "argv": sys.argv[1:] if argv is None else argv,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "mode": "cpu-smoke" if smoke else device.type, "environment": environment(device, args.deterministic),
        "paper": PAPER, "notes": [
            f"{FLAGSHIP}'s perception loss uses random VGG-19 weights (method.perception.weights=random): the ImageNet "
            "weights are not available offline; the network and its cost are the paper's, the loss values are not.",
            "Training steps use random batches of each preset's item shape (depth 'all' slabs: --depth-all slices).",
        ],
    }
    if smoke:
        document["notes"].append("--cpu-smoke: each paper preset with its -cpu preset's networks and item sizes "
                                 f"(the flagship: {SMOKE['flagship_patch']}³ patches, VGG tapped at relu2_2, "
                                 "overlap 0.25): a test of the code path, not of the paper's cost.")

    def save() -> None:
        document["summary"] = summarise(document)
        if "training_steps" in document or "predict" in document:
            document["paper_comparison"] = paper_comparison(document)
        atomic_write_text(args.out, json.dumps(document, indent=2) + "\n")

    save()
    if "steps" in args.sections:
        document["training_steps"] = []
        for case in method_cases(names, precisions, smoke=smoke, cuda=cuda):
            for precision in case.precisions:
                # Without native bf16 (most CPUs) a bf16 step can take 10-100× an fp32 one: one step, no warm-up.
                slow = device.type == "cpu" and precision != "fp32" and not cpu_has_bf16()
                entry = training_step_case(case, precision, device, steps=1 if slow else steps,
                                           warmup=0 if slow else warmup, depth_all=depth_all)
                document["training_steps"].append(entry)
                log(f"step {case.label} {precision}: {entry['status']} "
                    f"{(entry.get('seconds') or {}).get('median')} s, {entry.get('peak_reserved_gib')} GiB reserved")
                save()
    if "predict" in args.sections:
        overrides = []
        if smoke:
            overrides = [*smoke_width_overrides(FLAGSHIP), "method.perception.weight=0"]
            overrides += smoke_sizes(FLAGSHIP, overrides)
        shape = tuple(args.predict_shape or (SMOKE["predict_shape"] if smoke else (160, 192, 160)))
        document["predict"] = predict_section(
            device, shape=shape, repeats=pick(args.predict_repeats, SMOKE["predict_repeats"], 2), overrides=overrides,
            precisions=args.predict_precisions or (["fp32", "fp16", "bf16"] if cuda else
                                                   ["fp32", "bf16"] if cpu_has_bf16() else ["fp32"]))
        save()
    if "train" in args.sections:
        if args.phantom is not None:
            data, origin = load_phantom(args.phantom), f"{args.phantom} (--phantom)"
        else:
            shape = SMOKE["phantom_shape"] if smoke else (160, 192, 160)
            subjects = SMOKE["phantom_subjects"] if smoke else 8
            data = builtin_phantom(subjects, shape, seed=0)
            origin = "built-in numpy phantom (no --phantom given; not volsynth.data.phantom)"
        overrides = [*RANDOM_VGG, "method.perception.weight=0"]
        if smoke:
            overrides = [*smoke_width_overrides(FLAGSHIP), *overrides]
            overrides += smoke_sizes(FLAGSHIP, overrides)
        overrides += args.train_set
        precision = args.train_precision
        if precision == "auto":  # what train.precision=auto trains in on this device
            precision = resolve_precision(precision, device)
        seconds = pick(args.train_seconds, SMOKE["train_seconds"], 120.0)
        try:
            document["phantom_training"] = phantom_training(device, data=data, origin=origin, seconds=seconds,
                                                            overrides=overrides, precision=precision)
        except Exception as error:  # keep the other sections' results and say what failed
            document["phantom_training"] = {"status": "oom" if isinstance(error, torch.OutOfMemoryError) else "error",
                                            "error": first_line(error), "overrides": overrides,
                                            "traceback": traceback.format_exc(limit=-4)[-2000:], **memory(device)}
        document["notes"].append("phantom training: the flagship without its perception loss by default "
                                 "(method.perception.weight=0; random VGG features are no perceptual loss); "
                                 "--train-set changes it.")
        save()
    failures = document["summary"]["failures"]
    log(f"wrote {args.out}: {'FAILURES: ' + '; '.join(failures) if failures else 'ok'}")
    return 0 if document["summary"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
