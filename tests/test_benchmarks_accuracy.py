"""benchmarks/accuracy.py: the table, variant rows, and when a cached run is reused.

No Ray: ``train`` (the function that starts Ray Train) is replaced by a fake that writes what the driver
writes into ``run.output`` (config.json, metrics.json) and records which configs it was asked to train.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from benchmark_scripts import load_benchmark

from raynoisy.train.prepare import RECORDS_EVERY_PARAM, config_record


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """The benchmark with a fake ``train``; ``bench.trained`` lists the configs it trained, in order."""
    module = load_benchmark("accuracy")
    module.trained = []

    def fake_train(cfg) -> dict:
        out = Path(cfg.run.output)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(config_record(cfg), indent=1))  # as the driver does
        module.trained.append(cfg)
        acc = 0.5 + cfg.optim.lr + cfg.optim.epochs / 100 + cfg.run.seed / 1000
        metrics = {"test_accuracy": acc, "final_test_accuracy": acc - 0.01, "epochs": cfg.optim.epochs}
        (out / "metrics.json").write_text(json.dumps(metrics))
        return metrics

    monkeypatch.setattr(module, "train", fake_train)
    return module


def bench_args(output: Path, *extra: str) -> list[str]:
    """A digits grid: sklearn's bundled data set, so no data root is needed and nothing is read."""
    return ["--dataset", "digits", "--clean-per-class", "10", "--output", str(output), *extra]


def run(bench: ModuleType, argv: list[str]) -> tuple[list, dict]:
    """One grid; returns the configs it trained and the metrics it reported per row."""
    start = len(bench.trained)
    results = bench.run_grid(bench.build_parser().parse_args(argv))
    trained = bench.trained[start:]
    bench.main(argv)  # the CLI path as well: everything is cached by now, so it trains nothing
    assert len(bench.trained) == start + len(trained)
    return trained, results


def test_identical_config_is_reused(bench: ModuleType, tmp_path: Path) -> None:
    argv = bench_args(
        tmp_path, "--methods", "ce", "--noise", "uniform:0.4", "--seeds", "0,1", "--epochs", "2"
    )
    first, results = run(bench, argv)
    assert [c.run.seed for c in first] == [0, 1]
    again, results_again = run(bench, argv)
    assert again == []  # both seeds reused, also by main's second pass
    assert results_again == results
    # fields that do not change results are not part of the key
    quiet = [*argv, "--set", "run.log_every_steps=7", "--set", "run.tensorboard=false"]
    assert run(bench, quiet)[0] == []
    # one run directory per seed, named by the config's hash, each with the config it was trained with
    dirs = sorted(p for p in tmp_path.iterdir() if p.is_dir())
    assert [d.name.rsplit("-", 1)[0] for d in dirs] == ["ce-uniform0.4-seed0", "ce-uniform0.4-seed1"]
    for d in dirs:
        saved = json.loads((d / "config.json").read_text())
        assert d.name.endswith(bench.config_hash(saved))
        assert saved["optim"]["epochs"] == 2
    assert (tmp_path / "table.md").exists()


@pytest.mark.parametrize(
    "change",
    [["--epochs", "3"], ["--set", "optim.lr=0.2"], ["--clean-per-class", "5"]],
    ids=["epochs", "set", "clean-per-class"],
)
def test_different_config_is_not_reused(bench: ModuleType, tmp_path: Path, change: list[str]) -> None:
    argv = bench_args(tmp_path, "--methods", "ce", "--noise", "uniform:0.4", "--seeds", "0", "--epochs", "2")
    run(bench, argv)
    trained, results = run(bench, [*argv, *change])
    assert len(trained) == 1  # trained again, into a directory of its own
    cfg = trained[0]
    if change[0] == "--epochs":
        assert cfg.optim.epochs == 3 and results[("uniform:0.4", "ce", "")][0]["epochs"] == 3
    if change[0] == "--set":
        assert cfg.optim.lr == 0.2
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 2
    # and the first config is still cached in its own directory
    assert run(bench, argv)[0] == []


