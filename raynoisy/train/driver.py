"""The driver side of a run: prepare labels and shards, start the run's services and Ray Train, write the
run's outputs.

Everything that can fail on bad input (config, list files, class counts, noise matrix) fails here,
before Ray starts. Outputs in ``run.output``: labels.parquet, metrics.json, model.pt (best-validation
weights), the method's per-sample export if it has one, and TensorBoard events.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from raynoisy.config import Config
from raynoisy.errors import ConfigError
from raynoisy.methods import get_method_class
from raynoisy.train.loop import train_worker
from raynoisy.train.preflight import check
from raynoisy.train.prepare import Prepared, input_spec, prepare_output, steps_per_epoch
from raynoisy.train.run_files import BEST_MODEL_FILE, SUMMARY_FILE, RunInfo, write_metrics
from raynoisy.train.services import recorded_error, running_services


def run_name(cfg: Config) -> str:
    """Deterministic, so that re-running the same command in the same output resumes the run."""
    if cfg.run.name:
        return cfg.run.name
    digest = hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:10]
    return f"{cfg.data.dataset}-{cfg.method.name}-{digest}"


# What one Ray Data read task asks for: a run must leave at least this much CPU free, or it waits forever.
READ_TASK_CPUS = 1.0


# What a Train worker reserves when the cluster is too small now and Ray's autoscaler sizes it for the run.
AUTOSCALING_CPUS_PER_WORKER = 1.0


def _cpus_per_worker(cfg: Config, service_cpus: float, log=print) -> float:
    """The CPUs each Train worker reserves. Unless the user chose, half of what the services leave, and at
    most what still leaves one read task's CPU to Ray Data. A run that would leave Ray Data's read tasks no
    CPU would wait forever (the deadlock of more Train workers than CPUs): that is refused with one line,
    unless Ray's autoscaler can grow the cluster to fit it. An autoscaling cluster usually starts with a
    0-CPU head and no workers, too small for any run until the run's own request makes it grow."""
    import ray

    total = float(ray.cluster_resources().get("CPU", 0.0))  # a 0-CPU head has no "CPU" at all
    workers = cfg.scaling.workers
    share = cfg.scaling.cpus_per_worker
    if share is None:
        free = total - service_cpus
        half = math.floor(4 * free / (2 * workers)) / 4
        share = min(8.0, half, math.floor(4 * (free - READ_TASK_CPUS) / workers) / 4)
    if _leaves_read_task_cpu(total, service_cpus, share, workers):
        return share
    capacity = autoscaling_cpus()
    if capacity is not None:
        if cfg.scaling.cpus_per_worker is None:
            share = AUTOSCALING_CPUS_PER_WORKER
        if _leaves_read_task_cpu(capacity, service_cpus, share, workers):
            log(
                f"[train] the cluster has {total:g} CPU(s) now; {workers} worker(s) x {share:g} CPU, the "
                f"services and Ray Data's read tasks need more: waiting for Ray's autoscaler to add nodes"
            )
            return share
    grown = "" if capacity is None else f", or the {capacity:g} its autoscaler may grow it to,"
    raise ConfigError(
        "scaling.workers",
        f"{workers} worker(s) and the run's services ({service_cpus:g} CPU) leave no CPU of the "
        f"cluster's {total:g}{grown} for Ray Data's read tasks: the run would wait forever",
        "use fewer --workers, a smaller scaling.cpus_per_worker or service, or a bigger cluster",
    )


def _check_gpus(cfg: Config, service_gpus: float) -> None:
    """Refuse a run whose workers and services ask for more GPUs than the cluster has and no autoscaler can
    add: Ray would leave them pending and the run would wait forever (a service asks at its first call)."""
    import ray

    workers = cfg.scaling.workers * cfg.scaling.gpus_per_worker
    needed, have = workers + service_gpus, float(ray.cluster_resources().get("GPU", 0.0))
    if needed <= have or autoscaling_cpus() is not None:
        return
    raise ConfigError(
        "scaling.gpus_per_worker" if workers > have else "method.params",
        f"the run asks for {needed:g} GPU(s) ({cfg.scaling.workers} worker(s) x "
        f"{cfg.scaling.gpus_per_worker:g}, services {service_gpus:g}) and the cluster has {have:g}: the run "
        "would wait forever",
        "use a cluster with GPUs, or set scaling.gpus_per_worker and the services' GPU shares (MixNN's "
        "method.params.index_gpus) to fit it",
    )


def _leaves_read_task_cpu(cpus: float, service_cpus: float, share: float, workers: int) -> bool:
    return share > 0 and cpus - service_cpus - share * workers >= READ_TASK_CPUS


