"""The report's charts (matplotlib ``Figure`` objects on the Agg canvas: no pyplot global state, no display).

- :func:`paired_dots`: per-subject scores, one panel per metric, one column per method, a grey line joining each
  subject across methods (the comparison is paired); a box is added only with ≥ 10 subjects, because quartiles of
  a handful of points mislead. Bounded scores (SSIM, Dice, VS, LPIPS) keep their full [0, 1] axis so small gaps
  are not blown up.
- :func:`training_curves`: one panel per loss (log scale when it spans more than a decade), losses switched off
  in the config (weight 0) or identically zero left out; validation scores beside them.
- :func:`validation_curves`: validation SSIM / PSNR of every run against the iteration.
- :func:`time_to_quality`: validation PSNR against wall-clock seconds, every run on one axis, the phantom ceiling
  as a horizontal line when known.

Every function returns the written path, or None when it has nothing to draw.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from volsynth.evaluation.report.load import RunData
from volsynth.evaluation.report.tables import metric_header
from volsynth.utils import atomic_path

BOUNDED = ("ssim", "dice", "vs", "lpips")  # scores on [0, 1]: shown on their whole range
BOX_MIN_SUBJECTS = 10
PANELS_PER_ROW = 4


def new_figure(width: float, height: float) -> Any:
    """A figure on its own Agg canvas. Layout is placed by hand (:func:`grid`): matplotlib's constrained layout
    measured about a third of the report's time on 2 CPU cores."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def save(fig: Any, path: Path) -> Path:
    with atomic_path(path, suffix=".png") as tmp:
        # zlib level 3: files ~10 % larger than the default 6, written several times faster
        fig.savefig(tmp, format="png", dpi=100, pil_kwargs={"compress_level": 3})
    return path


def slug(text: str) -> str:
    """A file-name-safe form of a label (never empty, never a path)."""
    return re.sub(r"[^0-9A-Za-z._-]+", "_", text).strip("._") or "x"


def run_colours(runs: Sequence[RunData]) -> dict[str, Any]:
    """One fixed colour per run, the same in every chart."""
    from matplotlib import colormaps

    palette = colormaps["tab10"].colors
    return {r.label: palette[i % len(palette)] for i, r in enumerate(runs)}


