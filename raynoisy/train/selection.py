"""Evaluation and best-validation model selection.

The reported model is the one with the best validation accuracy among the selectable stages' evaluations
(the last one without a validation set); each stage also keeps its own best, which the next stage may start
from (``Stage.init_from_best``, MLNT's rounds).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from raynoisy.meta.sync import all_reduce_mean_
from raynoisy.methods.base import Method, Stage
from raynoisy.train.evaluate import accuracy, count_hits
from raynoisy.train.run_files import LoopState
from raynoisy.train.streams import Streams

ModelState = dict[str, torch.Tensor]


def evaluate(method: Method, streams: Streams, device: torch.device) -> dict[str, float]:
    """Validation and test accuracy of ``method.eval_model()``, exact over all ranks: ``val_accuracy``,
    ``test_accuracy`` and ``test_top5_accuracy`` over the whole test split, and per evaluation set of the
    test split (``RunInfo.test_sets``) ``test_accuracy/<set>`` and ``test_top5_accuracy/<set>``."""
    net = method.eval_model()
    # BatchNorm running statistics drift apart on each rank's own batches (DDP only broadcasts them at the
    # next forward): average them so evaluation and the checkpoint see the global statistics.
    all_reduce_mean_([b for b in net.buffers() if b.is_floating_point()])
    val_top1, _, val_total = count_hits(net, streams.split_pass("val"), device, {})[""]
    out = {"val_accuracy": accuracy(val_top1, val_total)}
    for name, (top1, top5, total) in count_hits(
        net, streams.split_pass("test"), device, streams.info.test_sets
    ).items():
        suffix = f"/{name}" if name else ""
        out[f"test_accuracy{suffix}"] = accuracy(top1, total)
        out[f"test_top5_accuracy{suffix}"] = accuracy(top5, total)
    return out


def _better(val: float, best: float) -> bool:
    return not np.isfinite(val) or not np.isfinite(best) or val > best


def _snapshot(net: nn.Module) -> ModelState:
    return {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}


class Selection:
    """The overall and the current stage's best model (state dicts on the CPU, kept on every rank)."""

    def __init__(self, best: ModelState | None = None, stage_best: ModelState | None = None) -> None:
        self.best, self.stage_best = best, stage_best

    def consider(self, state: LoopState, stage: Stage, metrics: dict[str, float], net: nn.Module) -> None:
        val = metrics["val_accuracy"]
        if self.stage_best is None or _better(val, state.stage_best_val_accuracy):
            state.stage_best_val_accuracy = val
            self.stage_best = _snapshot(net)
        if stage.selectable and (state.best_epoch < 0 or _better(val, state.best_val_accuracy)):
            state.best_epoch = int(metrics["epoch"])
            state.best_val_accuracy = val
            state.best_test_accuracy = metrics["test_accuracy"]
            state.best_test_metrics = {k: v for k, v in metrics.items() if k.startswith("test_")}
            self.best = _snapshot(net)

    def next_stage(self, state: LoopState) -> ModelState | None:
        """The finished stage's best model, handed to the next stage; the new stage starts its own."""
        finished, self.stage_best = self.stage_best, None
        state.stage_best_val_accuracy = float("nan")
        return finished
