"""Ray Data pipelines from Parquet shards to torch batches that keep ``sample_id``.

The noisy training stream is one Dataset the driver hands to Ray Train, which splits it across workers
(``streaming_split``, equal row counts so every rank takes the same number of steps). The small streams
(trusted batches, validation, test, per-sample exports) are built inside each worker from the shard file
list: evaluation sets are divided by file across ranks, so each sample is evaluated exactly once and
accuracies are exact after one all-reduce.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import ray
import torch

from raynoisy.data.batch import Batch
from raynoisy.data.shard_reads import ShardSource, open_shard
from raynoisy.data.shards import filesystem_of
from raynoisy.data.text import TextTransform
from raynoisy.data.transforms import ImageTransform, normalize
from raynoisy.errors import TooManyBadSamplesError

_COLUMNS = ["sample_id", "payload", "given_label", "true_label"]
DECODE_BATCH_ROWS = 256  # rows a read task decodes per call and hands on as one block
# Splits whose shard files on this rank add up to less than this are read once into worker memory and
# decoded in-process: a Ray Data execution costs about a second to start, which would dominate small
# validation/trusted passes. Larger splits stream through Ray Data every time.
IN_MEMORY_BYTES = 256 * 2**20


def quiet_ray_data() -> None:
    """No per-operator progress bars: rank 0 prints its own progress lines."""
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.enable_operator_progress_bars = False
    ctx.print_on_execution_start = False


@dataclass(frozen=True)
class InputSpec:
    """The network input of a run, shared by the driver and the workers.

    Images: ``family`` is the transform family, ``size`` the side in pixels, ``channels`` 1 or 3. Text:
    ``family`` is ``"text"``, ``size`` the tokens per sample (``data.max_tokens``), ``channels`` 0 and
    ``tokenizer`` the encoder's folder or hub name.
    """

    family: str
    size: int
    channels: int
    tokenizer: str | None = None

    def transform(self, train: bool) -> ImageTransform | TextTransform:
        if self.family == "text":
            assert self.tokenizer is not None, "a text input needs the encoder's tokenizer"
            return TextTransform(self.tokenizer, self.size)  # no augmentation of text
        return ImageTransform(self.family, self.size, self.channels, train)


def sample_dataset(
    files: list[str], spec: InputSpec, *, train: bool, read_task_rows: int
) -> ray.data.Dataset:
    """Shard rows -> decode/augment (or tokenise) in map_batches, fused into the read tasks.

    The reads are planned here, once (``ShardSource``); each execution (each epoch) deals the row groups to
    read tasks of ``read_task_rows`` rows in a fresh random order in training, and every task shuffles its
    raw rows before they are decoded. Evaluation reads in file order, unshuffled.
    """
    source = ShardSource(
        files, _COLUMNS, shuffle=train, rows_per_task=read_task_rows, block_rows=DECODE_BATCH_ROWS
    )
    # batch_size=None: one call per block the read emits (DECODE_BATCH_ROWS rows), which lets Ray fuse the
    # decode into the read task; a fixed batch size would ship raw bytes to separate decode tasks.
    return ray.data.read_datasource(source, override_num_blocks=source.num_tasks).map_batches(
        spec.transform(train), batch_size=None, batch_format="numpy"
    )


def files_for_rank(files: list[str], rank: int, world_size: int) -> list[str]:
    return files[rank::world_size]


class BadSampleCounter:
    """Counts rows that failed to decode, so the worker can enforce ``data.max_bad_fraction``."""

    def __init__(self) -> None:
        self.bad = 0
        self.seen = 0

    def reset(self) -> None:
        self.bad = self.seen = 0


def check_bad_fraction(bad: int, seen: int, limit: float) -> None:
    """Fail the run once more than ``limit`` of the rows seen could not be decoded."""
    if seen and bad > limit * seen:
        raise TooManyBadSamplesError(
            f"{bad} of {seen} images failed to decode this epoch (limit {limit:.1%}); "
            "fix the shards or raise data.max_bad_fraction"
        )


def to_batch(raw: dict[str, torch.Tensor], family: str, counter: BadSampleCounter | None) -> Batch:
    """Drop undecodable rows (counted), normalise images or cut token rows to the batch's longest, wrap."""
    ok = raw["ok"].bool()
    if counter is not None:
        counter.seen += int(ok.numel())
        counter.bad += int((~ok).sum())
    if not bool(ok.all()):
        raw = {k: v[ok] for k, v in raw.items()}
    if family == "text":
        longest = int(raw["length"].max()) if len(raw["length"]) else 0
        x = raw["tokens"][:, :longest].long()
    else:
        x = normalize(raw["image"], family)
    return Batch(
        x=x,
        y=raw["given_label"].long(),
        sample_id=raw["sample_id"].long(),
        true_y=raw["true_label"].long(),
    )


