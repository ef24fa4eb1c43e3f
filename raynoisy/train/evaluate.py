"""Accuracy over a split, exact across ranks: each rank counts its files, one all-reduce sums the counts.

A test split may hold several evaluation sets (WebVision's own validation images and ILSVRC12's, tagged by
the source's ``Catalog.group``): ``count_hits`` counts top-1 and top-5 hits per set in the same pass, so
each set is reported on its own beside the pooled number.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import torch
from torch import nn

from raynoisy.data.batch import Batch
from raynoisy.meta.sync import all_reduce_sum_

TOP_K = (1, 5)


@torch.no_grad()
def count_hits(
    net: nn.Module, batches: Iterable[Batch], device: torch.device, groups: Mapping[str, np.ndarray]
) -> dict[str, tuple[int, int, int]]:
    """(top-1 hits, top-5 hits, total) summed over all ranks, for every set in ``groups`` (name -> sorted
    sample ids) and for all samples together under ``""``. Top-5 counts a hit when the label is among the
    five largest logits (all of them with fewer than five classes)."""
    names = ["", *groups]
    members = [torch.as_tensor(np.asarray(groups[name], dtype=np.int64)) for name in names[1:]]
    counts = torch.zeros(len(names), len(TOP_K) + 1, dtype=torch.float64, device=device)
    was_training = net.training
    net.eval()
    try:
        for batch in batches:
            logits, _ = net(batch.x)
            top = logits.topk(min(max(TOP_K), logits.shape[1]), dim=1).indices
            hits = torch.stack(
                [(top[:, :k] == batch.y[:, None]).any(dim=1) for k in TOP_K]
                + [torch.ones_like(batch.y, dtype=torch.bool)],
                dim=1,
            ).double()
            counts[0] += hits.sum(dim=0)
            ids = batch.sample_id.cpu()
            for row, ids_of_set in enumerate(members, start=1):
                inside = torch.isin(ids, ids_of_set).to(device)
                counts[row] += hits[inside].sum(dim=0)
    finally:
        net.train(was_training)
    all_reduce_sum_([counts])
    return {name: tuple(int(c) for c in counts[row].tolist()) for row, name in enumerate(names)}


def accuracy(correct: int, total: int) -> float:
    return correct / total if total else float("nan")
