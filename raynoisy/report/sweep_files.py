"""The layout of a sweep directory: what the sweep runner writes and the sweep report reads back.

``DIR/sweep.json`` names the grid and its trials (that file is what makes a folder a sweep); every trial is
an ordinary run directory ``DIR/runs/<trial>/`` (metrics.json, report.md, TensorBoard events, ...) whose
name is keyed by its config, so re-running the same command finds it again. A trial that failed holds
``error.json`` (its error and wall time) instead of metrics.json. Both are removed when a trial starts, so
a folder never shows the outcome of an earlier attempt.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from raynoisy.errors import RaynoisyError

SWEEP_FILE = "sweep.json"
RUNS = "runs"
METRICS = "metrics.json"
ERROR_FILE = "error.json"

FINISHED, FAILED, NOT_RUN = "finished", "failed", "not run"

# results.csv, one row per trial. test_accuracy: the best-validation epoch's model; final_test_accuracy: the
# last epoch's; corrected_label_accuracy: the method's corrected labels against the true ones, where it has
# corrected labels; corrected_labels_from: whose they are (metrics.json's label_correction.source: "method",
# or "model" where the collapse guard ended the trial falling back and its best model corrected them).
RESULT_COLUMNS = [
    "trial",
    "method",
    "noise",
    "rate",
    "actual_noise_rate",
    "seed",
    "status",
    "best_val_accuracy",
    "test_accuracy",
    "final_test_accuracy",
    "corrected_label_accuracy",
    "corrected_labels_from",
    "wall_seconds",
    "error",
]


@dataclass(frozen=True)
class TrialKey:
    """Which cell of the grid a trial is, and the name of its run directory."""

    name: str
    method: str
    noise: str
    rate: float
    seed: int


def run_dir_of(sweep_dir: Path, name: str) -> Path:
    return sweep_dir / RUNS / name


def write_sweep_manifest(sweep_dir: Path, grid: dict[str, Any], trials: list[TrialKey]) -> None:
    sweep_dir.mkdir(parents=True, exist_ok=True)
    manifest = {"grid": grid, "trials": [asdict(t) for t in trials]}
    (sweep_dir / SWEEP_FILE).write_text(json.dumps(manifest, indent=1))


def read_sweep_manifest(sweep_dir: Path) -> tuple[dict[str, Any], list[TrialKey]]:
    try:
        manifest = json.loads((sweep_dir / SWEEP_FILE).read_text())
        return manifest["grid"], [TrialKey(**t) for t in manifest["trials"]]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise RaynoisyError(
            f"{sweep_dir} is not a sweep directory ({SWEEP_FILE} cannot be read: {exc!r}); pass the --output "
            "folder of `raynoisy sweep`"
        ) from None


def is_sweep_dir(path: str | Path) -> bool:
    return (Path(path) / SWEEP_FILE).is_file()


def clear_outcome(run_dir: Path) -> None:
    """Forget a trial's earlier outcome before it (re)starts: only a run that ends writes metrics.json."""
    for name in (METRICS, ERROR_FILE):
        (run_dir / name).unlink(missing_ok=True)


def write_error(run_dir: Path, error: str, wall_seconds: float | None) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / ERROR_FILE).write_text(json.dumps({"error": error, "wall_seconds": wall_seconds}))


def has_outcome(run_dir: Path) -> bool:
    return (run_dir / METRICS).is_file() or (run_dir / ERROR_FILE).is_file()


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def trial_row(sweep_dir: Path, trial: TrialKey) -> dict[str, Any]:
    """The trial's results.csv row, from its run directory."""
    row: dict[str, Any] = dict.fromkeys(RESULT_COLUMNS, None)
    row |= {"trial": trial.name, "method": trial.method, "noise": trial.noise, "rate": trial.rate}
    row |= {"seed": trial.seed, "status": NOT_RUN, "error": ""}
    run_dir = run_dir_of(sweep_dir, trial.name)
    metrics = _read_json(run_dir / METRICS)
    if metrics is not None:
        correction = metrics.get("label_correction") or {}
        row |= {
            "status": FINISHED,
            "actual_noise_rate": _number((metrics.get("noise") or {}).get("actual_rate")),
            "corrected_label_accuracy": _number(correction.get("corrected_label_accuracy")),
            "corrected_labels_from": correction.get("source"),
        }
        for key in ("best_val_accuracy", "test_accuracy", "final_test_accuracy", "wall_seconds"):
            row[key] = _number(metrics.get(key))
        return row
    failure = _read_json(run_dir / ERROR_FILE)
    if failure is not None:
        row |= {
            "status": FAILED,
            "error": str(failure.get("error", "")),
            "wall_seconds": _number(failure.get("wall_seconds")),
        }
    return row


def _number(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None
