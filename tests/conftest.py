"""Shared fixtures: one local Ray cluster (2 CPUs) for the whole session, started only by Ray tests."""

import os
import sys
from pathlib import Path

import pytest
import torch

# One intra-op thread: on a loaded 2-core CI machine two OpenMP threads make small steps 10-100x slower.
torch.set_num_threads(1)

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "120")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

FASHION_MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "fashion-mnist"
# Methods the Ray tests register through ``method.module`` (the driver and every Ray worker import them).
PLUGINS = Path(__file__).resolve().parent / "plugins"
sys.path.insert(0, str(PLUGINS))


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=2,
            object_store_memory=300 * 2**20,
            include_dashboard=True,
            runtime_env={
                "env_vars": {"PYTHONPATH": os.pathsep.join([str(PLUGINS), os.environ.get("PYTHONPATH", "")])}
            },
        )
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def fashion_mnist() -> Path:
    if not FASHION_MNIST.exists():
        pytest.skip(f"Fashion-MNIST not found at {FASHION_MNIST}")
    return FASHION_MNIST
