"""Shared fixtures: one local Ray cluster (2 CPUs) for the whole session, started only by Ray tests."""

import gzip
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

# One intra-op thread: on a loaded 2-core CI machine two OpenMP threads make small steps 10-100x slower.
torch.set_num_threads(1)

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "120")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

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


# Generated stand-ins for ../shared/data, in the same formats, so that a clean clone runs every test.
FASHION_TRAIN, FASHION_TEST = 600, 100
SST2_LINES = {
    "senti.binary.train": [
        "hide new secretions from the parental units\t0",
        "contains no wit , only labored gags\t0",
        "that loves its characters\t1",
    ],
    "senti.binary.dev": ["It 's a charming and often affecting journey .\t1", "unflinchingly bleak\t0"],
    "senti.binary.test": ["no movement , no yuks , not much of anything .\t0"],
}


def write_idx(path: Path, magic: int, shape: tuple[int, ...], data: bytes) -> None:
    """An idx file (the MNIST format: magic, dimensions, bytes), gzipped if the name ends in .gz."""
    header = magic.to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in shape)
    path.write_bytes(gzip.compress(header + data) if path.suffix == ".gz" else header + data)


@pytest.fixture(scope="session")
def fashion_mnist(tmp_path_factory) -> Path:
    """A Fashion-MNIST folder (the four idx .gz files) of FASHION_TRAIN + FASHION_TEST random images."""
    root = tmp_path_factory.mktemp("fashion-mnist")
    rng = np.random.default_rng(0)
    for prefix, n in (("train", FASHION_TRAIN), ("t10k", FASHION_TEST)):
        write_idx(
            root / f"{prefix}-images-idx3-ubyte.gz",
            0x803,
            (n, 28, 28),
            rng.integers(0, 256, n * 784, np.uint8).tobytes(),
        )
        write_idx(
            root / f"{prefix}-labels-idx1-ubyte.gz", 0x801, (n,), rng.integers(0, 10, n, np.uint8).tobytes()
        )
    return root


@pytest.fixture(scope="session")
def sst2(tmp_path_factory) -> Path:
    """An SST-2 folder in the format of ../shared/data/sst2 (``text<TAB>label`` per line, three files)."""
    root = tmp_path_factory.mktemp("sst2")
    for name, lines in SST2_LINES.items():
        (root / name).write_text("\n".join(lines) + "\n")
    return root
