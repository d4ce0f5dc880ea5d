"""Run reports: accuracy-matrix plots, metric tables and a Markdown/HTML report of a run directory."""

from mmcl.report.plots import plot_curves, plot_matrix
from mmcl.report.run_report import write_report
from mmcl.report.tables import comparison_table, comparison_text, summary_table

__all__ = ["comparison_table", "comparison_text", "plot_curves", "plot_matrix", "summary_table", "write_report"]
