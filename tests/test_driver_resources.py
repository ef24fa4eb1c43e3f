"""How the driver sizes Train workers next to the run's services and Ray Data (no cluster needed)."""

import pytest
import ray

from raynoisy.errors import ConfigError
from raynoisy.train.driver import _cpus_per_worker
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
    # 2 workers x 1 CPU on a 2-CPU cluster: Ray Data's read tasks could never be scheduled (the run hangs).
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    with pytest.raises(ConfigError, match="read tasks") as info:
        _cpus_per_worker(_cfg(tmp_path, 2, cpus=1.0), service_cpus=0.0)
    assert info.value.field == "scaling.workers"
    with pytest.raises(ConfigError, match="services"):
        _cpus_per_worker(_cfg(tmp_path, 2), service_cpus=1.0)
