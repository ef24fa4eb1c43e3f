"""The run report renders from a finished run directory alone, without Ray, and `raynoisy report` says when a
folder is not a run.

The run directory is synthetic but has a real run's files: metrics.json (a GLC-like two-stage history, the
injected / empirical / estimated transition matrices and the label_issues block computed by the library's
own function), labels.parquet and label_issues.parquet (built by ``build_label_issues``).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raynoisy.cli import run
from raynoisy.methods.label_issues import (
    PRED_PROBS,
    build_label_issues,
    confident_corrections,
    summarize_label_issues,
)
from raynoisy.methods.meta_common import FROM_METHOD, FROM_MODEL
from raynoisy.report import is_run_dir, write_run_report
from raynoisy.report.run_report import _transition_panels, load_run

K = 4
N_TRAIN = 400
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _finished_run(folder: Path, *, true_labels: bool = True, issues: bool = True) -> Path:
    rng = np.random.default_rng(0)
    true = rng.integers(0, K, N_TRAIN)
    flip = rng.random(N_TRAIN) < 0.3
    given = np.where(flip, (true + 1) % K, true)
    ids = np.arange(N_TRAIN, dtype=np.int64) * 3
    folder.mkdir(parents=True)
    known = true if true_labels else np.full(N_TRAIN, -1)
    labels = pa.table(
        {
            "sample_id": pa.array(ids),
            "split": pa.array(["train"] * N_TRAIN),
            "given_label": pa.array(given, pa.int64()),
            "true_label": pa.array(known, pa.int64(), mask=known < 0),
        }
    )
    pq.write_table(labels, folder / "labels.parquet")
    injected = np.eye(K) * 0.7 + np.roll(np.eye(K), 1, axis=1) * 0.3
    empirical = np.zeros((K, K))
    np.add.at(empirical, (true, given), 1)
    empirical /= empirical.sum(axis=1, keepdims=True)
    history = []
    for epoch, stage in enumerate(["noisy", "noisy", "corrected", "corrected"], start=1):
        history.append(
            {
                "epoch": epoch,
                "step": 0,
                "stage": stage,
                "train_loss": 1.5 / epoch,
                "train_gold_loss": 0.4 / epoch,
                "val_accuracy": 0.5 + 0.1 * epoch,
                "test_accuracy": 0.48 + 0.1 * epoch,
                "lr": 0.1 / epoch,
            }
        )
    history.insert(
        2, dict(history[2], epoch=3, step=5, val_accuracy=0.62)
    )  # a step evaluation inside epoch 3
    metrics = {
        "method": "glc",
        "dataset": "synthetic",
        "noise": {"type": "flip", "rate": 0.3, "actual_rate": float(flip.mean()) if true_labels else None},
        "clean_size": 40,
        "train_size": N_TRAIN,
        "val_size": 40,
        "test_size": 80,
        "epochs": 4,
        "best_epoch": 4,
        "test_accuracy": 0.88,
        "best_val_accuracy": 0.9,
        "final_test_accuracy": 0.88,
        "wall_seconds": 12.0,
        "train_samples_per_second": 300.0,
        "workers": 2,
        "compute_precision": "bf16-mixed",
        "seed": 0,
        "num_classes": K,
        "class_names": ["ant", "bee", "cat", "dog"],
        "steps_per_epoch": 10,
        "noise_transition_injected": injected.tolist(),
        "noise_transition_empirical": empirical.tolist() if true_labels else np.zeros((K, K)).tolist(),
        "noise_transition_estimated": (0.9 * injected + 0.1 / K).tolist(),
        "noise_transition_estimated_by": "glc: test",
        "history": history,
    }
    if issues:
        logits = rng.normal(0, 1, (N_TRAIN, K))
        logits[np.arange(N_TRAIN), true] += 3
        probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        table = build_label_issues({"sample_id": ids, "given_label": given, PRED_PROBS: probs})
        pq.write_table(table, folder / "label_issues.parquet")
        metrics["label_issues"] = summarize_label_issues(table, labels)
    (folder / "metrics.json").write_text(json.dumps(metrics))
    return folder


def _images_of(report: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)


def test_the_report_renders_from_a_finished_run(tmp_path):
    folder = _finished_run(tmp_path / "run")
    path = write_run_report(folder)
    assert path == folder / "report.md"
    report = path.read_text()
    images = _images_of(report)
    assert sorted(Path(i).name for i in images) == [
        "curves.png",
        "label_issues.png",
        "noise_transition.png",
        "noisy_classes.png",
    ]
    for image in images:
        data = (folder / image).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 5000, image
    # What a person reads without opening JSON: the headline numbers, the four matrices, the classes.
    assert "test accuracy 0.8800" in report
    for title in ("injected", "empirical", "glc estimate", "from label issues"):
        assert f"**{title}**" in report
    li = json.loads((folder / "metrics.json").read_text())["label_issues"]
    assert f"{li['precision']:.3f} / {li['recall']:.3f} / {li['f1']:.3f}" in report
    assert "dog (3)" in report  # class names in the top-classes table
    assert "| workers / compute precision / seed | 2 / bf16-mixed / 0 |" in report
    assert "`noisy` (0–2) → `corrected` (2–4)" in report


def _with_guard(folder: Path, guard: dict, readings: list[dict]) -> Path:
    """The finished run as a meta method's: the guard's summary, and its readings in the epochs' ends."""
    metrics = json.loads((folder / "metrics.json").read_text())
    metrics["method"], metrics["collapse_guard"] = "mlc", guard
    ends = [h for h in metrics["history"] if h["step"] == 0]
    for entry, reading in zip(ends, readings, strict=True):
        entry.update(reading)
    (folder / "metrics.json").write_text(json.dumps(metrics))
    return folder


