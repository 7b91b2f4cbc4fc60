"""``volsynth demo``: the whole pipeline on a phantom cohort, on CPU, in minutes.

phantom (T1 → T2 pairs with lesions, its split and its physical ceiling) → train each method from its ``demo``
settings → predict the test subjects on their native grids → evaluate (paper profile, brain mask, ceiling) →
tissue-segmentation downstream check → HTML report, and one summary line per method.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from volsynth.config import resolve_config_path
from volsynth.errors import OutputError, VolsynthError

if TYPE_CHECKING:
    from volsynth.config import ExperimentConfig
    from volsynth.run import RunFolder


class DemoError(VolsynthError, RuntimeError):
    """A step of the demo failed; the message says which and where its log is."""


@dataclass(frozen=True)
class DemoSettings:
    """What the demo runs. Its CPU settings differ from the paper presets (and the report says so).

    Each method trains from its ``<method>-cpu`` preset (laid out for learning speed on CPUs, see those files and
    benchmarks/RESULTS.md); the trainings run side by side, one core each, capped at ``train.max_seconds``.
    """

    subjects: int = 8
    spacing: float = 3.0
    iterations: int | None = None  # None: each method's own count below
    methods: tuple[str, ...] = ("mdagan", "regression_unet")
    # The CPU presets are laid out for learning speed on CPUs; the demo adds a wall-clock cap per training.
    # time_box: on a CPU too slow to finish a preset's iterations in 290 s, the learning rate still anneals and the
    # schedule's phases (mdagan's adversarial start) still come, by the clock, instead of the run being cut mid-way.
    overrides: tuple[str, ...] = ("train.max_seconds=290", "train.time_box=true")
    per_method: dict[str, tuple[str, ...]] = field(default_factory=dict)
    normalise: str = "target"  # how evaluate scales the prediction (see `volsynth evaluate --help`)


def run_demo(out: str | Path, *, seed: int = 0, subjects: int | None = None, iterations: int | None = None,
             spacing: float | None = None, methods: Sequence[str] | None = None, progress: bool = True,
             settings: DemoSettings | None = None) -> Path:
    """Run the demo into ``out``; returns the report's ``index.html``."""
    from volsynth.data.phantom import make_phantom_cohort
    from volsynth.evaluation.downstream import run_downstream
    from volsynth.evaluation.evaluate import evaluate_predictions
    from volsynth.evaluation.report import build_report
    from volsynth.experiment import load_config
    from volsynth.inference.predict import predict
    from volsynth.run import RunFolder

    base = settings or DemoSettings()
    chosen = DemoSettings(subjects=subjects or base.subjects, spacing=spacing or base.spacing,
                          iterations=iterations or base.iterations, methods=tuple(methods or base.methods),
                          overrides=base.overrides, per_method=base.per_method, normalise=base.normalise)
    out = Path(out)
    timings: dict[str, float] = {}
    began = time.perf_counter()
    for name in chosen.methods:  # fail before any work when a preset is missing
        resolve_config_path(f"{name}-cpu")
    record = {"demo": True, "seed": seed, "subjects": chosen.subjects, "spacing": chosen.spacing,
              "iterations": chosen.iterations, "methods": list(chosen.methods), "overrides": list(chosen.overrides),
              "per_method": {k: list(v) for k, v in chosen.per_method.items()},
              "note": "CPU demo settings, not the paper presets"}
    check_out(out, record)
    manifest = out / "phantom" / "manifest.json"
    if not manifest.is_file():
        _say(f"[demo] phantom cohort: {chosen.subjects} subjects at {chosen.spacing} mm", progress)
        manifest = make_phantom_cohort(out / "phantom", chosen.subjects, seed=seed, spacing=chosen.spacing,
                                       progress=progress)
    timings["phantom"] = time.perf_counter() - began
    _write_json(out / "demo.json", record)
    runs = {name: RunFolder.of(out / "runs" / name) for name in chosen.methods}
    overrides = {name: [*chosen.overrides, *chosen.per_method.get(name, ()),
                        *([f"train.iterations={chosen.iterations}"] if chosen.iterations else []),
                        "train.progress=false", f"seed={seed}"] for name in chosen.methods}
    for name in chosen.methods:  # every setting is checked before any training starts
        config = load_config(f"{name}-cpu", [f"data.manifest={manifest.resolve()}", *overrides[name]])
        check_finished_run(runs[name], config, out)
    start = time.perf_counter()
    to_train = [name for name in chosen.methods if not runs[name].last.is_file()]
    if to_train:
        _say(f"[demo] training {', '.join(to_train)} ({min(len(to_train), _workers())} at a time, one thread each; "
             f"logs in {out / 'logs'})", progress)
        _train_in_parallel({name: (runs[name], overrides[name]) for name in to_train}, manifest, out / "logs",
                           progress)
    timings["train"] = time.perf_counter() - start
    lines = []
    for name in chosen.methods:
        run = runs[name]
        start = time.perf_counter()
        test_subjects = run.read_splits()["test"]
        predict(run.last, manifest, run.predictions, subjects=test_subjects, progress=False, overwrite=True)
        timings[f"predict_{name}"] = time.perf_counter() - start
        result = evaluate_predictions(run.predictions, manifest, out_dir=run.evaluation, profile="paper",
                                      normalise=chosen.normalise)
        # The paper's exact definition (the prediction min-max normalised too) beside it, for comparison.
        exact = evaluate_predictions(run.predictions, manifest, out_dir=run.root / "evaluation_paper",
                                     profile="paper", normalise="paper")
        try:
            tissue = run_downstream(run.root, protocol="tissue")
        except ValueError as error:  # e.g. a barely trained model's flat output has no tissues to segment
            _say(f"[demo] downstream tissue check skipped for {name}: {error}", progress)
            tissue = {}
        lines.append(_summary_line(name, result.summary, exact.summary, tissue, _training_seconds(run)))
    _say("[demo] writing the report", progress)
    index = build_report([runs[name].root for name in chosen.methods], out / "report")
    timings["total"] = time.perf_counter() - began
    _write_json(out / "timings.json", {k: round(v, 1) for k, v in timings.items()})
    for line in lines:
        _say(line, progress)
    return index


