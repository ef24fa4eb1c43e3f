"""One epoch's kNN refresh with ``KnnIndex`` (add every sample, build, query every sample), against exact
search with torch top-k in chunks, measured in the same run on the same features.

The question (issue 9): MixNN refreshes every training sample's k nearest neighbours every epoch; what does
that cost with the project's FAISS index, compared with the obvious exact computation, and how many true
neighbours does the approximate index find? Target: >= 10x faster than exact at recall@10 >= 0.95.

- **Features**: synthetic, *clustered* Gaussian, like a trained network's embeddings, not uniform noise
  (which has no structure for any index to use and is the worst case of every approximate method):
  ``--clusters`` centres drawn from N(0, I_d); each sample is its centre plus within-cluster noise whose
  per-direction scale decays as ``j ** -decay`` (j = 1..d, in a random orthonormal basis), scaled to an RMS
  norm of ``--spread * sqrt(d)``. With the defaults (100 clusters, decay 0.5, spread 0.6, d 128) the noise
  has an effective dimension (participation ratio of its variances) of ~18, the range reported for deep
  features; the header prints it. Clusters are not classes of a real data set; the figures hold for
  features of this shape.
- **Baseline (exact)**: torch, chunks of ``--chunk`` queries, one matmul against all N vectors
  (``addmm`` of squared norms for l2; the features L2-normalised first for cosine) and ``topk(k + 1)``,
  the query itself dropped. Exact search costs the same for every query, so it is timed on
  ``--exact-queries`` random queries (after one warm-up chunk) and scaled to N: all 200,000 would take
  ~350 CPU seconds, 3 minutes of both cores of the 2-core machine when idle, far more when it is shared.
  Pass ``--exact-queries N`` to time it whole. Its neighbours of those queries are the ground truth of
  every recall below.
- **KnnIndex**: the service class itself, in this process (no Ray: the object-store transfer of the
  features is not counted): ``add`` of every sample in shares of ``--add-batch`` rows, ``build`` (k-means,
  adding to the lists, and the index's own recall measurement and nprobe tuning on ``--recall-queries``
  samples), then ``search_ids`` of every sample (``exclude_self``) in batches of ``--query-batch``. All
  three are timed, and the ratio is the baseline's time over their sum. Recall@k is measured on the
  baseline's queries against the baseline's neighbours (the index reports its own sampled recall too).
- ``--compare`` (CPU only) adds FAISS's exact ``IndexFlat`` (timed and scaled like the baseline) and an
  HNSW index (M 32, efConstruction 40, efSearch 64; its build timed whole, its search on the baseline's
  queries and scaled): the alternatives the index's design was chosen against.

Both torch and FAISS get ``--threads`` threads (default: every CPU of this process). ``--device cuda``
runs the baseline with torch on the GPU, by default at 1,000,000 x 256, and the index where the run's
``KnnIndex`` would put it (``use_gpu="auto"``): GPU FAISS with a faiss-gpu build, else exact torch search on
the GPU (the baseline's computation). ``--backend faiss`` keeps it on FAISS, on the CPU's ``--threads``
threads without a faiss-gpu build: the measurement that chose exact torch search on a GPU (does the CPU
index beat exact search on the GPU beside it? It did not).

    python benchmarks/knn_refresh.py                                  # 200,000 x 128, k 10, CPU, 1-2.5 min
    python benchmarks/knn_refresh.py --n 20000 --dim 32 --exact-threshold 1000     # seconds
    python benchmarks/knn_refresh.py --device cuda                    # 1,000,000 x 256 on a GPU
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

import faiss
import numpy as np
import torch

from raynoisy.knn import BuildSummary, KnnIndex
from raynoisy.knn.index import BACKENDS, EXACT_KINDS, drop_self, exact_knn, recall_at

TARGET_SPEEDUP = 10.0
TARGET_RECALL = 0.95
EXACT = "exact torch top-k"


@dataclass
class Row:
    """One way of finding every sample's k nearest neighbours."""

    method: str
    index: str
    build_s: float  # everything before the queries (adds included)
    query_s: float  # N queries (scaled from a sample when ``timed`` says so)
    recall: float
    timed: str  # how the query time was obtained
    cpu_s: float | None = None  # process CPU seconds of build + queries, scaled alike; None on a GPU

    @property
    def total_s(self) -> float:
        return self.build_s + self.query_s