def autoscaling_cpus() -> float | None:
    """The most CPUs Ray's autoscaler may grow the connected cluster to: the maximum of the cluster config
    where the GCS holds one, unbounded where an autoscaler with worker node types runs without reporting a
    maximum (the cluster launcher's and the fake multi-node provider's monitor, KubeRay's autoscaler v2),
    None where nothing adds nodes (a local ``ray.init()`` cluster, a fixed cluster). Ray has no public API
    for this; these are the records ``ray status`` and Ray Train's own resource check read."""
    import ray
    from ray._private import ray_constants
    from ray._private.state import state
    from ray.autoscaler.v2.utils import is_autoscaler_v2
    from ray.experimental.internal_kv import _internal_kv_get

    if not ray.is_initialized():
        return None
    maximum = state.get_max_resources_from_cluster_config()
    if maximum:
        return float(maximum.get("CPU", 0))
    if is_autoscaler_v2(fetch_from_server=True):
        return math.inf
    # Autoscaler v1 writes its status on every update, with an autoscaler report once it has acted. A local
    # cluster's monitor (Ray's read-only node provider) reports too, once a request cannot be placed, but it
    # names each node's type after the node itself and never launches one.
    status = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
    report = json.loads(status).get("autoscaler_report") if status else None
    kinds = (report or {}).get("node_type_mapping") or {}
    if not kinds or all(kind == f"node_{node}" for node, kind in kinds.items()):
        return None
    return math.inf


def init_ray() -> None:
    """Connect to ``RAY_ADDRESS`` or start a local cluster (with its dashboard: Tune's nested Train runs
    need the State API to release their placement groups), and quiet Ray Data's progress bars."""
    import ray

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=True)
    from raynoisy.data.pipeline import quiet_ray_data

    quiet_ray_data()


def train(cfg: Config, log=print) -> dict:
    """Run one training job end to end; returns the metrics also written to ``<output>/metrics.json``."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from raynoisy.data.pipeline import sample_dataset

    check(cfg)
    start = time.time()
    output, prepared, labels = prepare_output(cfg, log)
    shards = prepared.shards
    spec = input_spec(cfg)
    # Named before the cluster fills in defaults, so a resubmission resumes even after autoscaling.
    name = run_name(cfg)
    init_ray()
    info = RunInfo(
        num_classes=prepared.catalog.num_classes,
        input=spec,
        files={split: shards.files(split) for split in shards.manifest["files"]},
        counts=dict(shards.manifest["counts"]),
        steps_per_epoch=steps_per_epoch(cfg, shards.count("train")),
        output=str(output),
        fault_marker=str(output / ".fault-drill-done"),
        actual_noise_rate=prepared.plan.noise.actual_rate,
        train_ids=ray.put(_train_ids(labels)),
        test_sets=_test_sets(prepared),
    )
    method_cls = get_method_class(cfg.method.name, cfg.method.module)
    services = method_cls.services(cfg)
    cfg.scaling.cpus_per_worker = _cpus_per_worker(cfg, sum(spec.num_cpus for spec in services), log)
    _check_gpus(cfg, sum(spec.num_gpus for spec in services))
    use_gpu = cfg.scaling.gpus_per_worker > 0
    resources = {"CPU": cfg.scaling.cpus_per_worker} | (
        {"GPU": cfg.scaling.gpus_per_worker} if use_gpu else {}
    )
    storage = cfg.run.storage_path or str(output / "ray_results")
    log(
        f"[train] {cfg.method.name} on {cfg.data.dataset}: {cfg.scaling.workers} worker(s) x {resources}, "
        f"{info.steps_per_epoch} steps/epoch, run {name} in {storage}"
    )
    with running_services(name, services) as services:
        trainer = TorchTrainer(
            train_worker,
            train_loop_config={"cfg": cfg.to_dict(), "info": info, "services": services},
            scaling_config=ray.train.ScalingConfig(
                num_workers=cfg.scaling.workers, use_gpu=use_gpu, resources_per_worker=resources
            ),
            run_config=ray.train.RunConfig(
                name=name,
                storage_path=storage,
                failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints),
            ),
            datasets={
                "train": sample_dataset(
                    shards.files("train"), spec, train=True, read_task_rows=cfg.data.read_task_rows
                )
            },
            dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
        )
        try:
            result = trainer.fit()
        except Exception:
            _raise_recorded(services)
            raise
        _raise_recorded(services)
    if result.error is not None:
        raise result.error
    metrics = _collect_outputs(cfg, prepared, result.checkpoint, output, time.time() - start)
    log(
        f"[train] test accuracy (best-val model, epoch {metrics['best_epoch']}): "
        f"{metrics['test_accuracy']:.4f}; "
        f"final-epoch test accuracy {metrics['final_test_accuracy']:.4f}; outputs in {output}"
    )
    for name, scores in metrics["test_sets"].items():
        log(f"[train]   {name}: top-1 {scores['top1']:.4f}, top-5 {scores['top5']:.4f} (best-val model)")
    return metrics


def _raise_recorded(services: dict) -> None:
    """Raise the deterministic error a worker recorded (intact, one line at the CLI), if there is one."""
    error = recorded_error(services)
    if error is not None:
        raise error from None


def _test_sets(prepared: Prepared) -> dict[str, np.ndarray]:
    """The evaluation sets of the test split a source tags (``Catalog.group``), by name; {} for one set."""
    group = prepared.catalog.group
    if group is None:
        return {}
    test = prepared.plan.split == "test"
    sets = {str(name): np.flatnonzero(test & (group == name)) for name in sorted(set(group[test].tolist()))}
    return sets if len(sets) > 1 else {}


def _test_set_metrics(summary: dict[str, Any]) -> dict[str, dict[str, float]]:
    """metrics.json's ``test_sets``: top-1 / top-5 of the best-validation and the last epoch, per set."""
    best, last = summary["test_metrics"], summary["final_test_metrics"]
    names = sorted(k.split("/", 1)[1] for k in best if k.startswith("test_accuracy/"))
    return {
        name: {
            "top1": best[f"test_accuracy/{name}"],
            "top5": best[f"test_top5_accuracy/{name}"],
            "final_top1": last.get(f"test_accuracy/{name}", float("nan")),
            "final_top5": last.get(f"test_top5_accuracy/{name}", float("nan")),
        }
        for name in names
    }


