"""The unit of data every layer above ``data`` consumes: one batch of samples on a worker's device."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F


@dataclass
class Batch:
    """A batch on the worker's device. ``true_y`` is -1 where unknown and is never used for training."""

    x: torch.Tensor
    y: torch.Tensor
    sample_id: torch.Tensor
    true_y: torch.Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def without_truth(self) -> Batch:
        """This batch with every true label unknown: what training steps and methods are handed, so a label
        kept only to measure label quality (an evaluation-only true-label column) cannot reach training."""
        return replace(self, true_y=torch.full_like(self.true_y, -1))


def cat_inputs(xs: Sequence[torch.Tensor], pad: int) -> torch.Tensor:
    """Inputs of several batches as one batch. Images concatenate as they are; token-id batches are each as
    wide as their own longest text, so the narrower ones are right-padded with ``pad`` (the encoder's pad
    id, which its attention mask ignores) first."""
    if not xs or xs[0].is_floating_point():
        return torch.cat(list(xs))
    width = max(x.shape[1] for x in xs)
    return torch.cat([F.pad(x, (0, width - x.shape[1]), value=pad) for x in xs])


def trim_padding(x: torch.Tensor, pad: int) -> torch.Tensor:
    """Token ids cut to their longest row: the trailing columns that are ``pad`` in every row go. The
    encoder masks ``pad`` ids, so this changes no output, only the width it computes over (dynamic
    padding for batches taken from a split that was tokenised as a whole)."""
    used = (x != pad).any(dim=0).nonzero()
    return x[:, : int(used.max()) + 1] if len(used) else x[:, :0]
