"""benchmarks/cli_runs.py: the stand-ins it writes are read by the real sources, and its run list follows the
preset files (no Ray: the runs themselves are subprocesses of the real CLI, exercised by the benchmark)."""

from __future__ import annotations

import numpy as np
from benchmark_scripts import load_benchmark

from raynoisy.config import presets_dir
from raynoisy.data.catalog import ORIGIN_TEST, ORIGIN_TRAIN, ORIGIN_VAL
from raynoisy.data.sources import load_catalog

cli_runs = load_benchmark("cli_runs")


def test_the_run_list_is_every_preset_of_the_methods():
    expected = sorted(
        (d.name, m) for d in presets_dir().iterdir() for m in ("mixnn", "mlnt") if (d / f"{m}.yaml").exists()
    )
    assert cli_runs.presets(["mixnn", "mlnt"]) == expected
    assert ("digits", "mlnt") in expected and ("clothing1m", "mixnn") in expected


def test_the_cifar100_stand_in_is_read_by_the_cifar100_source(tmp_path):
    catalog = load_catalog("cifar100", cli_runs.write_cifar100_standin(tmp_path))
    train_per_class, test_per_class = cli_runs.CIFAR100_PER_CLASS
    assert catalog.num_classes == 100
    assert np.bincount(catalog.label[catalog.origin == ORIGIN_TRAIN]).tolist() == [train_per_class] * 100
    assert np.bincount(catalog.label[catalog.origin == ORIGIN_TEST]).tolist() == [test_per_class] * 100


def test_the_image_list_stand_in_holds_out_validation_and_test(tmp_path):
    root = cli_runs.write_image_list_standin(tmp_path)
    catalog = load_catalog("image-list", root, {"split_column": "split"})
    per_class = cli_runs.IMAGE_LIST_PER_CLASS
    assert catalog.num_samples == cli_runs.IMAGE_LIST_CLASSES * per_class
    counts = {o: int((catalog.origin == o).sum()) for o in (ORIGIN_TRAIN, ORIGIN_VAL, ORIGIN_TEST)}
    assert counts == {ORIGIN_TRAIN: 80, ORIGIN_VAL: 20, ORIGIN_TEST: 20}
