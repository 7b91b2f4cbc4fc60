"""The HTML comparison report: ``volsynth report --runs A B --out DIR``.

``build_report(runs, out_dir)`` reads each run folder (torch-free: :mod:`.load`), builds the comparison tables
(:mod:`.tables`), draws the figures (:mod:`.figures`, :mod:`.triplanar`) and renders
``volsynth/templates/report.html.j2`` (:mod:`.page`) into ``out_dir``:

- ``index.html``: one static page (no scripts, no network) with the PNGs beside it, referenced by relative path;
- ``comparison.csv`` / ``comparison.md``: the tables (the Markdown pastes into a paper or ``RESULTS.md``);
- ``quality_per_subject.png``, ``downstream_per_subject.png``, ``triplanar_*.png``, ``time_to_quality.png``,
  ``validation_curves.png``, ``curves_*.png``.
"""

from volsynth.evaluation.report.load import RunData, RunNotFoundError, Stat, load_run
from volsynth.evaluation.report.page import build_report
from volsynth.evaluation.report.tables import (
    MIN_PAIRED,
    MIN_RANKED,
    Table,
    build_table,
    column_decimals,
    metric_direction,
    metric_header,
    paired_wilcoxon,
    rank_places,
)
from volsynth.evaluation.report.triplanar import display_scale, to_ras, triplanar_figure

__all__ = [
    "MIN_PAIRED",
    "MIN_RANKED",
    "RunData",
    "RunNotFoundError",
    "Stat",
    "Table",
    "build_report",
    "build_table",
    "column_decimals",
    "display_scale",
    "load_run",
    "metric_direction",
    "metric_header",
    "paired_wilcoxon",
    "rank_places",
    "to_ras",
    "triplanar_figure",
]
