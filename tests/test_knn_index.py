"""The kNN index service: exact neighbours, versions, refusals, the approximate kind, the config checks, and
(one Ray test) the restart contract as a named service of a run."""

from __future__ import annotations

import pickle
import threading
import time

import numpy as np
import pytest

import raynoisy.knn.index as index_module
from raynoisy.errors import ConfigError, RaynoisyError
from raynoisy.knn import (
    IndexNotReadyError,
    KnnIndex,
    NonFiniteFeaturesError,
    check_index_config,
    check_k,
)
from raynoisy.knn.index import auto_nlist, drop_self, recall_at

D = 12


def clustered(n: int, d: int = D, clusters: int = 8, seed: int = 0) -> np.ndarray:
    """Gaussian clusters (like class-structured embeddings), float32."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((clusters, d)) * 3
    return (centers[rng.integers(0, clusters, n)] + rng.standard_normal((n, d))).astype(np.float32)


def brute_force(
    queries: np.ndarray, base: np.ndarray, k: int, metric: str, self_rows: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The obvious float64 numpy reference: the k nearest rows (``self_rows`` excluded) and their values."""
    score = -similarity(queries, base) if metric == "cosine" else squared_distance(queries, base)
    if self_rows is not None:
        score[np.arange(len(queries)), self_rows] = np.inf
    rows = np.argsort(score, axis=1, kind="stable")[:, :k]
    values = np.take_along_axis(score, rows, 1)
    return rows, (-values if metric == "cosine" else values)


