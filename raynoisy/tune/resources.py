"""How many trials of a sweep run at once, and what each Train worker reserves.

A trial is a Tune function trainable (``TRIAL_DRIVER_CPUS``) that starts the run's services and a
TorchTrainer's workers, and its Ray Data pipeline needs CPUs for its read tasks. Trials that together
reserve every CPU leave Ray Data none, and every trial waits forever (the deadlock of more Train workers
than CPUs, once per trial). So each concurrent trial keeps ``READ_TASK_CPUS`` unreserved, and the sweep
runs only as many trials at once as fit whole; a grid whose single trial does not fit is refused.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from raynoisy.config import Config
from raynoisy.errors import ConfigError
from raynoisy.methods import get_method_class
from raynoisy.train.driver import READ_TASK_CPUS

TRIAL_DRIVER_CPUS = 0.25  # the Tune trial's own process: it prepares, waits on fit(), writes the outputs
DEFAULT_CPUS_PER_WORKER = 1.0  # a sweep's trials share the cluster: one CPU each, not the driver's half


def _quarters(x: float) -> float:
    return math.floor(4 * x + 1e-9) / 4


def size_trials(cfgs: list[Config], total_cpus: float, total_gpus: float) -> int:
    """Set each trial's ``scaling.cpus_per_worker`` (unless the user chose one) and return how many trials
    may run at once. Raises a ConfigError when not even one trial fits next to Ray Data's read tasks."""
    cpus_needed, gpus_needed = 0.0, 0.0
    for cfg in cfgs:
        services = get_method_class(cfg.method.name, cfg.method.module).services(cfg)
        service_cpus = sum(s.num_cpus for s in services)
        fixed = TRIAL_DRIVER_CPUS + service_cpus + READ_TASK_CPUS
        workers = cfg.scaling.workers
        if cfg.scaling.cpus_per_worker is None:
            fitting = math.inf if math.isinf(total_cpus) else _quarters((total_cpus - fixed) / workers)
            cfg.scaling.cpus_per_worker = min(DEFAULT_CPUS_PER_WORKER, fitting)
        share = cfg.scaling.cpus_per_worker
        cpus = fixed + workers * share
        if share <= 0 or cpus > total_cpus + 1e-9:
            raise ConfigError(
                "scaling.workers",
                f"a {cfg.method.name} trial of {workers} worker(s) x {max(share, 0):g} CPU, its services "
                f"({service_cpus:g} CPU) and its Tune process ({TRIAL_DRIVER_CPUS:g} CPU) leave no CPU of "
                f"the cluster's {total_cpus:g} for Ray Data's read tasks: the sweep would wait forever",
                "use fewer --workers, a smaller scaling.cpus_per_worker, or a bigger cluster",
            )
        gpus = workers * cfg.scaling.gpus_per_worker + sum(s.num_gpus for s in services)
        if gpus > total_gpus + 1e-9:
            raise ConfigError(
                "scaling.gpus_per_worker",
                f"a {cfg.method.name} trial needs {gpus:g} GPU(s) and the cluster has {total_gpus:g}",
                "use --gpus-per-worker 0 (CPU) or a cluster with GPUs",
            )
        cpus_needed, gpus_needed = max(cpus_needed, cpus), max(gpus_needed, gpus)
    concurrency = len(cfgs) if math.isinf(total_cpus) else math.floor(total_cpus / cpus_needed + 1e-9)
    if gpus_needed > 0:
        concurrency = min(concurrency, math.floor(total_gpus / gpus_needed + 1e-9))
    return max(1, min(concurrency, len(cfgs)))


def size_for_cluster(
    cfgs: list[Config],
    total_cpus: float,
    total_gpus: float,
    autoscaling_cpus: float | None,
    log: Callable[[str], None],
) -> int:
    """``size_trials`` against the cluster as it is; where not even one trial fits and Ray's autoscaler may
    grow the cluster (``autoscaling_cpus``: its CPU ceiling, ``math.inf`` where it reports none, None where
    nothing adds nodes), against that ceiling instead, as ``raynoisy train`` does: an autoscaling cluster
    often starts as a 0-CPU head, and the trials' own resource requests make it grow. GPUs are checked
    against the cluster as it is."""
    chosen = [cfg.scaling.cpus_per_worker for cfg in cfgs]
    try:
        return size_trials(cfgs, total_cpus, total_gpus)
    except ConfigError:
        if autoscaling_cpus is None or autoscaling_cpus <= total_cpus:
            raise
    for cfg, share in zip(cfgs, chosen, strict=True):  # the failed attempt sized them for the cluster now
        cfg.scaling.cpus_per_worker = share
    concurrency = size_trials(cfgs, autoscaling_cpus, total_gpus)
    log(
        f"[sweep] the cluster has {total_cpus:g} CPU(s) now, too few for one trial; sizing for the "
        f"{autoscaling_cpus:g} CPUs its autoscaler may grow it to ({concurrency} trial(s) at a time)"
    )
    return concurrency
