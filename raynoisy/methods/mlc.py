"""MLC, Meta Label Correction (Zheng, Awadallah, Dumais, AAAI 2021; microsoft/MLC ``hmlc_K_mix``).

A label-correction network g(h(x).detach(), ỹ) turns each noisy sample's feature and given label into a
soft label; the main model trains on those soft labels, and g is trained so that the main model's
look-ahead step does well on trusted data. Per step, with a trusted batch as large as the noisy one:

1. the trusted batch is split in halves: the first is the gold batch of the meta loss, the second joins
   the training loss, L_s = (B_s·softCE(f(x_s), g(h_s, ỹ_s)) + B_c·CE(f(x_c), y_c)) / (B_s + B_c), B_c counted
   at the default trusted batch size (so that a smaller ``trusted_batch_size`` estimates the same loss);
2. MLC's one-step hypergradient -c·∂/∂α⟨g_s, gw'⟩ with g_s = ∇_w L_s, gw' = ∇CE_gold(w') after a virtual
   step with the real SGD rule at the current lr, synchronised over ranks. The reference differentiates
   the dot product through a double backward; ``output_hypergrad`` evaluates the same number in logit
   space with one forward-mode pass (g reaches g_s only through the noisy logits' loss), about half the
   cost, and the training backward needs no graph;
3. K-step accumulation with MLC's identity-Hessian discount (``MLCHypergradAccumulator``); the meta
   optimizer, Adam(amsgrad, eps 1e-8, no weight decay), steps every K-th step;
4. the real step uses g_s itself (already averaged over ranks) as the main model's gradient — except in
   the first ``warmup_epochs`` epochs (default 0, the paper) and while the collapse guard falls back
   (``raynoisy.methods.collapse_guard``): then it is the gradient of L_s with the given labels in place of
   the corrected ones (the clean half kept), through the same forward, and the corrector keeps its meta
   updates, so it has learned on the main model's features by the time it steers. With ``warmup_epochs``
   at least ``optim.epochs`` the run is the ablation "MLC's loss without its corrections".

With ``meta_every`` = k > 1 only steps 0, k, 2k, ... are such meta steps (and only they count towards the K
of the accumulation); the steps between are plain steps on L_s with the current g: step 4 without the meta
update, the clean half of their own trusted batch in the loss (its gold half is not used). With
``plain_trusted_term: false`` they train on softCE(f(x), g(h, ỹ)) of the noisy batch alone and read no
trusted batch, which at k = 5 cost 6.9 points on Fashion-MNIST against the default (benchmarks/README.md,
issue 13).

``corrector_supervision`` = β > 0 (a deviation from the paper, measured beside it in benchmarks/README.md)
also teaches the corrector directly on the trusted batch's clean half, whose true labels are known: each
clean sample of class y gets a simulated noisy label ỹ drawn from T[y], T the transition from the main
model's predictions to the given labels on the noisy batches of about the last epoch (counted at every
meta step, decayed by 1 - 1 / the meta steps per epoch; a row not yet seen keeps the label), and every step
of the corrector's optimizer adds β·∇ of -log g(h(x), ỹ)[y] on that step's clean half to the meta-gradient:
the corrector learns p(y | h, ỹ) under the noise the given labels carry. Why: the one-step hypergradient is
linear in the corrected label, so alone it drives the corrector to whatever label lowers the trusted loss
fastest in one step; on the annotator matrix that folds ten classes into five while the main model's own
predictions are far more accurate (benchmarks/README.md, issue 12). T is counted against the given labels,
not drawn from the model's softmax, because the model trains on the corrected labels: its softmax would
describe the corrections, and the corrector would learn to trust every label.
The draws come from a generator seeded with ``run.seed``; every rank draws for the global clean half and
keeps its own rows, and the counts are summed over ranks, so 2 ranks equal 1 process; both are
checkpointed. Costs one no-grad forward of the clean half and the corrector's forward and backward on it.
T is only as informative as the main model's predictions: on SST-2 with a 2-layer MiniLM, whose model
learns slowly, the supervised corrector's first epoch left the model at chance on every seed
(benchmarks/README.md); the collapse guard reads the main model too and undoes such an epoch, after which
all three seeds train (2.8 points below CE on average: the epochs the corrector steers lower the model).

Deviations from the reference code, each deliberate:
- BatchNorm: the noisy and the clean forwards at the real weights update the running statistics, as the
  reference's do; the gold forwards (at w for the discount, at w') use copies of the buffers, where the
  reference updates them there too, so its running statistics partly describe look-ahead weights.
- The trusted and noisy sets are disjoint by construction (the reference's loader leaks the meta set into
  the training set), and the look-ahead lr is the current scheduled lr (not ``get_lr()``).

Export ``corrected_labels.parquet``: argmax and max of g(h(x), ỹ) of the final models (eval mode), and the
soft label when there are at most 20 classes; a run whose collapse guard ends it falling back exports its
best model's corrections instead (``meta_common.corrected_labels_from_predictions``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from raynoisy.meta import (
    BNPolicy,
    MLCHypergradAccumulator,
    OutputHypergradient,
    OutputLoss,
    all_reduce_mean_,
    all_reduce_sum_,
    functional_forward,
    gold_gradient,
    logit_gradient,
    output_grads,
    output_hypergrad,
)
from raynoisy.meta.hypergrad import Loss
from raynoisy.methods import register_method
from raynoisy.methods.base import Batch, MethodContext
from raynoisy.methods.collapse_guard import GuardReading, label_reading
from raynoisy.methods.meta_common import (
    CorrectedLabelExport,
    TrustedMetaMethod,
    TrustedMetaParams,
    TrustedTerm,
    check_param,
    corrected_label_columns,
    evaluating,
    given_label_loss,
    step_through_outputs,
)
from raynoisy.models.meta_nets import LabelCorrectionNet


@dataclass
class MLCParams(TrustedMetaParams):
    """Reference CIFAR defaults; Clothing1M uses meta_lr 3e-3, skip, gradient_steps 5 (see its preset)."""

    meta_lr: float = 3e-4
    cls_dim: int = 128
    hidden: int = 128
    skip: bool = False
    gradient_steps: int = 1
    warmup_epochs: int = 0
    corrector_supervision: float = 0.0  # weight of the corrector's simulated-noise loss (a deviation)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_param(self.meta_lr > 0, "meta_lr", f"must be > 0, got {self.meta_lr}", "e.g. 3e-4")
        check_param(self.cls_dim >= 1, "cls_dim", f"must be >= 1, got {self.cls_dim}", "e.g. 128")
        check_param(self.hidden >= 1, "hidden", f"must be >= 1, got {self.hidden}", "e.g. 128")
        check_param(
            self.gradient_steps >= 1,
            "gradient_steps",
            f"must be >= 1, got {self.gradient_steps}",
            "1 is plain MLC",
        )
        check_param(self.warmup_epochs >= 0, "warmup_epochs", "must be >= 0", "0 steers from the start")
        check_param(
            self.corrector_supervision >= 0,
            "corrector_supervision",
            f"must be >= 0, got {self.corrector_supervision}",
            "0 is the paper; e.g. 1.0",
        )


@register_method
class MetaLabelCorrection(CorrectedLabelExport, TrustedMetaMethod):
    name = "mlc"
    Params = MLCParams
    min_trusted_per_worker = 2  # a gold half and a clean half
    trains_on_trusted = True  # the clean half

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        p = self.params
        self.corrector = LabelCorrectionNet(
            ctx.num_classes, self.main.net.feature_dim, cls_dim=p.cls_dim, hidden=p.hidden, skip=p.skip
        ).to(ctx.device)
        self.meta_optimizer = torch.optim.Adam(
            self.corrector.parameters(), lr=p.meta_lr, eps=1e-8, weight_decay=0.0, amsgrad=True
        )
        self.accumulator = MLCHypergradAccumulator(p.gradient_steps)
        self.warmup_epochs = p.warmup_epochs
        # corrector_supervision: the draws, and the decayed counts of (model's prediction, given label)
        self.generator = torch.Generator().manual_seed(ctx.cfg.run.seed)
        self.transitions = torch.zeros(ctx.num_classes, ctx.num_classes, device=ctx.device)

    def _corrected_loss(self, labels: Tensor, share: float) -> OutputLoss:
        """ℓ(logits, features) = share · softCE(logits, g(h, ỹ)), h the features (detached by the engine)."""

        def loss(logits: Tensor, features: Tensor) -> Tensor:
            soft = self.corrector(features, labels)
            return -(soft * F.log_softmax(logits, dim=1)).sum(dim=1).mean() * share

        return loss

    def _clean_loss(self, trusted: Batch) -> Loss:
        """CE of the trusted batch's clean half (its second half) at the given parameters; the forward moves
        BatchNorm's running statistics, as the noisy forward does."""
        net, half = self.main.net, len(trusted) // 2

        def loss(params: dict[str, Tensor]) -> Tensor:
            logits = functional_forward(net, params, trusted.x[half:], bn=BNPolicy.UPDATE)[0]
            return F.cross_entropy(logits, trusted.y[half:])

        return loss

    def _share(self, batch: Batch, trusted: Batch) -> float:
        """B_s / (B_s + B_c): the noisy batch's weight in L_s, the clean half's being 1 - it; B_c counted at
        the default trusted batch size (``trusted_rows_at_full_size``)."""
        clean_rows = self.trusted_rows_at_full_size(len(trusted) - len(trusted) // 2)
        return len(batch) / (len(batch) + clean_rows)

    def meta_update_step(self, batch: Batch, trusted: Batch) -> dict[str, float]:
        net = self.main.net
        half = len(trusted) // 2
        gold_x, gold_y = trusted.x[:half], trusted.y[:half]
        clean_x, clean_y = trusted.x[half:], trusted.y[half:]
        # L_s = (B_s·softCE + B_c·CE) / (B_s + B_c): the corrected part is ℓ, the clean half the α-free r.
        share = self._share(batch, trusted)
        clean = self._clean_loss(trusted)

        def clean_loss(params: dict[str, Tensor]) -> Tensor:
            return clean(params) * (1 - share)

        def gold_loss(params: dict[str, Tensor]) -> Tensor:
            return F.cross_entropy(functional_forward(net, params, gold_x)[0], gold_y)

        meta_params = list(self.corrector.parameters())
        hyper = output_hypergrad(
            net,
            self.main.optimizer,
            batch.x,
            self._corrected_loss(batch.y, share),
            gold_loss,
            meta_params,
            rest_loss=clean_loss,
            keep_graph=self.on_given_labels,  # for _given_label_step
            with_discount=self.accumulator.needs_discount,
        )
        grads = [hyper.train_grads.get(name) for name, _ in net.named_parameters()]
        loss = hyper.train_loss
        if self.on_given_labels:  # warm-up or the guard's fallback; before g moves, as g_s was taken with it
            loss, grads = self._given_label_step(batch, share, hyper, grads)
        if self.params.corrector_supervision > 0:
            self._count_transitions(hyper.logits.detach().argmax(dim=1), batch.y)
        meta = self.accumulator.accumulate(hyper.meta_grads, hyper.discount)
        if meta.step_now:
            meta_grads = meta.grads
            if self.params.corrector_supervision > 0:
                supervised = self._supervision_grads(clean_x, clean_y, meta_params)
                beta = self.params.corrector_supervision
                meta_grads = [g + beta * s for g, s in zip(meta_grads, supervised, strict=True)]
            self.meta_step(self.meta_optimizer, meta_params, meta_grads)
        self.main.apply_grads(grads)
        return {"loss": float(loss), "meta_loss": float(hyper.gold_loss_after)}

    def _count_transitions(self, predicted: Tensor, given: Tensor) -> None:
        """Decay the (prediction, given label) counts and add this meta step's global batch: a window of about
        one epoch (the decay is 1 - 1 / the meta steps per epoch)."""
        classes = self.ctx.num_classes
        batch = torch.bincount(predicted * classes + given, minlength=classes * classes).float()
        all_reduce_sum_([batch])
        decay = max(1 - self.params.meta_every / max(self.ctx.steps_per_epoch, 1), 0.0)
        self.transitions.mul_(decay).add_(batch.view(classes, classes))

    def _supervision_grads(self, x: Tensor, y: Tensor, meta_params: list[Tensor]) -> list[Tensor]:
        """∇ of -log g(h(x), ỹ)[y] over the clean half, ỹ drawn from the transition row T[y]; rank means."""
        net = self.main.net
        with torch.no_grad():
            features = functional_forward(net, dict(net.named_parameters()), x)[1]
            rows = self.transitions[y]
            unseen = rows.sum(dim=1) == 0
            rows[unseen] = F.one_hot(y[unseen], self.ctx.num_classes).to(rows.dtype)
        soft = self.corrector(features, self._draw(rows))
        loss = -torch.log(soft.gather(1, y[:, None]).clamp_min(1e-12)).mean()
        grads = list(torch.autograd.grad(loss, meta_params, allow_unused=True, materialize_grads=True))
        all_reduce_mean_(grads)
        return grads

    def _draw(self, probs: Tensor) -> Tensor:
        """One label per row of ``probs`` (non-negative, any scale) by inverse-CDF sampling on uniforms
        drawn for the global clean half (every rank draws them all, in rank order, and keeps its own rows)."""
        rank, world = self.ctx.rank, self.ctx.world_size
        uniforms = torch.rand(world * len(probs), generator=self.generator)[rank * len(probs) :][: len(probs)]
        cdf = probs.cumsum(dim=1)
        picks = (cdf < uniforms.to(probs.device)[:, None] * cdf[:, -1:]).sum(dim=1)
        return picks.clamp(max=probs.shape[1] - 1)

    def _given_label_step(
        self, batch: Batch, share: float, hyper: OutputHypergradient, grads: list[Tensor | None]
    ) -> tuple[Tensor, list[Tensor | None]]:
        """L_s with the given labels in place of the corrected ones, the clean half kept: g_s plus J_zᵀ of
        the difference of the two noisy parts' logit gradients, back through the kept forward graph."""
        corrected, d_corrected = logit_gradient(
            self._corrected_loss(batch.y, share), hyper.logits, hyper.features, create_graph=False
        )

        def given(logits: Tensor, _features: Tensor) -> Tensor:
            return F.cross_entropy(logits, batch.y) * share

        value, d_given = logit_gradient(given, hyper.logits, hyper.features, create_graph=False)
        delta = output_grads(self.main.net, hyper.logits, d_given - d_corrected)
        summed = [g if d is None else (d if g is None else g + d) for g, d in zip(grads, delta, strict=True)]
        return hyper.train_loss - corrected + value, summed

    def plain_step(self, batch: Batch, trusted: Batch | None) -> dict[str, float]:
        target = given_label_loss(batch.y) if self.on_given_labels else self._corrected_loss(batch.y, 1.0)
        clean_half = None
        if trusted is not None:

            def clean_half() -> TrustedTerm:
                loss, grads = gold_gradient(self.main.net, self._clean_loss(trusted))
                return TrustedTerm(loss, grads, 1 - self._share(batch, trusted))

        loss, _ = step_through_outputs(self.main, batch.x, target, clean_half)
        return {"loss": float(loss)}

    def _soft_labels_and_logits(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """g(h(x), ỹ) and the main model's logits, with both networks in eval mode, no graph."""
        with evaluating(self.main.net, self.corrector):
            logits, features = self.main.net(batch.x)
            return self.corrector(features, batch.y), logits

    def guard_reading(self) -> GuardReading:
        batches = ((*self._soft_labels_and_logits(b), b.y) for b in self.trusted_pass())
        return label_reading(batches, self.ctx.num_classes, self.ctx.device)

    def per_sample_outputs(self, batch: Batch) -> dict[str, np.ndarray]:
        return corrected_label_columns(batch, self._soft_labels_and_logits(batch)[0])

    def state_dict(self) -> dict[str, Any]:
        return {
            "main": self.main.state_dict(),
            "corrector": self.corrector.state_dict(),
            "meta_optimizer": self.meta_optimizer.state_dict(),
            "accumulator": self.accumulator.state_dict(),
            "guard": self.guard.state_dict(),
            "generator": self.generator.get_state(),
            "transitions": self.transitions,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.main.load_state_dict(state["main"])
        self.corrector.load_state_dict(state["corrector"])
        self.meta_optimizer.load_state_dict(state["meta_optimizer"])
        self.accumulator.load_state_dict(state["accumulator"])
        self.guard.load_state_dict(state["guard"])
        self.generator.set_state(state["generator"])
        self.transitions.copy_(state["transitions"])
