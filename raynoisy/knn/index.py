"""``KnnIndex``: the run's FAISS index of every training sample's features, served by one Ray actor.

A method declares it as a service (a plain class; the driver makes it a named, restartable actor)::

    ServiceSpec("knn-index", KnnIndex, kwargs={"num_samples": n, "dim": 128}, num_cpus=2, max_concurrency=4)

and every epoch (DESIGN.md; reference/ray.md §4.4)::

    each rank: add(epoch, my_ids, my_features)      # numpy float16/float32 [b, d], through the object store
    barrier; rank 0: build(epoch); barrier          # versioned, idempotent
    any rank:  search_ids(ids, k) / search_vectors(vectors, k)    # batched, during the next epoch

**Storage.** Vectors are kept by ``sample_id`` (a preallocated ``[N, d]`` buffer per version, float32 or
float16; rows in the order of the sorted training ids), never by rank: Ray Data hands any sample to any rank
in any epoch. Each version has its own buffer, so adds for the next version never disturb searches of the
built one, and a build swaps the new index in atomically: searches in flight finish on the old one.
Memory: the buffer (``N*d*4`` B, half with float16) plus FAISS's own float32 copy (``N*d*4`` B), plus the
next version's buffer while it is being added. 1M x 256: 1 GB + 1 GB (+1 GB).

**Metrics.** ``cosine``: features are L2-normalised on ``add`` (a zero vector stays zero) and searched by
inner product; the values returned are cosine similarities, higher = nearer. ``l2``: squared Euclidean
distances (FAISS's convention), lower = nearer. Results are ``(sample_ids int64 [B, k], values float32
[B, k])``, nearest first; ``exclude_self`` drops the query's own id (searching ``k + 1``).

**Exact below ``exact_threshold``, IVF-Flat above.** Below the threshold (default 50,000) the index is
``IndexFlatIP``/``IndexFlatL2``: exact, nothing to train. Above it, ``IndexIVFFlat``: k-means (6
iterations on at most 40 points per list; more changed no recall measurably) into ``nlist`` lists (default
the power of two at or above ``2*sqrt(N)``, at most ``N/39``: 1,024 for 200k, 2,048 for 1M), each query
scanning its ``nprobe`` nearest lists. Why IVF-Flat rather than HNSW, for this use (the whole index rebuilt
every epoch, then every sample queried once):

- the build is paid again every epoch, and HNSW's graph is the expensive part. ``benchmarks/knn_refresh.py
  --compare`` on the project's shared 2-core CPU machine, 200,000 x 128 clustered features, cosine,
  k = 10, add + build + query of all 200,000, in process-CPU seconds (wall times were stretched ~3x by
  other load): IVF-Flat (nlist 1,024, tuned nprobe 5) 19.9 CPU s at recall@10 0.969 (build 14 s wall);
  HNSW (M 32, efConstruction 40, efSearch 64) 81.5 CPU s at recall@10 0.971 (build 251 s wall); exact:
  torch top-k 348 CPU s, FAISS IndexFlat 370 CPU s. So 17.5x exact by CPU time (20.4x by wall) for IVF,
  4.3x for HNSW at the same recall;
- the same index type runs on the GPU (``GpuIndexIVFFlat``; FAISS has no GPU HNSW), so CPU and GPU runs of
  the same config search the same structure;
- recall is tuned after the build at no cost: ``nprobe`` is a search-time knob. At every build the index
  measures recall@``recall_k`` against exact search on ``recall_queries`` random training samples (brute
  force over the buffer, self excluded) and raises ``nprobe`` from ``nprobe`` (default 1) along 1, 2, 3,
  4, 5, 7, 9, 12, ... (x1.25) to the first value whose measured recall reaches ``target_recall`` (0.95),
  or to ``nlist`` (every list probed: exact). 1,000 queries x 10 neighbours give the recall to about
  +-0.005. The recall is in the build summary, returned to the caller (put it in the epoch's scalars) and
  logged;
- IVF-Flat keeps full vectors (no quantisation error); memory is the same as the flat index.

**Devices.** ``use_gpu="auto"``: GPU FAISS when the actor sees a GPU (``faiss.get_num_gpus() > 0``, i.e. a
faiss-gpu build and ``num_gpus > 0`` in the ServiceSpec); else, when torch sees a GPU (a faiss-cpu build on a
GPU node: faiss-gpu's wheels are built for CUDA 12, so a CUDA 13 torch has none beside it), exact search
with torch on that GPU (kind ``torch-flat``); else CPU FAISS. ``True`` insists on one of the two GPU ways,
``False`` never. Exact on the GPU rather than CPU IVF, at every size: ``benchmarks/knn_refresh.py --device
cuda`` on an H200 (1,000,000 x 256, k 10, every sample queried) took 21.7 s for exact torch top-k on the
GPU against 48.3 s for this index's IVF-Flat on 16 CPU threads (recall@10 0.96); at MixNN's Fashion-MNIST
size (58,000 x 128) the CPU index on its one thread took 12.8 s of a 15.7 s epoch. ``backend="torch"``
takes the torch way on whatever device torch has (the CPU too: tests, and comparisons).
FAISS's OpenMP threads are set to the actor's CPUs (its Ray ``num_cpus``, at least 1; outside Ray,
torch's thread count when torch is loaded; ``num_threads`` overrides). CPU searches run concurrently
(``max_concurrency > 1``); GPU searches are serialised (GPU indexes are not thread-safe). On GPU FAISS,
k + 1 and nprobe are at most 2,048.

**Versions and the restart contract.** ``build(v)`` needs every training sample added for version ``v``
(else ``IndexNotReadyError`` naming how many are missing). It is idempotent: a retried ``build(v)`` returns
the same summary and changes nothing; adds for a version at or below the built one are ignored (a worker
group that restarts and replays an epoch keeps the index built from the first attempt's features; give
versions that encode the attempt if that matters). If Ray restarts the actor (it is started with
``max_restarts=-1``), ``__init__`` runs again and the index is empty: ``version()`` is -1 and a search or a
build of an un-added version raises ``IndexNotReadyError``. The caller therefore keeps its share of the
epoch's features until the next refresh and, on that error or a ``version()`` below the expected one, adds
them again and builds: the epoch is not lost. Nothing of the index is checkpointed; it is derived state,
rebuilt from the model's features.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

import faiss
import numpy as np

from raynoisy.knn.checks import (
    DEFAULT_EXACT_THRESHOLD,
    check_dim,
    check_exact_threshold,
    check_int,
    check_metric,
    check_num_samples,
    check_storage_dtype,
    check_target_recall,
    check_use_gpu,
)
from raynoisy.knn.errors import IndexNotReadyError, NonFiniteFeaturesError, format_ids

logger = logging.getLogger(__name__)

KIND_FLAT = "flat"
KIND_IVF = "ivf-flat"
KIND_TORCH = "torch-flat"  # exact, torch matmul + top-k
EXACT_KINDS = (KIND_FLAT, KIND_TORCH)
BACKENDS = ("auto", "faiss", "torch")
TORCH_SCORES = 2**28  # query x base scores one torch search chunk holds (1 GiB in float32)
KMEANS_ITERATIONS = 6
KMEANS_POINTS_PER_LIST = 40  # k-means trains on at most this many points per list
MIN_POINTS_PER_LIST = 39  # FAISS warns below 39 training points per centroid
NPROBE_GROWTH = 1.25  # the nprobe tuning's steps: 1, 2, 3, 4, 5, 7, 9, 12, 15, 19, 24, ...
GPU_MAX_K = 2048  # FAISS GPU's largest k and nprobe
ADD_CHUNK = 65_536  # rows converted to float32 and added at a time
QUERY_CHUNK = 16_384  # queries per FAISS search call
NORM_EPS = 1e-12


@dataclass(frozen=True)
class BuildSummary:
    """What a build made and how good it is; the same object for a retried build of the same version."""

    version: int
    n: int
    dim: int
    metric: str
    kind: str  # "flat" (exact), "torch-flat" (exact, torch) or "ivf-flat"
    device: str  # "cpu" or "gpu"
    build_s: float  # training (k-means) + adding every vector
    recall: float  # mean recall@recall_k over the sampled queries; 1.0 for "flat" (exact by construction)
    recall_k: int
    recall_queries: int  # queries the recall was measured on (0: exact, not measured)
    recall_s: float  # exact search of the sampled queries + the nprobe search(es)
    nlist: int  # 0 for "flat"
    nprobe: int  # the nprobe searches use; 0 for "flat"
    threads: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        shape = f"{self.n:,} x {self.dim} {self.metric}"
        if self.kind in EXACT_KINDS:
            how = f"{self.kind} (exact)"
            quality = f"recall@{self.recall_k} 1.0 by construction"
        else:
            how = f"{self.kind} (nlist {self.nlist}, nprobe {self.nprobe})"
            quality = (
                f"recall@{self.recall_k} {self.recall:.4f} against exact on {self.recall_queries:,} "
                f"sampled queries ({self.recall_s:.2f} s)"
            )
        return (
            f"knn index version {self.version}: {shape}, {how} on {self.device} with {self.threads} "
            f"thread(s), built in {self.build_s:.2f} s; {quality}"
        )


@dataclass
class _Staging:
    """The vectors of one version being added: a row per training sample."""

    version: int
    vectors: np.ndarray  # [N, d], storage dtype
    present: np.ndarray  # [N] bool
    count: int = 0


@dataclass
class _Built:
    version: int
    index: Any  # faiss.Index
    vectors: np.ndarray  # the version's buffer: query vectors of search_ids
    summary: BuildSummary


def actor_threads() -> int:
    """CPUs this process may use for FAISS: the Ray actor's ``num_cpus`` inside Ray; else, when torch is
    loaded (an index the in-process backend builds beside its training), torch's intra-op thread count,
    which that backend caps for a grid of one process per core; else OMP_NUM_THREADS, else the CPUs of the
    affinity mask."""
    ray = sys.modules.get("ray")  # never imported here: inside an actor Ray already is
    if ray is not None and ray.is_initialized():
        try:
            cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
        except Exception:  # the driver (not a worker) has no assigned resources
            cpus = None
        if cpus is not None:
            return max(1, math.floor(cpus))
    torch = sys.modules.get("torch")  # never imported here: an index on its own does not need it
    if torch is not None:
        return max(1, torch.get_num_threads())
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def auto_nlist(n: int) -> int:
    """The power of two at or above 2*sqrt(n), at most n/39 (FAISS's least training points per list)."""
    nlist = 1 << max(0, math.ceil(math.log2(2 * math.sqrt(n))))
    return max(1, min(nlist, n // MIN_POINTS_PER_LIST))


def drop_self(labels: np.ndarray, values: np.ndarray, self_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """From ``[B, k+1]`` results, the ``[B, k]`` without each query's own row (or without the last column
    where the query itself is not among them, as an approximate search or exact duplicates may give)."""
    b, k1 = labels.shape
    is_self = labels == self_rows[:, None]
    absent = ~is_self.any(axis=1)
    is_self[absent, -1] = True
    keep = ~is_self
    return labels[keep].reshape(b, k1 - 1), values[keep].reshape(b, k1 - 1)


def recall_at(approx: np.ndarray, exact: np.ndarray) -> float:
    """Mean over rows of |approx ∩ exact| / k for ``[B, k]`` neighbour rows (-1 entries never count)."""
    hits = (approx[:, :, None] == exact[:, None, :]).any(axis=2) & (approx >= 0)
    return float(hits.sum(axis=1).mean() / exact.shape[1])


def exact_knn(
    queries: np.ndarray, base: np.ndarray, k: int, metric: int, gpu_resources: Any = None
) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force top-``k`` of float32 ``queries`` over ``base`` (any float dtype, converted in chunks)."""
    inner = metric == faiss.METRIC_INNER_PRODUCT
    best_v: np.ndarray | None = None
    best_i: np.ndarray | None = None
    for start in range(0, len(base), ADD_CHUNK):
        block = np.ascontiguousarray(base[start : start + ADD_CHUNK], dtype=np.float32)
        kk = min(k, len(block))
        if gpu_resources is not None:
            v, i = faiss.knn_gpu(gpu_resources, queries, block, kk, metric=metric)
        else:
            v, i = faiss.knn(queries, block, kk, metric=metric)
        i = i.astype(np.int64) + start
        if best_v is None:
            best_v, best_i = v, i
            continue
        v = np.concatenate([best_v, v], axis=1)
        i = np.concatenate([best_i, i], axis=1)
        order = np.argsort(-v if inner else v, axis=1, kind="stable")[:, :k]
        best_v, best_i = np.take_along_axis(v, order, 1), np.take_along_axis(i, order, 1)
    assert best_v is not None and best_i is not None
    return best_v, best_i


class TorchFlat:
    """Exact search with torch: one matmul of a chunk of queries against every stored vector, then top-k.

    Answers the FAISS ``Index`` calls the class makes of a built index (``search``, ``ntotal``), so built
    indexes of either backend are searched alike. Holds ``vectors`` on ``device`` as float32, copied there
    in chunks of ``ADD_CHUNK`` rows; a search chunk holds at most ``TORCH_SCORES`` scores. Values follow
    FAISS: inner products (highest first) or squared L2 distances (lowest first).
    """

    def __init__(self, vectors: np.ndarray, metric: str, device: Any) -> None:
        import torch  # only an index on this backend needs it

        self._torch, self._inner = torch, metric == "cosine"
        self._base = torch.cat(
            [
                torch.from_numpy(np.asarray(vectors[first : first + ADD_CHUNK], np.float32)).to(device)
                for first in range(0, len(vectors), ADD_CHUNK)
            ]
        )
        self._sq_norms = None if self._inner else (self._base * self._base).sum(1)

    @property
    def ntotal(self) -> int:
        return len(self._base)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        torch, base = self._torch, self._base
        q_all = torch.from_numpy(np.asarray(queries, np.float32)).to(base.device)
        values, labels = [], []
        for q in q_all.split(max(1, TORCH_SCORES // len(base))):
            scores = q @ base.T
            if not self._inner:  # |q|^2 - 2 q.b + |b|^2, clamped: rounding can make it slightly negative
                scores = (scores.mul_(-2).add_(self._sq_norms).add_((q * q).sum(1, keepdim=True))).clamp_(0)
            v, i = scores.topk(min(k, len(base)), dim=1, largest=self._inner)
            values.append(v.cpu())
            labels.append(i.cpu())
        return torch.cat(values).numpy(), torch.cat(labels).numpy().astype(np.int64)


def torch_gpu() -> Any:
    """The GPU torch sees in this process (``cuda:0``), or None; imports torch only when it is installed."""
    try:
        import torch
    except ImportError:
        return None
    return torch.device("cuda", 0) if torch.cuda.is_available() else None


class KnnIndex:
    """Versioned kNN index over the training samples' features (see the module docstring for the contract).

    ``num_samples`` (ids ``0..N-1``) or ``sample_ids`` (the training split's ids, sorted, unique) says which
    samples it holds. ``exact_threshold``: from this many samples on, the index is IVF-Flat (approximate).
    ``nlist`` (None: ``auto_nlist``), ``nprobe`` (the first one tried), ``target_recall``, ``recall_k`` and
    ``recall_queries`` tune and measure it. ``storage_dtype`` "float16" halves the staging buffers.
    ``backend``: "auto" (the module docstring's devices), "faiss" (FAISS only) or "torch" (exact torch
    search on the GPU torch sees, else on the CPU).
    """

    def __init__(
        self,
        num_samples: int | None = None,
        *,
        dim: int,
        sample_ids: Any = None,
        metric: str = "cosine",
        exact_threshold: int = DEFAULT_EXACT_THRESHOLD,
        use_gpu: bool | str = "auto",
        backend: str = "auto",
        storage_dtype: str = "float32",
        nlist: int | None = None,
        nprobe: int = 1,
        target_recall: float = 0.95,
        recall_k: int = 10,
        recall_queries: int = 1000,
        num_threads: int | None = None,
        seed: int = 0,
        verbose: bool = True,
    ) -> None:
        if (num_samples is None) == (sample_ids is None):
            raise ValueError("KnnIndex takes exactly one of num_samples and sample_ids")
        if sample_ids is None:
            n = check_num_samples(num_samples, "KnnIndex.num_samples", exclude_self=False)
            self._ids = np.arange(n, dtype=np.int64)
            self._contiguous = True
        else:
            ids = np.asarray(sample_ids)
            if ids.ndim != 1 or ids.dtype.kind not in "iu":
                raise ValueError(
                    f"KnnIndex.sample_ids must be a 1-d integer array, got {ids.dtype} {ids.shape}"
                )
            ids = ids.astype(np.int64)
            if len(ids) and not (np.diff(ids) > 0).all():
                raise ValueError("KnnIndex.sample_ids must be sorted and unique")
            check_num_samples(len(ids), "KnnIndex.sample_ids", exclude_self=False)
            self._ids = ids
            self._contiguous = bool(ids[0] == 0 and ids[-1] == len(ids) - 1)
        self._n = len(self._ids)
        self._dim = check_dim(dim, "KnnIndex.dim")
        self._metric = check_metric(metric, "KnnIndex.metric")
        self._faiss_metric = faiss.METRIC_INNER_PRODUCT if self._metric == "cosine" else faiss.METRIC_L2
        self._exact_threshold = check_exact_threshold(exact_threshold, "KnnIndex.exact_threshold")
        self._storage = np.dtype(check_storage_dtype(storage_dtype, "KnnIndex.storage_dtype"))
        self._nlist = (
            None
            if nlist is None
            else check_int(nlist, "KnnIndex.nlist", minimum=1, fix="set a number of lists, or None (auto)")
        )
        self._nprobe = check_int(nprobe, "KnnIndex.nprobe", minimum=1, fix="set e.g. 1")
        self._target_recall = check_target_recall(target_recall, "KnnIndex.target_recall")
        self._recall_k = check_int(recall_k, "KnnIndex.recall_k", minimum=1, fix="set e.g. 10")
        self._recall_queries = check_int(
            recall_queries, "KnnIndex.recall_queries", minimum=1, fix="set e.g. 1000"
        )
        self._seed = int(seed)
        self._verbose = verbose

        want_gpu = check_use_gpu(use_gpu, "KnnIndex.use_gpu")
        if backend not in BACKENDS:
            raise ValueError(f"KnnIndex.backend must be one of {list(BACKENDS)}, got {backend!r}")
        gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") and backend != "torch" else 0
        gpu = torch_gpu() if want_gpu is not False and backend != "faiss" and gpus == 0 else None
        if want_gpu is True and gpus == 0 and gpu is None:
            raise ValueError(
                "KnnIndex.use_gpu is true but neither FAISS nor torch sees a GPU (or the backend excludes "
                "the one that does; does the service have num_gpus?); give the service num_gpus > 0, "
                "or use 'auto'"
            )
        self._gpu = gpus > 0 and want_gpu is not False
        # exact torch search: on torch's GPU (auto, or backend torch), else on the CPU (backend torch only)
        self._torch_device = gpu if gpu is not None else ("cpu" if backend == "torch" else None)
        self._device = "gpu" if self._gpu or gpu is not None else "cpu"
        self._gpu_resources = faiss.StandardGpuResources() if self._gpu else None
        self._threads = int(num_threads) if num_threads is not None else actor_threads()
        faiss.omp_set_num_threads(self._threads)

        self._lock = threading.Lock()  # pending buffers, the built snapshot, the version being built
        self._build_lock = threading.Lock()  # one build at a time
        # GPU indexes are not thread-safe, and concurrent torch searches would only queue on the device
        self._search_lock = threading.Lock() if self._gpu or gpu is not None else None
        self._pending: dict[int, _Staging] = {}
        self._built: _Built | None = None
        self._building: int | None = None

    # ----------------------------------------------------------------------------------------- queries

    def version(self) -> int:
        """The built version, -1 when none (a new actor, or one Ray restarted)."""
        built = self._built
        return -1 if built is None else built.version

    def summary(self) -> BuildSummary | None:
        built = self._built
        return None if built is None else built.summary

    def state(self) -> dict[str, Any]:
        """For health checks and tests: the built version, its size and kind, the versions being added, and
        the process id (a restarted actor has a new one, so a caller can tell a restart from the old one)."""
        built = self._built
        with self._lock:
            pending = {v: s.count for v, s in sorted(self._pending.items())}
        return {
            "version": -1 if built is None else built.version,
            "ntotal": 0 if built is None else int(built.index.ntotal),
            "kind": None if built is None else built.summary.kind,
            "device": self._device,
            "metric": self._metric,
            "dim": self._dim,
            "num_samples": self._n,
            "threads": self._threads,
            "pending": pending,
            "building": self._building,
            "pid": os.getpid(),
            "summary": None if built is None else built.summary.as_dict(),
        }

    # -------------------------------------------------------------------------------------------- add

    def add(self, version: int, sample_ids: Any, features: Any) -> dict[str, Any]:
        """Store ``features`` ([B, d] float16/float32 numpy) of ``sample_ids`` for ``version``.

        Atomic: bad input (unknown or repeated ids, a wrong shape, non-finite values) raises before anything
        is written. Adding a sample again for the same version overwrites it (a retried call is harmless).
        Returns how many samples the version has and lacks; ``ignored`` is True when the version is at or
        below the one built (or being built), which keeps its index.
        """
        version = check_int(version, "version", minimum=0, fix="versions are epochs: 0, 1, ...")
        ids = np.asarray(sample_ids)
        if ids.ndim != 1 or (ids.dtype.kind not in "iu" and len(ids)):
            raise ValueError(f"sample_ids must be a 1-d integer array, got {ids.dtype} {ids.shape}")
        ids = ids.astype(np.int64, copy=False)
        feats = np.asarray(features)
        if feats.dtype not in (np.float16, np.float32, np.float64):
            raise ValueError(f"features must be a float16/float32 numpy array, got {feats.dtype}")
        if feats.shape != (len(ids), self._dim):
            raise ValueError(f"features must have shape ({len(ids)}, {self._dim}), got {feats.shape}")
        rows = self._rows(ids)
        if len(np.unique(rows)) != len(rows):
            uniq, counts = np.unique(ids, return_counts=True)
            raise ValueError(f"sample_ids repeated within one add: {format_ids(uniq[counts > 1])}")
        finite = np.isfinite(feats).all(axis=1)
        if not finite.all():
            raise NonFiniteFeaturesError(version, ids[~finite])
        vectors = self._prepare(feats)
        if not np.isfinite(vectors).all():  # float16 storage overflows beyond 65,504
            bad = ids[~np.isfinite(vectors).all(axis=1)]
            raise ValueError(
                f"features of {format_ids(bad)} exceed the float16 storage's range; use storage_dtype float32"
            )

        with self._lock:
            built_version = -1 if self._built is None else self._built.version
            if version <= built_version or version == self._building:
                return {"version": version, "added": 0, "present": self._n, "missing": 0, "ignored": True}
            staging = self._pending.get(version)
            if staging is None:
                staging = _Staging(
                    version,
                    np.empty((self._n, self._dim), dtype=self._storage),
                    np.zeros(self._n, dtype=bool),
                )
                self._pending[version] = staging
            staging.vectors[rows] = vectors
            staging.count += int((~staging.present[rows]).sum())
            staging.present[rows] = True
            present = staging.count
        return {
            "version": version,
            "added": len(ids),
            "present": present,
            "missing": self._n - present,
            "ignored": False,
        }

    # ------------------------------------------------------------------------------------------ build

    def build(self, version: int) -> BuildSummary:
        """Build the index of ``version`` from its added features; a no-op returning the same summary when
        that version is already built. Searches keep using the previous version until this one is ready."""
        version = check_int(version, "version", minimum=0, fix="versions are epochs: 0, 1, ...")
        with self._build_lock:
            built = self._built
            built_version = -1 if built is None else built.version
            if built is not None and built.version == version:
                return built.summary
            if version < built_version:
                raise IndexNotReadyError(
                    f"knn index: cannot build version {version}: version {built_version} is already built "
                    "(versions only move forward)",
                    version,
                    built_version,
                )
            with self._lock:
                staging = self._pending.get(version)
                if staging is None or staging.count < self._n:
                    missing_rows = np.arange(self._n) if staging is None else np.flatnonzero(~staging.present)
                    restarted = " (an empty index: was the actor restarted?)" if built is None else ""
                    raise IndexNotReadyError(
                        f"knn index: cannot build version {version}: {len(missing_rows):,} of {self._n:,} "
                        f"training samples were not added for it ({format_ids(self._ids[missing_rows])}); "
                        f"built version: {built_version}{restarted}. Add every sample's features for "
                        "this version, then build",
                        version,
                        built_version,
                        len(missing_rows),
                    )
                self._building = version
            try:
                index, summary = self._construct(staging)
            finally:
                with self._lock:
                    self._building = None
            with self._lock:
                self._built = _Built(version, index, staging.vectors, summary)
                for old in [v for v in self._pending if v <= version]:
                    del self._pending[old]
        logger.info(summary.describe())
        if self._verbose:
            print(summary.describe(), flush=True)
        return summary

    # ----------------------------------------------------------------------------------------- search

    def search_ids(
        self, sample_ids: Any, k: int, exclude_self: bool = True, version: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest training samples of each of ``sample_ids`` (by their features of the built
        version): ``(neighbour sample_ids int64 [B, k], values float32 [B, k])``, nearest first.

        ``exclude_self`` leaves each query out of its own neighbours. ``version``: refuse (IndexNotReadyError)
        unless this version is the one built. Entries an approximate search could not fill are -1.
        """
        built = self._ready(version)
        ids = np.asarray(sample_ids)
        if ids.ndim != 1 or (ids.dtype.kind not in "iu" and len(ids)):
            raise ValueError(f"sample_ids must be a 1-d integer array, got {ids.dtype} {ids.shape}")
        rows = self._rows(ids.astype(np.int64, copy=False))
        self._check_search_k(k, exclude_self)
        extra = 1 if exclude_self else 0
        labels = np.empty((len(rows), k), dtype=np.int64)
        values = np.empty((len(rows), k), dtype=np.float32)
        for start in range(0, len(rows), QUERY_CHUNK):
            chunk = rows[start : start + QUERY_CHUNK]
            queries = np.ascontiguousarray(built.vectors[chunk], dtype=np.float32)
            v, i = self._search(built.index, queries, k + extra)
            if exclude_self:
                i, v = drop_self(i, v, chunk)
            labels[start : start + len(chunk)] = i
            values[start : start + len(chunk)] = v
        return self._to_ids(labels), values

    def search_vectors(
        self, vectors: Any, k: int, version: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest training samples of each row of ``vectors`` ([B, d] float16/float32 numpy)."""
        built = self._ready(version)
        queries = np.asarray(vectors)
        if queries.dtype not in (np.float16, np.float32, np.float64) or queries.ndim != 2:
            raise ValueError(
                f"vectors must be a [B, d] float numpy array, got {queries.dtype} {queries.shape}"
            )
        if queries.shape[1] != self._dim:
            raise ValueError(f"vectors must have {self._dim} columns, got {queries.shape[1]}")
        finite = np.isfinite(queries).all(axis=1)
        if not finite.all():
            raise ValueError(f"query vectors with NaN or inf at rows {np.flatnonzero(~finite)[:10].tolist()}")
        self._check_search_k(k, exclude_self=False)
        prepared = self._prepare(queries).astype(np.float32, copy=False)
        labels = np.empty((len(prepared), k), dtype=np.int64)
        values = np.empty((len(prepared), k), dtype=np.float32)
        for start in range(0, len(prepared), QUERY_CHUNK):
            chunk = np.ascontiguousarray(prepared[start : start + QUERY_CHUNK])
            v, i = self._search(built.index, chunk, k)
            labels[start : start + len(chunk)] = i
            values[start : start + len(chunk)] = v
        return self._to_ids(labels), values

    # -------------------------------------------------------------------------------------- internals

    def _rows(self, ids: np.ndarray) -> np.ndarray:
        """Row of each sample id in the buffers; unknown ids raise, named."""
        if self._contiguous:
            known = (ids >= 0) & (ids < self._n)
            rows = ids
        else:
            rows = np.searchsorted(self._ids, ids).clip(0, self._n - 1)
            known = self._ids[rows] == ids
        if not known.all():
            raise ValueError(
                f"{format_ids(ids[~known])} are not training samples of this index "
                f"({self._n:,} samples, ids {int(self._ids[0])}..{int(self._ids[-1])})"
            )
        return rows

    def _to_ids(self, rows: np.ndarray) -> np.ndarray:
        return np.where(rows >= 0, self._ids[rows.clip(0)], -1).astype(np.int64, copy=False)

    def _prepare(self, feats: np.ndarray) -> np.ndarray:
        """Features as they are stored: L2-normalised for cosine, in the storage dtype."""
        if self._metric == "cosine":
            out = feats.astype(np.float32)  # a copy: object-store arrays are read-only
            norms = np.linalg.norm(out, axis=1, keepdims=True)
            out /= np.maximum(norms, NORM_EPS)
            return out.astype(self._storage, copy=False)
        return feats.astype(self._storage, copy=False)

    def _ready(self, version: int | None) -> _Built:
        built = self._built
        if built is None:
            raise IndexNotReadyError(
                "knn index: no version is built (a new actor, or one Ray restarted): add the epoch's "
                "features and build before searching",
                -1 if version is None else version,
                -1,
            )
        if version is not None and built.version != version:
            raise IndexNotReadyError(
                f"knn index: version {version} was asked for but version {built.version} is built",
                version,
                built.version,
            )
        return built

    def _check_search_k(self, k: Any, exclude_self: bool) -> None:
        limit = self._n - 1 if exclude_self else self._n
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= limit:
            raise ValueError(f"k must be an integer in [1, {limit}] for {self._n} samples, got {k!r}")
        if self._gpu and k + 1 > GPU_MAX_K:
            raise ValueError(f"k must be below {GPU_MAX_K} on the GPU, got {k}")

    def _search(self, index: Any, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """FAISS's ``(values float32, rows int64)``."""
        # OpenMP's thread count belongs to the calling thread; a threaded actor runs calls on pool threads.
        faiss.omp_set_num_threads(self._threads)
        if self._search_lock is None:
            values, labels = index.search(queries, k)
        else:
            with self._search_lock:
                values, labels = index.search(queries, k)
        return values.astype(np.float32, copy=False), labels.astype(np.int64, copy=False)

    def _flat(self) -> Any:
        index = faiss.IndexFlatIP(self._dim) if self._metric == "cosine" else faiss.IndexFlatL2(self._dim)
        return index

    def _to_device(self, index: Any) -> Any:
        return faiss.index_cpu_to_gpu(self._gpu_resources, 0, index) if self._gpu else index

    def _set_nprobe(self, index: Any, nprobe: int) -> None:
        space = faiss.GpuParameterSpace() if self._gpu else faiss.ParameterSpace()
        space.set_index_parameter(index, "nprobe", nprobe)

    def _construct(self, staging: _Staging) -> tuple[Any, BuildSummary]:
        n, d, vectors = self._n, self._dim, staging.vectors
        faiss.omp_set_num_threads(self._threads)  # per calling thread (see _search)
        start = time.perf_counter()
        if self._torch_device is not None:
            index = TorchFlat(vectors, self._metric, self._torch_device)
            build_s = time.perf_counter() - start
            return index, self._summary(
                staging.version, KIND_TORCH, build_s, 1.0, min(self._recall_k, n - 1), 0, 0.0, 0, 0
            )
        if n < self._exact_threshold:
            index = self._to_device(self._flat())
            for first in range(0, n, ADD_CHUNK):
                index.add(np.ascontiguousarray(vectors[first : first + ADD_CHUNK], dtype=np.float32))
            build_s = time.perf_counter() - start
            return index, self._summary(
                staging.version, KIND_FLAT, build_s, 1.0, min(self._recall_k, n - 1), 0, 0.0, 0, 0
            )

        rng = np.random.default_rng([self._seed, staging.version])
        nlist = min(self._nlist or auto_nlist(n), n)
        train_rows = np.sort(rng.choice(n, size=min(n, KMEANS_POINTS_PER_LIST * nlist), replace=False))
        train = np.ascontiguousarray(vectors[train_rows], dtype=np.float32)
        kmeans = faiss.Kmeans(
            d,
            nlist,
            niter=KMEANS_ITERATIONS,
            seed=self._seed + staging.version,
            spherical=self._metric == "cosine",
            max_points_per_centroid=max(KMEANS_POINTS_PER_LIST, math.ceil(len(train) / nlist)),
            min_points_per_centroid=1,
            gpu=self._gpu,
            verbose=False,
        )
        kmeans.train(train)
        del train
        quantizer = self._flat()
        quantizer.add(kmeans.centroids)
        cpu_index = faiss.IndexIVFFlat(quantizer, d, nlist, self._faiss_metric)
        cpu_index.is_trained = True  # the quantizer holds the k-means centroids
        index = self._to_device(cpu_index)
        for first in range(0, n, ADD_CHUNK):
            index.add(np.ascontiguousarray(vectors[first : first + ADD_CHUNK], dtype=np.float32))
        build_s = time.perf_counter() - start

        # Recall against exact search on a random sample of training samples (self excluded), and the
        # least nprobe of the schedule (from the starting one, x1.25 a step) that reaches the target.
        start = time.perf_counter()
        recall_k = min(self._recall_k, n - 1)
        sample = np.sort(rng.choice(n, size=min(self._recall_queries, n), replace=False))
        queries = np.ascontiguousarray(vectors[sample], dtype=np.float32)
        _, truth = exact_knn(queries, vectors, recall_k + 1, self._faiss_metric, self._gpu_resources)
        truth, _ = drop_self(truth, np.zeros(truth.shape, np.float32), sample)
        max_nprobe = min(nlist, GPU_MAX_K) if self._gpu else nlist
        nprobe = min(self._nprobe, max_nprobe)
        while True:
            self._set_nprobe(index, nprobe)
            _, found = self._search(index, queries, recall_k + 1)
            found, _ = drop_self(found, np.zeros(found.shape, np.float32), sample)
            recall = recall_at(found, truth)
            if recall >= self._target_recall or nprobe >= max_nprobe:
                break
            nprobe = min(max(nprobe + 1, math.ceil(nprobe * NPROBE_GROWTH)), max_nprobe)
        recall_s = time.perf_counter() - start
        summary = self._summary(
            staging.version, KIND_IVF, build_s, recall, recall_k, len(sample), recall_s, nlist, nprobe
        )
        return index, summary

    def _summary(
        self,
        version: int,
        kind: str,
        build_s: float,
        recall: float,
        recall_k: int,
        recall_queries: int,
        recall_s: float,
        nlist: int,
        nprobe: int,
    ) -> BuildSummary:
        return BuildSummary(
            version=version,
            n=self._n,
            dim=self._dim,
            metric=self._metric,
            kind=kind,
            device=self._device,
            build_s=build_s,
            recall=recall,
            recall_k=recall_k,
            recall_queries=recall_queries,
            recall_s=recall_s,
            nlist=nlist,
            nprobe=nprobe,
            threads=self._threads,
        )