@dataclass
class Report:
    n: int
    dim: int
    k: int
    device: str
    rows: list[Row]
    summary: BuildSummary
    effective_dim: float

    @property
    def baseline(self) -> Row:
        return self.rows[0]

    @property
    def index_row(self) -> Row:
        return self.rows[1]

    def speedup(self, row: Row) -> float:
        return self.baseline.total_s / row.total_s

    def cpu_speedup(self, row: Row) -> float | None:
        if row.cpu_s is None or self.baseline.cpu_s is None:
            return None
        return self.baseline.cpu_s / row.cpu_s

    @property
    def target_met(self) -> bool:
        row = self.index_row
        return self.speedup(row) >= TARGET_SPEEDUP and row.recall >= TARGET_RECALL


def all_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def clustered_features(
    n: int, dim: int, clusters: int, spread: float, decay: float, seed: int
) -> tuple[np.ndarray, float]:
    """``[n, dim]`` float32 clustered Gaussian features, and the effective dimension of their noise."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((clusters, dim)).astype(np.float32)
    scale = np.arange(1, dim + 1, dtype=np.float64) ** -decay
    scale *= spread * np.sqrt(dim / (scale**2).sum())
    basis, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    mixing = (scale[:, None] * basis.T).astype(np.float32)  # noise = z @ diag(scale) @ basis^T
    out = np.empty((n, dim), dtype=np.float32)
    labels = rng.integers(0, clusters, n)
    for start in range(0, n, 65_536):
        stop = min(n, start + 65_536)
        noise = rng.standard_normal((stop - start, dim), dtype=np.float32) @ mixing
        out[start:stop] = centers[labels[start:stop]] + noise
    variances = scale**2
    return out, float(variances.sum() ** 2 / (variances**2).sum())


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Clock:
    """Wall and process-CPU seconds between laps (CPU time is the cross-check that load from other
    processes does not stretch; on a GPU it says nothing and is not reported)."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def lap(self) -> tuple[float, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        out = wall - self.wall, cpu - self.cpu
        self.wall, self.cpu = wall, cpu
        return out


def exact_torch(
    features: np.ndarray, queries: np.ndarray, k: int, metric: str, chunk: int, device: torch.device
) -> tuple[np.ndarray, float, float]:
    """Exact neighbour rows ``[Q, k]`` of ``queries`` (rows of ``features``, self excluded) and the wall and
    CPU seconds the timed chunks took (one warm-up chunk first, not timed)."""
    base = torch.from_numpy(features).to(device)
    if metric == "cosine":
        base = torch.nn.functional.normalize(base, dim=1)
    sq_norms = (base * base).sum(dim=1)

    def chunk_topk(rows: np.ndarray) -> np.ndarray:
        q = base[torch.from_numpy(rows).to(device)]
        if metric == "cosine":
            scores = q @ base.T
            _, idx = scores.topk(k + 1, dim=1)
        else:  # ||q||^2 is constant per row and drops out of the ranking
            scores = torch.addmm(sq_norms[None, :], q, base.T, beta=1.0, alpha=-2.0)
            _, idx = scores.topk(k + 1, dim=1, largest=False)
        return idx.cpu().numpy()

    chunk_topk(queries[:chunk])  # warm-up: allocator, kernels
    synchronize(device)
    found = []
    clock = Clock()
    for first in range(0, len(queries), chunk):
        found.append(chunk_topk(queries[first : first + chunk]))
    synchronize(device)
    wall, cpu = clock.lap()
    rows = np.concatenate(found)
    rows, _ = drop_self(rows, np.zeros(rows.shape, np.float32), queries)
    return rows, wall, cpu


def run_index(
    features: np.ndarray, args: argparse.Namespace, truth_queries: np.ndarray, truth: np.ndarray
) -> tuple[Row, BuildSummary]:
    n = len(features)
    index = KnnIndex(
        n,
        dim=args.dim,
        metric=args.metric,
        exact_threshold=args.exact_threshold,
        use_gpu="auto" if args.device == "cuda" else False,
        backend=args.backend,
        recall_k=args.k,
        recall_queries=args.recall_queries,
        num_threads=args.threads,
        seed=args.seed,
        verbose=False,
    )
    ids = np.arange(n, dtype=np.int64)
    clock = Clock()
    for first in range(0, n, args.add_batch):
        index.add(0, ids[first : first + args.add_batch], features[first : first + args.add_batch])
    summary = index.build(0)
    build_s, build_cpu = clock.lap()
    found = np.empty((n, args.k), dtype=np.int64)
    for first in range(0, n, args.query_batch):
        found[first : first + args.query_batch] = index.search_ids(
            ids[first : first + args.query_batch], args.k
        )[0]
    query_s, query_cpu = clock.lap()
    if summary.kind in EXACT_KINDS:
        label = f"{summary.kind} (exact)"
    else:
        label = f"{summary.kind} nlist {summary.nlist} nprobe {summary.nprobe}"
    row = Row(
        f"KnnIndex (faiss {summary.device})",
        label,
        build_s,
        query_s,
        recall_at(found[truth_queries], truth),
        f"all {n:,} queries; build = add + build",
        None if summary.device == "gpu" else build_cpu + query_cpu,
    )
    return row, summary


