"""SampleStore: id -> row mapping, dense and top-k columns, checkpoints, and 2-rank collective scatters.

The top-k soft labels are checked against an independent numpy computation; the 2-rank test (gloo, CPU)
checks that ranks writing different rows, and the same id from both ranks, end with bit-identical stores
(the higher rank's write wins), that a bad call on one rank fails on every rank instead of hanging, and that
a save by 2 ranks loads in 1 process.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from raynoisy.data.sample_store import (
    SampleStore,
    SampleStoreCheckpointError,
    UnknownSampleIdError,
    partition,
    shard_name,
)
from raynoisy.meta import assert_replicas_identical

WORLD = 2
CLASSES = 12
K = 3


def arbitrary_ids(n: int, seed: int = 0) -> np.ndarray:
    """Sorted, unique, non-contiguous int64 ids, some beyond int32."""
    rng = np.random.default_rng(seed)
    return np.cumsum(rng.integers(1, 1000, size=n)) + 2**33


def make_store(ids: np.ndarray) -> SampleStore:
    store = SampleStore(ids)
    store.add_dense("loss", 1)
    store.add_dense("count", 2, dtype=torch.int64, fill=-1)
    store.add_dense("feature", 4, dtype=torch.float16)
    store.add_topk("soft", CLASSES, K)
    return store


def random_probs(rng: np.random.Generator, rows: int, classes: int = CLASSES) -> torch.Tensor:
    return torch.from_numpy(rng.dirichlet(np.full(classes, 0.3), size=rows)).float()


def numpy_topk(probs: np.ndarray, k: int, *, half: bool) -> np.ndarray:
    """The top-k soft label, independently: keep the k largest, renormalise (optionally through float16).

    A row without mass is the uniform distribution.
    """
    out = np.zeros(probs.shape)
    for i, row in enumerate(probs.astype(np.float64)):
        if row.sum() == 0:
            out[i] = 1.0 / len(row)
            continue
        top = np.argsort(-row, kind="stable")[:k]
        kept = row[top] / row[top].sum()
        if half:
            kept = kept.astype(np.float16).astype(np.float64)
        out[i, top] = kept / kept.sum()
    return out


# -- single process -----------------------------------------------------------------------------------------


def test_gather_after_scatter_with_arbitrary_ids() -> None:
    ids = arbitrary_ids(50)
    store = make_store(ids)
    assert len(store) == 50 and store.columns == ["loss", "count", "feature", "soft"]
    assert torch.equal(store.gather("count", ids[:3]), torch.full((3, 2), -1, dtype=torch.int64))

    picked = ids[[7, 2, 40]]
    store.scatter("loss", torch.from_numpy(picked), torch.tensor([0.5, 1.5, 2.5]))
    store.scatter("count", picked, torch.tensor([[1, 2], [3, 4], [5, 2**40]]))
    feature = torch.tensor([[0.1, 0.2, 0.3, 70000.0]] * 3)
    store.scatter("feature", picked, feature)

    loss = store.gather("loss", ids[[40, 7, 3]])
    assert loss.dtype == torch.float32 and loss.shape == (3, 1)
    assert loss.squeeze(1).tolist() == [2.5, 0.5, 0.0]
    count = store.gather("count", picked[::-1].copy())
    assert count.dtype == torch.int64 and count.tolist() == [[5, 2**40], [3, 4], [1, 2]]
    got = store.gather("feature", picked)
    assert got.dtype == torch.float32
    assert torch.equal(got, feature.half().float())  # stored as float16: rounded, 70000 overflows to inf

    with pytest.raises(TypeError, match="round them"):
        store.scatter("count", picked, torch.ones(3, 2))
    with pytest.raises(ValueError, match=r"expected \(3, 4\)"):
        store.scatter("feature", picked, torch.ones(3, 3))


def test_repeated_id_in_one_call_keeps_the_last_write() -> None:
    ids = arbitrary_ids(10)
    store = make_store(ids)
    store.scatter("loss", ids[[1, 2, 1, 1, 2]], torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]))
    assert store.gather("loss", ids[[1, 2]]).squeeze(1).tolist() == [4.0, 5.0]
    one_hot = torch.eye(CLASSES)
    store.scatter("soft", ids[[3, 3]], one_hot[[5, 6]])
    assert torch.equal(store.gather("soft", ids[[3]]), one_hot[[6]])


def test_unknown_ids_raise_naming_them() -> None:
    ids = arbitrary_ids(20)
    store = make_store(ids)
    unknown = [int(ids[0]) - 1, int(ids[-1]) + 1, int(ids[3]) + 1, -5, 0, 7, 11]
    with pytest.raises(UnknownSampleIdError, match=r"7 sample id\(s\)") as info:
        store.gather("loss", [int(ids[0]), *unknown])
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    assert "-5" in message and "and 2 more" in message
    with pytest.raises(ValueError, match=str(int(ids[-1]) + 1)):
        store.scatter("loss", [int(ids[-1]) + 1], torch.zeros(1))
    with pytest.raises(TypeError, match="integers"):
        store.gather("loss", torch.tensor([1.0]))
    with pytest.raises(KeyError, match="no column 'nope'"):
        store.gather("nope", ids[:1])


def test_constructor_and_registration_are_validated() -> None:
    with pytest.raises(ValueError, match="sorted and unique"):
        SampleStore([1, 3, 2])
    with pytest.raises(ValueError, match="sorted and unique"):
        SampleStore(np.array([1, 2, 2]))
    with pytest.raises(ValueError, match="at least one"):
        SampleStore([])
    store = SampleStore(torch.tensor([4, 8]))
    store.add_dense("a", 1)
    with pytest.raises(ValueError, match="already registered"):
        store.add_topk("a", 5, 2)
    with pytest.raises(ValueError, match="k <= num_classes"):
        store.add_topk("b", 5, 6)
    with pytest.raises(ValueError, match="fill"):
        store.add_dense("c", 1, dtype=torch.int64, fill=0.5)


def test_topk_densifies_and_renormalises_like_numpy() -> None:
    rng = np.random.default_rng(1)
    ids = arbitrary_ids(64)
    store = make_store(ids)
    probs = random_probs(rng, 40)
    probs[5] = 0.0  # an all-zero row reads as uniform, like a row never written
    probs[6] *= 1e6  # unnormalised counts: renormalised before float16, no overflow
    store.scatter("soft", ids[:40], probs)
    got = store.gather("soft", ids[:41]).double().numpy()

    expected = numpy_topk(probs.numpy(), K, half=True)
    uniform = np.full(CLASSES, 1.0 / CLASSES)
    np.testing.assert_allclose(got[:40], expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got[40], uniform, rtol=1e-6)  # never written
    # against the exact top-k renormalisation, float16 costs at most its relative precision
    exact = numpy_topk(probs.numpy(), K, half=False)
    np.testing.assert_allclose(got[:40], exact, atol=1e-3)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-6)
    nonzero = np.count_nonzero(got[:40], axis=1)
    assert nonzero[5] == CLASSES and (np.delete(nonzero, 5) == K).all()

    with pytest.raises(ValueError, match=">= 0"):
        store.scatter("soft", ids[:1], torch.full((1, CLASSES), -1.0))
    with pytest.raises(ValueError, match=">= 0"):
        store.scatter("soft", ids[:1], torch.full((1, CLASSES), float("nan")))
    with pytest.raises(ValueError, match=f"\\(1, {CLASSES}\\)"):
        store.scatter("soft", ids[:1], torch.ones(1, CLASSES + 1))


def test_bytes_per_sample_and_index_width() -> None:
    store = SampleStore(np.arange(3) * 2)
    store.add_topk("soft", 1000, 10)
    store.add_topk("wide", 32767, 2)
    store.add_topk("wider", 32768, 2)
    store.add_dense("dense", 1000)
    store.add_dense("half", 3, dtype=torch.float16)
    tensors = store.tensors()
    assert tensors["soft.indices"].dtype == torch.int16 and tensors["soft.values"].dtype == torch.float16
    assert tensors["wide.indices"].dtype == torch.int16 and tensors["wider.indices"].dtype == torch.int32
    assert store.bytes_per_sample("soft") == 40
    assert store.bytes_per_sample("wide") == 8 and store.bytes_per_sample("wider") == 12
    assert store.bytes_per_sample("dense") == 4000 and store.bytes_per_sample("half") == 6
    assert store.bytes_per_sample() == 8 + 40 + 8 + 12 + 4000 + 6
    assert store.nbytes() == 3 * store.bytes_per_sample()
    assert sum(t.nbytes for t in tensors.values()) + store.sample_ids.nbytes == store.nbytes()
    # the widest class index survives the round trip
    store.scatter("wider", [4], torch.nn.functional.one_hot(torch.tensor([32767]), 32768).float())
    assert store.gather("wider", [4]).argmax().item() == 32767


def filled_store(ids: np.ndarray, seed: int = 2) -> SampleStore:
    rng = np.random.default_rng(seed)
    store = make_store(ids)
    n = len(ids)
    store.scatter("loss", ids, torch.from_numpy(rng.standard_normal(n)).float())
    store.scatter("count", ids, torch.from_numpy(rng.integers(-(2**40), 2**40, size=(n, 2))))
    store.scatter("feature", ids, torch.from_numpy(rng.standard_normal((n, 4))).float())
    store.scatter("soft", ids[: n - 2], random_probs(rng, n - 2))
    return store


def assert_same(a: SampleStore, b: SampleStore) -> None:
    assert a.digest() == b.digest()
    assert np.array_equal(a.sample_ids, b.sample_ids)
    ta, tb = a.tensors(), b.tensors()
    assert ta.keys() == tb.keys()
    for key in ta:
        assert ta[key].dtype == tb[key].dtype and torch.equal(ta[key], tb[key]), key


@pytest.mark.parametrize("saved_by, loaded_by", [(1, 1), (3, 1), (2, 3)])
def test_save_load_round_trip_is_bit_identical(tmp_path: Path, saved_by: int, loaded_by: int) -> None:
    ids = arbitrary_ids(7)
    store = filled_store(ids)
    paths = [store.save(tmp_path, rank, saved_by) for rank in range(saved_by)]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        shard_name(r, saved_by) for r in range(saved_by)
    )
    for rank, path in enumerate(paths):  # each rank writes only its own block
        start, stop = partition(len(ids), rank, saved_by)
        assert len(torch.load(path, weights_only=True)["sample_ids"]) == stop - start

    restored = make_store(ids)
    restored.load(tmp_path)
    assert_same(restored, store)
    assert_same(SampleStore.from_checkpoint(tmp_path), store)
    # the restored store saves again under another world size, and that loads too
    again = tmp_path / "again"
    for rank in range(loaded_by):
        restored.save(again, rank, loaded_by)
    assert_same(SampleStore.from_checkpoint(again), store)


def test_load_adds_checkpoint_columns_and_rejects_mismatches(tmp_path: Path) -> None:
    ids = arbitrary_ids(6)
    store = filled_store(ids)
    store.save(tmp_path, 0, 1)

    partial = SampleStore(ids)
    partial.add_topk("soft", CLASSES, K)
    partial.load(tmp_path)
    assert partial.columns == ["soft", "loss", "count", "feature"]
    assert partial.digest() == store.digest()

    wrong_k = SampleStore(ids)
    wrong_k.add_topk("soft", CLASSES, K + 1)
    with pytest.raises(SampleStoreCheckpointError, match="'soft' was saved as topk"):
        wrong_k.load(tmp_path)
    extra = make_store(ids)
    extra.add_dense("new", 1)
    before = extra.digest()
    with pytest.raises(SampleStoreCheckpointError, match="'new' is not in the checkpoint"):
        extra.load(tmp_path)
    assert extra.digest() == before and extra.columns[-1] == "new"  # a failed load changes nothing
    other_split = make_store(arbitrary_ids(6, seed=9))
    with pytest.raises(SampleStoreCheckpointError, match="another training split"):
        other_split.load(tmp_path)


def test_incomplete_or_mixed_checkpoints_raise(tmp_path: Path) -> None:
    ids = arbitrary_ids(9)
    store = filled_store(ids)
    target = make_store(ids)
    with pytest.raises(SampleStoreCheckpointError, match="no such checkpoint directory"):
        target.load(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SampleStoreCheckpointError, match="no sample-store shards"):
        target.load(tmp_path / "empty")

    three = tmp_path / "three"
    for rank in (0, 2):
        store.save(three, rank, 3)
    with pytest.raises(SampleStoreCheckpointError, match=r"missing shards of ranks \[1\]"):
        target.load(three)

    mixed = tmp_path / "mixed"
    store.save(mixed, 0, 1)
    store.save(mixed, 0, 2)
    with pytest.raises(SampleStoreCheckpointError, match=r"world sizes \[1, 2\]"):
        target.load(mixed)

    stale = tmp_path / "stale"  # rank 1's shard is left over from an older save
    store.save(stale, 1, 2)
    store.scatter("loss", ids[:1], torch.tensor([123.0]))
    store.save(stale, 0, 2)
    with pytest.raises(SampleStoreCheckpointError, match="different saves"):
        target.load(stale)
    before = target.digest()
    (stale / shard_name(1, 2)).write_bytes(b"not a torch file")
    with pytest.raises(SampleStoreCheckpointError, match="unreadable shard"):
        target.load(stale)
    assert target.digest() == before  # a failed load changes nothing


# -- two gloo ranks -----------------------------------------------------------------------------------------

N = 30


def rank_calls(ids: np.ndarray) -> list[list[tuple[str, np.ndarray, torch.Tensor]]]:
    """Each rank's scatter calls (column, ids, values), in call order; the same ids on both ranks overlap."""
    rng = np.random.default_rng(3)
    shared = ids[4]
    calls: list[list[tuple[str, np.ndarray, torch.Tensor]]] = [[], []]
    # soft: rank 0 rows 0-5, rank 1 rows 3-6 and 20-21; rows 3, 4, 5 written by both
    for rank, rows in enumerate((ids[0:6], np.concatenate([ids[3:7], ids[20:22]]))):
        calls[rank].append(("soft", rows, random_probs(rng, len(rows))))
    # loss: rank 0 writes the shared id twice (its last write counts), rank 1 once: rank 1 wins
    calls[0].append(("loss", np.array([shared, ids[9], shared]), torch.tensor([1.0, 2.0, 3.0])))
    calls[1].append(("loss", np.array([shared]), torch.tensor([4.0])))
    # count: only rank 1 writes; feature: only rank 0; both with an empty call on the other rank
    calls[0].append(("count", ids[:0], torch.zeros(0, 2, dtype=torch.int64)))
    calls[1].append(("count", ids[10:13], torch.tensor([[1, 2], [3, 4], [5, 6]])))
    calls[0].append(("feature", ids[25:30], torch.from_numpy(rng.standard_normal((5, 4))).float()))
    calls[1].append(("feature", ids[:0], torch.zeros(0, 4)))
    # nobody writes anything
    calls[0].append(("loss", ids[:0], torch.zeros(0)))
    calls[1].append(("loss", ids[:0], torch.zeros(0)))
    return calls


