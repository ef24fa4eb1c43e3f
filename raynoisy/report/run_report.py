"""The run report: ``RUN_DIR/report.md`` and its PNGs in ``RUN_DIR/report/``, from a finished run directory.

What a person wants to know about a run, in the order they ask it: how good is the model (accuracy and
losses per epoch, stages marked, the selected epoch); how wrong were the labels and did the method see how
(the injected, empirical and estimated noise transition matrices side by side); which labels does it say are
wrong and can that be trusted (label-issue precision / recall / F1 where true labels are known, and the
label_score distributions of clean and mislabelled samples); and where the noise is (the classes with the
most estimated noise, next to their actual noise where it is known).

Inputs: ``metrics.json`` (required: it is what makes a directory a run), ``label_issues.parquet`` and
``labels.parquet`` (optional: a section without its input says so). Plots use matplotlib's Agg canvas through
``matplotlib.figure.Figure``, never pyplot, so rendering changes no global backend and needs no display.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from matplotlib.figure import Figure

from raynoisy.errors import RaynoisyError

METRICS = "metrics.json"
LABEL_ISSUES = "label_issues.parquet"
LABELS = "labels.parquet"
REPORT = "report.md"
FIGURES = "report"  # folder of the PNGs, beside report.md
TOP_CLASSES = 10
ANNOTATE_MAX_CLASSES = 12  # heatmap cells carry their value up to this many classes
DPI = 110


def not_a_run(path: str | Path, problem: str) -> RaynoisyError:
    """The error for a folder that holds no finished run (the CLI prints it as one line, exit code 2)."""
    return RaynoisyError(
        f"{path} is not a finished run directory ({problem}); pass the --output folder of a finished "
        "`raynoisy train` run, or of `raynoisy sweep`"
    )


def is_run_dir(path: str | Path) -> bool:
    """Whether ``path`` holds a finished run: a metrics.json with a method and a training history."""
    try:
        _read_metrics(Path(path))
    except RaynoisyError:
        return False
    return True


def _read_metrics(run_dir: Path) -> dict[str, Any]:
    file = run_dir / METRICS
    if not run_dir.is_dir():
        raise not_a_run(run_dir, "no such folder")
    if not file.is_file():
        raise not_a_run(run_dir, f"no {METRICS}")
    try:
        metrics = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise not_a_run(run_dir, f"{METRICS} cannot be read: {exc}") from None
    if (
        not isinstance(metrics, dict)
        or "method" not in metrics
        or not isinstance(metrics.get("history"), list)
    ):
        raise not_a_run(run_dir, f"{METRICS} has no method and training history")
    return metrics


@dataclass
class RunData:
    """Everything the report shows, read once from the run directory."""

    metrics: dict[str, Any]
    issues: pd.DataFrame | None  # label_issues.parquet joined with true_label (-1 unknown)
    detector: str | None
    num_classes: int
    class_names: list[str]

    @property
    def has_truth(self) -> bool:
        return self.issues is not None and bool((self.issues["true_label"] >= 0).any())

    def class_name(self, c: int) -> str:
        return self.class_names[c] if 0 <= c < len(self.class_names) else str(c)

    def class_label(self, c: int) -> str:
        """The class's name and index ("dog (3)"), or the index alone when the name is the index."""
        name = self.class_name(c)
        return name if name == str(c) else f"{name} ({c})"


def load_run(run_dir: str | Path) -> RunData:
    """Read a finished run directory; raises ``not_a_run``'s error if it is none."""
    run_dir = Path(run_dir)
    metrics = _read_metrics(run_dir)
    issues, detector = None, None
    if (run_dir / LABEL_ISSUES).is_file():
        table = pq.read_table(run_dir / LABEL_ISSUES)
        raw = (table.schema.metadata or {}).get(b"raynoisy.label_issues.detector")
        detector = raw.decode() if raw else None
        issues = table.to_pandas()
        issues["true_label"] = -1
        if (run_dir / LABELS).is_file():
            labels = pq.read_table(run_dir / LABELS, columns=["sample_id", "true_label"]).to_pandas()
            true = labels.set_index("sample_id")["true_label"].fillna(-1).astype(np.int64)
            issues["true_label"] = true.reindex(issues["sample_id"], fill_value=-1).to_numpy()
    k = _num_classes(metrics, issues)
    names = metrics.get("class_names") or [str(c) for c in range(k)]
    return RunData(metrics, issues, detector, k, [str(n) for n in names])


