"""End to end on a local Ray cluster with 2 CPU workers (gloo): the real TorchTrainer path.

Data the repo generates or a package ships (sklearn's digits), so a clean clone runs these.
"""

import json
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import ray
import torch

from raynoisy.cli import run
from raynoisy.data.sample_store import SampleStore
from raynoisy.errors import TrainingDivergedError
from raynoisy.methods.label_issues import CONFIDENT_LEARNING, detector_of
from raynoisy.train.driver import run_name
from raynoisy.train.preflight import resolve_config
from raynoisy.train.prepare import prepare, steps_per_epoch
from raynoisy.train.run_files import STATE_FILE
from raynoisy.train.services import namespace_of

pytestmark = pytest.mark.ray


def _config(tmp_path: Path, method: str, out: str, *extra: str, **flags):
    base = {
        "noise.type": "flip",
        "noise.rate": 0.4,
        "optim.epochs": 1,
        "optim.batch_size": 64,
        "scaling.workers": 2,
        "run.output": str(tmp_path / out),
        "run.seed": 3,
    }
    overrides = [f"data.shard_root={tmp_path / 'shards'}", "run.log_every_steps=5", *extra]
    if method == "probe":
        overrides.append("method.module=probe_method")
    if method == "mixnn-probe":
        overrides.append("method.module=mixnn_probe")
    return resolve_config("digits", method, flags=base | flags, overrides=overrides)


def _checkpoints(storage: Path) -> list[tuple[dict, Path]]:
    """(loop state, folder) of every kept checkpoint of a run."""
    found = []
    for folder in sorted(f for f in storage.glob("*/checkpoint_*") if f.is_dir()):
        state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=False)
        found.append((state["loop"], folder))
    return found


# Slow (two Ray Train runs, one restarted): resuming inside an epoch after a worker failure stays in the
# default run through test_services_and_per_sample_state_survive_a_worker_failure.
@pytest.mark.slow
def test_glc_stages_survive_a_mid_epoch_failure_and_match_one_worker_labels(ray_cluster, tmp_path):
    # GLC, two epochs per phase. Rank 1 dies at phase 2's 7th step; the restarted group resumes from the
    # latest checkpoint (after phase 2's step 4, or the end of phase 1 if that report was still in flight).
    from raynoisy.train.driver import train

    probe = _config(tmp_path, "glc", "probe")
    steps = steps_per_epoch(probe, prepare(probe, log=lambda _: None).shards.count("train"))
    two = _config(
        tmp_path,
        "glc",
        "two",
        "run.eval_every_steps=4",
        f"run.fail_once_at_step={2 * steps + 6}",
        "run.keep_checkpoints=20",
        **{"optim.epochs": 2},
    )
    metrics = train(two, log=lambda _: None)
    out = tmp_path / "two"
    assert (out / ".fault-drill-done").exists()
    written = json.loads((out / "metrics.json").read_text())
    stages = [(h["stage"], h["epoch"], h["step"]) for h in written["history"]]
    step_evals = [s for s in range(4, steps, 4)]
    # Each phase: an evaluation every 4 steps, then the epoch's; the history comes from the checkpoint the
    # run resumed from, so nothing appears twice.
    assert stages[: len(step_evals) + 1] == [("noisy", 1, s) for s in step_evals] + [("noisy", 1, 0)]
    assert len(set(stages)) == len(stages)
    assert stages[-1] == ("corrected", 4, 0) and written["epochs"] == 4 and written["best_epoch"] > 2
    assert any(h.get("train_glc_estimated_flip_rate", 0) > 0 for h in written["history"])
    assert all(h["replicas_identical"] for h in written["history"])
    assert written["noise"]["type"] == "flip" and 0.3 < written["noise"]["actual_rate"] < 0.5
    # Learned something: three times chance on 10 classes, with 40% of the labels flipped.
    assert metrics["test_accuracy"] > 0.3 and (out / "model.pt").exists() and (out / "tensorboard").is_dir()

    one = _config(tmp_path, "glc", "one", **{"scaling.workers": 1, "optim.epochs": 2})
    train(one, log=lambda _: None)
    labels_two = pq.read_table(out / "labels.parquet")
    labels_one = pq.read_table(tmp_path / "one" / "labels.parquet")
    assert labels_two.equals(labels_one)
    assert set(labels_one.column("split").to_pylist()) == {"train", "trusted", "val", "test"}


