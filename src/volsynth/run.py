"""The run folder: one place that knows where a run keeps its files.

Layout of ``volsynth train --out RUN``::

    RUN/config.yaml            resolved configuration (written once, when the run is accepted)
    RUN/splits.json            train / val / test subject names
    RUN/log.csv                one row per logged iteration (every loss, lr, cumulative seconds)
    RUN/validation.csv         one row per validation (iteration, seconds, scores)
    RUN/checkpoints/last.pt    latest checkpoint (resume point)
    RUN/checkpoints/best.pt    best validation score
    RUN/cache/                 preprocessed volumes (reusable)
    RUN/predictions/           `volsynth predict` output (conventional)
    RUN/evaluation/            `volsynth evaluate` output (conventional)
    RUN/downstream/            `volsynth downstream` output
    RUN/stages.json            staged runs only: the stage sub-runs in order (RUN/1-<stage>/ …)

Torch-free: reading a run's files must not cost a torch import.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from volsynth.errors import OutputError

RUN_MARKERS = ("config.yaml", "checkpoints", "stages.json")


@dataclass(frozen=True)
class RunFolder:
    """Paths of one run; nothing is created by constructing it."""

    root: Path

    @classmethod
    def of(cls, path: str | Path) -> RunFolder:
        return cls(Path(path))

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def splits(self) -> Path:
        return self.root / "splits.json"

    @property
    def log(self) -> Path:
        return self.root / "log.csv"

    @property
    def validation(self) -> Path:
        return self.root / "validation.csv"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def last(self) -> Path:
        return self.checkpoints / "last.pt"

    @property
    def best(self) -> Path:
        return self.checkpoints / "best.pt"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def predictions(self) -> Path:
        return self.root / "predictions"

    @property
    def evaluation(self) -> Path:
        return self.root / "evaluation"

    @property
    def downstream(self) -> Path:
        return self.root / "downstream"

    @property
    def stages_file(self) -> Path:
        return self.root / "stages.json"

    def checkpoint(self, which: str = "last") -> Path:
        return self.checkpoints / f"{which}.pt"

    def is_run(self) -> bool:
        """Whether the folder holds a volsynth run (single or staged)."""
        return self.root.is_dir() and any((self.root / marker).exists() for marker in RUN_MARKERS)

    def stages(self) -> list[RunFolder]:
        """Sub-runs of a staged run, in order (empty for a single-stage run)."""
        if not self.stages_file.is_file():
            return []
        names = json.loads(self.stages_file.read_text(encoding="utf-8")).get("stages", [])
        return [RunFolder(self.root / str(entry["folder"])) for entry in names]

    def final(self) -> RunFolder:
        """The run whose checkpoint translates: the last stage of a staged run, else this run."""
        stages = self.stages()
        return stages[-1] if stages else self

    def read_splits(self) -> dict[str, list[str]]:
        path = self.final().splits
        if not path.is_file():
            raise OutputError(f"{path}: the run has no splits.json (was it trained with `volsynth train`?)")
        return json.loads(path.read_text(encoding="utf-8"))

    def read_config_text(self) -> dict[str, Any]:
        """The resolved config as a plain mapping (the typed form needs the method registry: experiment.py)."""
        import yaml

        path = self.final().config
        return yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else {}


def resolve_manifest(run: Path, name: str | None) -> Path | None:
    """The manifest a run's ``data.manifest`` names: absolute, or relative to the run, the working folder or the
    run's parent (where ``volsynth train`` was started); None when unset or not found."""
    if not name:
        return None
    path = Path(str(name))
    candidates = [path] if path.is_absolute() else [run / path, Path.cwd() / path, run.parent / path]
    return next((c.resolve() for c in candidates if c.is_file()), None)
