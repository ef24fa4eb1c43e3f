"""One Tune trial: the Train V2 pattern, a Tune function trainable that runs one ``raynoisy train``.

The trial calls the same ``raynoisy.train.driver.train`` as the command line (checks, shards reused,
services, TorchTrainer, outputs, report.md), so a sweep's trial and a single run cannot drift apart. Its
outcome lands in its run directory: metrics.json when it finishes, error.json when it fails (then the
error is raised again, so Tune records it too and goes on with the other trials).
"""

from __future__ import annotations

import time
import traceback
from pathlib import Path
from typing import Any

from raynoisy.config import config_from_dict
from raynoisy.report import report_finished_run
from raynoisy.report.sweep_files import clear_outcome, write_error
from raynoisy.train.driver import train

TRIAL = "trial"  # the one key of a trial's Tune config: the trial's name
# What a trial reports to Tune (the sweep's progress lines read it); everything else is in metrics.json.
REPORTED = ("test_accuracy", "final_test_accuracy", "best_val_accuracy", "wall_seconds")


def error_line(exc: BaseException) -> str:
    """The error as one line: its type and message (a results.csv cell)."""
    text = "".join(traceback.format_exception_only(type(exc), exc)).strip()
    return " ".join(text.split())


def run_trial(config: dict[str, Any], *, trials: dict[str, dict]) -> None:
    """Tune's entry point: train the trial named by ``config[TRIAL]`` (its config is in ``trials``)."""
    from ray import tune

    name = config[TRIAL]
    cfg = config_from_dict(trials[name])
    run_dir = Path(cfg.run.output)
    clear_outcome(run_dir)
    start = time.time()

    def log(text: str) -> None:
        print(f"[{name}] {text}", flush=True)

    try:
        metrics = train(cfg, log=log)
    except Exception as exc:
        write_error(run_dir, error_line(exc), time.time() - start)
        raise
    report_finished_run(run_dir, log)
    tune.report({key: metrics[key] for key in REPORTED})
