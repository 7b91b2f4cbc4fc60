"""``build_report``: read the runs, make the tables and figures, render ``templates/report.html.j2``.

The page is static and offline: inline CSS, no scripts, no network; images are PNG files beside ``index.html``
(referenced by relative path), so the folder can be zipped or served as is. Jinja2 autoescaping escapes every
run, method, subject and file name. Everything is written atomically inside ``out_dir`` and nowhere else;
``index.html`` is written last, so a page that exists refers to files that exist.
"""

from __future__ import annotations

import datetime as _dt
import math
import os
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from volsynth.errors import OutputError
from volsynth.evaluation.report import figures, tables
from volsynth.evaluation.report.load import RunData, Stat, assign_labels, load_run, stat_from
from volsynth.evaluation.report.triplanar import collect_triplanar
from volsynth.utils import atomic_write_text, inside

MODALITY_NAMES: dict[str, str] = {"t1": "T1w", "t1w": "T1w", "t2": "T2w", "t2w": "T2w", "pd": "PDw", "pdw": "PDw",
                                  "flair": "FLAIR", "t1ce": "T1w+Gd", "t1c": "T1w+Gd", "t1gd": "T1w+Gd",
                                  "ct": "CT", "cbct": "CBCT", "mr": "MR"}
PER_SUBJECT_OPEN_ROWS = 40  # longer per-subject tables start folded


def modality_name(key: Any) -> str:
    return MODALITY_NAMES.get(str(key).lower(), str(key)) if key else "?"


def _section(config: Mapping[str, Any], name: str) -> dict[str, Any]:
    value = config.get(name)
    return value if isinstance(value, dict) else {}


def _fmt_seconds(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "—"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}" if minutes else f"{secs} s"


def _fmt_list(values: Any, sep: str = "×") -> str:
    return sep.join(str(v) for v in values) if isinstance(values, list | tuple) else str(values)


def _sampling(data: Mapping[str, Any]) -> str:
    s = _section(data, "sampling")
    if not s:
        return "—"
    per = f", {s['per_step']} per step" if s.get("per_step") is not None else ""
    if s.get("kind") == "slab":
        return (f"slab: axis {s.get('axis', '?')}, depth {s.get('depth', '?')}, in-plane "
                f"{_fmt_list(s.get('in_plane', '?'))}{per}")
    fg = s.get("foreground_probability")
    return f"patch {_fmt_list(s.get('patch_size', '?'))}{per}" + (f", foreground p {fg}" if fg is not None else "")


def _link(target: Path, out: Path) -> str | None:
    if not target.is_file():
        return None
    try:
        return Path(os.path.relpath(target.resolve(), out.resolve())).as_posix()
    except ValueError:  # another drive (Windows)
        return target.resolve().as_uri()


def _run_summary(runs: Sequence[RunData], out: Path) -> list[dict[str, Any]]:
    """The configuration table, transposed (one row per field, one column per run)."""
    fields: list[tuple[str, list[Any]]] = []

    def add(name: str, values: list[Any]) -> None:
        if any(v not in (None, "", "—") for v in values):
            fields.append((name, [v if v not in (None, "") else "—" for v in values]))

    add("Method", [r.method for r in runs])
    add("Folder", [str(r.path) for r in runs])
    add("Stages", [" → ".join(r.stage_names) if r.stage_names else "" for r in runs])
    add("Task", [f"{modality_name(r.data.get('source'))} → {modality_name(r.data.get('target'))}" for r in runs])
    iterations = []
    for r in runs:
        planned = _section(r.config, "train").get("iterations")
        done = max((row["iteration"] for row in r.log if math.isfinite(row.get("iteration", math.nan))), default=None)
        iterations.append(f"{int(done) if done is not None else '?'} of {planned if planned is not None else '?'}")
    add("Iterations (logged / planned)", iterations)
    add("Sampling", [_sampling(r.data) for r in runs])
    add("Learning rate", [f"{_section(r.config, 'train').get('lr', '—')} "
                          f"({_section(_section(r.config, 'train'), 'schedule').get('kind', 'constant')})"
                          if _section(r.config, "train") else "" for r in runs])
    add("EMA decay", [_section(_section(r.config, "train"), "ema").get("decay") for r in runs])
    add("Spacing (mm)", [_fmt_list(r.data["spacing"]) if r.data.get("spacing") else
                         ("cohort median" if r.config else "") for r in runs])
    add("Subjects train / val / test", [" / ".join(str(len(r.splits.get(k, []))) for k in ("train", "val", "test"))
                                        if r.splits else "" for r in runs])
    checkpoints = []
    for r in runs:
        ckpt = r.predictions.get("checkpoint")
        sha = str(r.predictions.get("checkpoint_sha256") or "")
        checkpoints.append(f"{Path(str(ckpt)).name}" + (f" (sha256 {sha[:12]}…)" if sha else "") if ckpt else "")
    add("Checkpoint used", checkpoints)
    add("Predicted with", [f"volsynth {r.predictions['volsynth_version']}" if r.predictions.get("volsynth_version")
                           else "" for r in runs])
    add("Inference overlap", [_section(r.config, "inference").get("overlap") for r in runs])
    add("Training wall time", [_fmt_seconds(r.wall_seconds) if r.wall_seconds is not None else "" for r in runs])
    add("Metric profile", [r.profile for r in runs])
    rows = [{"name": name, "cells": [str(v) for v in values], "links": None} for name, values in fields]
    rows.append({"name": "Files", "cells": None, "links": [
        [(label, href) for label, href in (("config.yaml", _link(r.path / "config.yaml", out)),
                                           ("metrics.csv", _link(r.path / "evaluation" / "metrics.csv", out)))
         if href] for r in runs]})
    return rows