def compare_rows(
    features: np.ndarray, args: argparse.Namespace, truth_queries: np.ndarray, truth: np.ndarray
) -> list[Row]:
    """FAISS exact flat and HNSW, on CPU, for the design's comparison."""
    n, d, k = len(features), args.dim, args.k
    vectors = (
        features / np.linalg.norm(features, axis=1, keepdims=True) if args.metric == "cosine" else features
    )
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    metric = faiss.METRIC_INNER_PRODUCT if args.metric == "cosine" else faiss.METRIC_L2
    scale = n / len(truth_queries)
    queries = vectors[truth_queries]
    rows = []

    clock = Clock()
    _, found = exact_knn(queries, vectors, k + 1, metric)
    query_s, query_cpu = clock.lap()
    found, _ = drop_self(found, np.zeros(found.shape, np.float32), truth_queries)
    recall = recall_at(found, truth)
    timed = scaled(len(queries), n)
    rows.append(Row("faiss exact", "IndexFlat", 0.0, query_s * scale, recall, timed, query_cpu * scale))

    clock = Clock()
    hnsw = faiss.IndexHNSWFlat(d, 32, metric)
    hnsw.hnsw.efConstruction = 40
    hnsw.add(vectors)
    hnsw.hnsw.efSearch = 64
    build_s, build_cpu = clock.lap()
    _, found = hnsw.search(queries, k + 1)
    query_s, query_cpu = clock.lap()
    found, _ = drop_self(found, np.zeros(found.shape, np.float32), truth_queries)
    rows.append(
        Row(
            "faiss HNSW",
            "M 32 efC 40 efSearch 64",
            build_s,
            query_s * scale,
            recall_at(found, truth),
            f"build whole; {timed}",
            build_cpu + query_cpu * scale,
        )
    )
    return rows


def scaled(measured: int, n: int) -> str:
    return f"all {n:,} queries" if measured >= n else f"{measured:,} queries, scaled to {n:,}"


def measure(args: argparse.Namespace) -> Report:
    device = torch.device(args.device)
    features, effective_dim = clustered_features(
        args.n, args.dim, args.clusters, args.spread, args.decay, args.seed
    )
    rng = np.random.default_rng(args.seed + 1)
    queries = np.sort(rng.choice(args.n, size=min(args.exact_queries, args.n), replace=False))
    print(f"[knn_refresh] exact torch top-k on {len(queries):,} queries ...", flush=True)
    truth, exact_s, exact_cpu = exact_torch(features, queries, args.k, args.metric, args.chunk, device)
    scale = args.n / len(queries)
    baseline = Row(
        EXACT,
        f"chunks of {args.chunk:,} queries",
        0.0,
        exact_s * scale,
        1.0,
        scaled(len(queries), args.n),
        None if device.type == "cuda" else exact_cpu * scale,
    )
    print("[knn_refresh] KnnIndex: add, build, query every sample ...", flush=True)
    row, summary = run_index(features, args, queries, truth)
    rows = [baseline, row]
    if args.compare:
        print("[knn_refresh] comparison: faiss exact flat, HNSW ...", flush=True)
        rows += compare_rows(features, args, queries, truth)
    return Report(args.n, args.dim, args.k, args.device, rows, summary, effective_dim)


