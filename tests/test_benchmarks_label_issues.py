"""benchmarks/label_issues.py: each method's label-issue precision / recall, beside cleanlab on cross-fit CE.

In process on sklearn's digits (1 epoch, 2 folds): the reference row's numbers are recomputed here from the
cached out-of-sample probabilities and the true labels, each method's row from its label_issues.parquet.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from benchmark_scripts import load_benchmark
from cleanlab.filter import find_label_issues


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def test_table_rows_match_the_runs_and_an_independent_cleanlab_count(tmp_path, capsys):
    bench = load_benchmark("label_issues")
    argv = [
        *("--dataset", "digits", "--methods", "ce,mwnet", "--noise", "uniform:0.4", "--seeds", "0"),
        *("--epochs", "1", "--clean-per-class", "10", "--output", str(tmp_path), "--folds", "2"),
        *("--set", f"data.shard_root={tmp_path / 'shards'}", "--set", "optim.batch_size=64", "--in-process"),
    ]
    bench.main(argv)
    out = capsys.readouterr().out
    rows = {cells[1]: cells for cells in map(_cells, out.splitlines()) if cells[0] == "uniform:0.4"}
    assert set(rows) == {"**cleanlab (CE cross-fitted)**", "ce", "mwnet"}

    (ce_dir,) = [p for p in tmp_path.iterdir() if p.name.startswith("ce-")]
    cached = np.load(tmp_path / f"crossfit2-{ce_dir.name}" / "pred_probs.npz")
    labels = pq.read_table(ce_dir / "labels.parquet").to_pandas().set_index("sample_id")
    true = labels.loc[cached["sample_id"], "true_label"].to_numpy()
    given = cached["given_label"]
    assert np.array_equal(given, labels.loc[cached["sample_id"], "given_label"].to_numpy())
    flagged = find_label_issues(labels=given, pred_probs=cached["pred_probs"])
    wrong = given != true
    precision, recall = (flagged & wrong).sum() / flagged.sum(), (flagged & wrong).sum() / wrong.sum()
    reference = rows["**cleanlab (CE cross-fitted)**"]
    assert float(reference[3].split()[0]) == pytest.approx(flagged.mean(), abs=5e-4)
    assert float(reference[4].split()[0]) == pytest.approx(precision, abs=5e-4)
    assert float(reference[5].split()[0]) == pytest.approx(recall, abs=5e-4)

    for method in ("ce", "mwnet"):
        (run,) = [p for p in tmp_path.iterdir() if p.name.startswith(f"{method}-")]
        block = json.loads((run / "metrics.json").read_text())["label_issues"]
        issues = pq.read_table(run / "label_issues.parquet").column("is_label_issue").to_numpy()
        assert float(rows[method][3].split()[0]) == pytest.approx(issues.mean(), abs=5e-4)
        assert float(rows[method][4].split()[0]) == pytest.approx(block["precision"] or 0.0, abs=5e-4)
        assert block["detector"] in out  # the legend names each method's rule
    assert (tmp_path / "label_issues_table.md").read_text().strip() in out


def test_a_grid_without_a_plain_ce_row_is_refused(tmp_path):
    bench = load_benchmark("label_issues")
    argv = [
        *("--dataset", "digits", "--methods", "mwnet", "--noise", "uniform:0.4", "--seeds", "0"),
        *("--output", str(tmp_path), "--in-process"),
    ]
    with pytest.raises(SystemExit):
        bench.main(argv)