def _header(runs: Sequence[RunData], command: str | None, notes: list[str]) -> dict[str, Any]:
    from volsynth import __version__

    with_data = [r for r in runs if r.data]
    tasks = sorted({(str(r.data.get("source")), str(r.data.get("target"))) for r in with_data})
    if len(tasks) > 1:
        notes.insert(0, "Runs differ in task (" + "; ".join(f"{s} → {t}" for s, t in tasks) + "): their scores "
                     "are not comparable.")
    manifests = sorted({str(r.data.get("manifest")) for r in with_data if r.data.get("manifest")})
    if len(manifests) > 1:
        notes.insert(0, f"Runs use different manifests ({', '.join(manifests)}).")
    first = with_data[0] if with_data else None
    splits = next((r.splits for r in runs if r.splits), {})
    counts = " / ".join(str(len(splits.get(k, []))) for k in ("train", "val", "test")) if splits else "—"
    spacing = first.data.get("spacing") if first else None
    profiles = sorted({r.profile for r in runs if r.profile})
    if len(profiles) > 1:
        notes.insert(0, f"Runs were evaluated with different metric profiles ({', '.join(profiles)}); their "
                        "columns are not comparable.")
    return {
        "task": (f"{modality_name(tasks[0][0])} → {modality_name(tasks[0][1])}" if tasks else "unknown task"),
        "manifest": ", ".join(manifests) or "—",
        "split_counts": counts,
        "spacing": f"{_fmt_list(spacing)} mm" if spacing else ("cohort median" if first else "—"),
        "date": _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z").strip(),
        "version": __version__,
        "command": command,
        "profiles": ", ".join(profiles) or "—",
    }


def _definitions(columns: Sequence[str], runs: Sequence[RunData]) -> list[tuple[str, str]]:
    profile = next((r.profile for r in runs if r.profile), None)
    heads = {c.split("_")[0] for c in columns}
    mae_unit = "HU" if profile == "synthrad2023" else "the normalised [0, 1] intensity scale"
    items = [
        ("ssim", "SSIM", "structural similarity (3D); unitless, 1 = identical."),
        ("psnr", "PSNR", "peak signal-to-noise ratio in dB (data range 1 on the [0, 1] scale; 4024 HU under the "
                         "synthrad2023 profile)."),
        ("nmse", "NMSE", "mean squared error divided by the variance of the target; unitless, 0 = identical."),
        ("mae", "MAE", f"mean absolute error on {mae_unit}."),
        ("lpips", "LPIPS", "learned perceptual distance (VGG-16 features over the slices of three views); "
                           "0 = identical."),
        ("dice", "Dice", "overlap 2|A∩B| / (|A| + |B|) of one segmenter's labels on the real and on the synthetic "
                         "volume, per tissue class (GM, WM, CSF)"
                         + ("; 'synthetic→real': a segmenter trained on synthetic images with real labels, scored "
                            "on real images." if "dice_s2r" in columns else ".")),
        ("vs", "VS", "volumetric similarity 1 − |Va − Vb| / (Va + Vb) of the same two segmentations (sizes only)."),
    ]
    out = [(name, text) for key, name, text in items if key in heads]
    if any(c.endswith("_mask") for c in columns):
        out.append(("(mask)", "the same metric inside the subject's mask instead of the whole volume."))
    out += [("Profile", d) for d in sorted({r.definitions for r in runs if r.definitions})]
    out += [("Scaling", d) for d in sorted({r.normalisation for r in runs if r.normalisation})]
    return out