def _train_ids(labels: pa.Table) -> np.ndarray:
    """Sorted sample ids of the training split: the keys of the per-sample store."""
    train = labels.filter(pc.equal(labels.column("split"), "train"))
    return np.sort(train.column("sample_id").to_numpy().astype(np.int64))


def _collect_outputs(cfg: Config, prepared: Prepared, checkpoint, output: Path, wall: float) -> dict:
    """The run's outputs from the final checkpoint: model.pt, the per-sample tables, metrics.json."""
    from raynoisy.methods.label_issues import summarize_label_issues

    method_cls = get_method_class(cfg.method.name, cfg.method.module)
    with checkpoint.as_directory() as d:
        summary = json.loads((Path(d) / SUMMARY_FILE).read_text())
        if (Path(d) / BEST_MODEL_FILE).exists():
            shutil.copy(Path(d) / BEST_MODEL_FILE, output / "model.pt")
        export = None
        if method_cls.export_name is not None:
            src = Path(d) / f"{method_cls.export_name}.parquet"
            shutil.copy(src, output / src.name)
            export = pq.read_table(output / src.name)
        shutil.copy(Path(d) / "label_issues.parquet", output / "label_issues.parquet")
    labels = pq.read_table(output / "labels.parquet")
    issues = pq.read_table(output / "label_issues.parquet")
    counts = prepared.shards.manifest["counts"]
    noise = prepared.plan.noise.to_dict()
    metrics = {
        "method": cfg.method.name,
        "dataset": cfg.data.dataset,
        "noise": {"type": noise["type"], "rate": noise["rate"], "actual_rate": noise["actual_rate"]},
        "clean_size": counts.get("trusted", 0),
        "train_size": counts.get("train", 0),
        "val_size": counts.get("val", 0),
        "test_size": counts.get("test", 0),
        "epochs": summary["epochs"],
        "best_epoch": summary["best_epoch"],
        "test_accuracy": summary["test_accuracy"],
        "test_top5_accuracy": summary["test_metrics"].get("test_top5_accuracy", float("nan")),
        "test_sets": _test_set_metrics(summary),
        "best_val_accuracy": summary["best_val_accuracy"],
        "final_test_accuracy": summary["final_test_accuracy"],
        "model_selection": "test accuracy of the epoch with the best validation accuracy",
        "wall_seconds": wall,
        "train_samples_per_second": summary["train_samples_per_second"],
        "workers": cfg.scaling.workers,
        "compute_precision": cfg.scaling.precision,
        "seed": cfg.run.seed,
        "skipped_samples": len(prepared.shards.manifest["skipped"]),
        "shards": prepared.shards.uri,
        "num_classes": prepared.catalog.num_classes,
        "class_names": list(prepared.catalog.class_names),
        "steps_per_epoch": steps_per_epoch(cfg, counts.get("train", 0)),
        "noise_transition_injected": noise["transition"],
        "noise_transition_empirical": noise["empirical"],
        "label_issues": summarize_label_issues(issues, labels),
    }
    if export is not None:
        metrics.update(method_cls.summarize_export(export, labels))
    # The method's own facts (GLC's corruption matrix); the driver's keys take precedence.
    metrics |= {k: v for k, v in summary.get("method_metrics", {}).items() if k not in metrics}
    metrics["history"] = summary["history"]
    write_metrics(output, metrics)
    return metrics
