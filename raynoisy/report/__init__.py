"""Reports people read instead of JSON: ``write_run_report`` turns a finished run directory into report.md.

It reads only the run's files (metrics.json, label_issues.parquet, labels.parquet), so it renders without
Ray, on any machine the run directory is copied to; the driver calls it at the end of every run and
``raynoisy report RUN_DIR`` rebuilds it.
"""

from raynoisy.report.run_report import is_run_dir, load_run, write_run_report

__all__ = ["is_run_dir", "load_run", "write_run_report"]
