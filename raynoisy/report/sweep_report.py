"""The sweep report: ``results.csv``, ``results.md`` and ``accuracy_vs_noise.png`` from a sweep directory.

Everything is rebuilt from the trials' run directories (see ``sweep_files``), so ``raynoisy report DIR``
gives the same files as the end of ``raynoisy sweep``, also for a sweep that is half done or was copied to
another machine, without Ray. Tables show mean ± sample standard deviation over the finished seeds of each
method x rate, with the best mean of each column in bold (every method whose mean rounds to the best).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from raynoisy.report.sweep_files import (
    FAILED,
    FINISHED,
    NOT_RUN,
    RESULT_COLUMNS,
    RUNS,
    read_sweep_manifest,
    trial_row,
)

RESULTS_CSV = "results.csv"
RESULTS_MD = "results.md"
PLOT = "accuracy_vs_noise.png"
DIGITS = 4
DPI = 110


@dataclass(frozen=True)
class Cell:
    """One method x rate over its finished seeds."""

    mean: float
    std: float  # sample standard deviation (n - 1); NaN for a single seed
    n: int


def results_frame(sweep_dir: str | Path) -> pd.DataFrame:
    """results.csv as a frame: one row per trial of the grid, in the grid's order."""
    sweep_dir = Path(sweep_dir)
    _, trials = read_sweep_manifest(sweep_dir)
    return pd.DataFrame([trial_row(sweep_dir, t) for t in trials], columns=RESULT_COLUMNS)


def cells(frame: pd.DataFrame, column: str) -> dict[tuple[str, float], Cell]:
    """(method, rate) -> mean, std and count of ``column`` over the finished trials that have a value."""
    done = frame[(frame["status"] == FINISHED) & frame[column].notna()]
    out = {}
    for (method, rate), values in done.groupby(["method", "rate"], sort=False)[column]:
        x = values.astype(float)
        out[(method, rate)] = Cell(float(x.mean()), float(x.std(ddof=1)) if len(x) > 1 else math.nan, len(x))
    return out


def _cell_text(cell: Cell | None, seeds: int) -> str:
    if cell is None:
        return "—"
    text = f"{cell.mean:.{DIGITS}f}" if cell.n == 1 else f"{cell.mean:.{DIGITS}f} ± {cell.std:.{DIGITS}f}"
    return text + (f" (n={cell.n})" if cell.n < seeds else "")


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def _actual_rates(frame: pd.DataFrame) -> dict[float, float]:
    """Nominal rate -> mean measured noise rate over the finished trials (absent where unknown)."""
    done = frame[(frame["status"] == FINISHED) & frame["actual_noise_rate"].notna()]
    return {rate: float(v.mean()) for rate, v in done.groupby("rate")["actual_noise_rate"]}


def accuracy_table(
    frame: pd.DataFrame, column: str, methods: list[str], rates: list[float], seeds: int
) -> str:
    """Methods x rates of ``column``: mean ± std over seeds, the best mean of each column in bold."""
    stats = cells(frame, column)
    actual = _actual_rates(frame)
    header = ["method"] + [
        f"rate {r:g} (actual {actual[r]:.3f})" if r in actual else f"rate {r:g}" for r in rates
    ]
    best = {}
    for rate in rates:
        means = [round(c.mean, DIGITS) for (_, r), c in stats.items() if r == rate]
        best[rate] = max(means) if means else None
    rows = []
    for method in methods:
        row = [f"`{method}`"]
        for rate in rates:
            cell = stats.get((method, rate))
            text = _cell_text(cell, seeds)
            row.append(f"**{text}**" if cell is not None and round(cell.mean, DIGITS) == best[rate] else text)
        rows.append(row)
    return _markdown_table(header, rows)