def grid(fig: Any, count: int, *, left: float = 0.6, right: float = 0.2, top: float = 0.35, bottom: float = 0.5,
         wspace: float = 0.55, hspace: float = 0.75, cols: int = PANELS_PER_ROW) -> list[Any]:
    """``count`` axes in rows of at most ``cols``, with margins and gaps given in inches."""
    from matplotlib.gridspec import GridSpec

    cols = min(count, cols)
    rows = math.ceil(count / cols)
    width, height = fig.get_size_inches()
    panel_w = (width - left - right - wspace * (cols - 1)) / cols
    panel_h = (height - top - bottom - hspace * (rows - 1)) / rows
    spec = GridSpec(rows, cols, figure=fig, left=left / width, right=1 - right / width, bottom=bottom / height,
                    top=1 - top / height, wspace=wspace / panel_w, hspace=hspace / panel_h)
    return [fig.add_subplot(spec[i // cols, i % cols]) for i in range(count)]


def paired_dots(runs: Sequence[RunData], columns: Sequence[str], path: Path, *, profile: str | None = None,
                colours: Mapping[str, Any] | None = None) -> Path | None:
    """Per-subject values of ``columns``, one panel each, subjects joined across methods; None without data."""
    columns = [c for c in columns if any(r.per_subject.get(c) for r in runs)]
    if not columns:
        return None
    colours = colours or run_colours(runs)
    cols = min(len(columns), PANELS_PER_ROW)
    rotate = len(runs) > 2
    # room under each panel for the method names (rotated by 25° when there are more than two)
    label_room = 0.3 + (0.035 * max(len(r.label) for r in runs) if rotate else 0.0)
    rows = math.ceil(len(columns) / cols)
    panel_w = max(2.4, min(0.8 * len(runs), 3.2))
    fig = new_figure(0.6 + cols * panel_w + (cols - 1) * 0.55 + 0.2, rows * (2.3 + label_room) + 0.35)
    axes = grid(fig, len(columns), bottom=label_room, hspace=label_room + 0.4)
    for ax, column in zip(axes, columns, strict=True):
        subjects = sorted({s for r in runs for s in r.per_subject.get(column, {})})
        matrix = np.array([[r.per_subject.get(column, {}).get(s, math.nan) for r in runs] for s in subjects])
        x = np.arange(len(runs))
        for values in matrix:  # one grey line per subject across the methods
            ok = np.isfinite(values)
            ax.plot(x[ok], values[ok], color="0.75", lw=0.8, zorder=1)
        for i, r in enumerate(runs):
            values = matrix[:, i][np.isfinite(matrix[:, i])]
            if values.size >= BOX_MIN_SUBJECTS:
                ax.boxplot([values], positions=[i], widths=0.45, showfliers=False, zorder=2)
            ax.scatter(np.full(values.size, i), values, s=16, color=colours[r.label], zorder=3,
                       edgecolors="white", linewidths=0.4)
        if column.split("_")[0] in BOUNDED:
            ax.set_ylim(-0.02, 1.02)
        ax.set_xticks(x, [r.label for r in runs], rotation=25 if rotate else 0, ha="right" if rotate else "center",
                      fontsize=8)
        ax.set_xlim(-0.5, len(runs) - 0.5)
        ax.set_title(metric_header(column, profile), fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        ax.tick_params(axis="y", labelsize=8)
    return save(fig, path)


def zero_weight_losses(config: Mapping[str, Any], names: Sequence[str]) -> set[str]:
    """Losses the config switches off: ``method.<loss>.weight``, ``<loss>_weight`` or ``lambda_<loss>`` equal 0
    (for ``adv_g`` the ``adversarial`` / ``adv`` sections are looked up as well)."""
    method = config.get("method") if isinstance(config.get("method"), Mapping) else {}
    off = set()
    for name in names:
        head = name.split("_")[0]
        keys = dict.fromkeys([name, head, "adversarial" if head == "adv" else head])
        for key in keys:
            section = method.get(key)
            if isinstance(section, Mapping) and section.get("weight") == 0:
                off.add(name)
            if any(method.get(k) == 0 for k in (f"{key}_weight", f"lambda_{key}", f"weight_{key}")):
                off.add(name)
    return off


def _smooth(values: np.ndarray) -> np.ndarray:
    """Moving average over ~5 % of the points (edges use the points available)."""
    window = max(1, values.size // 20)
    if window == 1:
        return values
    kernel = np.ones(window)
    return np.convolve(values, kernel, "same") / np.convolve(np.ones_like(values), kernel, "same")


def training_curves(run: RunData, path: Path, colour: Any = "tab:blue") -> tuple[Path | None, list[str]]:
    """One panel per loss and per validation score of one run; returns (path or None, losses left out)."""
    names = [k for k in (run.log[0] if run.log else {}) if k not in ("iteration", "seconds", "lr")]
    off = zero_weight_losses(run.config, names)
    flat = {k for k in names if not any(math.isfinite(r.get(k, math.nan)) and r.get(k) != 0 for r in run.log)}
    shown = [k for k in names if k not in off | flat]
    left_out = [f"{k} (weight 0)" for k in names if k in off] + [f"{k} (always 0)" for k in names
                                                                 if k in flat and k not in off]
    val_keys = [k for k in ("ssim", "psnr") if any(math.isfinite(r.get(k, math.nan)) for r in run.validation)]
    panels = [("loss", k) for k in shown] + [("val", k) for k in val_keys]
    if not panels:
        return None, left_out
    cols = min(len(panels), PANELS_PER_ROW)
    fig = new_figure(0.65 + 2.7 * cols + 0.6 * (cols - 1) + 0.2, 2.35 * math.ceil(len(panels) / cols) + 0.1)
    for ax, (kind, key) in zip(grid(fig, len(panels), left=0.65, wspace=0.6, hspace=0.85, bottom=0.5), panels,
                               strict=True):
        rows = run.log if kind == "loss" else run.validation
        it = np.array([r.get("iteration", math.nan) for r in rows])
        values = np.array([r.get(key, math.nan) for r in rows])
        ok = np.isfinite(it) & np.isfinite(values)
        it, values = it[ok], values[ok]
        if kind == "loss":
            ax.plot(it, values, color=colour, lw=0.6, alpha=0.35)
            ax.plot(it, _smooth(values), color=colour, lw=1.4)
            positive = values[values > 0]
            if positive.size == values.size and positive.size and positive.max() > 10 * positive.min():
                ax.set_yscale("log")
            ax.set_title(key if "loss" in key else f"loss: {key}", fontsize=9)
        else:
            ax.plot(it, values, color=colour, marker="o", ms=3)
            ax.set_title(f"validation {metric_header(key)}", fontsize=9)
        ax.set_xlabel("iteration", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    return save(fig, path), left_out


def validation_curves(runs: Sequence[RunData], path: Path, colours: Mapping[str, Any] | None = None) -> Path | None:
    """Validation SSIM and PSNR of every run against the iteration; None when no run logged validation."""
    keys = [k for k in ("ssim", "psnr") if any(math.isfinite(r.get(k, math.nan)) for run in runs
                                               for r in run.validation)]
    if not keys:
        return None
    colours = colours or run_colours(runs)
    fig = new_figure(0.65 + 4.0 * len(keys) + 0.7 * (len(keys) - 1) + 0.2, 3.0)
    for ax, key in zip(grid(fig, len(keys), left=0.65, wspace=0.7), keys, strict=True):
        for run in runs:
            it = np.array([r.get("iteration", math.nan) for r in run.validation])
            values = np.array([r.get(key, math.nan) for r in run.validation])
            ok = np.isfinite(it) & np.isfinite(values)
            if ok.any():
                ax.plot(it[ok], values[ok], marker="o", ms=3, label=run.label, color=colours[run.label])
        ax.set_xlabel("iteration", fontsize=8)
        ax.set_title(f"validation {metric_header(key)}", fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return save(fig, path)


def time_to_quality(runs: Sequence[RunData], path: Path, *, ceiling_psnr: float | None = None,
                    colours: Mapping[str, Any] | None = None) -> Path | None:
    """Validation PSNR against wall-clock seconds since the run began; None when no run has both."""
    series = []
    for run in runs:
        points = sorted((r["seconds"], r["psnr"]) for r in run.validation
                        if math.isfinite(r.get("seconds", math.nan)) and math.isfinite(r.get("psnr", math.nan)))
        if points:
            series.append((run, np.array(points)))
    if not series:
        return None
    colours = colours or run_colours(runs)
    fig = new_figure(7.5, 3.6)
    ax = grid(fig, 1, left=0.7, bottom=0.5)[0]
    for run, points in series:
        ax.plot(points[:, 0], points[:, 1], marker="o", ms=3, label=run.label, color=colours[run.label])
    if ceiling_psnr is not None and math.isfinite(ceiling_psnr):
        ax.axhline(ceiling_psnr, color="0.3", ls="--", lw=1, label="phantom ceiling (test PSNR)")
    positive = np.concatenate([p[:, 0] for _, p in series])
    positive = positive[positive > 0]
    if positive.size and positive.max() > 100 * positive.min():
        ax.set_xscale("log")
    ax.set_xlabel("wall-clock seconds since training began", fontsize=8)
    ax.set_ylabel(metric_header("psnr"), fontsize=8)
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save(fig, path)
