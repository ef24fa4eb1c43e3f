"""The unit of data every layer above ``data`` consumes: one batch of samples on a worker's device."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Batch:
    """A batch on the worker's device. ``true_y`` is -1 where unknown and is never used for training."""

    x: torch.Tensor
    y: torch.Tensor
    sample_id: torch.Tensor
    true_y: torch.Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])
