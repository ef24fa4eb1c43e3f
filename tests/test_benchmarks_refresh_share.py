"""benchmarks/refresh_share.py: the refresh's cost, read from run folders it is given."""

from __future__ import annotations

import json
from pathlib import Path

from benchmark_scripts import load_benchmark

refresh_share = load_benchmark("refresh_share")


def write_run(folder: Path, method: str, params: dict, history: list[dict]) -> None:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"method": {"name": method, "params": params}}))
    (folder / "metrics.json").write_text(json.dumps({"history": history}))


def test_shares_are_medians_over_neighbour_epochs_and_totals_over_the_run(tmp_path: Path, capsys) -> None:
    history = [
        {"train_seconds": 10.0},  # warm-up: no refresh
        {"train_seconds": 10.0, "train_refresh_seconds": 5.0},  # mixup: a pass, no index
        {"train_seconds": 9.0, "train_refresh_seconds": 1.0, "train_knn_index_version": 2},
        {"train_seconds": 8.0, "train_refresh_seconds": 2.0, "train_knn_index_version": 3,
         "train_refresh_from_steps": 1.0, "train_refresh_recorded_fraction": 0.99},
        {"train_seconds": 7.0, "train_refresh_seconds": 3.0, "train_knn_index_version": 4,
         "train_refresh_from_steps": 1.0, "train_refresh_recorded_fraction": 0.97},
    ]  # fmt: skip
    write_run(tmp_path / "grid" / "mixnn-a", "mixnn", {"refresh_from": "steps"}, history)
    write_run(tmp_path / "grid" / "ce-a", "ce", {}, [{"train_seconds": 1.0}])
    refresh_share.main([str(tmp_path / "grid")])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3, "a header, a rule and one row: the CE run is not a MixNN run"
    cells = [c.strip() for c in lines[2].strip("|").split("|")]
    # neighbour epochs 3; shares 0.1, 0.2, 0.3 -> median 20%; steps median 8.0; refresh median 2.0;
    # recorded median of 0.99, 0.97 = 0.98; whole run 11 / (11 + 44) = 20%.
    assert cells == ["mixnn-a", "steps", "3", "8.0", "2.00", "20.0%", "0.9800", "20.0%", "**no**"]
