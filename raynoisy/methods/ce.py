"""Baselines: cross-entropy on the noisy labels (``ce``), on the trusted set only (``ce-clean``), and on both
(``ce-all``).

All take the model-prediction path to ``label_issues.parquet`` (cleanlab's confident learning on the
best-validation model's softmax over the training split; ``raynoisy.methods.label_issues``). For ``ce`` the
predictions are in-sample: the model trained on those labels, and the more it memorised, the fewer wrong
labels it flags. For ``ce-clean`` they are genuinely held out: it never saw the noisy training split, which
makes it cleanlab's reference detector whenever a trusted set exists.

``ce-all`` is the fair baseline for every method that learns from a trusted set (``glc``, ``mwnet``,
``mlc``, ``metalabelnet``): those methods see the trusted labels, ``ce`` does not, so a method's gain over
``ce`` mixes what its algorithm does with what a few hundred right labels are worth. MLC's own loss, for
one, trains the main model on the trusted batch's clean half.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from raynoisy.config import Config
from raynoisy.data.batch import cat_inputs
from raynoisy.methods import register_method
from raynoisy.methods.base import Batch, Method, MethodContext, Stage
from raynoisy.methods.supervised import MainModel


@register_method
class CrossEntropy(Method):
    """Plain cross-entropy on the given (noisy) labels: the baseline every method must beat."""

    name = "ce"

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        self.main = MainModel(ctx)

    def train_step(self, batch: Batch, trusted: Batch | None) -> dict[str, float]:
        return self.main.cross_entropy_step(batch.x, batch.y)

    def eval_model(self) -> nn.Module:
        return self.main.net

    def current_lr(self) -> float:
        return self.main.lr

    def state_dict(self) -> dict[str, Any]:
        return {"main": self.main.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.main.load_state_dict(state["main"])


@register_method
class CleanOnlyCrossEntropy(CrossEntropy):
    """Cross-entropy on the trusted set alone, for as many steps as a noisy-data epoch has.

    The step budget matches ``ce`` so that the comparison measures what the noisy data adds, not how
    long each model trained.
    """

    name = "ce-clean"
    needs_trusted = True

    @classmethod
    def stages(cls, cfg: Config) -> list[Stage]:
        return [Stage("train", cfg.optim.epochs, trains_on="trusted")]


@register_method
class NoisyAndTrustedCrossEntropy(CrossEntropy):
    """Cross-entropy on the noisy labels and the trusted set together: each step's noisy batch with a share of
    trusted samples in proportion to the two sets' sizes (``MethodContext.proportional_trusted_batch``), one
    mean over both, no correction of either."""

    name = "ce-all"
    needs_trusted = True

    def trusted_batch_size(self, stage: Stage) -> int:
        return self.ctx.proportional_trusted_batch

    def train_step(self, batch: Batch, trusted: Batch | None) -> dict[str, float]:
        assert trusted is not None, "ce-all trains on a trusted batch beside every noisy batch"
        x = cat_inputs([batch.x, trusted.x], pad=getattr(self.main.net, "pad_token_id", 0))
        return self.main.cross_entropy_step(x, torch.cat([batch.y, trusted.y]))
