"""Which steps read a trusted batch: the loop's streams follow ``Method.takes_trusted_at`` (meta_every).

No Ray: the training and trusted streams of ``Streams`` are replaced by counters (batch i is the int i, the
n-th trusted batch drawn is the int n), so what is checked is only which step draws which trusted batch,
also when a resumed epoch replays its first steps, and the step numbering the loop asks the method with.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import torch

from raynoisy.methods.base import Stage
from raynoisy.train.epoch_totals import EpochTotals
from raynoisy.train.loop import Worker
from raynoisy.train.run_files import LoopState
from raynoisy.train.streams import Streams

STAGE = Stage("train", 3)


def counting_streams(steps: int) -> Streams:
    """``Streams`` whose epoch has ``steps`` training batches 0..steps-1 and a trusted stream 0, 1, 2, ..."""
    streams = Streams(
        cfg=None,  # type: ignore[arg-type]  # not read by epoch() once its sources are replaced
        info=SimpleNamespace(steps_per_epoch=steps),  # type: ignore[arg-type]
        rank=0,
        world_size=1,
        device=torch.device("cpu"),
    )
    streams._train_batches = lambda: iter(range(steps))  # type: ignore[method-assign,assignment]

    def trusted(epoch: int, size: int) -> Iterator[int] | None:
        return itertools.count() if size else None

    streams._trusted = trusted  # type: ignore[method-assign,assignment]
    return streams


def pairs(streams: Streams, skip: int = 0, trusted_at: Callable[[int], bool] | None = None) -> list[Any]:
    return list(streams.epoch(STAGE, 0, trusted_size=4, skip=skip, trusted_at=trusted_at))


def test_every_step_draws_a_trusted_batch_by_default() -> None:
    assert pairs(counting_streams(4)) == [(0, 0), (1, 1), (2, 2), (3, 3)]


def test_declined_steps_leave_the_trusted_stream_where_it_is() -> None:
    every_third = pairs(counting_streams(7), trusted_at=lambda index: index % 3 == 0)
    assert every_third == [(0, 0), (1, None), (2, None), (3, 1), (4, None), (5, None), (6, 2)]


def test_a_resumed_epoch_replays_the_same_trusted_draws() -> None:
    """Skipping the first 4 steps (a step checkpoint) still consumes the trusted batches they drew."""
    resumed = pairs(counting_streams(7), skip=4, trusted_at=lambda index: index % 3 == 0)
    assert resumed == [(4, None), (5, None), (6, 2)]


def test_the_loop_asks_with_the_step_in_the_stage() -> None:
    """Epoch 2 of the stage, 4 steps per epoch, resumed after its first step: the method is asked about
    stage steps 8..11 (and 8 for the replayed step), and step 9 is the one that gets a trusted batch."""
    asked: list[int] = []

    def takes_trusted_at(stage: Stage, step: int) -> bool:
        asked.append(step)
        return step % 3 == 0

    method = SimpleNamespace(trusted_batch_size=lambda stage: 4, takes_trusted_at=takes_trusted_at)
    worker = SimpleNamespace(
        state=LoopState(stage=0, epoch=5, epoch_in_stage=2, step=1),
        method=method,
        info=SimpleNamespace(steps_per_epoch=4),
        streams=counting_streams(4),
    )
    got = list(Worker.epoch_pairs(worker, STAGE))  # type: ignore[arg-type]
    assert got == [(1, 0), (2, None), (3, None)]
    assert asked == [8, 9, 10, 11]
    # The step the loop then runs is told the same numbering (``Method.train_step_at``), step by step.
    told = []
    for _ in got:
        told.append(Worker.step_in_stage(worker))  # type: ignore[arg-type]
        worker.state.step += 1
    assert told == [9, 10, 11]


def test_epoch_means_count_only_the_steps_that_logged_a_scalar() -> None:
    """A meta_loss logged on meta-update steps only is averaged over those steps, not over all."""
    totals = EpochTotals()
    totals.add({"loss": 1.0, "meta_loss": 4.0})
    totals.add({"loss": 3.0})
    totals.add({"loss": 5.0})
    assert totals.steps == 3
    assert totals.means() == {"loss": 3.0, "meta_loss": 4.0}
