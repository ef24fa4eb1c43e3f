"""Evaluation counts: top-1 and top-5 per evaluation set of the test split, against a numpy recount."""

import numpy as np
import torch
from torch import nn

from raynoisy.data.batch import Batch
from raynoisy.train.evaluate import count_hits


class FixedLogits(nn.Module):
    """Logits looked up by the input (a sample id), so the counts can be recomputed independently."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.logits[x], self.logits[x]


def test_top1_and_top5_per_set_match_a_numpy_recount():
    rng = np.random.default_rng(0)
    n, classes = 300, 12
    logits = torch.from_numpy(rng.normal(size=(n, classes)))
    labels = rng.integers(0, classes, n)
    ids = rng.permutation(1000)[:n]  # sample ids are not positions
    sets = {"webvision-val": np.sort(ids[:170]), "ilsvrc12-val": np.sort(ids[170:])}
    batches = [
        Batch(
            x=torch.arange(lo, min(lo + 64, n)),
            y=torch.from_numpy(labels[lo : lo + 64]),
            sample_id=torch.from_numpy(ids[lo : lo + 64]),
            true_y=torch.from_numpy(labels[lo : lo + 64]),
        )
        for lo in range(0, n, 64)
    ]
    counts = count_hits(FixedLogits(logits), batches, torch.device("cpu"), sets)

    order = np.argsort(-logits.numpy(), axis=1)
    top1 = order[:, 0] == labels
    top5 = (order[:, :5] == labels[:, None]).any(axis=1)
    assert counts[""] == (int(top1.sum()), int(top5.sum()), n)
    for name, members in sets.items():
        inside = np.isin(ids, members)
        assert counts[name] == (int(top1[inside].sum()), int(top5[inside].sum()), int(inside.sum()))
    assert counts["webvision-val"][1] > counts["webvision-val"][0]  # top-5 counts more than top-1 here


def test_top5_with_fewer_than_five_classes_counts_every_sample():
    logits = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]])
    batch = Batch(
        x=torch.arange(3), y=torch.tensor([0, 0, 1]), sample_id=torch.arange(3), true_y=torch.zeros(3)
    )
    assert count_hits(FixedLogits(logits), [batch], torch.device("cpu"), {}) == {"": (2, 3, 3)}
