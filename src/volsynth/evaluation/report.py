"""A static HTML report comparing runs: a Table-1-style table, box plots, tri-planar figures, training curves.

``build_report(runs, out_dir)`` reads each run folder (``config.yaml``, ``evaluation/metrics.csv`` and
``summary.json``, ``downstream/``, ``log.csv``, ``validation.csv``, ``predictions/``) and writes into ``out_dir``:

- ``index.html``: one self-contained page (inline CSS, no scripts, no network) that references the PNGs beside it
  by relative path, so the folder can be zipped or opened offline;
- ``comparison.csv`` / ``comparison.md``: the table (the Markdown can be pasted into ``benchmarks/RESULTS.md``);
- ``box_<metric>.png``, ``triplanar_<subject>.png``, ``curves_<run>.png``, ``validation_curves.png``.

The table follows the seed paper's Table 1 (Ha et al.): one row per method, "mean ± std" over test subjects,
the best value of each column in **bold** and the second best underlined, each judged in the metric's direction
(SSIM/PSNR/Dice up, NMSE/MAE/LPIPS down) on the values as displayed, so visibly equal values share a place.
The "1st / 2nd" column counts, per method, the columns where it is first / second; as in the paper ("14
first-place and 6 second-place ranks across 20 experiments and metrics", i.e. 5 tasks × SSIM/PSNR/NMSE/LPIPS)
only the image-quality columns count; downstream Dice is shown but not counted unless asked.

Anything missing (no validation log, no LPIPS, no downstream results, no predictions) leaves that part out with a
note; the report never fails because a run is incomplete.
"""

from __future__ import annotations

import csv
import html
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from volsynth.evaluation.downstream import (
    PROTOCOL1_CSV,
    PROTOCOL1_SUMMARY,
    PROTOCOL2_CSV,
    PROTOCOL2_SUMMARY,
    find_prediction,
    read_run_config,
    resolve_manifest,
    summarise,
)
from volsynth.utils import atomic_path, atomic_write_text

# Image-quality metrics in the paper's order, then the masked variants; direction +1 = higher is better.
IQA_ORDER: tuple[str, ...] = ("ssim", "psnr", "nmse", "mae", "lpips")
DIRECTIONS: dict[str, int] = {"ssim": 1, "psnr": 1, "nmse": -1, "mae": -1, "mse": -1, "rmse": -1, "lpips": -1,
                              "dice": 1, "vs": 1}
# Downstream columns (from RUN/downstream/): key → header. dice_s2r = Protocol 1 (trained on synthetic, tested on
# real); dice_agree / vs_agree = Protocol 2 (one segmenter on real vs synthetic).
DOWNSTREAM_COLUMNS: dict[str, str] = {
    "dice_s2r": "Dice (synthetic-to-real)",
    "dice_agree": "Dice (real vs synthetic seg.)",
    "vs_agree": "VS (real vs synthetic seg.)",
}
PRETTY: dict[str, str] = {"ssim": "SSIM", "psnr": "PSNR", "nmse": "NMSE", "mae": "MAE", "lpips": "LPIPS",
                          "mse": "MSE", "rmse": "RMSE"}


def metric_direction(metric: str) -> int:
    """+1 when higher is better, −1 when lower is better (by the metric's first name part: ``ssim_mask`` → +1)."""
    head = metric.lower().split("_")[0]
    return DIRECTIONS.get(head, 1)


def metric_header(metric: str) -> str:
    """Display name with the direction arrow, e.g. ``SSIM ↑``, ``NMSE (mask) ↓``."""
    if metric in DOWNSTREAM_COLUMNS:
        name = DOWNSTREAM_COLUMNS[metric]
    else:
        head, _, rest = metric.partition("_")
        name = PRETTY.get(head, head.upper()) + (f" ({rest.replace('_', ' ')})" if rest else "")
    return f"{name} {'↑' if metric_direction(metric) > 0 else '↓'}"


# --------------------------------------------------------------------------------------------------------------
# reading runs


@dataclass
class _Stat:
    mean: float
    std: float | None
    n: int


@dataclass
class RunData:
    """One run as the report sees it; every part may be missing (then ``notes`` says why)."""

    path: Path
    method: str
    label: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, _Stat] = field(default_factory=dict)  # metric → mean ± std over subjects
    per_subject: dict[str, dict[str, float]] = field(default_factory=dict)  # metric → subject → value
    profile: str | None = None
    log: list[dict[str, float]] = field(default_factory=list)
    validation: list[dict[str, float]] = field(default_factory=list)
    protocol1: dict[str, Any] | None = None
    protocol2: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)


