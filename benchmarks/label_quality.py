r"""Per-epoch evidence of what a meta method's network learned, from runs of ``accuracy.py --diagnose``.

For each run folder given (or each run folder under a grid's ``--output``), one markdown table: per epoch the
validation accuracy, the main model's accuracy on the training images, and the method's view of the
training labels scored against the true ones — corrected-label accuracy next to the given labels' and how
often the corrected label equals the main model's own prediction (MLC, MetaLabelNet), or the mean weight
of clean and of mislabelled samples (MW-Net) — plus the collapse guard's readings and decision.

    python benchmarks/label_quality.py runs/i12-grid --match annotator --match seed0 --every 3

``--guard-check``: instead of the tables, how well the collapse guard's trusted-set reading tracks the truth
over every epoch of every matching run of a label-correcting method: the mean gap between the share of
trusted labels the corrected labels keep and the corrected labels' accuracy on the noisy training set, and
how often the guard fired in the epochs whose corrected labels were worse than the given ones and in the
others.

``--corrections``: per matching run, how accurate the labels its ``label_issues.parquet`` stands behind are:
its ``corrected_label`` where the method fills one, else confident learning's corrections (the predicted
label where flagged, the given label elsewhere; the rule a guarded run that ends falling back exports), so
that CE's model and a meta method's model are compared as correctors by the same rule; then the mean per
method and variant over the seeds.

    python benchmarks/label_quality.py runs/i12-export --match annotator --corrections
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from raynoisy.methods.label_issues import (
    CONFIDENT_LEARNING,
    confident_corrections,
    detector_of,
    true_labels_of,
)
from raynoisy.report.run_report import GUARD_COLUMNS

COLUMNS = {
    "val_accuracy": "val acc",
    "diag_model_train_accuracy": "model acc on train images",
    "diag_corrected_accuracy": "corrected-label acc",
    "diag_given_accuracy": "given-label acc",
    "diag_corrected_agrees_with_model": "corrected = model's prediction",
    "diag_weight_clean": "mean weight, clean",
    "diag_weight_mislabelled": "mean weight, mislabelled",
    **{key: f"guard: {column}" for key, column in GUARD_COLUMNS.items()},
}


def run_folders(paths: list[Path], match: list[str]) -> list[Path]:
    found = []
    for path in paths:
        candidates = [path] if (path / "metrics.json").exists() else sorted(path.glob("*/metrics.json"))
        found += [c if c.is_dir() else c.parent for c in candidates]
    return [f for f in found if all(m in f.name for m in match)]


def table(folder: Path, every: int) -> str:
    history = json.loads((folder / "metrics.json").read_text())["history"]
    shown = [k for k in COLUMNS if any(row.get(k) is not None for row in history)]
    lines = [
        f"`{folder.name}`",
        "",
        "| epoch | stage | " + " | ".join(COLUMNS[k] for k in shown) + " |",
        "|---|---|" + "---|" * len(shown),
    ]
    for row in history:
        epoch = int(row["epoch"])
        if epoch % every and epoch != len(history):
            continue
        cells = ["" if row.get(k) is None else f"{row[k]:.3f}" for k in shown]
        lines.append(f"| {epoch} | {row.get('stage', '')} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def guard_check(folders: list[Path]) -> str:
    pairs = []  # (kept on the trusted set, corrected-label acc, given-label acc, fired) per guarded epoch
    for folder in folders:
        for row in json.loads((folder / "metrics.json").read_text())["history"]:
            if row.get("train_guard_kept") is not None and row.get("diag_corrected_accuracy") is not None:
                pairs.append(
                    (
                        row["train_guard_kept"],
                        row["diag_corrected_accuracy"],
                        row["diag_given_accuracy"],
                        row["train_guard_fallback"] > 0,
                    )
                )
    if not pairs:
        return "no guarded epoch of a label-correcting method with --diagnose figures"
    gaps = [abs(kept - acc) for kept, acc, _, _ in pairs]
    worse = [fired for _, acc, given, fired in pairs if acc < given]
    better = [fired for _, acc, given, fired in pairs if acc >= given]
    return "\n".join(
        [
            "| guarded epochs | mean abs(kept on trusted - corrected-label acc) | max | "
            "guard fired: epochs with corrected < given | guard fired: epochs with corrected >= given |",
            "|---|---|---|---|---|",
            f"| {len(pairs)} | {sum(gaps) / len(gaps):.3f} | {max(gaps):.3f} | "
            f"{sum(worse)} of {len(worse)} | {sum(better)} of {len(better)} |",
        ]
    )


def corrections(folders: list[Path]) -> str:
    lines = [
        "| run | flagged by | corrected-label acc | given-label acc | changed |",
        "|---|---|---|---|---|",
    ]
    by_config: dict[str, list[tuple[float, float, float]]] = {}
    for folder in folders:
        issues = pq.read_table(folder / "label_issues.parquet")
        truth = true_labels_of(
            issues.column("sample_id").to_numpy(), pq.read_table(folder / "labels.parquet")
        )
        given = issues.column("given_label").to_numpy()
        own = issues.column("corrected_label")
        flags = (
            issues.column(c).to_numpy(zero_copy_only=False) for c in ("predicted_label", "is_label_issue")
        )
        corrected = own.to_numpy() if own.null_count == 0 else confident_corrections(given, *flags)
        source = "confident learning" if detector_of(issues) == CONFIDENT_LEARNING else "the method's rule"
        known = truth >= 0
        if not known.any():  # no true labels: nothing to score
            continue
        figures = (
            float(np.mean(corrected[known] == truth[known])),
            float(np.mean(given[known] == truth[known])),
            float(np.mean(corrected != given)),
        )
        lines.append(f"| `{folder.name}` | {source} | " + " | ".join(f"{x:.4f}" for x in figures) + " |")
        by_config.setdefault(folder.name.split("-seed")[0], []).append(figures)
    lines += [
        "",
        "| method and noise | runs | corrected-label acc | given-label acc | changed |",
        "|---|---|---|---|---|",
    ]
    for name, rows in by_config.items():
        means = [sum(column) / len(rows) for column in zip(*rows, strict=True)]
        lines.append(f"| {name} | {len(rows)} | " + " | ".join(f"{x:.4f}" for x in means) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("paths", nargs="+", type=Path, help="run folders, or grid folders holding them")
    parser.add_argument("--match", action="append", default=[], help="keep run folders whose name has this")
    parser.add_argument("--every", type=int, default=1, help="show every N-th epoch (and the last)")
    parser.add_argument("--guard-check", action="store_true", help="the guard's reading against the truth")
    parser.add_argument(
        "--corrections", action="store_true", help="the accuracy of the labels each run's label issues imply"
    )
    args = parser.parse_args(argv)
    folders = run_folders(args.paths, args.match)
    if not folders:
        parser.error("no run folder with a metrics.json matches")
    if args.guard_check:
        print(guard_check(folders))
        return
    if args.corrections:
        print(corrections(folders))
        return
    print("\n\n".join(table(f, args.every) for f in folders))


if __name__ == "__main__":
    main()
