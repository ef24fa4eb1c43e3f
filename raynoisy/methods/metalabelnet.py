"""MetaLabelNet (Algan & Ulusoy, IEEE TNNLS; arXiv 2103.10869; gorkemalgan/MetaLabelNet ``main.py``).

Stage 1 (``warmup_epochs``): cross-entropy on the noisy labels. At the start of stage 2 a frozen copy of
the main network becomes the feature encoder (eval mode, never updated), and a single-layer soft-label
net (SLP) ŷ = softmax(Linear(encoder features)) generates the training targets. The SLP starts as a copy of
the encoder's classifier (``slp_init="encoder"``, a deliberate deviation: the reference starts it from
random weights, ``slp_init="random"``; see ``MetaLabelNet.on_stage_start``). Per stage-2 step, with a
trusted batch as large as the noisy one:

1. meta step: one virtual step θ' = θ - inner_lr·∇KL(p‖ŷ) (plain SGD, inner lr 1 as the reference), with
   p = softmax(f(x; θ)) and KL averaged over B·C (mean of p·(log p - log ŷ), the reference's 1/C scaling);
   cross-entropy on the trusted batch at θ'; the SLP takes an Adam step (lr β, weight decay 1e-4) with
   the hypergradient (second order, exact across ranks; computed in logit space by
   ``raynoisy.meta.output_hypergrad``, since the SLP reaches the model only through the KL of its logits);
2. real step on KL(p‖ŷ') + (-mean_{B·C} p·log p) with ŷ' from the UPDATED SLP, no graph to it, through
   the same forward as the meta step (the reference also reuses its step-1 output); while the collapse
   guard falls back (``raynoisy.methods.collapse_guard``), cross-entropy on the given labels instead.
   The two terms sum to -mean_{B·C} p·log ŷ': the entropy term cancels KL's own -H(p), so the update
   pulls p towards the one-hot at ŷ's mode rather than towards ŷ itself (entropy minimisation).

Encoder features: the encoder is frozen and in eval mode, so a training sample's features only change if its
input does. Where the training transform does not augment (``raynoisy.data.transforms.UNAUGMENTED_FAMILIES``:
the ``small`` images, text) and ``cache_features`` is on (the default), the start of stage 2 runs the encoder
once over the training split and keeps every sample's features in the per-sample store (``ENCODER_FEATURES``,
float32, replicated on every rank and checkpointed with it); the steps read them by sample_id instead of
running the encoder (the E pass of ``benchmarks/meta_step.py``); a batch with a sample the pass did not see
runs the encoder. Where training augments, every step runs it.

With ``meta_every`` = k > 1 only steps 0, k, 2k, ... of stage 2 (counted from its first step) are such meta
steps; the steps between are plain steps on KL(p‖ŷ) + (-mean p·log p) with the current SLP's soft labels
(the encoder's no-grad forward, one forward and one backward of the main network, no trusted batch).

The noisy label is not an input of the SLP; after stage 1 it is not used at all. The main model keeps
one SGD optimizer and one lr schedule over both stages (``optim.epochs`` in total), as the reference's
per-epoch lr function. Only stage-2 epochs can be picked as the best-validation model: a stage-1 model
is a cross-entropy model.

``warmup_epochs`` defaults to the reference's CIFAR-10 proportion 44/120 of ``optim.epochs`` (rounded, at
most ``optim.epochs - 1``); the Clothing1M preset sets 1 of 10 as the reference does.

BatchNorm: the training forward updates the running statistics once per step; the trusted forward at the
fast weights uses copies of the buffers (the reference's fast forward also updates the real ones). The
encoder runs in eval mode on its frozen running statistics and under no_grad (the reference leaves
requires_grad on and computes unused grads).

Export ``corrected_labels.parquet``: argmax and max of the final SLP's soft label per training sample; a run
whose collapse guard ends it falling back exports its best model's corrections instead
(``meta_common.corrected_labels_from_predictions``).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from raynoisy.config import Config
from raynoisy.data.sample_store import SampleStore
from raynoisy.data.sources import get_source
from raynoisy.data.transforms import UNAUGMENTED_FAMILIES
from raynoisy.errors import ConfigError
from raynoisy.meta import OutputLoss, all_reduce_mean_, functional_forward, output_hypergrad
from raynoisy.methods import register_method
from raynoisy.methods.base import Batch, MethodContext, Stage
from raynoisy.methods.collapse_guard import GuardReading, label_reading
from raynoisy.methods.meta_common import (
    CorrectedLabelExport,
    TrustedMetaMethod,
    TrustedMetaParams,
    check_param,
    corrected_label_columns,
    evaluating,
    given_label_loss,
    lookahead_optimizer,
    real_step_through_outputs,
    step_through_outputs,
)
from raynoisy.models.meta_nets import SoftLabelNet

# The reference's CIFAR-10 schedule: 44 warm-up epochs of 120.
DEFAULT_WARMUP_FRACTION = 44 / 120
# How the soft-label net starts stage 2, see ``MetaLabelNet.on_stage_start``.
SLP_INITS = ("encoder", "random")
# Added inside log(ŷ) as the reference does, so a soft label that underflows to 0 gives a finite loss.
LOG_EPS = 1e-10
# The per-sample store columns of the frozen encoder's features (``cache_features``) and of which samples
# have them.
ENCODER_FEATURES = "metalabelnet_encoder_features"
ENCODER_CACHED = "metalabelnet_encoder_cached"


@dataclass
class MetaLabelNetParams(TrustedMetaParams):
    """Reference CIFAR-10 defaults (β = 1e-2); Clothing1M uses β = 1e-3 and 1 warm-up epoch (its preset)."""

    meta_lr: float = 1e-2
    meta_weight_decay: float = 1e-4
    inner_lr: float = 1.0
    warmup_epochs: int | None = None
    slp_init: str = "encoder"
    cache_features: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_param(self.meta_lr > 0, "meta_lr", f"must be > 0, got {self.meta_lr}", "e.g. 1e-2")
        check_param(self.meta_weight_decay >= 0, "meta_weight_decay", "must be >= 0", "e.g. 1e-4")
        check_param(
            self.inner_lr > 0, "inner_lr", f"must be > 0, got {self.inner_lr}", "the reference uses 1"
        )
        check_param(
            self.warmup_epochs is None or self.warmup_epochs >= 0,
            "warmup_epochs",
            f"must be >= 0, got {self.warmup_epochs}",
            "leave it unset for the default share of optim.epochs",
        )
        check_param(
            self.slp_init in SLP_INITS,
            "slp_init",
            f"unknown initialisation {self.slp_init!r}",
            "use encoder (start at the warm-up classifier) or random (the reference)",
        )


def kl_to_soft_labels(logits: Tensor, soft: Tensor) -> Tensor:
    """KL(p‖ŷ) averaged over B·C (not summed over classes): the reference's scaling, kept with its lr 1."""
    log_p = F.log_softmax(logits, dim=1)
    return (log_p.exp() * (log_p - torch.log(soft + LOG_EPS))).mean()