def plot_accuracy_vs_noise(frame: pd.DataFrame, methods: list[str], title: str, path: Path) -> None:
    """One line per method: test accuracy (mean, error bar = std over seeds) against the measured noise rate
    (the nominal rate where none was measured)."""
    stats = cells(frame, "test_accuracy")
    actual = _actual_rates(frame)
    fig = Figure(figsize=(6.4, 4.4))
    ax = fig.add_subplot()
    for method in methods:
        points = sorted((r, c) for (m, r), c in stats.items() if m == method)
        if not points:
            continue
        xs = [actual.get(r, r) for r, _ in points]
        ys = [c.mean for _, c in points]
        errors = [0.0 if math.isnan(c.std) else c.std for _, c in points]
        ax.errorbar(xs, ys, yerr=errors, marker="o", capsize=3, label=method)
    measured = "actual" if actual else "nominal"
    ax.set_xlabel(f"{measured} noise rate (fraction of training labels that are wrong)")
    ax.set_ylabel("test accuracy (best-validation epoch)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)


def write_sweep_report(sweep_dir: str | Path) -> Path:
    """Write results.csv, results.md and accuracy_vs_noise.png into ``sweep_dir``; returns results.md."""
    sweep_dir = Path(sweep_dir)
    grid, _ = read_sweep_manifest(sweep_dir)
    frame = results_frame(sweep_dir)
    frame.to_csv(sweep_dir / RESULTS_CSV, index=False)
    methods, rates, seeds = list(grid["methods"]), [float(r) for r in grid["rates"]], len(grid["seeds"])
    counts = {status: int((frame["status"] == status).sum()) for status in (FINISHED, FAILED, NOT_RUN)}
    title = f"{grid['dataset']}, {grid['noise']} noise, {seeds} seed(s)"
    sections = [
        f"# Sweep: {title}",
        f"Methods {', '.join(f'`{m}`' for m in methods)}; rates {', '.join(f'{r:g}' for r in rates)}; "
        f"seeds {', '.join(str(s) for s in grid['seeds'])}; "
        f"{grid.get('epochs') or 'preset'} epoch(s). Trials: {counts[FINISHED]} finished, "
        f"{counts[FAILED]} failed, {counts[NOT_RUN]} not run (of {len(frame)}). Cells: mean ± standard "
        "deviation over the finished seeds (n = how many, where fewer than all); the column's best in bold; "
        "the column header gives the measured noise rate of the training labels.",
    ]
    if counts[FINISHED]:
        plot_accuracy_vs_noise(frame, methods, title, sweep_dir / PLOT)
        sections += [
            "## Test accuracy of the best-validation epoch's model",
            accuracy_table(frame, "test_accuracy", methods, rates, seeds),
            "## Test accuracy of the last epoch's model",
            accuracy_table(frame, "final_test_accuracy", methods, rates, seeds),
        ]
        if frame["corrected_label_accuracy"].notna().any():
            has_labels = frame.groupby("method")["corrected_label_accuracy"].count()
            with_labels = [m for m in methods if has_labels.get(m, 0) > 0]
            sections += [
                "## Accuracy of the corrected training labels (methods that correct labels)",
                accuracy_table(frame, "corrected_label_accuracy", with_labels, rates, seeds),
            ]
            from_model = frame[frame["corrected_labels_from"] == "model"]["trial"]
            if len(from_model):
                sections.append(
                    f"{len(from_model)} trial(s) ended with the collapse guard falling back, so their "
                    "corrected labels are their best model's (confident learning), not the meta network's: "
                    + ", ".join(f"`{t}`" for t in from_model)
                )
        sections.append(f"![test accuracy against the noise rate]({PLOT})")
    else:
        (sweep_dir / PLOT).unlink(missing_ok=True)
        sections.append("No trial has finished yet.")
    failed = frame[frame["status"] == FAILED]
    if len(failed):
        errors = zip(failed["trial"], failed["error"], strict=True)
        rows = [[f"`{trial}`", str(error).replace("|", "\\|")] for trial, error in errors]
        sections += ["## Failed trials", _markdown_table(["trial", "error"], rows)]
    files = [
        [f"`{RESULTS_CSV}`", "one row per trial: accuracies, measured noise rate, wall time, status, error"],
        [f"`{RUNS}/<trial>/`", "each trial's run: report.md, metrics.json, tensorboard/, label issues"],
    ]
    sections.append("## Files\n\n" + _markdown_table(["file", "what"], files))
    path = sweep_dir / RESULTS_MD
    path.write_text("\n\n".join(sections) + "\n")
    return path
