"""MLC, Meta Label Correction (Zheng, Awadallah, Dumais, AAAI 2021; microsoft/MLC ``hmlc_K_mix``).

A label-correction network g(h(x).detach(), ỹ) turns each noisy sample's feature and given label into a
soft label; the main model trains on those soft labels, and g is trained so that the main model's
look-ahead step does well on trusted data. Per step, with a trusted batch as large as the noisy one:

1. the trusted batch is split in halves: the first is the gold batch of the meta loss, the second joins
   the training loss, L_s = (B_s·softCE(f(x_s), g(h_s, ỹ_s)) + B_c·CE(f(x_c), y_c)) / (B_s + B_c);
2. ``mlc_hypergrad``: g_s = ∇_w L_s with graph, a virtual step with the real SGD rule at the current lr,
   gw' = ∇ CE_gold(w'), and the meta-gradient of the dot-product proxy -c·⟨g_s, gw'⟩ (no fast-weights
   forward with a graph; exact for one step), all synchronised over ranks;
3. K-step accumulation with MLC's identity-Hessian discount (``MLCHypergradAccumulator``); the meta
   optimizer, Adam(amsgrad, eps 1e-8, no weight decay), steps every K-th step;
4. the real step uses g_s itself (already averaged over ranks) as the main model's gradient.

Deviations from the reference code, each deliberate:
- The noisy batch and the clean half go through ONE forward (the reference runs two), which saves a
  forward per step; with BatchNorm the batch statistics are those of the union, not of each part.
- BatchNorm: the training-loss forward at the real weights updates the running statistics, once per step,
  as a real forward would; the gold forwards (at w for the discount, at w') use copies of the buffers. The
  reference updates them in all three forwards, so its running statistics partly describe look-ahead
  weights and gold batches. Without the update, nothing would ever move them: MLC has no other forward.
- The trusted and noisy sets are disjoint by construction (the reference's loader leaks the meta set into
  the training set), and the look-ahead lr is the current scheduled lr (not ``get_lr()``).

Export ``corrected_labels.parquet``: argmax and max of g(h(x), ỹ) of the final models (eval mode), and the
soft label when there are at most 20 classes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from raynoisy.errors import ConfigError
from raynoisy.meta import BNPolicy, MLCHypergradAccumulator, functional_forward, mlc_hypergrad
from raynoisy.methods import register_method
from raynoisy.methods.base import Batch, MethodContext
from raynoisy.methods.meta_common import (
    CorrectedLabelExport,
    TrustedMetaMethod,
    check_param,
    corrected_label_columns,
    evaluating,
)
from raynoisy.models.meta_nets import LabelCorrectionNet


@dataclass
class MLCParams:
    """Reference CIFAR defaults; Clothing1M uses meta_lr 3e-3, skip, gradient_steps 5 (see its preset)."""

    meta_lr: float = 3e-4
    cls_dim: int = 128
    hidden: int = 128
    skip: bool = False
    gradient_steps: int = 1

    def __post_init__(self) -> None:
        check_param(self.meta_lr > 0, "meta_lr", f"must be > 0, got {self.meta_lr}", "e.g. 3e-4")
        check_param(self.cls_dim >= 1, "cls_dim", f"must be >= 1, got {self.cls_dim}", "e.g. 128")
        check_param(self.hidden >= 1, "hidden", f"must be >= 1, got {self.hidden}", "e.g. 128")
        check_param(
            self.gradient_steps >= 1,
            "gradient_steps",
            f"must be >= 1, got {self.gradient_steps}",
            "1 is plain MLC",
        )


@register_method
class MetaLabelCorrection(CorrectedLabelExport, TrustedMetaMethod):
    name = "mlc"
    Params = MLCParams

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        if ctx.local_batch_size < 2:
            raise ConfigError(
                "optim.batch_size",
                f"mlc splits each worker's trusted batch ({ctx.local_batch_size}) into gold and clean halves",
                "use at least 2 samples per worker",
            )
        p = self.params
        self.corrector = LabelCorrectionNet(
            ctx.num_classes, self.main.net.feature_dim, cls_dim=p.cls_dim, hidden=p.hidden, skip=p.skip
        ).to(ctx.device)
        self.meta_optimizer = torch.optim.Adam(
            self.corrector.parameters(), lr=p.meta_lr, eps=1e-8, weight_decay=0.0, amsgrad=True
        )
        self.accumulator = MLCHypergradAccumulator(p.gradient_steps)

    def train_step(self, batch: Batch, trusted: Batch | None) -> dict[str, float]:
        assert trusted is not None, "mlc needs a trusted batch every step"
        net = self.main.net
        half = len(trusted) // 2
        gold_x, gold_y = trusted.x[:half], trusted.y[:half]
        x = torch.cat([batch.x, trusted.x[half:]])
        clean_targets = F.one_hot(trusted.y[half:], self.ctx.num_classes)

        def train_loss(params: dict[str, Tensor]) -> Tensor:
            # Every sample's soft-CE against its target, averaged: the B-weighted mix of the reference.
            logits, features = functional_forward(net, params, x, bn=BNPolicy.UPDATE)
            soft = self.corrector(features[: len(batch)].detach(), batch.y)
            targets = torch.cat([soft, clean_targets.to(soft.dtype)])
            return -(targets * F.log_softmax(logits, dim=1)).sum(dim=1).mean()

        def gold_loss(params: dict[str, Tensor]) -> Tensor:
            return F.cross_entropy(functional_forward(net, params, gold_x)[0], gold_y)

        meta_params = list(self.corrector.parameters())
        hyper = mlc_hypergrad(
            net,
            self.main.optimizer,
            train_loss,
            gold_loss,
            meta_params,
            with_discount=self.accumulator.needs_discount,
        )
        meta = self.accumulator.accumulate(hyper.meta_grads, hyper.discount)
        if meta.step_now:
            self.meta_step(self.meta_optimizer, meta_params, meta.grads)
        self.main.apply_grads([hyper.train_grads.get(name) for name, _ in net.named_parameters()])
        return {"loss": float(hyper.train_loss), "meta_loss": float(hyper.gold_loss_after)}

    def per_sample_outputs(self, batch: Batch) -> dict[str, np.ndarray]:
        with evaluating(self.main.net, self.corrector):
            _, features = self.main.net(batch.x)
            soft = self.corrector(features, batch.y)
        return corrected_label_columns(batch, soft)

    def state_dict(self) -> dict[str, Any]:
        return {
            "main": self.main.state_dict(),
            "corrector": self.corrector.state_dict(),
            "meta_optimizer": self.meta_optimizer.state_dict(),
            "accumulator": self.accumulator.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.main.load_state_dict(state["main"])
        self.corrector.load_state_dict(state["corrector"])
        self.meta_optimizer.load_state_dict(state["meta_optimizer"])
        self.accumulator.load_state_dict(state["accumulator"])