def _to_float(text: Any) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return math.nan


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def _numeric_rows(path: Path) -> list[dict[str, float]]:
    return [{k: _to_float(v) for k, v in row.items() if k is not None} for row in _read_csv(path)]


def _stat_from(entry: Any) -> _Stat | None:
    if not isinstance(entry, Mapping) or entry.get("mean") is None:
        return None
    mean = _to_float(entry["mean"])
    if not math.isfinite(mean):
        return None
    std = _to_float(entry.get("std")) if entry.get("std") is not None else None
    return _Stat(mean, std if std is not None and math.isfinite(std) else None, int(entry.get("n") or 0))


def _stat_of(values: Sequence[float]) -> _Stat | None:
    s = summarise(values)
    return None if s["mean"] is None else _Stat(float(s["mean"]), s["std"], int(s["n"] or 0))  # type: ignore[arg-type]


def load_run(path: str | os.PathLike[str]) -> RunData:
    """Read what the report needs from a run folder, recording every missing or unreadable part as a note."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"run folder not found: {path}")
    try:
        config = read_run_config(path)
    except Exception as err:  # a broken YAML must not stop the other runs from being reported
        config = {}
        note = f"config.yaml unreadable ({err})"
    else:
        note = "" if config else "no config.yaml: method name taken from the folder name"
    method_section = config.get("method")
    method = str(method_section.get("name") or path.name) if isinstance(method_section, Mapping) else path.name
    run = RunData(path=path, method=method, config=config)
    if note:
        run.notes.append(note)
    _read_evaluation(run)
    _read_downstream(run)
    for name, attr in (("log.csv", "log"), ("validation.csv", "validation")):
        file = path / name
        if not file.is_file():
            run.notes.append(f"no {name}: " + ("no training curves" if name == "log.csv" else "no validation curves"))
            continue
        try:
            setattr(run, attr, _numeric_rows(file))
        except (OSError, csv.Error, UnicodeDecodeError) as err:
            run.notes.append(f"{name} unreadable ({err})")
    return run


def _read_evaluation(run: RunData) -> None:
    folder = run.path / "evaluation"
    metrics_csv, summary_json = folder / "metrics.csv", folder / "summary.json"
    summary: dict[str, Any] = {}
    if summary_json.is_file():
        try:
            summary = json.loads(summary_json.read_text())
        except (OSError, json.JSONDecodeError) as err:
            run.notes.append(f"evaluation/summary.json unreadable ({err})")
    if metrics_csv.is_file():
        try:
            rows = _read_csv(metrics_csv)
        except (OSError, csv.Error, UnicodeDecodeError) as err:
            run.notes.append(f"evaluation/metrics.csv unreadable ({err})")
            rows = []
        for row in rows:
            subject = row.get("subject", "")
            for key, value in row.items():
                if key in (None, "subject"):
                    continue
                value_f = _to_float(value)
                if math.isfinite(value_f):
                    run.per_subject.setdefault(key, {})[subject] = value_f
    if not summary and not run.per_subject:
        run.notes.append("no evaluation/ (run `volsynth evaluate`): no image-quality metrics")
        return
    run.profile = summary.get("profile") if isinstance(summary.get("profile"), str) else None
    names = [k for k, v in summary.items() if isinstance(v, Mapping) and "mean" in v] + list(run.per_subject)
    for name in dict.fromkeys(names):
        stat = _stat_from(summary.get(name)) or _stat_of(list(run.per_subject.get(name, {}).values()))
        if stat is not None:
            run.stats[name] = stat
    lpips = summary.get("lpips")
    if "lpips" not in run.stats:
        reason = lpips.get("reason") if isinstance(lpips, Mapping) else None
        run.notes.append("LPIPS not available" + (f": {reason}" if reason else ""))


def _read_downstream(run: RunData) -> None:
    folder = run.path / "downstream"
    if not folder.is_dir():
        run.notes.append("no downstream/ (run `volsynth downstream`): no Dice columns")
        return
    for summary_name, csv_name, attr in ((PROTOCOL1_SUMMARY, PROTOCOL1_CSV, "protocol1"),
                                         (PROTOCOL2_SUMMARY, PROTOCOL2_CSV, "protocol2")):
        file = folder / summary_name
        if not file.is_file():
            continue
        try:
            summary = json.loads(file.read_text())
            rows = _read_csv(folder / csv_name) if (folder / csv_name).is_file() else []
        except (OSError, json.JSONDecodeError, csv.Error, UnicodeDecodeError) as err:
            run.notes.append(f"downstream/{summary_name} unreadable ({err})")
            continue
        setattr(run, attr, summary)
        if attr == "protocol1":
            stat = _stat_from((summary.get("synthetic") or {}).get("dice"))
            if stat is not None:
                run.stats["dice_s2r"] = stat
                run.per_subject["dice_s2r"] = {r["subject"]: _to_float(r["dice"]) for r in rows
                                               if r.get("model") == "synthetic"}
        else:
            for key, column in (("dice", "dice_agree"), ("vs", "vs_agree")):
                stat = _stat_from(summary.get(key))
                if stat is not None:
                    run.stats[column] = stat
                    run.per_subject[column] = {r["subject"]: _to_float(r.get(key)) for r in rows}
    if run.protocol1 is None and run.protocol2 is None:
        run.notes.append("downstream/ holds no protocol summary")


def _assign_labels(runs: Sequence[RunData]) -> None:
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


# --------------------------------------------------------------------------------------------------------------
# the table


def _fmt_mean(value: float) -> str:
    # The paper prints 3 decimals for the mean ("0.872 ± 0.02", "30.004 ± 1.35"); tiny values keep 3 digits.
    return f"{value:.3f}" if value == 0 or abs(value) >= 0.01 else f"{value:.3g}"


def _fmt_std(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:.2f}" if value == 0 or abs(value) >= 0.01 else f"{value:.2g}"


def _fmt_cell(stat: _Stat | None) -> str:
    if stat is None:
        return "—"
    std = _fmt_std(stat.std)
    return f"{_fmt_mean(stat.mean)} ± {std}" if std else _fmt_mean(stat.mean)


@dataclass
class Table:
    """The comparison: ``places[column][label]`` is 1 (best), 2 (second) or absent."""

    columns: list[str]
    counted: list[str]  # columns that count towards the 1st/2nd tally
    rows: list[RunData]
    places: dict[str, dict[str, int]]
    firsts: dict[str, int]
    seconds: dict[str, int]
    upper_bound: _Stat | None = None


def rank_places(values: Mapping[str, float], direction: int) -> dict[str, int]:
    """First and second places among ``label → value`` (ties share a place; the next distinct value is second).

    Values are compared as displayed (3 significant decimals), so rounding never hands out an invisible win.
    Needs at least two finite values; otherwise no places are given.
    """
    shown = {k: float(_fmt_mean(v)) for k, v in values.items() if math.isfinite(v)}
    if len(shown) < 2:
        return {}
    distinct = sorted(set(shown.values()), reverse=direction > 0)
    places: dict[str, int] = {}
    for place, value in enumerate(distinct[:2], start=1):
        for label, v in shown.items():
            if v == value:
                places[label] = place
    return places


def build_table(runs: Sequence[RunData], *, count_downstream: bool = False) -> Table:
    """Columns present in any run (IQA in the paper's order, masked variants, then downstream) and their places."""
    present = {m for run in runs for m in run.stats}
    iqa = [m for m in IQA_ORDER if m in present]
    masked = [f"{m}_mask" for m in IQA_ORDER if f"{m}_mask" in present]
    others = sorted(m for m in present if m not in iqa and m not in masked and m not in DOWNSTREAM_COLUMNS)
    downstream = [m for m in DOWNSTREAM_COLUMNS if m in present]
    columns = iqa + masked + others + downstream
    counted = iqa + masked + others + (downstream if count_downstream else [])
    places = {c: rank_places({r.label: r.stats[c].mean for r in runs if c in r.stats}, metric_direction(c))
              for c in columns}
    firsts = {r.label: sum(places[c].get(r.label) == 1 for c in counted) for r in runs}
    seconds = {r.label: sum(places[c].get(r.label) == 2 for c in counted) for r in runs}
    upper = next((_stat_from(r.protocol1.get("upper_bound", {}).get("dice")) for r in runs
                  if r.protocol1 and r.protocol1.get("upper_bound")), None)
    return Table(columns, counted, list(runs), places, firsts, seconds, upper)


def _n_subjects(run: RunData) -> int:
    return max((s.n for k, s in run.stats.items() if k not in DOWNSTREAM_COLUMNS), default=0)


def table_markdown(table: Table) -> str:
    """The table as GitHub Markdown (best **bold**, second <ins>underlined</ins>)."""
    header = ["Method", *(metric_header(c) for c in table.columns), "1st / 2nd", "n"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run in table.rows:
        cells = [run.label.replace("|", "\\|")]
        for c in table.columns:
            text = _fmt_cell(run.stats.get(c))
            place = table.places[c].get(run.label)
            cells.append(f"**{text}**" if place == 1 else f"<ins>{text}</ins>" if place == 2 else text)
        cells += [f"{table.firsts[run.label]} / {table.seconds[run.label]}", str(_n_subjects(run))]
        lines.append("| " + " | ".join(cells) + " |")
    if table.upper_bound is not None and "dice_s2r" in table.columns:
        cells = ["*Upper bound (real → real)*"] + [
            f"*{_fmt_cell(table.upper_bound)}*" if c == "dice_s2r" else "" for c in table.columns] + ["", ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def table_csv(table: Table) -> str:
    """The table as CSV: method, run, then ``<metric>_mean``, ``<metric>_std``, ``<metric>_place`` per column."""
    import io

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["method", "run", *[f"{c}_{k}" for c in table.columns for k in ("mean", "std", "n", "place")],
                     "firsts", "seconds"])
    for run in table.rows:
        cells: list[Any] = [run.label, str(run.path)]
        for c in table.columns:
            s = run.stats.get(c)
            cells += [repr(s.mean) if s else "", repr(s.std) if s and s.std is not None else "", s.n if s else "",
                      table.places[c].get(run.label, "")]
        writer.writerow([*cells, table.firsts[run.label], table.seconds[run.label]])
    return buf.getvalue()


def table_html(table: Table) -> str:
    esc = html.escape
    head = "".join(f"<th>{esc(metric_header(c))}</th>" for c in table.columns)
    out = ['<table class="comparison">', f"<thead><tr><th>Method</th>{head}<th>1st / 2nd</th><th>n</th></tr></thead>",
           "<tbody>"]
    for run in table.rows:
        cells = []
        for c in table.columns:
            text = esc(_fmt_cell(run.stats.get(c)))
            place = table.places[c].get(run.label)
            if place == 1:
                cells.append(f'<td class="first" data-metric="{esc(c)}"><b>{text}</b></td>')
            elif place == 2:
                cells.append(f'<td class="second" data-metric="{esc(c)}"><u>{text}</u></td>')
            else:
                cells.append(f'<td data-metric="{esc(c)}">{text}</td>')
        out.append(f'<tr><th scope="row" class="method">{esc(run.label)}</th>{"".join(cells)}'
                   f"<td>{table.firsts[run.label]} / {table.seconds[run.label]}</td><td>{_n_subjects(run)}</td></tr>")
    if table.upper_bound is not None and "dice_s2r" in table.columns:
        cells = "".join(f'<td><i>{esc(_fmt_cell(table.upper_bound))}</i></td>' if c == "dice_s2r" else "<td></td>"
                        for c in table.columns)
        out.append(f'<tr class="upper"><th scope="row"><i>Upper bound (real → real)</i></th>{cells}'
                   f"<td></td><td></td></tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


# --------------------------------------------------------------------------------------------------------------
# figures (matplotlib Figure objects with the Agg canvas: no pyplot global state)


def _new_figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")  # room for titles and colour bars
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: Path) -> Path:
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    return path


def _slug(text: str) -> str:
    return re.sub(r"[^0-9A-Za-z._-]+", "_", text).strip("_") or "x"


def box_plot(runs: Sequence[RunData], metric: str, path: Path) -> Path | None:
    """Per-subject distribution of ``metric`` per run (box + jittered points); None when no run has values."""
    series = [(r.label, [v for v in r.per_subject.get(metric, {}).values() if math.isfinite(v)]) for r in runs]
    series = [(label, values) for label, values in series if values]
    if not series:
        return None
    fig = _new_figure(max(4.0, 1.3 * len(series) + 1.5), 3.6)
    ax = fig.add_subplot(1, 1, 1)
    ax.boxplot([v for _, v in series], widths=0.5, showfliers=False)
    rng = np.random.default_rng(0)  # fixed jitter: the same report twice gives the same pictures
    for i, (_, values) in enumerate(series, start=1):
        ax.scatter(i + rng.uniform(-0.12, 0.12, len(values)), values, s=10, alpha=0.6, color="tab:blue", zorder=3)
    ax.set_xticks(range(1, len(series) + 1), [label for label, _ in series], rotation=20, ha="right")
    ax.set_ylabel(metric_header(metric))
    ax.set_title(f"{metric_header(metric)} per test subject")
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def training_curves(run: RunData, path: Path) -> Path | None:
    """Losses vs iteration (and validation SSIM / PSNR when logged) for one run; None without log.csv."""
    losses = [k for k in (run.log[0] if run.log else {}) if k not in ("iteration", "seconds", "lr")]
    val_keys = [k for k in ("ssim", "psnr") if run.validation and k in run.validation[0]]
    if not losses and not val_keys:
        return None
    panels = (1 if losses else 0) + len(val_keys)
    fig = _new_figure(4.2 * panels, 3.4)
    index = 1
    if losses:
        ax = fig.add_subplot(1, panels, index)
        it = np.array([r.get("iteration", math.nan) for r in run.log])
        positive = True
        for key in losses:
            values = np.array([r.get(key, math.nan) for r in run.log])
            ok = np.isfinite(values) & np.isfinite(it)
            if ok.any():
                ax.plot(it[ok], values[ok], label=key, lw=1)
                positive &= bool(np.all(values[ok] > 0))
        if positive:
            ax.set_yscale("log")
        ax.set_xlabel("iteration")
        ax.set_title("training losses")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        index += 1
    for key in val_keys:
        ax = fig.add_subplot(1, panels, index)
        it = np.array([r.get("iteration", math.nan) for r in run.validation])
        values = np.array([r.get(key, math.nan) for r in run.validation])
        ax.plot(it, values, marker="o", ms=3)
        ax.set_xlabel("iteration")
        ax.set_title(f"validation {metric_header(key)}")
        ax.grid(alpha=0.3)
        index += 1
    fig.suptitle(run.label)
    return _save(fig, path)


def validation_comparison(runs: Sequence[RunData], path: Path) -> Path | None:
    """Validation SSIM and PSNR of every run on shared axes; None when no run logged validation."""
    with_val = [r for r in runs if r.validation]
    if not with_val:
        return None
    fig = _new_figure(9.0, 3.4)
    for index, key in enumerate(("ssim", "psnr"), start=1):
        ax = fig.add_subplot(1, 2, index)
        for run in with_val:
            it = np.array([r.get("iteration", math.nan) for r in run.validation])
            values = np.array([r.get(key, math.nan) for r in run.validation])
            if np.isfinite(values).any():
                ax.plot(it, values, marker="o", ms=3, label=run.label)
        ax.set_xlabel("iteration")
        ax.set_title(f"validation {metric_header(key)}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path)


def _display_scale(array: np.ndarray, kind: str, *, already_unit: bool = False) -> np.ndarray:
    """Map a volume to the [0, 1] display scale: as is when ``already_unit``, else CT/CBCT by the HU window
    [-1024, 3000] (the metrics' scale), MR by min-max."""
    from volsynth.evaluation.metrics import CT_WINDOW_HU

    array = np.asarray(array, dtype=np.float32)
    if already_unit:
        return np.clip(array, 0.0, 1.0)
    if kind in ("ct", "cbct"):
        lo, hi = CT_WINDOW_HU
        return np.clip((array - lo) / (hi - lo), 0.0, 1.0)
    lo, hi = float(array.min()), float(array.max())
    return np.zeros_like(array) if hi <= lo else (array - lo) / (hi - lo)


def _looks_unit(array: np.ndarray) -> bool:
    return float(array.min()) >= -0.05 and float(array.max()) <= 1.05


def _planes(array: np.ndarray, centre: Sequence[int]) -> list[np.ndarray]:
    """Axial, coronal, sagittal mid-slices of an ``(x, y, z)`` volume, transposed for ``imshow(origin="lower")``."""
    i, j, k = centre
    return [array[:, :, k].T, array[:, j, :].T, array[i, :, :].T]


def _aspects(spacing: Sequence[float]) -> list[float]:
    sx, sy, sz = spacing
    return [sy / sx, sz / sx, sz / sy]


def triplanar_figure(subject: str, source: Any, target: Any, predictions: Sequence[tuple[str, np.ndarray]],
                     path: Path, *, source_kind: str = "mr", target_kind: str = "mr") -> Path:
    """Rows: source, target, each prediction, each |prediction − target|; columns: axial/coronal/sagittal.

    ``source``/``target`` are ``Volume`` objects (``.array`` in (x, y, z), ``.spacing``); predictions are arrays
    on the target's grid. Target and predictions share one display scale (MR: min-max target, predictions
    already on [0, 1]; CT: the [-1024, 3000] HU window); the error rows share one colour range per subject.
    """
    tgt = _display_scale(target.array, target_kind)
    src = _display_scale(source.array, source_kind) if source is not None else None
    # Predictions are on [0, 1] for MR and in HU for CT; a CT prediction still on [0, 1] (next to a HU target)
    # is taken as already window-scaled.
    unit_target = _looks_unit(target.array)
    preds = [(label, _display_scale(p, target_kind, already_unit=_looks_unit(p) and (target_kind == "mr"
                                                                                     or not unit_target)))
             for label, p in predictions]
    errors = [(label, np.abs(p - tgt)) for label, p in preds]
    vmax = max([float(np.percentile(e, 99.5)) for _, e in errors] + [1e-3])
    fg = np.argwhere(tgt > 0.05)
    centre = ((fg.min(0) + fg.max(0)) // 2).tolist() if fg.size else [s // 2 for s in tgt.shape]
    rows: list[tuple[str, np.ndarray | None, dict[str, Any], Sequence[float]]] = []
    if src is not None and src.shape == tgt.shape:
        rows.append(("source", src, {"cmap": "gray", "vmin": 0, "vmax": 1}, source.spacing))
    rows.append(("target", tgt, {"cmap": "gray", "vmin": 0, "vmax": 1}, target.spacing))
    rows += [(label, p, {"cmap": "gray", "vmin": 0, "vmax": 1}, target.spacing) for label, p in preds]
    rows += [(f"|{label} − target|", e, {"cmap": "inferno", "vmin": 0, "vmax": vmax}, target.spacing)
             for label, e in errors]
    fig = _new_figure(3 * 2.4 + 0.8, len(rows) * 2.3)
    error_axes, error_image = [], None
    for r, (name, volume, style, spacing) in enumerate(rows):
        for c, (plane, aspect) in enumerate(zip(_planes(volume, centre), _aspects(spacing), strict=True)):
            ax = fig.add_subplot(len(rows), 3, r * 3 + c + 1)
            image = ax.imshow(plane, origin="lower", aspect=aspect, interpolation="nearest", **style)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(("axial", "coronal", "sagittal")[c], fontsize=9)
            if c == 0:
                ax.set_ylabel(name, fontsize=8)
            if style["cmap"] == "inferno":
                error_axes.append(ax)
                error_image = image
    if error_image is not None:  # one colour bar for every error panel: they share the range
        fig.colorbar(error_image, ax=error_axes, shrink=0.8, label="|error| (display scale)")
    fig.suptitle(subject, fontsize=10)
    return _save(fig, path)


def _triplanar_all(runs: Sequence[RunData], out_dir: Path, subjects_to_show: int,
                   notes: list[str]) -> list[tuple[str, str]]:
    """Tri-planar PNGs for the first few test subjects predicted by every run; returns (subject, file name)."""
    from volsynth.data.io import read_volume
    from volsynth.data.manifest import load_manifest

    if subjects_to_show <= 0:
        return []
    base = next((r for r in runs if r.config), None)
    manifest_file = resolve_manifest(base.path, base.config) if base is not None else None
    if base is None or manifest_file is None:
        notes.append("Tri-planar figures left out: no run names a readable manifest (config.yaml data.manifest).")
        return []
    data = base.config.get("data") or {}
    source_name, target_name = str(data.get("source", "source")), str(data.get("target", "target"))
    source_kind, target_kind = str(data.get("source_kind", "mr")), str(data.get("target_kind", "mr"))
    try:
        manifest = load_manifest(manifest_file).by_name()
    except Exception as err:  # a report is still useful without the pictures
        notes.append(f"Tri-planar figures left out: manifest {manifest_file} unreadable ({err}).")
        return []
    shown = [r for r in runs if (r.path / "predictions").is_dir()]
    for r in runs:
        if r not in shown:
            notes.append(f"{r.label}: no predictions/ folder, left out of the tri-planar figures.")
    if not shown:
        notes.append("Tri-planar figures left out: no run has predictions.")
        return []
    common = sorted(s for s in manifest if all(find_prediction(r.path, s) is not None for r in shown))
    if not common:
        notes.append("Tri-planar figures left out: no subject is predicted by every run.")
        return []
    figures = []
    for subject in common[:subjects_to_show]:
        entry = manifest[subject]
        try:
            target_path = entry.image(target_name)
            if target_path is None:
                raise FileNotFoundError(f"no '{target_name}' image in the manifest")
            target = read_volume(target_path)
            source_path = entry.image(source_name)
            source = read_volume(source_path) if source_path is not None else None
            predictions = []
            for r in shown:
                pred = read_volume(find_prediction(r.path, subject)).array  # type: ignore[arg-type]
                if pred.shape != target.shape:
                    notes.append(f"{subject}: {r.label}'s prediction {pred.shape} is not on the target grid "
                                 f"{target.shape}; left out of its figure.")
                    continue
                predictions.append((r.label, pred))
            name = f"triplanar_{_slug(subject)}.png"
            triplanar_figure(subject, source, target, predictions, out_dir / name, source_kind=source_kind,
                             target_kind=target_kind)
            figures.append((subject, name))
        except Exception as err:  # one unreadable subject must not cost the whole report
            notes.append(f"Tri-planar figure for {subject} failed: {err}")
    return figures


# --------------------------------------------------------------------------------------------------------------
# the page

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1200px;
       color: #222; line-height: 1.45; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; margin: .5em 0; font-size: .92em; }
th, td { border: 1px solid #ccc; padding: .3em .6em; text-align: center; white-space: nowrap; }
thead th { background: #f3f3f3; } th.method { text-align: left; }
td.first { background: #eef6ee; } tr.upper { color: #555; }
.notes { background: #fff8e6; border-left: 4px solid #e0b000; padding: .5em 1em; }
.figs { display: flex; flex-wrap: wrap; gap: 1em; } .figs figure { margin: 0; }
figure img { max-width: 100%; border: 1px solid #eee; } figcaption { font-size: .85em; color: #555; }
code { background: #f4f4f4; padding: 0 .2em; }
"""


def _img(name: str, caption: str) -> str:
    return (f'<figure><img src="{html.escape(name, quote=True)}" alt="{html.escape(caption, quote=True)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _downstream_details(runs: Sequence[RunData]) -> str:
    esc = html.escape
    parts = []
    p2 = [r for r in runs if r.protocol2]
    if p2:
        keys = list(dict.fromkeys(k for r in p2 for k in (r.protocol2 or {}).get("per_class", {})))
        head = "".join(f"<th>{esc(k)}</th>" for k in keys)
        body = []
        for r in p2:
            per = (r.protocol2 or {}).get("per_class", {})
            body.append(f"<tr><th class='method'>{esc(r.label)}</th>"
                        + "".join(f"<td>{esc(_fmt_cell(_stat_from(per.get(k))))}</td>" for k in keys) + "</tr>")
        seg = esc(str((p2[0].protocol2 or {}).get("segmenter_repr") or (p2[0].protocol2 or {}).get("segmenter")))
        parts.append(f"<h3>Protocol 2: one segmenter on real and synthetic (<code>{seg}</code>)</h3>"
                     f"<table><thead><tr><th>Method</th>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>")
    p1 = [r for r in runs if r.protocol1]
    if p1:
        body = []
        for r in p1:
            summary = r.protocol1 or {}
            for tag, title in (("synthetic", "trained on synthetic"), ("upper_bound", "trained on real")):
                block = summary.get(tag)
                if not block:
                    continue
                cells = "".join(f"<td>{esc(k)}: {esc(_fmt_cell(_stat_from(v)))}</td>" for k, v in block.items())
                body.append(f"<tr><th class='method'>{esc(r.label)} — {title}</th>{cells}</tr>")
        parts.append("<h3>Protocol 1: segmenter trained on synthetic images with real labels, tested on real</h3>"
                     f"<table><tbody>{''.join(body)}</tbody></table>")
    return "\n".join(parts)


def build_report(runs: Sequence[str | os.PathLike[str]], out_dir: str | os.PathLike[str], *,
                 subjects_to_show: int = 3, title: str = "volsynth comparison",
                 count_downstream: bool = False) -> Path:
    """Write the comparison report of ``runs`` into ``out_dir``; returns the path of ``index.html``.

    Args:
        runs: run folders (``volsynth train --out RUN``, evaluated with ``volsynth evaluate`` into
            ``RUN/evaluation`` and optionally ``volsynth downstream``).
        out_dir: output folder (created); ``index.html``, ``comparison.{csv,md}`` and PNGs are written there.
        subjects_to_show: test subjects in tri-planar figures (the first ones, by name, predicted by every run).
        title: page title.
        count_downstream: also count the Dice columns in the "1st / 2nd" tally (the paper counts IQA only).

    Raises:
        ValueError: no runs given; FileNotFoundError: a run folder does not exist. Missing parts *inside* a run
        only produce notes.
    """
    if not runs:
        raise ValueError("build_report needs at least one run folder")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = [load_run(r) for r in runs]
    _assign_labels(data)
    notes: list[str] = []
    for run in data:
        notes += [f"{run.label}: {n}" for n in run.notes]
    profiles = sorted({r.profile for r in data if r.profile})
    if len(profiles) > 1:
        notes.insert(0, f"Runs were evaluated with different metric profiles ({', '.join(profiles)}); their "
                        f"columns are not comparable.")

    table = build_table(data, count_downstream=count_downstream)
    atomic_write_text(out / "comparison.csv", table_csv(table))
    atomic_write_text(out / "comparison.md", table_markdown(table))

    esc = html.escape
    sections: list[str] = []
    counted = ", ".join(metric_header(c) for c in table.counted) or "none"
    if table.columns:
        sections.append(
            "<h2>Comparison</h2>" + table_html(table)
            + "<p>Mean ± sample standard deviation over the test subjects. Best per column in <b>bold</b>, second "
              "<u>underlined</u> (arrows give the direction; equal values as displayed share a place). "
              f"“1st / 2nd” counts first and second places over: {esc(counted)} — image-quality columns only, as the "
              "seed paper's Table 1 tally. Also as <a href=\"comparison.csv\">CSV</a> and "
              "<a href=\"comparison.md\">Markdown</a>.</p>")
    else:
        sections.append("<h2>Comparison</h2><p>No run has evaluation results yet (run <code>volsynth evaluate</code>)."
                        "</p>")

    boxes = []
    for metric in table.columns:
        name = f"box_{_slug(metric)}.png"
        try:
            if box_plot(data, metric, out / name) is not None:
                boxes.append(_img(name, f"{metric_header(metric)} per test subject"))
        except Exception as err:  # a plot failure costs one figure, not the report
            notes.append(f"Box plot of {metric} failed: {err}")
    if boxes:
        sections.append("<h2>Per-subject distributions</h2><div class='figs'>" + "".join(boxes) + "</div>")

    figures = _triplanar_all(data, out, subjects_to_show, notes)
    if figures:
        sections.append("<h2>Tri-planar views</h2><p>Mid-slices through the target's foreground; target and "
                        "predictions on one display scale, absolute errors on one colour scale per subject.</p>"
                        + "".join(_img(name, subject) for subject, name in figures))

    curves = []
    try:
        if validation_comparison(data, out / "validation_curves.png") is not None:
            curves.append(_img("validation_curves.png", "validation SSIM / PSNR, all runs"))
    except Exception as err:
        notes.append(f"Validation curves failed: {err}")
    for run in data:
        name = f"curves_{_slug(run.label)}.png"
        try:
            if training_curves(run, out / name) is not None:
                curves.append(_img(name, f"training curves: {run.label}"))
        except Exception as err:
            notes.append(f"Training curves of {run.label} failed: {err}")
    if curves:
        sections.append("<h2>Training curves</h2>" + "".join(curves))

    details = _downstream_details(data)
    if details:
        sections.append("<h2>Downstream details</h2>" + details)

    run_rows = "".join(
        f"<tr><th class='method'>{esc(r.label)}</th><td>{esc(r.method)}</td><td><code>{esc(str(r.path))}</code></td>"
        f"<td>{esc(str((r.config.get('data') or {}).get('source', '?')))} → "
        f"{esc(str((r.config.get('data') or {}).get('target', '?')))}</td>"
        f"<td>{esc(str(r.profile or '—'))}</td></tr>" for r in data)
    sections.append("<h2>Runs</h2><table><thead><tr><th>Label</th><th>Method</th><th>Folder</th><th>Task</th>"
                    f"<th>Metric profile</th></tr></thead><tbody>{run_rows}</tbody></table>")
    if notes:
        sections.insert(1, "<div class='notes'><b>Notes</b><ul>" + "".join(f"<li>{esc(n)}</li>" for n in notes)
                        + "</ul></div>")

    page = (f"<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>{esc(title)}</title>\n"
            f"<style>{_CSS}</style>\n</head>\n<body>\n<h1>{esc(title)}</h1>\n" + "\n".join(sections)
            + "\n<footer><p><small>Generated by volsynth.</small></p></footer>\n</body>\n</html>\n")
    return atomic_write_text(out / "index.html", page)