def _render(context: Mapping[str, Any]) -> str:
    import jinja2

    source = resources.files("volsynth").joinpath("templates/report.html.j2").read_text(encoding="utf-8")
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True,
                             lstrip_blocks=True, keep_trailing_newline=True)
    return env.from_string(source).render(**context)


def build_report(runs: Sequence[str | os.PathLike[str]], out_dir: str | os.PathLike[str], *,
                 subjects_to_show: int = 3, title: str = "volsynth comparison", command: str | None = None) -> Path:
    """Write the comparison report of ``runs`` into ``out_dir``; returns the path of ``index.html``.

    Args:
        runs: run folders (``volsynth train --out RUN``, then ``volsynth predict``/``evaluate``/``downstream``).
        out_dir: output folder (created); ``index.html``, ``comparison.{csv,md}`` and PNGs are written there only.
        subjects_to_show: test subjects in tri-planar figures (the first ones by name predicted by every run).
        title: page title.
        command: the command line that made the report, shown in the header when given.

    Raises:
        ValueError: no runs given. RunNotFoundError: a run folder does not exist. OutputError: ``out_dir`` is one
        of the run folders. Missing parts *inside* a run only produce notes.
    """
    if not runs:
        raise ValueError("build_report needs at least one run folder")
    out = Path(out_dir)
    data = [load_run(r) for r in runs]
    if any(out.resolve() == r.path.resolve() for r in data):
        raise OutputError(f"{out}: the report folder must not be a run folder")
    out.mkdir(parents=True, exist_ok=True)
    assign_labels(data)
    notes: list[str] = []
    header = _header(data, command, notes)
    profile = next((r.profile for r in data if r.profile), None)

    ceiling: Mapping[str, Stat] = next((r.ceiling for r in data if r.ceiling), {})
    if len({tuple(sorted((k, round(s.mean, 9)) for k, s in r.ceiling.items())) for r in data if r.ceiling}) > 1:
        notes.append("The runs' phantom ceilings differ (different test subjects?); the first run's is shown.")
    upper = next((u for r in data if r.protocol1
                  and (u := stat_from((r.protocol1.get("upper_bound") or {}).get("dice"))) is not None), None)
    whole, masked = tables.quality_columns(data)
    reference = (tables.CEILING_LABEL, "ceiling", ceiling) if ceiling else None
    quality = tables.build_table("quality", data, whole, profile=profile, tally=True, reference=reference)
    quality_mask = tables.build_table("quality-mask", data, masked, profile=profile, reference=reference)
    down_columns, left_out = tables.downstream_columns(data)
    downstream = tables.build_table("downstream", data, down_columns, profile=profile,
                                    reference=(tables.UPPER_LABEL, "upper", {"dice_s2r": upper}) if upper else None)
    if left_out:
        downstream.notes.append(f"{left_out} more class columns are in each run's downstream CSV.")
    distance = tables.distance_rows(data)
    columns = quality.columns + quality_mask.columns + downstream.columns
    per_subject = tables.per_subject_rows(data, columns, {**quality.decimals, **quality_mask.decimals,
                                                          **downstream.decimals})

    colours = figures.run_colours(data)
    charts: dict[str, list[dict[str, str]]] = {"quality": [], "downstream": [], "time": [], "training": []}

    def chart(group: str, name: str, caption: str, draw: Any, *args: Any, **kwargs: Any) -> None:
        try:
            if draw(*args, inside(out / name, out), **kwargs) is not None:
                charts[group].append({"src": name, "alt": caption, "caption": caption})
        except Exception as err:  # a plot failure costs one figure, not the report
            notes.append(f"Figure {name} failed: {err}")

    paired = "one point per subject, a grey line joins each subject across methods"
    chart("quality", "quality_per_subject.png", f"Image quality per test subject ({paired}).",
          figures.paired_dots, data, quality.columns + quality_mask.columns, profile=profile, colours=colours)
    chart("downstream", "downstream_per_subject.png", f"Downstream scores per test subject ({paired}).",
          figures.paired_dots, data, downstream.columns, profile=profile, colours=colours)
    chart("time", "time_to_quality.png", "Time to quality: validation PSNR against wall-clock training time"
          + (" (dashed: the phantom ceiling's test-set PSNR)." if "psnr" in ceiling else "."),
          figures.time_to_quality, data, ceiling_psnr=ceiling["psnr"].mean if "psnr" in ceiling else None,
          colours=colours)
    chart("time", "validation_curves.png", "Validation scores against the iteration.", figures.validation_curves,
          data, colours=colours)
    if any(row.get("seconds_interpolated") for r in data for row in r.validation):
        notes.append("validation.csv has no seconds column for some runs: their validation times are interpolated "
                     "from log.csv.")
    for index, run in enumerate(data):
        name = f"curves_{index:02d}_{figures.slug(run.label)}.png"
        try:
            written, dropped = figures.training_curves(run, inside(out / name, out), colours[run.label])
        except Exception as err:
            notes.append(f"Training curves of {run.label} failed: {err}")
            continue
        if written is not None:
            caption = f"{run.label}: training losses (raw and smoothed) and validation scores."
            if dropped:
                caption += " Not shown: " + ", ".join(dropped) + "."
            charts["training"].append({"src": name, "alt": f"training curves of {run.label}", "caption": caption})

    task_names = (modality_name(data[0].data.get("source") or "source"),
                  modality_name(data[0].data.get("target") or "target"))
    triplanar = collect_triplanar(data, out, subjects_to_show, notes, task_names)
    for run in data:
        notes += [f"{run.label}: {n}" for n in run.notes]
    demo = next((r for r in data if r.demo is not None), None)

    all_tables = [t for t in (quality, quality_mask, downstream) if t.columns]
    atomic_write_text(inside(out / "comparison.csv", out), tables.tables_csv(all_tables, data))
    atomic_write_text(inside(out / "comparison.md", out), "\n".join(tables.table_markdown(t) for t in all_tables))
    context = {
        "title": title, "header": header, "notes": notes, "runs": data,
        "demo": _demo_context(demo),
        "quality": quality, "quality_mask": quality_mask, "downstream": downstream,
        "has_downstream": bool(down_columns),
        "distance": {"headers": distance[0], "rows": distance[1], "computed": distance[2],
                     "definitions": list(dict.fromkeys(
                         [f"Ceiling: {r.ceiling_definition}" for r in data if r.ceiling_definition]
                         + [f"Distances: {r.distance_definition}" for r in data if r.distance_definition]))},
        "per_subject": {"columns": [tables.metric_header(c, profile) for c in columns], "rows": per_subject,
                        "open": sum(len(rows) for _, rows in per_subject) <= PER_SUBJECT_OPEN_ROWS},
        "charts": charts, "triplanar": triplanar, "run_summary": _run_summary(data, out),
        "definitions": _definitions(columns, data), "min_ranked": tables.MIN_RANKED,
    }
    return atomic_write_text(inside(out / "index.html", out), _render(context))


def _flatten(settings: Mapping[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    """``demo.json`` as ``(dotted key, text)`` pairs: number lists as sizes (16×16×16), other lists comma-joined."""
    out: list[tuple[str, str]] = []
    for key, value in settings.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out += _flatten(value, f"{name}.")
        elif isinstance(value, list | tuple):
            numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
            out.append((name, _fmt_list(value) if numeric else ", ".join(str(v) for v in value)))
        else:
            out.append((name, str(value)))
    return out


def _demo_context(run: RunData | None) -> dict[str, Any] | None:
    if run is None:
        return None
    settings = {k: v for k, v in (run.demo or {}).items() if k not in ("demo", "note")}
    note = (run.demo or {}).get("note")
    return {"file": str(run.demo_file), "note": str(note) if note else None, "settings": _flatten(settings)}
