"""Tri-planar PNG montage of a phantom subject: every contrast, the tissue labels and the lesion labels."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from scipy import ndimage as ndi

from volsynth.data.phantom.subject import PhantomSubject

_TISSUE_COLOURS = np.array([
    [0, 0, 0],  # background
    [70, 130, 230],  # CSF
    [150, 150, 150],  # GM
    [235, 235, 235],  # WM
    [200, 40, 40],  # necrosis
    [60, 200, 60],  # oedema
    [250, 220, 40],  # enhancing
], dtype=np.float32) / 255.0
_SEG_COLOURS = {1: _TISSUE_COLOURS[4], 2: _TISSUE_COLOURS[5], 4: _TISSUE_COLOURS[6]}


def _tri_planar(volume: np.ndarray, point: Sequence[int]) -> list[np.ndarray]:
    """Axial, coronal, sagittal slices through ``point``, oriented for display (anterior/superior up)."""
    i, j, k = point
    return [np.flipud(volume[:, :, k].swapaxes(0, 1)),  # axial: x right, y up
            np.flipud(volume[:, j, :].swapaxes(0, 1)),  # coronal: x right, z up
            np.flipud(volume[i, :, :].swapaxes(0, 1))]  # sagittal: y right, z up


def _montage_point(subject: PhantomSubject) -> list[int]:
    """Voxel the montage slices pass through: inside the largest lesion near its centroid, else brain centre."""
    if subject.seg.any():
        box = ndi.find_objects((subject.seg > 0).astype(np.uint8))[0]  # label only the lesions' bounding box
        labels, _ = ndi.label(subject.seg[box] > 0)
        largest = int(np.argmax(np.bincount(labels.ravel())[1:])) + 1
        voxels = np.argwhere(labels == largest) + np.array([sl.start for sl in box])
        centroid = voxels.mean(axis=0)
        # A crescent-shaped lesion's centroid may lie outside it: take the lesion voxel closest to it.
        return [int(v) for v in voxels[np.argmin(((voxels - centroid) ** 2).sum(axis=1))]]
    if subject.mask.any():
        return [round(v) for v in ndi.center_of_mass(subject.mask)]
    return [n // 2 for n in subject.mask.shape]


def montage_png(subject: PhantomSubject) -> bytes:
    """Tri-planar PNG: one row per contrast, then tissue labels, then the BraTS labels over the last contrast.

    Slices pass through the lesion centroid when there is one, else through the brain's centre of mass.
    Rows are windowed from 0 to the 99.5th percentile of the brain pixels shown.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    point = _montage_point(subject)
    rows: list[tuple[str, list[np.ndarray]]] = []
    brain = np.concatenate([s.ravel() for s in _tri_planar(subject.mask > 0, point)])
    for name, img in subject.images.items():
        slices = _tri_planar(img, point)
        shown = np.concatenate([s.ravel() for s in slices])
        top = float(np.percentile(shown[brain], 99.5)) if brain.any() else float(shown.max())
        rows.append((name, [np.repeat(np.clip(s / max(top, 1e-6), 0.0, 1.0)[..., None], 3, axis=2)
                            for s in slices]))
    rows.append(("tissue", [_TISSUE_COLOURS[s] for s in _tri_planar(subject.tissue, point)]))
    base = rows[len(subject.images) - 1][1]
    overlay = []
    for rgb, seg in zip(base, _tri_planar(subject.seg, point), strict=True):
        out = rgb.copy()
        for value, colour in _SEG_COLOURS.items():
            sel = seg == value
            out[sel] = 0.45 * out[sel] + 0.55 * colour
        overlay.append(out)
    rows.append(("seg", overlay))

    heights = max(t.shape[0] for _, tiles in rows for t in tiles)
    widths = [max(tiles[col].shape[1] for _, tiles in rows) for col in range(3)]
    gap = 2
    canvas = np.zeros((len(rows) * (heights + gap), sum(widths) + 2 * gap, 3), np.float32)
    for r, (_, tiles) in enumerate(rows):
        x0 = 0
        for col, tile in enumerate(tiles):
            y = r * (heights + gap) + (heights - tile.shape[0]) // 2
            x = x0 + (widths[col] - tile.shape[1]) // 2
            canvas[y:y + tile.shape[0], x:x + tile.shape[1]] = tile
            x0 += widths[col] + gap

    mag = max(1, round(200 / heights))  # readable rows whatever the spacing, nearest-neighbour enlargement
    margin_left, margin_top, dpi = 70, 24, 100
    big = np.repeat(np.repeat(canvas, mag, axis=0), mag, axis=1)
    w_px, h_px = big.shape[1] + margin_left, big.shape[0] + margin_top
    # matplotlib draws only the captions; the slices are pasted into its pixel buffer unchanged, which avoids
    # matplotlib's image resampling (most of the time of an imshow-based montage).
    fig = Figure(figsize=(w_px / dpi, h_px / dpi), dpi=dpi, facecolor="black")
    canvas_agg = FigureCanvasAgg(fig)
    for r, (label, _) in enumerate(rows):
        y_px = (r * (heights + gap) + heights / 2) * mag + margin_top  # from the top
        fig.text(margin_left / 2 / w_px, 1.0 - y_px / h_px, label, color="white", ha="center", va="center",
                 fontsize=10)
    x0 = 0
    for col, title in enumerate(("axial", "coronal", "sagittal")):
        x_px = margin_left + (x0 + widths[col] / 2) * mag
        fig.text(x_px / w_px, 1.0 - margin_top / 2 / h_px, title, color="white", ha="center", va="center",
                 fontsize=10)
        x0 += widths[col] + gap
    fig.text(0.01, 1.0 - margin_top / 2 / h_px, subject.subject, color="0.7", ha="left", va="center", fontsize=7)
    canvas_agg.draw()
    text = np.asarray(canvas_agg.buffer_rgba())[..., :3]
    pixels = np.zeros((h_px, w_px, 3), np.uint8)
    th, tw = min(h_px, text.shape[0]), min(w_px, text.shape[1])
    pixels[:th, :tw] = text[:th, :tw]
    pixels[margin_top:, margin_left:] = np.round(big * 255.0).astype(np.uint8)

    from PIL import Image  # matplotlib's own PNG writer

    buf = io.BytesIO()
    # No metadata (so the bytes are reproducible); compress_level 1 encodes 4× faster than the default 6.
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()
