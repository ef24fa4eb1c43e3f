"""What a person watching a run sees: one line per logged step and per evaluation, and TensorBoard.

Only rank 0 writes. Lines carry the stage, epoch, step, loss, lr, samples/s, the share of the step time
spent waiting for data, the ETA of the run and the latest validation accuracy.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from raynoisy.train.run_files import LoopState


def emit(text: str) -> None:
    """One progress line to the process's real stdout, which Ray streams to the driver.

    Not plain ``print``: Ray Train V2 patches ``print`` in its workers to log through the root logger and,
    because Ray has replaced ``sys.stdout``, to also tee to the original print, so every line reached the
    driver twice.
    """
    stream = sys.__stdout__ or sys.stdout
    stream.write(f"[raynoisy] {text}\n")
    stream.flush()


class ProgressLog:
    """Progress lines and TensorBoard scalars of one rank (silent on every rank but 0)."""

    def __init__(
        self, *, rank: int, steps_per_epoch: int, total_steps: int, tensorboard_dir: Path | None
    ) -> None:
        self.active = rank == 0
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = total_steps
        self.latest_val = float("nan")
        self.writer = None
        if self.active and tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(tensorboard_dir))
        self._start = time.time()
        self._start_step = 0

    def line(self, text: str) -> None:
        if self.active:
            emit(text)

    def global_step(self, state: LoopState) -> int:
        return state.global_step(self.steps_per_epoch)

    def resumed_at(self, state: LoopState) -> None:
        self._start, self._start_step = time.time(), self.global_step(state)

    def step(
        self,
        state: LoopState,
        stage: str,
        stats: dict[str, float],
        lr: float,
        samples: int,
        epoch_started: float,
        wait_seconds: float,
    ) -> None:
        """A progress line and the step's TensorBoard scalars."""
        now, global_step = time.time(), self.global_step(state)
        rate = (global_step - self._start_step) / max(1e-9, now - self._start)
        eta = (self.total_steps - global_step) / rate if rate > 0 else float("nan")
        elapsed = max(1e-9, now - epoch_started)
        self.line(
            f"[{stage}] epoch {state.epoch + 1} step {state.step}/{self.steps_per_epoch} "
            f"loss {stats.get('loss', float('nan')):.4f} lr {lr:.4g} {samples / elapsed:.0f} samples/s "
            f"data wait {wait_seconds / elapsed:.0%} val {self.latest_val:.4f} eta {duration(eta)}"
        )
        self.scalars({f"train/{k}": v for k, v in stats.items()} | {"train/lr": lr}, global_step)

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.writer is None:
            return
        for key, value in values.items():
            if isinstance(value, int | float) and not isinstance(value, bool) and np.isfinite(value):
                self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def duration(seconds: float) -> str:
    """``1m05s``, ``2h03m``, or ``?`` when unknown."""
    if not np.isfinite(seconds):
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"