# Settings a finished demo training may have been run with differently without changing what it learnt. The
# manifest's path changes when the demo folder is moved; its cohort is the one demo.json records (check_out).
_REPORTING_KEYS = ("train.progress", "train.threads", "train.log_every", "train.tensorboard", "data.cache_dir",
                   "data.manifest")


def check_finished_run(run: RunFolder, config: ExperimentConfig, out: Path) -> None:
    """Refuse to reuse a finished training whose saved settings differ from what this demo would train now (e.g.
    a preset changed in a newer volsynth): its scores would be reported as this version's. ``None`` in the new
    config (resolved later by the trainer, such as the task) is not compared."""
    if not run.last.is_file():
        return
    from volsynth.training.trainer import changed_settings

    changed = changed_settings(run.last, config, ignore=_REPORTING_KEYS, skip_unset=True)
    if changed:
        detail = "; ".join(f"{k} {old!r} → {new!r}" for k, (old, new) in list(changed.items())[:4])
        more = f" and {len(changed) - 4} more" if len(changed) > 4 else ""
        raise OutputError(f"{run.root} was trained with other settings than this demo's ({detail}{more}); its "
                          f"scores would not be this version's. Choose another --out or remove {out}")


def check_out(out: Path, record: dict[str, Any]) -> None:
    """Refuse an output folder that is not this demo's: a demo folder is re-entered (its phantom and finished
    trainings reused) only with the same settings, and nothing is written into a folder that holds anything else."""
    recorded_path = out / "demo.json"
    if recorded_path.is_file():
        try:
            recorded = json.loads(recorded_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise OutputError(f"{recorded_path} is unreadable ({error}); remove {out} or choose another --out"
                              ) from None
        changed = [f"{key} {recorded.get(key)!r} → {value!r}" for key, value in record.items()
                   if key != "note" and recorded.get(key) != value]
        if changed:
            raise OutputError(f"{out} holds a demo run with other settings ({'; '.join(changed)}); it would reuse "
                              f"that phantom and those trained models. Choose another --out or remove {out}")
    elif out.is_dir() and any(out.iterdir()):
        raise OutputError(f"{out} exists and is not a demo folder (no demo.json); choose another --out")
    elif out.exists() and not out.is_dir():
        raise OutputError(f"{out} exists and is not a folder")


def _workers() -> int:
    """Trainings at a time: one per core (each uses one thread; on 2 cores two trainings beat one with 2 threads)."""
    return max(1, os.cpu_count() or 1)


def _train_in_parallel(jobs: dict[str, tuple[Any, list[str]]], manifest: Path, logs: Path, progress: bool) -> None:
    """Train each method with `volsynth train` in its own process (one thread each), a few at a time."""
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    pending, running = list(jobs.items()), []
    while pending or running:
        while pending and len(running) < _workers():
            name, (run, overrides) = pending.pop(0)
            log = (logs / f"train_{name}.log").open("w")
            command = [sys.executable, "-m", "volsynth.cli", "train", "--config", f"{name}-cpu", "--data",
                       str(manifest.resolve()), "--out", str(run.root), *(f"--set={o}" for o in overrides)]
            running.append((name, subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env), log))
        time.sleep(1)
        for item in list(running):
            name, process, log = item
            if process.poll() is None:
                continue
            log.close()
            running.remove(item)
            if process.returncode != 0:
                for _, other, _ in running:
                    other.kill()
                tail = (logs / f"train_{name}.log").read_text(errors="replace").strip().splitlines()[-5:]
                raise DemoError(f"training {name} failed (exit {process.returncode}); see {logs / f'train_{name}.log'}:"
                                f" {' | '.join(tail)}")
            _say(f"[demo] {name} trained ({_training_seconds(jobs[name][0]):.0f} s)", progress)