def iter_batches(
    iterable,
    *,
    batch_size: int,
    family: str,
    device: torch.device,
    counter: BadSampleCounter | None = None,
    drop_last: bool = False,
    shuffle_rows: int | None = None,
) -> Iterator[Batch]:
    """Torch batches from a Dataset or a Train dataset shard (both have ``iter_torch_batches``).

    ``shuffle_rows``: an optional local shuffle buffer of decoded samples (``data.shuffle_buffer_rows``).
    """
    for raw in iterable.iter_torch_batches(
        batch_size=batch_size,
        device=device,
        drop_last=drop_last,
        local_shuffle_buffer_size=shuffle_rows,
    ):
        batch = to_batch(raw, family, counter)
        if len(batch):
            yield batch


class InMemorySplit:
    """A small split's rows held as payload bytes on the worker; decoded and augmented on demand."""

    def __init__(self, rows: dict[str, np.ndarray], spec: InputSpec) -> None:
        self.rows = rows
        self.spec = spec

    @classmethod
    def read(cls, files: list[str], spec: InputSpec) -> InMemorySplit:
        """The rows of the shard ``files``, in file order."""
        tables = [_read_table(f) for f in files]
        table = pa.concat_tables(tables) if tables else pa.table({c: [] for c in _COLUMNS})
        return cls({c: table.column(c).to_numpy(zero_copy_only=False) for c in _COLUMNS}, spec)

    def __len__(self) -> int:
        return len(self.rows["sample_id"])

    def take(self, index: np.ndarray) -> InMemorySplit:
        """The rows at ``index`` (positions or a boolean mask), in that order: a fold of the split."""
        return InMemorySplit({c: v[index] for c, v in self.rows.items()}, self.spec)

    def batches(
        self,
        batch_size: int,
        *,
        train: bool,
        device: torch.device,
        rng: np.random.Generator,
        counter: BadSampleCounter | None = None,
    ) -> Iterator[Batch]:
        order = rng.permutation(len(self)) if train else np.arange(len(self))
        transform = self.spec.transform(train)
        for lo in range(0, len(order), batch_size):
            idx = order[lo : lo + batch_size]
            raw = transform({c: v[idx] for c, v in self.rows.items()})
            batch = to_batch(
                {k: torch.from_numpy(v).to(device) for k, v in raw.items()}, self.spec.family, counter
            )
            if len(batch):
                yield batch


def _read_table(uri: str) -> pa.Table:
    return open_shard(uri).read(columns=_COLUMNS)


def total_bytes(files: list[str]) -> int:
    size = 0
    for uri in files:
        fs, path = filesystem_of(uri)
        size += fs.get_file_info(path).size or 0
    return size


def whole_split_source(
    files: list[str], spec: InputSpec, *, train: bool, read_task_rows: int
) -> InMemorySplit | ray.data.Dataset:
    """What every pass over a split that is read whole reads from, planned once per run: its rows in
    worker memory when ``files`` add up to at most ``IN_MEMORY_BYTES``, else a Ray Dataset whose reads
    were planned here (each pass re-executes it; ``train`` picks the augmenting transform)."""
    if total_bytes(files) <= IN_MEMORY_BYTES:
        return InMemorySplit.read(files, spec)
    return sample_dataset(files, spec, train=train, read_task_rows=read_task_rows)


def cycle_batches(
    source: InMemorySplit | ray.data.Dataset,
    spec: InputSpec,
    *,
    batch_size: int,
    device: torch.device,
    seed: int,
    counter: BadSampleCounter | None = None,
) -> Iterator[Batch]:
    """Endless augmented batches from a small split (the trusted set); a new shuffle each pass.

    Rows in memory are shuffled with the seeded ``rng`` of each pass, so a resumed epoch replays them; a
    Dataset (a trusted set over ``IN_MEMORY_BYTES``) is shuffled by its read tasks.
    """
    for cycle in itertools.count():
        if isinstance(source, InMemorySplit):
            rng = np.random.default_rng([seed, cycle])
            batches = source.batches(batch_size, train=True, device=device, rng=rng, counter=counter)
        else:
            batches = iter_batches(
                source, batch_size=batch_size, family=spec.family, device=device, counter=counter
            )
        produced = False
        for batch in batches:
            produced = True
            yield batch
        if not produced:
            raise RuntimeError("the trusted stream produced no samples: its shard files hold no readable row")