def test_stale_run_in_the_same_directory_is_rerun(bench: ModuleType, tmp_path: Path) -> None:
    """A metrics.json whose config.json does not match (edited, or an older run) is not reused."""
    argv = bench_args(tmp_path, "--methods", "ce", "--noise", "uniform:0.4", "--seeds", "0", "--epochs", "2")
    run(bench, argv)
    (out,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    saved = json.loads((out / "config.json").read_text())
    saved["optim"]["epochs"] = 9
    (out / "config.json").write_text(json.dumps(saved))
    trained, _ = run(bench, argv)
    assert len(trained) == 1 and trained[0].optim.epochs == 2
    assert (out / "metrics.stale.json").exists()
    # a metrics.json without the config.json it was trained with is not reused either
    (out / "config.json").unlink()
    assert len(run(bench, argv)[0]) == 1


def test_a_run_trained_under_another_default_is_rerun(bench: ModuleType, tmp_path: Path) -> None:
    """config.json records every method param with its default, so a cached run whose recorded value is not
    this code's default (trained before the default changed), or whose record lacks a param (trained before
    it was added), is trained again; a config.json that names only the params set (written before the
    defaults were recorded) still matches on those."""
    argv = bench_args(tmp_path, "--methods", "mlc", "--noise", "uniform:0.4", "--seeds", "0", "--epochs", "2")
    run(bench, argv)
    (out,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    saved = json.loads((out / "config.json").read_text())
    assert saved["method"]["params"]["skip"] is False and saved["method"]["params"]["meta_lr"] == 3e-4
    saved["method"]["params"]["skip"] = True  # as if skip's default had been True when it trained
    (out / "config.json").write_text(json.dumps(saved))
    trained, _ = run(bench, argv)
    assert len(trained) == 1 and trained[0].method.params.get("skip") is None
    assert (out / "metrics.stale.json").exists()
    saved = json.loads((out / "config.json").read_text())
    del saved["method"]["params"]["guard_min_model_skill"]  # as if trained before the param existed
    (out / "config.json").write_text(json.dumps(saved))
    assert len(run(bench, argv)[0]) == 1
    saved = json.loads((out / "config.json").read_text())
    saved["method"]["params"] = {}
    del saved[RECORDS_EVERY_PARAM]  # as the driver wrote it before it recorded every param
    (out / "config.json").write_text(json.dumps(saved))
    assert run(bench, argv)[0] == []


def test_variants_are_separate_rows(bench: ModuleType, tmp_path: Path, capsys) -> None:
    argv = bench_args(
        tmp_path,
        *("--methods", "ce@,mlc", "--noise", "uniform:0.4", "--seeds", "0", "--epochs", "2"),
        *("--set", "optim.lr=0.01"),
        *("--variant", "plain", "--variant", "skip:method.params.skip=true"),
        *("--variant", "skip:optim.lr=0.05", "--variant", "lr=0.1:optim.lr=0.1"),
    )
    trained, results = run(bench, argv)
    assert list(results) == [
        ("uniform:0.4", "ce", ""),
        ("uniform:0.4", "mlc", "plain"),
        ("uniform:0.4", "mlc", "skip"),
        ("uniform:0.4", "mlc", "lr=0.1"),
    ]
    by_row = {(c.method.name, c.method.params.get("skip"), c.optim.lr) for c in trained}
    # The plain rows leave skip to MLCParams' default (presets carry only what differs from it).
    assert by_row == {("ce", None, 0.01), ("mlc", None, 0.01), ("mlc", True, 0.05), ("mlc", None, 0.1)}
    assert len({c.run.output for c in trained}) == 4
    rows = capsys.readouterr().out.split("| noise |")[-1].splitlines()[2:]
    assert [r.split(" | ")[1:3] for r in rows] == [
        ["ce", ""],
        ["mlc", "plain"],
        ["mlc", "skip"],
        ["mlc", "lr=0.1"],
    ]


def test_variant_syntax_and_rows() -> None:
    bench = load_benchmark("accuracy")
    assert bench.parse_variant("k5:method.params.skip=true optim.lr=0.1") == (
        "k5",
        ["method.params.skip=true", "optim.lr=0.1"],
    )
    assert bench.parse_variant("base") == ("base", [])
    assert bench.parse_variant("m:optim.milestones='[3, 6]'") == ("m", ["optim.milestones=[3, 6]"])
    for bad in ("a b:optim.lr=1", "k:optim.lr", ":optim.lr=1", "a@b:optim.lr=1"):
        with pytest.raises(argparse.ArgumentTypeError):
            bench.parse_variant(bad)
    variants = {"a": ["optim.lr=0.1"], "b": []}
    assert bench.parse_rows("ce@,mlc,mwnet@b", variants) == [
        ("ce", ""),
        ("mlc", "a"),
        ("mlc", "b"),
        ("mwnet", "b"),
    ]
    assert bench.parse_rows("ce,glc", {}) == [("ce", ""), ("glc", "")]
    with pytest.raises(ValueError, match="no --variant named 'c'"):
        bench.parse_rows("ce@c", variants)
    with pytest.raises(ValueError, match="used by no --methods entry"):
        bench.parse_rows("ce@a", variants)


def test_config_errors_stop_the_grid_before_any_run(bench: ModuleType, tmp_path: Path, capsys) -> None:
    """An invalid config in the last row fails at planning time, before the first row trains."""
    argv = bench_args(
        tmp_path,
        *("--methods", "ce@,mlc@bad", "--noise", "uniform:0.4", "--seeds", "0", "--epochs", "2"),
        *("--variant", "bad:optim.lr=-1"),
    )
    with pytest.raises(SystemExit) as exit_info:
        bench.main(argv)
    assert exit_info.value.code == 2 and "optim.lr" in capsys.readouterr().err
    assert bench.trained == []


def test_table_rows_deltas_and_label_quality() -> None:
    bench = load_benchmark("accuracy")
    results = {
        ("flip:0.4", "ce", ""): [
            {"test_accuracy": 0.80, "final_test_accuracy": 0.78},
            {"test_accuracy": 0.84, "final_test_accuracy": 0.80},
        ],
        ("flip:0.4", "mlc", ""): [
            {
                "test_accuracy": 0.85,
                "label_correction": {"corrected_label_accuracy": 0.9, "given_label_accuracy": 0.6},
            },
            {
                "test_accuracy": 0.87,
                "label_correction": {"corrected_label_accuracy": 0.8, "given_label_accuracy": 0.6},
                "collapse_guard": {"enabled": True, "fired_epochs": [1, 2], "rolled_back_epochs": [1]},
            },
        ],
        ("flip:0.4", "metalabelnet", ""): [
            {
                "test_accuracy": 0.5,
                "label_correction": {"corrected_label_accuracy": 0.3, "given_label_accuracy": 0.6},
                "collapse_guard": {"enabled": True, "fired_epochs": []},
            },
            {
                "test_accuracy": 0.5,
                "label_correction": {"corrected_label_accuracy": 0.3, "given_label_accuracy": 0.6},
                "collapse_guard": {"enabled": True, "fired_epochs": [3]},
            },
            {
                "test_accuracy": 0.5,
                "label_correction": {"corrected_label_accuracy": 0.3, "given_label_accuracy": 0.6},
                "collapse_guard": {"enabled": False, "fired_epochs": []},
            },
        ],
        ("flip:0.4", "mwnet", "k5"): [
            {
                "test_accuracy": 0.83,
                "final_test_accuracy": 0.81,
                "sample_weights": {"mean_weight_clean": 0.9, "mean_weight_mislabelled": 0.1},
            }
        ],
    }
    rows = bench.table(results).splitlines()[2:]
    assert rows[0] == (
        "| flip:0.4 | ce |  | 0.8200 ± 0.0283 | 0.8000 / 0.8400 | 0.7900 ± 0.0141 | +0.0000 |  |  |"
    )
    assert "| 0.8600 ± 0.0141 |" in rows[1] and "| +0.0400 |" in rows[1]
    assert "| 0.8500 / 0.8700 |  | +0.0400 |" in rows[1]  # no last-epoch figure in these metrics
    # the first run has no guard record; the second's guard fired twice and undid one epoch
    assert rows[1].endswith("| 0.8500 (0.6000) | off / 2 (1 undone) |")
    # worse corrected labels: seed 0's guard stayed silent (flagged), seed 1's fired, seed 2 ran unguarded
    assert rows[2].endswith("| 0 / 1 / off — 2 run(s) with worse corrected labels and a silent guard |")
    # a variant row without its own ce baseline is compared with the plain ce row
    assert rows[3].startswith(
        "| flip:0.4 | mwnet | k5 | 0.8300 ± 0.0000 | 0.8300 | 0.8100 ± 0.0000 | +0.0100 |"
    )
    assert rows[3].endswith("| weights 0.90 / 0.10 |  |")


def test_the_label_cell_says_when_the_exported_labels_are_the_models() -> None:
    bench = load_benchmark("accuracy")

    def run(corrected: float, source: str | None, meta_own: float | None) -> dict:
        correction = {"corrected_label_accuracy": corrected, "given_label_accuracy": 0.6}
        history = [{"epoch": 1}, {"epoch": 2} | ({"diag_corrected_accuracy": meta_own} if meta_own else {})]
        return {
            "test_accuracy": 0.8,
            "label_correction": correction | ({"source": source} if source else {}),
        } | {"history": history}

    cell = bench._label_quality(
        [run(0.7, bench.FROM_MODEL, 0.4), run(0.8, None, 0.8), run(0.9, bench.FROM_MODEL, 0.5)]
    )
    assert (
        cell == "0.8000 (0.6000), from the model in 2 of 3 runs; the meta network's own in those runs 0.4500"
    )
    # a run without true labels has no accuracy: left out of both figures, not a crash
    unknown = {"test_accuracy": 0.8, "label_correction": {"samples": 5, "source": bench.FROM_MODEL}}
    assert bench._label_quality([unknown, run(0.7, None, 0.4)]) == "0.7000 (0.6000)"
    # without --diagnose the meta network's own labels are not known, and the cell does not guess
    assert bench._label_quality([run(0.7, bench.FROM_MODEL, None)]).endswith("from the model in 1 of 1 runs")
    assert bench._label_quality([run(0.7, None, 0.4)]) == "0.7000 (0.6000)"


@pytest.mark.parametrize(
    ("text", "expected"), [("flip:0.4", ("flip", 0.4)), ("uniform:0.8", ("uniform", 0.8))]
)
def test_parse_noise(text: str, expected: tuple[str, float]) -> None:
    assert load_benchmark("accuracy").parse_noise(text) == expected


def test_label_quality_guard_check_by_hand(tmp_path: Path) -> None:
    quality = load_benchmark("label_quality")
    history = [  # kept on trusted, corrected acc, given acc, fired
        {"train_guard_kept": 0.30, "diag_corrected_accuracy": 0.40, "diag_given_accuracy": 0.6},
        {"train_guard_kept": 0.70, "diag_corrected_accuracy": 0.50, "diag_given_accuracy": 0.6},
        {"train_guard_kept": 0.80, "diag_corrected_accuracy": 0.75, "diag_given_accuracy": 0.6},
        {"diag_corrected_accuracy": 0.9, "diag_given_accuracy": 0.6},  # unguarded epoch: left out
    ]
    for row, fired in zip(history, (1.0, 0.0, 1.0), strict=False):
        row["train_guard_fallback"] = fired
    run = tmp_path / "mlc-run"
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps({"history": history}))
    lines = quality.guard_check(quality.run_folders([tmp_path], [])).splitlines()
    # gaps 0.10, 0.20, 0.05; worse epochs: 1 (fired) and 2 (silent); the better one fired
    assert lines[2] == "| 3 | 0.117 | 0.200 | 1 of 2 | 1 of 1 |"


def test_label_quality_corrections_by_hand(tmp_path: Path) -> None:
    """Six samples, true labels 0..2: CE's flags imply corrections; a method's own corrected_label is read."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raynoisy.methods.label_issues import PRED_PROBS, build_label_issues

    quality = load_benchmark("label_quality")
    true = np.array([0, 0, 1, 1, 2, 2])
    given = np.array([0, 1, 1, 0, 2, 2])  # samples 1 and 3 mislabelled
    labels = pa.table({"sample_id": np.arange(6), "true_label": true})
    runs = {"ce-x-seed0": None, "mlc-x-seed0": np.array([0, 0, 1, 2, 2, 2])}
    for name, own in runs.items():
        folder = tmp_path / name
        folder.mkdir()
        pq.write_table(labels, folder / "labels.parquet")
        (folder / "metrics.json").write_text("{}")  # what marks a run folder
        if own is None:  # the prediction path: a model sure of the true class everywhere
            probs = np.full((6, 3), 0.01, dtype=np.float32)
            probs[np.arange(6), true] = 0.98
            issues = build_label_issues({"sample_id": np.arange(6), "given_label": given, PRED_PROBS: probs})
        else:
            columns = {"sample_id": np.arange(6), "given_label": given, "predicted_label": own}
            columns |= {"label_score": np.ones(6), "is_label_issue": own != given, "corrected_label": own}
            issues = build_label_issues(columns, "the method's own")
        pq.write_table(issues, folder / "label_issues.parquet")
    text = quality.corrections(quality.run_folders([tmp_path], []))
    flagged = pq.read_table(tmp_path / "ce-x-seed0" / "label_issues.parquet").column("is_label_issue")
    ce_corrected = np.where(flagged.to_numpy(zero_copy_only=False), true, given)
    ce_row = (
        f"| ce-x | 1 | {np.mean(ce_corrected == true):.4f} | 0.6667 | {np.mean(ce_corrected != given):.4f} |"
    )
    assert ce_row in text
    # the method's labels: 5 of 6 right (sample 3 corrected to 2), 2 of 6 changed
    assert "| mlc-x | 1 | 0.8333 | 0.6667 | 0.3333 |" in text
    assert "confident learning" in text and "the method's rule" in text