def _num_classes(metrics: dict[str, Any], issues: pd.DataFrame | None) -> int:
    if metrics.get("num_classes"):
        return int(metrics["num_classes"])
    for key in ("noise_transition_empirical", "noise_transition_injected"):
        if metrics.get(key):
            return len(metrics[key])
    if issues is not None and len(issues):
        return int(max(issues["given_label"].max(), issues["predicted_label"].max())) + 1
    return 0


def report_finished_run(run_dir: str | Path, log: Callable[[str], None] = print) -> None:
    """report.md at the end of a run (``raynoisy train``, a sweep trial). A run whose report fails still
    succeeds: its outputs are written, and a report can be rebuilt where a lost run cannot."""
    try:
        log(f"report: {write_run_report(run_dir)}")
    except Exception as exc:
        log(f"report.md not written ({exc!r}); rebuild it with: raynoisy report {run_dir}")


def write_run_report(run_dir: str | Path) -> Path:
    """Write ``report.md`` and its PNGs into ``run_dir``; returns the path of report.md."""
    run_dir = Path(run_dir)
    run = load_run(run_dir)
    figures = run_dir / FIGURES
    figures.mkdir(exist_ok=True)
    sections = [
        _header(run),
        _curves_section(run, figures),
        _transition_section(run, figures),
        _label_issue_section(run, figures),
        _classes_section(run, figures),
        _guard_section(run),
        _files_section(run_dir),
    ]
    path = run_dir / REPORT
    path.write_text("\n\n".join(s.strip() for s in sections if s) + "\n")
    return path


# --- formatting helpers ---


