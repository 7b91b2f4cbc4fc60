"""Tri-planar views: source, target, every method's synthetic volume and its absolute error, on one aligned grid.

Every volume is turned to RAS for display (an exact axis permutation and flip, no interpolation), so each panel
has the same anatomical orientation whatever the file stored, and orientation letters can be printed on it:
axial and coronal panels have the patient's left on the left (neurological convention), sagittal panels have
posterior on the left. Every panel shows the same square field of view in millimetres (the largest extent of the
volume), so the three columns line up and share one scale. Target and synthetic volumes share one display scale
(MR: min-max of each volume; CT/CBCT: the [-1024, 3000] HU window), and all error panels of a subject one colour
range, each with its own colour-bar column.

The slices go through the largest lesion cross-section when the manifest has a label map with a lesion, else
through the centre of the target's foreground.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from volsynth.data.orientation import Reorientation
from volsynth.data.volume import Volume
from volsynth.evaluation.report.figures import new_figure, save

PLANES = ("axial", "coronal", "sagittal")
# (left, right, bottom, top) letters of each plane after RAS reorientation, drawn with origin="lower".
ORIENTATION_LETTERS: dict[str, tuple[str, str, str, str]] = {
    "axial": ("L", "R", "P", "A"),
    "coronal": ("L", "R", "I", "S"),
    "sagittal": ("P", "A", "I", "S"),
}


@dataclass
class Displayed:
    """A volume in RAS array order with its voxel size, ready for slicing."""

    array: np.ndarray
    spacing: tuple[float, float, float]


def to_ras(volume: Volume, array: np.ndarray | None = None) -> Displayed:
    """``array`` (default the volume's own) on ``volume``'s grid, turned to RAS axis order."""
    turn = Reorientation.plan(volume.direction, "RAS")
    spacing = np.asarray(volume.spacing)[list(turn.permutation)]
    data = volume.array if array is None else array
    return Displayed(np.ascontiguousarray(turn.apply_array(np.asarray(data))),
                     (float(spacing[0]), float(spacing[1]), float(spacing[2])))


def planes(volume: Displayed, centre: Sequence[int]) -> list[tuple[np.ndarray, tuple[float, float, float, float]]]:
    """Axial, coronal, sagittal slices of a RAS volume as ``(image for imshow(origin="lower"), extent in mm)``."""
    i, j, k = centre
    nx, ny, nz = volume.array.shape
    sx, sy, sz = volume.spacing
    return [(volume.array[:, :, k].T, (0.0, nx * sx, 0.0, ny * sy)),
            (volume.array[:, j, :].T, (0.0, nx * sx, 0.0, nz * sz)),
            (volume.array[i, :, :].T, (0.0, ny * sy, 0.0, nz * sz))]


def display_scale(array: np.ndarray, kind: str, *, already_unit: bool = False) -> np.ndarray:
    """Map a volume to [0, 1] for display: as is when ``already_unit``; CT/CBCT by the HU window; MR min-max."""
    from volsynth.metrics import CT_WINDOW_HU

    array = np.asarray(array, dtype=np.float32)
    if already_unit:
        return np.clip(array, 0.0, 1.0)
    if kind in ("ct", "cbct"):
        lo, hi = CT_WINDOW_HU
        return np.clip((array - lo) / (hi - lo), 0.0, 1.0)
    lo, hi = float(array.min()), float(array.max())
    return np.zeros_like(array) if hi <= lo else (array - lo) / (hi - lo)


def looks_unit(array: np.ndarray) -> bool:
    return float(np.min(array)) >= -0.05 and float(np.max(array)) <= 1.05


def slice_centre(target: np.ndarray, labels: np.ndarray | None) -> tuple[list[int], bool]:
    """Slice indices (RAS): through the most lesion voxels per axis when ``labels`` has any, else the centre of
    the target's foreground bounding box; and whether the lesion was used."""
    if labels is not None and labels.shape == target.shape and np.any(labels > 0):
        lesion = labels > 0
        counts = [lesion.sum(axis=tuple(a for a in range(3) if a != axis)) for axis in range(3)]
        return [int(np.argmax(c)) for c in counts], True
    foreground = np.argwhere(target > 0.05)
    if foreground.size:
        return ((foreground.min(0) + foreground.max(0)) // 2).tolist(), False
    return [s // 2 for s in target.shape], False


def triplanar_figure(subject: str, source: Volume | None, target: Volume,
                     predictions: Sequence[tuple[str, np.ndarray]], path: Path, *,
                     source_name: str = "source", target_name: str = "target", source_kind: str = "mr",
                     target_kind: str = "mr", labels: np.ndarray | None = None,
                     ideal: np.ndarray | None = None) -> tuple[Path, str]:
    """Write the figure of one subject; returns the path and a one-line caption (how the slices were chosen).

    Args:
        subject: shown as the figure title.
        source, target: the real volumes (``source`` may be None or on another grid: then its row is left out).
        predictions: ``(method label, array on the target's grid)``; MR predictions on [0, 1], CT in HU (a CT
            prediction on [0, 1] next to a HU target is taken as already window-scaled).
        source_name, target_name: display names of the modalities, e.g. ``T1w``, ``T2w``.
        labels: a lesion label map on the target's grid, or None.
        ideal: the phantom's ideal (noise-free) target in the target's units, or None; shown on the target's
            display scale with its own error row (the error no method can remove).
    """
    tgt = to_ras(target, display_scale(target.array, target_kind))
    unit_target = looks_unit(target.array)
    preds = [(label, to_ras(target, display_scale(p, target_kind, already_unit=looks_unit(p) and (
        target_kind == "mr" or not unit_target)))) for label, p in predictions]
    if ideal is not None and ideal.shape == target.array.shape:
        # the target's own scale (not the ideal's min-max), so the two images compare pixel for pixel
        lo, span = float(target.array.min()), max(float(np.ptp(target.array)), 1e-12)
        scaled = display_scale(ideal, target_kind) if target_kind in ("ct", "cbct") else \
            np.clip((np.asarray(ideal, np.float32) - lo) / span, 0.0, 1.0)
        preds.insert(0, (f"{target_name} ideal (ceiling)", to_ras(target, scaled)))
    rows: list[tuple[str, Displayed, str]] = []
    caption = []
    if source is not None:
        src = to_ras(source, display_scale(source.array, source_kind))
        if src.array.shape == tgt.array.shape:
            rows.append((f"{source_name} (source)", src, "image"))
        else:
            caption.append(f"{source_name} is on another grid {src.array.shape}: not shown")
    rows.append((f"{target_name} (target)", tgt, "image"))
    rows += [(label, p, "image") for label, p in preds]
    errors = [(f"|{label} − {target_name}|", Displayed(np.abs(p.array - tgt.array), tgt.spacing), "error")
              for label, p in preds]
    rows += errors
    vmax = max([float(np.percentile(e.array, 99.5)) for _, e, _ in errors] + [1e-3])
    ras_labels = to_ras(target, labels).array if labels is not None and labels.shape == target.shape else None
    centre, lesion = slice_centre(tgt.array, ras_labels)
    caption.insert(0, "Slices through the largest lesion cross-section." if lesion
                   else "Slices through the centre of the target's foreground.")
    if preds and preds[0][0].endswith("ideal (ceiling)"):
        caption.append(f"“{target_name} ideal”: the phantom's noise-free target, the best any method can do.")
    _draw(subject, rows, centre, vmax, path, target_kind)
    return path, " ".join(caption)


def resample_panel(image: np.ndarray, extent: Sequence[float], fov: float, pixels: int) -> np.ndarray:
    """A plane (``image[vertical, horizontal]``, row 0 at the bottom) on a ``pixels``² canvas that covers ``fov``
    mm around the plane's centre, nearest neighbour, top row first; NaN outside the volume."""
    height, width = image.shape
    step = fov / pixels
    centres = (np.arange(pixels) + 0.5) * step - fov / 2
    cols = np.floor((centres + extent[1] / 2) / (extent[1] / width)).astype(int)
    rows = np.floor((centres + extent[3] / 2) / (extent[3] / height)).astype(int)
    ok_c, ok_r = (cols >= 0) & (cols < width), (rows >= 0) & (rows < height)
    out = np.full((pixels, pixels), np.nan, dtype=np.float32)
    out[np.ix_(ok_r, ok_c)] = image[np.ix_(rows[ok_r], cols[ok_c])]
    return out[::-1]


def _draw(subject: str, rows: Sequence[tuple[str, Displayed, str]], centre: Sequence[int], vmax: float,
          path: Path, kind: str) -> None:
    """One mosaic image (every panel resampled to the same square canvas) in one axes, one output pixel per
    canvas pixel: aligned by construction, and a fraction of the time of one matplotlib axes per panel."""
    import textwrap

    from matplotlib import colormaps, patheffects
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    first = rows[0][1]
    fov = max(n * sp for n, sp in zip(first.array.shape, first.spacing, strict=True))
    pixels = int(np.clip(round(fov / min(first.spacing)), 150, 240))
    gap, left, top, bottom, right = 4, 150, 48, 8, 110
    n = len(rows)
    mosaic_w, mosaic_h = 3 * pixels + 2 * gap, n * pixels + (n - 1) * gap
    mosaic = np.ones((mosaic_h, mosaic_w, 3), dtype=np.float32)  # white gaps
    maps = {"image": (colormaps["gray"], Normalize(0.0, 1.0)), "error": (colormaps["inferno"], Normalize(0.0, vmax))}
    for r, (_, volume, style) in enumerate(rows):
        cmap, norm = maps[style]
        for c, (image, extent) in enumerate(planes(volume, centre)):
            canvas = resample_panel(image, extent, fov, pixels)
            rgb = cmap(norm(np.nan_to_num(canvas, nan=0.0)))[..., :3]
            rgb[np.isnan(canvas)] = 0.0  # outside the volume: black
            y0, x0 = r * (pixels + gap), c * (pixels + gap)
            mosaic[y0:y0 + pixels, x0:x0 + pixels] = rgb
    width_px, height_px = left + mosaic_w + right, top + mosaic_h + bottom
    fig = new_figure(width_px / 100, height_px / 100)
    ax = fig.add_axes((left / width_px, bottom / height_px, mosaic_w / width_px, mosaic_h / height_px))
    ax.imshow(mosaic, interpolation="nearest", aspect="auto", extent=(0, mosaic_w, mosaic_h, 0))
    ax.set_axis_off()
    outline = [patheffects.withStroke(linewidth=1.6, foreground="black")]  # letters stay legible on bright tissue
    for c, plane in enumerate(PLANES):
        x0 = c * (pixels + gap)
        fig.text((left + x0 + pixels / 2) / width_px, 1 - (top - 6) / height_px, plane, ha="center", va="bottom",
                 fontsize=9)
        letters = ORIENTATION_LETTERS[plane]
        for r in range(n):
            y0 = r * (pixels + gap)
            for text, x, y, ha, va in ((letters[0], x0 + 3, y0 + pixels / 2, "left", "center"),
                                       (letters[1], x0 + pixels - 3, y0 + pixels / 2, "right", "center"),
                                       (letters[2], x0 + pixels / 2, y0 + pixels - 2, "center", "bottom"),
                                       (letters[3], x0 + pixels / 2, y0 + 2, "center", "top")):
                ax.text(x, y, text, ha=ha, va=va, fontsize=7, color="#ffd54f", fontweight="bold",
                        path_effects=outline)
    for r, (name, _, _) in enumerate(rows):
        y = 1 - (top + r * (pixels + gap) + pixels / 2) / height_px
        fig.text((left - 8) / width_px, y, textwrap.fill(name, 22), ha="right", va="center", fontsize=8)
    for style, label in (("image", "HU window [−1024, 3000] → [0, 1]" if kind in ("ct", "cbct")
                          else "intensity (min-max → [0, 1])"),
                         ("error", "|synthetic − target| (same scale)")):
        members = [r for r, row in enumerate(rows) if row[2] == style]
        if not members:
            continue
        y_top = top + members[0] * (pixels + gap)
        y_bottom = top + members[-1] * (pixels + gap) + pixels
        cax = fig.add_axes(((left + mosaic_w + 12) / width_px, 1 - y_bottom / height_px, 12 / width_px,
                            (y_bottom - y_top) / height_px))
        cmap, norm = maps[style]
        colourbar = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), cax=cax)
        colourbar.set_label(label, fontsize=7)
        colourbar.ax.tick_params(labelsize=7)
    fig.text((left + mosaic_w / 2) / width_px, 1 - 4 / height_px, subject, ha="center", va="top", fontsize=10,
             fontweight="bold")
    save(fig, path)


def collect_triplanar(runs: Sequence[Any], out_dir: Path, subjects_to_show: int, notes: list[str],
                      names: tuple[str, str]) -> list[dict[str, str]]:
    """Figures for the first ``subjects_to_show`` test subjects (by name) predicted by every run that has
    predictions; returns ``[{"src", "alt", "caption"}]`` and appends to ``notes`` what was left out and why."""
    from volsynth.data.io import read_volume
    from volsynth.data.manifest import load_manifest
    from volsynth.evaluation.report.figures import slug
    from volsynth.run import resolve_manifest
    from volsynth.utils import inside

    if subjects_to_show <= 0:
        return []
    base = next((r for r in runs if r.config), None)
    manifest_file = resolve_manifest(base.path, base.data.get("manifest")) if base is not None else None
    if base is None or manifest_file is None:
        notes.append("Tri-planar figures left out: no run names a readable manifest (config.yaml data.manifest).")
        return []
    data = base.data
    source_key, target_key = str(data.get("source") or "source"), str(data.get("target") or "target")
    try:
        manifest = load_manifest(manifest_file).by_name()
    except Exception as err:  # a report is still useful without the pictures
        notes.append(f"Tri-planar figures left out: manifest {manifest_file} unreadable ({err}).")
        return []
    shown = [r for r in runs if r.prediction_files]
    if not shown:
        notes.append("Tri-planar figures left out: no run has predictions.")
        return []
    common = sorted(s for s in manifest if all(s in r.prediction_files for r in shown))
    if not common:
        notes.append("Tri-planar figures left out: no subject is predicted by every run with predictions.")
        return []
    figures = []
    for index, subject in enumerate(common[:subjects_to_show]):
        entry = manifest[subject]
        try:
            target_path = entry.image(target_key)
            if target_path is None:
                raise FileNotFoundError(f"no '{target_key}' image in the manifest")
            target = read_volume(target_path)
            source_path = entry.image(source_key)
            source = read_volume(source_path) if source_path is not None else None
            labels = read_volume(entry.label).array if entry.label is not None and Path(entry.label).is_file() \
                else None
            ideal_entry = entry.extra.get("ideal")
            ideal_name = ideal_entry.get(target_key) if isinstance(ideal_entry, dict) else None
            ideal_path = manifest_file.parent / str(ideal_name) if ideal_name else None
            ideal = read_volume(ideal_path).array if ideal_path is not None and ideal_path.is_file() else None
            predictions = []
            for r in shown:
                array = read_volume(r.prediction_files[subject]).array
                if array.shape != target.shape:
                    notes.append(f"{subject}: {r.label}'s prediction {array.shape} is not on the target grid "
                                 f"{target.shape}; left out of its figure.")
                    continue
                predictions.append((r.label, array))
            name = f"triplanar_{index:02d}_{slug(subject)}.png"
            _, caption = triplanar_figure(
                subject, source, target, predictions, inside(out_dir / name, out_dir), source_name=names[0],
                target_name=names[1], source_kind=str(data.get("source_kind", "mr")),
                target_kind=str(data.get("target_kind", "mr")), labels=labels, ideal=ideal)
            figures.append({"src": name, "alt": f"tri-planar views of {subject}", "caption": f"{subject}: {caption}"})
        except Exception as err:  # one unreadable subject must not cost the whole report
            notes.append(f"Tri-planar figure for {subject} failed: {err}")
    return figures
