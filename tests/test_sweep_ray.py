"""`raynoisy sweep` on a real Ray cluster resumes by running only the missing trials.

The driver "killed" after the first trial is the same sweep with one rate less: its trial folder is the
one the full sweep names (folders are keyed by config), so re-running the full grid must run exactly the
other trial, leave the finished one untouched, and reuse the shards written once per noise rate.
"""

from __future__ import annotations

import csv

import pytest

from raynoisy.cli import run

pytestmark = pytest.mark.ray


def _sweep(out, rates: str) -> list[str]:
    return ["sweep", "--dataset", "digits", "--methods", "ce", "--noise", "flip", "--rates", rates,
            "--seeds", "1", "--epochs", "1", "--output", str(out),
            "--set", "split.train_subset=320", "--set", "run.log_every_steps=100"]  # fmt: skip


def test_a_rerun_sweep_runs_only_the_missing_trials(ray_cluster, tmp_path, capsys):
    out = tmp_path / "sweep"
    assert run(_sweep(out, "0.4")) == 0  # the interrupted sweep: one trial of two finished
    (first,) = (out / "runs").iterdir()
    finished_at = (first / "metrics.json").stat().st_mtime_ns
    capsys.readouterr()

    assert run(_sweep(out, "0,0.4")) == 0
    printed = capsys.readouterr().out
    assert "trials: 1 finished before, 1 run now, 0 failed" in printed
    assert (first / "metrics.json").stat().st_mtime_ns == finished_at  # not run again

    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["rate"], r["status"]) for r in rows] == [("0.0", "finished"), ("0.4", "finished")]
    assert float(rows[1]["actual_noise_rate"]) > 0.3 and float(rows[0]["actual_noise_rate"]) == 0.0
    for row in rows:  # every trial is a whole run: its report and TensorBoard events
        run_dir = out / "runs" / row["trial"]
        assert (run_dir / "report.md").is_file() and any(
            (run_dir / "tensorboard").glob("events.out.tfevents.*")
        )
    assert len(list((out / "shards").iterdir())) == 2  # one shard set per rate, written once
    assert (out / "accuracy_vs_noise.png").is_file() and "| `ce` |" in (out / "results.md").read_text()
