"""The outputs people use, from a real 2-worker Ray Train run: label_issues.parquet, its metrics.json block
and report.md with its PNGs, all written at the end of `raynoisy train`."""

import json
import re

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from raynoisy.cli import run
from raynoisy.methods.label_issues import CONFIDENT_LEARNING, SCHEMA, detector_of

pytestmark = pytest.mark.ray


def test_a_run_writes_label_issues_and_its_report(ray_cluster, tmp_path):
    out = tmp_path / "ce"
    argv = ["train", "--dataset", "digits", "--method", "ce", "--noise", "flip", "--noise-rate", "0.4",
            "--epochs", "2", "--batch-size", "64", "--workers", "2", "--seed", "3", "--output", str(out),
            "--set", f"data.shard_root={tmp_path / 'shards'}", "--set", "split.train_subset=640",
            "--set", "run.tensorboard=false"]  # fmt: skip
    assert run(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())

    table = pq.read_table(out / "label_issues.parquet")
    assert table.schema.names == SCHEMA.names and detector_of(table) == CONFIDENT_LEARNING
    labels = pq.read_table(out / "labels.parquet")
    train_ids = labels.filter(pc.equal(labels.column("split"), "train")).column("sample_id").to_pylist()
    assert table.column("sample_id").to_pylist() == sorted(train_ids)  # one row per training sample

    written = json.loads((out / "metrics.json").read_text())
    block = written["label_issues"]
    assert block == metrics["label_issues"] and block["samples"] == written["train_size"] == len(train_ids)
    assert block["precision"] is not None and 0 <= block["estimated_noise_rate"] <= 1
    assert len(written["noise_transition_injected"]) == written["num_classes"] == 10

    report = (out / "report.md").read_text()
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert len(images) == 4 and all((out / image).stat().st_size > 1000 for image in images)
