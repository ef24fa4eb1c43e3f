"""The ingest benchmark at its smallest size: both pipelines must do the same work, and a ratio is printed.

No timing thresholds: the machine is shared and the numbers are only meaningful as a ratio printed for a
human; what a test can pin down is that the ratio compares like with like (same images, same ids).
"""

from __future__ import annotations

import numpy as np
import pytest
from benchmark_scripts import load_benchmark

pytestmark = pytest.mark.ray


def test_ray_data_and_dataloader_deliver_the_same_images_and_print_a_ratio(ray_cluster, tmp_path, capsys):
    bench = load_benchmark("data_ingest")
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

    ratio_lines = [line for line in out.splitlines() if line.startswith("ratio ray-data / DataLoader")]
    assert len(ratio_lines) == 2 and all(line.rstrip().endswith("x") for line in ratio_lines)
    assert report.ratio() > 0
    for measured in report.results.values():  # every pipeline burns CPU to decode its images
        assert measured.cpu_per_image is not None and measured.cpu_per_image > 0


def test_tree_cpu_seconds_counts_a_child_process_after_it_is_reaped():
    """The CPU a DataLoader worker burns must count after the worker exits: a child that spins for 0.6 s of
    CPU raises the tree's total by at least 0.5 s once it has been waited for."""
    import subprocess
    import sys

    bench = load_benchmark("data_ingest")
    before = bench.tree_cpu_seconds()
    spin = "import time\nend = time.process_time() + 0.6\nwhile time.process_time() < end: pass"
    subprocess.run([sys.executable, "-c", spin], check=True)
    assert bench.tree_cpu_seconds() - before >= 0.5
