"""Reports people read instead of JSON, from finished outputs only (no Ray), on any machine they are
copied to.

``write_run_report`` turns a run directory into report.md (the driver's caller writes it at the end of
every run, ``raynoisy report RUN_DIR`` rebuilds it); ``write_sweep_report`` turns a sweep directory into
results.csv, results.md and accuracy_vs_noise.png (the end of ``raynoisy sweep``, or ``raynoisy report DIR``).
"""

from raynoisy.report.run_report import is_run_dir, load_run, report_finished_run, write_run_report
from raynoisy.report.sweep_files import is_sweep_dir
from raynoisy.report.sweep_report import write_sweep_report

__all__ = [
    "is_run_dir",
    "is_sweep_dir",
    "load_run",
    "report_finished_run",
    "write_run_report",
    "write_sweep_report",
]
