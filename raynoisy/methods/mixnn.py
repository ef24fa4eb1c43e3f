"""MixNN (Lu & He): train on synthetic samples mixed with their nearest neighbours, with soft labels.

Reference: MacLLL/MixNN (``train_cifar_with_MixNN.py``, ``loss.py``; ../shared/reference/methods.md §4).
No trusted set. Stages: ``warmup`` (plain CE, ``warmup_epochs``, never selected) then ``mix``.

Every ``mix`` epoch starts with a refresh on every rank (``on_epoch_start``):

1. each sample's CE loss against its current corrected label (argmax of its EMA soft label, as the
   reference) and its penultimate features, from one of two sources (``refresh_from``):
   ``pass`` (the reference, default): a whole-split pass (``ctx.iter_split("train")``, eval mode, no grad)
   over this rank's share; ``steps``: what the previous epoch's neighbour steps recorded (below), with the
   pass only where the previous epoch made no un-mixed forward (the first refresh, and every epoch that
   follows a warm-up or mixup epoch);
2. the losses go into the store (one collective ``scatter``), so every rank holds all of them; they are
   min-max normalised over the whole split; rank 0 fits a 2-component ``GaussianMixture`` (the reference's
   ``max_iter=10, tol=1e-2, reg_covar=5e-4``, ``random_state = run.seed``) and scatters every sample's
   clean probability p_i (posterior of the smaller-mean component; other ranks pass no rows), so p is
   bit-identical on every rank whatever BLAS each runs;
3. from epoch ``mixup_epochs`` on (the reference's ``es``), in ``global`` mode: every rank adds its features
   to the ``knn-index`` service for version = epoch; barrier; rank 0 builds; barrier; every rank searches its
   own ids' ``k`` neighbours (self excluded) and scatters neighbour ids and fp16 features into the store. A
   search that raises ``IndexNotReadyError`` (Ray restarted the actor, a build short of rows) makes *every*
   rank re-add and rebuild: the decision is all-reduced, so no rank waits alone in a barrier.

Steps of the ``mix`` stage:

- epoch < ``mixup_epochs``: the reference's mixup, λ ~ Beta(1, 1) (one per batch), a random permutation,
  input-level mixing; loss λ·ℓ(out, s_i) + (1−λ)·ℓ(out, s_π(i)) with ℓ the reference's ``-Σ s·p`` on
  probabilities (``mixup_loss="prob"``: ``F.nll_loss`` on softmax, bounded) or soft CE (``"ce"``);
- epoch >= ``mixup_epochs``: nearest-neighbour mixing with weights from the clean probabilities,
  w_ij = p_j / Σ_{l ∈ {i} ∪ N(i)} p_l (for k = 1: λ_i = p_i / (p_i + p_j), the reference's K = 2), loss
  Σ_j w_ij · softCE(out_i, s_j). ``batch`` mode: the reference's in-batch neighbours (exact nearest in the
  train-mode features of a first forward, not HNSW), mixed at the input. ``global`` mode: neighbours over
  the whole training split from the KnnIndex, mixed at the **feature** level: h̃_i = w_ii h_i + Σ_j w_ij h_j,
  logits ``fc(h̃_i)``. Why features: a neighbour's input is on another rank's or no rank's batch, and
  fetching it would mean each worker loading arbitrary samples of the data set (or regrouping the Ray Data
  epoch by neighbourhood), while its penultimate feature is ``feature_dim`` numbers refreshed every epoch.
  The cost: h_i is the current train-mode feature (gradients reach the backbone through it), h_j the
  eval-mode feature of the epoch's refresh (up to one epoch stale), and the mixing regularises the
  classifier over feature space rather than the whole network over input space. It also needs one forward
  per step where the reference takes two. Store bytes per sample in global mode: ``2·feature_dim`` (fp16
  features) + ``8·k`` (neighbour ids) + 8 (loss, p) + soft labels (4 per kept class).
- soft labels (``add_topk``, ``soft_label_topk`` classes kept; one-hot given labels at the first refresh)
  are updated by EMA in every step of the epochs >= ``mixup_epochs`` with ``epoch % ema_every == 0``:
  s_i ← m·s_i + (1−m)·softmax(logits of the un-mixed x_i) with m = ``ema_momentum`` (0.9).

``refresh_from: steps`` records, in every neighbour step, the loss of the un-mixed forward against the
sample's corrected label of that step and (global mode) the forward's features, into the store's loss and
feature columns, so the next refresh needs no pass: it reads the store, fits the GMM and rebuilds the index.
The pass is 80-90% of a refresh (benchmarks/README.md), a forward over the training set each epoch, while
every training step already makes that forward. What differs from the pass: each value comes from the
step that saw the sample, so in train mode (BatchNorm batch statistics, dropout), under the training
augmentation, and with the weights of that moment of the epoch rather than its end; a sample a
``drop_last`` batch left out keeps its value from an earlier epoch (``refresh_recorded_fraction`` logs
the share recorded); and the neighbours' features a step mixes are refreshed as the epoch goes, not once
at its start. The accuracy of both sources is measured side by side in benchmarks/README.md.

Inputs that cannot be interpolated (token ids of text) are mixed at the feature level in every mode: the
mixup and in-batch steps mix the pooled features of the batch's own forward, ``fc(λ h_i + (1−λ) h_π(i))``,
as manifold mixup does at the last layer.

Epochs are the loop's 0-based epoch counter over the whole run (warm-up included). Differences from the
reference, on purpose: the warm-up trains on the augmented stream (the reference's warm-up loader has no
augmentation); the GMM losses are not averaged over the last 5 epochs at 80% noise; in-batch neighbours are
exact. Not done: the 80%-noise loss averaging.

Cost: ``on_epoch_end`` logs the refresh's seconds by part (whole-split pass, losses + GMM, index add + build
+ search, store writes of the neighbours) beside the loop's ``train_seconds`` (the steps after it), and the
index's version and attempts; ``benchmarks/meta_step.py`` reports the refresh as a share of the epoch.

Known limit: ``check_config`` runs before the training split's size is known, so ``k`` against the split
size (``raynoisy.knn.check_index_config``) is checked there against ``split.train_subset`` when set, and
again in the worker with the real size (a ``ConfigError``, which the run records and stops on).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.swa_utils import update_bn

from raynoisy.config import Config
from raynoisy.data.sample_store import partition
from raynoisy.errors import ConfigError
from raynoisy.knn import DEFAULT_EXACT_THRESHOLD, IndexNotReadyError, KnnIndex, check_index_config
from raynoisy.meta.sync import all_reduce_mean_, all_reduce_sum_, world_size
from raynoisy.methods import register_method
from raynoisy.methods.base import Batch, Method, MethodContext, ServiceSpec, Stage, call_service
from raynoisy.methods.meta_common import (
    CorrectedLabelExport,
    check_param,
    corrected_label_columns,
    evaluating,
)
from raynoisy.methods.supervised import MainModel

SERVICE = "knn-index"
SOFT = "soft_label"
CLEAN = "clean_prob"
LOSS = "gmm_loss"
NEIGHBOURS = "nn_ids"
FEATURES = "nn_feature"
MODES = ("global", "batch")
MIXUP_LOSSES = ("prob", "ce")
REFRESH_SOURCES = ("pass", "steps")
EPS = 1e-10  # the reference's guard in p_i / (p_i + p_j)
INDEX_ATTEMPTS = 3


@dataclass
class MixNNParams:
    warmup_epochs: int = 10  # CIFAR-10 reference; 30 for CIFAR-100
    mixup_epochs: int = 60  # the reference's ``es``: mixup before, neighbour mixing and EMA from then on
    k: int = 1  # neighbours besides the sample itself (the reference's K = 2)
    neighbors: str = (
        "global"  # global: KnnIndex over the split, feature mixing | batch: in-batch, input mixing
    )
    ema_momentum: float = 0.9
    ema_every: int = 10  # soft labels are updated in the epochs with epoch % ema_every == 0
    mixup_alpha: float = 1.0  # λ ~ Beta(alpha, alpha)
    mixup_loss: str = "prob"  # prob: the reference's nll_loss on probabilities | ce: soft cross-entropy
    soft_label_topk: int = 10  # classes kept per soft label in the store
    metric: str = "l2"  # the reference's nmslib space
    exact_threshold: int = DEFAULT_EXACT_THRESHOLD
    gmm_max_iter: int = 10
    gmm_tol: float = 1e-2
    gmm_reg_covar: float = 5e-4
    index_cpus: float = 0.5
    index_gpus: float = 0.0  # > 0: the index actor's share of a GPU; it searches there (FAISS or torch)
    refresh_from: str = "pass"  # pass: the reference's whole-split pass | steps: the steps' forwards


# ---- pieces with their own tests --------------------------------------------------------------------


def clean_probability(losses: np.ndarray, seed: int, p: MixNNParams | None = None) -> np.ndarray:
    """Min-max normalise ``losses`` and return each one's posterior under the smaller-mean GMM component."""
    p = p or MixNNParams()
    from sklearn.mixture import GaussianMixture

    x = np.asarray(losses, dtype=np.float64).reshape(-1)
    lo, hi = float(x.min()), float(x.max())
    x = (x - lo) / max(hi - lo, 1e-12)
    gmm = GaussianMixture(
        n_components=2, max_iter=p.gmm_max_iter, tol=p.gmm_tol, reg_covar=p.gmm_reg_covar, random_state=seed
    )
    gmm.fit(x[:, None])
    clean = int(np.argmin(gmm.means_.reshape(-1)))
    return gmm.predict_proba(x[:, None])[:, clean].astype(np.float32)