def _training_seconds(run: Any) -> float:
    """Cumulative training seconds from the run's log (the demo's per-method wall time)."""
    if not run.log.is_file():
        return float("nan")
    rows = run.log.read_text().strip().splitlines()
    return float(rows[-1].split(",")[1]) if len(rows) > 1 else float("nan")


def _summary_line(name: str, summary: dict[str, Any], exact: dict[str, Any], tissue: dict[str, Any],
                  seconds: float) -> str:
    """One line per method: PSNR (and the ceiling), masked NMSE, tissue Dice, distance to the ceiling, time."""
    def mean(entry: Any) -> float | None:
        return entry.get("mean") if isinstance(entry, dict) else None

    def psnr(result: dict[str, Any]) -> str:
        value, ceiling = mean(result.get("psnr")), mean((result.get("ceiling") or {}).get("psnr"))
        text = f"{value:.2f}" if value is not None else "-"
        return text + (f" (ceiling {ceiling:.2f})" if ceiling is not None else "")

    nmse = mean(summary.get("nmse_mask", summary.get("nmse")))
    dice = mean(tissue.get("mean_dice")) if tissue else None
    below = (summary.get("distance_to_ceiling") or {}).get("psnr_db_below")
    parts = [f"{name:16s}", f"PSNR {psnr(summary)} dB", f"paper-exact {psnr(exact)} dB",
             f"masked NMSE {nmse:.3f}" if nmse is not None else "masked NMSE -",
             f"tissue Dice {dice:.3f}" if dice is not None else "tissue Dice -",
             f"{below:.1f} dB below the ceiling" if below is not None else "ceiling -",
             f"trained in {seconds:.0f} s"]
    return "[demo] " + " | ".join(parts)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    from volsynth.utils import atomic_write_text

    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def _say(text: str, enabled: bool) -> None:
    if enabled:
        print(text, flush=True)  # noqa: T201  (the demo's progress narration)
