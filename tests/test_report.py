"""The HTML comparison report, built from fake, tiny run folders written in tmp.

Expected values are computed here from the numbers the fake runs were given (numpy means, ddof-1 stds, scipy's
Wilcoxon, closed forms), never read back from the report's own helpers.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import yaml
from scipy.stats import wilcoxon

from volsynth.data.io import write_volume
from volsynth.data.volume import Volume
from volsynth.errors import OutputError
from volsynth.evaluation.report import (
    RunNotFoundError,
    build_report,
    column_decimals,
    display_scale,
    metric_direction,
    paired_wilcoxon,
    rank_places,
    to_ras,
    triplanar_figure,
)

SHAPE = (16, 14, 12)
SPACING = (1.5, 1.5, 2.0)
SUBJECTS = [f"S{i}" for i in range(6)]

# Per-subject scores of three methods (6 subjects): A wins SSIM/PSNR/LPIPS, B wins NMSE/MAE, C is last.
METRICS = {
    "mdagan": {"ssim": [0.90, 0.88, 0.92, 0.91, 0.89, 0.93], "psnr": [30.0, 29.0, 31.0, 30.5, 29.5, 31.8],
               "nmse": [0.12, 0.10, 0.11, 0.13, 0.12, 0.10], "mae": [0.05, 0.06, 0.04, 0.05, 0.05, 0.04],
               "lpips": [0.10, 0.12, 0.11, 0.10, 0.13, 0.11], "ssim_mask": [0.70, 0.71, 0.72, 0.69, 0.70, 0.73]},
    "regression_unet": {"ssim": [0.80, 0.82, 0.81, 0.79, 0.83, 0.80], "psnr": [28.0, 27.5, 28.5, 28.0, 27.0, 28.2],
                        "nmse": [0.08, 0.09, 0.07, 0.08, 0.09, 0.07], "mae": [0.03, 0.02, 0.04, 0.03, 0.03, 0.02],
                        "lpips": [0.15, 0.14, 0.16, 0.15, 0.17, 0.15],
                        "ssim_mask": [0.80, 0.82, 0.81, 0.79, 0.83, 0.80]},
    "cyclegan3d": {"ssim": [0.70, 0.72, 0.69, 0.71, 0.73, 0.70], "psnr": [25.0, 26.0, 25.5, 24.5, 26.5, 25.1],
                   "nmse": [0.20, 0.22, 0.19, 0.21, 0.23, 0.20], "mae": [0.08, 0.09, 0.07, 0.08, 0.09, 0.08],
                   "lpips": [0.25, 0.24, 0.26, 0.25, 0.27, 0.25], "ssim_mask": [0.60, 0.62, 0.61, 0.59, 0.63, 0.60]},
}
CEILING = {"ssim": [0.98] * 6, "psnr": [38.0, 38.5, 37.5, 38.0, 38.2, 37.8], "nmse": [0.01] * 6, "mae": [0.01] * 6}
TISSUE = ("csf", "gm", "wm")


def write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def stats(values: list[float]) -> dict:
    return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else None,
            "n": len(values)}


def safe(subject: str) -> str:
    """File-name form of a (possibly hostile) subject name used by the fake cohort and runs."""
    return re.sub(r"[^0-9A-Za-z]+", "_", subject)


def make_cohort(root: Path, subjects: list[str] = SUBJECTS) -> Path:
    """T1/T2 volumes (a bright ellipsoid) and a lesion label for the first subject, plus manifest.json."""
    x, y, z = np.meshgrid(*(np.linspace(-1, 1, n) for n in SHAPE), indexing="ij")
    head = (x**2 + y**2 + z**2) < 0.7
    entries = []
    for index, s in enumerate(subjects):
        files = {"t1": root / safe(s) / "t1.nii.gz", "t2": root / safe(s) / "t2.nii.gz"}
        write_volume(Volume(np.where(head, 300 + 500 * (x + 1), 0).astype(np.float32), SPACING), files["t1"])
        write_volume(Volume(np.where(head, 900 - 400 * (x + 1), 0).astype(np.float32), SPACING), files["t2"])
        entry = {"subject": s, "images": {k: str(v.relative_to(root)) for k, v in files.items()}}
        if index == 1:  # a phantom's noise-free target: shown as the ceiling row
            ideal = np.where(head, 900 - 380 * (x + 1), 0).astype(np.float32)
            write_volume(Volume(ideal, SPACING), root / safe(s) / "t2_ideal.nii.gz")
            entry["ideal"] = {"t2": f"{safe(s)}/t2_ideal.nii.gz"}
        if index == 0:
            lesion = np.zeros(SHAPE, np.uint8)
            lesion[10:13, 4:7, 2:5] = 1
            write_volume(Volume(lesion, SPACING), root / safe(s) / "seg.nii.gz")
            entry["label"] = f"{safe(s)}/seg.nii.gz"
        entries.append(entry)
    manifest = root / "manifest.json"
    manifest.write_text(json.dumps({"format": "volsynth-manifest", "version": 1, "source": "t1", "target": "t2",
                                    "subjects": entries}))
    return manifest


def make_run(root: Path, name: str, method: str, manifest: Path, metrics: dict[str, list[float]], *,
             subjects: list[str] = SUBJECTS, ceiling: bool = True, downstream: float | None = 0.8,
             protocol1: float | None = None, validation_seconds: bool = True, config_extra: dict | None = None
             ) -> Path:
    """A run folder as train / predict / evaluate / downstream leave it."""
    run = root / name
    run.mkdir(parents=True)
    config = {"method": {"name": method, "perception": {"weight": 0.0}, "adversarial": {"weight": 1e-4}},
              "data": {"manifest": str(manifest), "source": "t1", "target": "t2", "spacing": list(SPACING),
                       "sampling": {"kind": "patch", "patch_size": [16, 16, 16], "per_step": 2}},
              "train": {"iterations": 40, "lr": 1e-3, "schedule": {"kind": "constant"}},
              "inference": {"overlap": 0.5}, **(config_extra or {})}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    (run / "splits.json").write_text(json.dumps({"train": ["T0", "T1", "T2"], "val": ["V0"], "test": subjects}))
    write_csv(run / "log.csv", [{"iteration": i, "seconds": 0.5 * i, "lr": 1e-3, "l1": 1 / i, "adv_g": 50 + i % 7,
                                 "perception": 0.0} for i in range(1, 41)])
    write_csv(run / "validation.csv", [{"iteration": i, **({"seconds": 0.5 * i} if validation_seconds else {}),
                                        "ssim": 0.5 + i / 100, "psnr": 20 + i / 4} for i in (10, 20, 30, 40)])
    rng = np.random.default_rng(sum(map(ord, name)))
    outputs = {}
    for s in subjects:
        file = f"{safe(s)}_synthetic-t2.nii.gz"
        write_volume(Volume(rng.random(SHAPE).astype(np.float32), SPACING), run / "predictions" / file)
        outputs[s] = {"file": file, "input": f"{s}/t1.nii.gz"}
    (run / "predictions" / "predictions.json").write_text(json.dumps({
        "format": "volsynth-predictions", "method": method, "source": "t1", "target": "t2",
        "checkpoint": str(run / "checkpoints" / "best.pt"), "checkpoint_sha256": "ab12cd34ef56" + "0" * 52,
        "created": "2026-12-01T10:00:00", "volsynth_version": "0.1.0", "outputs": outputs}))
    columns = list(metrics)
    rows = [{"subject": s, **{c: metrics[c][i] for c in columns}} for i, s in enumerate(subjects)]
    if ceiling:  # evaluate adds per-subject distances to the ideal image; they are not metrics
        for i, row in enumerate(rows):
            row["psnr_db_below_ceiling"] = CEILING["psnr"][i] - row["psnr"]
            row["nmse_ratio_to_ceiling"] = row["nmse"] / CEILING["nmse"][i]
    write_csv(run / "evaluation" / "metrics.csv", rows)
    summary: dict = {c: stats(metrics[c]) for c in columns}
    summary.update({"profile": "paper", "modality": "mr", "definitions": "paper profile: [0,1] scale"})
    if ceiling:
        summary["ceiling"] = {c: stats(v[: len(subjects)]) for c, v in CEILING.items()}
        summary["ceiling_definition"] = "the manifest's ideal image of the target scored like the predictions"
        summary["distance_to_ceiling"] = {
            "psnr_db_below": float(np.mean(CEILING["psnr"][: len(subjects)]) - np.mean(metrics["psnr"])),
            "ssim_below": float(np.mean(CEILING["ssim"][: len(subjects)]) - np.mean(metrics["ssim"])),
            "nmse_ratio": float(np.mean(metrics["nmse"]) / np.mean(CEILING["nmse"][: len(subjects)])),
            "n": len(subjects), "definition": "psnr_db_below: mean over subjects of (ideal − prediction)"}
        write_csv(run / "evaluation" / "ceiling.csv",
                  [{"subject": s, **{c: v[i] for c, v in CEILING.items()}} for i, s in enumerate(subjects)])
    (run / "evaluation" / "summary.json").write_text(json.dumps(summary))
    if downstream is not None:
        rows = [{"subject": s, **{f"{k}_{t}": round(downstream - 0.02 * j + 0.01 * i, 4)
                                  for j, t in enumerate(TISSUE) for k in ("dice", "vs")}}
                for i, s in enumerate(subjects)]
        for row in rows:
            row["mean_dice"] = float(np.mean([row[f"dice_{t}"] for t in TISSUE]))
            row["mean_vs"] = float(np.mean([row[f"vs_{t}"] for t in TISSUE]))
        write_csv(run / "downstream" / "tissue.csv", rows)
        per_class = {f"{k}_{t}": stats([r[f"{k}_{t}"] for r in rows]) for t in TISSUE for k in ("dice", "vs")}
        (run / "downstream" / "tissue_summary.json").write_text(json.dumps({
            "protocol": "tissue", "segmenter": "gmm_tissue", "labels": {"1": "CSF", "2": "GM", "3": "WM"},
            "mean_dice": stats([r["mean_dice"] for r in rows]), "mean_vs": stats([r["mean_vs"] for r in rows]),
            "per_class": per_class}))
    if protocol1 is not None:  # a segmenter trained on synthetic images, tested on real ones (+ the real→real bound)
        dice = [protocol1 + 0.01 * i for i in range(len(subjects))]
        write_csv(run / "downstream" / "segment.csv",
                  [{"model": "synthetic", "subject": s, "dice": d} for s, d in zip(subjects, dice, strict=True)]
                  + [{"model": "real", "subject": s, "dice": 0.9} for s in subjects])
        (run / "downstream" / "segment_summary.json").write_text(json.dumps({
            "protocol": "segment", "synthetic": {"dice": stats(dice)},
            "upper_bound": {"dice": stats([0.9, 0.92, 0.94])}}))
    return run


# --------------------------------------------------------------------------------------------------------------
# a tiny DOM for checking the page


@dataclass
class Node:
    tag: str
    attrs: dict[str, str]
    children: list[Node | str] = field(default_factory=list)

    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text() for c in self.children)

    def find_all(self, tag: str | None = None, **attrs: str) -> list[Node]:
        out = []
        for child in self.children:
            if isinstance(child, Node):
                if (tag is None or child.tag == tag) and all(
                        (v in child.attrs.get(k.rstrip("_"), "").split()) if k == "class_"
                        else child.attrs.get(k) == v for k, v in attrs.items()):
                    out.append(child)
                out += child.find_all(tag, **attrs)
        return out

    def find(self, tag: str | None = None, **attrs: str) -> Node:
        found = self.find_all(tag, **attrs)
        assert found, f"no <{tag} {attrs}>"
        return found[0]


class TreeBuilder(HTMLParser):
    VOID: ClassVar[set[str]] = {"img", "meta", "br", "link", "input", "hr", "source"}

    def __init__(self) -> None:
        super().__init__()
        self.root = Node("root", {})
        self.stack = [self.root]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        node = Node(tag, {k: v or "" for k, v in attrs})
        self.stack[-1].children.append(node)
        if tag not in self.VOID:
            self.stack.append(node)

    def handle_endtag(self, tag: str) -> None:
        if tag in self.VOID:
            return
        while len(self.stack) > 1:
            if self.stack.pop().tag == tag:
                break

    def handle_data(self, data: str) -> None:
        self.stack[-1].children.append(data)


def parse(index: Path) -> Node:
    builder = TreeBuilder()
    builder.feed(index.read_text(encoding="utf-8"))
    return builder.root


def comparison_rows(page: Node, key: str) -> dict[str, dict[str, Node]]:
    """label → metric → <td> of a comparison table."""
    table = page.find("table", id=f"table-{key}")
    out = {}
    for tr in table.find("tbody").find_all("tr"):
        label = tr.find("th").text().strip()
        out[label] = {td.attrs["data-metric"]: td for td in tr.find_all("td") if "data-metric" in td.attrs}
    return out


def value_text(td: Node) -> str:
    return "".join(c if isinstance(c, str) else c.text() for c in td.children
                   if isinstance(c, str) or c.tag != "span").strip()


def note_text(td: Node) -> str:
    spans = td.find_all("span", class_="p")
    return spans[0].text() if spans else ""


def decimals_of(text: str) -> int:
    return len(text.split(".")[1]) if "." in text else 0


def snapshot(folder: Path, skip: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")
            if p.is_file() and skip not in p.parents}


# --------------------------------------------------------------------------------------------------------------


def test_ranking_helpers() -> None:
    assert metric_direction("ssim") == 1 and metric_direction("nmse_mask") == -1 and metric_direction("lpips") == -1
    assert metric_direction("dice_gm") == 1 and metric_direction("vs_csf") == 1
    assert rank_places({"a": 0.9, "b": 0.8, "c": 0.7}, 1) == {"a": 1, "b": 2}
    assert rank_places({"a": 0.9, "b": 0.8, "c": 0.7}, -1) == {"c": 1, "b": 2}
    # equal as displayed (3 decimals) → shared first; the next distinct value is second
    assert rank_places({"a": 0.8721, "b": 0.8719, "c": 0.85}, 1, 3) == {"a": 1, "b": 1, "c": 2}
    assert rank_places({"a": 0.8721, "b": 0.8719, "c": 0.85}, 1, 4) == {"a": 1, "b": 2}
    assert rank_places({"a": 0.9}, 1) == {} and rank_places({"a": 0.9, "b": math.nan}, 1) == {}
    # 3 significant digits of the smallest magnitude
    assert column_decimals([0.872, 0.81]) == 3 and column_decimals([30.2, 27.9]) == 1
    assert column_decimals([0.036, 1.5]) == 4 and column_decimals([0.0]) == 3 and column_decimals([1234.0]) == 0


def test_paired_wilcoxon_matches_scipy_and_closed_form() -> None:
    rng = np.random.default_rng(3)
    best = {f"s{i}": float(v) for i, v in enumerate(rng.normal(1.0, 0.1, 9))}
    other = {k: v - float(rng.normal(0.05, 0.08)) for k, v in best.items()}
    other["only_other"] = 0.5  # unpaired subjects are ignored
    p, n = paired_wilcoxon(best, other)
    keys = sorted(best)
    assert n == 9
    assert p == pytest.approx(wilcoxon([best[k] for k in keys], [other[k] for k in keys]).pvalue, rel=1e-12)
    # Five pairs, every difference positive: exact two-sided p = 2 · (1/2)^5 = 0.0625
    p5, _ = paired_wilcoxon({str(i): 1.0 + i for i in range(5)}, {str(i): 0.5 + 0.9 * i for i in range(5)})
    assert p5 == pytest.approx(0.0625)
    assert paired_wilcoxon({str(i): 1.0 for i in range(4)}, {str(i): 2.0 for i in range(4)}) == (None, 4)
    assert paired_wilcoxon({str(i): 1.0 for i in range(5)}, {str(i): 1.0 for i in range(5)}) == (1.0, 5)


def test_report_tables_figures_and_files(tmp_path: Path) -> None:
    manifest = make_cohort(tmp_path / "data")
    runs = [make_run(tmp_path / "runs", name, name, manifest, m, downstream=0.8 - 0.05 * i,
                     protocol1=0.7 + 0.05 * i) for i, (name, m) in enumerate(METRICS.items())]
    index = build_report(runs, tmp_path / "report", subjects_to_show=2, command="volsynth report --runs …")
    out = index.parent
    assert index == tmp_path / "report" / "index.html"
    text = index.read_text(encoding="utf-8")
    assert "<script" not in text and "http://" not in text and "https://" not in text  # static, offline
    page = parse(index)
    assert "T1w → T2w" in page.find("h1").text()
    header = page.find("dl", class_="header").text()
    assert str(manifest) in header and "3 / 1 / 6" in header and "1.5×1.5×2.0 mm" in header
    assert "demo-banner" not in text  # no demo.json anywhere

    # --- image-quality table: mean ± std, one number of decimals per column, places, p-values, tally
    quality = comparison_rows(page, "quality")
    assert list(quality) == ["mdagan", "regression_unet", "cyclegan3d", "Ideal (phantom ceiling)"]
    places: dict[str, list[int]] = {m: [] for m in METRICS}
    for metric in ("ssim", "psnr", "nmse", "mae", "lpips"):
        direction = 1 if metric in ("ssim", "psnr") else -1
        means = {m: float(np.mean(v[metric])) for m, v in METRICS.items()}
        order = sorted(means, key=lambda m: -direction * means[m])
        texts = {m: value_text(quality[m][metric]) for m in METRICS}
        assert len({decimals_of(t.split(" ± ")[0]) for t in texts.values()}) == 1, texts
        for m, cell_text in texts.items():
            mean_text, std_text = cell_text.split(" ± ")
            d = decimals_of(mean_text)
            assert abs(float(mean_text) - means[m]) <= 0.5 * 10**-d + 1e-12
            assert abs(float(std_text) - np.std(METRICS[m][metric], ddof=1)) <= 0.5 * 10**-d + 1e-12
        best, second, third = order
        places[best].append(1)
        places[second].append(2)
        assert quality[best][metric].find_all("b") and not quality[best][metric].find_all("u")
        assert quality[second][metric].find_all("u") and not quality[second][metric].find_all("b")
        assert not quality[third][metric].find_all("b") and not quality[third][metric].find_all("u")
        assert note_text(quality[best][metric]) == "best"
        for other in (second, third):
            p = wilcoxon(METRICS[best][metric], METRICS[other][metric]).pvalue
            assert note_text(quality[other][metric]) == (f"p = {p:.2g}" if p >= 0.001 else "p < 0.001")
    assert value_text(quality["mdagan"]["ssim"]) == "0.905 ± 0.019"  # hand-computed: mean 5.43/6, sqrt(1750e-6/5)
    # all six differences share a sign → exact two-sided p = 2/2^6
    assert note_text(quality["regression_unet"]["ssim"]) == "p = 0.031"
    ceiling_row = quality["Ideal (phantom ceiling)"]
    assert value_text(ceiling_row["ssim"]) == "0.980 ± 0.000"
    assert float(value_text(ceiling_row["psnr"]).split(" ± ")[0]) == pytest.approx(np.mean(CEILING["psnr"]), abs=0.05)
    assert value_text(ceiling_row["lpips"]) == "" and not ceiling_row["ssim"].find_all("b")
    tally = {tr.find("th").text(): tr.find("td", class_="tally").text()
             for tr in page.find("table", id="table-quality").find("tbody").find_all("tr", class_="run")}
    assert tally == {m: f"{places[m].count(1)} / {places[m].count(2)}" for m in METRICS}
    assert tally == {"mdagan": "3 / 2", "regression_unet": "2 / 3", "cyclegan3d": "0 / 0"}
    # masked scores (not in the paper): their own table, ranked, not in the tally; regression_unet wins there
    masked = comparison_rows(page, "quality-mask")
    assert list(masked) == [*METRICS] and masked["regression_unet"]["ssim_mask"].find_all("b")
    assert masked["mdagan"]["ssim_mask"].find_all("u") and "ssim_mask" not in quality["mdagan"]
    assert not page.find("table", id="table-quality-mask").find_all("td", class_="tally")

    # --- distance to the ceiling
    distance_table = page.find("table", id="table-distance")
    assert [th.text() for th in distance_table.find("thead").find_all("th")] == [
        "Method", "PSNR below the ceiling (dB)", "NMSE ÷ ceiling NMSE", "SSIM below the ceiling"]  # no "n"
    distance = {tr.find("th").text(): [td.text() for td in tr.find_all("td")]
                for tr in distance_table.find("tbody").find_all("tr")}
    gap = np.mean(CEILING["psnr"]) - np.mean(METRICS["cyclegan3d"]["psnr"])
    ratio = np.mean(METRICS["cyclegan3d"]["nmse"]) / 0.01
    assert float(distance["cyclegan3d"][0]) == pytest.approx(gap, abs=0.05)
    assert float(distance["cyclegan3d"][1]) == pytest.approx(ratio, rel=1e-2)
    assert float(distance["mdagan"][2]) == pytest.approx(0.98 - 0.905, abs=5e-4)
    assert "ideal image of the target scored like the predictions." in page.text()
    assert not any("ceiling" in c for c in quality["mdagan"])  # per-subject distance columns are not metrics

    # --- downstream: GM / WM / CSF Dice and VS as separate columns
    downstream = comparison_rows(page, "downstream")
    headers = [th.text() for th in page.find("table", id="table-downstream").find("thead").find_all("th")]
    assert headers[1:7] == ["Dice GM ↑", "Dice WM ↑", "Dice CSF ↑", "VS GM ↑", "VS WM ↑", "VS CSF ↑"]
    gm = [0.8 - 0.05 * i - 0.02 + 0.01 * np.mean(range(6)) for i in range(3)]  # mean over subjects of dice_gm
    for method, expected in zip(METRICS, gm, strict=True):
        assert float(value_text(downstream[method]["dice_gm"]).split(" ± ")[0]) == pytest.approx(expected, abs=5e-4)
    assert downstream["mdagan"]["dice_gm"].find_all("b")
    # Protocol 1: its own column, cyclegan3d best there (0.80 + 0.025), and the real→real upper bound row
    assert headers[7] == "Dice synthetic→real ↑" and downstream["cyclegan3d"]["dice_s2r"].find_all("b")
    assert value_text(downstream["cyclegan3d"]["dice_s2r"]) == "0.825 ± 0.019"
    assert value_text(downstream["Upper bound (trained on real)"]["dice_s2r"]) == "0.920 ± 0.020"
    assert value_text(downstream["Upper bound (trained on real)"]["dice_gm"]) == ""

    # --- per-subject table: every value of every run, and the ceiling
    per_subject = page.find("table", id="table-per-subject")
    headers = [th.text() for th in per_subject.find("thead").find_all("th")][2:]
    assert headers[:5] == ["SSIM ↑", "PSNR (dB) ↑", "NMSE ↓", "MAE ↓", "LPIPS ↓"]
    cells_by_row: dict[tuple[str, str], list[str]] = {}
    subject = ""
    for tr in per_subject.find("tbody").find_all("tr"):
        group = tr.find_all("th", scope="rowgroup")
        subject = group[0].text() if group else subject
        cells_by_row[subject, tr.find("th", scope="row").text()] = [td.text() for td in tr.find_all("td")]
    assert len(cells_by_row) == 6 * 4  # 3 runs + the ceiling, per subject
    for i, s in enumerate(SUBJECTS):
        for m, values in METRICS.items():
            for column, metric in enumerate(("ssim", "psnr", "nmse", "mae", "lpips")):
                shown = cells_by_row[s, m][column]
                assert abs(float(shown) - values[metric][i]) <= 0.5 * 10 ** -decimals_of(shown), (s, m, metric)
        assert float(cells_by_row[s, "Ideal (phantom ceiling)"][1]) == pytest.approx(CEILING["psnr"][i], abs=0.05)
    assert cells_by_row["S2", "mdagan"][1] == "31.0"  # PSNR column: 1 decimal (3 significant digits of 25.x)

    # --- figures: every <img> exists inside the report folder; the expected families are there
    images = [img.attrs["src"] for img in page.find_all("img")]
    for src in images:
        assert (out / src).is_file() and (out / src).resolve().parent == out.resolve(), src
    assert {"quality_per_subject.png", "downstream_per_subject.png", "time_to_quality.png",
            "validation_curves.png", "triplanar_00_S0.png", "triplanar_01_S1.png"} <= set(images)
    assert sum(src.startswith("curves_") for src in images) == 3 and "triplanar_02_S2.png" not in images
    captions = " ".join(f.text() for f in page.find_all("figcaption"))
    assert "Not shown: perception (weight 0)" in captions
    assert "S0: Slices through the largest lesion" in captions and "S1: Slices through the centre" in captions
    assert captions.count("T2w ideal”: the phantom's noise-free target") == 1  # S1 only has an ideal image

    # --- configuration summary, links, CSV and Markdown
    summary = page.find("table", id="table-runs").text()
    assert "best.pt (sha256 ab12cd34ef56…)" in summary and "patch 16×16×16, 2 per step" in summary
    assert "40 of 40" in summary and "20 s" in summary  # iterations; wall time from log.csv (40 × 0.5 s)
    links = [a.attrs["href"] for a in page.find_all("a")]
    assert "comparison.csv" in links and "comparison.md" in links
    assert all((out / href).is_file() for href in links), links
    with open(out / "comparison.csv") as handle:
        csv_rows = list(csv.DictReader(handle))
    assert [r["method"] for r in csv_rows] == [*METRICS, "Ideal (phantom ceiling)"]
    assert float(csv_rows[0]["ssim_mean"]) == pytest.approx(0.905) and csv_rows[0]["ssim_place"] == "1"
    assert float(csv_rows[1]["ssim_p_vs_best"]) == pytest.approx(0.03125)
    markdown = (out / "comparison.md").read_text(encoding="utf-8")
    assert "| **0.905 ± 0.019** |" in markdown and "| *Ideal (phantom ceiling)* |" in markdown
    assert "Dice GM ↑" in markdown
    assert oct((out / "index.html").stat().st_mode & 0o777) != "0o600"  # readable by colleagues


def test_few_subjects_give_values_only_and_no_boxes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from matplotlib.axes import Axes

    boxes: list[int] = []
    original = Axes.boxplot
    monkeypatch.setattr(Axes, "boxplot", lambda self, *a, **k: boxes.append(1) or original(self, *a, **k))
    manifest = make_cohort(tmp_path / "data", SUBJECTS[:2])
    runs = [make_run(tmp_path / "runs", name, name, manifest, {k: v[:2] for k, v in m.items()},
                     subjects=SUBJECTS[:2], ceiling=False, downstream=None) for name, m in METRICS.items()]
    index = build_report(runs, tmp_path / "report", subjects_to_show=0)
    page = parse(index)
    quality = comparison_rows(page, "quality")
    for cells in quality.values():
        for td in cells.values():
            assert not td.find_all("b") and not td.find_all("u") and note_text(td) == ""
    assert "values only, no ranks" in page.text()
    assert not page.find("table", id="table-quality").find_all("td", class_="tally")
    assert (index.parent / "quality_per_subject.png").is_file() and boxes == []
    assert "No run has downstream results" in page.text()

    # with ≥ 10 subjects the dot plot gets boxes; 3 ≤ n < 5 ranks but says the test needs more pairs
    from volsynth.evaluation.report import RunData, Stat, build_table
    from volsynth.evaluation.report.figures import paired_dots

    many = [RunData(Path(m), m, label=m, per_subject={"ssim": {f"s{i}": 0.5 + i / 100 for i in range(10)}})
            for m in ("a", "b")]
    paired_dots(many, ["ssim"], tmp_path / "dots.png")
    assert len(boxes) == 2
    four = [RunData(Path(m), m, label=m, per_subject={c: dict(zip(SUBJECTS[:4], v[c][:4], strict=True))
                                                       for c in ("ssim", "psnr")},
                    stats={c: Stat(float(np.mean(v[c][:4])), float(np.std(v[c][:4], ddof=1)), 4)
                           for c in ("ssim", "psnr")}) for m, v in METRICS.items()]
    table = build_table("quality", four, ["ssim", "psnr"], tally=True)
    assert table.ranked and table.places["ssim"] == {"mdagan": 1, "regression_unet": 2}
    assert table.p_values == {"ssim": {}, "psnr": {}}
    assert table.notes == ["Wilcoxon signed-rank p-values: n too small (they need ≥ 5 paired subjects)."]


def test_hostile_names_are_escaped_and_nothing_is_written_outside_out(tmp_path: Path) -> None:
    hostile_method = '<script>alert("m")</script>'
    hostile_subject = '../../S"><img src=x onerror=alert(1)>'
    manifest = make_cohort(tmp_path / "data", [hostile_subject, *SUBJECTS[1:]])
    runs = [make_run(tmp_path / "runs", "evil", hostile_method, manifest, METRICS["mdagan"],
                     subjects=[hostile_subject, *SUBJECTS[1:]]),
            make_run(tmp_path / "runs", "plain", "regression_unet", manifest, METRICS["regression_unet"],
                     subjects=[hostile_subject, *SUBJECTS[1:]])]
    out = tmp_path / "out" / "report"
    before = snapshot(tmp_path, out)
    index = build_report(runs, out, subjects_to_show=1, title="A <b>title</b>")
    assert snapshot(tmp_path, out) == before  # run folders, cohort and everything else untouched
    text = index.read_text(encoding="utf-8")
    assert "<script" not in text and "onerror=alert" not in text.replace("onerror=alert(1)&gt;", "")
    assert "&lt;script&gt;alert(&#34;m&#34;)&lt;/script&gt;" in text and "A &lt;b&gt;title&lt;/b&gt;" in text
    page = parse(index)
    assert not page.find_all("script") and all(img.attrs["src"].endswith(".png") for img in page.find_all("img"))
    assert hostile_method in comparison_rows(page, "quality")
    subjects = [th.text() for th in page.find("table", id="table-per-subject").find_all("th", scope="rowgroup")]
    assert subjects[0] == hostile_subject  # shown as text (the manifest loader refuses it: no tri-planar figure)
    for path in out.rglob("*"):
        assert out.resolve() in path.resolve().parents
    assert not list((tmp_path / "out").glob("*.png"))


def test_missing_parts_are_notes_not_errors(tmp_path: Path) -> None:
    bare = tmp_path / "runs" / "bare"
    bare.mkdir(parents=True)
    run = tmp_path / "runs" / "cyclegan"
    run.mkdir()
    (run / "config.yaml").write_text("method:\n  name: cyclegan\ndata:\n  manifest: /does/not/exist.json\n")
    write_csv(run / "log.csv", [{"iteration": i, "seconds": i, "lr": 1e-4, "g": -0.5 + i} for i in range(1, 4)])
    index = build_report([run, bare], tmp_path / "report")
    text = parse(index).text()
    assert "No run has evaluation results" in text and "Tri-planar figures left out" in text
    assert "bare: no config.yaml" in text and "cyclegan: no validation.csv" in text
    assert (tmp_path / "report" / "curves_00_cyclegan.png").is_file()
    with pytest.raises(RunNotFoundError, match="run folder not found"):
        build_report([tmp_path / "nope"], tmp_path / "out2")
    with pytest.raises(ValueError, match="at least one"):
        build_report([], tmp_path / "out3")
    with pytest.raises(OutputError, match="must not be a run folder"):
        build_report([run], run)


def test_staged_run_demo_banner_and_old_prediction_names(tmp_path: Path) -> None:
    manifest = make_cohort(tmp_path / "data")
    runs_dir = tmp_path / "demo" / "runs"
    staged = runs_dir / "make_a_volume"
    first = make_run(staged, "1-autoencoder", "make_a_volume", manifest, METRICS["mdagan"], downstream=None)
    final = make_run(staged, "2-volumetric", "make_a_volume", manifest, METRICS["mdagan"], downstream=None,
                     validation_seconds=False)
    (staged / "stages.json").write_text(json.dumps({"stages": [{"folder": "1-autoencoder"},
                                                               {"folder": "2-volumetric"}]}))
    for folder in ("predictions", "evaluation"):  # predict / evaluate were pointed at the top-level run
        (final / folder).rename(staged / folder)
    # an older single run: <subject>.nii.gz predictions without an outputs map
    old = make_run(runs_dir, "old", "regression_unet", manifest, METRICS["regression_unet"], downstream=None)
    for s in SUBJECTS:
        (old / "predictions" / f"{s}_synthetic-t2.nii.gz").rename(old / "predictions" / f"{s}.nii.gz")
    (old / "predictions" / "predictions.json").write_text(json.dumps({"checkpoint": "x/last.pt", "inputs": {}}))
    (tmp_path / "demo" / "demo.json").write_text(json.dumps({"iterations": 40, "patch_size": [16, 16, 16],
                                                             "lr": 0.001}))
    index = build_report([staged, old], tmp_path / "demo" / "report", subjects_to_show=1)
    page = parse(index)
    banner = page.find("div", id="demo-banner").text()
    assert "not for results" in banner and "iterations = 40" in banner and "patch_size = 16×16×16" in banner
    summary = page.find("table", id="table-runs").text()
    assert "1-autoencoder → 2-volumetric" in summary and "40 s" in summary  # wall time: 20 s + 20 s
    assert "interpolated" in page.text()  # the final stage's validation.csv has no seconds column
    assert "make_a_volume" in comparison_rows(page, "quality")
    figure = page.find("img", src="triplanar_00_S0.png")
    assert figure is not None and (index.parent / "triplanar_00_S0.png").is_file()

    from volsynth.evaluation.report import load_run

    data = load_run(staged)
    times = [row["seconds"] for row in data.validation]
    assert times == pytest.approx([20 + 0.5 * i for i in (10, 20, 30, 40)])  # after the first stage's 20 s
    assert first.is_dir() and sorted(data.prediction_files) == SUBJECTS


def test_triplanar_orientation_letters_follow_the_patient() -> None:
    # A marker on the patient's left (+x in LPS world) must land on the left of the axial and coronal panels
    # (neurological convention, "L" on the left) whatever the file's axis order.
    from volsynth.evaluation.report.triplanar import ORIENTATION_LETTERS, planes

    shape = (10, 8, 6)
    for direction in (np.eye(3), np.diag([-1.0, -1.0, 1.0]), np.array([[0, 1.0, 0], [1.0, 0, 0], [0, 0, 1.0]])):
        array = np.zeros(shape, np.float32)
        world_x = direction[0]  # LPS x of each index axis: the array axis pointing left/right
        axis = int(np.argmax(np.abs(world_x)))
        index = [s // 2 for s in shape]
        index[axis] = shape[axis] - 1 if world_x[axis] > 0 else 0  # the most-left voxel (max LPS x)
        array[tuple(index)] = 1.0
        ras = to_ras(Volume(array, (1.0, 2.0, 3.0), direction=direction))
        centre = [int(c[0]) for c in np.nonzero(ras.array)]
        axial, coronal, _ = planes(ras, centre)
        for image, _ in (axial, coronal):
            column = int(np.nonzero(image)[1][0])
            assert column == 0  # leftmost column of the panel
    assert ORIENTATION_LETTERS["axial"][0] == "L" and ORIENTATION_LETTERS["sagittal"][:2] == ("P", "A")


def test_triplanar_ct_uses_hu_window(tmp_path: Path) -> None:
    hu = np.full((8, 8, 8), -1024.0, np.float32)
    hu[2:6, 2:6, 2:6] = 40.0
    np.testing.assert_allclose(display_scale(hu, "ct").max(), (40 + 1024) / 4024, rtol=1e-6)
    np.testing.assert_allclose(display_scale(np.array([0.3]), "ct", already_unit=True), [0.3])
    path, caption = triplanar_figure("ct", Volume(hu * 0.5), Volume(hu), [("m", hu + 10.0), ("u", np.clip(hu, 0, 1))],
                                     tmp_path / "ct.png", source_name="CBCT", target_name="CT",
                                     source_kind="cbct", target_kind="ct")
    assert path.is_file() and path.stat().st_size > 1000 and "centre" in caption


def test_report_path_imports_no_torch(tmp_path: Path) -> None:
    # The report's own modules must not pull in torch or the downstream/evaluate modules. The package
    # volsynth.evaluation's __init__ is bypassed (it is not part of the report path).
    manifest = make_cohort(tmp_path / "data", SUBJECTS[:3])
    run = make_run(tmp_path / "runs", "a", "mdagan", manifest, {k: v[:3] for k, v in METRICS["mdagan"].items()},
                   subjects=SUBJECTS[:3], downstream=None)
    code = f"""
import sys, types, pathlib, volsynth
package = types.ModuleType("volsynth.evaluation")
package.__path__ = [str(pathlib.Path(volsynth.__file__).parent / "evaluation")]
sys.modules["volsynth.evaluation"] = package
from volsynth.evaluation.report import build_report
build_report([{str(run)!r}], {str(tmp_path / "report")!r}, subjects_to_show=0)
bad = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "monai")
             or m in ("volsynth.evaluation.downstream", "volsynth.evaluation.evaluate"))
print(bad)
assert not bad, bad
"""
    env = {**os.environ, "MPLBACKEND": "Agg"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "report" / "index.html").is_file()
