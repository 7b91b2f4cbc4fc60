"""Reading run folders for the report: small torch-free readers of what train/predict/evaluate/downstream wrote.

Everything inside a run is optional: a missing or unreadable part becomes a note on the run, never an error, so
one incomplete run does not cost the whole report. Only a run folder that does not exist is an error.

Files read, per run folder ``RUN`` (a staged run's translating stage is ``RunFolder.final()``):

- ``config.yaml`` (of the final stage), ``splits.json``, ``log.csv``, ``validation.csv`` (every stage, for the
  wall time and the time-to-quality curve);
- ``predictions/predictions.json`` (``volsynth-predictions``: method, checkpoint, its sha256, one output file per
  subject) and the predicted volumes;
- ``evaluation/metrics.csv``, ``evaluation/summary.json`` (``{metric: {mean, std, n}}``, ``profile``,
  ``definitions``, and for a phantom cohort ``ceiling`` and ``distance_to_ceiling``), ``evaluation/ceiling.csv``;
- ``downstream/{segment,tissue}{.csv,_summary.json}`` (`volsynth downstream --protocol segment|tissue`);
- ``demo.json`` in the run's parent or grandparent folder (``volsynth demo`` writes it next to ``runs/``): the
  demo's settings, shown as a "not for results" banner.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from volsynth.errors import VolsynthError
from volsynth.metrics import summarise
from volsynth.run import RunFolder

# File names written by volsynth.evaluation.downstream (not imported: that module pulls in torch).
PROTOCOL1_CSV = "segment.csv"  # train a segmenter on synthetic, test on real
PROTOCOL1_SUMMARY = "segment_summary.json"
PROTOCOL2_CSV = "tissue.csv"  # one fixed segmenter on real and synthetic
PROTOCOL2_SUMMARY = "tissue_summary.json"
DEMO_FILE = "demo.json"
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".mha", ".nrrd")


class RunNotFoundError(VolsynthError, FileNotFoundError):
    """A run folder given to the report does not exist."""


@dataclass(frozen=True)
class Stat:
    """Mean ± sample standard deviation over ``n`` subjects (``std`` is None when n < 2)."""

    mean: float
    std: float | None
    n: int


@dataclass
class RunData:
    """One run as the report sees it; every part may be missing (``notes`` then says why)."""

    path: Path
    method: str
    label: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    splits: dict[str, list[str]] = field(default_factory=dict)
    stats: dict[str, Stat] = field(default_factory=dict)  # column → mean ± std over subjects
    per_subject: dict[str, dict[str, float]] = field(default_factory=dict)  # column → subject → value
    profile: str | None = None
    modality: str | None = None  # evaluation modality (mr / ct): MAE is in HU for CT under synthrad2023
    definitions: str | None = None
    normalisation: str | None = None  # how predictions and targets were scaled before scoring
    ceiling: dict[str, Stat] = field(default_factory=dict)
    ceiling_per_subject: dict[str, dict[str, float]] = field(default_factory=dict)
    distance_to_ceiling: dict[str, float] = field(default_factory=dict)
    ceiling_definition: str | None = None  # summary.json's own words for the ceiling and the distances
    distance_definition: str | None = None
    log: list[dict[str, float]] = field(default_factory=list)  # the translating stage's log.csv
    validation: list[dict[str, float]] = field(default_factory=list)  # with "seconds" since the run began
    wall_seconds: float | None = None  # all stages together
    stage_names: list[str] = field(default_factory=list)
    predictions: dict[str, Any] = field(default_factory=dict)  # predictions.json
    prediction_files: dict[str, Path] = field(default_factory=dict)  # subject → predicted volume
    protocol1: dict[str, Any] | None = None
    protocol2: dict[str, Any] | None = None
    demo: dict[str, Any] | None = None
    demo_file: Path | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def data(self) -> dict[str, Any]:
        section = self.config.get("data")
        return section if isinstance(section, dict) else {}

    @property
    def n_subjects(self) -> int:
        """Test subjects scored (the largest n of the image-quality columns)."""
        return max((s.n for k, s in self.stats.items() if not k.startswith(("dice", "vs"))), default=0)


def to_float(text: Any) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return math.nan


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def numeric_rows(path: Path) -> list[dict[str, float]]:
    return [{k: to_float(v) for k, v in row.items() if k is not None} for row in read_csv(path)]


def stat_from(entry: Any) -> Stat | None:
    """A ``{mean, std, n}`` mapping as a :class:`Stat` (None when absent or not finite)."""
    if not isinstance(entry, Mapping) or entry.get("mean") is None:
        return None
    mean = to_float(entry["mean"])
    if not math.isfinite(mean):
        return None
    std = to_float(entry.get("std")) if entry.get("std") is not None else math.nan
    return Stat(mean, std if math.isfinite(std) else None, int(entry.get("n") or 0))


def stat_of(values: Sequence[float]) -> Stat | None:
    s = summarise(values)
    if s["mean"] is None:
        return None
    return Stat(float(s["mean"]), None if s["std"] is None else float(s["std"]), int(s["n"] or 0))


def _read_json(path: Path, run: RunData, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        run.notes.append(f"{what} unreadable ({err})")
        return {}
    if not isinstance(data, dict):
        run.notes.append(f"{what} is not a JSON object")
        return {}
    return data


def _per_subject(rows: Sequence[Mapping[str, str]], skip: Sequence[str] = ("subject",)) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for row in rows:
        subject = str(row.get("subject", ""))
        for key, value in row.items():
            if key is None or key in skip:
                continue
            number = to_float(value)
            if math.isfinite(number):
                out.setdefault(key, {})[subject] = number
    return out


# --------------------------------------------------------------------------------------------------------------


def load_run(path: str | os.PathLike[str]) -> RunData:
    """Read what the report needs from a run folder, recording every missing or unreadable part as a note.

    Raises:
        RunNotFoundError: ``path`` is not a folder.
    """
    root = Path(path)
    if not root.is_dir():
        raise RunNotFoundError(f"run folder not found: {root}")
    folder = RunFolder(root)
    run = RunData(path=root, method=root.name)
    try:
        stages = folder.stages()
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        run.notes.append(f"stages.json unreadable ({err}); read as a single-stage run")
        stages = []
    final = stages[-1] if stages else folder
    run.stage_names = [s.root.name for s in stages]
    _read_config(run, final)
    _read_splits(run, final, folder)
    _read_training(run, stages or [folder])
    _read_predictions(run, [folder, final])
    _read_evaluation(run, [folder, final])
    _read_downstream(run, [folder, final])
    run.demo_file = next((p for p in (root.parent / DEMO_FILE, root.parent.parent / DEMO_FILE) if p.is_file()), None)
    if run.demo_file is not None:
        run.demo = _read_json(run.demo_file, run, str(run.demo_file)) or {"demo": True}
    return run


def _first(folders: Sequence[RunFolder], attr: str) -> Path:
    paths = [getattr(f, attr) for f in folders]
    return next((p for p in paths if p.exists()), paths[0])


def _read_config(run: RunData, final: RunFolder) -> None:
    import yaml

    path = final.config if final.config.is_file() else run.path / "config.yaml"
    if not path.is_file():
        run.notes.append("no config.yaml: method name taken from the folder name")
        return
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:  # a broken YAML must not stop the other runs
        run.notes.append(f"config.yaml unreadable ({err})")
        return
    run.config = config if isinstance(config, dict) else {}
    method = run.config.get("method")
    if isinstance(method, Mapping) and method.get("name"):
        run.method = str(method["name"])


def _read_splits(run: RunData, final: RunFolder, folder: RunFolder) -> None:
    path = final.splits if final.splits.is_file() else folder.splits
    if path.is_file():
        data = _read_json(path, run, "splits.json")
        run.splits = {k: [str(s) for s in v] for k, v in data.items() if isinstance(v, list)}


def _rows(path: Path, run: RunData, missing_note: str | None) -> list[dict[str, float]]:
    """A run's numeric CSV rows; an unreadable file or (when asked) a missing one becomes a note."""
    if not path.is_file():
        if missing_note:
            run.notes.append(missing_note)
        return []
    try:
        return numeric_rows(path)
    except (OSError, csv.Error, UnicodeDecodeError) as err:
        run.notes.append(f"{path.name} unreadable ({err})")
        return []


