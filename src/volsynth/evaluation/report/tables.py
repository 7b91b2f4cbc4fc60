"""The report's tables as plain data (the template does the markup; CSV and Markdown are written from the same).

The comparison follows the seed paper's Table 1 (Ha et al.): one row per method, mean ± sample std over the test
subjects, the best value of each column in **bold** and the second underlined, each judged in the metric's
direction on the values as displayed. Changes made so the highlighting always means something:

- every column has one number of decimals (3 significant digits of its smallest value), so equal-looking values
  share a place;
- with fewer than :data:`MIN_RANKED` subjects no places are given (two points carry no ranking);
- with two methods only the best is marked (the second is simply the other one);
- beside each non-best value, the two-sided Wilcoxon signed-rank p-value of its per-subject scores against the
  best method's, paired by subject, when at least :data:`MIN_PAIRED` subjects are paired.

Whole-volume image quality (the paper's columns), image quality inside the mask (NOT IN PAPER) and the downstream
(segmentation) checks are separate tables, so each fits a normal window; the "1st / 2nd" tally counts the
whole-volume image-quality columns only, as the paper's tally does.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from volsynth.evaluation.report.load import RunData, Stat

MIN_RANKED = 3  # subjects needed before places (bold / underline) are given
MIN_PAIRED = 5  # paired subjects needed for a Wilcoxon signed-rank p-value
CEILING_LABEL = "Ideal (phantom ceiling)"
UPPER_LABEL = "Upper bound (trained on real)"
IQA_ORDER: tuple[str, ...] = ("ssim", "psnr", "nmse", "mae", "lpips")
PRETTY: dict[str, str] = {"ssim": "SSIM", "psnr": "PSNR", "nmse": "NMSE", "mae": "MAE", "lpips": "LPIPS",
                          "mse": "MSE", "rmse": "RMSE", "dice": "Dice", "vs": "VS"}
LOWER_IS_BETTER = ("nmse", "mae", "mse", "rmse", "lpips")
TISSUE_ORDER = ("gm", "wm", "csf")
MAX_CLASS_COLUMNS = 8
DISTANCE_NAMES: dict[str, str] = {"psnr_db_below": "PSNR below the ceiling (dB)",
                                  "nmse_ratio": "NMSE ÷ ceiling NMSE",
                                  "ssim_below": "SSIM below the ceiling",
                                  "masked_psnr_db_below": "PSNR (mask) below the ceiling (dB)",
                                  "masked_nmse_ratio": "NMSE (mask) ÷ ceiling NMSE (mask)"}


def is_downstream(column: str) -> bool:
    return column.split("_")[0] in ("dice", "vs")


def metric_direction(column: str) -> int:
    """+1 when higher is better, −1 when lower is better (by the first name part: ``nmse_mask`` → −1)."""
    return -1 if column.lower().split("_")[0] in LOWER_IS_BETTER else 1


def metric_name(column: str, profile: str | None = None) -> str:
    """Human name with unit, e.g. ``PSNR (dB)``, ``MAE (HU)``, ``SSIM (mask)``, ``Dice GM``."""
    if column == "dice_s2r":
        return "Dice synthetic→real"
    head, _, rest = column.partition("_")
    if head in ("dice", "vs"):
        return f"{PRETTY[head]} {rest.upper() if rest in TISSUE_ORDER else rest.replace('_', ' ')}".strip()
    name = PRETTY.get(head, head.upper())
    unit = {"psnr": "dB", "mae": "HU" if profile == "synthrad2023" else ""}.get(head, "")
    parts = [p for p in (unit, rest.replace("_", " ")) if p]
    return name + (f" ({', '.join(parts)})" if parts else "")


def metric_header(column: str, profile: str | None = None) -> str:
    return f"{metric_name(column, profile)} {'↑' if metric_direction(column) > 0 else '↓'}"


def column_decimals(values: Iterable[float], digits: int = 3) -> int:
    """Decimals giving ``digits`` significant digits to the smallest non-zero magnitude (at most 6)."""
    finite = [abs(v) for v in values if math.isfinite(v) and v != 0]
    if not finite:
        return digits
    return int(min(6, max(0, digits - 1 - math.floor(math.log10(min(finite))))))


def fmt(value: float | None, decimals: int) -> str:
    return "—" if value is None or not math.isfinite(value) else f"{value:.{decimals}f}"


def fmt_stat(stat: Stat | None, decimals: int) -> str:
    if stat is None:
        return "—"
    return fmt(stat.mean, decimals) + (f" ± {fmt(stat.std, decimals)}" if stat.std is not None else "")


def fmt_p(p: float) -> str:
    return "p < 0.001" if p < 0.001 else f"p = {p:.2g}"


def rank_places(values: Mapping[str, float], direction: int, decimals: int = 3) -> dict[str, int]:
    """First and second places among ``label → value``, compared as displayed (``decimals``); ties share a place
    and the next distinct value is second. Fewer than two finite values, or all equal: no places."""
    shown = {k: round(v, decimals) for k, v in values.items() if math.isfinite(v)}
    distinct = sorted(set(shown.values()), reverse=direction > 0)
    if len(shown) < 2 or len(distinct) < 2:  # nothing to rank, or everyone equal as displayed
        return {}
    return {label: place for place, value in enumerate(distinct[:2], start=1)
            for label, v in shown.items() if v == value}


def paired_wilcoxon(best: Mapping[str, float], other: Mapping[str, float]) -> tuple[float | None, int]:
    """Two-sided Wilcoxon signed-rank p-value of ``best`` vs ``other`` paired by subject, and the pairs used.

    None when fewer than :data:`MIN_PAIRED` subjects have finite values in both; 1.0 when every pair is equal
    (scipy has no p-value for all-zero differences).
    """
    subjects = sorted(s for s in best if s in other and math.isfinite(best[s]) and math.isfinite(other[s]))
    if len(subjects) < MIN_PAIRED:
        return None, len(subjects)
    x, y = [best[s] for s in subjects], [other[s] for s in subjects]
    if all(a == b for a, b in zip(x, y, strict=True)):
        return 1.0, len(subjects)
    from scipy.stats import wilcoxon

    return float(wilcoxon(x, y, alternative="two-sided").pvalue), len(subjects)


# --------------------------------------------------------------------------------------------------------------


@dataclass
class Cell:
    text: str
    place: int | None = None  # 1 = bold, 2 = underlined
    note: str = ""  # second line: Wilcoxon p against the best, or "best"
    column: str = ""


@dataclass
class Row:
    label: str
    cells: list[Cell]
    kind: str = "run"  # run | ceiling | upper (reference rows are never ranked)
    tally: str = ""
    n: str = ""


@dataclass
class Table:
    key: str
    columns: list[str]
    headers: list[str]
    rows: list[Row]
    decimals: dict[str, int]
    places: dict[str, dict[str, int]] = field(default_factory=dict)
    p_values: dict[str, dict[str, float]] = field(default_factory=dict)  # column → label → p
    ranked: bool = False
    underline: bool = False
    tally: bool = False
    notes: list[str] = field(default_factory=list)


def quality_columns(runs: Sequence[RunData]) -> tuple[list[str], list[str]]:
    """Image-quality columns: (whole volume, in the paper's order, then any other metric; inside the mask)."""
    present = {m for r in runs for m in r.stats if not is_downstream(m)}
    iqa = [m for m in IQA_ORDER if m in present]
    masked = [f"{m}_mask" for m in IQA_ORDER if f"{m}_mask" in present]
    others = sorted(present - set(iqa) - set(masked))
    return iqa + [m for m in others if not m.endswith("_mask")], masked + [m for m in others if m.endswith("_mask")]


def downstream_columns(runs: Sequence[RunData]) -> tuple[list[str], int]:
    """Per-class Dice then VS columns (GM, WM, CSF first), then Protocol 1's Dice; and how many were left out."""
    present = {m for r in runs for m in r.stats if is_downstream(m) and m != "dice_s2r"}

    def order(kind: str) -> list[str]:
        names = sorted(m for m in present if m.split("_")[0] == kind)
        tissue = [f"{kind}_{t}" for t in TISSUE_ORDER if f"{kind}_{t}" in names]
        return tissue + [m for m in names if m not in tissue]

    dice_cols, vs_cols = order("dice"), order("vs")
    left_out = max(0, len(dice_cols) - MAX_CLASS_COLUMNS) + max(0, len(vs_cols) - MAX_CLASS_COLUMNS)
    columns = dice_cols[:MAX_CLASS_COLUMNS] + vs_cols[:MAX_CLASS_COLUMNS]
    return columns + (["dice_s2r"] if any("dice_s2r" in r.stats for r in runs) else []), left_out


def build_table(key: str, runs: Sequence[RunData], columns: Sequence[str], *, profile: str | None = None,
                reference: tuple[str, str, Mapping[str, Stat]] | None = None, tally: bool = False) -> Table:
    """One comparison table: ``runs`` as rows over ``columns``, plus an optional reference row
    ``(label, kind, {column: Stat})`` (the phantom ceiling, or Protocol 1's upper bound), never ranked."""
    ref_stats = reference[2] if reference else {}
    decimals = {c: column_decimals([r.stats[c].mean for r in runs if c in r.stats]
                                   + ([ref_stats[c].mean] if c in ref_stats else [])) for c in columns}
    min_n = min((r.stats[c].n for r in runs for c in columns if c in r.stats), default=0)
    ranked_runs = {c: [r for r in runs if c in r.stats] for c in columns}
    ranked = min_n >= MIN_RANKED and any(len(v) >= 2 for v in ranked_runs.values())
    underline = ranked and max(len(v) for v in ranked_runs.values()) >= 3
    table = Table(key, list(columns), [metric_header(c, profile) for c in columns], [], decimals,
                  ranked=ranked, underline=underline, tally=tally and ranked)
    too_small: dict[str, set[str]] = {c: set() for c in columns}  # runs whose pairing with the best is < 5
    pair_counts: list[int] = []
    for c in columns:
        values = {r.label: r.stats[c].mean for r in ranked_runs[c]}
        places = rank_places(values, metric_direction(c), decimals[c]) if ranked else {}
        if not underline:
            places = {k: v for k, v in places.items() if v == 1}
        table.places[c] = places
        table.p_values[c] = {}
        best = next((r for r in ranked_runs[c] if places.get(r.label) == 1), None)
        for r in ranked_runs[c] if best is not None else []:
            if r is best:
                continue
            p, pairs = paired_wilcoxon(best.per_subject.get(c, {}), r.per_subject.get(c, {}))
            if p is None:
                too_small[c].add(r.label)
            else:
                table.p_values[c][r.label] = p
                pair_counts.append(pairs)
    any_p = any(table.p_values.values())
    counted = list(columns)
    for r in runs:
        cells = []
        for c in columns:
            place = table.places[c].get(r.label)
            p = table.p_values[c].get(r.label)
            note = ""
            if any_p and place == 1:
                note = "best"
            elif p is not None:
                note = fmt_p(p)
            elif any_p and r.label in too_small[c]:  # (when no pair has enough subjects, one table note says so)
                note = "n too small"
            cells.append(Cell(fmt_stat(r.stats.get(c), decimals[c]), place, note, c))
        firsts = sum(table.places[c].get(r.label) == 1 for c in counted)
        seconds = sum(table.places[c].get(r.label) == 2 for c in counted)
        n = max((r.stats[c].n for c in columns if c in r.stats), default=0)
        table.rows.append(Row(r.label, cells, "run", f"{firsts} / {seconds}" if underline else str(firsts), str(n)))
    if reference and any(c in ref_stats for c in columns):
        label, kind, _ = reference
        table.rows.append(Row(label, [Cell(fmt_stat(ref_stats.get(c), decimals[c]) if c in ref_stats else "",
                                           column=c) for c in columns], kind,
                              n=str(max((s.n for s in ref_stats.values()), default=0))))
    if not ranked and len(runs) > 1 and 0 < min_n < MIN_RANKED:
        table.notes.append(f"Only {min_n} subject(s) per method: values only, no ranks (they need ≥ {MIN_RANKED}).")
    if any_p:
        n_pairs = min(pair_counts)
        table.notes.append("p: two-sided Wilcoxon signed-rank test of the per-subject scores against the best "
                           f"method's, paired by subject (with n = {n_pairs} pairs the smallest possible p is "
                           f"{2.0 / 2 ** n_pairs:.2g}); not corrected for multiple comparisons.")
    elif ranked and any(too_small.values()):
        table.notes.append(f"Wilcoxon signed-rank p-values: n too small (they need ≥ {MIN_PAIRED} paired subjects).")
    return table


def distance_rows(runs: Sequence[RunData]) -> tuple[list[str], list[tuple[str, list[str]]], bool]:
    """Distance of each run to the phantom ceiling: (headers, [(label, cells)], computed_from_means).

    Taken from ``summary.json``'s ``distance_to_ceiling``; for a run without it (but with a ceiling), the PSNR gap
    and NMSE ratio are computed from the means.
    """
    computed = False
    per_run: list[tuple[str, dict[str, float]]] = []
    for r in runs:
        distance = dict(r.distance_to_ceiling)
        if not distance and r.ceiling:
            if "psnr" in r.stats and "psnr" in r.ceiling:
                distance["psnr_db_below"] = r.ceiling["psnr"].mean - r.stats["psnr"].mean
            if "nmse" in r.stats and "nmse" in r.ceiling and r.ceiling["nmse"].mean > 0:
                distance["nmse_ratio"] = r.stats["nmse"].mean / r.ceiling["nmse"].mean
            computed = computed or bool(distance)
        if distance:
            per_run.append((r.label, distance))
    keys = list(dict.fromkeys(k for _, d in per_run for k in d))
    keys = [k for k in DISTANCE_NAMES if k in keys] + [k for k in keys if k not in DISTANCE_NAMES]
    headers = [DISTANCE_NAMES.get(k, k.replace("_", " ")) for k in keys]
    decimals = {k: column_decimals([d[k] for _, d in per_run if k in d]) for k in keys}
    rows = [(label, [fmt(d.get(k), decimals[k]) for k in keys]) for label, d in per_run]
    return headers, rows, computed


def per_subject_rows(runs: Sequence[RunData], columns: Sequence[str], decimals: Mapping[str, int]
                     ) -> list[tuple[str, list[tuple[str, str, list[str]]]]]:
    """``[(subject, [(row label, kind, cells)])]``: every run's value of every column, and the ceiling's."""
    subjects = sorted({s for r in runs for c in columns for s in r.per_subject.get(c, {})})
    ceiling = next((r.ceiling_per_subject for r in runs if r.ceiling_per_subject), {})
    out = []
    for subject in subjects:
        rows = [(r.label, "run", [fmt(r.per_subject.get(c, {}).get(subject), decimals.get(c, 3)) for c in columns])
                for r in runs]
        if any(subject in ceiling.get(c, {}) for c in columns):
            rows.append((CEILING_LABEL, "ceiling", [fmt(ceiling.get(c, {}).get(subject), decimals.get(c, 3))
                                                    if c in ceiling else "" for c in columns]))
        out.append((subject, rows))
    return out


# --------------------------------------------------------------------------------------------------------------
# CSV / Markdown


TABLE_TITLES = {"quality": "Image quality, whole volume", "quality-mask": "Image quality inside the mask",
                "downstream": "Downstream segmentation"}


def table_markdown(table: Table) -> str:
    """GitHub Markdown: best **bold**, second <ins>underlined</ins>, p-values in a second table below."""
    header = ["Method", *table.headers] + (["1st / 2nd" if table.underline else "1st"] if table.tally else [])
    lines = [f"**{TABLE_TITLES.get(table.key, table.key)}** (mean ± sample std over the test subjects)", "",
             "| " + " | ".join([*header, "n"]) + " |", "|" + "---|" * (len(header) + 1)]
    for row in table.rows:
        cells = [row.label.replace("|", "\\|") if row.kind == "run" else f"*{row.label}*"]
        for cell in row.cells:
            text = cell.text if row.kind == "run" or not cell.text else f"*{cell.text}*"
            cells.append(f"**{text}**" if cell.place == 1 else f"<ins>{text}</ins>" if cell.place == 2 else text)
        cells += [row.tally] if table.tally else []
        lines.append("| " + " | ".join([*cells, row.n]) + " |")
    if any(table.p_values.values()):
        lines += ["", "Wilcoxon signed-rank p (two-sided) against the best method of each column:", "",
                  "| Method | " + " | ".join(table.headers) + " |", "|" + "---|" * (len(table.headers) + 1)]
        for row in table.rows:
            if row.kind == "run":
                lines.append("| " + " | ".join([row.label.replace("|", "\\|"),
                                                 *(c.note.replace("p = ", "") for c in row.cells)]) + " |")
    return "\n".join(lines) + "\n"


def tables_csv(tables: Sequence[Table], runs: Sequence[RunData]) -> str:
    """One row per run (and per reference row): ``<column>_{mean,std,n,place,p_vs_best}`` for every column."""
    columns = [c for t in tables for c in t.columns]
    places = {c: t.places.get(c, {}) for t in tables for c in t.columns}
    p_values = {c: t.p_values.get(c, {}) for t in tables for c in t.columns}
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["method", "run", *[f"{c}_{k}" for c in columns for k in ("mean", "std", "n", "place",
                                                                              "p_vs_best")]])
    for r in runs:
        cells: list[object] = [r.label, str(r.path)]
        for c in columns:
            s = r.stats.get(c)
            p = p_values[c].get(r.label)
            cells += [repr(s.mean) if s else "", repr(s.std) if s and s.std is not None else "", s.n if s else "",
                      places[c].get(r.label, ""), repr(p) if p is not None else ""]
        writer.writerow(cells)
    ceiling = next((r.ceiling for r in runs if r.ceiling), {})
    if ceiling:
        cells = [CEILING_LABEL, ""]
        for c in columns:
            s = ceiling.get(c)
            cells += [repr(s.mean) if s else "", repr(s.std) if s and s.std is not None else "", s.n if s else "",
                      "", ""]
        writer.writerow(cells)
    return buf.getvalue()
