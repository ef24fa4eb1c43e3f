"""A rank's input streams: the training stream, the trusted stream, and whole-split passes.

- The training stream is this rank's part of the Ray Data streaming split of the noisy training set.
- The trusted stream cycles the (small) trusted set, reshuffled each pass, seeded by rank and epoch, so a
  resumed epoch replays it exactly.
- A split pass reads this rank's share of a split's shard files with the evaluation transform: for
  evaluation, GLC's corruption matrix, and any method's per-epoch statistics over the training set.

The trusted stream and each split pass read their shard files (or plan their Ray Dataset) on first use
and keep them for the run: every later epoch and pass re-reads nothing but what a Dataset streams.

Every stream counts undecodable samples; ``check_bad_fraction`` fails the run when too many were skipped.
The time spent waiting for the next batch is measured, so the log shows whether input is the bottleneck.
What a training step or a method sees carries no true label (``Batch.without_truth``): true labels are
read only by evaluation and by the label-quality tables, from ``labels.parquet``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import numpy as np
import ray.train
import torch

from raynoisy.config import Config
from raynoisy.data.batch import Batch
from raynoisy.data.pipeline import (
    BadSampleCounter,
    InMemorySplit,
    check_bad_fraction,
    cycle_batches,
    files_for_rank,
    iter_batches,
    sample_dataset,
    whole_split_source,
)
from raynoisy.meta.sync import all_reduce_sum_
from raynoisy.methods.base import Stage
from raynoisy.train.run_files import RunInfo


def pass_batch_size(cfg: Config) -> int:
    """Batch size of a whole-split pass (evaluation, ``MethodContext.iter_split``): at least 256, since a
    pass has no optimizer step to keep small, and the training batch where that is larger."""
    return max(256, cfg.optim.batch_size)


class Streams:
    """One rank's data access."""

    def __init__(self, cfg: Config, info: RunInfo, rank: int, world_size: int, device: torch.device) -> None:
        self.cfg, self.info = cfg, info
        self.rank, self.world_size, self.device = rank, world_size, device
        self.bad = BadSampleCounter()
        self.wait_seconds = 0.0
        # Planned on first use and reused: per split, the rows in memory or the Ray Dataset whose reads are
        # planned once (re-executed by every later pass); the same for the trusted stream, which reads every
        # rank's trusted files with the training transform.
        self._passes: dict[str, InMemorySplit | ray.data.Dataset] = {}
        self._trusted_source: InMemorySplit | ray.data.Dataset | None = None

    def split_pass(self, split: str) -> Iterator[Batch]:
        """This rank's share of ``split`` once, un-augmented; small splits other than train stay in memory."""
        files = files_for_rank(self.info.files.get(split, []), self.rank, self.world_size)
        batch_size = pass_batch_size(self.cfg)
        if not files:
            return iter(())
        if split not in self._passes:
            read = sample_dataset if split == "train" else whole_split_source
            self._passes[split] = read(
                files, self.info.input, train=False, read_task_rows=self.cfg.data.read_task_rows
            )
        rows = self._passes[split]
        if isinstance(rows, InMemorySplit):
            return rows.batches(batch_size, train=False, device=self.device, rng=np.random.default_rng(0))
        return iter_batches(
            rows,
            batch_size=batch_size,
            family=self.info.input.family,
            device=self.device,
            counter=self.bad,
        )

    def epoch(
        self,
        stage: Stage,
        epoch: int,
        trusted_size: int,
        skip: int = 0,
        trusted_at: Callable[[int], bool] | None = None,
    ) -> Iterator[tuple[Batch, Batch | None]]:
        """The epoch's (batch, trusted batch) pairs; the first ``skip`` are read and dropped (on resume).

        ``trusted_at(index)``: whether the epoch's step ``index`` draws a trusted batch (None: every step);
        a step that does not gets None and leaves the trusted stream where it is. The skipped trusted batches
        are the same ones the interrupted epoch used. The training stream comes from Ray Data, whose order
        is not replayed exactly on resume: the resumed epoch takes its remaining steps from a fresh pass
        over the training shard.
        """
        trusted = self._trusted(epoch, trusted_size)
        if stage.trains_on == "trusted":
            assert trusted is not None, "a stage that trains on the trusted set needs a trusted batch size"
            pairs: Iterator[tuple[Batch, Batch | None]] = (
                (next(trusted), None) for _ in range(self.info.steps_per_epoch)
            )
        else:
            pairs = (
                (batch, next(trusted) if trusted and (trusted_at is None or trusted_at(index)) else None)
                for index, batch in enumerate(self._train_batches())
            )
        for index, pair in enumerate(self._timed(pairs)):
            if index >= skip:
                yield pair

    def method_pass(self, split: str) -> Iterator[Batch]:
        """``split_pass`` as methods get it (``MethodContext.iter_split``): with the true labels hidden."""
        return _without_truth(self.split_pass(split))

    def _trusted(self, epoch: int, size: int) -> Iterator[Batch] | None:
        if size == 0:
            return None
        if self._trusted_source is None:
            self._trusted_source = whole_split_source(
                self.info.files["trusted"],
                self.info.input,
                train=True,
                read_task_rows=self.cfg.data.read_task_rows,
            )
        return _without_truth(
            cycle_batches(
                self._trusted_source,
                self.info.input,
                batch_size=size,
                device=self.device,
                seed=self.cfg.run.seed * 1000 + self.rank + 7919 * epoch,
                counter=self.bad,
            )
        )

    def _train_batches(self) -> Iterator[Batch]:
        return _without_truth(
            iter_batches(
                ray.train.get_dataset_shard("train"),
                batch_size=self.cfg.optim.batch_size // self.world_size,
                family=self.info.input.family,
                device=self.device,
                counter=self.bad,
                drop_last=True,
                shuffle_rows=self.cfg.data.shuffle_buffer_rows,
            )
        )

    def _timed(self, pairs: Iterator[tuple[Batch, Batch | None]]) -> Iterator[tuple[Batch, Batch | None]]:
        while True:
            start = time.perf_counter()
            try:
                pair = next(pairs)
            except StopIteration:
                return
            self.wait_seconds += time.perf_counter() - start
            yield pair

    def check_bad_fraction(self) -> int:
        """Undecodable samples of all ranks since the last call; raises past ``data.max_bad_fraction``."""
        counts = torch.tensor([self.bad.bad, self.bad.seen], dtype=torch.float64)
        all_reduce_sum_([counts])
        self.bad.reset()
        bad, seen = int(counts[0]), int(counts[1])
        check_bad_fraction(bad, seen, self.cfg.data.max_bad_fraction)
        return bad


def _without_truth(batches: Iterator[Batch]) -> Iterator[Batch]:
    return (batch.without_truth() for batch in batches)
