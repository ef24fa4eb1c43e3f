"""End to end on a local Ray cluster with 2 CPU workers (gloo): the real TorchTrainer path."""

import json

import pyarrow.parquet as pq
import pytest

from raynoisy.config import load_config
from raynoisy.train.driver import train

pytestmark = pytest.mark.ray


def _config(tmp_path, data_root, out, **flags):
    base = {
        "data.root": str(data_root),
        "noise.type": "flip",
        "noise.rate": 0.4,
        "split.clean_per_class": 20,
        "split.train_subset": 2560,
        "optim.epochs": 1,
        "optim.batch_size": 64,
        "run.output": str(tmp_path / out),
        "run.seed": 3,
    }
    overrides = [f"data.shard_root={tmp_path / 'shards'}", "split.val_per_class=20", "run.log_every_steps=5"]
    return load_config("fashion-mnist", "glc", flags=base | flags, overrides=overrides)


def test_two_workers_survive_a_failure_and_match_one_worker_labels(ray_cluster, fashion_mnist, tmp_path):
    # GLC with one epoch per phase: rank 1 dies at the start of phase 2, after the corruption matrix
    # was estimated and checkpointed; the restarted group must resume from that checkpoint and finish.
    two = _config(tmp_path, fashion_mnist, "two", **{"scaling.workers": 2, "run.fail_once_at_epoch": 1})
    metrics = train(two, log=lambda _: None)
    out = tmp_path / "two"
    assert (out / ".fault-drill-done").exists()
    written = json.loads((out / "metrics.json").read_text())
    assert written["epochs"] == 2 and [h["epoch"] for h in written["history"]] == [1, 2]
    assert written["history"][0]["train_glc_estimated_flip_rate"] > 0
    for key in (
        "method",
        "dataset",
        "noise",
        "clean_size",
        "train_size",
        "test_accuracy",
        "best_val_accuracy",
        "final_test_accuracy",
        "wall_seconds",
        "train_samples_per_second",
    ):
        assert key in written, key
    assert written["noise"]["type"] == "flip" and 0.3 < written["noise"]["actual_rate"] < 0.5
    assert written["clean_size"] == 200 and written["train_size"] == 2560
    # Every parameter of the main model was bit-identical on both ranks after every epoch.
    assert all(h["replicas_identical"] for h in written["history"])
    assert metrics["test_accuracy"] > 0.3  # learned something on 2,560 noisy images in 2 epochs
    assert (out / "model.pt").exists() and (out / "tensorboard").is_dir()

    one = _config(tmp_path, fashion_mnist, "one", **{"scaling.workers": 1})
    train(one, log=lambda _: None)
    labels_two = pq.read_table(out / "labels.parquet")
    labels_one = pq.read_table(tmp_path / "one" / "labels.parquet")
    assert labels_two.equals(labels_one)
    assert set(labels_one.column("split").to_pylist()) == {"train", "trusted", "val", "test"}


@pytest.mark.parametrize("method", ["mwnet", "mlc", "metalabelnet"])
def test_meta_methods_keep_replicas_identical_on_two_workers(ray_cluster, tmp_path, method):
    # The worker asserts after every epoch that every tensor of the method's state (main net, meta net,
    # optimizers, accumulators) is bit-identical on both ranks; a divergence fails the run.
    flags = {
        "noise.type": "flip",
        "noise.rate": 0.4,
        "optim.epochs": 2 if method == "metalabelnet" else 1,
        "optim.batch_size": 32,
        "scaling.workers": 2,
        "run.output": str(tmp_path / method),
    }
    overrides = [f"data.shard_root={tmp_path / 'shards'}", "split.train_subset=640", "run.tensorboard=false"]
    if method == "metalabelnet":
        overrides.append("method.params.warmup_epochs=1")
    metrics = train(load_config("digits", method, flags=flags, overrides=overrides), log=lambda _: None)
    assert metrics["history"] and all(h["replicas_identical"] for h in metrics["history"])
    if method == "mwnet":
        assert (tmp_path / method / "sample_weights.parquet").exists()
    else:
        table = pq.read_table(tmp_path / method / "corrected_labels.parquet")
        assert table.num_rows == metrics["train_size"]
        lc = metrics["label_correction"]
        assert 0 <= lc["fraction_changed"] <= 1 and lc["given_label_accuracy"] < 0.7
