"""Memory and gather/scatter throughput of the per-sample store, against plain dense float32 in the same run.

The question: what does keeping a soft label per training sample cost at WebVision 1.0 scale (2.4M samples x
1,000 classes), in host memory on every rank and in time per training step? ``SampleStore``'s top-k column
(float16 values + int16 class indices) is compared with the obvious storage, a dense float32 [samples,
classes] tensor.

Memory is computed from the storage actually allocated (``SampleStore.nbytes``, ``bytes_per_sample``) and,
for the dense float32 and float16 tables, from their shapes (a 9.6 GB tensor is not allocated to be
weighed).

Throughput is rows per second for batches of ``--batch-size`` (256) sample ids drawn at random without
repetition, all drawn before the clock starts. Three implementations of each operation:

- ``baseline``: a plain dense float32 tensor of ``--baseline-rows`` rows (100,000: same row width, a smaller
  table than the store, so that it fits here) read with ``index_select`` and written with ``index_copy_``
  by ROW index -- no id lookup, no conversion: the least a per-sample table can cost;
- ``store dense fp32``: a ``SampleStore`` dense float32 column over the same number of rows, addressed by
  arbitrary int64 ``sample_id``: the baseline plus the store's id lookup and write path;
- ``store top-k``: the ``SampleStore`` top-k column over all ``--samples`` rows: ``gather`` returns the dense
  renormalised float32 [batch, classes] distribution, ``scatter`` takes dense probabilities and keeps the
  top k.

The ratio is the implementation's rows/s over the baseline's rows/s of the same operation (above 1 = faster).
Every implementation runs ``--batches`` batches per round for ``--rounds`` rounds, the order rotated each
round so that load from other processes hits all alike; each batch is timed, and the table shows the median
and the inter-quartile range. ``scatter`` is measured with one process (a local write); with more ranks
it adds three ``all_gather`` calls of ``world * batch`` compact rows. Torch runs with the threads one
training worker gets here (``--threads``). The store is first filled by scattering every row (timed as
"fill"), then saved and loaded back as one rank's checkpoint (timed; the load must reproduce the digest).

    python benchmarks/sample_store.py                                  # 2.4M x 1,000, top-10, ~1-2 min
    python benchmarks/sample_store.py --samples 20000 --classes 100 --k 5 --batches 20 --rounds 2
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from raynoisy.data.sample_store import SampleStore

GB = 1e9
MB = 1e6
BASELINE = "baseline"
DENSE = "store dense fp32"
TOPK = "store top-k"
FILL_CHUNK = 8192
FILL_POOL = 4  # distinct synthetic probability chunks cycled while filling (generating them costs more)


@dataclass
class Throughput:
    """One implementation of one operation: per-batch seconds over all rounds."""

    operation: str
    implementation: str
    rows: int  # rows in the table it reads/writes
    batch_size: int
    seconds: list[float] = field(default_factory=list)

    @property
    def median_ms(self) -> float:
        return 1e3 * statistics.median(self.seconds)

    @property
    def iqr_ms(self) -> tuple[float, float]:
        if len(self.seconds) < 2:
            return self.median_ms, self.median_ms
        q1, _, q3 = statistics.quantiles(self.seconds, n=4)
        return 1e3 * q1, 1e3 * q3

    @property
    def rows_per_s(self) -> float:
        return self.batch_size / statistics.median(self.seconds)


@dataclass
class Memory:
    storage: str
    bytes_per_sample: float
    total_bytes: float
    measured: bool  # from the allocated store, not from a shape


@dataclass
class Report:
    """What ``main`` measured; the test reads it, people read the printed tables."""

    samples: int
    classes: int
    k: int
    memory: list[Memory]
    throughput: list[Throughput]
    fill_rows_per_s: float
    save_s: float
    load_s: float
    checkpoint_bytes: int

    def ratio(self, operation: str, implementation: str) -> float:
        by_name = {(t.operation, t.implementation): t for t in self.throughput}
        return by_name[operation, implementation].rows_per_s / by_name[operation, BASELINE].rows_per_s


def trainer_threads() -> int:
    """Torch threads one training worker gets here (as in meta_step.py): about half the CPUs, at most 8."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, int(min(8.0, math.floor(4 * cpus / 2) / 4)))


