"""The ingest benchmark at its smallest size: both pipelines must do the same work, and a ratio is printed.

No timing thresholds: the machine is shared and the numbers are only meaningful as a ratio printed for a
human; what a test can pin down is that the ratio compares like with like (same images, same ids).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

pytestmark = pytest.mark.ray

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "data_ingest.py"


def _load_benchmark() -> ModuleType:
    """Import by path: ``benchmarks/`` is a folder of scripts, not a package on ``sys.path``."""
    spec = importlib.util.spec_from_file_location("data_ingest_benchmark", BENCHMARK)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_ray_data_and_dataloader_deliver_the_same_images_and_print_a_ratio(ray_cluster, tmp_path, capsys):
    bench = _load_benchmark()
    report = bench.main(["--small", "--epochs", "1", "--workdir", str(tmp_path)])
    out = capsys.readouterr().out

    dataloader, ray_data = report.results[bench.DATALOADER], report.results[bench.RAY_DATA]
    expected = report.expected_ids
    assert len(expected) > 0 and len(np.unique(expected)) == len(expected)
    for measured in (dataloader, ray_data):
        assert len(measured.epochs) == 1
        for epoch in measured.epochs:
            assert epoch.images == len(expected)
            np.testing.assert_array_equal(epoch.ids, expected)  # sorted: same set, each id exactly once
    assert dataloader.images == ray_data.images

    # streaming_split(equal=True) may drop at most one row per extra rank to keep the ranks in step.
    split = report.results[bench.RAY_SPLIT]
    for epoch in split.epochs:
        assert len(expected) - (bench.SPLIT_WAYS - 1) <= epoch.images <= len(expected)
        assert len(np.unique(epoch.ids)) == epoch.images and np.isin(epoch.ids, expected).all()

    ratio_lines = [line for line in out.splitlines() if line.startswith("ratio Ray Data / DataLoader")]
    assert len(ratio_lines) == 1 and ratio_lines[0].rstrip().endswith("x")
    assert report.ratio() > 0
