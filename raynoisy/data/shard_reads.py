"""Shard reads planned once per run: a Ray Data source whose read tasks shuffle raw rows, then decode.

``ray.data.read_parquet`` pays fixed costs on every execution, that is every epoch: it lists the files,
starts a pool of Parquet footer-reader actors, and packs up to 128 MiB of Parquet into one read task,
which on a small split leaves one task decoding everything on one core. Shard files are this project's
own, so their layout is known: ``ShardSource`` reads every footer once, when the Dataset is built, and
keeps the row groups as read units. Each execution only permutes the units and deals them out to read
tasks of about ``rows_per_task`` rows; a task reads its row groups, permutes the raw rows (payload bytes,
not decoded images) and emits them in blocks of ``block_rows``, which the pipeline's ``map_batches``
decodes in the same task. Shuffling therefore costs a permutation of bytes, not a buffer of decoded
images, and a training batch mixes the rows of several row groups drawn at random from the whole split.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from ray.data import DataContext, Datasource, ReadTask
from ray.data.block import BlockMetadata

from raynoisy.data.shards import filesystem_of

_FOOTER_THREADS = 16


@dataclass(frozen=True)
class ReadUnit:
    """One row group of one shard file: the smallest piece a read task reads."""

    file: str
    row_group: int
    rows: int
    bytes: int


def open_shard(uri: str) -> pq.ParquetFile:
    """A shard file by local path or pyarrow filesystem URI (s3://, gs://)."""
    fs, path = filesystem_of(uri)
    return pq.ParquetFile(fs.open_input_file(path))


def _file_units(uri: str) -> list[ReadUnit]:
    meta = open_shard(uri).metadata
    return [
        ReadUnit(uri, i, meta.row_group(i).num_rows, meta.row_group(i).total_byte_size)
        for i in range(meta.num_row_groups)
        if meta.row_group(i).num_rows
    ]


def plan_reads(files: Sequence[str]) -> list[ReadUnit]:
    """Every row group of ``files``, in file order; the footers are read concurrently, once."""
    with ThreadPoolExecutor(min(_FOOTER_THREADS, max(1, len(files)))) as pool:
        return [unit for units in pool.map(_file_units, files) for unit in units]


def task_count(units: Sequence[ReadUnit], rows_per_task: int) -> int:
    """How many read tasks ``units`` make at about ``rows_per_task`` rows each (at least one unit each)."""
    rows = sum(unit.rows for unit in units)
    return max(1, min(len(units), round(rows / rows_per_task)))


def deal(units: Sequence[ReadUnit], tasks: int) -> list[list[ReadUnit]]:
    """``units`` cut into ``tasks`` consecutive runs whose unit counts differ by at most one."""
    bounds = np.linspace(0, len(units), tasks + 1).round().astype(int)
    return [list(units[lo:hi]) for lo, hi in itertools.pairwise(bounds) if hi > lo]


def read_units(
    units: Sequence[ReadUnit], columns: Sequence[str], *, shuffle: bool, block_rows: int
) -> Iterator[pa.Table]:
    """The rows of ``units`` (permuted when ``shuffle``), as tables of at most ``block_rows`` rows."""
    by_file: dict[str, list[int]] = {}
    for unit in units:
        by_file.setdefault(unit.file, []).append(unit.row_group)
    tables = [open_shard(f).read_row_groups(groups, columns=list(columns)) for f, groups in by_file.items()]
    table = pa.concat_tables(tables)
    if shuffle:
        table = table.take(np.random.default_rng().permutation(table.num_rows))
    for lo in range(0, table.num_rows, block_rows):
        yield table.slice(lo, block_rows)


class ShardSource(Datasource):
    """The rows of shard files as a Ray Data source, with the read plan made once at construction."""

    def __init__(
        self,
        files: Sequence[str],
        columns: Sequence[str],
        *,
        shuffle: bool,
        rows_per_task: int,
        block_rows: int,
    ) -> None:
        super().__init__()
        if rows_per_task < 1 or block_rows < 1:
            raise ValueError(f"rows_per_task and block_rows must be >= 1, got {rows_per_task}, {block_rows}")
        self.units = plan_reads(files)
        self.columns = list(columns)
        self.shuffle = shuffle
        self.block_rows = block_rows
        # Fixed for the run, so Ray plans the same number of blocks every epoch and has no reason to split
        # them (a split would keep it from fusing the decode into the read tasks).
        self.num_tasks = task_count(self.units, rows_per_task)

    def get_name(self) -> str:
        return "ShardRows"

    def estimate_inmemory_data_size(self) -> int:
        return sum(unit.bytes for unit in self.units)

    def task_units(self) -> list[list[ReadUnit]]:
        """This execution's deal: the units in a fresh random order when shuffling, else in file order."""
        units = self.units
        if self.shuffle:
            units = [units[i] for i in np.random.default_rng().permutation(len(units))]
        return deal(units, self.num_tasks)

    def get_read_tasks(
        self, parallelism: int, per_task_row_limit: int | None = None, data_context: DataContext | None = None
    ) -> list[ReadTask]:
        """One task per dealt group; ``parallelism`` is ignored: the task size, not Ray's guess, sets it."""
        tasks = []
        for units in self.task_units():
            metadata = BlockMetadata(
                num_rows=sum(u.rows for u in units),
                size_bytes=sum(u.bytes for u in units),
                input_files=sorted({u.file for u in units}),
                exec_stats=None,
            )
            read = functools.partial(
                read_units, units, self.columns, shuffle=self.shuffle, block_rows=self.block_rows
            )
            tasks.append(ReadTask(read, metadata, per_task_row_limit=per_task_row_limit))
        return tasks
