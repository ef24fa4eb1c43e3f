"""MW-Net, Meta-Weight-Net (Shu et al., NeurIPS 2019; xjtushujun/meta-weight-net ``MW-Net.py``).

A weight net v(ℓ) maps each noisy sample's (detached) loss to a weight in (0, 1). Per step:

1. meta step: look one SGD step ahead on mean(v(ℓ)·ℓ) (sum / B, weights not normalised, as the stable
   reference), evaluate cross-entropy on the trusted batch at the fast weights, and update v by Adam
   (lr 1e-3, weight decay 1e-4) with the hypergradient;
2. real step: weigh the same forward's losses with the UPDATED v (no graph to v) and take the real SGD
   step on mean(v(ℓ)·ℓ), back-propagating through the meta step's forward instead of a second one; while
   the collapse guard falls back (``raynoisy.methods.collapse_guard``: the weights of right and wrong
   labels of trusted samples do not separate) and in the first ``warmup_epochs`` epochs (default 0, the
   paper), plain cross-entropy, every weight 1.

``weighting: example`` (a deviation from the paper, measured beside it in benchmarks/README.md) drops the
weight net's view, the loss alone, for each sample's own gradient: every step weighs sample i by the
positive part of ⟨∇ℓ_i, ∇L_gold⟩ (how much a step on it alone would lower the trusted loss, to first
order), the weights normalised to mean 1 over the global batch: the online example weights of Ren et al.
(2018, "Learning to Reweight Examples"), from one forward-mode pass (``raynoisy.meta.example_alignment``).
Why: on realistic class-conditional noise the mislabelled samples are confusions the main model itself
makes, their losses are as low as clean ones, and no function of the loss separates them; their gradients
still point away from the trusted set's. The step costs 2F + 2B + J (the gold forward and backward at w,
no look-ahead). A step whose every weight is 0 moves nothing. The weight net is not trained in this mode.
The collapse guard reads the main model only (``model_skill``): the weights are taken from the trusted
gradient itself, every step, and have no network that could degenerate. The exported weight is each
sample's clip(⟨∇ℓ_i, g⟩ / |g|², 0, 1), g the gradient of the whole trusted set after the last epoch (1:
helps the trusted loss as much as an average trusted sample; 0: hurts it), and ``weight < 0.5`` flags a
label issue as in net mode.

``train_on_trusted: true`` (a deviation from both papers, measured beside them): the real step is on the
weighted noisy loss and the trusted batch's cross-entropy at w together, their mean over the union of the
two batches (``meta_common.TrustedTerm``; a smaller ``trusted_batch_size`` keeps the default size's weight),
as MLC's loss has its clean half. Why: MW-Net only weighs with the
trusted labels, and where the weights cannot single out the mislabels (the annotator matrix) it ends below
plain cross-entropy on the noisy and the trusted labels (``ce-all``). With ``weighting: example`` it costs
nothing (the trusted gradient at w is already there); with the weight net, one trusted forward and backward
at w. The fallback epochs (warm-up, the guard) train on the trusted batch too, which makes them ``ce-all``.

With ``meta_every`` = k > 1 only steps 0, k, 2k, ... are such meta steps; the steps between are plain steps
on mean(v(ℓ)·ℓ) with the current weight net: one forward and one backward, and no trusted batch unless
``train_on_trusted`` is on, where they keep the trusted term too (its forward and backward at w;
``plain_trusted_term: false`` drops it).

The look-ahead is plain SGD at the current scheduled lr, as the reference (``lookahead_rule="sgd-plain"``);
``"optimizer"`` looks ahead with the real rule (momentum, weight decay). The hypergradient is the exact
second-order one, computed in logit space (``raynoisy.meta.output_hypergrad``: v reaches the model only
through the loss of the logits) and exact across ranks. There is no first-order switch: v reaches the
trusted loss only through the inner gradient, so a first-order hypergradient is identically zero.

BatchNorm: the training forward (shared by the look-ahead and the real step) updates the running
statistics, once per step; the trusted forward at the fast weights uses copies of the buffers. The
reference's look-ahead forwards update the buffers of a model copy that is thrown away, and its real
forward updates the real ones once, so the effect on the real model is the same.

Export ``sample_weights.parquet``: the final weight net's weight of each training sample's loss under its
given label, evaluated with the final model in eval mode.

Label issues (``label_issues.parquet``) from the same weights: ``label_score`` is the weight itself — the
weight net ends in a sigmoid, so the weight is already normalised to (0, 1), 1 being a label the method
trusts fully — and ``is_label_issue`` is ``weight < 0.5``: the method gives the sample less than half the
weight of a fully trusted one (the rule ``sample_weights`` in metrics.json scores too). An absolute
threshold rather than one relative to this run's weights, so that a run in which the net trusts every
sample flags none. ``predicted_label`` is the main model's argmax; MW-Net has no corrected label.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from torch import Tensor

from raynoisy.meta import (
    OutputLoss,
    all_reduce_sum_,
    example_alignment,
    functional_forward,
    gold_gradient,
    output_hypergrad,
)
from raynoisy.meta.hypergrad import Loss
from raynoisy.meta.output_hypergrad import alignment_with
from raynoisy.methods import register_method
from raynoisy.methods.base import Batch, MethodContext
from raynoisy.methods.collapse_guard import GuardReading, model_reading, weight_reading, wrong_labels
from raynoisy.methods.label_issues import detector_scores, true_labels_of
from raynoisy.methods.meta_common import (
    TrustedMetaMethod,
    TrustedMetaParams,
    TrustedTerm,
    check_param,
    evaluating,
    given_label_loss,
    lookahead_optimizer,
    real_step_through_outputs,
    step_through_outputs,
)
from raynoisy.models.meta_nets import WeightNet

# A sample whose weight is below this counts as flagged (down-weighted): in the export summary and as a
# label issue.
DOWN_WEIGHT_THRESHOLD = 0.5
WEIGHTINGS = ("net", "example")


def example_weights(alignment: Tensor) -> Tensor:
    """The positive part of each sample's alignment, normalised to mean 1 over the global batch (all zero
    where nothing aligns): the same gradient scale as unweighted cross-entropy."""
    positive = alignment.clamp(min=0)
    totals = torch.stack([positive.sum(), torch.tensor(float(len(positive)), device=positive.device)])
    all_reduce_sum_([totals])
    if totals[0] <= 0:
        return torch.zeros_like(positive)
    return positive * (totals[1] / totals[0])


@dataclass
class MWNetParams(TrustedMetaParams):
    """Reference defaults (CIFAR ResNet-32 setting); see the module docstring."""

    meta_lr: float = 1e-3
    meta_weight_decay: float = 1e-4
    hidden: int = 100
    lookahead_rule: str = "sgd-plain"
    warmup_epochs: int = 0
    weighting: str = "net"  # net: the paper's weight net v(loss) | example: per-example gradient alignment
    train_on_trusted: bool = False  # the real step also trains on the trusted batch (a deviation)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_param(self.meta_lr > 0, "meta_lr", f"must be > 0, got {self.meta_lr}", "e.g. 1e-3")
        check_param(self.meta_weight_decay >= 0, "meta_weight_decay", "must be >= 0", "e.g. 1e-4")
        check_param(self.hidden >= 1, "hidden", f"must be >= 1, got {self.hidden}", "e.g. 100")
        check_param(
            self.lookahead_rule in ("sgd-plain", "optimizer"),
            "lookahead_rule",
            f"unknown rule {self.lookahead_rule!r}",
            "use sgd-plain (the reference) or optimizer (the real SGD rule with momentum and weight decay)",
        )
        check_param(self.warmup_epochs >= 0, "warmup_epochs", "must be >= 0", "0 weighs from the start")
        check_param(
            self.weighting in WEIGHTINGS,
            "weighting",
            f"unknown weighting {self.weighting!r}",
            "use net (the paper's weight net) or example (per-example gradient alignment)",
        )
        check_param(
            self.weighting == "net" or self.meta_every == 1,
            "meta_every",
            f"is {self.meta_every} with weighting example, whose weights need a trusted batch every step",
            "use meta_every 1 with weighting example",
        )


@register_method
class MetaWeightNet(TrustedMetaMethod):
    name = "mwnet"
    Params = MWNetParams
    export_name = "sample_weights"
    label_issue_rule = (
        f"weight-net weight < {DOWN_WEIGHT_THRESHOLD} (the final weight net on the final model's loss of the "
        "given label); label_score = the weight"
    )

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        self.weight_net = WeightNet(self.params.hidden).to(ctx.device)
        self.meta_optimizer = torch.optim.Adam(
            self.weight_net.parameters(), lr=self.params.meta_lr, weight_decay=self.params.meta_weight_decay
        )
        self.warmup_epochs = self.params.warmup_epochs
        self.trains_on_trusted = self.params.train_on_trusted
        self.by_example = self.params.weighting == "example"
        # weighting example: the whole trusted set's gradient after the last epoch (exports, diagnosis)
        self.trusted_grad: dict[str, Tensor] | None = None

    def _weighted_loss(self, labels: Tensor) -> OutputLoss:
        """ℓ(logits) = mean(v(ℓ_i)·ℓ_i), v fed detached losses: v's gradient comes only via the look-ahead."""

        def loss(logits: Tensor, _features: Tensor) -> Tensor:
            losses = F.cross_entropy(logits, labels, reduction="none")
            return (self.weight_net(losses.detach()) * losses).mean()

        return loss

    def _gold_loss(self, trusted: Batch) -> Loss:
        """CE of the trusted batch at the given parameters: the meta objective, and the trusted term."""
        net = self.main.net

        def loss(params: dict[str, Tensor]) -> Tensor:
            return F.cross_entropy(functional_forward(net, params, trusted.x)[0], trusted.y)

        return loss

    def meta_update_step(self, batch: Batch, trusted: Batch) -> dict[str, float]:
        net = self.main.net
        outer = self._gold_loss(trusted)

        if self.by_example:
            return self._example_step(batch, trusted, outer)

        meta_params = list(self.weight_net.parameters())
        hyper = output_hypergrad(
            net,
            lookahead_optimizer(self.main, self.params.lookahead_rule),
            batch.x,
            self._weighted_loss(batch.y),
            outer,
            meta_params,
            keep_graph=True,
        )
        self.meta_step(self.meta_optimizer, meta_params, hyper.meta_grads)
        with torch.no_grad():
            weights = self.weight_net(F.cross_entropy(hyper.logits.detach(), batch.y, reduction="none"))
        trusted_term = None
        if self.params.train_on_trusted:
            trusted_term = self._trusted_term(batch, trusted, *gold_gradient(net, outer))
        loss = real_step_through_outputs(self.main, hyper, self._real_loss(batch.y), trusted_term)
        return {
            "loss": float(loss),
            "meta_loss": float(hyper.gold_loss_after),
            "mean_weight": float(weights.mean()),
        }

    def _trusted_term(
        self, batch: Batch, trusted: Batch, loss: Tensor, grads: dict[str, Tensor]
    ) -> TrustedTerm:
        """The trusted batch's share of the real step (``train_on_trusted``): its loss and gradient at w."""
        rows = self.trusted_rows_at_full_size(len(trusted))
        return TrustedTerm(loss, grads, rows / (len(batch) + rows))

    def _example_step(self, batch: Batch, trusted: Batch, gold_loss: Loss) -> dict[str, float]:
        """``weighting: example``: weights from each sample's gradient against the trusted one, then the real
        step through the same forward."""
        aligned = example_alignment(self.main.net, batch.x, batch.y, gold_loss)
        weights = example_weights(aligned.alignment)

        def weighted(logits: Tensor, _features: Tensor) -> Tensor:
            return (weights * F.cross_entropy(logits, batch.y, reduction="none")).mean()

        trusted_term = None
        if self.params.train_on_trusted:
            trusted_term = self._trusted_term(batch, trusted, aligned.gold_loss, aligned.gold_grads)
        loss = real_step_through_outputs(self.main, aligned, self._real_loss(batch.y, weighted), trusted_term)
        return {
            "loss": float(loss),
            "meta_loss": float(aligned.gold_loss),
            "mean_weight": float(weights.mean()),
            "zero_weight_share": float((weights == 0).float().mean()),
        }

    def _real_loss(self, labels: Tensor, weighted: OutputLoss | None = None) -> OutputLoss:
        """The weighted loss; plain cross-entropy (every weight 1) while ``on_given_labels``."""
        if self.on_given_labels:
            return given_label_loss(labels)
        return self._weighted_loss(labels) if weighted is None else weighted

    def plain_step(self, batch: Batch, trusted: Batch | None) -> dict[str, float]:
        trusted_term = None
        if trusted is not None:

            def trusted_term() -> TrustedTerm:
                gold = gold_gradient(self.main.net, self._gold_loss(trusted))
                return self._trusted_term(batch, trusted, *gold)

        loss, logits = step_through_outputs(self.main, batch.x, self._real_loss(batch.y), trusted_term)
        with torch.no_grad():
            weights = self.weight_net(F.cross_entropy(logits, batch.y, reduction="none"))
        return {"loss": float(loss), "mean_weight": float(weights.mean())}

    def _weigh(self, batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
        """Logits, per-sample losses under the given labels and their weights (final models, eval mode)."""
        with evaluating(self.main.net, self.weight_net):
            logits = self.main.net(batch.x)[0]
            losses = F.cross_entropy(logits, batch.y, reduction="none")
            if not self.by_example:
                return logits, losses, self.weight_net(losses)
            assert self.trusted_grad is not None, "weighting example: no epoch has ended yet"
            params = dict(self.main.net.named_parameters())
            alignment = alignment_with(self.main.net, params, self.trusted_grad, batch.x, logits, batch.y)
            norm = sum(float((g * g).sum()) for g in self.trusted_grad.values())
            return logits, losses, (alignment / max(norm, 1e-30)).clamp(0, 1)

    def on_epoch_end(self, epoch: int) -> dict[str, float]:
        if self.by_example:
            self.trusted_grad = self._trusted_gradient()
        return super().on_epoch_end(epoch)

    def _trusted_gradient(self) -> dict[str, Tensor]:
        """The mean cross-entropy gradient over the whole trusted set (every rank's share), eval mode."""
        net = self.main.net
        trainable = {n: p for n, p in net.named_parameters() if p.requires_grad}
        sums = {n: torch.zeros_like(p) for n, p in trainable.items()}
        count = torch.zeros(1, dtype=torch.float64, device=self.ctx.device)
        with evaluating(net), torch.enable_grad():
            for batch in self.trusted_pass():
                loss = F.cross_entropy(net(batch.x)[0], batch.y, reduction="sum")
                grads = torch.autograd.grad(loss, list(trainable.values()))
                for total, g in zip(sums.values(), grads, strict=True):
                    total += g
                count += len(batch.y)
        all_reduce_sum_([*sums.values(), count])
        return {n: g / max(float(count), 1.0) for n, g in sums.items()}

    def guard_reading(self) -> GuardReading | None:
        """Weights of each trusted sample's loss under its label and under another (``wrong_labels``), and
        the main model's predictions; with weighting example the predictions alone (see the module
        docstring)."""
        if self.by_example:
            with evaluating(self.main.net):
                batches = ((self.main.net(b.x)[0], b.y) for b in self.trusted_pass())
                return model_reading(batches, self.ctx.num_classes, self.ctx.device)

        def batches() -> Iterator[tuple[Tensor, Tensor, Tensor, Tensor]]:
            for batch in self.trusted_pass():
                logits, _, right = self._weigh(batch)
                wrong = wrong_labels(batch.y, batch.sample_id, self.ctx.num_classes)
                with evaluating(self.weight_net):
                    wrong_weights = self.weight_net(F.cross_entropy(logits, wrong, reduction="none"))
                yield right, wrong_weights, logits, batch.y

        return weight_reading(batches(), self.ctx.num_classes, self.ctx.device)

    def per_sample_outputs(self, batch: Batch) -> dict[str, np.ndarray]:
        _, losses, weights = self._weigh(batch)
        return {
            "sample_id": batch.sample_id.cpu().numpy(),
            "given_label": batch.y.cpu().numpy(),
            "loss": losses.float().cpu().numpy(),
            "weight": weights.float().cpu().numpy(),
        }

    def label_issue_columns(self, batch: Batch) -> dict[str, np.ndarray] | None:
        if self.guard.falling_back:  # weights judged inverted or flat: the model-prediction path instead
            return None
        logits, _, weights = self._weigh(batch)
        weights = weights.float().cpu().numpy()
        return {
            "sample_id": batch.sample_id.cpu().numpy(),
            "given_label": batch.y.cpu().numpy(),
            "predicted_label": logits.argmax(dim=1).cpu().numpy(),
            "label_score": weights,
            "is_label_issue": weights < DOWN_WEIGHT_THRESHOLD,
        }

    @classmethod
    def summarize_export(cls, table: pa.Table, labels: pa.Table) -> dict[str, Any]:
        """``sample_weights`` for metrics.json: how much the final weight net down-weights, and whom.

        "weight < 0.5" is scored as a detector of mislabelled samples (given != true) over the samples whose
        true label is known; mean weights of the clean and mislabelled ones show the separation directly.
        """
        weights = table.column("weight").to_numpy()
        given = table.column("given_label").to_numpy()
        down = weights < DOWN_WEIGHT_THRESHOLD
        out: dict[str, Any] = {
            "samples": len(weights),
            "mean_weight": float(weights.mean()) if len(weights) else None,
            "fraction_below_half": float(down.mean()) if len(weights) else None,
        }
        true = true_labels_of(table.column("sample_id").to_numpy(), labels)
        known = true >= 0
        out["samples_with_true_label"] = int(known.sum())
        if known.any():
            mislabelled = given[known] != true[known]
            known_weights = weights[known]
            out["mean_weight_clean"] = (
                float(known_weights[~mislabelled].mean()) if (~mislabelled).any() else None
            )
            out["mean_weight_mislabelled"] = (
                float(known_weights[mislabelled].mean()) if mislabelled.any() else None
            )
            out.update(detector_scores(down[known], mislabelled))
        return {"sample_weights": out}

    def state_dict(self) -> dict[str, Any]:
        return {
            "main": self.main.state_dict(),
            "weight_net": self.weight_net.state_dict(),
            "meta_optimizer": self.meta_optimizer.state_dict(),
            "guard": self.guard.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.main.load_state_dict(state["main"])
        self.weight_net.load_state_dict(state["weight_net"])
        self.meta_optimizer.load_state_dict(state["meta_optimizer"])
        self.guard.load_state_dict(state["guard"])
