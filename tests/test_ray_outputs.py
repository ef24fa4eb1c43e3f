"""A meta method end to end through `raynoisy train` on a real 2-worker Ray Train run: replica identity on
every evaluation, its stages, and the outputs people use (corrected_labels.parquet, label_issues.parquet with
its metrics.json block, report.md with its PNGs), written from a command whose paths are relative.

One run covers all of it (a TorchTrainer run costs ~30 s of start-up): every meta method's 2-rank replica
identity is checked without Ray in test_methods_meta.py (gloo processes) and its per-sample tables in
test_label_issues.py; metalabelnet is the one with stages, a per-sample store and corrected labels, so it
exercises the most of the real loop. The prediction path of the label issues runs on 2 workers in
test_ray_train.py's worker-failure run.
"""

import json
import re

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from raynoisy.cli import run
from raynoisy.methods.label_issues import CONFIDENT_LEARNING, SCHEMA, detector_of

pytestmark = pytest.mark.ray


def test_a_meta_run_keeps_replicas_identical_and_writes_its_outputs(ray_cluster, tmp_path, monkeypatch):
    # Relative paths, from the folder the command runs in: Ray Train's workers run in folders of their own,
    # where a relative data.shard_root used to name no shards (every worker's evaluation failed).
    monkeypatch.chdir(tmp_path)
    argv = ["train", "--dataset", "digits", "--method", "metalabelnet", "--noise", "flip",
            "--noise-rate", "0.4", "--epochs", "2", "--batch-size", "32", "--workers", "2", "--seed", "3",
            "--output", "out", "--set", "data.shard_root=shards", "--set", "split.train_subset=640",
            "--set", "run.tensorboard=false", "--set", "method.params.warmup_epochs=1",
            "--set", "method.params.guard=false", "--set", "run.max_failures=0"]  # fmt: skip
    assert run(argv) == 0
    out = tmp_path / "out"
    metrics = json.loads((out / "metrics.json").read_text())
    # The loop asserts after every evaluation that every tensor of the method's state (main net, meta net,
    # optimizers, accumulators) and the per-sample store are bit-identical on both ranks.
    assert metrics["history"] and all(h["replicas_identical"] for h in metrics["history"])
    assert [h["stage"] for h in metrics["history"]] == ["warmup", "meta"] and metrics["best_epoch"] == 2

    labels = pq.read_table(out / "labels.parquet")
    train_ids = sorted(
        labels.filter(pc.equal(labels.column("split"), "train")).column("sample_id").to_pylist()
    )
    corrected = pq.read_table(out / "corrected_labels.parquet").sort_by("sample_id")
    assert corrected.column("sample_id").to_pylist() == train_ids
    lc = metrics["label_correction"]
    assert 0 <= lc["fraction_changed"] <= 1 and lc["given_label_accuracy"] < 0.7

    table = pq.read_table(out / "label_issues.parquet")
    assert table.schema.names == SCHEMA.names
    assert table.column("sample_id").to_pylist() == train_ids  # one row per training sample
    # With the guard off (it may end a 2-epoch run falling back to the model's predictions), the issues are
    # the corrected labels' own rule: every sample whose corrected label differs from its given one.
    assert detector_of(table) != CONFIDENT_LEARNING
    changed = np.asarray(corrected.column("corrected_label")) != np.asarray(corrected.column("given_label"))
    assert np.array_equal(np.asarray(table.column("is_label_issue")), changed)
    block = metrics["label_issues"]
    assert block["samples"] == metrics["train_size"] == len(train_ids) == 640
    assert block["precision"] is not None and 0 <= block["estimated_noise_rate"] <= 1
    assert len(metrics["noise_transition_injected"]) == metrics["num_classes"] == 10

    report = (out / "report.md").read_text()
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert len(images) >= 4 and all((out / image).stat().st_size > 1000 for image in images)
