"""The HTML comparison report on two (or three) fake, tiny run folders."""

from __future__ import annotations

import csv
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from volsynth.evaluation.downstream import PROTOCOL1_CSV, PROTOCOL1_SUMMARY, PROTOCOL2_CSV, PROTOCOL2_SUMMARY
from volsynth.evaluation.report import build_report, metric_direction, rank_places

SUBJECTS = ["S0", "S1", "S2"]


def write_nifti(path: Path, array: np.ndarray) -> Path:
    img = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(array).transpose(2, 1, 0)))
    img.SetSpacing((1.0, 1.0, 2.0))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path))
    return path


def write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def make_cohort(root: Path) -> Path:
    rng = np.random.default_rng(0)
    entries = []
    for s in SUBJECTS:
        source = rng.random((12, 10, 8)).astype(np.float32) * 800
        target = rng.random((12, 10, 8)).astype(np.float32) * 1200
        write_nifti(root / s / "t1.nii.gz", source)
        write_nifti(root / s / "t2.nii.gz", target)
        entries.append({"subject": s, "images": {"t1": f"{s}/t1.nii.gz", "t2": f"{s}/t2.nii.gz"}})
    manifest = root / "manifest.json"
    manifest.write_text(json.dumps({"format": "volsynth-manifest", "version": 1, "subjects": entries}))
    return manifest


def make_run(root: Path, name: str, method: str, manifest: Path, metrics: dict[str, list[float]], *,
             validation: bool = True, lpips: bool = True, downstream: float | None = None) -> Path:
    """A run folder as `volsynth train/predict/evaluate/downstream` leave it (values given per metric)."""
    run = root / name
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(f"method:\n  name: {method}\ndata:\n  manifest: {manifest}\n  source: t1\n"
                                     f"  target: t2\n  source_kind: mr\n  target_kind: mr\n")
    (run / "splits.json").write_text(json.dumps({"train": [], "val": [], "test": SUBJECTS}))
    write_csv(run / "log.csv", [{"iteration": i, "seconds": i * 0.1, "lr": 1e-4, "l1": 1 / (i + 1),
                                 "adv": 0.5 + 0.01 * i} for i in range(1, 6)])
    if validation:
        write_csv(run / "validation.csv", [{"iteration": i, "ssim": 0.5 + i / 10, "psnr": 20 + i} for i in (2, 4)])
    rng = np.random.default_rng(sum(map(ord, name)))
    for s in SUBJECTS:
        write_nifti(run / "predictions" / f"{s}.nii.gz", rng.random((12, 10, 8)).astype(np.float32))
    columns = ["ssim", "psnr", "nmse", "mae"] + (["lpips"] if lpips else [])
    rows = [{"subject": s, **{c: metrics[c][i] for c in columns}} for i, s in enumerate(SUBJECTS)]
    write_csv(run / "evaluation" / "metrics.csv", rows)
    summary: dict = {c: {"mean": float(np.mean(metrics[c])), "std": float(np.std(metrics[c], ddof=1)), "n": 3}
                     for c in columns}
    summary["profile"] = "paper"
    if not lpips:
        summary["lpips"] = {"available": False, "reason": "VGG weights not found"}
    (run / "evaluation" / "summary.json").write_text(json.dumps(summary))
    if downstream is not None:
        d = run / "downstream"
        write_csv(d / PROTOCOL2_CSV, [{"subject": s, "dice_gm": downstream, "vs_gm": 0.9, "dice": downstream,
                                       "vs": 0.9} for s in SUBJECTS])
        (d / PROTOCOL2_SUMMARY).write_text(json.dumps({
            "protocol": 2, "segmenter": "gmm_tissue", "dice": {"mean": downstream, "std": 0.0, "n": 3},
            "vs": {"mean": 0.9, "std": 0.0, "n": 3},
            "per_class": {"dice_gm": {"mean": downstream, "std": 0.0, "n": 3}}}))
        write_csv(d / PROTOCOL1_CSV, [{"model": m, "subject": s, "dice": downstream}
                                      for m in ("synthetic", "real") for s in SUBJECTS])
        (d / PROTOCOL1_SUMMARY).write_text(json.dumps({
            "protocol": 1, "synthetic": {"dice": {"mean": downstream, "std": 0.01, "n": 3}},
            "upper_bound": {"dice": {"mean": 0.97, "std": 0.01, "n": 3}}}))
    return run


