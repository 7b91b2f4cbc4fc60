"""Methods trained in stages: each stage is its own run, chained by checkpoints.

A preset with a ``stages:`` list (Make-A-Volume: autoencoder → slice → volumetric) trains with one command::

    volsynth train --config make_a_volume-cpu --data M --out runs/mav

into ``runs/mav/1-autoencoder/``, ``runs/mav/2-slice/``, ``runs/mav/3-volumetric/``. Stage k starts from stage
k−1's weights (``train.init_from``); each stage keeps its own iterations, schedule, logs, validation and bit-exact
``--resume`` (a finished stage is skipped, an interrupted one resumes). ``runs/mav/stages.json`` lists the stages,
so ``volsynth predict --run runs/mav`` uses the last one. With ``--set method.stage=NAME`` a single stage runs into
``--out`` with that stage's overrides, and ``train.init_from`` chains it by hand.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from volsynth.config import ExperimentConfig, StageConfig, load_raw, parse_override
from volsynth.errors import ConfigError, OutputError
from volsynth.experiment import load_checkpoint, load_config
from volsynth.run import RunFolder
from volsynth.training.distributed import Distributed
from volsynth.training.trainer import TrainResult, train
from volsynth.utils import atomic_write_text


@dataclass
class StagePlan:
    name: str
    config: ExperimentConfig
    folder: str  # relative to the root run folder


def _stage_overrides(stage: StageConfig) -> list[str]:
    return [f"{key}={json.dumps(value)}" for key, value in stage.overrides.items()]


def _stages(raw: Mapping[str, Any]) -> list[StageConfig]:
    base = load_config(dict(raw))
    return base.stages


def plan(source: str | Path | Mapping[str, Any] | None, overrides: list[str]) -> list[StagePlan] | None:
    """The stage runs a config asks for, or ``None`` when it is a single run (no stages, or one chosen stage).

    Overrides on the command line apply to every stage, after the stage's own overrides.
    """
    raw, _ = load_raw(source, overrides)
    raw.setdefault("method", {})
    stages = _stages(raw)
    if not stages or any(parse_override(o)[0] == ["method", "stage"] for o in overrides):
        return None
    plans = []
    for index, stage in enumerate(stages, start=1):
        config = load_config(source, [*_stage_overrides(stage), *overrides])
        plans.append(StagePlan(stage.name, config, f"{index}-{stage.name}"))
    return plans


def single(source: str | Path | Mapping[str, Any] | None, overrides: list[str]) -> ExperimentConfig:
    """The config of one run; with ``--set method.stage=NAME`` the named stage's overrides come first."""
    raw, _ = load_raw(source, overrides)
    raw.setdefault("method", {})
    chosen = next((parse_override(o)[1] for o in overrides if parse_override(o)[0] == ["method", "stage"]), None)
    stage_overrides: list[str] = []
    if chosen is not None:
        stages = _stages(raw)
        match = next((s for s in stages if s.name == chosen), None)
        if stages and match is None:
            raise ConfigError(f"method.stage: '{chosen}' is not a stage of this config; stages: "
                              f"{', '.join(s.name for s in stages)}")
        stage_overrides = _stage_overrides(match) if match else []
    return load_config(source, [*stage_overrides, *overrides])


def train_stages(plans: list[StagePlan], out_dir: str | Path, *, resume: bool = False,
                 echo: Callable[[str], None] | None = None, provenance: dict[str, Any] | None = None
                 ) -> list[TrainResult]:
    """Train the stages in order into ``out_dir/<n>-<stage>/``; resumable stage by stage."""
    root = RunFolder.of(out_dir)
    record = {"stages": [{"name": p.name, "folder": p.folder} for p in plans]}
    if Distributed.from_env().is_main:  # under torchrun rank 0 alone checks and writes the stage list
        _accept_root(root, record, resume)
    results, previous = [], None
    for plan_ in plans:
        folder = root.root / plan_.folder
        config = plan_.config
        if previous is not None:
            config = apply_init_from(config, previous)
        run = RunFolder.of(folder)
        done = run.last.is_file() and int(load_checkpoint(run.last)["iteration"]) >= config.train.iterations
        if echo:
            echo(f"stage {plan_.folder}: {'already trained' if done else 'training'}")
        if done:
            previous = folder
            continue
        results.append(train(config, folder, resume=run.last.is_file(), echo=echo,
                             provenance={**(provenance or {}), "stage": plan_.name}))
        previous = folder
    return results


def _accept_root(root: RunFolder, record: dict[str, Any], resume: bool) -> None:
    if root.stages_file.is_file():
        if not resume:
            raise OutputError(f"{root.root} already holds a staged run; pass --resume to continue it or choose "
                              "another --out")
        if json.loads(root.stages_file.read_text()) != record:
            raise ConfigError(f"{root.stages_file}: the stages differ from the config's; start a new --out")
    elif root.root.exists() and any(root.root.iterdir()):
        raise OutputError(f"{root.root} exists and is not empty; choose a new --out folder")
    elif resume:
        raise OutputError(f"{root.root}: nothing to resume from (no stages.json)")
    else:
        atomic_write_text(root.stages_file, json.dumps(record, indent=2) + "\n")


def apply_init_from(config: ExperimentConfig, previous: Path) -> ExperimentConfig:
    """The stage's config starting from ``previous`` (unless it names its own ``train.init_from``)."""
    if config.train.init_from is not None:
        return config
    return dataclasses.replace(config, train=dataclasses.replace(config.train, init_from=str(previous.resolve())))
