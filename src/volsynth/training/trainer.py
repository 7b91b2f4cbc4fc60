"""The one trainer: runs every registered method the same way.

Reads like the loop it is::

    accept the run (device, config, manifest, output folder) ─ nothing is written before this succeeds
    build the method, its data, optimisers, schedules (and resume or init_from)
    for each iteration: draw items → method.train_step → schedules → log → validate → checkpoint

Iteration-based. Each iteration draws its items from a numpy generator seeded by ``(seed, iteration, rank)`` and
reseeds torch from the same triple, so a run stopped at iteration N and resumed gives bit-identical weights to an
uninterrupted run. The trainer owns everything that is not method-specific: device, AMP, optimiser schedules,
gradient clipping, weight averaging, validation, logging and atomic checkpoints (``last.pt`` every
``checkpoint_every`` iterations, ``best.pt`` on the best ``train.best_metric``). Under ``torchrun`` it trains
with DistributedDataParallel (:mod:`volsynth.training.distributed`): rank 0 alone logs, validates and writes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from volsynth.config import ExperimentConfig, save_config, to_dict
from volsynth.data.sampling import KEYS, build_sampler
from volsynth.errors import CheckpointError, ConfigError, OutputError, TrainingDivergedError
from volsynth.experiment import checkpoint_config, load_checkpoint, save_checkpoint
from volsynth.methods.base import Batch, StepContext, TranslationMethod, build_method, set_3d_memory_format
from volsynth.run import RunFolder
from volsynth.training.data import Task, prepare_subjects, resolve_task
from volsynth.training.distributed import Distributed
from volsynth.training.ema import WeightAverage
from volsynth.training.logs import RunLogger
from volsynth.training.optim import make_scheduler
from volsynth.utils import atomic_write_text, resolve_device, resolve_precision

# Keys that may differ when a run is resumed: how long it runs and how it reports, never what or how it learns.
RESUMABLE_KEYS = ("train.iterations", "train.max_seconds", "train.checkpoint_every", "train.val_every",
                  "train.log_every", "train.progress", "train.tensorboard", "train.threads", "train.device",
                  "train.distributed_timeout", "train.channels_last", "data.cache_dir")
LOWER_IS_BETTER = ("l1", "mae", "mse", "nmse", "loss")
log = logging.getLogger(__name__)


def iteration_seed(seed: int, iteration: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, iteration, rank]).generate_state(1, dtype=np.uint64)[0] % (2**63))


def flat_config(config: ExperimentConfig) -> dict[str, Any]:
    """``{"train.lr": 1e-4, …}``: the resolved config as dotted keys (to compare two configs)."""
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}.{key}" if prefix else key)
        else:
            out[prefix] = node

    walk(to_dict(config), "")
    return out


def changed_settings(checkpoint: Path, config: ExperimentConfig, *, ignore: tuple[str, ...] = (),
                     skip_unset: bool = False) -> dict[str, tuple[Any, Any]]:
    """``{dotted key: (saved, new)}`` for the settings ``config`` changes relative to the config saved in
    ``checkpoint``, sorted by key. Keys in ``ignore`` are not compared, nor (``skip_unset``) keys that are ``None``
    in ``config``: a config not yet through the trainer leaves e.g. the task unresolved."""
    saved = flat_config(checkpoint_config(load_checkpoint(checkpoint), checkpoint))
    return {k: (saved.get(k), v) for k, v in sorted(flat_config(config).items())
            if k not in ignore and not (skip_unset and v is None) and saved.get(k) != v}


def higher_is_better(metric: str) -> bool:
    return not any(metric == k or metric.endswith(f"_{k}") for k in LOWER_IS_BETTER)


@dataclass
class TrainResult:
    out_dir: Path
    iterations: int
    last_checkpoint: Path
    best_checkpoint: Path | None
    best_score: float | None
    best_iteration: int | None
    seconds: float


class Trainer:
    """Trains ``config.method`` on ``config.data`` and writes everything into ``out_dir`` (see :mod:`volsynth.run`).

    Args:
        config: the experiment (``data.source``/``target``/``split`` may be left to the manifest).
        out_dir: the run folder: new (or empty), or an existing run with ``resume``.
        resume: continue the run in ``out_dir`` from ``checkpoints/last.pt``.
        echo: where the banner and the validation lines go (default: printed when ``train.progress``).
    """

    def __init__(self, config: ExperimentConfig, out_dir: str | Path, *, resume: bool = False,
                 echo: Callable[[str], None] | None = None, provenance: dict[str, Any] | None = None) -> None:
        self.provenance = dict(provenance or {})  # how the run was asked for (command, preset, overrides)
        self.run = RunFolder.of(out_dir)
        self.resume = resume
        self.dist = Distributed.from_env()
        self.device = self.dist.device(resolve_device(config.train.device))  # device errors before any work
        self.precision = resolve_precision(config.train.precision, self.device)
        self._echo = echo
        self.config = config

    @property
    def out_dir(self) -> Path:
        return self.run.root

    def say(self, text: str) -> None:
        if not self.dist.is_main:
            return
        if self._echo is not None:
            self._echo(text)
        elif self.config.train.progress:
            tqdm.write(text)

    # Accept -----------------------------------------------------------------------------------------------------
    def _accept(self, method: TranslationMethod) -> Task:
        """Check everything that can be checked before the run folder is touched; returns the resolved task."""
        method.check_data(self.config.data)
        method.make_inferer(self.config.inference, self.config.data)  # inference settings fit the method
        self.config, task = resolve_task(self.config, paired=method.requires_paired_data)
        run = self.run
        if self.resume:
            if not run.last.is_file():
                raise CheckpointError(f"{run.last}: nothing to resume from")
            changed = changed_settings(run.last, self.config, ignore=RESUMABLE_KEYS)
            if changed:
                detail = ", ".join(f"{k}: {old!r} → {new!r}" for k, (old, new) in list(changed.items())[:6])
                raise ConfigError(f"--resume would change {', '.join(changed)} ({detail}); a run keeps its data, split "
                                  "and optimiser settings: start a new --out instead")
            saved_splits = json.loads(run.splits.read_text()) if run.splits.is_file() else None
            if saved_splits is not None and saved_splits != task.splits:
                raise ConfigError(f"{run.splits}: the manifest's split changed since this run started; a run keeps "
                                  "its split (start a new --out)")
        elif self.dist.is_main:  # other ranks would see rank 0's first files
            self._check_new_folder()
        return task

    def _check_new_folder(self) -> None:
        run = self.run
        if run.root.exists() and not run.root.is_dir():
            raise OutputError(f"{run.root} is a file; --out must be a folder")
        if run.root.exists() and any(run.root.iterdir()):
            if run.is_run():
                raise OutputError(f"{run.root} already holds a run; pass --resume to continue it or choose another "
                                  "--out")
            raise OutputError(f"{run.root} exists and is not empty; choose a new --out folder (volsynth never writes "
                              "a run into a folder holding other files)")

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """One training per run folder: a second process into the same --out fails instead of interleaving."""
        if not self.dist.is_main:
            yield
            return
        self.run.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.run.root, os.O_RDONLY)  # a lock on the folder itself: nothing extra is left in it
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise OutputError(f"{self.run.root}: another `volsynth train` is writing into this run") from None
            except OSError as error:  # some network file systems refuse locks: carry on, but say so
                log.warning("cannot lock %s (%s); make sure no other training writes into it", self.run.root,
                            error.strerror)
            yield
        finally:
            os.close(fd)

    def _write_run_record(self, method: TranslationMethod) -> None:
        """``RUN/run.json``: how the run was asked for and where it ran (the report shows it); one entry per start."""
        from volsynth import __version__

        path = self.out_dir / "run.json"
        record = json.loads(path.read_text()) if self.resume and path.is_file() else {"starts": []}
        record["starts"].append({
            **self.provenance, "resume": self.resume, "device": str(self.device), "precision": self.precision,
            "world_size": self.dist.world_size, "volsynth_version": __version__, "torch_version": torch.__version__,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        })
        record["parameters"] = method.parameter_counts()
        atomic_write_text(path, json.dumps(record, indent=2) + "\n")

    # Build ------------------------------------------------------------------------------------------------------
    def _init_from(self, method: TranslationMethod) -> None:
        source = self.config.train.init_from
        if source is None or self.resume:
            return
        path = Path(source)
        if path.is_dir():
            run = RunFolder.of(path).final()
            path = run.last
        state = load_checkpoint(path)
        parent = checkpoint_config(state, path)
        # The averaged weights are what the previous stage would predict with, so the next stage starts there.
        weights = state.get("model_ema") if state.get("model_ema") is not None else state["model"]
        method.load_pretrained(weights, parent.method, str(path))
        self.say(f"initialised from {path} (iteration {state['iteration']}, {parent.method.name})")

    def _banner(self, method: TranslationMethod, task: Task) -> str:
        config, sampling = self.config, self.config.data.sampling
        n = {k: len(v) for k, v in task.splits.items()}
        spacing = "×".join(f"{s:g}" for s in task.spacing)
        if sampling.kind == "patch":
            items = f"{sampling.per_step} × {'×'.join(map(str, sampling.patch_size))} patches"
        else:
            depth = "whole volumes" if sampling.depth == "all" else f"{sampling.depth}-slice slabs"
            items = f"{sampling.per_step} × {depth} ({'×'.join(map(str, sampling.in_plane))})"
        params = sum(p.numel() for p in method.parameters()) / 1e6
        stage = f" [{config.method.stage}]" if hasattr(config.method, "stage") else ""  # type: ignore[attr-defined]
        world = f" × {self.dist.world_size} ranks" if self.dist.world_size > 1 else ""
        return (f"{config.method.name}{stage}: {task.source} → {task.target} | {n['train']} train / {n['val']} val / "
                f"{n['test']} test | {spacing} mm | {items}/step | {self.device.type}{world} {self.precision} | "
                f"{params:.2f} M params | {config.train.iterations} iterations → {self.out_dir}")

    # Main loop --------------------------------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        config = self.config
        if config.train.threads is not None:
            torch.set_num_threads(config.train.threads)
        torch.manual_seed(config.seed)  # network initialisation (identical on every rank)
        method = build_method(config.method)
        task = self._accept(method)
        config, train = self.config, self.config.train
        with self._locked(), self.dist.session(config.train.distributed_timeout):
            if not self.resume and self.dist.is_main:
                self._check_new_folder()  # again under the lock: another process may have started meanwhile
            if train.deterministic:
                torch.use_deterministic_algorithms(True, warn_only=True)
            method.to(self.device)
            if config.train.channels_last:
                set_3d_memory_format(method, torch.channels_last_3d)
            if self.dist.is_main:
                save_config(config, self.run.config)
                atomic_write_text(self.run.splits, json.dumps(task.splits, indent=2) + "\n")
                self._write_run_record(method)
            divisor = method.shape_divisor(config.data)
            cache = Path(config.data.cache_dir) if config.data.cache_dir else self.run.cache
            paired = method.requires_paired_data
            train_subjects = prepare_subjects(config, task, task.splits["train"], divisor=divisor, cache_dir=cache,
                                              paired=paired, progress=train.progress and self.dist.is_main)
            val_subjects = [s for s in prepare_subjects(config, task, task.splits["val"], divisor=divisor,
                                                        cache_dir=cache, paired=True, progress=False)
                            if s.target is not None]
            self._init_from(method)
            try:
                return self._loop(method, task, train_subjects, val_subjects)
            except RuntimeError as error:
                explained = self.dist.explain(error)
                if explained is None:
                    raise
                raise explained from error

    def _loop(self, method: TranslationMethod, task: Task, train_subjects: list, val_subjects: list) -> TrainResult:
        config, train = self.config, self.config.train
        method.train()
        optimizers = method.configure_optimizers(train)
        scalers = {k: torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16") for k in optimizers}
        generator = torch.Generator()
        ctx = StepContext(device=self.device, precision=self.precision, optimizers=optimizers, scalers=scalers,
                          grad_clip=train.grad_clip, total_iterations=train.iterations, generator=generator)
        # train.time_box: ctx.time_progress (the fraction of max_seconds used, set before every step) moves the
        # schedules on when the clock runs out faster than the iterations, as it moves ctx.progress.
        timed = train.time_box and train.max_seconds is not None

        def schedule_iteration(steps: int) -> int:
            return max(steps, int(ctx.time_progress * train.iterations))

        schedulers = {k: make_scheduler(o, train.schedule, train.iterations, schedule_iteration if timed else None)
                      for k, o in optimizers.items()}
        trained = [p for o in optimizers.values() for group in o.param_groups for p in group["params"]]
        average = (WeightAverage(method, trained, decay=train.ema.decay, start=train.ema.start)
                   if train.ema.decay is not None else None)
        start, best, best_iteration, offset = 0, None, None, 0.0
        if self.resume:
            state = load_checkpoint(self.run.last, map_location=self.device)
            method.load_state_dict(state["model"])
            for key, opt in optimizers.items():
                opt.load_state_dict(state["optimizers"][key])
                schedulers[key].load_state_dict(state["schedulers"][key])
                scalers[key].load_state_dict(state["scalers"][key])
            if average is not None and state.get("model_ema") is not None:
                average.load_state_dict(state["model_ema"])
            start, best, best_iteration = int(state["iteration"]), state.get("best_score"), state.get("best_iteration")
            offset = float(state.get("seconds", 0.0))
        wrapped = self.dist.wrap(method, optimizers)  # DistributedDataParallel on every trained network
        sampler = build_sampler(config.data.sampling, train_subjects, paired=method.requires_paired_data)
        inferer = method.make_inferer(config.inference, config.data)
        logger = RunLogger(self.out_dir, enabled=self.dist.is_main, tensorboard=train.tensorboard, keep_until=start)
        self.say(self._banner(method, task))
        if self.resume:
            self.say(f"resuming at iteration {start + 1} of {train.iterations} from {self.run.last}")
        began = time.perf_counter()
        validating = 0.0  # seconds spent validating (time-to-quality curves count training time only)

        def elapsed() -> float:
            return offset + time.perf_counter() - began

        def checkpoint(path: Path, iteration: int) -> None:
            if not self.dist.is_main:
                return
            with wrapped.unwrapped():
                state = {
                    "iteration": iteration, "config": to_dict(config), "method": config.method.name,
                    "model": method.state_dict(), "model_ema": average.state_dict() if average else None,
                    "optimizers": {k: o.state_dict() for k, o in optimizers.items()},
                    "schedulers": {k: s.state_dict() for k, s in schedulers.items()},
                    "scalers": {k: s.state_dict() for k, s in scalers.items()}, "best_score": best,
                    "best_iteration": best_iteration, "best_metric": train.best_metric, "seconds": elapsed(),
                }
            save_checkpoint(path, state)

        bar = tqdm(total=train.iterations, initial=start, desc=f"train {config.method.name}", unit="it",
                   disable=not (train.progress and self.dist.is_main), dynamic_ncols=True)
        for iteration in range(start + 1, train.iterations + 1):
            seed = iteration_seed(config.seed, iteration, self.dist.rank)
            items = sampler.sample(np.random.default_rng(seed))
            torch.manual_seed(seed)  # dropout and any torch-side randomness, reproducible on resume
            generator.manual_seed(seed)
            batch = Batch(*(torch.from_numpy(np.ascontiguousarray(items[k])) if items[k] is not None else None
                            for k in KEYS)).to(self.device)
            if train.channels_last and batch.source.ndim == 5:
                batch = batch.channels_last()
            ctx.iteration = iteration
            if timed:
                ctx.time_progress = min(1.0, elapsed() / train.max_seconds)
            losses = method.train_step(batch, ctx)
            self.dist.sync_state(wrapped)  # state outside the wrapped networks (a memory bank) follows rank 0
            with warnings.catch_warnings():
                # A method may leave an optimiser idle for a while (mdagan's adversarial warm start); its schedule
                # still follows the iteration count, so torch's "scheduler before optimizer" warning is noise.
                warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step", UserWarning)
                for scheduler in schedulers.values():
                    scheduler.step()
            if average is not None:
                average.update(iteration)
            if not all(np.isfinite(v) for v in losses.values()):
                kept = (f"the last good checkpoint is {self.run.last} (iteration "
                        f"{load_checkpoint(self.run.last)['iteration']})" if self.run.last.is_file()
                        else "no checkpoint was written yet")
                bad = ", ".join(f"{k}={v}" for k, v in losses.items() if not np.isfinite(v))
                raise TrainingDivergedError(f"non-finite loss at iteration {iteration} ({bad}); {kept}. Lower "
                                            "train.lr, set train.grad_clip, or use fp32")
            lr = next(iter(optimizers.values())).param_groups[0]["lr"]
            if iteration % train.log_every == 0 or iteration == train.iterations:
                logger.log(iteration, elapsed(), lr, losses)
            bar.update(1)
            bar.set_postfix({k: f"{v:.4g}" for k, v in list(losses.items())[:4]}, refresh=False)
            if val_subjects and (iteration % train.val_every == 0 or iteration == train.iterations):
                if self.dist.is_main:
                    started = time.perf_counter()
                    with wrapped.unwrapped():  # plain networks: no collectives while the other ranks wait
                        scores = self.validate(method, val_subjects, inferer, average)
                    validating += time.perf_counter() - started
                    logger.log_validation(iteration, elapsed(), {**scores,
                                                                 "train_seconds": round(elapsed() - validating, 3)})
                    metric = train.best_metric
                    if metric not in scores:
                        raise ConfigError(f"train.best_metric '{metric}' is not among the validation scores "
                                          f"{sorted(scores)} of method '{config.method.name}'")
                    improved = best is None or (scores[metric] > best if higher_is_better(metric)
                                                else scores[metric] < best)
                    if improved:
                        best, best_iteration = scores[metric], iteration
                        checkpoint(self.run.best, iteration)
                    shown = "  ".join(f"{k} {v:.4g}" for k, v in scores.items())
                    self.say(f"val @ {iteration}: {shown}{'  (best → best.pt)' if improved else ''}")
                self.dist.barrier()
            out_of_time = train.max_seconds is not None and elapsed() >= train.max_seconds
            if iteration % train.checkpoint_every == 0 or iteration == train.iterations or out_of_time:
                self.dist.check_in_sync(method)
                checkpoint(self.run.last, iteration)
                self.dist.barrier()
            if out_of_time:
                self.say(f"train.max_seconds ({train.max_seconds:g} s) reached at iteration {iteration}")
                final = iteration
                break
        else:
            final = train.iterations
        bar.close()
        logger.close()
        if start >= train.iterations and not self.run.last.exists():
            checkpoint(self.run.last, start)
        final = max(final, start)
        ran = max(0, final - start)
        summary = (f"best {train.best_metric} {best:.4g} at iteration {best_iteration}" if best is not None
                   else "no validation subjects")
        self.say(f"done: iterations {start + 1}–{final} ({ran}) in {time.perf_counter() - began:.1f} s "
                 f"({elapsed():.1f} s in total); {summary}; checkpoints in {self.run.checkpoints}")
        return TrainResult(self.out_dir, final, self.run.last,
                           self.run.best if self.run.best.exists() else None, best, best_iteration, elapsed())

    # Validation -------------------------------------------------------------------------------------------------
    def validate(self, method: TranslationMethod, subjects: list, inferer: Any,
                 average: WeightAverage | None = None) -> dict[str, float]:
        """The method's validation scores averaged over the validation subjects (preprocessed space)."""
        scores: dict[str, list[float]] = {}
        with average.applied() if average is not None else contextlib.nullcontext():
            for subject in subjects:
                result = method.validation_scores(np.asarray(subject.source), np.asarray(subject.target), inferer,
                                                  device=self.device, precision=self.config.inference.precision
                                                  if self.config.inference.precision != "auto" else "fp32",
                                                  seed=self.config.inference.seed)
                for key, value in result.items():
                    scores.setdefault(key, []).append(float(value))
        return {k: float(np.mean(v)) for k, v in scores.items()}


def train(config: ExperimentConfig, out_dir: str | Path, *, resume: bool = False,
          echo: Callable[[str], None] | None = None, provenance: dict[str, Any] | None = None) -> TrainResult:
    """Convenience wrapper: ``Trainer(config, out_dir, resume=resume).fit()``."""
    return Trainer(config, out_dir, resume=resume, echo=echo, provenance=provenance).fit()


def replace_train(config: ExperimentConfig, **changes: Any) -> ExperimentConfig:
    """A copy of ``config`` with ``train`` fields changed (configs are never mutated in place)."""
    return dataclasses.replace(config, train=dataclasses.replace(config.train, **changes))
