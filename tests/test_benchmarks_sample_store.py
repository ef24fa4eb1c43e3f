"""The sample-store benchmark at a tiny size: both markdown tables parse, with the numbers they must hold.

No timing thresholds (shared machine); the bytes are exact, and every throughput row must be a positive rate
with its ratio to the baseline of the same operation.
"""

from __future__ import annotations

import pytest
from benchmark_scripts import load_benchmark


def markdown_tables(text: str) -> list[list[list[str]]]:
    """Every markdown table in ``text`` as rows of stripped cells, header first, separator row dropped."""
    tables: list[list[list[str]]] = []
    current: list[list[str]] = []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|") and line.rstrip().endswith("|"):
            cells = [cell.strip() for cell in line.strip()[1:-1].split("|")]
            if not all(set(cell) <= {"-", ":"} for cell in cells):
                current.append(cells)
        elif current:
            tables.append(current)
            current = []
    return tables


def test_sample_store_benchmark_prints_parsable_tables(capsys: pytest.CaptureFixture[str]) -> None:
    bench = load_benchmark("sample_store")
    samples, classes, k, batch = 3000, 50, 5, 32
    report = bench.main(
        [
            *("--samples", str(samples), "--classes", str(classes), "--k", str(k)),
            *("--batch-size", str(batch), "--batches", "4", "--rounds", "2", "--baseline-rows", "500"),
            *("--threads", "1"),
        ]
    )
    out = capsys.readouterr().out
    memory, throughput = markdown_tables(out)

    assert memory[0][0] == f"storage ({samples:,} samples x {classes} classes)"
    by_storage = {row[0]: row[1:] for row in memory[1:]}
    assert len(by_storage) == 4
    dense = by_storage["dense float32 [samples, classes]"]
    assert dense == ["200", f"{200 * samples / 1e6:.1f} MB", "1.0x"]
    column = by_storage[f"top-{k} column (fp16 values + int16/32 indices)"]
    assert column[0] == str(k * (2 + 2)) and column[2] == "10.0x"
    store = by_storage["top-k store: column + 8 B id index"]
    assert store[0] == str(k * 4 + 8)

    header, *rows = throughput
    assert header == [
        "operation",
        "implementation",
        "table rows",
        "batch",
        "median ms/batch",
        "IQR ms",
        "rows/s",
        "vs baseline",
    ]
    assert [(r[0], r[1]) for r in rows] == [
        (op, impl) for op in ("gather", "scatter") for impl in (bench.BASELINE, bench.DENSE, bench.TOPK)
    ]
    for op, impl, table_rows, batch_size, median, iqr, rate, ratio in rows:
        assert int(table_rows) == (samples if impl == bench.TOPK else 500)
        assert int(batch_size) == batch
        low, high = (float(x) for x in iqr.split("-"))
        assert 0 <= low <= float(median) <= high
        assert float(rate) > 0 and ratio.endswith("x") and float(ratio[:-1]) > 0
        if impl == bench.BASELINE:
            assert ratio == "1.00x"
        assert float(ratio[:-1]) == pytest.approx(report.ratio(op, impl), abs=0.006)
    assert report.checkpoint_bytes > 0 and "digest checked" in out