def similarity(queries: np.ndarray, base: np.ndarray) -> np.ndarray:
    q, b = queries.astype(np.float64), base.astype(np.float64)
    return (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (b / np.linalg.norm(b, axis=1, keepdims=True)).T


def squared_distance(queries: np.ndarray, base: np.ndarray) -> np.ndarray:
    q, b = queries.astype(np.float64), base.astype(np.float64)
    return (q**2).sum(1)[:, None] - 2 * q @ b.T + (b**2).sum(1)[None, :]


def assert_nearest(
    got_rows: np.ndarray,
    queries: np.ndarray,
    base: np.ndarray,
    metric: str,
    self_rows: np.ndarray | None = None,
) -> None:
    """``got_rows`` are the k nearest rows by the float64 reference: the same rows, except that two whose
    reference values agree to float32 resolution (a near-tie, which float32 kernels may order either way)
    may swap; each row's reference value must still be the k best in order, and no row may repeat."""
    k = got_rows.shape[1]
    rows, values = brute_force(queries, base, k, metric, self_rows)
    score = similarity(queries, base) if metric == "cosine" else squared_distance(queries, base)
    got_values = np.take_along_axis(score, got_rows, 1)
    np.testing.assert_allclose(got_values, values, rtol=0, atol=1e-6)
    assert all(len(set(row)) == k for row in got_rows.tolist())
    if self_rows is not None:
        assert not (got_rows == self_rows[:, None]).any()
    assert (got_rows != rows).mean() < 0.01


def built_index(features: np.ndarray, ids: np.ndarray | None = None, version: int = 0, **kwargs) -> KnnIndex:
    kwargs = {"num_threads": 1, "verbose": False, **kwargs}
    if ids is None:
        index = KnnIndex(len(features), dim=features.shape[1], **kwargs)
        ids = np.arange(len(features))
    else:
        index = KnnIndex(sample_ids=ids, dim=features.shape[1], **kwargs)
    order = np.random.default_rng(1).permutation(len(ids))  # ranks hand their shares in any order
    for part in np.array_split(order, 3):
        index.add(version, ids[part], features[part])
    index.build(version)
    return index


@pytest.mark.parametrize("metric", ["cosine", "l2"])
@pytest.mark.parametrize("exclude_self", [True, False])
@pytest.mark.parametrize(("backend", "kind"), [("faiss", "flat"), ("torch", "torch-flat")])
def test_exact_index_returns_the_brute_force_neighbours(metric, exclude_self, backend, kind):
    n, k = 600, 7
    features = clustered(n)
    ids = np.sort(np.random.default_rng(2).choice(10**9, n, replace=False)).astype(np.int64) + 2**33
    index = built_index(features, ids, metric=metric, backend=backend)
    assert index.state()["kind"] == kind and index.state()["ntotal"] == n and index.summary().recall == 1.0

    query_rows = np.random.default_rng(3).choice(n, 50, replace=False)
    got_ids, got_values = index.search_ids(ids[query_rows], k, exclude_self=exclude_self)
    self_rows = query_rows if exclude_self else None
    _, values = brute_force(features[query_rows], features, k, metric, self_rows)
    assert got_ids.dtype == np.int64 and got_values.dtype == np.float32
    assert got_ids.shape == got_values.shape == (50, k)
    assert np.isin(got_ids, ids).all()
    assert_nearest(np.searchsorted(ids, got_ids), features[query_rows], features, metric, self_rows)
    np.testing.assert_allclose(got_values, values, rtol=1e-4, atol=1e-3)
    if not exclude_self:
        np.testing.assert_array_equal(got_ids[:, 0], ids[query_rows])

    queries = clustered(20, seed=9)
    got_ids, got_values = index.search_vectors(queries.astype(np.float16), k)
    rounded = queries.astype(np.float16).astype(np.float32)
    _, values = brute_force(rounded, features, k, metric)
    assert_nearest(np.searchsorted(ids, got_ids), rounded, features, metric)
    np.testing.assert_allclose(got_values, values, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_torch_search_in_chunks_equals_one_chunk(metric, monkeypatch):
    """A search chunk holds at most TORCH_SCORES scores; 1,000 queries x 600 vectors in chunks of 3 queries
    give what FAISS's exact flat index gives."""
    features = clustered(600)
    reference = built_index(features, metric=metric, backend="faiss")
    monkeypatch.setattr(index_module, "TORCH_SCORES", 3 * 600)
    chunked = built_index(features, metric=metric, backend="torch")
    ids = np.arange(600)
    want_ids, want_values = reference.search_ids(ids, 5)
    got_ids, got_values = chunked.search_ids(ids, 5)
    assert recall_at(got_ids, want_ids) > 0.999  # float32 near-ties may swap between the two sums
    np.testing.assert_allclose(got_values, want_values, rtol=1e-4, atol=1e-4)


def test_auto_backend_searches_with_torch_where_torch_has_a_gpu_and_faiss_has_none(monkeypatch):
    """The device choice: GPU FAISS, else torch's GPU, else CPU FAISS (the CPU stands in for torch's GPU)."""
    import torch

    features = clustered(300)
    monkeypatch.setattr(index_module.faiss, "get_num_gpus", lambda: 0)
    monkeypatch.setattr(index_module, "torch_gpu", lambda: torch.device("cpu"))
    assert built_index(features).summary().kind == "torch-flat"
    assert built_index(features, use_gpu=True).summary().kind == "torch-flat"
    assert built_index(features, use_gpu=False).summary().kind == "flat"
    assert built_index(features, backend="faiss").summary().kind == "flat"
    monkeypatch.setattr(index_module, "torch_gpu", lambda: None)
    assert built_index(features).summary().kind == "flat"
    with pytest.raises(ValueError, match="neither FAISS nor torch sees a GPU"):
        KnnIndex(300, dim=D, use_gpu=True)
    with pytest.raises(ValueError, match="backend must be one of"):
        KnnIndex(300, dim=D, backend="annoy")


def test_float16_features_and_storage_give_the_neighbours_of_the_rounded_features():
    features = clustered(400)
    half = features.astype(np.float16)
    index = built_index(half, metric="l2", storage_dtype="float16")
    got, _ = index.search_ids(np.arange(400), 5)
    rows, _ = brute_force(half.astype(np.float32), half.astype(np.float32), 5, "l2", np.arange(400))
    assert recall_at(got, rows) > 0.99  # float16 storage rounds the same way; near-ties may swap


def test_exclude_self_keeps_an_exact_duplicate_and_drops_only_the_query():
    features = clustered(50)
    features[7] = features[3]
    index = built_index(features, metric="l2")
    got, values = index.search_ids(np.array([3, 7]), 3)
    assert got[0, 0] == 7 and got[1, 0] == 3 and 3 not in got[0] and 7 not in got[1]
    assert values[0, 0] == pytest.approx(0.0, abs=1e-4)


def test_drop_self_without_the_query_drops_the_last_column():
    labels = np.array([[5, 1, 2], [4, 9, 8]])
    values = np.array([[0.0, 1.0, 2.0], [0.5, 1.5, 2.5]], dtype=np.float32)
    kept, kept_values = drop_self(labels, values, np.array([1, 3]))
    np.testing.assert_array_equal(kept, [[5, 2], [4, 9]])
    np.testing.assert_array_equal(kept_values, [[0.0, 2.0], [0.5, 1.5]])


def test_build_is_idempotent_by_version_and_versions_are_isolated():
    n = 300
    first, second = clustered(n, seed=0), clustered(n, seed=1)
    index = built_index(first, metric="cosine")
    summary = index.summary()
    neighbours, _ = index.search_ids(np.arange(n), 4)

    assert index.build(0) is summary  # a retried build: nothing rebuilt, same summary
    assert index.add(0, np.arange(10), second[:10])["ignored"]  # late adds to a built version are ignored
    assert index.build(0) is summary
    np.testing.assert_array_equal(index.search_ids(np.arange(n), 4)[0], neighbours)

    # Adding the next version does not touch the built one until it is built.
    for part in np.array_split(np.arange(n), 2):
        index.add(1, part, second[part])
    assert index.state()["pending"] == {1: n}
    np.testing.assert_array_equal(index.search_ids(np.arange(n), 4)[0], neighbours)
    assert index.build(1).version == 1 and index.version() == 1
    assert_nearest(index.search_ids(np.arange(n), 4, version=1)[0], second, second, "cosine", np.arange(n))
    assert index.state()["pending"] == {}

    with pytest.raises(IndexNotReadyError, match="already built"):
        index.build(0)
    with pytest.raises(IndexNotReadyError, match="version 0 was asked for but version 1 is built"):
        index.search_ids(np.arange(3), 2, version=0)


def test_searches_during_a_build_see_one_whole_version():
    # A threaded actor (max_concurrency > 1) searches while rank 0's build of the next version runs.
    n = 2000
    first, second = clustered(n, seed=0), clustered(n, seed=1)
    index = built_index(first, metric="l2", exact_threshold=500, recall_queries=100)
    queries = np.arange(0, n, 7)
    old, _ = index.search_ids(queries, 5)
    index.add(1, np.arange(n), second)
    results: list[np.ndarray] = []
    errors: list[BaseException] = []

    def search() -> None:
        try:
            for _ in range(20):
                results.append(index.search_ids(queries, 5)[0])
        except BaseException as error:  # surfaced below
            errors.append(error)

    threads = [threading.Thread(target=search) for _ in range(3)]
    for thread in threads:
        thread.start()
    index.build(1)
    for thread in threads:
        thread.join()
    new, _ = index.search_ids(queries, 5)
    assert not errors and not np.array_equal(old, new)
    assert all(np.array_equal(r, old) or np.array_equal(r, new) for r in results)


def test_incomplete_version_is_refused_naming_how_many_are_missing():
    features = clustered(3000)
    index = KnnIndex(3000, dim=D, num_threads=1, verbose=False)
    with pytest.raises(IndexNotReadyError, match="no version is built"):
        index.search_ids(np.arange(3), 2)
    assert index.add(4, np.arange(1800), features[:1800])["missing"] == 1200
    with pytest.raises(IndexNotReadyError, match="1,200 of 3,000 training samples") as info:
        index.build(4)
    assert info.value.missing == 1200 and info.value.version == 4 and info.value.built_version == -1
    assert "1800, 1801" in str(info.value)  # names the first missing ids
    with pytest.raises(IndexNotReadyError, match="3,000 of 3,000"):
        index.build(5)
    index.add(4, np.arange(1800, 3000), features[1800:])
    assert index.build(4).n == 3000


def test_non_finite_features_are_refused_naming_the_sample_ids_and_nothing_is_written():
    ids = np.arange(100, 400, dtype=np.int64)
    features = clustered(300)
    features[5, 2] = np.nan
    features[17, 0] = np.inf
    features[42, 11] = -np.inf
    index = KnnIndex(sample_ids=ids, dim=D, num_threads=1, verbose=False)
    with pytest.raises(NonFiniteFeaturesError) as info:
        index.add(3, ids, features.astype(np.float16))
    message = str(info.value)
    assert "version 3" in message and "3 sample_ids: 105, 117, 142" in message
    np.testing.assert_array_equal(info.value.sample_ids, [105, 117, 142])
    assert isinstance(info.value, RaynoisyError)  # deterministic: the run stops with it
    assert index.state()["pending"] == {}

    restored = pickle.loads(pickle.dumps(info.value))  # crosses Ray's process boundary intact
    assert str(restored) == message and restored.version == 3
    error = IndexNotReadyError("m", 2, -1, 7)
    back = pickle.loads(pickle.dumps(error))
    assert (str(back), back.version, back.built_version, back.missing) == ("m", 2, -1, 7)


def test_bad_input_is_refused_clearly():
    index = KnnIndex(sample_ids=np.array([3, 8, 20]), dim=2, num_threads=1, verbose=False)
    with pytest.raises(ValueError, match="1 sample_id: 4 are not training samples"):
        index.add(0, np.array([3, 4]), np.zeros((2, 2), np.float32))
    with pytest.raises(ValueError, match="repeated"):
        index.add(0, np.array([3, 3]), np.zeros((2, 2), np.float32))
    with pytest.raises(ValueError, match="shape"):
        index.add(0, np.array([3, 8]), np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match="float16/float32 numpy array"):
        index.add(0, np.array([3, 8]), np.zeros((2, 2), np.int64))
    with pytest.raises(ConfigError, match="version"):
        index.add(-1, np.array([3]), np.zeros((1, 2), np.float32))
    with pytest.raises(ValueError, match="sorted and unique"):
        KnnIndex(sample_ids=np.array([5, 2]), dim=2)
    with pytest.raises(ValueError, match="exactly one"):
        KnnIndex(dim=2)
    with pytest.raises(ConfigError, match=r"KnnIndex\.metric"):
        KnnIndex(5, dim=2, metric="dot")
    index.add(0, np.array([3, 8, 20]), np.eye(3, 2, dtype=np.float32) + 1)
    index.build(0)
    for k in (0, 3, True):
        with pytest.raises(ValueError, match=r"k must be an integer in \[1, 2\]"):
            index.search_ids(np.array([3]), k)
    assert index.search_ids(np.array([3]), 3, exclude_self=False)[0].shape == (1, 3)


def test_approximate_index_above_the_threshold_measures_its_recall():
    n, k = 6000, 10
    features = clustered(n, d=16, clusters=30)
    index = built_index(
        features, metric="cosine", exact_threshold=1000, recall_queries=300, target_recall=0.9
    )
    summary = index.summary()
    state = index.state()
    assert state["kind"] == summary.kind == "ivf-flat" and state["ntotal"] == n
    assert summary.nlist == auto_nlist(n) == 153  # n // 39 caps the power of two (256)
    assert summary.recall_queries == 300 and summary.recall_k == k
    assert 0.9 <= summary.recall <= 1.0 and 1 <= summary.nprobe <= summary.nlist
    assert "ivf-flat" in summary.describe() and f"recall@{k}" in summary.describe()

    # The recall the build measured on a sample is the recall searches get.
    queries = np.random.default_rng(4).choice(n, 500, replace=False)
    got, _ = index.search_ids(queries, k)
    rows, _ = brute_force(features[queries], features, k, "cosine", queries)
    assert recall_at(got, rows) == pytest.approx(summary.recall, abs=0.05)


def test_approximate_index_raises_nprobe_until_the_target_recall():
    # Unstructured noise is the hard case for IVF: the first nprobe misses the target, so it is doubled.
    features = np.random.default_rng(0).standard_normal((3000, 16)).astype(np.float32)
    index = built_index(features, metric="l2", exact_threshold=100, recall_queries=200, nprobe=2)
    summary = index.summary()
    assert summary.nprobe > 2 and (summary.recall >= 0.95 or summary.nprobe == summary.nlist)


def test_config_checks_name_the_field():
    check_index_config(k=10, num_samples=1000, metric="l2", prefix="method.params")
    with pytest.raises(ConfigError, match=r"^method\.params\.k: is 1000, but the training set has 1,000"):
        check_index_config(k=1000, num_samples=1000)
    with pytest.raises(ConfigError, match=r"method\.params\.k: is 0"):
        check_k(0, 1000)
    with pytest.raises(ConfigError, match=r"method\.params\.k: must be an integer"):
        check_k(True, 1000)
    assert check_k(1000, 1000, exclude_self=False) == 1000
    with pytest.raises(ConfigError, match=r"mixnn\.neighbours: is 5"):
        check_k(5, 5, "mixnn.neighbours")
    with pytest.raises(ConfigError, match=r"method\.params\.metric: unknown metric 'dot'"):
        check_index_config(k=3, num_samples=100, metric="dot")
    with pytest.raises(ConfigError, match=r"method\.params\.exact_threshold"):
        check_index_config(k=3, num_samples=100, exact_threshold=-1)
    with pytest.raises(ConfigError, match=r"method\.params\.use_gpu"):
        check_index_config(k=3, num_samples=100, use_gpu="yes")
    with pytest.raises(ConfigError, match="too few"):
        check_index_config(k=1, num_samples=1)


@pytest.mark.ray
def test_named_service_survives_a_kill_by_being_rebuilt(ray_cluster):
    import ray

    from raynoisy.methods.base import ServiceSpec
    from raynoisy.train.services import namespace_of, running_services

    n, k = 2000, 5
    ids = np.arange(10, 10 + 2 * n, 2, dtype=np.int64)
    features = clustered(n, d=16)
    spec = ServiceSpec(
        "knn-index",
        KnnIndex,
        kwargs={"sample_ids": ids, "dim": 16, "metric": "l2", "exact_threshold": 1000, "recall_queries": 200},
        num_cpus=1,
        max_concurrency=2,
    )

    def refresh(knn, version):
        shares = [np.arange(r, n, 2) for r in range(2)]  # two ranks' strided shares
        refs = [(ray.put(ids[s]), ray.put(features[s].astype(np.float16))) for s in shares]
        ray.get([knn.add.remote(version, i, f) for i, f in refs])
        return ray.get(knn.build.remote(version))

    with running_services("test-run", [spec]) as handles:
        knn = handles["knn-index"]
        assert ray.get_actor("knn-index", namespace=namespace_of("test-run")) is not None
        summary = refresh(knn, 0)
        assert summary.kind == "ivf-flat" and summary.threads == 1 and summary.recall >= 0.95
        assert ray.get(knn.build.remote(0)) == summary  # idempotent through the actor too
        before, _ = ray.get(knn.search_ids.remote(ids[:50], k))
        old_pid = ray.get(knn.state.remote())["pid"]

        ray.kill(knn, no_restart=False)  # Ray restarts it: __init__ runs again
        deadline = time.monotonic() + 120  # a loaded 2-core machine restarts actors slowly
        while True:  # the kill is asynchronous: the old instance may still answer a call or two
            try:
                state = ray.get(knn.state.remote(), timeout=30)
                if state["pid"] != old_pid:
                    break
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                pass
            if time.monotonic() > deadline:
                raise AssertionError("the killed KnnIndex actor was not restarted within 120 s")
            time.sleep(0.5)
        assert state["version"] == -1 and state["ntotal"] == 0
        with pytest.raises(IndexNotReadyError) as info:  # the typed error reaches the caller
            ray.get(knn.search_ids.remote(ids[:50], k))
        assert info.value.built_version == -1

        assert refresh(knn, 0).version == 0  # the caller re-adds the epoch's features and rebuilds
        after, _ = ray.get(knn.search_ids.remote(ids[:50], k))
        assert ray.get(knn.version.remote()) == 0
        np.testing.assert_array_equal(after, before)  # same features, same seed: the same index