def mixing_weights(p_self: Tensor, p_neighbours: Tensor) -> Tensor:
    """[B, 1 + k] weights of a sample and its k neighbours: p_j / Σ p (k = 1: λ_i = p_i / (p_i + p_j))."""
    p = torch.cat([p_self.reshape(-1, 1), p_neighbours.reshape(len(p_self), -1)], dim=1) + EPS
    return p / p.sum(dim=1, keepdim=True)


def ema_update(soft: Tensor, probs: Tensor, momentum: float) -> Tensor:
    return momentum * soft + (1.0 - momentum) * probs


def soft_cross_entropy(logits: Tensor, soft: Tensor) -> Tensor:
    """Per-sample −Σ s·log softmax(logits)."""
    return -(soft * F.log_softmax(logits, dim=1)).sum(dim=1)


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _all_ok(ok: bool, device: torch.device) -> bool:
    if world_size() == 1:
        return ok
    flag = torch.tensor([int(ok)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


class MixNNIndex:
    """The ``knn-index`` service: a ``KnnIndex`` sized by the first worker that calls ``configure``.

    ``services(cfg)`` runs on the driver before the training split's ids and the backbone's feature width are
    known, so the index is built lazily. After Ray restarts the actor it is unconfigured again: ``version()``
    is -1 and ``add``/``build``/``search_ids`` raise ``IndexNotReadyError``, the restart contract of KnnIndex.
    """

    def __init__(self, **kwargs: Any) -> None:
        self._kwargs = kwargs
        self._index: KnnIndex | None = None

    def configured(self) -> bool:
        return self._index is not None

    def configure(self, sample_ids: np.ndarray, dim: int) -> None:
        if self._index is None:
            self._index = KnnIndex(sample_ids=sample_ids, dim=dim, **self._kwargs)

    def version(self) -> int:
        return -1 if self._index is None else self._index.version()

    def _ready(self) -> KnnIndex:
        if self._index is None:
            raise IndexNotReadyError("knn index: not configured (a new or restarted actor)", -1, -1)
        return self._index

    def add(self, version: int, sample_ids: Any, features: Any) -> dict[str, Any]:
        return self._ready().add(version, sample_ids, features)

    def build(self, version: int) -> Any:
        return self._ready().build(version)

    def search_ids(
        self, sample_ids: Any, k: int, exclude_self: bool = True, version: int | None = None
    ) -> Any:
        return self._ready().search_ids(sample_ids, k, exclude_self=exclude_self, version=version)


class _MixForward(nn.Module):
    """The one module DDP wraps, so a step is one DDP forward: ``(x)`` -> the net's (logits, features); with
    ``weights`` [B, 1 + k] -> (logits of x, features of x, logits of the mixed features
    ``fc(w_0 h + Σ w_j h_j)``), the h_j being ``neighbour_features`` [B, k, D] or, for in-batch ``partners``
    [B, k] (batch positions), the partners' features of this same forward."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(
        self,
        x: Tensor,
        neighbour_features: Tensor | None = None,
        weights: Tensor | None = None,
        partners: Tensor | None = None,
    ) -> tuple[Tensor, ...]:
        logits, features = self.net(x)
        if weights is None:
            return logits, features
        if partners is not None:
            neighbour_features = features[partners]
        assert neighbour_features is not None, "mixing needs neighbour features or in-batch partners"
        mixed = weights[:, :1] * features + (weights[:, 1:, None] * neighbour_features).sum(dim=1)
        return logits, features, self.net.fc(mixed)


@register_method
class MixNN(CorrectedLabelExport, Method):
    name = "mixnn"
    Params = MixNNParams
    label_issue_rule = (
        "corrected label != given label (argmax of MixNN's EMA soft label); "
        "label_score = the soft label's probability of the given label"
    )

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        cls._check(cfg, cfg.split.train_subset)

    @classmethod
    def _check(cls, cfg: Config, num_train: int | None) -> None:
        p = cls.parse_params(cfg.method.params)
        check_param(
            p.neighbors in MODES, "neighbors", f"unknown mode {p.neighbors!r}", f"use one of {list(MODES)}"
        )
        check_param(
            p.mixup_loss in MIXUP_LOSSES,
            "mixup_loss",
            f"unknown {p.mixup_loss!r}",
            f"use {list(MIXUP_LOSSES)}",
        )
        check_param(
            0 <= p.warmup_epochs < cfg.optim.epochs,
            "warmup_epochs",
            f"is {p.warmup_epochs}; the run has {cfg.optim.epochs} epochs and needs at least one mix epoch",
            f"set 0 <= warmup_epochs < {cfg.optim.epochs}",
        )
        check_param(p.mixup_epochs >= 0, "mixup_epochs", f"is {p.mixup_epochs}", "set mixup_epochs >= 0")
        check_param(0.0 <= p.ema_momentum < 1.0, "ema_momentum", f"is {p.ema_momentum}", "set it in [0, 1)")
        check_param(p.ema_every >= 1, "ema_every", f"is {p.ema_every}", "set ema_every >= 1")
        check_param(p.mixup_alpha > 0, "mixup_alpha", f"is {p.mixup_alpha}", "set mixup_alpha > 0")
        check_param(p.soft_label_topk >= 1, "soft_label_topk", f"is {p.soft_label_topk}", "set it >= 1")
        check_param(p.gmm_max_iter >= 1, "gmm_max_iter", f"is {p.gmm_max_iter}", "set it >= 1")
        check_param(
            p.refresh_from in REFRESH_SOURCES,
            "refresh_from",
            f"unknown source {p.refresh_from!r}",
            f"use one of {list(REFRESH_SOURCES)}",
        )
        if p.neighbors == "batch":
            local = cfg.optim.batch_size // cfg.scaling.workers
            check_param(
                isinstance(p.k, int) and 1 <= p.k < local,
                "k",
                f"is {p.k}; in-batch neighbours come from each worker's batch of {local}",
                f"set 1 <= k < {local} (the reference uses 1)",
            )
        else:
            check_index_config(
                k=p.k,
                num_samples=num_train
                if num_train is not None
                else max(2, p.k + 1)
                if isinstance(p.k, int)
                else 2,
                metric=p.metric,
                exact_threshold=p.exact_threshold,
            )
            if not p.index_cpus >= 0:
                raise ConfigError("method.params.index_cpus", f"is {p.index_cpus}", "set it >= 0")
            if not p.index_gpus >= 0:
                raise ConfigError(
                    "method.params.index_gpus", f"is {p.index_gpus}", "set it >= 0 (e.g. 0.1 of a GPU)"
                )

    @classmethod
    def stages(cls, cfg: Config) -> list[Stage]:
        warmup = cls.parse_params(cfg.method.params).warmup_epochs
        out = [Stage("warmup", warmup, selectable=False)] if warmup else []
        return [*out, Stage("mix", cfg.optim.epochs - warmup)]

    @classmethod
    def services(cls, cfg: Config) -> list[ServiceSpec]:
        p = cls.parse_params(cfg.method.params)
        if p.neighbors != "global":
            return []
        kwargs = {
            "metric": p.metric,
            "exact_threshold": p.exact_threshold,
            "storage_dtype": "float16",
            "seed": cfg.run.seed,
            # a GPU only where the actor is given a share: inside Ray it sees none otherwise, and the
            # in-process backend must not take the training GPU unasked
            "use_gpu": p.index_gpus > 0,
        }
        return [ServiceSpec(SERVICE, MixNNIndex, kwargs=kwargs, num_cpus=p.index_cpus, num_gpus=p.index_gpus)]

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        self._check(ctx.cfg, ctx.num_train)
        p = self.params
        self.main = MainModel(ctx, ddp=False)  # weights broadcast; the DDP wrapper is the mixing module's
        self.main.model = ctx.wrap_ddp(_MixForward(self.main.net))
        self.main.ddp = True
        # λ and the mixup permutation: per rank (each has its own batch), checkpointed
        self.rng = np.random.default_rng([ctx.cfg.run.seed, ctx.rank])
        self.soft_ready = False
        self.epoch = 0
        store = ctx.sample_store
        assert store is not None, "mixnn keeps its soft labels in the per-sample store"
        store.add_topk(SOFT, ctx.num_classes, min(p.soft_label_topk, ctx.num_classes))
        store.add_dense(CLEAN, 1, torch.float32, fill=1.0)
        store.add_dense(LOSS, 1, torch.float32)
        if p.neighbors == "global":
            dim = int(self.main.net.feature_dim)
            store.add_dense(NEIGHBOURS, p.k, torch.int64)
            store.add_dense(FEATURES, dim, torch.float16)
        self.neighbours_ready = False
        # What this epoch's refresh cost and did, logged by ``on_epoch_end`` (empty in epochs without one).
        self.refresh_log: dict[str, float] = {}
        # refresh_from=steps: samples this rank's steps recorded since the last refresh (not checkpointed:
        # a resumed run logs the share of the epoch's steps after the resume)
        self.recorded = 0

    # ---- epochs ------------------------------------------------------------------------------------------

    def _in_mix(self, epoch: int) -> bool:
        return epoch >= self.params.warmup_epochs

    def _nn_phase(self, epoch: int) -> bool:
        return self._in_mix(epoch) and epoch >= self.params.mixup_epochs

    def _ema_epoch(self, epoch: int) -> bool:
        return self._nn_phase(epoch) and epoch % self.params.ema_every == 0

    def on_epoch_start(self, epoch: int) -> None:
        self.epoch = epoch
        self.refresh_log = {}
        if self._in_mix(epoch):
            self.refresh(epoch)

    def on_epoch_end(self, epoch: int) -> dict[str, float]:
        """The epoch's refresh: seconds per part (``refresh_*_seconds``; the loop's ``train_seconds`` is the
        steps' time after it) and, in global mode, what the index needed (``knn_*``)."""
        return dict(self.refresh_log)

    def _from_steps(self, epoch: int) -> bool:
        """Whether this epoch's refresh reads what the previous epoch's steps recorded (no pass): they did
        when that epoch was a neighbour epoch. A function of the epoch, so a resumed run decides the same."""
        return self.params.refresh_from == "steps" and self.soft_ready and self._nn_phase(epoch - 1)

    @torch.no_grad()
    def refresh(self, epoch: int) -> None:
        """The epoch's losses and features (a whole-split pass, or the previous epoch's steps), GMM and
        (global mode, neighbour phase) index refresh; collective."""
        ctx, store, p = self.ctx, self.ctx.sample_store, self.params
        assert store is not None and ctx.iter_split is not None
        started = time.perf_counter()
        from_steps = self._from_steps(epoch)
        if from_steps:
            my_ids, my_feats, log = self._recorded()
        else:
            my_ids, my_feats = self._pass(fit_batchnorm=epoch == 0)
            log = {}
        self.recorded = 0
        passed = time.perf_counter()
        # Every rank now holds every loss; rank 0 fits the GMM and writes every p (others write no rows).
        if ctx.rank == 0:
            everyone = store.sample_ids
            prob = clean_probability(store.gather(LOSS, everyone).numpy(), ctx.cfg.run.seed, p)
            store.scatter(CLEAN, everyone, torch.from_numpy(prob))
        else:
            store.scatter(CLEAN, torch.zeros(0, dtype=torch.int64), torch.zeros(0))
        fitted = time.perf_counter()
        log |= {"refresh_pass_seconds": passed - started, "refresh_gmm_seconds": fitted - passed}
        if p.neighbors == "global" and self._nn_phase(epoch):
            neighbours, index_log = self._search(epoch, my_ids, my_feats)
            searched = time.perf_counter()
            # The steps' mixing inputs: each sample's neighbours and their features, read from the store.
            store.scatter(NEIGHBOURS, my_ids, neighbours)
            if not from_steps:  # the recorded features are in the store already
                store.scatter(FEATURES, my_ids, my_feats)
            self.neighbours_ready = True
            log |= index_log | {
                "refresh_index_seconds": searched - fitted,
                "refresh_compose_seconds": time.perf_counter() - searched,
            }
        self.refresh_log = log | {"refresh_seconds": time.perf_counter() - started}

    def _recorded(self) -> tuple[Tensor, Tensor, dict[str, float]]:
        """This rank's share of the store's ids and their recorded features (losses are read by the GMM), and
        the share of the split the previous epoch's steps recorded (the rest keep older values)."""
        store, ctx = self.ctx.sample_store, self.ctx
        assert store is not None
        start, stop = partition(len(store), ctx.rank, world_size())
        my_ids = torch.as_tensor(np.array(store.sample_ids[start:stop]), dtype=torch.int64)
        if self.params.neighbors == "global":
            my_feats = store.gather(FEATURES, my_ids).float()
        else:
            my_feats = torch.zeros(0, int(self.main.net.feature_dim))
        count = torch.tensor([float(self.recorded)], device=ctx.device)
        all_reduce_sum_([count])
        fraction = float(count.item()) / max(len(store), 1)
        return my_ids, my_feats, {"refresh_from_steps": 1.0, "refresh_recorded_fraction": fraction}

    def _pass(self, *, fit_batchnorm: bool) -> tuple[Tensor, Tensor]:
        """The whole-split pass over this rank's share: writes the losses into the store (and initialises the
        soft labels at the first refresh); returns the share's ids and features. ``fit_batchnorm``: the
        network has not trained yet (``warmup_epochs`` 0), so BatchNorm's running statistics are set from the
        split first (``_fit_batchnorm``)."""
        ctx, store = self.ctx, self.ctx.sample_store
        assert store is not None and ctx.iter_split is not None
        if fit_batchnorm:
            self._fit_batchnorm()
        ids, labels, losses, feats = [], [], [], []
        with evaluating(self.main.net):
            for batch in ctx.iter_split("train"):
                logits, features = self.main.net(batch.x.to(ctx.device))
                ids.append(batch.sample_id.cpu())
                labels.append(batch.y.cpu())
                feats.append(features.float().cpu())
                losses.append(logits.float().cpu())  # logits for now: the labels may be initialised below
        dim = int(self.main.net.feature_dim)
        my_ids = torch.cat(ids) if ids else torch.zeros(0, dtype=torch.int64)
        my_labels = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.int64)
        my_feats = torch.cat(feats) if feats else torch.zeros(0, dim)
        my_logits = torch.cat(losses) if losses else torch.zeros(0, ctx.num_classes)
        if not self.soft_ready:  # the first refresh: soft labels = one-hot given labels
            store.scatter(SOFT, my_ids, F.one_hot(my_labels, ctx.num_classes).float())
            self.soft_ready = True
        corrected = store.gather(SOFT, my_ids).argmax(dim=1)
        my_loss = F.cross_entropy(my_logits, corrected, reduction="none")
        store.scatter(LOSS, my_ids, my_loss)
        return my_ids, my_feats

    def _fit_batchnorm(self) -> None:
        """BatchNorm's running statistics from a training-mode pass over this rank's share of the split,
        averaged over the ranks.

        Why: an initialised network's running statistics are BatchNorm's defaults (mean 0, variance 1), not
        its features' statistics, so an eval-mode pass before any step stores neighbour features on another
        scale than the training-mode forward they are mixed into (ResNet-32: hundreds of times larger), and a
        run whose first epoch already mixes neighbours diverged within a few steps.
        """
        net, ctx = self.main.net, self.ctx
        assert ctx.iter_split is not None
        batchnorm = nn.modules.batchnorm._BatchNorm
        norms = [m for m in net.modules() if isinstance(m, batchnorm) and m.track_running_stats]
        if not norms:
            return
        update_bn((batch.x.to(ctx.device) for batch in ctx.iter_split("train")), net)
        all_reduce_mean_([stat for m in norms for stat in (m.running_mean, m.running_var)])

    def _search(self, epoch: int, ids: Tensor, feats: Tensor) -> tuple[Tensor, dict[str, float]]:
        """This rank's ids' k neighbours from the index refreshed for version ``epoch``, and what that took:
        the version, the attempts, whether some rank had to configure the index (the run's first refresh,
        or the first after Ray restarted the actor); collective."""
        handle = self.ctx.services[SERVICE]
        ids_np, feats_np = ids.numpy(), feats.numpy().astype(np.float32)
        store = self.ctx.sample_store
        assert store is not None
        configured = False
        for attempt in range(1, INDEX_ATTEMPTS + 1):
            if hasattr(handle, "configure") and not call_service(handle, "configured"):
                call_service(handle, "configure", store.sample_ids, int(feats.shape[1]))
                configured = True
            try:
                # ignored if this version is already built
                call_service(handle, "add", epoch, ids_np, feats_np)
                added = True
            except IndexNotReadyError:
                added = False
            # all-reduced: also the barrier "every rank has added" before rank 0 builds
            if _all_ok(added, self.ctx.device) and self.ctx.rank == 0:
                # idempotent by version; if it fails, every rank's search below fails and all retry together
                with contextlib.suppress(IndexNotReadyError):
                    call_service(handle, "build", epoch)
            _barrier()
            result = None
            try:
                found, _ = call_service(
                    handle, "search_ids", ids_np, self.params.k, exclude_self=True, version=epoch
                )
                result = torch.as_tensor(np.asarray(found), dtype=torch.int64)
                ok = bool((result >= 0).all())  # -1: an approximate search could not fill the row
            except IndexNotReadyError:
                ok = False
            if _all_ok(ok, self.ctx.device):
                assert result is not None
                # Which rank configured is a race; that some rank did is the same fact on every rank.
                reconfigured = not _all_ok(not configured, self.ctx.device)
                return result, {
                    "knn_index_version": float(epoch),
                    "knn_index_attempts": float(attempt),
                    "knn_index_configured": float(reconfigured),
                }
        raise RuntimeError(
            f"mixnn: the knn index was not ready for epoch {epoch} after {INDEX_ATTEMPTS} tries"
        )

    # ---- steps -------------------------------------------------------------------------------------------

    def train_step(self, batch: Batch, trusted: Batch | None) -> dict[str, float]:
        if not self._in_mix(self.epoch):
            return self.main.cross_entropy_step(batch.x, batch.y)
        if not self._nn_phase(self.epoch):
            return self._mixup_step(batch)
        return self._neighbour_step(batch)

    def _soft(self, ids: Tensor) -> Tensor:
        assert self.ctx.sample_store is not None
        return self.ctx.sample_store.gather(SOFT, ids, self.ctx.device)

    def _mixup_step(self, batch: Batch) -> dict[str, float]:
        alpha = self.params.mixup_alpha
        lam = float(self.rng.beta(alpha, alpha))
        perm = torch.from_numpy(self.rng.permutation(len(batch))).to(batch.x.device)
        soft = self._soft(batch.sample_id)
        if batch.x.is_floating_point():
            logits, _ = self.main.model(lam * batch.x + (1 - lam) * batch.x[perm])
        else:  # token ids: mix the pooled features instead
            weights = torch.tensor([lam, 1 - lam], device=batch.x.device).expand(len(batch), 2)
            _, _, logits = self.main.model(batch.x, weights=weights, partners=perm[:, None])
        if self.params.mixup_loss == "prob":
            probs = F.softmax(logits, dim=1)
            per = lambda s: -(s * probs).sum(dim=1)  # noqa: E731 - the reference's nll_loss on probabilities
        else:
            per = lambda s: soft_cross_entropy(logits, s)  # noqa: E731
        loss = (lam * per(soft) + (1 - lam) * per(soft[perm])).mean()
        self.main.step(loss)
        return {"loss": float(loss.detach()), "lambda": lam}

    def _neighbour_step(self, batch: Batch) -> dict[str, float]:
        store, p, device = self.ctx.sample_store, self.params, self.ctx.device
        assert store is not None
        ids = batch.sample_id
        soft = self._soft(ids)
        p_self = store.gather(CLEAN, ids, device).reshape(-1)
        if p.neighbors == "global":
            nbr_ids = store.gather(NEIGHBOURS, ids)  # [B, k] on the host
            flat = nbr_ids.reshape(-1)
            nbr_feats = store.gather(FEATURES, flat, device).reshape(len(ids), p.k, -1)
            p_nbr = store.gather(CLEAN, flat, device).reshape(len(ids), p.k)
            nbr_soft = store.gather(SOFT, flat, device).reshape(len(ids), p.k, -1)
            weights = mixing_weights(p_self, p_nbr)
            logits_ori, features, mixed_logits = self.main.model(batch.x, nbr_feats, weights)
        else:
            with torch.no_grad():
                logits_ori, features = self.main.model(batch.x)
            distances = torch.cdist(features.float(), features.float())
            distances.fill_diagonal_(float("inf"))
            nearest = distances.topk(p.k, dim=1, largest=False).indices  # [B, k] batch positions
            weights = mixing_weights(p_self, p_self[nearest])
            if batch.x.is_floating_point():
                shape = [1] * (batch.x.dim() - 1)
                x = weights[:, 0].view(-1, *shape) * batch.x
                x = x + (weights[:, 1:].view(*nearest.shape, *shape) * batch.x[nearest]).sum(1)
                mixed_logits, _ = self.main.model(x)
            else:  # token ids: mix the pooled features of this forward instead
                _, _, mixed_logits = self.main.model(batch.x, weights=weights, partners=nearest)
            nbr_soft = soft[nearest]
        targets = torch.cat([soft.unsqueeze(1), nbr_soft], dim=1)  # [B, 1 + k, C]
        log_probs = F.log_softmax(mixed_logits, dim=1).unsqueeze(1)
        loss = (weights * -(targets * log_probs).sum(dim=2)).sum(dim=1).mean()
        self.main.step(loss)
        if p.refresh_from == "steps":
            self._record(ids, soft, logits_ori.detach(), features.detach())
        if self._ema_epoch(self.epoch):
            new = ema_update(soft, F.softmax(logits_ori.detach().float(), dim=1), p.ema_momentum)
            store.scatter(SOFT, ids, new)  # a collective: every rank updates in every step of the epoch
        return {"loss": float(loss.detach()), "mean_weight_self": float(weights[:, 0].mean())}

    def _record(self, ids: Tensor, soft: Tensor, logits: Tensor, features: Tensor) -> None:
        """refresh_from=steps: the un-mixed forward's loss against the step's corrected labels and (global
        mode) its features, for the next refresh; collective, like every store write of a step."""
        store = self.ctx.sample_store
        assert store is not None
        loss = F.cross_entropy(logits.float(), soft.argmax(dim=1), reduction="none")
        store.scatter(LOSS, ids, loss)
        if self.params.neighbors == "global":
            store.scatter(FEATURES, ids, features.half())
        self.recorded += len(ids)

    # ---- export, state -----------------------------------------------------------------------------------

    def per_sample_outputs(self, batch: Batch) -> dict[str, np.ndarray]:
        store = self.ctx.sample_store
        assert store is not None
        if self.soft_ready:
            soft = store.gather(SOFT, batch.sample_id)
        else:
            soft = F.one_hot(batch.y.cpu(), self.ctx.num_classes).float()
        columns = corrected_label_columns(batch, soft)
        columns["clean_probability"] = store.gather(CLEAN, batch.sample_id).reshape(-1).numpy()
        return columns

    def eval_model(self) -> nn.Module:
        return self.main.net

    def current_lr(self) -> float:
        return self.main.lr

    def state_dict(self) -> dict[str, Any]:
        return {
            "main": self.main.state_dict(),
            "rng": self.rng.bit_generator.state,
            "soft_ready": self.soft_ready,
            "neighbours_ready": self.neighbours_ready,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.main.load_state_dict(state["main"])
        self.rng.bit_generator.state = state["rng"]
        self.soft_ready = bool(state["soft_ready"])
        self.neighbours_ready = bool(state["neighbours_ready"])
