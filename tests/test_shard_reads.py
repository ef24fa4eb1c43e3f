"""Shard reads planned once: row-group units, the per-execution deal, raw-row shuffling, and the Ray path."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raynoisy.data.shard_reads import ReadUnit, ShardSource, deal, plan_reads, read_units, task_count

COLUMNS = ["sample_id", "payload"]


def _write(tmp_path, sizes: list[int], row_group: int) -> list[str]:
    """Shard files of ``sizes`` rows with consecutive sample ids, ``row_group`` rows per row group."""
    files, start = [], 0
    for i, n in enumerate(sizes):
        ids = np.arange(start, start + n, dtype=np.int64)
        table = pa.table({"sample_id": ids, "payload": [f"p{j}".encode() for j in ids], "extra": ids * 2})
        path = tmp_path / f"part-{i:05d}.parquet"
        pq.write_table(table, path, row_group_size=row_group)
        files.append(str(path))
        start += n
    return files


def _ids(tables) -> np.ndarray:
    return np.concatenate([t.column("sample_id").to_numpy() for t in tables])


def test_plan_reads_lists_every_row_group_in_file_order(tmp_path):
    files = _write(tmp_path, [100, 35, 64], row_group=32)
    units = plan_reads(files)
    expected = [(f, g) for f, n in zip(files, [100, 35, 64], strict=True) for g in range(-(-n // 32))]
    assert [(u.file, u.row_group) for u in units] == expected
    assert [u.rows for u in units] == [32, 32, 32, 4, 32, 3, 32, 32]
    assert all(u.bytes > 0 for u in units)


def test_deal_cuts_consecutive_runs_of_near_equal_length():
    units = [ReadUnit("f", i, rows, 1) for i, rows in enumerate([30, 30, 30, 10, 50, 5, 64])]
    assert task_count(units, rows_per_task=60) == 4  # 219 rows
    groups = deal(units, 4)
    assert [u for g in groups for u in g] == units  # consecutive, in order, each unit once
    assert sorted(len(g) for g in groups) == [1, 2, 2, 2]
    assert deal(units, 7) == [[u] for u in units]
    assert task_count(units, rows_per_task=1) == 7  # never more tasks than units
    assert task_count(units, rows_per_task=10_000) == 1
    assert deal([], task_count([], 64)) == []


@pytest.mark.parametrize("shuffle", [False, True])
def test_read_units_returns_the_rows_of_its_row_groups(tmp_path, shuffle):
    files = _write(tmp_path, [100, 64], row_group=32)
    units = plan_reads(files)
    chosen = [units[3], units[0], units[5]]  # rows 96-99, 0-31, 132-163
    blocks = list(read_units(chosen, COLUMNS, shuffle=shuffle, block_rows=16))
    ids = _ids(blocks)
    assert sorted(ids.tolist()) == list(range(0, 32)) + list(range(96, 100)) + list(range(132, 164))
    assert [t.num_rows for t in blocks] == [16, 16, 16, 16, 4]
    assert blocks[0].column_names == COLUMNS
    payloads = np.concatenate([t.column("payload").to_numpy(zero_copy_only=False) for t in blocks])
    assert [p.decode() for p in payloads] == [f"p{i}" for i in ids]  # rows move whole
    if not shuffle:  # in the order of the units
        assert ids.tolist() == list(range(96, 100)) + list(range(0, 32)) + list(range(132, 164))
    else:
        assert not np.array_equal(ids, np.sort(ids))


def test_source_deals_a_fresh_order_per_execution_and_covers_every_row_once(tmp_path):
    files = _write(tmp_path, [256] * 4, row_group=32)
    source = ShardSource(files, COLUMNS, shuffle=True, rows_per_task=96, block_rows=64)
    orders = []
    for _ in range(3):
        tasks = source.get_read_tasks(parallelism=1)
        assert len(tasks) == source.num_tasks == 11  # 1024 / 96; not the parallelism Ray asks for
        assert sum(t.metadata.num_rows for t in tasks) == 1024
        ids = _ids(block for task in tasks for block in task())
        assert sorted(ids.tolist()) == list(range(1024))
        orders.append(ids)
    assert not np.array_equal(orders[0], orders[1]) and not np.array_equal(orders[1], orders[2])
    fixed = ShardSource(files, COLUMNS, shuffle=False, rows_per_task=96, block_rows=64)
    ids = _ids(block for task in fixed.get_read_tasks(4) for block in task())
    assert ids.tolist() == list(range(1024))
    assert source.estimate_inmemory_data_size() == sum(u.bytes for u in source.units)


def test_source_refuses_empty_task_sizes(tmp_path):
    files = _write(tmp_path, [10], row_group=5)
    with pytest.raises(ValueError, match="rows_per_task"):
        ShardSource(files, COLUMNS, shuffle=True, rows_per_task=0, block_rows=8)


@pytest.mark.ray
def test_sample_dataset_delivers_every_sample_once_per_epoch_in_a_new_order(tmp_path, ray_cluster):
    """Through Ray Data as the driver builds it: two executions (epochs) of one Dataset, each decoding every
    image exactly once, in different orders, in as many read tasks as the plan deals."""
    from raynoisy.config import load_config
    from raynoisy.data.pipeline import InputSpec, sample_dataset
    from raynoisy.data.plan import plan_labels
    from raynoisy.data.shards import ROW_GROUP_ROWS, write_shards
    from raynoisy.data.sources import load_catalog

    cfg = load_config("digits", "ce", flags={"run.output": str(tmp_path)})
    catalog = load_catalog("digits", None)
    shards = write_shards(
        catalog, plan_labels(catalog, cfg), str(tmp_path / "shards"), seed=0, source_root=None,
        options={}, rows_per_shard=300, log=lambda _: None,
    )  # fmt: skip
    files = shards.files("train")
    for f in files:  # the shard writer cut every file into row groups of ROW_GROUP_ROWS
        meta = pq.ParquetFile(f).metadata
        assert meta.num_row_groups == -(-meta.num_rows // ROW_GROUP_ROWS)
    dataset = sample_dataset(files, InputSpec("small", 8, 1), train=True, read_task_rows=200)
    epochs = [
        np.concatenate([b["sample_id"] for b in dataset.iter_batches(batch_size=64, batch_format="numpy")])
        for _ in range(2)
    ]
    expected = np.sort(pq.read_table(files, columns=["sample_id"]).column("sample_id").to_numpy())
    for ids in epochs:
        assert np.array_equal(np.sort(ids), expected)
    assert not np.array_equal(epochs[0], epochs[1])
    operators = [line for line in dataset.stats().splitlines() if line.startswith("Operator ")]
    tasks = task_count(plan_reads(files), 200)
    assert len(operators) == 1 and "ReadShardRows->MapBatches(ImageTransform)" in operators[0], operators
    assert f": {tasks} tasks executed" in operators[0], operators
    images = dataset.take_batch(8, batch_format="numpy")["image"]
    assert images.shape == (8, 8, 8, 1) and images.dtype == np.uint8
