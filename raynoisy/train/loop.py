"""The training loop every Ray Train worker runs: stages, epochs, steps, evaluation, checkpoints.

The same function runs with one worker on a laptop and many on a cluster. ``train_loop`` is the whole
control flow; ``Worker`` holds one rank's parts, each a library piece (``streams``, ``checkpoints``,
``selection``, ``progress``, ``export``). A restarted worker group resumes from the latest checkpoint with
all state, mid-epoch too when ``run.eval_every_steps`` wrote a step checkpoint.
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch

from raynoisy.config import Config, config_from_dict
from raynoisy.data.batch import Batch
from raynoisy.data.pipeline import quiet_ray_data
from raynoisy.data.sample_store import SampleStore
from raynoisy.errors import RaynoisyError, TrainingDivergedError
from raynoisy.meta.sync import assert_replicas_identical, state_tensors
from raynoisy.methods import get_method_class
from raynoisy.methods.base import Method, MethodContext, Stage
from raynoisy.train.checkpoints import Checkpoints
from raynoisy.train.epoch_totals import EpochTotals
from raynoisy.train.export import final_files, per_sample_table, summary
from raynoisy.train.precision import autocast, check_device, cpu_note
from raynoisy.train.progress import ProgressLog, emit
from raynoisy.train.run_files import LoopState, RunInfo
from raynoisy.train.selection import Selection, evaluate
from raynoisy.train.services import record_error, recorded_error
from raynoisy.train.streams import Streams


def train_worker(loop_config: dict[str, Any]) -> None:
    """Entry point of every Ray Train worker. A ``RaynoisyError`` is recorded, so it is not retried."""
    services = loop_config["services"]
    if recorded_error(services) is not None:
        return  # a deterministic error ended the run: the driver raises it
    try:
        train_loop(config_from_dict(loop_config["cfg"]), loop_config["info"], services)
    except RaynoisyError as error:
        record_error(services, error)
        raise


def train_loop(cfg: Config, info: RunInfo, services: dict[str, Any]) -> None:
    worker = Worker.start(cfg, info, services)
    method, state, stages = worker.method, worker.state, worker.method.stages(cfg)
    for index in range(state.stage, len(stages)):
        stage = stages[index]
        if index != state.stage or state.global_step(info.steps_per_epoch) == 0:
            worker.start_stage(index, stage)
        while state.epoch_in_stage < stage.epochs:
            method.on_epoch_start(state.epoch)
            epoch = EpochTotals()
            for batch, trusted in worker.epoch_pairs(stage):
                worker.fault_drill()
                with worker.autocast():
                    stats = method.train_step_at(stage, worker.step_in_stage(), batch, trusted)
                worker.after_step(stage, stats, epoch)
            worker.end_epoch(stage, epoch)
    worker.finish(len(stages))


@dataclass
class Worker:
    """One rank's parts of the run and the loop's state."""

    cfg: Config
    info: RunInfo
    rank: int
    world_size: int
    device: torch.device
    streams: Streams
    store: SampleStore
    method: Method
    selection: Selection
    checkpoints: Checkpoints
    log: ProgressLog
    state: LoopState

    @classmethod
    def start(cls, cfg: Config, info: RunInfo, services: dict[str, Any]) -> Worker:
        """Seed, build the method and its context, restore the latest checkpoint if there is one."""
        context = ray.train.get_context()
        rank, world, device = context.get_world_rank(), context.get_world_size(), ray.train.torch.get_device()
        _quiet_and_seed(cfg)
        check_device(cfg.scaling.precision, device)
        streams = Streams(cfg, info, rank, world, device)
        store = SampleStore(ray.get(info.train_ids))
        ctx = MethodContext(
            cfg=cfg, num_classes=info.num_classes, in_channels=info.input.channels,
            image_size=info.input.size, device=device, rank=rank, world_size=world,
            steps_per_epoch=info.steps_per_epoch, num_train=info.counts.get("train", 0),
            num_trusted=info.counts.get("trusted", 0), iter_split=streams.method_pass, sample_store=store,
            services=services,
        )  # fmt: skip
        method = get_method_class(cfg.method.name, cfg.method.module)(ctx)
        selection = Selection()
        checkpoints = Checkpoints(method, store, selection, rank, world, device)
        state = checkpoints.restore() or LoopState()
        stages = method.stages(cfg)
        log = ProgressLog(
            rank=rank,
            steps_per_epoch=info.steps_per_epoch,
            total_steps=info.steps_per_epoch * sum(s.epochs for s in stages),
            tensorboard_dir=Path(info.output) / "tensorboard" if cfg.run.tensorboard else None,
        )
        log.resumed_at(state)
        if note := cpu_note(cfg.scaling.precision, device):
            log.line(note)
        if state.global_step(info.steps_per_epoch):
            log.line(
                f"resumed at epoch {state.epoch + 1} step {state.step} of stage {stages[state.stage].name}"
            )
        return cls(cfg, info, rank, world, device, streams, store, method, selection, checkpoints, log, state)

    def autocast(self) -> AbstractContextManager[None]:
        """What a training step and an evaluation run under: ``scaling.precision``."""
        return autocast(self.cfg.scaling.precision, self.device)

    def start_stage(self, index: int, stage: Stage) -> None:
        """Hand the finished stage's best model to the method's ``on_stage_start`` (None for the first)."""
        previous_best = self.selection.next_stage(self.state) if index else None
        self.state.stage, self.state.epoch_in_stage = index, 0
        self.state.stage_scalars = self.method.on_stage_start(stage, previous_best)

    def step_in_stage(self) -> int:
        """The step about to run, counted from its stage's first step (as ``Method.takes_trusted_at``)."""
        return self.state.epoch_in_stage * self.info.steps_per_epoch + self.state.step

    def epoch_pairs(self, stage: Stage) -> Iterator[tuple[Batch, Batch | None]]:
        """The epoch's (batch, trusted batch) pairs from the loop state's step on.

        A step gets a trusted batch where the method takes one (``Method.takes_trusted_at``), asked with the
        step's place in the stage, which the checkpointed loop state gives: the same answer on every rank,
        and again on the steps a resumed epoch replays.
        """
        state, method = self.state, self.method
        first = state.epoch_in_stage * self.info.steps_per_epoch
        return self.streams.epoch(
            stage,
            state.epoch,
            method.trusted_batch_size(stage),
            skip=state.step,
            trusted_at=lambda index: method.takes_trusted_at(stage, first + index),
        )

    def after_step(self, stage: Stage, stats: dict[str, float], epoch: EpochTotals) -> None:
        """Refuse a non-finite loss, count, log, and evaluate + checkpoint every ``run.eval_every_steps``."""
        state, run = self.state, self.cfg.run
        loss = stats.get("loss", 0.0)
        if not math.isfinite(loss):
            raise TrainingDivergedError(state.epoch + 1, state.step + 1, loss)
        state.step += 1
        epoch.add(stats)
        if state.step % run.log_every_steps == 0:
            samples = epoch.steps * self.cfg.optim.batch_size
            lr = self.method.current_lr()
            self.log.step(state, stage.name, stats, lr, samples, epoch.started, self.streams.wait_seconds)
        inside_epoch = state.step < self.info.steps_per_epoch  # the epoch's end evaluates anyway
        if run.eval_every_steps and state.step % run.eval_every_steps == 0 and inside_epoch:
            self.evaluate_and_checkpoint(stage, {})

    def end_epoch(self, stage: Stage, epoch: EpochTotals) -> None:
        state = self.state
        seconds = time.time() - epoch.started
        state.train_seconds += seconds
        state.train_samples += epoch.steps * self.cfg.optim.batch_size
        metrics = {f"train_{k}": v for k, v in epoch.means().items()}
        metrics |= {f"train_{k}": v for k, v in self.method.on_epoch_end(state.epoch).items()}
        metrics |= {f"train_{k}": v for k, v in state.stage_scalars.items()}
        metrics |= {
            "train_seconds": seconds,
            "data_wait_fraction": self.streams.wait_seconds / max(1e-9, seconds),
        }
        self.streams.wait_seconds = 0.0
        state.stage_scalars, state.step = {}, 0
        state.epoch, state.epoch_in_stage = state.epoch + 1, state.epoch_in_stage + 1
        self.evaluate_and_checkpoint(stage, metrics)

    def evaluate_and_checkpoint(self, stage: Stage, metrics: dict[str, Any]) -> None:
        """Evaluate, let the method see the result, check the replicas, select, log, checkpoint."""
        state, method = self.state, self.method
        with self.autocast():
            metrics = metrics | evaluate(method, self.streams, self.device)
        # ``epoch`` is 1-based: the epoch just finished, or the one in progress at a step checkpoint.
        metrics |= {
            "epoch": state.epoch + (1 if state.step else 0),
            "step": state.step,
            "stage": stage.name,
            "lr": method.current_lr(),
            "bad_samples": self.streams.check_bad_fraction(),
        }
        method.on_evaluated(metrics["epoch"] - 1, metrics)  # 0-based, as on_epoch_start/end
        store_digest = torch.frombuffer(bytearray.fromhex(self.store.digest()), dtype=torch.uint8)
        assert_replicas_identical(state_tensors(method.state_dict()) | {"sample_store": store_digest})
        metrics["replicas_identical"] = True
        self.selection.consider(state, stage, metrics, method.eval_model())
        metrics["best_val_accuracy"] = state.best_val_accuracy
        state.history.append(metrics)
        self.log.latest_val = metrics["val_accuracy"]
        where = f"epoch {metrics['epoch']}" + (f" step {state.step}" if state.step else " done")
        self.log.line(
            f"[{stage.name}] {where}: train loss {metrics.get('train_loss', float('nan')):.4f} "
            f"val {metrics['val_accuracy']:.4f} test {metrics['test_accuracy']:.4f}"
        )
        self.log.scalars({f"epoch/{k}": v for k, v in metrics.items()}, self.log.global_step(state))
        self.checkpoints.report({k: v for k, v in metrics.items() if not isinstance(v, str)}, state)

    def finish(self, num_stages: int) -> None:
        """The per-sample export and the summary, in the final checkpoint."""
        state = self.state
        state.stage = num_stages
        table = per_sample_table(self.method, self.streams, self.rank, self.world_size, self.selection.best)
        values = summary(state)
        self.log.line(
            f"finished: best epoch {state.best_epoch}, val {state.best_val_accuracy:.4f}, "
            f"test {state.best_test_accuracy:.4f}"
        )
        self.checkpoints.report(
            {k: v for k, v in values.items() if k != "history"} | {"final": True},
            state,
            extra_files=final_files(self.method, values, table),
        )
        self.log.close()

    def fault_drill(self) -> None:
        """``run.fail_once_at_step``: the last rank dies once just before that global step (a test drill)."""
        step = self.state.global_step(self.info.steps_per_epoch)
        if self.cfg.run.fail_once_at_step != step or self.rank != self.world_size - 1:
            return
        marker = Path(self.info.fault_marker)
        if marker.exists():
            return
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(f"rank {self.rank} failed on purpose before step {step}\n")
        emit(f"fault drill: rank {self.rank} exits before step {step}")
        os._exit(1)


def _quiet_and_seed(cfg: Config) -> None:
    quiet_ray_data()
    logging.getLogger("ray.train").setLevel(logging.WARNING)  # not a line per reported checkpoint
    torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker or 1)))
    random.seed(cfg.run.seed)
    np.random.seed(cfg.run.seed)
    torch.manual_seed(cfg.run.seed)
