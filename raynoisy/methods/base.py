"""The one method interface the trainer drives.

A method owns its networks, optimizers, schedulers and per-sample state. The worker loop calls, per
epoch, ``on_epoch_start``, ``train_step`` for every batch, ``on_epoch_end``, then evaluates
``eval_model()``; it checkpoints ``state_dict()``. It knows nothing about any one method.

Distributed contract: every rank builds the method from the same seed, sees its own part of each global
batch, and must leave every parameter and optimizer state bit-identical across ranks after each step.
A plain step (CE, GLC, MetaLabelNet's warm-up) goes through DDP (bucketed all-reduce). The meta methods
take every gradient with ``torch.autograd.grad``, which DDP does not see, and synchronise it explicitly
with ``raynoisy.meta.sync`` (one flattened all-reduce) before assigning it.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, get_type_hints

import numpy as np
import torch
from torch import nn

from raynoisy.config import Config, coerce_field
from raynoisy.errors import ConfigError


@dataclass
class Batch:
    """A batch on the worker's device. ``true_y`` is -1 where unknown and is never used for training."""

    x: torch.Tensor
    y: torch.Tensor
    sample_id: torch.Tensor
    true_y: torch.Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])


@dataclass
class MethodContext:
    """What a method may know about the run: config, data shape, place in the worker group, data access."""

    cfg: Config
    num_classes: int
    in_channels: int
    image_size: int
    device: torch.device
    rank: int
    world_size: int
    steps_per_epoch: int
    num_train: int
    num_trusted: int
    iter_trusted_pass: Callable[[], Iterator[Batch]] | None = (
        None  # one pass, eval transform, this rank's part
    )

    @property
    def local_batch_size(self) -> int:
        return self.cfg.optim.batch_size // self.world_size

    def build_backbone(self) -> nn.Module:
        from raynoisy.models import build_model

        model = build_model(
            self.cfg.model.name,
            num_classes=self.num_classes,
            in_channels=self.in_channels,
            image_size=self.image_size,
            pretrained=self.cfg.model.pretrained,
        )
        return model.to(self.device)

    def wrap_ddp(self, model: nn.Module) -> nn.Module:
        """DDP-wrap for the real step when there is more than one rank; the bare module otherwise."""
        if self.world_size == 1:
            return model
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


@dataclass
class NoParams:
    """Methods without hyperparameters of their own."""


EpochSource = Literal["train", "trusted"]


class Method(ABC):
    """Base class of every method. Subclasses set ``name`` and implement the abstract hooks."""

    name: ClassVar[str]
    needs_trusted: ClassVar[bool] = False
    Params: ClassVar[type] = NoParams
    # Where an epoch's batches come from: the noisy training stream, or the cycled trusted stream
    # (for the same number of steps, so that a trusted-only baseline gets the same compute).
    epoch_source: ClassVar[EpochSource] = "train"
    # Name of the per-sample table this method exports (e.g. "corrected_labels"), or None.
    export_name: ClassVar[str | None] = None

    def __init__(self, ctx: MethodContext) -> None:
        self.ctx = ctx
        self.params = self.parse_params(ctx.cfg.method.params)

    @classmethod
    def parse_params(cls, raw: dict[str, Any]) -> Any:
        """Validate ``method.params`` against the method's ``Params`` dataclass."""
        hints = get_type_hints(cls.Params)
        known = {f.name for f in dataclasses.fields(cls.Params)}
        values = {}
        for key, value in raw.items():
            if key not in known:
                fix = f"use one of {sorted(known)}" if known else f"{cls.name} takes no method.params"
                raise ConfigError(f"method.params.{key}", f"unknown parameter of {cls.name}", fix)
            values[key] = coerce_field(value, hints[key], f"method.params.{key}")
        return cls.Params(**values)

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        """Checks that relate ``method.params`` to the rest of the config; run before Ray starts."""
        return None

    def total_epochs(self) -> int:
        return self.ctx.cfg.optim.epochs

    def trusted_batch_size(self) -> int:
        """Per-rank size of the trusted batch passed to ``train_step`` (0 = no trusted stream)."""
        return self.ctx.local_batch_size if self.needs_trusted else 0

    def selectable(self, epoch: int) -> bool:
        """Whether the model after ``epoch`` may be picked as the best-validation model."""
        return True

    def on_epoch_start(self, epoch: int) -> None:  # noqa: B027 - optional hook
        """Called on every rank before the epoch's first step."""

    @abstractmethod
    def train_step(self, batch: Batch, trusted: Batch | None) -> dict[str, float]:
        """One optimisation step on this rank's part of the global batch; returns scalars to log."""

    def on_epoch_end(self, epoch: int) -> dict[str, float]:
        """Called on every rank after the epoch's last step; returns scalars to log."""
        return {}

    @abstractmethod
    def eval_model(self) -> nn.Module:
        """The unwrapped model that validation and test accuracy are measured on."""

    @abstractmethod
    def current_lr(self) -> float: ...

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: networks, optimizers, schedulers, per-sample state."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def per_sample_outputs(self, batch: Batch) -> dict[str, np.ndarray]:
        """Columns of the exported per-sample table for a batch of training samples (eval transform)."""
        raise NotImplementedError(f"{self.name} exports no per-sample table")

    @classmethod
    def summarize_export(cls, table: Any, labels: Any) -> dict[str, Any]:
        """Metrics derived from the exported table and labels.parquet, for metrics.json."""
        return {}
