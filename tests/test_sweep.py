"""`raynoisy sweep` without Ray: the grid's configs are checked before anything starts, trials are sized
beside Ray Data's read tasks, a finished trial is recognised by its run folder, a failed one is recorded,
and results.csv / results.md / accuracy_vs_noise.png are rebuilt from the trials' folders (checked here
against numbers computed independently, with numpy)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import ray

from raynoisy.cli import run
from raynoisy.errors import ConfigError, TrainingDivergedError
from raynoisy.report.sweep_files import RESULT_COLUMNS, TrialKey, write_sweep_manifest
from raynoisy.train.prepare import RECORDS_EVERY_PARAM, config_record
from raynoisy.tune.plan import plan_sweep
from raynoisy.tune.resources import size_for_cluster, size_trials

METHODS = ["ce", "glc"]
RATES = [0.0, 0.4]
SEEDS = 3
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _fake_sweep(folder: Path) -> dict[tuple[str, float, int], dict]:
    """A sweep folder as the runner leaves it: every trial finished, except glc rate 0.4 seed 2, which
    failed, and glc rate 0.4 seed 1, which never ran. Returns the metrics of the finished trials."""
    rng = np.random.default_rng(7)
    keys = [
        TrialKey(f"{m}-flip{r:g}-seed{s}-abc", m, "flip", r, s)
        for m in METHODS
        for r in RATES
        for s in range(SEEDS)
    ]
    write_sweep_manifest(
        folder,
        {
            "dataset": "digits",
            "methods": METHODS,
            "noise": "flip",
            "rates": RATES,
            "seeds": [0, 1, 2],
            "epochs": 2,
        },
        keys,
    )
    finished = {}
    for key in keys:
        run_dir = folder / "runs" / key.name
        run_dir.mkdir(parents=True)
        if (key.method, key.rate) == ("glc", 0.4) and key.seed == 2:
            (run_dir / "error.json").write_text(
                json.dumps({"error": "TrainingDivergedError: boom", "wall_seconds": 3.0})
            )
            continue
        if (key.method, key.rate) == ("glc", 0.4) and key.seed == 1:
            continue
        metrics = {
            "method": key.method,
            "noise": {"type": "flip", "rate": key.rate, "actual_rate": key.rate * 0.98 + 0.001 * key.seed},
            "best_val_accuracy": float(rng.uniform(0.5, 1)),
            "test_accuracy": float(rng.uniform(0.5, 1)),
            "final_test_accuracy": float(rng.uniform(0.5, 1)),
            "wall_seconds": float(rng.uniform(10, 20)),
            "history": [],
        }
        if key.method == "glc":  # a method with corrected labels
            metrics["label_correction"] = {
                "corrected_label_accuracy": float(rng.uniform(0.6, 1)),
                "source": str(rng.choice(["method", "model"])),
            }
        (run_dir / "metrics.json").write_text(json.dumps(metrics))
        finished[(key.method, key.rate, key.seed)] = metrics
    return finished


def _table_rows(md: str, title: str) -> dict[str, list[str]]:
    """The cells of the markdown table under heading ``title``: method -> [cell per rate]."""
    block = md.split(f"## {title}\n\n", 1)[1].split("\n\n", 1)[0].splitlines()
    return {
        row.split(" | ")[0].strip("| `"): [c.strip() for c in row.strip("|").split("|")[1:]]
        for row in block[2:]
    }


def _expected(values: list[float]) -> str:
    mean, n = float(np.mean(values)), len(values)
    text = f"{mean:.4f}" if n == 1 else f"{mean:.4f} ± {float(np.std(values, ddof=1)):.4f}"
    return text + (f" (n={n})" if n < SEEDS else "")


def test_results_are_tabulated_from_the_trial_folders(tmp_path):
    finished = _fake_sweep(tmp_path)
    assert run(["report", str(tmp_path)]) == 0

    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == RESULT_COLUMNS and len(rows) == len(METHODS) * len(RATES) * SEEDS
    by_cell = {(r["method"], float(r["rate"]), int(r["seed"])): r for r in rows}
    assert by_cell[("glc", 0.4, 2)]["status"] == "failed"
    assert by_cell[("glc", 0.4, 2)]["error"] == "TrainingDivergedError: boom"
    assert by_cell[("glc", 0.4, 1)]["status"] == "not run"
    for key, metrics in finished.items():
        row = by_cell[key]
        assert row["status"] == "finished" and row["error"] == ""
        assert float(row["test_accuracy"]) == pytest.approx(metrics["test_accuracy"])
        assert float(row["final_test_accuracy"]) == pytest.approx(metrics["final_test_accuracy"])
        assert float(row["actual_noise_rate"]) == pytest.approx(metrics["noise"]["actual_rate"])
        corrected = metrics.get("label_correction", {}).get("corrected_label_accuracy")
        assert (row["corrected_label_accuracy"] == "") == (corrected is None)
        assert row["corrected_labels_from"] == metrics.get("label_correction", {}).get("source", "")

    md = (tmp_path / "results.md").read_text()
    from_model = [r["trial"] for r in rows if r["corrected_labels_from"] == "model"]
    assert from_model  # the fake sweep draws both sources
    assert f"{len(from_model)} trial(s) ended with the collapse guard falling back" in md
    assert all(f"`{trial}`" in md for trial in from_model)
    for title, column in [
        ("Test accuracy of the best-validation epoch's model", "test_accuracy"),
        ("Test accuracy of the last epoch's model", "final_test_accuracy"),
    ]:
        table = _table_rows(md, title)
        for j, rate in enumerate(RATES):
            cells = {
                m: [v[column] for (mm, r, _), v in finished.items() if (mm, r) == (m, rate)] for m in METHODS
            }
            best = max(METHODS, key=lambda m: np.mean(cells[m]))
            for method in METHODS:
                text = _expected(cells[method])
                assert table[method][j] == (f"**{text}**" if method == best else text), (title, method, rate)
    corrected = _table_rows(md, "Accuracy of the corrected training labels (methods that correct labels)")
    assert list(corrected) == ["glc"]  # ce has no corrected labels
    actual = np.mean([v["noise"]["actual_rate"] for (_, r, _), v in finished.items() if r == 0.4])
    assert f"rate 0.4 (actual {actual:.3f})" in md
    assert "`glc-flip0.4-seed2-abc` | TrainingDivergedError: boom" in md
    assert "10 finished, 1 failed, 1 not run (of 12)" in md
    assert (tmp_path / "accuracy_vs_noise.png").read_bytes().startswith(PNG_SIGNATURE)


def _refused(argv: list[str], capsys) -> str:
    assert run(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("raynoisy: error: ")
    return err


@pytest.mark.parametrize(
    ("methods", "rates", "field", "extra"),
    [
        ("ce,nope", "0,0.2", "method.name", []),
        ("ce", "0,1.5", "--rates", []),
        ("ce", "-0.1", "--rates", []),
        ("ce", "0.2", "scaling.precision", ["--precision", "fp16"]),
    ],
)
def test_a_bad_trial_refuses_the_whole_sweep_before_anything_starts(
    methods, rates, field, extra, tmp_path, monkeypatch, capsys
):
    def refuse(*args, **kwargs):
        raise AssertionError("Ray started although the sweep should have been refused")

    monkeypatch.setattr(ray, "init", refuse)
    out = tmp_path / "sweep"
    argv = ["sweep", "--dataset", "digits", "--methods", methods, "--noise", "flip", "--rates", rates,
            "--seeds", "2", "--output", str(out), *extra]  # fmt: skip
    assert _refused(argv, capsys).startswith(f"raynoisy: error: {field}: ")
    assert not out.exists()


def _plan(tmp_path, method="ce", **flags):
    return plan_sweep(
        dataset="digits",
        methods=[method],
        noise="flip",
        rates=[0.2],
        seeds=1,
        output=str(tmp_path),
        flags=flags,
    )


def test_a_trial_is_finished_only_with_metrics_and_the_same_config(tmp_path):
    trial = _plan(tmp_path, **{"optim.epochs": 2}).trials[0]
    assert trial.run_dir.parent == tmp_path / "runs" and trial.cfg.data.shard_root == str(tmp_path / "shards")
    trial.run_dir.mkdir(parents=True)
    saved = trial.cfg.to_dict()
    saved["scaling"]["cpus_per_worker"] = 0.5  # sized on another cluster: same results
    (trial.run_dir / "config.json").write_text(json.dumps(saved))
    assert not trial.is_finished()  # no metrics.json: interrupted
    (trial.run_dir / "metrics.json").write_text("{}")
    assert trial.is_finished()
    saved["optim"]["epochs"] = 3
    (trial.run_dir / "config.json").write_text(json.dumps(saved))
    assert not trial.is_finished()
    # The same command names the same folder; a different config another one.
    assert _plan(tmp_path, **{"optim.epochs": 2}).trials[0].run_dir == trial.run_dir
    assert _plan(tmp_path, **{"optim.epochs": 3}).trials[0].run_dir != trial.run_dir


def test_a_trial_run_under_another_method_default_is_not_finished(tmp_path):
    """The driver's config.json records every method param (config_record); a run whose recorded value is not
    this code's default was trained under another default and is not this trial, nor is one whose record
    lacks a param this code has (added since). Params this code does not know (since removed) match nothing;
    a config.json written before the records were complete matches on the params it names."""
    trial = _plan(tmp_path, "mwnet").trials[0]
    trial.run_dir.mkdir(parents=True)
    (trial.run_dir / "metrics.json").write_text("{}")
    saved = config_record(trial.cfg)
    assert saved["method"]["params"]["train_on_trusted"] is False  # recorded although the preset leaves it
    assert saved[RECORDS_EVERY_PARAM] is True
    older_code = {k: v for k, v in saved["method"]["params"].items() if k != "guard_min_model_skill"}
    unmarked = {k: v for k, v in saved.items() if k != RECORDS_EVERY_PARAM}
    for record, params, finished in [
        (saved, saved["method"]["params"], True),
        (saved, {**saved["method"]["params"], "train_on_trusted": True}, False),
        (saved, older_code, False),  # trained before the param existed: not this code's default
        (unmarked, older_code, True),  # written before the mark: matches on the params it names
        (unmarked, {}, trial.cfg.method.params == {}),
        (unmarked, {**trial.cfg.method.params, "removed_param": 1}, False),
    ]:
        (trial.run_dir / "config.json").write_text(
            json.dumps({**record, "method": {**record["method"], "params": params}})
        )
        assert trial.is_finished() is finished, params


def test_a_failed_trial_writes_its_error_and_raises(tmp_path, monkeypatch):
    from raynoisy.tune import trial as trial_module

    trial = _plan(tmp_path).trials[0]
    trial.run_dir.mkdir(parents=True)
    (trial.run_dir / "metrics.json").write_text("{}")  # an earlier attempt's outcome is forgotten

    def diverge(cfg, log):
        raise TrainingDivergedError(1, 3, math.nan)

    monkeypatch.setattr(trial_module, "train", diverge)
    with pytest.raises(TrainingDivergedError):
        trial_module.run_trial({"trial": trial.key.name}, trials={trial.key.name: trial.cfg.to_dict()})
    assert not (trial.run_dir / "metrics.json").exists()
    error = json.loads((trial.run_dir / "error.json").read_text())
    assert error["error"].startswith("raynoisy.errors.TrainingDivergedError: training diverged: loss nan")
    assert "\n" not in error["error"] and error["wall_seconds"] >= 0


def _cfgs(tmp_path, workers: int, *overrides: str):
    plan = plan_sweep(
        dataset="digits",
        methods=["ce"],
        noise="flip",
        rates=[0.2, 0.4],
        seeds=1,
        output=str(tmp_path),
        flags={"scaling.workers": workers, "optim.batch_size": 64},
        overrides=list(overrides),
    )
    return [t.cfg for t in plan.trials]


def test_trials_are_sized_so_ray_data_keeps_a_cpu(tmp_path):
    # 2 CPUs: the trial's process 0.25 + one read task 1.0 leave 0.75 for one worker; one trial at a time.
    cfgs = _cfgs(tmp_path, 1)
    assert size_trials(cfgs, 2.0, 0.0) == 1 and {c.scaling.cpus_per_worker for c in cfgs} == {0.75}
    # 16 CPUs, 2 workers of 1 CPU: 3.25 CPUs a trial, at most as many at once as there are trials (2).
    cfgs = _cfgs(tmp_path, 2)
    assert size_trials(cfgs, 16.0, 0.0) == 2 and cfgs[0].scaling.cpus_per_worker == 1.0
    assert size_trials(_cfgs(tmp_path, 2), 6.5, 0.0) == 2 and size_trials(_cfgs(tmp_path, 2), 6.0, 0.0) == 1


@pytest.mark.parametrize(
    ("workers", "overrides", "cpus", "gpus", "field"),
    [
        (4, [], 2.0, 0.0, "scaling.workers"),  # 4 workers on 2 CPUs: not a quarter CPU each is left
        (
            1,
            ["scaling.cpus_per_worker=1"],
            2.0,
            0.0,
            "scaling.workers",
        ),  # the user's share leaves no read CPU
        (1, ["scaling.gpus_per_worker=1"], 8.0, 0.0, "scaling.gpus_per_worker"),
    ],
)
def test_a_grid_whose_trial_cannot_fit_is_refused(tmp_path, workers, overrides, cpus, gpus, field):
    with pytest.raises(ConfigError) as info:
        size_trials(_cfgs(tmp_path, workers, *overrides), cpus, gpus)
    assert info.value.field == field


def test_shard_prints_progress_with_rate_and_eta(tmp_path, capsys):
    argv = ["shard", "--dataset", "digits", "--shard-root", str(tmp_path / "shards"),
            "--output", str(tmp_path), "--set", "data.rows_per_shard=500"]  # fmt: skip
    assert run(argv) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[shard] train:")]
    # 1238 training samples in shards of 500: a line per shard, each with the rate and the ETA.
    assert len(lines) == 3 and all(" samples/s, eta " in line for line in lines), lines
    assert lines[-1].startswith("[shard] train: 1238/1238 written")


def test_an_autoscaling_cluster_is_sized_for_what_it_may_grow_to(tmp_path):
    """A 0-CPU head (clusters/aws.yaml): refused as it is, sized against the autoscaler's ceiling instead;
    a cluster nothing can grow is still refused."""
    lines: list[str] = []
    cfgs = _cfgs(tmp_path, 2)
    with pytest.raises(ConfigError):
        size_for_cluster(cfgs, 0.0, 0.0, None, lines.append)
    cfgs = _cfgs(tmp_path, 2)
    # 8 CPUs at most: a trial of 2 workers x 1 CPU + 0.25 + one read task = 3.25 CPUs, so 2 at once.
    assert size_for_cluster(cfgs, 0.0, 0.0, 8.0, lines.append) == 2
    assert {c.scaling.cpus_per_worker for c in cfgs} == {1.0}  # not the share the 0-CPU attempt computed
    assert "0 CPU(s) now" in lines[-1] and "8 CPUs its autoscaler may grow it to" in lines[-1]
    # No ceiling reported: every trial at once, 1 CPU per worker.
    cfgs = _cfgs(tmp_path, 2)
    assert size_for_cluster(cfgs, 0.0, 0.0, math.inf, lines.append) == len(cfgs)
    assert {c.scaling.cpus_per_worker for c in cfgs} == {1.0}
    # A cluster that fits a trial now is sized as it is, whatever the autoscaler could add.
    assert size_for_cluster(_cfgs(tmp_path, 2), 16.0, 0.0, math.inf, lines.append) == 2
