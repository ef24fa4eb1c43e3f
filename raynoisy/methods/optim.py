"""Optimizer and learning-rate schedule of the main model, built from ``OptimConfig``.

The schedule is a per-iteration ``LambdaLR`` so that the current lr is always
``optimizer.param_groups[0]["lr"]``: the meta engine's look-ahead reads it from there, which avoids the
reference MLC code's ``get_lr()`` pitfall (a 10x smaller look-ahead lr in milestone epochs).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from raynoisy.config import OptimConfig


def build_sgd(params: Iterable[torch.nn.Parameter], o: OptimConfig) -> torch.optim.SGD:
    return torch.optim.SGD(
        params,
        lr=o.lr,
        momentum=o.momentum,
        weight_decay=o.weight_decay,
        nesterov=o.nesterov and o.momentum > 0,
    )


def lr_factor(o: OptimConfig, iteration: int, steps_per_epoch: int, epochs: int) -> float:
    """Multiplier of the base lr at ``iteration`` (0-based) of a schedule spanning ``epochs``."""
    if o.schedule == "constant":
        return 1.0
    if o.schedule == "cosine":
        total = max(1, steps_per_epoch * epochs)
        return 0.5 * (1.0 + math.cos(math.pi * min(iteration, total) / total))
    epoch = iteration // max(1, steps_per_epoch)
    return o.gamma ** sum(epoch >= m for m in o.milestones)


def build_scheduler(
    optimizer: torch.optim.Optimizer, o: OptimConfig, steps_per_epoch: int, epochs: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-iteration schedule: call ``step()`` after every optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(o, it, steps_per_epoch, epochs))
