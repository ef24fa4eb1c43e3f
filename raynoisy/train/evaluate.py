"""Accuracy over a split, exact across ranks: each rank counts its files, one all-reduce sums the counts."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from raynoisy.data.batch import Batch
from raynoisy.meta.sync import all_reduce_sum_


@torch.no_grad()
def count_correct(net: nn.Module, batches: Iterable[Batch], device: torch.device) -> tuple[int, int]:
    """(correct, total) summed over all ranks; the model is in eval mode only for the duration."""
    was_training = net.training
    net.eval()
    counts = torch.zeros(2, dtype=torch.float64, device=device)
    try:
        for batch in batches:
            logits, _ = net(batch.x)
            counts[0] += (logits.argmax(1) == batch.y).sum()
            counts[1] += len(batch)
    finally:
        net.train(was_training)
    all_reduce_sum_([counts])
    return int(counts[0]), int(counts[1])


def accuracy(correct: int, total: int) -> float:
    return correct / total if total else float("nan")