def entropy(logits: Tensor) -> Tensor:
    """-mean_{B·C} p·log p, the entropy-minimisation term of the real step."""
    log_p = F.log_softmax(logits, dim=1)
    return -(log_p.exp() * log_p).mean()


def real_step_loss(soft: Tensor) -> OutputLoss:
    """The real step's loss on fixed soft labels ŷ (no graph to the SLP): KL(p‖ŷ) + (-mean p·log p)."""

    def loss(logits: Tensor, _features: Tensor) -> Tensor:
        return kl_to_soft_labels(logits, soft) + entropy(logits)

    return loss


def classifier_of(net: nn.Module) -> nn.Linear:
    """The backbone's ``fc``: every registered backbone computes ``logits = fc(features)``."""
    fc = getattr(net, "fc", None)
    if not isinstance(fc, nn.Linear):
        raise ConfigError(
            "method.params.slp_init",
            f"{type(net).__name__} has no Linear `fc` mapping its features to logits to start the SLP from",
            "set method.params.slp_init=random",
        )
    return fc


@register_method
class MetaLabelNet(CorrectedLabelExport, TrustedMetaMethod):
    name = "metalabelnet"
    Params = MetaLabelNetParams
    plain_steps = True  # the stage-1 warm-up is a DDP cross-entropy step

    @classmethod
    def warmup_epochs_for(cls, cfg: Config) -> int:
        """Stage-1 epochs: ``method.params.warmup_epochs``, else the reference's share of ``optim.epochs``."""
        epochs, chosen = cfg.optim.epochs, cls.parse_params(cfg.method.params).warmup_epochs
        return min(epochs - 1, round(epochs * DEFAULT_WARMUP_FRACTION)) if chosen is None else chosen

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        super().check_config(cfg)
        warmup = cls.warmup_epochs_for(cfg)
        if warmup >= cfg.optim.epochs:
            raise ConfigError(
                "method.params.warmup_epochs",
                f"{warmup} warm-up epochs leave none of optim.epochs={cfg.optim.epochs} for stage 2",
                "use fewer warm-up epochs or more epochs",
            )

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        p = self.params
        self.check_config(ctx.cfg)
        self.warmup_epochs = self.warmup_epochs_for(ctx.cfg)
        self.soft_label_net = SoftLabelNet(self.main.net.feature_dim, ctx.num_classes).to(ctx.device)
        self.meta_optimizer = torch.optim.Adam(
            self.soft_label_net.parameters(), lr=p.meta_lr, weight_decay=p.meta_weight_decay
        )
        self.encoder: nn.Module | None = None  # the frozen stage-1 network, from the first stage-2 epoch on
        family = get_source(ctx.cfg.data.dataset).transform
        self.store = ctx.sample_store if p.cache_features and family in UNAUGMENTED_FAMILIES else None
        if self.store is not None:
            self.store.add_dense(ENCODER_FEATURES, int(self.main.net.feature_dim), torch.float32)
            self.store.add_dense(ENCODER_CACHED, 1, torch.uint8)

    def _frozen_copy(self) -> nn.Module:
        encoder = copy.deepcopy(self.main.net).eval().requires_grad_(False)
        encoder.zero_grad(set_to_none=True)
        return encoder

    @classmethod
    def stages(cls, cfg: Config) -> list[Stage]:
        """Warm-up, then the meta stage; one lr schedule spans both (the reference's per-epoch lr)."""
        warmup = cls.warmup_epochs_for(cfg)
        stages = [Stage("meta", cfg.optim.epochs - warmup)]
        return ([Stage("warmup", warmup, selectable=False)] if warmup else []) + stages

    def on_stage_start(self, stage: Stage, best_model_state: dict[str, Tensor] | None) -> dict[str, float]:
        """At the meta stage: freeze the encoder and, by default, start the SLP at its classifier.

        ``slp_init="encoder"`` (a deliberate deviation from the reference, whose SLP starts from random
        weights) copies the warm-up network's final Linear into the SLP, so the first soft labels are the
        warm-up model's own predictions. From random weights the first stage-2 steps pull the main model
        towards arbitrary soft labels; with the reference's 76 stage-2 epochs it recovers, but on short
        schedules (3 stage-2 epochs of Fashion-MNIST here) the SLP collapsed to one class on some seeds.
        """
        if stage.name != "meta" or self.encoder is not None:
            return {}
        self.encoder = self._frozen_copy()
        # BatchNorm running statistics differ between ranks by their last local batches unless the caller has
        # just averaged them (the worker does, after every epoch; averaging again changes nothing): the
        # encoder is checkpointed and must be identical everywhere.
        all_reduce_mean_([b for b in self.encoder.buffers() if b.is_floating_point()])
        if self.params.slp_init == "encoder":
            self.soft_label_net.start_from(classifier_of(self.encoder))
        if self.store is not None:
            self._cache_features(self.store)
        return {}

    @torch.no_grad()
    def _cache_features(self, store: SampleStore) -> None:
        """The encoder's features of every training sample into the store: this rank's share of the split,
        one collective write (every rank's rows reach every replica)."""
        assert self.encoder is not None and self.ctx.iter_split is not None
        ids, features = [], []
        for batch in self.ctx.iter_split("train"):
            ids.append(batch.sample_id.cpu())
            features.append(self.encoder(batch.x.to(self.ctx.device))[1].float().cpu())
        dim = int(self.main.net.feature_dim)
        rows = torch.cat(ids) if ids else torch.zeros(0, dtype=torch.int64)
        store.scatter(ENCODER_FEATURES, rows, torch.cat(features) if features else torch.zeros(0, dim))
        store.scatter(ENCODER_CACHED, rows, torch.ones(len(rows), 1, dtype=torch.uint8))

    def trusted_batch_size(self, stage: Stage) -> int:
        """No trusted batches in the warm-up."""
        return 0 if stage.name == "warmup" else super().trusted_batch_size(stage)

    def train_step(self, batch: Batch, trusted: Batch | None) -> dict[str, float]:
        """The warm-up's cross-entropy step until the encoder is frozen, then a meta or a plain step."""
        if self.encoder is None:
            return self.main.cross_entropy_step(batch.x, batch.y)
        return super().train_step(batch, trusted)

    def _features(self, x: Tensor) -> Tensor:
        assert self.encoder is not None, "the encoder is frozen at the start of stage 2"
        with torch.no_grad():
            return self.encoder(x)[1]

    def _training_features(self, batch: Batch) -> Tensor:
        """A training batch's encoder features: from the store where all of its samples are cached, else the
        encoder's (a sample the stage's split pass did not see, e.g. in a test without one)."""
        if self.store is None:
            return self._features(batch.x)
        ids = batch.sample_id.cpu()
        if not bool(self.store.gather(ENCODER_CACHED, ids).all()):
            return self._features(batch.x)
        return self.store.gather(ENCODER_FEATURES, ids, self.ctx.device)

    def meta_update_step(self, batch: Batch, trusted: Batch) -> dict[str, float]:
        net = self.main.net
        features = self._training_features(batch)

        def inner(logits: Tensor, _features: Tensor) -> Tensor:
            return kl_to_soft_labels(logits, self.soft_label_net(features))

        def outer(params: dict[str, Tensor]) -> Tensor:
            return F.cross_entropy(functional_forward(net, params, trusted.x)[0], trusted.y)

        meta_params = list(self.soft_label_net.parameters())
        hyper = output_hypergrad(
            net,
            lookahead_optimizer(self.main, "sgd-plain", self.params.inner_lr),
            batch.x,
            inner,
            outer,
            meta_params,
            keep_graph=True,
        )
        self.meta_step(self.meta_optimizer, meta_params, hyper.meta_grads)
        with torch.no_grad():
            soft = self.soft_label_net(features)
        loss = real_step_through_outputs(self.main, hyper, self._real_loss(soft, batch.y))
        return self._scalars(loss, hyper.logits.detach(), soft) | {"meta_loss": float(hyper.gold_loss_after)}

    def plain_step(self, batch: Batch, trusted: Batch | None) -> dict[str, float]:
        """The soft labels as they are; never a trusted batch (the real step trains on none)."""
        with torch.no_grad():
            soft = self.soft_label_net(self._training_features(batch))
        loss, logits = step_through_outputs(self.main, batch.x, self._real_loss(soft, batch.y))
        return self._scalars(loss, logits, soft)

    def _real_loss(self, soft: Tensor, labels: Tensor) -> OutputLoss:
        """KL + entropy on the soft labels; cross-entropy on the given labels while the guard falls back."""
        return given_label_loss(labels) if self.on_given_labels else real_step_loss(soft)

    def _soft_labels(self, batch: Batch) -> Tensor:
        assert self.encoder is not None, "the soft-label net exists only from the first stage-2 epoch on"
        with evaluating(self.soft_label_net):
            return self.soft_label_net(self._features(batch.x))

    def guard_reading(self) -> GuardReading | None:
        """The SLP's labels of the trusted samples (it never sees a label, so ``kept`` is its accuracy there);
        nothing in the warm-up."""
        if self.encoder is None:
            return None

        def batches() -> Iterator[tuple[Tensor, Tensor, Tensor]]:
            for batch in self.trusted_pass():
                with evaluating(self.main.net):
                    logits = self.main.net(batch.x)[0]
                yield self._soft_labels(batch), logits, batch.y

        return label_reading(batches(), self.ctx.num_classes, self.ctx.device)

    @staticmethod
    def _scalars(loss: Tensor, logits: Tensor, soft: Tensor) -> dict[str, float]:
        return {
            "loss": float(loss),
            "kl": float(kl_to_soft_labels(logits, soft)),
            "entropy": float(entropy(logits)),
        }

    def per_sample_outputs(self, batch: Batch) -> dict[str, np.ndarray]:
        return corrected_label_columns(batch, self._soft_labels(batch))

    def state_dict(self) -> dict[str, Any]:
        return {
            "main": self.main.state_dict(),
            "soft_label_net": self.soft_label_net.state_dict(),
            "meta_optimizer": self.meta_optimizer.state_dict(),
            "encoder": None if self.encoder is None else self.encoder.state_dict(),
            "guard": self.guard.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.main.load_state_dict(state["main"])
        self.soft_label_net.load_state_dict(state["soft_label_net"])
        self.meta_optimizer.load_state_dict(state["meta_optimizer"])
        self.guard.load_state_dict(state["guard"])
        self.encoder = None
        if state["encoder"] is not None:
            self.encoder = self._frozen_copy()
            self.encoder.load_state_dict(state["encoder"])
