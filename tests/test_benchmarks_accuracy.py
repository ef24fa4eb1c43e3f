"""benchmarks/accuracy.py's table: mean ± std per (noise, method), the CE delta, and label quality."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "accuracy.py"


def load_benchmark() -> ModuleType:
    """Import benchmarks/accuracy.py by path: ``benchmarks`` is a folder of scripts, not a package."""
    spec = importlib.util.spec_from_file_location("raynoisy_benchmark_accuracy", BENCHMARK)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_table_rows_deltas_and_label_quality() -> None:
    bench = load_benchmark()
    results = {
        ("flip:0.4", "ce"): [{"test_accuracy": 0.80}, {"test_accuracy": 0.84}],
        ("flip:0.4", "mlc"): [
            {
                "test_accuracy": 0.85,
                "label_correction": {"corrected_label_accuracy": 0.9, "given_label_accuracy": 0.6},
            },
            {
                "test_accuracy": 0.87,
                "label_correction": {"corrected_label_accuracy": 0.8, "given_label_accuracy": 0.6},
            },
        ],
        ("flip:0.4", "mwnet"): [
            {
                "test_accuracy": 0.83,
                "sample_weights": {"mean_weight_clean": 0.9, "mean_weight_mislabelled": 0.1},
            }
        ],
    }
    rows = bench.table(results).splitlines()[2:]
    assert rows[0].startswith("| flip:0.4 | ce | 0.8200 ± 0.0283 | 0.8000 / 0.8400 | +0.0000 |")
    assert "| 0.8600 ± 0.0141 |" in rows[1] and "| +0.0400 |" in rows[1]
    assert rows[1].endswith("| 0.8500 (0.6000) |")
    assert rows[2].endswith("| weights 0.90 / 0.10 |") and "| +0.0100 |" in rows[2]


@pytest.mark.parametrize(
    ("text", "expected"), [("flip:0.4", ("flip", 0.4)), ("uniform:0.8", ("uniform", 0.8))]
)
def test_parse_noise(text: str, expected: tuple[str, float]) -> None:
    assert load_benchmark().parse_noise(text) == expected