def format_table(report: Report) -> str:
    k = report.k
    lines = [
        f"| method | index | build s | query s ({report.n:,} queries) | total s | speed-up vs exact | "
        f"recall@{k} | CPU s | speed-up by CPU time | timed |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report.rows:
        cpu_speedup = report.cpu_speedup(row)
        cpu = "-" if row.cpu_s is None else f"{row.cpu_s:.2f}"
        cpu_ratio = "-" if cpu_speedup is None else f"{cpu_speedup:.2f}x"
        lines.append(
            f"| {row.method} | {row.index} | {row.build_s:.2f} | {row.query_s:.2f} | {row.total_s:.2f} | "
            f"{report.speedup(row):.2f}x | {row.recall:.4f} | {cpu} | {cpu_ratio} | {row.timed} |"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--n", type=int, default=None, help="samples (200,000; 1,000,000 on cuda)")
    parser.add_argument("--dim", type=int, default=None, help="feature width (128; 256 on cuda)")
    parser.add_argument(
        "--k", type=int, default=10, help="neighbours per sample, self excluded (%(default)s)"
    )
    parser.add_argument("--metric", choices=["cosine", "l2"], default="cosine")
    parser.add_argument("--clusters", type=int, default=100, help="cluster centres (%(default)s)")
    parser.add_argument("--spread", type=float, default=0.6, help="noise RMS / sqrt(d) (%(default)s)")
    parser.add_argument("--decay", type=float, default=0.5, help="noise scale ~ j^-decay (%(default)s)")
    parser.add_argument(
        "--exact-queries",
        type=int,
        default=8192,
        help="queries the exact baseline is timed on (%(default)s)",
    )
    parser.add_argument("--chunk", type=int, default=2048, help="queries per exact chunk (%(default)s)")
    parser.add_argument(
        "--exact-threshold", type=int, default=50_000, help="KnnIndex: exact below this many (%(default)s)"
    )
    parser.add_argument("--recall-queries", type=int, default=1000, help="KnnIndex's own recall sample")
    parser.add_argument("--add-batch", type=int, default=8192, help="rows per add call (%(default)s)")
    parser.add_argument("--query-batch", type=int, default=8192, help="ids per search call (%(default)s)")
    parser.add_argument(
        "--threads", type=int, default=all_cpus(), help="torch and FAISS threads (%(default)s)"
    )
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default="auto",
        help="KnnIndex's backend (%(default)s; with --device cuda and a faiss-cpu build, auto is exact torch "
        "search on the GPU, the baseline's own computation; faiss keeps the index on FAISS)",
    )
    parser.add_argument("--compare", action="store_true", help="add FAISS exact flat and HNSW rows")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    args.n = args.n if args.n is not None else (1_000_000 if cuda else 200_000)
    args.dim = args.dim if args.dim is not None else (256 if cuda else 128)
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no GPU")
    if cuda and args.compare:
        parser.error("--compare runs on the CPU only (HNSW at 1M x 256 would take far longer than the rest)")
    if args.n < 2 or args.dim < 1 or not 1 <= args.k < args.n:
        parser.error("need --n >= 2, --dim >= 1 and 1 <= --k < --n")
    if min(args.exact_queries, args.chunk, args.add_batch, args.query_batch, args.threads) < 1:
        parser.error("--exact-queries, --chunk, --add-batch, --query-batch and --threads must be >= 1")
    if args.clusters < 1 or args.spread <= 0:
        parser.error("need --clusters >= 1 and --spread > 0")
    return args


def main(argv: Sequence[str] | None = None) -> Report:
    """Run the benchmark, print its table, and return what was measured (thread counts restored after)."""
    args = parse_args(argv)
    previous = torch.get_num_threads(), faiss.omp_get_max_threads()
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    try:
        print(
            f"[knn_refresh] {args.n:,} x {args.dim} {args.metric}, k {args.k}, {args.device}, "
            f"{args.threads} threads; clustered Gaussian features: {args.clusters} clusters, spread "
            f"{args.spread}, decay {args.decay}; torch {torch.__version__}, faiss {faiss.__version__}",
            flush=True,
        )
        report = measure(args)
    finally:
        torch.set_num_threads(previous[0])
        faiss.omp_set_num_threads(previous[1])
    print(f"[knn_refresh] within-cluster noise: effective dimension {report.effective_dim:.1f}")
    print(format_table(report))
    row = report.index_row
    print(
        f"\nspeed-up = exact torch time / the row's total time, for all {args.n:,} samples' {args.k} nearest "
        f"neighbours (self excluded); recall@{args.k} against the exact neighbours of the "
        f"{min(args.exact_queries, args.n):,} baseline queries. The index's own build summary: "
        f"{report.summary.describe()}"
    )
    met = "MET" if report.target_met else "NOT MET"
    print(
        f"target (>= {TARGET_SPEEDUP:g}x faster than exact at recall@10 >= {TARGET_RECALL}): {met} — "
        f"{report.speedup(row):.1f}x at recall@{args.k} {row.recall:.4f}",
        flush=True,
    )
    return report


if __name__ == "__main__":
    main()