def _read_training(run: RunData, stages: Sequence[RunFolder]) -> None:
    """log.csv and validation.csv of every stage; validation seconds count from the start of the first stage."""
    offset, total = 0.0, None
    for index, stage in enumerate(stages):
        is_final = index == len(stages) - 1
        log = _rows(stage.log, run, "no log.csv: no training curves" if is_final else None)
        validation = _rows(stage.validation, run, "no validation.csv: no validation curves" if is_final else None)
        # the stage's wall time: the last time either file recorded (a final validation comes after the last log)
        seconds = [r["seconds"] for r in [*log, *validation] if math.isfinite(r.get("seconds", math.nan))]
        if is_final:
            run.log = log
            run.validation = [_with_seconds(row, log, offset) for row in validation]
        if seconds:
            offset += max(seconds)
            total = offset
    run.wall_seconds = total


def _with_seconds(row: dict[str, float], log: Sequence[Mapping[str, float]], offset: float) -> dict[str, float]:
    """The validation row with wall-clock seconds: its own column, else interpolated from log.csv by iteration."""
    out = dict(row)
    seconds = row.get("seconds", math.nan)
    if not math.isfinite(seconds):
        points = sorted((r["iteration"], r["seconds"]) for r in log
                        if math.isfinite(r.get("iteration", math.nan)) and math.isfinite(r.get("seconds", math.nan)))
        iteration = row.get("iteration", math.nan)
        if points and math.isfinite(iteration) and points[0][0] <= iteration <= points[-1][0]:
            import numpy as np

            seconds = float(np.interp(iteration, [p[0] for p in points], [p[1] for p in points]))
            out["seconds_interpolated"] = 1.0
    out["seconds"] = seconds + offset if math.isfinite(seconds) else math.nan
    return out


