"""The one method interface the trainer drives.

A method owns its networks, optimizers, schedulers and per-sample state. A run is a sequence of
**stages** (``Method.stages``: GLC's noisy and corrected phases, MetaLabelNet's warm-up and meta stage,
MLNT's rounds), each a few epochs. The loop calls, per stage, ``on_stage_start``; per epoch
``on_epoch_start``, ``train_step`` for every batch, ``on_epoch_end``; then it evaluates ``eval_model()``
and hands the validation metrics to ``on_evaluated``. It checkpoints ``state_dict()`` and the per-sample
store, and knows nothing about any one method.

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
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, get_type_hints

import numpy as np
import torch
from torch import nn

from raynoisy.config import Config, coerce_field
from raynoisy.data.batch import Batch
from raynoisy.data.sample_store import SampleStore
from raynoisy.errors import ConfigError

# Where a stage's batches come from: the noisy training stream, or the cycled trusted stream (for the same
# number of steps, so that a trusted-only baseline gets the same compute).
StreamName = Literal["train", "trusted"]


@dataclass(frozen=True)
class Stage:
    """A part of a run with its own epochs.

    ``selectable``: whether its models may be picked as the best-validation model (a warm-up's may not).
    ``init_from_best``: start from the previous stage's best-validation model (full state dict of
    ``eval_model()``, classifier included) rather than from where the previous stage ended.
    The learning-rate schedule is the method's: ``on_stage_start`` restarts it when the method means to.
    """

    name: str
    epochs: int
    trains_on: StreamName = "train"
    selectable: bool = True
    init_from_best: bool = False


@dataclass(frozen=True)
class ServiceSpec:
    """A Ray actor the driver starts for the run before the trainer, and kills when the run ends.

    ``actor_class`` is a plain class (the driver makes it remote). It is named ``name`` in a namespace of its
    own per run, restarted by Ray if it dies (``__init__`` runs again: keep it rebuildable), and outlives a
    restart of the worker group. Workers reach it as ``ctx.services[name]``.
    """

    name: str
    actor_class: type
    kwargs: dict[str, Any] = field(default_factory=dict)
    num_cpus: float = 0.0
    num_gpus: float = 0.0
    max_concurrency: int = 1


def call_service(handle: Any, method: str, *args: Any, **kwargs: Any) -> Any:
    """Call ``method`` of a service in ``ctx.services``: a Ray actor handle in the loop (``.remote`` and
    ``ray.get``), or the plain instance the in-process harness holds."""
    fn = getattr(handle, method)
    if hasattr(fn, "remote"):
        import ray

        return ray.get(fn.remote(*args, **kwargs))
    return fn(*args, **kwargs)


@dataclass
class MethodContext:
    """What a method may know about the run: config, data shape, place in the worker group, data access."""

    cfg: Config
    num_classes: int
    in_channels: int  # 0 for text
    image_size: int  # the image side, or the tokens per text sample
    device: torch.device
    rank: int
    world_size: int
    steps_per_epoch: int
    num_train: int
    num_trusted: int
    # One un-augmented pass over this rank's share of a split ("train", "trusted", "val", "test"): for
    # per-epoch statistics (losses, features, predictions) over every sample of the split.
    iter_split: Callable[[str], Iterator[Batch]] | None = None
    # Per-sample state over the training split, keyed by sample_id, identical on every rank, checkpointed.
    sample_store: SampleStore | None = None
    # Handles of the run's services (``Method.services``), by name.
    services: dict[str, Any] = field(default_factory=dict)

    @property
    def local_batch_size(self) -> int:
        return self.cfg.optim.batch_size // self.world_size

    @property
    def proportional_trusted_batch(self) -> int:
        """Trusted samples per rank and step in proportion to the two sets' sizes (at least one), so that an
        epoch of noisy batches also passes over the trusted set about once: GLC's gold + silver loader."""
        share = self.num_trusted / max(1, self.num_train + self.num_trusted)
        return max(1, round(self.local_batch_size * share))

    def build_backbone(self) -> nn.Module:
        from raynoisy.models import build_model

        model = build_model(
            self.cfg.model.name,
            num_classes=self.num_classes,
            in_channels=self.in_channels,
            image_size=self.image_size,
            pretrained=self.cfg.model.pretrained,
            layers=self.cfg.model.layers,
            freeze_embeddings=self.cfg.model.freeze_embeddings,
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


class Method(ABC):
    """Base class of every method. Subclasses set ``name`` and implement the abstract hooks."""

    name: ClassVar[str]
    needs_trusted: ClassVar[bool] = False
    Params: ClassVar[type] = NoParams
    # Name of the per-sample table this method exports (e.g. "corrected_labels"), or None.
    export_name: ClassVar[str | None] = None
    # The rule behind this method's own label-issue columns (``label_issue_columns``), for the report and
    # label_issues.parquet's metadata; None while the method takes the model-prediction path.
    label_issue_rule: ClassVar[str | None] = None

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

    @classmethod
    def stages(cls, cfg: Config) -> list[Stage]:
        """The run's stages, in order; one stage of ``optim.epochs`` by default."""
        return [Stage("train", cfg.optim.epochs)]

    @classmethod
    def services(cls, cfg: Config) -> list[ServiceSpec]:
        """Ray actors the run needs (e.g. a kNN index); the driver starts them before the trainer."""
        return []

    def trusted_batch_size(self, stage: Stage) -> int:
        """Per-rank size of the trusted batch passed to ``train_step`` in ``stage`` (0 = none)."""
        return self.ctx.local_batch_size if self.needs_trusted or stage.trains_on == "trusted" else 0

    def takes_trusted_at(self, stage: Stage, step: int) -> bool:
        """Whether step ``step`` of ``stage`` gets a trusted batch (else None); every step by default.

        ``step`` counts from the stage's first step over its epochs (epoch in stage x steps per epoch + step
        in epoch). Asked only where ``trusted_batch_size(stage)`` > 0 and the stage trains on ``train``. The
        answer must depend on the stage and the step only: every rank asks with the same step, so all take
        the same decision, and the loop's position is checkpointed, so a resumed run takes it again (its
        replayed steps consume the same trusted batches). A step without one reads nothing from the trusted
        stream, which is why a method says so here rather than ignoring a batch it was given.
        """
        return True

    def on_stage_start(
        self, stage: Stage, best_model_state: dict[str, torch.Tensor] | None
    ) -> dict[str, float]:
        """Called on every rank before a stage's first step (also when a run resumes there); returns scalars
        to log with the stage's first epoch.

        ``best_model_state`` is the previous stage's best-validation ``eval_model()`` state (None for the
        first stage); with ``stage.init_from_best`` the default loads it into ``eval_model()``.
        """
        if stage.init_from_best and best_model_state is not None:
            self.eval_model().load_state_dict(best_model_state)
        return {}

    def on_epoch_start(self, epoch: int) -> None:  # noqa: B027 - optional hook
        """Called on every rank before the epoch's first step."""

    @abstractmethod
    def train_step(self, batch: Batch, trusted: Batch | None) -> dict[str, float]:
        """One optimisation step on this rank's part of the global batch; returns scalars to log."""

    def train_step_at(self, stage: Stage, step: int, batch: Batch, trusted: Batch | None) -> dict[str, float]:
        """The step the loop takes: ``train_step``, told the step's place in the stage (``step`` counted as
        ``takes_trusted_at`` counts it), for a method whose kind of step depends on it and not only on
        whether a trusted batch came (``TrustedMetaMethod``: a plain step between meta updates that reads
        a trusted batch too)."""
        return self.train_step(batch, trusted)

    def on_epoch_end(self, epoch: int) -> dict[str, float]:
        """Called on every rank after the epoch's last step; returns scalars to log."""
        return {}

    def on_evaluated(self, epoch: int, metrics: dict[str, float]) -> None:  # noqa: B027 - optional hook
        """Called on every rank after each evaluation with its metrics (``val_accuracy``, ...).

        ``epoch`` is 0-based like ``on_epoch_end``'s: the epoch just finished, or the one in progress when
        ``metrics["step"]`` > 0 (a ``run.eval_every_steps`` evaluation inside it).
        """

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

    @property
    def export_rejected(self) -> bool:
        """True when this method's own export was judged unusable at the end of the run (a collapse guard
        that ended it falling back): the export then skips the method's own pass and is rebuilt from the
        model-prediction path by ``export_from_predictions``. Only methods that can rebuild say True."""
        return False

    @classmethod
    def export_from_predictions(cls, label_issues: Any, pred_probs: np.ndarray) -> Any:
        """The exported per-sample table rebuilt from the model-prediction path's ``label_issues`` table and
        the softmax rows behind it (by sample_id), for a run whose ``export_rejected``."""
        raise NotImplementedError(f"{cls.name} cannot rebuild its export from predictions")

    def label_issue_columns(self, batch: Batch) -> dict[str, np.ndarray] | None:
        """This method's columns of ``label_issues.parquet`` for a batch of training samples (eval transform).

        Every method has the table (``raynoisy.methods.label_issues``); a method only fills its columns.
        ``None`` (the default) takes the model-prediction path: the run's best-validation model's softmax
        over the training split, scored by cleanlab's confident learning. A method with a better view of
        which labels are wrong returns ``sample_id``, ``given_label``, ``predicted_label``, ``label_score``
        (in [0, 1], lower = more likely wrong), ``is_label_issue`` and optionally ``corrected_label``, and
        sets ``label_issue_rule`` to say how it flags. Called on every rank after the last epoch.
        """
        return None

    def final_metrics(self) -> dict[str, Any]:
        """JSON-able facts of the finished run for metrics.json (GLC: its estimated corruption matrix).

        Called on rank 0 after the last epoch; keys the driver writes itself take precedence.
        """
        return {}