def _num(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _pct(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    return f"{100 * value:.1f}%"


def _float(value: Any) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else math.nan


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _save(fig: Figure, path: Path) -> str:
    fig.savefig(path, dpi=DPI)
    return f"{FIGURES}/{path.name}"


# --- sections ---


def _header(run: RunData) -> str:
    m = run.metrics
    noise = m.get("noise") or {}
    li = m.get("label_issues") or {}
    lines = [f"# Run report: `{m['method']}` on `{m.get('dataset', '?')}`", ""]
    noise_text = f"noise `{noise.get('type', '?')}` at nominal rate {_num(noise.get('rate'), 2)}"
    if noise.get("actual_rate") is not None:
        noise_text += f" (actual {_pct(noise['actual_rate'])} of training labels wrong)"
    lines.append(
        f"{m['method']} trained on {m.get('train_size', '?')} noisy training samples"
        f" ({m.get('clean_size', 0)} trusted, {m.get('val_size', '?')} validation, {m.get('test_size', '?')}"
        f" test) with {noise_text}, for {m.get('epochs', '?')} epochs on {m.get('workers', '?')} worker(s)."
    )
    lines.append(
        f"The reported model is the best-validation one (epoch {m.get('best_epoch', '?')}, validation"
        f" accuracy {_num(m.get('best_val_accuracy'))}): **test accuracy {_num(m.get('test_accuracy'))}**;"
        f" the last epoch's model reaches {_num(m.get('final_test_accuracy'))}."
    )
    if li:
        text = f"It flags {_pct(li.get('estimated_noise_rate'))} of the training labels as wrong"
        if li.get("true_noise_rate") is not None:
            text += (
                f" (truly wrong: {_pct(li['true_noise_rate'])}); of the flagged labels"
                f" {_pct(li.get('precision'))} are truly wrong (precision) and it finds"
                f" {_pct(li.get('recall'))} of the wrong ones (recall), F1 {_num(li.get('f1'), 3)}."
            )
        else:
            text += "; no true labels are known, so how many of them are right cannot be measured."
        lines.append(text)
    lines += ["", _table(["", ""], _facts(m))]
    return "\n".join(lines)


# metrics.json's label_correction.source (raynoisy.methods.meta_common.FROM_METHOD / FROM_MODEL), in words.
CORRECTION_SOURCES = {
    "method": "the method",
    "model": "the best-validation model, by confident learning "
    "(the collapse guard rejected the method's labels)",
}


def _facts(m: dict[str, Any]) -> list[list[str]]:
    noise = m.get("noise") or {}
    rows = [
        ["method / data set", f"{m['method']} / {m.get('dataset', '?')}"],
        [
            "noise (nominal → actual)",
            f"{noise.get('type', '?')} {_num(noise.get('rate'), 2)} → {_pct(noise.get('actual_rate'))}",
        ],
        [
            "train / trusted / val / test",
            f"{m.get('train_size', '?')} / {m.get('clean_size', 0)} / "
            f"{m.get('val_size', '?')} / {m.get('test_size', '?')}",
        ],
        [
            "test accuracy (best-val epoch)",
            f"{_num(m.get('test_accuracy'))} (epoch {m.get('best_epoch', '?')})",
        ],
        ["best validation accuracy", _num(m.get("best_val_accuracy"))],
        ["final-epoch test accuracy", _num(m.get("final_test_accuracy"))],
        ["wall time", f"{_num(m.get('wall_seconds'), 0)} s"],
        ["training throughput", f"{_num(m.get('train_samples_per_second'), 0)} samples/s"],
        [
            "workers / compute precision / seed",
            f"{m.get('workers', '?')} / {m.get('compute_precision', 'fp32')} / {m.get('seed', '?')}",
        ],
    ]
    lc = m.get("label_correction")
    if lc and lc.get("corrected_label_accuracy") is not None:
        rows.append(
            [
                "corrected-label accuracy (given)",
                f"{_num(lc['corrected_label_accuracy'])} ({_num(lc.get('given_label_accuracy'))})",
            ]
        )
    if lc and lc.get("source"):  # absent from runs before the guard's fallback rebuilt the export
        rows.append(["corrected labels from", CORRECTION_SOURCES.get(lc["source"], str(lc["source"]))])
    return rows


# --- training curves ---


def _epoch_positions(history: list[dict[str, Any]], steps_per_epoch: int | None) -> np.ndarray:
    """x of each evaluation in epochs: an epoch's end at its number, a step evaluation inside the epoch."""
    xs = []
    for h in history:
        epoch, step = _float(h.get("epoch")), int(h.get("step") or 0)
        xs.append(epoch - 1 + step / steps_per_epoch if step and steps_per_epoch else epoch)
    return np.asarray(xs, dtype=float)


def _stage_spans(history: list[dict[str, Any]], xs: np.ndarray) -> list[tuple[str, float, float]]:
    """(stage, start, end) of each run of evaluations in one stage, in epochs (a stage starts one epoch before
    its first evaluation)."""
    spans: list[tuple[str, float, float]] = []
    for h, x in zip(history, xs, strict=True):
        stage = str(h.get("stage", ""))
        if spans and spans[-1][0] == stage:
            spans[-1] = (stage, spans[-1][1], x)
        else:
            start = spans[-1][2] if spans else min(0.0, x - 1)
            spans.append((stage, start, x))
    return spans


def _mark_stages(ax, spans: list[tuple[str, float, float]], label: bool) -> None:
    for i, (stage, start, end) in enumerate(spans):
        ax.axvspan(start, end, color=("#f0f0f0" if i % 2 == 0 else "#dde8f5"), zorder=0)
        if label:
            ax.text(
                (start + end) / 2,
                1.01,
                stage,
                transform=ax.get_xaxis_transform(),
                ha="center",
                va="bottom",
                fontsize=8,
                color="#444",
            )


def _curves_section(run: RunData, figures: Path) -> str:
    history = run.metrics["history"]
    if not history:
        return "## Training curves\n\nThe run recorded no evaluation."
    xs = _epoch_positions(history, run.metrics.get("steps_per_epoch"))
    spans = _stage_spans(history, xs)
    best = run.metrics.get("best_epoch")
    loss_keys = sorted({k for h in history for k in h if k.startswith("train_") and "loss" in k})
    fig = Figure(figsize=(13, 3.8), layout="constrained")
    ax_acc, ax_loss, ax_lr = fig.subplots(1, 3)
    for ax, title in ((ax_acc, "accuracy"), (ax_loss, "training losses"), (ax_lr, "learning rate")):
        _mark_stages(ax, spans, label=True)
        ax.set_xlabel("epoch")
        ax.set_title(title, pad=14)
        ax.grid(alpha=0.3)
    for key, style in (("val_accuracy", "o-"), ("test_accuracy", "s--")):
        ys = np.array([_float(h.get(key)) for h in history])
        if np.isfinite(ys).any():
            ax_acc.plot(xs, ys, style, label=key.replace("_accuracy", ""), markersize=4)
    if isinstance(best, int | float) and best > 0:
        ax_acc.axvline(best, color="tab:red", linestyle=":", label=f"selected (epoch {best})")
    ax_acc.legend(fontsize=8)
    for key in loss_keys:
        ys = np.array([_float(h.get(key)) for h in history])
        if np.isfinite(ys).any():
            ax_loss.plot(xs, ys, "o-", label=key.removeprefix("train_"), markersize=4)
    if loss_keys:
        ax_loss.legend(fontsize=8)
    ax_lr.plot(xs, [_float(h.get("lr")) for h in history], "o-", markersize=4)
    image = _save(fig, figures / "curves.png")
    rows = [
        [
            _num(h.get("epoch")) + (f" (step {h['step']})" if h.get("step") else ""),
            h.get("stage", ""),
            _num(h.get("train_loss")),
            _num(h.get("val_accuracy")),
            _num(h.get("test_accuracy")),
            "**selected**" if h.get("epoch") == best and not h.get("step") else "",
        ]
        for h in history
    ]
    stages = " → ".join(f"`{s}` ({_num(a, 0)}–{_num(b, 0)})" for s, a, b in spans) if spans else ""
    return "\n".join(
        [
            "## Training curves",
            "",
            f"![accuracy, losses and learning rate per epoch]({image})",
            "",
            f"Stages: {stages}. Accuracy is measured on the validation and test splits after each epoch; the"
            " red line marks the best-validation epoch, whose model is reported. The loop records training"
            " losses (the mean over the epoch's steps) but neither a training accuracy nor validation or test"
            " losses.",
            "",
            _table(["epoch", "stage", "train loss", "val acc", "test acc", ""], rows),
        ]
    )


# --- noise transition ---


def label_issue_transition(issues: pd.DataFrame, k: int) -> np.ndarray:
    """p(given | estimated true) from label_issues: the estimated true class of a sample is its corrected
    label where the method has one, else the predicted label where it is flagged, else the given label."""
    corrected = issues["corrected_label"]
    estimate = np.where(
        corrected.notna(),
        corrected.fillna(-1).to_numpy(dtype=np.int64),
        np.where(issues["is_label_issue"], issues["predicted_label"], issues["given_label"]),
    ).astype(np.int64)
    return _row_normalised(estimate, issues["given_label"].to_numpy(dtype=np.int64), k)


def _row_normalised(rows: np.ndarray, cols: np.ndarray, k: int) -> np.ndarray:
    ok = (rows >= 0) & (rows < k) & (cols >= 0) & (cols < k)
    counts = np.bincount(rows[ok] * k + cols[ok], minlength=k * k).reshape(k, k).astype(float)
    totals = counts.sum(axis=1, keepdims=True)
    return np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)


def _transition_panels(run: RunData) -> list[tuple[str, np.ndarray, str]]:
    m, k = run.metrics, run.num_classes
    panels = []
    if m.get("noise_transition_injected") is not None:
        panels.append(
            ("injected", np.asarray(m["noise_transition_injected"], float), "the noise protocol's matrix")
        )
    empirical = m.get("noise_transition_empirical")
    if empirical is not None and np.asarray(empirical, float).sum() > 0:
        panels.append(("empirical", np.asarray(empirical, float), "counted from true and given labels"))
    if m.get("noise_transition_estimated") is not None:
        by = m.get("noise_transition_estimated_by") or f"{m['method']}'s own estimate"
        panels.append((f"{m['method']} estimate", np.asarray(m["noise_transition_estimated"], float), by))
    if run.issues is not None and k:
        has_corrected = bool(run.issues["corrected_label"].notna().any())
        from_model = (m.get("label_correction") or {}).get("source") == "model"
        how = (
            "corrected vs given labels"
            if has_corrected and not from_model
            else "flagged samples moved to their predicted label"
        )
        panels.append(("from label issues", label_issue_transition(run.issues, k), how))
    return [(t, mat, note) for t, mat, note in panels if mat.shape == (k, k)]


def _transition_section(run: RunData, figures: Path) -> str:
    panels = _transition_panels(run)
    if not panels:
        return "## Noise transition\n\nNo transition matrix was recorded for this run."
    k = run.num_classes
    fig = Figure(figsize=(3.9 * len(panels) + 0.8, 4.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(panels)))
    image_artist = None
    for ax, (title, mat, note) in zip(axes, panels, strict=True):
        image_artist = ax.imshow(mat, vmin=0, vmax=1, cmap="viridis")
        ax.set_title(f"{title}\n({note})", fontsize=9)
        ax.set_xlabel("given label")
        ax.set_ylabel("true label")
        ticks = np.arange(k) if k <= 20 else np.linspace(0, k - 1, 6).astype(int)
        ax.set_xticks(ticks)
        ax.set_yticks(ticks)
        if k <= ANNOTATE_MAX_CLASSES:
            for i in range(k):
                for j in range(k):
                    if mat[i, j] >= 0.005:
                        ax.text(
                            j,
                            i,
                            f"{mat[i, j]:.2f}".lstrip("0"),
                            ha="center",
                            va="center",
                            fontsize=7,
                            color="white" if mat[i, j] < 0.6 else "black",
                        )
    fig.colorbar(image_artist, ax=list(axes), shrink=0.85, label="p(given | true)")
    image = _save(fig, figures / "noise_transition.png")
    lines = [
        "## Noise transition",
        "",
        f"![noise transition matrices]({image})",
        "",
        "Each matrix is p(given label | true label): row = true class, column = label training saw; a clean"
        " data set is the identity. " + ", ".join(f"**{t}**: {note}" for t, _, note in panels) + ".",
    ]
    reference = next((mat for t, mat, _ in panels if t == "empirical"), None)
    if reference is not None:
        rows = [
            [
                t,
                _pct(float(1 - np.diag(mat).mean())),
                _num(float(np.abs(mat - reference).sum(axis=1).mean()), 3),
            ]
            for t, mat, _ in panels
        ]
        lines += [
            "",
            _table(["matrix", "mean off-diagonal mass per class", "mean row L1 distance to empirical"], rows),
        ]
    return "\n".join(lines)


# --- label issues ---


def _label_issue_section(run: RunData, figures: Path) -> str:
    li = run.metrics.get("label_issues")
    if run.issues is None or not li:
        return "## Label issues\n\nThis run has no label_issues.parquet (it predates the label-issue table)."
    issues = run.issues
    fig = Figure(figsize=(11, 3.6), layout="constrained")
    ax_bar, ax_hist = fig.subplots(1, 2)
    names = ["estimated\nnoise rate", "true\nnoise rate", "precision", "recall", "F1"]
    values = [
        _float(li.get(key))
        for key in ("estimated_noise_rate", "true_noise_rate", "precision", "recall", "f1")
    ]
    colors = ["tab:orange", "tab:gray", "tab:blue", "tab:blue", "tab:blue"]
    bars = ax_bar.bar(names, np.nan_to_num(values), color=colors)
    for bar, value in zip(bars, values, strict=True):
        ax_bar.text(
            bar.get_x() + bar.get_width() / 2,
            bar.get_height() + 0.01,
            "n/a" if math.isnan(value) else f"{value:.2f}",
            ha="center",
            fontsize=8,
        )
    ax_bar.set_ylim(0, 1.1)
    ax_bar.set_title("is_label_issue against given ≠ true" if run.has_truth else "estimated noise rate")
    bins = np.linspace(0, 1, 41)
    if run.has_truth:
        known = issues[issues["true_label"] >= 0]
        wrong = known["given_label"] != known["true_label"]
        ax_hist.hist(
            known.loc[~wrong, "label_score"], bins=bins, alpha=0.6, label="truly clean", color="tab:green"
        )
        ax_hist.hist(
            known.loc[wrong, "label_score"], bins=bins, alpha=0.6, label="truly mislabelled", color="tab:red"
        )
    else:
        ax_hist.hist(issues["label_score"], bins=bins, alpha=0.7, label="all samples", color="tab:gray")
    ax_hist.hist(
        issues.loc[issues["is_label_issue"], "label_score"],
        bins=bins,
        histtype="step",
        color="black",
        label="flagged",
    )
    ax_hist.set_xlabel("label_score (lower = more likely wrong)")
    ax_hist.set_ylabel("training samples")
    ax_hist.set_title("label_score distribution")
    ax_hist.legend(fontsize=8)
    image = _save(fig, figures / "label_issues.png")
    rows = [
        ["training samples", li.get("samples")],
        ["flagged (is_label_issue)", f"{li.get('flagged')} ({_pct(li.get('estimated_noise_rate'))})"],
        ["samples with a known true label", li.get("samples_with_true_label")],
        ["truly mislabelled among them", _pct(li.get("true_noise_rate"))],
        [
            "precision / recall / F1",
            f"{_num(li.get('precision'), 3)} / {_num(li.get('recall'), 3)} / {_num(li.get('f1'), 3)}",
        ],
    ]
    worst = issues.nsmallest(5, "label_score")
    examples = [
        [
            int(r.sample_id),
            run.class_name(int(r.given_label)),
            run.class_name(int(r.predicted_label)),
            f"{r.label_score:.3f}",
            "yes" if r.is_label_issue else "no",
            "—" if r.true_label < 0 else run.class_name(int(r.true_label)),
        ]
        for r in worst.itertuples()
    ]
    return "\n".join(
        [
            "## Label issues",
            "",
            f"![label-issue precision and recall, label_score distributions]({image})",
            "",
            f"`label_issues.parquet` has one row per training sample (cleanlab Datalab's columns). Rule: "
            f"{run.detector or li.get('detector') or 'not recorded'}.",
            "",
            _table(["", ""], rows),
            "",
            "The five labels the run trusts least:",
            "",
            _table(["sample_id", "given", "predicted", "label_score", "flagged", "true"], examples),
        ]
    )


# --- classes ---


def class_noise(issues: pd.DataFrame, k: int) -> pd.DataFrame:
    """Per given class: samples, fraction flagged (estimated noise) and fraction truly wrong (NaN unknown)."""
    given = issues["given_label"].to_numpy(dtype=np.int64)
    flagged = issues["is_label_issue"].to_numpy(dtype=bool)
    true = issues["true_label"].to_numpy(dtype=np.int64)
    known = true >= 0
    samples = np.bincount(given, minlength=k)[:k]
    n_flagged = np.bincount(given[flagged], minlength=k)[:k]
    n_known = np.bincount(given[known], minlength=k)[:k]
    n_wrong = np.bincount(given[known & (given != true)], minlength=k)[:k]
    with np.errstate(invalid="ignore", divide="ignore"):
        return pd.DataFrame(
            {
                "class": np.arange(k),
                "samples": samples,
                "estimated_noise": np.where(samples > 0, n_flagged / np.maximum(samples, 1), np.nan),
                "true_noise": np.where(n_known > 0, n_wrong / np.maximum(n_known, 1), np.nan),
            }
        )


def _classes_section(run: RunData, figures: Path) -> str:
    if run.issues is None or not run.num_classes:
        return ""
    table = class_noise(run.issues, run.num_classes)
    top = table[table["samples"] > 0].sort_values("estimated_noise", ascending=False).head(TOP_CLASSES)
    if top.empty:
        return ""
    fig = Figure(figsize=(7, 0.45 * len(top) + 1.4), layout="constrained")
    ax = fig.subplots()
    y = np.arange(len(top))[::-1]
    labels = [run.class_label(int(c)) for c in top["class"]]
    ax.barh(y + 0.2, top["estimated_noise"], height=0.4, color="tab:orange", label="estimated (flagged)")
    if run.has_truth:
        ax.barh(
            y - 0.2, top["true_noise"].fillna(0), height=0.4, color="tab:gray", label="actual (given ≠ true)"
        )
    ax.set_yticks(y)
    ax.set_yticklabels(labels, fontsize=8)
    ax.set_xlim(0, 1)
    ax.set_xlabel("fraction of the samples labelled with the class")
    ax.set_title(f"top {len(top)} classes by estimated noise")
    ax.legend(fontsize=8, loc="lower right")
    image = _save(fig, figures / "noisy_classes.png")
    rows = [
        [
            run.class_label(int(r["class"])),
            int(r["samples"]),
            _pct(r["estimated_noise"]),
            _pct(r["true_noise"]),
        ]
        for _, r in top.iterrows()
    ]
    return "\n".join(
        [
            "## Classes with the most estimated noise",
            "",
            f"![classes by estimated noise]({image})",
            "",
            "Per class: of the training samples labelled with it, the fraction the run flags, next to the"
            " fraction whose true label differs where true labels are known.",
            "",
            _table(["class", "samples labelled", "flagged", "actually wrong"], rows),
        ]
    )


# --- collapse guard ---

GUARD_COLUMNS = {  # history key -> column: the readings of raynoisy.methods.collapse_guard
    "train_guard_kept": "trusted labels kept",
    "train_guard_class_excess": "class excess",
    "train_guard_separation": "weight separation",
    "train_guard_model_skill": "model skill",
    "train_guard_fallback": "next epoch on given labels",
    "train_guard_rolled_back": "epoch undone",
}


def _epochs_text(epochs: Sequence[int]) -> str:
    return ", ".join(str(e) for e in epochs)


def _guard_section(run: RunData) -> str:
    """What the collapse guard read and did, per epoch: a run whose meta network collapsed says so here."""
    guard = run.metrics.get("collapse_guard")
    if guard is None:
        return ""
    if not guard.get("enabled"):
        return (
            "## Collapse guard\n\nOff (`method.params.guard=false`): the meta network steered every epoch"
            " unchecked."
        )
    fired, undone = guard.get("fired_epochs", []), guard.get("rolled_back_epochs", [])
    ends = [h for h in run.metrics["history"] if not h.get("step") and "train_guard_fallback" in h]
    read = f"The guard read the meta network and the main model on the trusted set after {len(ends)} epoch(s)"
    if not ends:
        text = "The guard had nothing to read: no epoch ended with the meta network steering (all warm-up)."
    elif fired:
        text = (
            f"{read} and found it collapsed after epoch(s) {_epochs_text(fired)}; each following epoch"
            " trained the main model on the given labels."
        )
        if undone:
            text += (
                f" It undid the main model's training in epoch(s) {_epochs_text(undone)} (back to its state"
                " at the start of the epoch)."
            )
        if ends[-1]["train_guard_fallback"]:
            text += (
                " The run ended collapsed: its meta network's labels or weights are not a view to trust,"
                " so its label issues, and the corrected labels where the method exports them, come from"
                " the best-validation model's predictions (confident learning)."
            )
    else:
        text = f"{read}; it never fired."
    columns = [key for key in GUARD_COLUMNS if any(key in h for h in ends)]

    def cell(key: str, value: Any) -> str:
        if key in ("train_guard_fallback", "train_guard_rolled_back"):
            return "" if value is None else ("yes" if value else "no")
        return _num(value if value is None else float(value), 3)

    rows = [
        [h.get("epoch", "?"), *(cell(key, h.get(key)) for key in columns), _num(h.get("val_accuracy"))]
        for h in ends
    ]
    lines = ["## Collapse guard", "", text]
    if rows:
        lines += ["", _table(["epoch", *(GUARD_COLUMNS[k] for k in columns), "val accuracy"], rows)]
    return "\n".join(lines)


def _files_section(run_dir: Path) -> str:
    known = {
        METRICS: "every number in this report, and the per-epoch history",
        LABEL_ISSUES: "per training sample: given and predicted label, label_score, is_label_issue, "
        "corrected_label",
        LABELS: "per sample: split, given label, true label (null where unknown)",
        "corrected_labels.parquet": "the corrected labels and soft labels (whose: metrics.json's "
        "label_correction.source)",
        "sample_weights.parquet": "MW-Net's per-sample loss and weight",
        "model.pt": "best-validation model weights",
        "config.json": "the resolved config of the run",
        "tensorboard": "TensorBoard event files",
    }
    rows = [[f"`{name}`", what] for name, what in known.items() if (run_dir / name).exists()]
    return "## Files\n\n" + _table(["file", "what"], rows)
