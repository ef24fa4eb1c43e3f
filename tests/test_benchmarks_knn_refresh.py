"""The kNN refresh benchmark at a tiny size: its table parses and holds what it must.

No timing thresholds (shared machine): every time is positive, the baseline's ratio is 1.00x, recalls are in
[0, 1], and the index is the approximate kind its flags ask for.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "knn_refresh.py"


def load_benchmark() -> ModuleType:
    """Import benchmarks/knn_refresh.py by path: ``benchmarks`` is a folder of scripts, not a package."""
    spec = importlib.util.spec_from_file_location("raynoisy_benchmark_knn_refresh", BENCHMARK)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is created
    spec.loader.exec_module(module)
    return module


def markdown_table(text: str) -> list[list[str]]:
    """The one markdown table in ``text`` as rows of stripped cells, header first, separator dropped."""
    rows = []
    for line in text.splitlines():
        if line.startswith("|") and line.rstrip().endswith("|"):
            cells = [cell.strip() for cell in line.strip()[1:-1].split("|")]
            if not all(set(cell) <= {"-", ":"} for cell in cells):
                rows.append(cells)
    return rows


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_knn_refresh_benchmark_prints_a_parsable_table(metric, capsys: pytest.CaptureFixture[str]) -> None:
    bench = load_benchmark()
    n, k = 3000, 5
    report = bench.main(
        [
            *("--n", str(n), "--dim", "16", "--k", str(k), "--metric", metric, "--clusters", "20"),
            *("--exact-queries", "500", "--chunk", "128", "--exact-threshold", "1000"),
            *("--recall-queries", "200", "--add-batch", "700", "--query-batch", "1000"),
            *("--threads", "1", "--compare"),
        ]
    )
    out = capsys.readouterr().out
    header, *rows = markdown_table(out)
    assert header == [
        "method",
        "index",
        "build s",
        f"query s ({n:,} queries)",
        "total s",
        "speed-up vs exact",
        f"recall@{k}",
        "CPU s",
        "speed-up by CPU time",
        "timed",
    ]
    assert [r[0] for r in rows] == [bench.EXACT, "KnnIndex (faiss cpu)", "faiss exact", "faiss HNSW"]
    for _, _, build, query, total, speedup, recall, cpu, cpu_speedup, _ in rows:
        assert float(build) >= 0 and float(query) > 0
        assert float(total) == pytest.approx(float(build) + float(query), abs=0.011)
        assert speedup.endswith("x") and float(speedup[:-1]) > 0
        assert cpu_speedup.endswith("x") and float(cpu) > 0
        assert 0.0 <= float(recall) <= 1.0
    baseline, index, flat, _ = rows
    assert (
        baseline[5] == "1.00x" and baseline[6] == "1.0000" and baseline[9] == "500 queries, scaled to 3,000"
    )
    assert index[1].startswith("ivf-flat nlist 76 nprobe ")  # 3000 // 39 caps the power of two (128)
    assert float(index[6]) >= 0.9 and flat[6] == "1.0000"
    assert report.summary.kind == "ivf-flat" and report.summary.recall_queries == 200
    assert "target (>= 10x faster than exact at recall@10 >= 0.95): " in out
    assert ("NOT MET" in out) != report.target_met
