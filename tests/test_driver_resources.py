"""How the driver sizes Train workers next to the run's services and Ray Data (no cluster needed)."""

import json
import math
import time

import pytest
import ray

from raynoisy.errors import ConfigError
from raynoisy.train import driver
from raynoisy.train.driver import _check_gpus, _cpus_per_worker
from raynoisy.train.preflight import resolve_config


def _cfg(tmp_path, workers: int, cpus: float | None = None):
    overrides = [] if cpus is None else [f"scaling.cpus_per_worker={cpus}"]
    return resolve_config(
        "digits",
        "ce",
        flags={"run.output": str(tmp_path), "scaling.workers": workers, "optim.batch_size": 64},
        overrides=overrides,
    )


def test_workers_share_what_the_services_leave_with_ray_data(tmp_path, monkeypatch):
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    assert _cpus_per_worker(_cfg(tmp_path, 2), service_cpus=0.0) == 0.5  # half of 2 CPUs over 2 workers
    # half of the 1.5 CPU the service leaves, capped so that one read task's CPU stays free
    assert _cpus_per_worker(_cfg(tmp_path, 2), service_cpus=0.5) == 0.25


def test_a_run_that_leaves_ray_data_no_cpu_is_refused(tmp_path, monkeypatch):
    # 2 workers x 1 CPU on a fixed 2-CPU cluster: Ray Data's read tasks could never be scheduled (the run
    # hangs).
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    monkeypatch.setattr(driver, "autoscaling_cpus", lambda: None)
    with pytest.raises(ConfigError, match="read tasks") as info:
        _cpus_per_worker(_cfg(tmp_path, 2, cpus=1.0), service_cpus=0.0)
    assert info.value.field == "scaling.workers"
    with pytest.raises(ConfigError, match="services"):
        _cpus_per_worker(_cfg(tmp_path, 2), service_cpus=1.0)


def test_an_autoscaling_cluster_too_small_now_is_left_to_its_autoscaler(tmp_path, monkeypatch):
    # A launcher cluster starts with a 0-CPU head (no "CPU" resource at all) and no workers: only growth
    # can fit a run.
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"memory": 2.0**30})
    monkeypatch.setattr(driver, "autoscaling_cpus", lambda: math.inf)
    said: list[str] = []
    assert _cpus_per_worker(_cfg(tmp_path, 2, cpus=1.5), service_cpus=0.0, log=said.append) == 1.5
    assert "autoscaler" in said[0]
    # unset, the share the current cluster gives is nothing: a CPU per worker, for the autoscaler to add
    assert _cpus_per_worker(_cfg(tmp_path, 2), service_cpus=0.0, log=said.append) == 1.0


def test_a_run_bigger_than_the_autoscalers_maximum_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"memory": 2.0**30})
    monkeypatch.setattr(driver, "autoscaling_cpus", lambda: 4.0)
    with pytest.raises(ConfigError, match="cluster's 0, or the 4 its autoscaler may grow it to"):
        _cpus_per_worker(_cfg(tmp_path, 2, cpus=2.0), service_cpus=0.0)


@pytest.mark.ray
def test_a_local_cluster_does_not_count_as_autoscaling(ray_cluster):
    # Its monitor (Ray's read-only node provider) writes an autoscaler report once a request cannot be
    # placed; the answer must still be None, or a run too big for a laptop would wait forever instead of
    # being refused. The unplaceable request makes the monitor write that report.
    from ray._private import ray_constants
    from ray.experimental.internal_kv import _internal_kv_get
    from ray.util.placement_group import placement_group, remove_placement_group

    def report() -> dict | None:
        status = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
        return json.loads(status).get("autoscaler_report") if status else None

    too_big = placement_group([{"CPU": 64}])
    try:
        deadline = time.monotonic() + 60
        while report() is None and time.monotonic() < deadline:
            time.sleep(1)
        assert report() is not None
        assert driver.autoscaling_cpus() is None
    finally:
        remove_placement_group(too_big)


def test_a_run_that_asks_for_gpus_the_cluster_lacks_is_refused(tmp_path, monkeypatch):
    """A service's GPU share (MixNN's index_gpus) or the workers' on a fixed cluster without them would stay
    pending forever; with enough GPUs, or an autoscaler that can add them, the run goes on."""
    monkeypatch.setattr(driver, "autoscaling_cpus", lambda: None)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0})
    with pytest.raises(ConfigError, match=r"asks for 0.25 GPU\(s\).*services 0.25.*has 0") as info:
        _check_gpus(_cfg(tmp_path, 2), service_gpus=0.25)
    assert info.value.field == "method.params"
    gpu_cfg = _cfg(tmp_path, 2)
    gpu_cfg.scaling.gpus_per_worker = 1.0
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0, "GPU": 1.0})
    with pytest.raises(ConfigError) as info:
        _check_gpus(gpu_cfg, service_gpus=0.0)
    assert info.value.field == "scaling.gpus_per_worker"
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0, "GPU": 2.25})
    _check_gpus(gpu_cfg, service_gpus=0.25)  # 2 x 1 + 0.25 fits
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0})
    monkeypatch.setattr(driver, "autoscaling_cpus", lambda: math.inf)
    _check_gpus(gpu_cfg, service_gpus=0.25)  # the autoscaler may add GPU nodes
