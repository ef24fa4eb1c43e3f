r"""How well each method finds the wrong labels: precision / recall of ``is_label_issue``, against cleanlab.

Runs (or reuses) the same grid as ``benchmarks/accuracy.py`` — same arguments, same run folders, same cache —
and prints one row per (noise, method, variant): the share of training labels the method flags and the
precision, recall and F1 of those flags against the true labels (mean ± std over seeds, from each run's
``label_issues`` block in metrics.json, i.e. from its label_issues.parquet), with its detector named below
the table. Beside them, the reference point: **cleanlab's own** ``cleanlab.filter.find_label_issues``
(its defaults) on out-of-sample predicted probabilities of the grid's CE run, obtained by K-fold
cross-fitting (``raynoisy.train.in_process.cross_fitted_probabilities``: K CE trainings with the CE run's
config, each predicting the fold it did not train on) — the way cleanlab's documentation asks for them. The
cross-fitted probabilities are cached per seed under ``--output`` (``crossfitK-<the CE run's folder>``).
Needs a ``ce`` row and ``--in-process``.

    python benchmarks/label_issues.py --in-process --data-root ../shared/data/fashion-mnist \
        --methods ce,ce-clean,ce-all,glc,mwnet,mlc,metalabelnet,mixnn,mlnt --noise flip:0.4 --seeds 0,1,2 \
        --epochs 15 --clean-per-class 50 --set split.train_subset=3000 --output runs/label-issues
"""

from __future__ import annotations

import json
import statistics
import sys
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))

from accuracy import NO_VARIANT, Run, build_parser, plan_runs, run_grid

from raynoisy.errors import ConfigError
from raynoisy.methods.label_issues import PRED_PROBS, detector_scores, f1_score, true_labels_of
from raynoisy.train.in_process import cross_fitted_probabilities

REFERENCE = "cleanlab (CE cross-fitted)"


def cleanlab_flags(given: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """cleanlab's ``find_label_issues`` with its defaults (prune_by_noise_rate), as a user would call it."""
    from cleanlab.filter import find_label_issues

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "too few examples" of a class in small splits
        return np.asarray(find_label_issues(labels=given, pred_probs=probs, n_jobs=1), dtype=bool)


def scores(flagged: np.ndarray, mislabelled: np.ndarray) -> dict[str, float | None]:
    """The label_issues block's numbers for a flag vector (known true labels only)."""
    return {
        "flagged_share": float(flagged.mean()),
        **detector_scores(flagged, mislabelled),
        "f1": f1_score(flagged, mislabelled),
    }


def reference_scores(ce_run: Run, folds: int) -> dict[str, float | None]:
    """cleanlab on the cross-fitted CE probabilities of ``ce_run``'s config (cached next to the run)."""
    cache = ce_run.output.parent / f"crossfit{folds}-{ce_run.output.name}"
    probs_file, scores_file = cache / "pred_probs.npz", cache / "scores.json"
    if scores_file.exists():
        return json.loads(scores_file.read_text())
    columns = cross_fitted_probabilities(ce_run.cfg, folds)
    labels = pq.read_table(ce_run.output / "labels.parquet")
    true = true_labels_of(columns["sample_id"], labels)
    if (true < 0).any():
        raise ValueError(f"{ce_run.output}: {int((true < 0).sum())} training samples have no true label")
    given = columns["given_label"]
    result = scores(cleanlab_flags(given, columns[PRED_PROBS]), given != true)
    cache.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(probs_file, **columns)
    scores_file.write_text(json.dumps(result, indent=1))
    return result


def _mean_std(values: list[float | None]) -> str:
    known = [v for v in values if v is not None]
    if not known:
        return "n/a"
    std = statistics.stdev(known) if len(known) > 1 else 0.0
    return f"{statistics.mean(known):.3f} ± {std:.3f}"


def table(
    results: dict[tuple[str, str, str], list[dict]], reference: dict[str, list[dict[str, float | None]]]
) -> str:
    """Markdown: a row per (noise, method, variant) and one reference row per noise; detectors below."""
    lines = [
        "| noise | method | variant | flagged share | precision | recall | F1 | F1 vs cleanlab reference |",
        "|---|---|---|---|---|---|---|---|",
    ]
    detectors: dict[str, Counter[str]] = {}
    for noise, rows in reference.items():
        ref_f1 = statistics.mean(r["f1"] or 0.0 for r in rows)
        lines.append(
            f"| {noise} | **{REFERENCE}** | | {_mean_std([r['flagged_share'] for r in rows])} "
            f"| {_mean_std([r['precision'] for r in rows])} | {_mean_std([r['recall'] for r in rows])} "
            f"| {_mean_std([r['f1'] for r in rows])} | |"
        )
        for (row_noise, method, variant), runs in results.items():
            if row_noise != noise:
                continue
            blocks = [r["label_issues"] for r in runs]
            shares = [b["flagged"] / b["samples"] for b in blocks]
            f1s = [b["f1"] for b in blocks]
            versus = f"{statistics.mean(f or 0.0 for f in f1s) / ref_f1:.2f}x" if ref_f1 else "n/a"
            precision, recall = [b["precision"] for b in blocks], [b["recall"] for b in blocks]
            lines.append(
                f"| {noise} | {method} | {variant} | {_mean_std(shares)} | {_mean_std(precision)} "
                f"| {_mean_std(recall)} | {_mean_std(f1s)} | {versus} |"
            )
            rules = detectors.setdefault(f"{method}@{variant}" if variant else method, Counter())
            rules.update(b["detector"] for b in blocks)
    lines += ["", "| method | detector (how is_label_issue is set), in how many runs |", "|---|---|"]
    for name, rules in detectors.items():
        total = sum(rules.values())
        lines += [f"| {name} | {text} ({count} of {total}) |" for text, count in rules.most_common()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    parser.description = __doc__
    parser.add_argument("--folds", type=int, default=5, help="cross-fitting folds of the cleanlab reference")
    args = parser.parse_args(argv)
    if not args.in_process:
        parser.error("--in-process is required (the cleanlab reference cross-fits CE in this process)")
    if args.folds < 2:
        parser.error("--folds must be at least 2")
    try:
        runs = plan_runs(args)
    except (ValueError, ConfigError) as exc:
        parser.error(str(exc))
    ce_runs = [r for r in runs if r.method == "ce" and r.variant == NO_VARIANT]
    if not ce_runs:
        parser.error("the grid needs a plain ce row (--methods ce@,...): the reference cross-fits its config")
    results = run_grid(args, runs)
    if args.part != (0, 1):
        print(f"[label-issues] part {args.part[0]}/{args.part[1]} done", flush=True)
        return
    reference: dict[str, list[dict[str, float | None]]] = {}
    for run in ce_runs:
        print(f"[label-issues] reference: {args.folds}-fold CE, {run.noise} seed {run.seed}", flush=True)
        reference.setdefault(run.noise, []).append(reference_scores(run, args.folds))
    text = table(results, reference)
    print(text)
    Path(args.output).mkdir(parents=True, exist_ok=True)
    (Path(args.output) / "label_issues_table.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