def test_the_report_says_what_the_collapse_guard_did(tmp_path):
    def reading(kept: float, fallback: float, undone: float) -> dict:
        return {
            "train_guard_kept": kept,
            "train_guard_class_excess": 0.1,
            "train_guard_model_skill": 0.4,
            "train_guard_fallback": fallback,
            "train_guard_rolled_back": undone,
        }

    guard = {"enabled": True, "fired_epochs": [2, 3], "rolled_back_epochs": [2]}
    readings = [reading(0.9, 0, 0), reading(0.2, 1, 1), reading(0.3, 1, 0), reading(0.8, 0, 0)]
    report = write_run_report(_with_guard(_finished_run(tmp_path / "run"), guard, readings)).read_text()
    section = report.split("## Collapse guard")[1].split("## ")[0]
    assert "collapsed after epoch(s) 2, 3" in section
    assert "undid the main model's training in epoch(s) 2" in section
    assert "ended collapsed" not in section  # epoch 4 read healthy
    assert "| 2 | 0.200 | 0.100 | 0.400 | yes | yes | 0.7000 |" in section  # epoch 2's row, val accuracy last
    table_rows = [line for line in section.splitlines() if line.startswith("| ")]
    assert len(table_rows) == 1 + 4  # the header, one row per epoch end (not the step evaluation)
    # A run that ends collapsed says its meta network's view is not to be trusted; one never fired, so.
    readings[-1] = reading(0.3, 1, 0)
    guard = {"enabled": True, "fired_epochs": [2, 3, 4], "rolled_back_epochs": [2]}
    report = write_run_report(_with_guard(_finished_run(tmp_path / "ended"), guard, readings)).read_text()
    assert "The run ended collapsed" in report
    metrics = json.loads((tmp_path / "ended" / "metrics.json").read_text())
    metrics["label_correction"] = {"corrected_label_accuracy": 0.75, "given_label_accuracy": 0.6}
    metrics["label_correction"]["source"] = FROM_MODEL
    (tmp_path / "ended" / "metrics.json").write_text(json.dumps(metrics))
    report = write_run_report(tmp_path / "ended").read_text()
    assert "| corrected-label accuracy (given) | 0.7500 (0.6000) |" in report
    assert "| corrected labels from | the best-validation model, by confident learning" in report
    # Its label issues now carry corrections, but they are the flags' own: the panel says so.
    issues = pq.read_table(tmp_path / "ended" / "label_issues.parquet")
    index = issues.schema.get_field_index("corrected_label")
    given, predicted, flagged = (
        issues.column(c).to_numpy(zero_copy_only=False)
        for c in ("given_label", "predicted_label", "is_label_issue")
    )
    filled = pa.array(confident_corrections(given, predicted, flagged), pa.int64())
    pq.write_table(
        issues.set_column(index, "corrected_label", filled), tmp_path / "ended" / "label_issues.parquet"
    )
    notes = {title: note for title, _, note in _transition_panels(load_run(tmp_path / "ended"))}
    assert notes["from label issues"] == "flagged samples moved to their predicted label"
    metrics["label_correction"]["source"] = FROM_METHOD
    (tmp_path / "ended" / "metrics.json").write_text(json.dumps(metrics))
    notes = {title: note for title, _, note in _transition_panels(load_run(tmp_path / "ended"))}
    assert notes["from label issues"] == "corrected vs given labels"
    quiet = [reading(0.9, 0, 0)] * 4
    guard = {"enabled": True, "fired_epochs": [], "rolled_back_epochs": []}
    report = write_run_report(_with_guard(_finished_run(tmp_path / "quiet"), guard, quiet)).read_text()
    assert "it never fired" in report
    guard = {"enabled": False, "fired_epochs": []}
    report = write_run_report(_with_guard(_finished_run(tmp_path / "off"), guard, quiet)).read_text()
    assert "Off (`method.params.guard=false`)" in report