def arbitrary_ids(n: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted, unique, non-contiguous int64 ids (gaps of 1-8, starting beyond the int32 range)."""
    return np.cumsum(rng.integers(1, 9, size=n, dtype=np.int64)) + 2**32


def synthetic_probs(rng: torch.Generator, rows: int, classes: int) -> torch.Tensor:
    """Peaked probability rows (uniform noise to the 8th power, normalised): a few classes hold most mass."""
    p = torch.rand(rows, classes, generator=rng).pow_(8)
    return p.div_(p.sum(dim=1, keepdim=True))


def fill(store: SampleStore, name: str, classes: int, rng: torch.Generator) -> float:
    """Scatter every row of ``store`` in chunks; returns rows/s."""
    pool = [synthetic_probs(rng, FILL_CHUNK, classes) for _ in range(FILL_POOL)]
    ids = store.sample_ids
    start = time.perf_counter()
    for i, first in enumerate(range(0, len(ids), FILL_CHUNK)):
        chunk = ids[first : first + FILL_CHUNK]
        store.scatter(name, chunk, pool[i % FILL_POOL][: len(chunk)])
    return len(ids) / (time.perf_counter() - start)


def batches(rng: np.random.Generator, population: int, batch_size: int, count: int) -> list[np.ndarray]:
    return [rng.choice(population, size=batch_size, replace=False) for _ in range(count)]


def measure(args: argparse.Namespace) -> Report:
    rng = np.random.default_rng(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    n, c, b = args.samples, args.classes, args.batch_size
    base_rows = min(args.baseline_rows, n)

    print(f"[sample_store] building the top-{args.k} store over {n:,} ids ...", flush=True)
    store = SampleStore(arbitrary_ids(n, rng))
    store.add_topk("soft", c, args.k)
    fill_rate = fill(store, "soft", c, gen)
    print(f"[sample_store] filled {n:,} rows at {fill_rate:,.0f} rows/s", flush=True)

    small = SampleStore(arbitrary_ids(base_rows, rng))
    small.add_dense("soft", c, dtype=torch.float32)
    baseline = torch.rand(base_rows, c, generator=gen)
    small.scatter("soft", small.sample_ids, baseline)  # same contents, all pages touched

    total = args.batches * args.rounds
    store_batches = [store.sample_ids[rows] for rows in batches(rng, n, b, total)]
    small_rows = batches(rng, base_rows, b, total)
    small_batches = [small.sample_ids[rows] for rows in small_rows]
    base_batches = [torch.from_numpy(rows) for rows in small_rows]
    values = [synthetic_probs(gen, b, c) for _ in range(8)]

    runs: list[tuple[Throughput, Callable[[int], object]]] = [
        (Throughput("gather", BASELINE, base_rows, b), lambda i: baseline.index_select(0, base_batches[i])),
        (Throughput("gather", DENSE, base_rows, b), lambda i: small.gather("soft", small_batches[i])),
        (Throughput("gather", TOPK, n, b), lambda i: store.gather("soft", store_batches[i])),
        (
            Throughput("scatter", BASELINE, base_rows, b),
            lambda i: baseline.index_copy_(0, base_batches[i], values[i % 8]),
        ),
        (
            Throughput("scatter", DENSE, base_rows, b),
            lambda i: small.scatter("soft", small_batches[i], values[i % 8]),
        ),
        (
            Throughput("scatter", TOPK, n, b),
            lambda i: store.scatter("soft", store_batches[i], values[i % 8]),
        ),
    ]
    for _, fn in runs:  # warm-up: allocator, lazy kernels
        for i in range(min(3, total)):
            fn(i)
    for round_ in range(args.rounds):
        shift = round_ % len(runs)
        for result, fn in runs[shift:] + runs[:shift]:
            for i in range(round_ * args.batches, (round_ + 1) * args.batches):
                start = time.perf_counter()
                fn(i)
                result.seconds.append(time.perf_counter() - start)

    with tempfile.TemporaryDirectory(prefix="raynoisy-sample-store-") as tmp:
        start = time.perf_counter()
        path = store.save(tmp, rank=0, world_size=1)
        save_s = time.perf_counter() - start
        checkpoint_bytes = path.stat().st_size
        start = time.perf_counter()
        restored = SampleStore(store.sample_ids)
        restored.add_topk("soft", c, args.k)
        restored.load(tmp)
        load_s = time.perf_counter() - start
        if restored.digest() != store.digest():
            raise AssertionError("the loaded store differs from the saved one")
        del restored

    column = store.bytes_per_sample("soft")
    memory = [
        Memory("dense float32 [samples, classes]", 4 * c, 4.0 * c * n, measured=False),
        Memory("dense float16 [samples, classes]", 2 * c, 2.0 * c * n, measured=False),
        Memory(f"top-{args.k} column (fp16 values + int16/32 indices)", column, column * n, measured=True),
        Memory("top-k store: column + 8 B id index", store.bytes_per_sample(), store.nbytes(), measured=True),
    ]
    return Report(
        samples=n,
        classes=c,
        k=args.k,
        memory=memory,
        throughput=[result for result, _ in runs],
        fill_rows_per_s=fill_rate,
        save_s=save_s,
        load_s=load_s,
        checkpoint_bytes=checkpoint_bytes,
    )


def format_memory(report: Report) -> str:
    dense = report.memory[0]
    lines = [
        f"| storage ({report.samples:,} samples x {report.classes:,} classes) | bytes/sample | total | "
        "dense fp32 / this |",
        "|---|---|---|---|",
    ]
    for m in report.memory:
        total = f"{m.total_bytes / GB:.3f} GB" if m.total_bytes >= GB else f"{m.total_bytes / MB:.1f} MB"
        ratio = dense.total_bytes / m.total_bytes
        lines.append(f"| {m.storage} | {m.bytes_per_sample:g} | {total} | {ratio:.1f}x |")
    return "\n".join(lines)


def format_throughput(report: Report) -> str:
    lines = [
        "| operation | implementation | table rows | batch | median ms/batch | IQR ms | rows/s "
        "| vs baseline |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for t in report.throughput:
        q1, q3 = t.iqr_ms
        lines.append(
            f"| {t.operation} | {t.implementation} | {t.rows} | {t.batch_size} | {t.median_ms:.3f} "
            f"| {q1:.3f}-{q3:.3f} | {t.rows_per_s:.0f} | {report.ratio(t.operation, t.implementation):.2f}x |"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samples", type=int, default=2_400_000, help="rows of the store (%(default)s)")
    parser.add_argument("--classes", type=int, default=1000, help="classes per soft label (%(default)s)")
    parser.add_argument("--k", type=int, default=10, help="soft-label entries kept per row (%(default)s)")
    parser.add_argument("--batch-size", type=int, default=256, help="rows per gather/scatter (%(default)s)")
    parser.add_argument("--batches", type=int, default=100, help="timed batches per round (%(default)s)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds, order rotated (%(default)s)")
    parser.add_argument(
        "--baseline-rows",
        type=int,
        default=100_000,
        help="rows of the dense fp32 baseline tables (%(default)s; at most --samples)",
    )
    parser.add_argument(
        "--threads", type=int, default=trainer_threads(), help="torch threads (%(default)s: one worker's)"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.samples < 1 or args.classes < 1 or not 1 <= args.k <= args.classes:
        parser.error("need --samples >= 1 and 1 <= --k <= --classes")
    if not 1 <= args.batch_size <= min(args.samples, args.baseline_rows):
        parser.error("--batch-size must be between 1 and min(--samples, --baseline-rows)")
    if args.batches < 1 or args.rounds < 1 or args.threads < 1:
        parser.error("--batches, --rounds and --threads must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> Report:
    """Run the benchmark, print its tables, and return what was measured (torch threads restored after)."""
    args = parse_args(argv)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        print(
            f"[sample_store] {args.samples:,} samples x {args.classes:,} classes, top-{args.k}; batch "
            f"{args.batch_size}, {args.rounds} rounds x {args.batches} batches per implementation; "
            f"{args.threads} torch threads; torch {torch.__version__}",
            flush=True,
        )
        report = measure(args)
    finally:
        torch.set_num_threads(previous_threads)
    print(format_memory(report))
    print()
    print(format_throughput(report))
    print(
        f"\nbaseline = a plain dense float32 tensor of {min(args.baseline_rows, args.samples):,} rows x "
        f"{args.classes:,}, index_select / index_copy_ by row index (no id lookup); vs baseline = rows/s "
        "over the baseline's (above 1 = faster). store dense fp32 = a SampleStore float32 column of the same "
        "rows, by sample_id; store top-k = the top-k column over all samples (gather densifies to float32 "
        "[batch, classes], scatter selects the top k of dense probabilities). Single process: scatter is a "
        "local write."
    )
    print(
        f"fill (scatter of every row, chunks of {FILL_CHUNK:,}): {report.fill_rows_per_s:,.0f} rows/s; "
        f"checkpoint of the top-k store as 1 rank: {report.checkpoint_bytes / MB:.1f} MB, "
        f"save {report.save_s:.2f} s, load {report.load_s:.2f} s (digest checked)",
        flush=True,
    )
    return report


if __name__ == "__main__":
    main()