def _read_predictions(run: RunData, folders: Sequence[RunFolder]) -> None:
    folder = _first(folders, "predictions")
    if not folder.is_dir():
        run.notes.append("no predictions/ folder: left out of the tri-planar figures")
        return
    meta_path = folder / "predictions.json"
    meta = _read_json(meta_path, run, "predictions/predictions.json") if meta_path.is_file() else {}
    run.predictions = meta
    outputs = meta.get("outputs")
    if isinstance(outputs, Mapping):
        for subject, entry in outputs.items():
            name = entry.get("file") if isinstance(entry, Mapping) else entry
            if not name:
                continue
            file = Path(str(name))
            file = file if file.is_absolute() else folder / file
            if file.is_file():
                run.prediction_files[str(subject)] = file
        return
    # Older runs: <subject>.<ext> (or <subject>_synthetic-<target>.<ext>) without an outputs map.
    for path in sorted(folder.iterdir()):
        suffix = next((s for s in IMAGE_SUFFIXES if path.name.endswith(s)), None)
        if suffix is None or not path.is_file():
            continue
        stem = path.name[: -len(suffix)]
        subject = stem.split("_synthetic-")[0] if "_synthetic-" in stem else stem
        run.prediction_files.setdefault(subject, path)


def _read_evaluation(run: RunData, folders: Sequence[RunFolder]) -> None:
    folder = _first(folders, "evaluation")
    metrics_csv, summary_json, ceiling_csv = folder / "metrics.csv", folder / "summary.json", folder / "ceiling.csv"
    summary = _read_json(summary_json, run, "evaluation/summary.json") if summary_json.is_file() else {}
    if metrics_csv.is_file():
        try:
            # per-subject distances to the ceiling (…_ceiling columns) are not metrics: summary.json has their means
            run.per_subject.update({k: v for k, v in _per_subject(read_csv(metrics_csv)).items()
                                    if not k.endswith("_ceiling")})
        except (OSError, csv.Error, UnicodeDecodeError) as err:
            run.notes.append(f"evaluation/metrics.csv unreadable ({err})")
    if not summary and not run.per_subject:
        run.notes.append("no evaluation/ (run `volsynth evaluate`): no image-quality metrics")
        return
    run.profile = summary.get("profile") if isinstance(summary.get("profile"), str) else None
    run.modality = summary.get("modality") if isinstance(summary.get("modality"), str) else None
    run.definitions = summary.get("definitions") if isinstance(summary.get("definitions"), str) else None
    normalisation = summary.get("normalise_definition")
    run.normalisation = normalisation if isinstance(normalisation, str) else None
    reserved = {"ceiling", "distance_to_ceiling"}
    names = [k for k, v in summary.items() if k not in reserved and isinstance(v, Mapping) and "mean" in v]
    for name in dict.fromkeys([*names, *run.per_subject]):
        stat = stat_from(summary.get(name)) or stat_of(list(run.per_subject.get(name, {}).values()))
        if stat is not None:
            run.stats[name] = stat
    if "lpips" not in run.stats and isinstance(summary.get("lpips"), Mapping):
        reason = str(summary["lpips"].get("reason") or "")
        if reason and "not requested" not in reason:  # only an unexpected gap is worth a note
            run.notes.append(f"LPIPS not available: {reason}")
    ceiling = summary.get("ceiling")
    if isinstance(ceiling, Mapping):
        run.ceiling = {k: s for k, v in ceiling.items() if (s := stat_from(v)) is not None}
    distance = summary.get("distance_to_ceiling")
    if isinstance(distance, Mapping):
        run.distance_to_ceiling = {str(k): float(v) for k, v in distance.items()
                                   if k != "n" and isinstance(v, int | float) and not isinstance(v, bool)}
        run.distance_definition = distance.get("definition") if isinstance(distance.get("definition"), str) else None
    if isinstance(summary.get("ceiling_definition"), str):
        run.ceiling_definition = summary["ceiling_definition"]
    if not run.predictions and isinstance(summary.get("predictions"), Mapping):  # predictions.json elsewhere
        run.predictions = dict(summary["predictions"])
    if ceiling_csv.is_file():
        try:
            run.ceiling_per_subject = _per_subject(read_csv(ceiling_csv))
        except (OSError, csv.Error, UnicodeDecodeError) as err:
            run.notes.append(f"evaluation/ceiling.csv unreadable ({err})")
        if not run.ceiling:
            run.ceiling = {k: s for k, v in run.ceiling_per_subject.items() if (s := stat_of(list(v.values())))}


