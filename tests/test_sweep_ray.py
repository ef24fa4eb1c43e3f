"""`raynoisy sweep` on a real Ray cluster resumes by running only the missing trials.

A sweep killed after its first trial left that trial's folder with the config it ran (config.json, which
the driver writes first) and its metrics.json, which the runner writes last. The test plants exactly that
for the rate-0 trial (in the folder the plan names: folders are keyed by config) and runs the full grid:
Tune must run only the other trial, leave the planted one untouched, and report both.
"""

from __future__ import annotations

import csv
import json

import pytest

from raynoisy.cli import run
from raynoisy.tune.plan import CONFIG_FILE, plan_sweep

pytestmark = pytest.mark.ray

SETS = ["split.train_subset=320", "run.log_every_steps=100"]


def _sweep(out, rates: str) -> list[str]:
    return ["sweep", "--dataset", "digits", "--methods", "ce", "--noise", "flip", "--rates", rates,
            "--seeds", "1", "--epochs", "1", "--output", str(out),
            *(arg for s in SETS for arg in ("--set", s))]  # fmt: skip


def _plant_finished_trial(out) -> tuple:
    plan = plan_sweep(
        dataset="digits", methods=["ce"], noise="flip", rates=[0.0], seeds=1, output=str(out),
        flags={"optim.epochs": 1}, overrides=SETS,
    )  # fmt: skip
    (trial,) = plan.trials
    trial.run_dir.mkdir(parents=True)
    (trial.run_dir / CONFIG_FILE).write_text(json.dumps(trial.cfg.to_dict()))
    planted = {"test_accuracy": 0.5, "best_val_accuracy": 0.5, "final_test_accuracy": 0.5}
    planted |= {"noise": {"type": "flip", "rate": 0.0, "actual_rate": 0.0}, "wall_seconds": 1.0}
    (trial.run_dir / "metrics.json").write_text(json.dumps(planted))
    return trial.run_dir, (trial.run_dir / "metrics.json").stat().st_mtime_ns


def test_a_rerun_sweep_runs_only_the_missing_trials(ray_cluster, tmp_path, capsys):
    out = tmp_path / "sweep"
    planted, planted_at = _plant_finished_trial(out)

    assert run(_sweep(out, "0,0.4")) == 0
    printed = capsys.readouterr().out
    assert "trials: 1 finished before, 1 run now, 0 failed" in printed
    assert (planted / "metrics.json").stat().st_mtime_ns == planted_at  # not run again

    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["rate"], r["status"]) for r in rows] == [("0.0", "finished"), ("0.4", "finished")]
    assert rows[0]["trial"] == planted.name and float(rows[0]["test_accuracy"]) == 0.5
    assert float(rows[1]["actual_noise_rate"]) > 0.3
    run_dir = out / "runs" / rows[1]["trial"]  # the trial Tune ran is a whole run: report, TensorBoard
    assert (run_dir / "report.md").is_file() and any((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert len(list((out / "shards").iterdir())) == 1  # shards are written for the trials that run
    assert (out / "accuracy_vs_noise.png").is_file() and "| `ce` |" in (out / "results.md").read_text()