def _check_failures_reach_every_rank(rank: int, store: SampleStore, ids: np.ndarray) -> None:
    before = store.digest()
    bad_id = int(ids[-1]) + 1
    if rank == 1:
        with pytest.raises(UnknownSampleIdError, match=str(bad_id)):
            store.scatter("loss", [bad_id], torch.zeros(1))
    else:
        with pytest.raises(ValueError, match=r"failed on rank\(s\) \[1\]"):
            store.scatter("loss", ids[:1], torch.zeros(1))
    column = "loss" if rank == 0 else "feature"
    values = torch.zeros(1) if rank == 0 else torch.zeros(1, 4)
    with pytest.raises(ValueError, match=r"disagree on the column.*\['loss', 'feature'\]"):
        store.scatter(column, ids[:1], values)
    assert store.digest() == before


def _worker(rank: int, init_file: str, checkpoint: str, expected: dict[str, Any]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60)
    )
    try:
        ids = arbitrary_ids(N)
        store = make_store(ids)
        gathers = []
        original = dist.all_gather

        def counting(*args: Any, **kwargs: Any) -> Any:
            gathers.append(args[1].dtype)
            return original(*args, **kwargs)

        dist.all_gather = counting
        try:
            for column, rows, values in rank_calls(ids)[rank]:
                store.scatter(column, rows, values)
        finally:
            dist.all_gather = original
        # 4 calls with rows (header, row indices, row bytes) + 1 call with none anywhere (header only)
        assert len(gathers) == 3 * 4 + 1 and gathers[:3] == [torch.int64, torch.int64, torch.uint8]

        assert store.digest() == expected["digest"]
        for key, t in store.tensors().items():
            assert torch.equal(t, expected["tensors"][key]), key
        assert_replicas_identical(store.tensors())
        assert store.gather("loss", ids[[4, 9]]).squeeze(1).tolist() == [4.0, 2.0]  # rank 1 won id 4

        _check_failures_reach_every_rank(rank, store, ids)
        store.save(checkpoint)  # rank and world size from the process group
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_scatter_into_identical_stores_and_save(tmp_path: Path) -> None:
    ids = arbitrary_ids(N)
    reference = make_store(ids)  # one process applying rank 0's calls, then rank 1's, call by call
    calls = rank_calls(ids)
    for per_rank in zip(*calls, strict=True):
        for column, rows, values in per_rank:
            reference.scatter(column, rows, values)
    expected = {
        "digest": reference.digest(),
        "tensors": {k: t.clone() for k, t in reference.tensors().items()},
    }
    soft = reference.gather("soft", ids[3:6])
    assert torch.equal(soft, make_store_with(ids, "soft", ids[3:6], calls[1][0][2][:3]))  # rank 1 won

    checkpoint = tmp_path / "checkpoint"
    # fork, not spawn: a spawned child re-imports torch, which costs seconds per rank on a 2-core machine
    mp.start_processes(
        _worker,
        args=(str(tmp_path / "rendezvous"), str(checkpoint), expected),
        nprocs=WORLD,
        join=True,
        start_method="fork",
    )
    assert sorted(p.name for p in checkpoint.iterdir()) == [shard_name(0, 2), shard_name(1, 2)]
    restored = make_store(ids)
    restored.load(checkpoint)
    assert_same(restored, reference)


def make_store_with(ids: np.ndarray, column: str, rows: np.ndarray, values: torch.Tensor) -> torch.Tensor:
    store = make_store(ids)
    store.scatter(column, rows, values)
    return store.gather(column, rows)