def test_a_run_without_true_labels_or_label_issues_still_renders(tmp_path):
    no_truth = write_run_report(_finished_run(tmp_path / "no-truth", true_labels=False)).read_text()
    assert "no true labels are known" in no_truth and "**empirical**" not in no_truth
    assert "— / — / —" in no_truth  # precision / recall / F1 unknown
    old = write_run_report(_finished_run(tmp_path / "old", issues=False)).read_text()
    assert "predates the label-issue table" in old
    assert all((tmp_path / "old" / image).is_file() for image in _images_of(old))


def test_raynoisy_report_renders_without_ray(tmp_path):
    folder = _finished_run(tmp_path / "run")
    code = (
        "import sys; from raynoisy.cli import run; rc = run(['report', sys.argv[1]]); "
        "assert 'ray' not in sys.modules, 'the report imported Ray'; sys.exit(rc)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(folder)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"report: {folder / 'report.md'}"
    assert is_run_dir(folder) and (folder / "report.md").is_file()


def test_raynoisy_report_console_script_exits_0_on_a_run(tmp_path):
    exe = Path(sys.executable).parent / "raynoisy"
    if not exe.exists():
        pytest.skip("the raynoisy console script is not installed in this environment")
    folder = _finished_run(tmp_path / "run")
    result = subprocess.run([str(exe), "report", str(folder)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("kind", ["empty", "missing", "no-history", "not-json", "a-file"])
def test_raynoisy_report_refuses_a_folder_that_is_not_a_run(tmp_path, capsys, kind):
    folder = tmp_path / kind
    if kind == "a-file":
        folder.write_text("x")
    elif kind != "missing":
        folder.mkdir()
    if kind == "no-history":
        (folder / "metrics.json").write_text(json.dumps({"test_accuracy": 0.5}))
    if kind == "not-json":
        (folder / "metrics.json").write_text("{not json\n")
    assert run(["report", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("raynoisy: error: ")
    assert "is not a finished run directory" in err
    assert not (folder / "report.md").exists()
