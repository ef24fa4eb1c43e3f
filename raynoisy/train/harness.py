"""Driving a method without Ray: build its context from in-memory batches and walk its stages.

For tests, benchmarks, the in-process backend (``raynoisy.train.in_process``) and debugging a new method on a
laptop: the same hooks in the same order as the Ray Train loop (``raynoisy.train.loop``), one process, no
data pipeline. ``walk_stages`` is the loop's control flow without checkpoints; given an ``Evaluation`` it
also evaluates and selects where the loop does (each epoch's end, ``on_evaluated`` in between), so the hook
order has one implementation outside the loop. ``start_stage`` brings a fresh method to the first step of a
named stage (e.g. to time GLC's phase-2 steps).

Without an ``Evaluation`` there is no validation set, so a stage starts from the model the previous stage
ended with, where the loop hands ``on_stage_start`` the previous stage's best-validation model.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import torch

from raynoisy.config import Config
from raynoisy.data.batch import Batch
from raynoisy.data.sample_store import SampleStore
from raynoisy.methods import get_method_class
from raynoisy.methods.base import Method, MethodContext, Stage
from raynoisy.train.epoch_totals import EpochTotals
from raynoisy.train.precision import autocast

ModelState = dict[str, torch.Tensor]


def method_context(
    cfg: Config,
    *,
    num_classes: int,
    in_channels: int,
    image_size: int,
    steps_per_epoch: int,
    num_train: int,
    num_trusted: int,
    splits: Mapping[str, Sequence[Batch]] | None = None,
    train_ids: np.ndarray | None = None,
    device: torch.device | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> MethodContext:
    """A ``MethodContext`` as the loop fills it for rank ``rank`` of ``world_size``.

    ``ctx.iter_split(name)`` replays ``splits[name]`` (a split not given is empty, as a split without files
    is in the loop); ``ctx.sample_store`` covers ``train_ids`` (default ``0..num_train-1``, which needs
    ``num_train >= 1``); ``ctx.services`` holds a plain, in-process instance of each of the method's
    services (``Method.services``), which methods call through the same adapter as an actor handle;
    ``device`` defaults to the CPU.
    """
    batches = dict(splits or {})
    ids = np.arange(num_train, dtype=np.int64) if train_ids is None else np.sort(train_ids)
    return MethodContext(
        cfg=cfg,
        num_classes=num_classes,
        in_channels=in_channels,
        image_size=image_size,
        device=device or torch.device("cpu"),
        rank=rank,
        world_size=world_size,
        steps_per_epoch=steps_per_epoch,
        num_train=num_train,
        num_trusted=num_trusted,
        iter_split=lambda split: iter(batches.get(split, ())),
        sample_store=SampleStore(ids),
        services={
            spec.name: spec.actor_class(**spec.kwargs)
            for spec in get_method_class(cfg.method.name, cfg.method.module).services(cfg)
        },
    )


def build_method(ctx: MethodContext) -> Method:
    """The configured method (``method.name``, after importing ``method.module``), built as every Ray worker
    builds it: Python's, NumPy's and torch's global generators seeded with ``run.seed`` just before."""
    cfg = ctx.cfg
    method_cls = get_method_class(cfg.method.name, cfg.method.module)
    random.seed(cfg.run.seed)
    np.random.seed(cfg.run.seed)
    torch.manual_seed(cfg.run.seed)
    return method_cls(ctx)


def _snapshot(method: Method) -> ModelState:
    return {k: v.detach().clone() for k, v in method.eval_model().state_dict().items()}


def start_stage(method: Method, name: str) -> Stage:
    """Bring a freshly built ``method`` to the first step of stage ``name``; returns that stage.

    The loop's hooks without steps: for every earlier stage ``on_stage_start`` and each epoch's
    ``on_epoch_start`` and ``on_epoch_end``; then ``on_stage_start`` of stage ``name`` and
    ``on_epoch_start`` of its first epoch. The next ``train_step`` is the stage's first.
    """
    previous: ModelState | None = None
    epoch = 0
    for stage in method.stages(method.ctx.cfg):
        method.on_stage_start(stage, previous)
        if stage.name == name:
            method.on_epoch_start(epoch)
            return stage
        for _ in range(stage.epochs):
            method.on_epoch_start(epoch)
            method.on_epoch_end(epoch)
            epoch += 1
        previous = _snapshot(method)
    raise ValueError(f"{method.name} has no stage {name!r}")