def test_services_and_per_sample_state_survive_a_worker_failure(ray_cluster, tmp_path):
    from raynoisy.train.driver import train

    # Under bf16-mixed too: the restarted workers must keep running steps and evaluations under autocast.
    cfg = _config(
        tmp_path,
        "probe",
        "probe",
        "run.eval_every_steps=3",
        "run.keep_checkpoints=50",
        "scaling.precision=bf16-mixed",
        **{"optim.epochs": 2},
    )
    steps = steps_per_epoch(cfg, prepare(cfg, log=lambda _: None).shards.count("train"))
    fail_at = steps + 5  # epoch 2, after the step checkpoint at its step 3
    cfg.run.fail_once_at_step = fail_at
    train(cfg, log=lambda _: None)
    out = tmp_path / "probe"
    assert (out / ".fault-drill-done").exists()
    # The restarted group built the method again (2 + 2 starts) and restored the latest checkpoint the
    # controller had received (a report in flight when a worker dies is lost: Ray Train V2 semantics).
    assert len((out / "probe-starts.txt").read_text().splitlines()) == 4
    restored = [json.loads(line) for line in (out / "probe-restored.jsonl").read_text().splitlines()]
    assert sorted(r["rank"] for r in restored) == [0, 1] and len({r["steps"] for r in restored}) == 1
    resumed_at = restored[0]["steps"]
    assert steps <= resumed_at < fail_at
    # The per-sample store each rank restored is bit-identical to that checkpoint's store on disk.
    folder = next(
        f
        for loop, f in _checkpoints(out / "ray_results")
        if loop["epoch"] * steps + loop["step"] == resumed_at
    )
    on_disk = SampleStore(_train_ids(out))
    on_disk.add_dense("times_trained", 1, dtype=torch.float32)
    on_disk.load(folder)
    assert {r["store_digest"] for r in restored} == {on_disk.digest()}
    # The service kept counting across the restart: every step of both ranks, the replayed ones twice.
    replayed = fail_at - resumed_at
    assert int((out / "probe-service-steps.txt").read_text()) == 2 * (2 * steps + replayed)
    # The final store counts each trained sample once per step that trained it: 2 epochs x steps x 64.
    [(_, final)] = [(lp, f) for lp, f in _checkpoints(out / "ray_results") if lp["stage"] == 1]
    end = SampleStore(_train_ids(out))
    end.add_dense("times_trained", 1, dtype=torch.float32)
    end.load(final)
    assert float(end.gather("times_trained", end.sample_ids).sum()) == 2 * steps * 64
    # The label issues came from the model-prediction path (confident learning), gathered from both ranks.
    issues = pq.read_table(out / "label_issues.parquet")
    assert detector_of(issues) == CONFIDENT_LEARNING
    assert issues.column("sample_id").to_pylist() == _train_ids(out).tolist()
    # Every evaluation rank 0 made, before and after the restart, saw bfloat16 logits in its steps and its
    # own forwards (an evaluation right after the restart may follow no step).
    dtypes = [json.loads(line) for line in (out / "probe-dtypes.jsonl").read_text().splitlines()]
    assert len(dtypes) >= 2 * steps // 3 and all(d["eval"] == ["torch.bfloat16"] for d in dtypes)
    assert {tuple(d["train"]) for d in dtypes} <= {("torch.bfloat16",), ()}
    # The service is gone with the run.
    with pytest.raises(ValueError):
        ray.get_actor("step-counter", namespace=namespace_of(run_name(cfg)))


