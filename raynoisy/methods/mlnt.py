"""MLNT, "Learning to Learn from Noisy Labeled Data" (Li, Wong, Zhao, Kankanhalli, CVPR 2019;
LiJunnan1992/MLNT ``main.py``). No trusted set.

Three networks: the student (trained), an EMA teacher of the student (consistency targets, and with
``evaluate="teacher"``, the default, the model evaluated, selected and exported once it exists) and a
frozen mentor (whose features pick the synthetic labels). Per step on a batch (x, ỹ), after ``start_iter``
plain cross-entropy steps of the round:

1. teacher ← copy of the student at a round's first meta step, else θ_tch ← γ·θ_tch + (1-γ)·θ over the
   parameters (γ = ``ema_decay_warmup`` 0.99 until ``mid_iter``, then ``ema_decay`` 0.999); targets
   p_tch = softmax(teacher(x)) (train mode, as the reference; its running statistics are its own);
2. M = ``synthetic_sets`` (10) synthetic label sets: for each, a random round(ρ·B) of the batch (ρ =
   ``perturb_ratio`` 0.5) take the given label of a uniformly random one of their k = ``neighbors`` (10)
   nearest other samples of the batch, by squared Euclidean distance of the mentor's features. Neighbour
   labels are read from ỹ, not from the partly perturbed copy; a perturbed label may equal the old one.
   This is main.py:97-107 (``topk(k+1, largest=False)``, index 0 = the sample itself skipped,
   ``random.randint(1, k)``); here the sample is excluded explicitly, so a duplicate cannot stand in for it;
3. per set m, one SGD look-ahead θ'_m = θ - α·∇CE(f(x; θ), ỹ_m) (α = ``inner_lr`` 0.02, no momentum or
   weight decay), all M gradients from the SAME forward, as the reference;
4. meta loss = w/M · Σ_m KL(p_tch ‖ f(x; θ'_m)) with the KL averaged over all B·C elements (the reference's
   ``nn.KLDivLoss()``); w ramps as w·exp(-5(1-u)²), u = (t - start_iter)/(mid_iter - start_iter), full
   from ``mid_iter`` (main.py:76-81);
5. ONE SGD step (the real optimizer: momentum, weight decay, schedule) on ∇CE(θ; ỹ) + ∇_θ meta loss, as the
   reference (main.py:131); the paper's two successive updates differ from it at second order in lr.

``second_order`` (default True, the current reference: since PR #10 its ``grad.detach()`` no longer detaches):
d/dθ Σ_m KL(θ - α g_m(θ)) = Σ_m (I - α H_m) v_m, with v_m the KL gradient at θ'_m and H_m the Hessian of
set m's CE; the Hessian-vector products come from one double backward through the M inner gradients.
First order (the 2018 reference): Σ_m v_m.

Distributed: the meta-gradient is the hypergradient of the GLOBAL batch, never a mean of per-rank
look-aheads. Mentor features, labels and keep flags are all-gathered (B·(d+2) floats), so every rank draws
the same synthetic labels for the global batch from the same generator (``run.seed``, checkpointed) and
keeps its own rows: "in-batch" neighbours are neighbours in the global batch. The per-rank losses are sums
divided by the global count, so the inner gradients g_m (all M + the CE one, one flattened all-reduce)
sum to the global ones; every rank steps to the same θ'_m; v_m is summed over ranks, and the
Hessian-vector products H_m·v̄_m are linear in the per-rank Hessians, so they are summed too. First order
all-reduces (M+1)·P + P numbers per step, second order (M+1)·P + M·P + P (P = parameters). Student and
teacher parameters stay bit-identical; running statistics are per rank until ``on_evaluated`` averages
those of both networks (the loop's evaluation averages only ``eval_model()``'s).

BatchNorm: the student's real forward moves its running statistics once per step; the M look-ahead
forwards see buffer copies (the reference's functional forward updates the student's buffers M more times
per step). The teacher starts as a copy of the student's parameters AND buffers (the reference copies only
parameters and keeps the buffers of a fresh pretrained network).

``vmap``: the M inner gradients as one batched backward (``is_grads_batched``) and the M look-ahead
forwards as one ``torch.func.vmap`` over stacked weights, or both as loops (default). Same numbers. On
CPU the loops are faster (small-cnn, batch 128 at 28x28: vmap costs ~1.3x the loop's step first order and
~3x second order: grouped convolutions, and a double backward through a batched backward); batching is
meant for accelerators, where a small network's step is bound by kernel launches.

``consistency_weight: 0`` skips the look-aheads, which move nothing at weight 0: each step after
``start_iter`` updates the teacher and takes the CE step (``_teacher_step``), the ablation "CE with an EMA
teacher" at about a CE step's cost.

Rounds (``rounds``, the paper's iterative training, automated; the reference runs main.py again by hand):
one stage per round, ``round0`` ... , each ``optim.epochs`` epochs. Round 0's mentor is the teacher
itself (its features come with the teacher forward of step 1; the reference uses a separately trained CE
model). At the start of round i > 0 the previous round's best-validation model becomes the mentor (frozen,
eval mode), the student's start and the teacher's; the optimizer and lr schedule restart, and so do the
warm-up counters (the teacher is re-copied at the round's first meta step, as a fresh reference run does).
``filter_disagreeing``: a whole-split pass with the new mentor marks every training sample whose given
label differs from the mentor's prediction in the per-sample store (column ``mlnt_filtered``, uint8,
identical on every rank and checkpointed with it; each round's mentor marks afresh); marked samples are
left out of the round's steps: out of the CE and consistency losses (weights 0, means over the kept samples
of the global batch) and out of the neighbour pool. They still pass through the forward, so BatchNorm
statistics see the batch as it is. The paper's exact filtering rule is not in the reference code; this is
the plain "mentor disagrees" reading.

The step counter t counts steps since the round's start, across epochs (the reference's ``batch_idx``
restarts every epoch but it trains one epoch per round); meta steps run from t = ``start_iter`` on (the
reference: t > start_iter). The defaults are the reference's Clothing1M values; data sets with short
rounds set start_iter/mid_iter in their presets.

Export ``corrected_labels.parquet``: argmax and max of the softmax of ``eval_model()`` (the teacher once
the meta steps have started, else the student), eval mode; with filtering, also ``filtered``.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap

from raynoisy.config import Config
from raynoisy.errors import ConfigError
from raynoisy.meta import all_reduce_mean_, all_reduce_sum_, functional_forward, world_size
from raynoisy.methods import register_method
from raynoisy.methods.base import Batch, Method, MethodContext, Stage
from raynoisy.methods.meta_common import (
    CorrectedLabelExport,
    check_param,
    corrected_label_columns,
    evaluating,
)
from raynoisy.methods.supervised import MainModel

# Per-sample store column: 1 for a sample the current mentor disagrees with (filter_disagreeing).
FILTER_COLUMN = "mlnt_filtered"
ROUND_PREFIX = "round"
# Which network is evaluated, selected and exported (``evaluate``).
EVALUATED = ("teacher", "student")


@dataclass
class MLNTParams:
    """Reference defaults (main.py, Clothing1M); reference names in brackets.

    synthetic_sets M [num_fast], perturb_ratio ρ [perturb_ratio], neighbors k [hard-coded 10], inner_lr α
    [meta_lr; MetaLabelNet's re-implementation uses 0.2], consistency_weight [alpha], start_iter/mid_iter
    [start_iter/mid_iter], ema_decay_warmup/ema_decay [eps 0.99 -> 0.999].
    """

    synthetic_sets: int = 10
    perturb_ratio: float = 0.5
    neighbors: int = 10
    inner_lr: float = 0.02
    consistency_weight: float = 1.0
    start_iter: int = 500
    mid_iter: int = 2000
    ema_decay_warmup: float = 0.99
    ema_decay: float = 0.999
    second_order: bool = True
    vmap: bool = False
    rounds: int = 1
    filter_disagreeing: bool = False
    evaluate: str = "teacher"

    def __post_init__(self) -> None:
        check_param(
            self.synthetic_sets >= 1, "synthetic_sets", f"must be >= 1, got {self.synthetic_sets}", "e.g. 10"
        )
        check_param(
            0.0 <= self.perturb_ratio <= 1.0,
            "perturb_ratio",
            f"must be in [0, 1], got {self.perturb_ratio}",
            "the share of a batch whose labels a synthetic set changes, e.g. 0.5",
        )
        check_param(self.neighbors >= 1, "neighbors", f"must be >= 1, got {self.neighbors}", "e.g. 10")
        check_param(self.inner_lr > 0, "inner_lr", f"must be > 0, got {self.inner_lr}", "e.g. 0.02")
        check_param(
            self.consistency_weight >= 0, "consistency_weight", "must be >= 0", "the reference uses 1"
        )
        check_param(self.start_iter >= 0, "start_iter", f"must be >= 0, got {self.start_iter}", "e.g. 500")
        check_param(
            self.mid_iter >= self.start_iter,
            "mid_iter",
            f"must be >= start_iter ({self.start_iter}), got {self.mid_iter}",
            "the consistency weight ramps up from start_iter to mid_iter",
        )
        for name in ("ema_decay_warmup", "ema_decay"):
            value = getattr(self, name)
            check_param(0.0 <= value <= 1.0, name, f"must be in [0, 1], got {value}", "e.g. 0.99 / 0.999")
        check_param(
            self.evaluate in EVALUATED,
            "evaluate",
            f"unknown model {self.evaluate!r}",
            "use teacher (the paper's reported model) or student",
        )
        check_param(self.rounds >= 1, "rounds", f"must be >= 1, got {self.rounds}", "the paper uses 3")
        check_param(
            not self.filter_disagreeing or self.rounds >= 2,
            "filter_disagreeing",
            "filters with the previous round's model, and a single round has none",
            "set method.params.rounds=2 or more, or leave filter_disagreeing off",
        )


def consistency_schedule(step: int, p: MLNTParams) -> tuple[float, float] | None:
    """(consistency weight, EMA decay) at step ``step`` of a round, or None for a plain CE step."""
    if step < p.start_iter:
        return None
    if step >= p.mid_iter:
        return p.consistency_weight, p.ema_decay
    u = (step - p.start_iter) / (p.mid_iter - p.start_iter)
    return p.consistency_weight * math.exp(-5.0 * (1.0 - u) ** 2), p.ema_decay_warmup


def synthetic_labels(
    features: Tensor,
    labels: Tensor,
    *,
    sets: int,
    ratio: float,
    neighbors: int,
    generator: torch.Generator,
    keep: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """M synthetic label sets for a batch: ([M, B] labels, [M, B] bool mask of the perturbed positions).

    Only samples with ``keep`` (all by default) are perturbed or serve as neighbours. In each set,
    round(ratio·n) of the n kept samples (a uniformly random choice) take the label of a uniformly random
    one of their ``neighbors`` nearest other kept samples (fewer if the batch has fewer), by Euclidean
    distance of ``features``. Random draws come from ``generator`` (CPU), so ranks holding the same
    generator state draw the same sets.
    """
    size = len(labels)
    out = labels.unsqueeze(0).repeat(sets, 1)
    perturbed = torch.zeros(sets, size, dtype=torch.bool, device=labels.device)
    pool = torch.arange(size) if keep is None else keep.detach().cpu().bool().nonzero().flatten()
    n = len(pool)
    k = min(neighbors, n - 1)
    count = round(ratio * n)
    if k < 1 or count == 0:
        return out, perturbed
    feats = features.detach()[pool.to(features.device)]
    distances = torch.cdist(feats, feats, compute_mode="donot_use_mm_for_euclid_dist")
    distances.fill_diagonal_(float("inf"))
    nearest = distances.topk(k, dim=1, largest=False).indices.cpu()  # [n, k] positions in the pool
    anchors = torch.stack([torch.randperm(n, generator=generator)[:count] for _ in range(sets)])
    picks = torch.randint(0, k, (sets, count), generator=generator)
    sources = nearest[anchors, picks]  # [M, count] pool positions of the chosen neighbours
    rows = torch.arange(sets).unsqueeze(1).expand(sets, count).to(labels.device)
    anchor_ids, source_ids = pool[anchors].to(labels.device), pool[sources].to(labels.device)
    out[rows, anchor_ids] = labels[source_ids]
    perturbed[rows, anchor_ids] = True
    return out, perturbed


def gather_rows(t: Tensor) -> Tensor:
    """All ranks' ``t`` ([b, ...], the same b on every rank) concatenated in rank order; ``t`` on one rank."""
    world = world_size()
    if world == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def round_index(stage: Stage) -> int:
    return int(stage.name.removeprefix(ROUND_PREFIX))


def _frozen(net: nn.Module) -> nn.Module:
    frozen = copy.deepcopy(net).eval().requires_grad_(False)
    frozen.zero_grad(set_to_none=True)
    return frozen


@register_method
class MLNT(CorrectedLabelExport, Method):
    name = "mlnt"
    Params = MLNTParams

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        p = cls.parse_params(cfg.method.params)
        workers = cfg.scaling.workers
        pool = (cfg.optim.batch_size // workers) * workers
        if p.neighbors >= pool:
            raise ConfigError(
                "method.params.neighbors",
                f"{p.neighbors} neighbours need more than {p.neighbors} samples per batch; they come from "
                f"the global batch of {pool} ({workers} workers x {cfg.optim.batch_size // workers})",
                f"use neighbors < {pool} or a larger --batch-size",
            )

    @classmethod
    def stages(cls, cfg: Config) -> list[Stage]:
        """One stage per round, each ``optim.epochs`` long; round i > 0 starts from round i-1's best model."""
        rounds = cls.parse_params(cfg.method.params).rounds
        return [Stage(f"{ROUND_PREFIX}{i}", cfg.optim.epochs, init_from_best=i > 0) for i in range(rounds)]

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        self.check_config(ctx.cfg)
        self.main = MainModel(ctx, ddp=False)
        self.teacher = _frozen(self.main.net).train()
        self.mentor: nn.Module | None = None  # round 0: the teacher's own features
        self.generator = torch.Generator().manual_seed(ctx.cfg.run.seed)
        self.round = 0
        self.round_step = 0
        self.teacher_ready = False
        if self.params.filter_disagreeing:
            assert ctx.sample_store is not None, "filter_disagreeing needs the per-sample store"
            ctx.sample_store.add_dense(FILTER_COLUMN, 1, torch.uint8)

    # ---- stages ----------------------------------------------------------------------------------------

    def on_stage_start(self, stage: Stage, best_model_state: dict[str, Tensor] | None) -> dict[str, float]:
        """A new round: the previous round's best model becomes mentor, student and teacher; the optimizer,
        schedule and warm-up restart; with ``filter_disagreeing`` the mentor marks the samples to skip.

        A no-op for round 0 and for a round already started (a resumed run), so resuming rebuilds nothing.
        """
        index = round_index(stage)
        if index <= self.round:
            return {}
        state = best_model_state if best_model_state is not None else self.eval_model().state_dict()
        student = self.main.net
        student.load_state_dict({k: v.to(self.ctx.device) for k, v in state.items()})
        # The loop's best model has the rank-averaged running statistics of its evaluation; any other state
        # (the harness hands over the last model) is averaged here: the mentor must be identical everywhere.
        all_reduce_mean_([b for b in student.buffers() if b.is_floating_point()])
        self.teacher.load_state_dict(student.state_dict())
        self.mentor = _frozen(student)
        self.main.reset_optimizer()
        self.round, self.round_step, self.teacher_ready = index, 0, False
        if not self.params.filter_disagreeing:
            return {}
        return {"filtered_fraction": self._filter_disagreeing()}

    @torch.no_grad()
    def _filter_disagreeing(self) -> float:
        """Mark every training sample whose given label the mentor does not predict; the marked share."""
        store, mentor = self.ctx.sample_store, self.mentor
        assert mentor is not None and store is not None and self.ctx.iter_split is not None
        ids, flags = [torch.zeros(0, dtype=torch.int64)], [torch.zeros(0, dtype=torch.uint8)]
        for batch in self.ctx.iter_split("train"):
            predicted = mentor(batch.x.to(self.ctx.device))[0].argmax(dim=1)
            flags.append((predicted != batch.y.to(predicted.device)).to(torch.uint8).cpu())
            ids.append(batch.sample_id.cpu())
        store.scatter(FILTER_COLUMN, torch.cat(ids), torch.cat(flags))  # one collective per rank
        return float(store.gather(FILTER_COLUMN, store.sample_ids).float().mean())

    def _keep(self, batch: Batch) -> Tensor:
        """1.0 for the rows this step trains on, 0.0 for samples the mentor filtered out."""
        ones = torch.ones(len(batch), device=batch.y.device)
        if not (self.params.filter_disagreeing and self.round > 0):
            return ones
        assert self.ctx.sample_store is not None
        flags = self.ctx.sample_store.gather(FILTER_COLUMN, batch.sample_id, batch.y.device)
        return ones - flags.reshape(-1).float()

    # ---- steps -----------------------------------------------------------------------------------------

    def _weights(self) -> tuple[list[str], list[Tensor]]:
        named = [(n, p) for n, p in self.main.net.named_parameters() if p.requires_grad]
        return [n for n, _ in named], [p for _, p in named]

    def _apply(self, names: list[str], grads: list[Tensor]) -> None:
        by_name = dict(zip(names, grads, strict=True))
        self.main.apply_grads([by_name.get(n) for n, _ in self.main.net.named_parameters()])

    def train_step(self, batch: Batch, trusted: Batch | None) -> dict[str, float]:
        schedule = consistency_schedule(self.round_step, self.params)
        self.round_step += 1
        keep = self._keep(batch)
        if schedule is None:
            return self._plain_step(batch, keep)
        weight, decay = schedule
        if weight == 0.0:
            return self._teacher_step(batch, keep, decay)
        return self._meta_step(batch, keep, weight, decay)

    def _plain_step(self, batch: Batch, keep: Tensor) -> dict[str, float]:
        """Cross-entropy on the kept samples (the warm-up before ``start_iter``), synchronised by hand."""
        count = keep.sum()
        if self.params.filter_disagreeing:
            count = count.clone()
            all_reduce_sum_([count])
        else:
            count = count * world_size()
        logits, _ = self.main.net(batch.x)
        losses = F.cross_entropy(logits, batch.y, reduction="none")
        loss = (losses * keep).sum() / count.clamp_min(1.0)
        names, weights = self._weights()
        grads = list(torch.autograd.grad(loss, weights, allow_unused=True, materialize_grads=True))
        value = loss.detach().clone()
        all_reduce_sum_([*grads, value])
        self._apply(names, grads)
        return {"loss": float(value)}

    def _teacher_step(self, batch: Batch, keep: Tensor, decay: float) -> dict[str, float]:
        """A meta step at consistency weight 0 without its look-aheads, which move nothing at that weight:
        the teacher follows the student (EMA, and a forward that moves its BatchNorm statistics as the meta
        step's does) and the student takes the CE step. ``consistency_weight: 0`` is thus the cheap ablation
        "CE with an EMA teacher", at a plain step's cost plus one no-grad forward."""
        self._update_teacher(decay)
        with torch.no_grad():
            self.teacher(batch.x)
        return self._plain_step(batch, keep) | {"consistency_weight": 0.0}

    @torch.no_grad()
    def _update_teacher(self, decay: float) -> None:
        student = self.main.net
        if not self.teacher_ready:
            self.teacher.load_state_dict(student.state_dict())
            self.teacher_ready = True
            return
        for t, s in zip(self.teacher.parameters(), student.parameters(), strict=True):
            t.mul_(decay).add_(s, alpha=1.0 - decay)

    def _meta_step(self, batch: Batch, keep: Tensor, weight: float, decay: float) -> dict[str, float]:
        p, net = self.params, self.main.net
        x, y = batch.x, batch.y
        sets, local = p.synthetic_sets, len(batch)
        self._update_teacher(decay)
        with torch.no_grad():
            teacher_logits, teacher_features = self.teacher(x)
            target = F.softmax(teacher_logits, dim=1)
            features = teacher_features if self.mentor is None else self.mentor(x)[1]
        # The global batch's mentor features, labels and keep flags, so that every rank draws the same sets.
        rows = torch.cat([features.float().flatten(1), y[:, None].float(), keep[:, None]], dim=1)
        everything = gather_rows(rows)
        all_labels = everything[:, -2].round().long()
        all_keep = everything[:, -1]
        fake, _ = synthetic_labels(
            everything[:, :-2],
            all_labels,
            sets=sets,
            ratio=p.perturb_ratio,
            neighbors=p.neighbors,
            generator=self.generator,
            keep=all_keep > 0.5,
        )
        start = self.ctx.rank * local if world_size() > 1 else 0
        fake = fake[:, start : start + local]
        scale = keep / all_keep.sum().clamp_min(1.0)  # sum over the global batch / kept count = the mean

        names, weights = self._weights()
        logits, _ = net(x)  # the real forward: BatchNorm statistics move once per step
        classes = logits.shape[1]
        probs = F.softmax(logits if p.second_order else logits.detach(), dim=1)
        onehot = F.one_hot(torch.cat([y[None], fake]), classes).to(probs.dtype)
        delta = (probs[None] - onehot) * scale[None, :, None]  # ∂(CE of each set)/∂logits, [M+1, b, C]
        ce = (F.cross_entropy(logits.detach(), y, reduction="none") * scale).sum()

        # g_0 (the given labels) and g_1..g_M (the synthetic sets) through the one forward.
        graph_grads = self._inner_grads(logits, weights, delta)
        grads = [g.detach().clone() for g in graph_grads]
        all_reduce_sum_([*grads, ce])

        fast = {
            n: (w.detach().unsqueeze(0) - p.inner_lr * g[1:]).requires_grad_()
            for n, w, g in zip(names, weights, grads, strict=True)
        }
        fast_logits = self._fast_logits(x, fast)  # [M, b, C]
        kl = F.kl_div(F.log_softmax(fast_logits, dim=2), target.expand_as(fast_logits), reduction="none")
        consistency_loss = (kl.sum(dim=2) * scale).sum() / (sets * classes)  # mean over sets and B·C
        v = list(
            torch.autograd.grad(
                consistency_loss * weight, list(fast.values()), allow_unused=True, materialize_grads=True
            )
        )
        consistency = consistency_loss.detach().clone()
        if p.second_order:
            all_reduce_sum_([*v, consistency])
            # Σ_m H_m v̄_m on this rank's share; the global one is their sum (Hessians add over ranks).
            hvp = torch.autograd.grad(
                [g[1:] for g in graph_grads], weights, v, allow_unused=True, materialize_grads=True
            )
            hvp = list(hvp)
            all_reduce_sum_(hvp)
            meta = [vm.sum(dim=0) - p.inner_lr * h for vm, h in zip(v, hvp, strict=True)]
        else:
            meta = [vm.sum(dim=0) for vm in v]
            all_reduce_sum_([*meta, consistency])
        self._apply(names, [g[0] + m for g, m in zip(grads, meta, strict=True)])
        return {
            "loss": float(ce),
            "consistency": float(consistency),
            "consistency_weight": weight,
        }

    def _inner_grads(self, logits: Tensor, weights: list[Tensor], delta: Tensor) -> list[Tensor]:
        """J^T δ_j for each δ_j of ``delta`` [J, b, C], as [J, *shape] per weight (graph if second order)."""
        second = self.params.second_order
        if self.params.vmap:
            grads = torch.autograd.grad(
                logits,
                weights,
                delta,
                retain_graph=True,
                create_graph=second,
                is_grads_batched=True,
                allow_unused=True,
                materialize_grads=True,
            )
            return list(grads)
        per_set = [
            torch.autograd.grad(
                logits,
                weights,
                d,
                retain_graph=True,
                create_graph=second and j > 0,
                allow_unused=True,
                materialize_grads=True,
            )
            for j, d in enumerate(delta)
        ]
        return [torch.stack(g) for g in zip(*per_set, strict=True)]

    def _fast_logits(self, x: Tensor, fast: dict[str, Tensor]) -> Tensor:
        """Logits at each set's fast weights, [M, b, C]; the forwards see copies of the running statistics."""
        net, sets = self.main.net, self.params.synthetic_sets
        if self.params.vmap:
            buffers = {
                n: b.detach().unsqueeze(0).repeat(sets, *([1] * b.dim())) for n, b in net.named_buffers()
            }
            return vmap(lambda w, b: functional_call(net, (w, b), (x,))[0])(fast, buffers)
        return torch.stack(
            [functional_forward(net, {n: w[m] for n, w in fast.items()}, x)[0] for m in range(sets)]
        )

    # ---- evaluation, export, checkpoints -----------------------------------------------------------------

    def on_evaluated(self, epoch: int, metrics: dict[str, float]) -> None:
        """Average both networks' running statistics over ranks (evaluation averaged only eval_model's)."""
        self.average_running_stats()

    def average_running_stats(self) -> None:
        nets = (self.main.net, self.teacher)
        all_reduce_mean_([b for net in nets for b in net.buffers() if b.is_floating_point()])

    def eval_model(self) -> nn.Module:
        """``evaluate="teacher"``: the teacher once this round's meta steps have started (the paper reports
        the teacher; the reference keeps whichever of the two validates better), else the student."""
        teacher = self.params.evaluate == "teacher" and self.teacher_ready
        return self.teacher if teacher else self.main.net

    def current_lr(self) -> float:
        return self.main.lr

    def per_sample_outputs(self, batch: Batch) -> dict[str, np.ndarray]:
        model = self.eval_model()
        with evaluating(model):
            soft = F.softmax(model(batch.x)[0], dim=1)
        columns = corrected_label_columns(batch, soft)
        if self.params.filter_disagreeing:
            assert self.ctx.sample_store is not None
            flags = self.ctx.sample_store.gather(FILTER_COLUMN, batch.sample_id)
            columns["filtered"] = flags.reshape(-1).bool().numpy()
        return columns

    def state_dict(self) -> dict[str, Any]:
        return {
            "main": self.main.state_dict(),
            "teacher": self.teacher.state_dict(),
            "mentor": None if self.mentor is None else self.mentor.state_dict(),
            "round": self.round,
            "round_step": self.round_step,
            "teacher_ready": self.teacher_ready,
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.main.load_state_dict(state["main"])
        self.teacher.load_state_dict(state["teacher"])
        self.mentor = None
        if state["mentor"] is not None:
            self.mentor = _frozen(self.main.net)
            self.mentor.load_state_dict(state["mentor"])
        self.round = int(state["round"])
        self.round_step = int(state["round_step"])
        self.teacher_ready = bool(state["teacher_ready"])
        self.generator.set_state(state["generator"])