class TableParser(HTMLParser):
    """Collects, per row of the comparison table: method label → {metric: (text, bold, underlined)}."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[str, dict[str, tuple[str, bool, bool]]] = {}
        self.images: list[str] = []
        self.links: list[str] = []
        self._in_table = False
        self._label: str | None = None
        self._cell: str | None = None
        self._text = ""
        self._bold = self._under = False
        self._in_row_header = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "img":
            self.images.append(a["src"] or "")
        if tag == "a":
            self.links.append(a.get("href") or "")
        if tag == "table" and "comparison" in (a.get("class") or ""):
            self._in_table = True
        if not self._in_table:
            return
        if tag == "th" and a.get("class") == "method":
            self._in_row_header, self._text = True, ""
        if tag == "td" and a.get("data-metric"):
            self._cell, self._text, self._bold, self._under = a["data-metric"], "", False, False
        if tag == "b" and self._cell:
            self._bold = True
        if tag == "u" and self._cell:
            self._under = True

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self._in_table = False
        if tag == "th" and self._in_row_header:
            self._label, self._in_row_header = self._text, False
            self.rows[self._label] = {}
        if tag == "td" and self._cell and self._label is not None:
            self.rows[self._label][self._cell] = (self._text, self._bold, self._under)
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._in_row_header or self._cell:
            self._text += data


def parse(index: Path) -> TableParser:
    parser = TableParser()
    parser.feed(index.read_text(encoding="utf-8"))
    return parser


# --------------------------------------------------------------------------------------------------------------


def test_rank_places_direction_and_ties() -> None:
    assert metric_direction("ssim") == 1 and metric_direction("nmse_mask") == -1 and metric_direction("lpips") == -1
    assert rank_places({"a": 0.9, "b": 0.8, "c": 0.7}, 1) == {"a": 1, "b": 2}
    assert rank_places({"a": 0.9, "b": 0.8, "c": 0.7}, -1) == {"c": 1, "b": 2}
    # equal as displayed (3 decimals) → shared first; the next distinct value is second
    assert rank_places({"a": 0.8721, "b": 0.8719, "c": 0.85}, 1) == {"a": 1, "b": 1, "c": 2}
    assert rank_places({"a": 0.9}, 1) == {}  # a single method is not ranked
    assert rank_places({"a": 0.9, "b": float("nan")}, 1) == {}


def test_report_two_runs(tmp_path: Path) -> None:
    manifest = make_cohort(tmp_path / "data")
    # A: better SSIM and PSNR and LPIPS; B: better NMSE and MAE (lower), no validation.csv, no LPIPS.
    run_a = make_run(tmp_path / "runs", "run_a", "mdagan", manifest,
                     {"ssim": [0.90, 0.88, 0.92], "psnr": [30.0, 29.0, 31.0], "nmse": [0.12, 0.10, 0.11],
                      "mae": [0.05, 0.06, 0.04], "lpips": [0.10, 0.12, 0.11]}, downstream=0.91)
    run_b = make_run(tmp_path / "runs", "run_b", "regression_unet", manifest,
                     {"ssim": [0.80, 0.82, 0.81], "psnr": [28.0, 27.5, 28.5], "nmse": [0.08, 0.09, 0.07],
                      "mae": [0.03, 0.02, 0.04]}, validation=False, lpips=False, downstream=0.85)
    index = build_report([run_a, run_b], tmp_path / "report", subjects_to_show=2)
    assert index == tmp_path / "report" / "index.html" and index.is_file()
    text = index.read_text(encoding="utf-8")
    assert "mdagan" in text and "regression_unet" in text
    assert "<script" not in text and "http://" not in text and "https://" not in text  # offline, static

    table = parse(index).rows
    assert set(table) == {"mdagan", "regression_unet"}
    a, b = table["mdagan"], table["regression_unet"]
    # bold = best in the metric's direction; underline = second
    assert a["ssim"][1] and not b["ssim"][1] and b["ssim"][2]
    assert a["psnr"][1] and not b["psnr"][1]
    assert b["nmse"][1] and not a["nmse"][1] and a["nmse"][2]
    assert b["mae"][1] and not a["mae"][1]
    assert a["ssim"][0] == "0.900 ± 0.02"  # paper formatting: mean 3 decimals, sample std 2 decimals
    assert a["lpips"][0] == "0.110 ± 0.01" and b["lpips"][0] == "—"
    assert not a["lpips"][1]  # a column with one value is not ranked
    assert a["dice_agree"][1] and b["dice_agree"][2]  # Protocol 2 Dice column, higher is better
    assert "dice_s2r" in a and "Upper bound" in text and "0.970 ± 0.01" in text
    # 1st / 2nd tally over the image-quality columns only (Dice is shown, not counted, as in the paper)
    assert re.search(r"mdagan</th>.*?<td>2 / 2</td>", text, re.S)
    assert re.search(r"regression_unet</th>.*?<td>2 / 2</td>", text, re.S)

    # every referenced PNG exists; the expected families are there
    parser = parse(index)
    assert parser.images
    for src in parser.images:
        assert (index.parent / src).is_file(), src
    names = set(parser.images)
    assert {"box_ssim.png", "box_dice_agree.png", "triplanar_S0.png", "triplanar_S1.png",
            "validation_curves.png", "curves_mdagan.png", "curves_regression_unet.png"} <= names
    assert "triplanar_S2.png" not in names  # subjects_to_show=2
    for link in ("comparison.csv", "comparison.md"):
        assert link in parser.links and (index.parent / link).is_file()
    # the missing pieces are noted, not fatal
    assert "regression_unet: no validation.csv" in text and "LPIPS not available: VGG weights not found" in text

    md = (index.parent / "comparison.md").read_text(encoding="utf-8")
    assert "| **0.900 ± 0.02** |" in md and "<ins>0.810 ± 0.01</ins>" in md
    with open(index.parent / "comparison.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == ["mdagan", "regression_unet"]
    assert float(rows[0]["ssim_mean"]) == pytest.approx(0.9) and rows[0]["ssim_place"] == "1"


def test_report_copes_with_bare_runs_and_duplicate_methods(tmp_path: Path) -> None:
    manifest = make_cohort(tmp_path / "data")
    metrics = {"ssim": [0.9, 0.8, 0.85], "psnr": [30.0, 28.0, 29.0], "nmse": [0.1, 0.2, 0.15],
               "mae": [0.05, 0.06, 0.04], "lpips": [0.1, 0.1, 0.1]}
    one = make_run(tmp_path / "runs", "first", "mdagan", manifest, metrics)
    two = make_run(tmp_path / "runs", "second", "mdagan", manifest, {k: [v * 0.9 for v in vs]
                                                                      for k, vs in metrics.items()})
    bare = tmp_path / "runs" / "bare"  # a run with nothing in it at all
    bare.mkdir()
    index = build_report([one, two, bare], tmp_path / "out", subjects_to_show=1, title="A <b>title</b>")
    text = index.read_text(encoding="utf-8")
    assert "A &lt;b&gt;title&lt;/b&gt;" in text  # escaped
    table = parse(index).rows
    assert set(table) == {"mdagan (first)", "mdagan (second)", "bare"}
    assert table["bare"]["ssim"] == ("—", False, False)
    assert "bare: no config.yaml" in text and "bare: no predictions/ folder" in text
    for src in parse(index).images:
        assert (index.parent / src).is_file()

    with pytest.raises(FileNotFoundError, match="run folder not found"):
        build_report([tmp_path / "nope"], tmp_path / "out2")
    with pytest.raises(ValueError, match="at least one"):
        build_report([], tmp_path / "out3")


def test_report_without_manifest_or_evaluation(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("method:\n  name: cyclegan\ndata:\n  manifest: /does/not/exist.json\n")
    write_csv(run / "log.csv", [{"iteration": 1, "seconds": 0.1, "lr": 1e-4, "g": -0.5}])
    index = build_report([run], tmp_path / "report")
    text = index.read_text(encoding="utf-8")
    assert "cyclegan" in text and "No run has evaluation results" in text
    assert "Tri-planar figures left out" in text
    assert "curves_cyclegan.png" in text and (tmp_path / "report" / "curves_cyclegan.png").is_file()


def test_triplanar_ct_uses_hu_window(tmp_path: Path) -> None:
    from volsynth.data.volume import Volume
    from volsynth.evaluation.report import _display_scale, triplanar_figure

    hu = np.full((8, 8, 8), -1024.0, np.float32)
    hu[2:6, 2:6, 2:6] = 40.0
    # HU target → window; a HU prediction → same window; a [0, 1] prediction beside a HU target → as is
    np.testing.assert_allclose(_display_scale(hu, "ct").max(), (40 + 1024) / 4024, rtol=1e-6)
    np.testing.assert_allclose(_display_scale(np.array([0.3]), "ct", already_unit=True), [0.3])
    out = triplanar_figure("ct", Volume(hu * 0.5), Volume(hu), [("m", hu + 10.0), ("u", np.clip(hu, 0, 1))],
                           tmp_path / "ct.png", source_kind="cbct", target_kind="ct")
    assert out.is_file() and out.stat().st_size > 1000