def test_mixnn_without_a_trusted_set_survives_its_knn_index_actor_being_killed(ray_cluster, tmp_path):
    # MixNN in global neighbour mode from epoch 0, --clean-per-class 0. Rank 0 kills the KnnIndex actor
    # with ray.kill at the 4th step of epoch 1 (0-based 0) and waits for Ray's restart (an empty index);
    # epoch 2's refresh configures it again, adds the epoch's features and builds version 1. With
    # refresh_from=steps those features are the ones epoch 1's steps recorded on both ranks: no pass.
    from raynoisy.train.driver import train

    params = ["method.params.warmup_epochs=0", "method.params.mixup_epochs=0", "method.params.ema_every=1"]
    params.append("method.params.refresh_from=steps")
    cfg = _config(
        tmp_path,
        "mixnn-probe",
        "mixnn",
        *params,
        "method.params.kill_index_at_step=3",
        "split.train_subset=640",
        "run.tensorboard=false",
        **{"optim.epochs": 2, "split.clean_per_class": 0},
    )
    metrics = train(cfg, log=lambda _: None)
    out = tmp_path / "mixnn"
    written = json.loads((out / "metrics.json").read_text())
    assert written["epochs"] == 2 and [h["epoch"] for h in written["history"]] == [1, 2]
    assert all(h["replicas_identical"] for h in written["history"])
    assert written["clean_size"] == 0 and metrics["train_size"] == 640
    assert set(pq.read_table(out / "labels.parquet").column("split").to_pylist()) == {"train", "val", "test"}
    record = [json.loads(line) for line in (out / "mixnn-probe.jsonl").read_text().splitlines()]
    # Built for epoch 1 (version 0), killed (-1: the restarted actor is empty), rebuilt for epoch 2.
    assert record == [
        {"killed_at_step": 3, "version_before": 0},
        {"epoch": 0, "version": -1},
        {"epoch": 1, "version": 1},
    ]
    first, second = written["history"]
    # Configured by the first refresh, and again by the first after the restart, which lost no epoch.
    assert (first["train_knn_index_version"], first["train_knn_index_configured"]) == (0, 1)
    assert (second["train_knn_index_version"], second["train_knn_index_configured"]) == (1, 1)
    assert second["train_knn_index_attempts"] == 1
    # The first refresh made the pass; the second read what all 10 steps x 64 samples of epoch 1 recorded.
    assert "train_refresh_from_steps" not in first
    assert second["train_refresh_from_steps"] == 1 and second["train_refresh_recorded_fraction"] == 1.0
    table = pq.read_table(out / "corrected_labels.parquet")
    assert table.num_rows == 640 and "clean_probability" in table.schema.names


def _train_ids(out: Path):
    labels = pq.read_table(out / "labels.parquet").to_pandas()
    return labels.loc[labels["split"] == "train", "sample_id"].sort_values().to_numpy()


def test_a_config_error_in_a_worker_is_one_line_and_not_retried(ray_cluster, tmp_path, capsys):
    out = tmp_path / "fails"
    start = time.time()
    code = run(
        [
            "train",
            "--dataset",
            "digits",
            "--method",
            "probe",
            "--workers",
            "2",
            "--epochs",
            "1",
            "--batch-size",
            "64",
            "--output",
            str(out),
            "--set",
            "method.module=probe_method",
            "--set",
            "method.params.fail_with=config",
            "--set",
            "method.params.at_step=2",
            "--set",
            f"data.shard_root={tmp_path / 'shards'}",
            "--set",
            "run.max_failures=3",
        ]
    )
    assert code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("raynoisy: error:")]
    assert errors == ["raynoisy: error: method.params.fail_with: planted failure; do not plant failures"]
    # Only the first worker group built the method: the restarted one found the error recorded and stopped.
    assert len((out / "probe-starts.txt").read_text().splitlines()) == 2
    assert time.time() - start < 240


# Slow: a worker's deterministic error stopping the run unretried stays in the default run through
# test_a_config_error_in_a_worker_is_one_line_and_not_retried; this one adds the NaN check and the checkpoint.
@pytest.mark.slow
def test_a_loss_that_turns_nan_stops_the_run_and_keeps_the_last_checkpoint(ray_cluster, tmp_path):
    from raynoisy.train.driver import train

    cfg = _config(tmp_path, "probe", "nan", "method.params.fail_with=nan", **{"optim.epochs": 2})
    steps = steps_per_epoch(cfg, prepare(cfg, log=lambda _: None).shards.count("train"))
    cfg.method.params["at_step"] = steps + 1  # epoch 2, step 2
    with pytest.raises(TrainingDivergedError, match="epoch 2 step 2") as info:
        train(cfg, log=lambda _: None)
    assert (info.value.epoch, info.value.step) == (2, 2)
    kept = _checkpoints(tmp_path / "nan" / "ray_results")
    assert [loop["epoch"] for loop, _ in kept] == [1]