class Evaluation(Protocol):
    """Evaluation and best-validation selection for ``walk_stages``, asked where the loop evaluates.

    After each epoch's ``on_epoch_end``: ``evaluate``, then the method's ``on_evaluated`` with its metrics,
    then ``select``; at each stage's end ``stage_best``, which the next stage's ``on_stage_start`` gets.
    """

    def evaluate(self, method: Method, stage: Stage, epoch: int, log: dict[str, Any]) -> dict[str, Any]:
        """The metrics ``on_evaluated`` gets for epoch ``epoch`` (0-based): its training ``log`` (as
        ``walk_stages`` returns it) and the accuracies of ``method.eval_model()``."""
        ...

    def select(self, method: Method, stage: Stage, metrics: dict[str, Any]) -> None:
        """Consider ``method.eval_model()``, evaluated as ``metrics`` say, for the best-validation model."""
        ...

    def stage_best(self) -> ModelState | None:
        """The best-validation model of the stage that just ended; the next stage starts a best of its own."""
        ...


def walk_stages(
    method: Method,
    batches: Callable[[Stage, int], Iterable[Batch]],
    trusted: Callable[[int], Batch] | None = None,
    evaluation: Evaluation | None = None,
) -> list[dict[str, Any]]:
    """Train a freshly built ``method`` through every stage, with the loop's hooks in the loop's order.

    ``batches(stage, epoch)`` gives an epoch's noisy batches (``epoch`` counts over all stages, from 0) and
    ``trusted(size)`` one trusted batch of ``size`` samples. As in the loop, each step of a stage that
    trains on ``train`` gets a trusted batch of ``method.trusted_batch_size(stage)`` (None when that is 0,
    or where ``method.takes_trusted_at`` declines the step, asked with epoch in stage x
    ``ctx.steps_per_epoch`` + step in epoch), and a stage that trains on ``trusted`` takes
    ``ctx.steps_per_epoch`` steps on trusted batches with None as the trusted batch (``batches`` is not
    called for it). With an ``evaluation``, each epoch is evaluated and selected as in the loop and a stage
    starts from the previous stage's best-validation model; without one, from the model the previous stage
    ended with (see the module docstring). Returns one log per epoch: ``stage``, the mean of every scalar
    its steps logged, each over the steps that logged it, as the loop's ``train_*`` metrics (``loss`` NaN
    without steps), the scalars of ``on_epoch_end`` and of ``on_stage_start`` (first epoch of a stage), and
    the ``seconds`` from ``on_epoch_start`` to the end of ``on_epoch_end``.
    """
    logs: list[dict[str, Any]] = []
    previous: ModelState | None = None
    epoch = 0
    for stage in method.stages(method.ctx.cfg):
        scalars = method.on_stage_start(stage, previous)
        size = method.trusted_batch_size(stage)
        if stage.trains_on == "trusted" and size == 0:
            raise ValueError(f"stage {stage.name} of {method.name} trains on trusted batches of size 0")
        if size and trusted is None:
            raise ValueError(
                f"stage {stage.name} of {method.name} takes trusted batches of {size}: pass trusted"
            )
        for epoch_in_stage in range(stage.epochs):
            started = time.perf_counter()
            method.on_epoch_start(epoch)
            first = epoch_in_stage * method.ctx.steps_per_epoch
            totals = EpochTotals()
            pairs = _pairs(method, stage, epoch, first, size, batches, trusted)
            for index, (batch, pair) in enumerate(pairs):
                with autocast(method.ctx.cfg.scaling.precision, method.ctx.device):
                    totals.add(method.train_step_at(stage, first + index, batch, pair))
            log = {"stage": stage.name, "loss": float("nan")} | totals.means()
            log |= method.on_epoch_end(epoch) | scalars
            log["seconds"] = time.perf_counter() - started
            if evaluation is not None:
                metrics = evaluation.evaluate(method, stage, epoch, log)
                method.on_evaluated(epoch, metrics)
                evaluation.select(method, stage, metrics)
            logs.append(log)
            scalars = {}
            epoch += 1
        previous = _snapshot(method) if evaluation is None else evaluation.stage_best()
    return logs


def _pairs(
    method: Method,
    stage: Stage,
    epoch: int,
    first: int,
    size: int,
    batches: Callable[[Stage, int], Iterable[Batch]],
    trusted: Callable[[int], Batch] | None,
) -> Iterator[tuple[Batch, Batch | None]]:
    """An epoch's (batch, trusted batch) pairs, drawn one step at a time as the loop's streams draw them;
    ``epoch`` counts over all stages, ``first`` is the epoch's first step counted in its stage."""
    if trusted is not None and stage.trains_on == "trusted":
        for _ in range(method.ctx.steps_per_epoch):
            yield trusted(size), None
        return
    for index, batch in enumerate(batches(stage, epoch)):
        takes = trusted is not None and size and method.takes_trusted_at(stage, first + index)
        yield batch, (trusted(size) if takes else None)
