"""Running a sweep: skip the finished trials, write the shards once, size the trials, run the rest as one
Ray Tune grid, and record every failure in its trial's folder.

Resuming is by run directory, not by Tune's experiment state: a trial whose folder holds a finished
metrics.json with the same config (``Trial.is_finished``) is skipped before Tune starts, so re-running the
command after the driver was killed runs only the missing trials (an interrupted trial resumes its Ray Train
run from its last checkpoint, its run name being fixed). Failed trials run again.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from raynoisy.report.sweep_files import METRICS, has_outcome, write_error, write_sweep_manifest
from raynoisy.train.driver import autoscaling_cpus, init_ray
from raynoisy.train.prepare import prepare
from raynoisy.tune.plan import SweepPlan, Trial
from raynoisy.tune.progress import SweepProgress, say
from raynoisy.tune.resources import TRIAL_DRIVER_CPUS, size_for_cluster
from raynoisy.tune.trial import TRIAL, error_line, run_trial

TUNE_DIR = "tune"  # DIR/tune: Tune's own records of each trial (params, result.json, error.txt)


@dataclass
class SweepOutcome:
    """Trial names by what this invocation did with them."""

    skipped: list[str]  # finished before this invocation
    ran: list[str]
    failed: list[str]  # of ``ran``


def run_sweep(plan: SweepPlan, log: Callable[[str], None] = say) -> SweepOutcome:
    """Run the trials of ``plan`` that have not finished; write sweep.json. Raises a ConfigError, before any
    trial starts, when the cluster cannot run one trial beside Ray Data's read tasks."""
    pending = [t for t in plan.trials if not t.is_finished()]
    skipped = [t.key.name for t in plan.trials if t not in pending]
    log(
        f"[sweep] {len(plan.trials)} trial(s) in {plan.output}: {len(skipped)} finished already, "
        f"{len(pending)} to run"
    )
    concurrency = _size(pending) if pending else 0
    write_sweep_manifest(plan.output, plan.grid, [t.key for t in plan.trials])
    if not pending:
        return SweepOutcome(skipped, [], [])
    prepare_shards(pending, log)
    log(f"[sweep] running {len(pending)} trial(s), {concurrency} at a time")
    _run_tune(plan.output, pending, concurrency)
    failed = [t.key.name for t in pending if not (t.run_dir / METRICS).is_file()]
    return SweepOutcome(skipped, [t.key.name for t in pending], failed)


def _size(pending: list[Trial]) -> int:
    import ray

    init_ray()
    resources = ray.cluster_resources()
    cpus, gpus = float(resources.get("CPU", 0)), float(resources.get("GPU", 0))
    return size_for_cluster([t.cfg for t in pending], cpus, gpus, autoscaling_cpus(), say)


def prepare_shards(trials: list[Trial], log: Callable[[str], None] = say) -> None:
    """Write the shards once per (data set, split, noise, rate, seed) on the driver, before any trial
    starts: the trials that share them find them written (``prepare`` reuses shards by fingerprint)."""
    seen: set[str] = set()
    for trial in trials:
        d = trial.cfg.to_dict()
        key = json.dumps([d["data"], d["split"], d["noise"], d["run"]["seed"]], sort_keys=True, default=str)
        if key not in seen:
            seen.add(key)
            prepare(trial.cfg, log)


def _run_tune(output: Path, pending: list[Trial], concurrency: int) -> None:
    from ray import tune

    configs = {t.key.name: t.cfg.to_dict() for t in pending}
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, trials=configs), {"CPU": TRIAL_DRIVER_CPUS}
    )
    tuner = tune.Tuner(
        trainable,
        param_space={TRIAL: tune.grid_search(list(configs))},
        tune_config=tune.TuneConfig(
            max_concurrent_trials=concurrency,
            trial_name_creator=_trial_name,
            trial_dirname_creator=_trial_name,
        ),
        run_config=tune.RunConfig(
            name=TUNE_DIR,
            storage_path=str(output),
            verbose=0,
            callbacks=[SweepProgress(len(pending))],
        ),
    )
    results = tuner.fit()
    by_name = {t.key.name: t for t in pending}
    for i in range(len(results)):
        result = results[i]
        run_dir = by_name[result.config[TRIAL]].run_dir
        # A trial whose process died (out of memory, node lost) could not write its own error.json.
        if result.error is not None and not has_outcome(run_dir):
            write_error(run_dir, error_line(result.error), None)


def _trial_name(trial) -> str:
    return trial.config[TRIAL]
