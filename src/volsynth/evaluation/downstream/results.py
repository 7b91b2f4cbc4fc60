"""Result files of the downstream protocols: file and column names, CSV/JSON writing, and the printed table.

Every protocol writes ``<protocol>.csv`` (one row per subject, or per model and subject) and
``<protocol>_summary.json`` (mean ± sample std over subjects, settings) into its output folder, atomically. NaN
(e.g. the Dice of a class absent from both maps) is ``nan`` in the CSV and ``null`` in the JSON.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from volsynth.utils import atomic_write_text


def result_files(protocol: str) -> tuple[str, str]:
    """``(<protocol>.csv, <protocol>_summary.json)``: the names a protocol's results are written under."""
    return f"{protocol}.csv", f"{protocol}_summary.json"


def column(kind: str, name: str) -> str:
    """Column of a class or region: ``column("dice", "GM")`` → ``dice_gm`` (lower case, ``_`` for the rest)."""
    return f"{kind}_{re.sub(r'[^0-9A-Za-z]+', '_', str(name)).strip('_').lower() or 'x'}"


def label_names(labels: Sequence[int] | Mapping[int, str] | None) -> dict[int, str]:
    """Label value → class name (a bare sequence of values names each class by its value)."""
    if labels is None:
        return {}
    if isinstance(labels, Mapping):
        return {int(k): str(v) for k, v in labels.items()}
    return {int(v): str(int(v)) for v in labels}


def nanmean(values: Iterable[float]) -> float:
    """Mean of the finite values (NaN when there are none): undefined per-class scores are left out."""
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.6g}"
    return str(value)


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_cell(row.get(c, math.nan)) for c in columns])
    atomic_write_text(path, buffer.getvalue())


def json_clean(obj: Any) -> Any:
    """NaN/inf → None (strict JSON), paths → str, numpy scalars → Python numbers."""
    if isinstance(obj, Mapping):
        return {str(k): json_clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_clean(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, os.PathLike):
        return str(obj)
    return obj


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    atomic_write_text(path, json.dumps(json_clean(data), indent=2) + "\n")


# --------------------------------------------------------------------------------------------------------------
# the printed summary


def _stat(entry: Any) -> str:
    """``0.912 ± 0.010`` from a ``{"mean", "std", "n"}`` entry; ``-`` when there is no value."""
    if not isinstance(entry, Mapping) or entry.get("mean") is None:
        return "-"
    std = entry.get("std")
    return f"{entry['mean']:.3f} ± {std:.3f}" if std is not None else f"{entry['mean']:.3f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
            for row in [header, *rows]]


def _agreement_lines(summary: Mapping[str, Any]) -> list[str]:
    per_class = summary.get("per_class") or {}
    names = list((summary.get("labels") or {}).values())
    rows = [[name, _stat(per_class.get(column("dice", name))), _stat(per_class.get(column("vs", name)))]
            for name in names]
    rows.append(["mean", _stat(summary.get("mean_dice")), _stat(summary.get("mean_vs"))])
    scope = [part for part, on in (("brain mask", summary.get("masked")),
                                   ("lesion voxels left out", summary.get("excluded"))) if on]
    title = (f"{summary['protocol']}: {summary.get('segmenter')} on real vs synthetic, "
             f"{summary.get('n_subjects')} subjects" + (f" ({', '.join(scope)})" if scope else ""))
    return [title, *_table(["class", "Dice", "VS"], rows)]


def _segment_lines(summary: Mapping[str, Any]) -> list[str]:
    synthetic, real = summary.get("synthetic") or {}, summary.get("upper_bound") or {}
    subjects = summary.get("subjects") or {}
    names = [*summary.get("regions", {}), *(summary.get("labels") or {}).values()]
    rows = [[name, _stat(synthetic.get(column("dice", name))), _stat(real.get(column("dice", name)))]
            for name in names]
    rows.append(["headline", _stat(synthetic.get("dice")), _stat(real.get("dice"))])
    title = (f"segment: UNet trained on synthetic images of {len(subjects.get('train', []))} subjects, Dice on the "
             f"real images of {len(subjects.get('test', []))} subjects")
    return [title, *_table(["class", "synthetic", "real (upper bound)" if real else "real (not trained)"], rows)]


def format_summary(summary: Mapping[str, Any]) -> str:
    """A short table of a downstream summary (mean ± sample std over subjects); the JSON beside it has the rest."""
    if summary.get("protocol") == "segment":
        lines = _segment_lines(summary)
    elif "per_class" in summary:
        lines = _agreement_lines(summary)
    else:
        return json.dumps(json_clean(summary), indent=2)
    if summary.get("csv"):
        folder = summary.get("folder")
        lines.append(f"per subject: {Path(folder) / summary['csv'] if folder else summary['csv']}")
    return "\n".join(lines)