def _read_downstream(run: RunData, folders: Sequence[RunFolder]) -> None:
    folder = _first(folders, "downstream")
    if not folder.is_dir():
        return  # optional step: its absence is stated once in the downstream section, not per run
    for summary_name, csv_name, attr in ((PROTOCOL1_SUMMARY, PROTOCOL1_CSV, "protocol1"),
                                         (PROTOCOL2_SUMMARY, PROTOCOL2_CSV, "protocol2")):
        if not (folder / summary_name).is_file():
            continue
        summary = _read_json(folder / summary_name, run, f"downstream/{summary_name}")
        try:
            rows = read_csv(folder / csv_name) if (folder / csv_name).is_file() else []
        except (OSError, csv.Error, UnicodeDecodeError) as err:
            run.notes.append(f"downstream/{csv_name} unreadable ({err})")
            rows = []
        if not summary:
            continue
        setattr(run, attr, summary)
        if attr == "protocol1":
            stat = stat_from((summary.get("synthetic") or {}).get("dice"))
            if stat is not None:
                run.stats["dice_s2r"] = stat
                run.per_subject["dice_s2r"] = _per_subject([r for r in rows if r.get("model") == "synthetic"],
                                                           ("subject", "model")).get("dice", {})
        else:
            per_class = summary.get("per_class") if isinstance(summary.get("per_class"), Mapping) else {}
            if not per_class:  # no per-class results: the mean over classes is the only column
                per_class = {k: summary.get(k) for k in ("mean_dice", "mean_vs")}
            by_subject = _per_subject(rows)
            for column, entry in per_class.items():
                stat = stat_from(entry)
                if stat is not None:
                    run.stats[str(column)] = stat
                    run.per_subject[str(column)] = by_subject.get(str(column), {})
    if run.protocol1 is None and run.protocol2 is None:
        run.notes.append("downstream/ holds no protocol summary")


def assign_labels(runs: Sequence[RunData]) -> None:
    """Label = method name; runs sharing a method get their folder name added (and an index if still equal)."""
    counts: dict[str, int] = {}
    for run in runs:
        counts[run.method] = counts.get(run.method, 0) + 1
    used: set[str] = set()
    for run in runs:
        label = run.method if counts[run.method] == 1 else f"{run.method} ({run.path.name})"
        base, k = label, 2
        while label in used:
            label, k = f"{base} #{k}", k + 1
        used.add(label)
        run.label = label
