"""What the trusted-set meta methods (``mwnet``, ``mlc``, ``metalabelnet``) share.

- ``TrustedMetaMethod``: the main model, the trusted stream, evaluation, the meta optimizer step,
  amortised meta updates (``TrustedMetaParams.meta_every``: a meta update every k-th step, plain steps
  between), and the collapse guard (``raynoisy.methods.collapse_guard``) read after every epoch.
- ``lookahead_optimizer``: which update rule the one-step look-ahead follows; ``real_step_through_outputs``:
  the real step after a meta update, through the meta step's training forward; ``step_through_outputs``:
  a plain step between meta updates, with the meta model as it is.
- The per-sample export: corrected-label columns and the summaries that score them (and MW-Net's
  weights) as detectors of mislabelled samples against ``labels.parquet``.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from raynoisy.config import Config
from raynoisy.errors import ConfigError
from raynoisy.meta import ExampleAlignment, OutputHypergradient, OutputLoss, logit_gradient, output_grads
from raynoisy.meta.lookahead import Rule, unwrap_model
from raynoisy.methods.base import Batch, Method, MethodContext, Stage
from raynoisy.methods.collapse_guard import CollapseGuard, GuardParams, GuardReading
from raynoisy.methods.label_issues import detector_scores, ratio, true_labels_of
from raynoisy.methods.supervised import MainModel

# The soft label goes into the export only up to this many classes: for Clothing1M's 14 it is 14 floats
# per sample; for 1000 classes it would be 4 kB per sample for a column nobody reads whole.
SOFT_LABEL_MAX_CLASSES = 20
# Where a corrected_labels table's labels came from (its schema metadata; metrics.json's
# label_correction.source, which the report spells out): the method's own, or the best-validation model's
# through confident learning when the collapse guard ended the run falling back.
CORRECTION_SOURCE_KEY = b"raynoisy.corrected_labels.source"
FROM_METHOD = "method"
FROM_MODEL = "model"


def check_param(ok: bool, name: str, problem: str, fix: str) -> None:
    """Reject a bad ``method.params`` value while the config is validated, i.e. before Ray starts."""
    if not ok:
        raise ConfigError(f"method.params.{name}", problem, fix)


@dataclass
class TrustedMetaParams(GuardParams):
    """The parameters every trusted-set meta method shares (its ``Params`` derive from this): the collapse
    guard's limits (``GuardParams``) and ``meta_every``.

    ``meta_every`` = k: the meta network is updated (look-ahead, hypergradient, meta optimizer step, on a
    trusted batch) on steps 0, k, 2k, ... of the stage, counted from the stage's first step; the k - 1 steps
    between are plain steps with the meta network as it is. Users of the reference codes ask for this
    because the meta step costs several plain steps; 1 (the default) is the papers' algorithm, a meta
    update every step.

    ``plain_trusted_term`` (default on): a plain step is the real step without the meta update, so where
    the real step trains on trusted samples too (MLC's clean half; MW-Net with ``train_on_trusted``) the
    plain step reads a trusted batch and keeps that term. Off, plain steps train on the noisy batch alone
    and read no trusted batch: cheaper, but then the main model sees the trusted set only on every k-th
    step; MLC at k = 5 lost 6.9 points that way against the default at k = 5, 3.7 against k = 1
    (benchmarks/README.md, issue 13).

    ``trusted_batch_size``: trusted samples per step that reads a trusted batch (every meta update, and the
    plain steps that keep the trusted term) over all workers (split evenly between them); 0
    (the default) is ``optim.batch_size``, as in the papers. The hypergradient is linear in the trusted
    loss's gradient, so a smaller trusted batch gives an unbiased, noisier meta-gradient for less work:
    the trusted forward and backward at the looked-ahead weights shrink with it (MLC's clean half too).
    Where the real step trains on trusted samples, their term keeps the weight it has at the default size
    (``TrustedMetaMethod.trusted_rows_at_full_size``), so the step stays an unbiased estimate of the
    default one too, rather than one that weighs the trusted labels less.
    """

    meta_every: int = 1
    trusted_batch_size: int = 0
    plain_trusted_term: bool = True

    def __post_init__(self) -> None:
        check_param(
            self.meta_every >= 1,
            "meta_every",
            f"must be >= 1, got {self.meta_every}",
            "1 updates the meta network every step (the papers); k > 1 every k-th step",
        )
        check_param(
            self.trusted_batch_size >= 0,
            "trusted_batch_size",
            f"must be >= 0, got {self.trusted_batch_size}",
            "0 uses optim.batch_size (the papers); a positive number sets the trusted batch",
        )
        check_param(0 <= self.guard_min_kept <= 1, "guard_min_kept", "must be in [0, 1]", "e.g. 0.6")
        check_param(
            0 <= self.guard_max_class_excess <= 1, "guard_max_class_excess", "must be in [0, 1]", "e.g. 0.3"
        )
        check_param(
            -1 <= self.guard_min_separation <= 1, "guard_min_separation", "must be in [-1, 1]", "e.g. 0.05"
        )
        check_param(
            -1 <= self.guard_min_model_skill <= 1,
            "guard_min_model_skill",
            "must be in [-1, 1]",
            "e.g. 0.1; -1 never fires",
        )


class TrustedMetaMethod(Method):
    """A method with a main model trained on noisy batches, a meta network, and a trusted batch per meta step.

    The loop's step (``train_step_at``) is a meta update (``meta_update_step``) on the steps
    ``meta_update_at`` names and a plain step (``plain_step``) on the others; the loop passes a trusted batch
    exactly where ``takes_trusted_at`` asks for one: every meta update, and the plain steps that keep the
    real step's trusted term (``TrustedMetaParams.plain_trusted_term``). Both are functions of the step's
    place in the stage only: every rank takes the same decisions, and a resumed run, whose loop state
    (epoch in stage, step in epoch) is checkpointed, keeps the same phase. The method itself counts
    nothing, so there is no second counter that could disagree with the loop's. ``train_step`` without the
    step's place (a caller with one batch pair) is a meta update when given a trusted batch.

    The real steps train the main model on the given labels (``given_label_loss``) instead of the meta
    network's targets or weights (``on_given_labels``) in the first ``warmup_epochs`` epochs, while the
    meta network already learns (MLC, MW-Net: ``method.params.warmup_epochs``; MetaLabelNet's warm-up is a
    stage without a meta network), and while the collapse guard, which reads the meta network on the
    trusted set after every epoch (``guard_reading``), reports a collapse.
    """

    # Epochs from the start whose real steps use the given labels; subclasses set it from their params.
    warmup_epochs: int = 0
    # The fewest trusted samples a worker's meta update can use (MLC splits its batch in two halves).
    min_trusted_per_worker: ClassVar[int] = 1

    needs_trusted = True
    # Whether some step is a plain DDP step (MetaLabelNet's warm-up); the meta steps synchronise by hand.
    plain_steps: ClassVar[bool] = False
    # Whether the real step also trains on trusted samples (MLC's clean half; set per run by MW-Net).
    trains_on_trusted: bool = False

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        self.main = MainModel(ctx, ddp=self.plain_steps)
        self.guard = CollapseGuard(self.name, self.params, ctx.rank)
        self.epoch = 0

    def on_epoch_start(self, epoch: int) -> None:
        self.epoch = epoch
        self.guard.start_epoch(epoch, not self.on_given_labels, self.main.net, self.main.optimizer)

    @property
    def on_given_labels(self) -> bool:
        """Whether this epoch's real steps use the given labels: a warm-up epoch, or the guard falls back."""
        return self.epoch < self.warmup_epochs or self.guard.falling_back

    @abstractmethod
    def guard_reading(self) -> GuardReading | None:
        """The meta network and the main model read on the trusted set (``collapse_guard.label_reading``
        or ``weight_reading``), or None where there is nothing to read yet (MetaLabelNet's warm-up)."""

    def trusted_pass(self) -> Iterator[Batch]:
        """An un-augmented pass over this rank's share of the trusted set (none without a split reader)."""
        return iter(()) if self.ctx.iter_split is None else self.ctx.iter_split("trusted")

    def on_epoch_end(self, epoch: int) -> dict[str, float]:
        reading = None
        if self.params.guard and epoch + 1 >= self.warmup_epochs:  # else the next epoch warms up anyway
            reading = self.guard_reading()
        if reading is None:
            self.guard.nothing_read()
            return {}
        return self.guard.update(epoch, reading, self.main.net, self.main.optimizer)

    def final_metrics(self) -> dict[str, Any]:
        return self.guard.summary()

    def eval_model(self) -> nn.Module:
        return self.main.net

    def current_lr(self) -> float:
        return self.main.lr

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        """The trusted batch must give every worker at least ``min_trusted_per_worker`` samples."""
        size = cls.parse_params(cfg.method.params).trusted_batch_size or cfg.optim.batch_size
        if size // cfg.scaling.workers < cls.min_trusted_per_worker:
            least = cls.min_trusted_per_worker * cfg.scaling.workers
            own = size != cfg.optim.batch_size
            raise ConfigError(
                "method.params.trusted_batch_size" if own else "optim.batch_size",
                f"a trusted batch of {size} gives each of {cfg.scaling.workers} worker(s) "
                f"{size // cfg.scaling.workers} sample(s); {cls.name} needs {cls.min_trusted_per_worker}",
                f"set method.params.trusted_batch_size={least} or more"
                if own
                else f"use --batch-size {least} or more (the trusted batch is as large by default)",
            )

    @property
    def local_trusted_rows(self) -> int:
        """This rank's share of ``trusted_batch_size`` (0: the noisy batch's size)."""
        size = self.params.trusted_batch_size
        return self.ctx.local_batch_size if size == 0 else size // self.ctx.world_size

    def trusted_batch_size(self, stage: Stage) -> int:
        return self.local_trusted_rows

    def trusted_rows_at_full_size(self, rows: int) -> float:
        """``rows`` of a trusted batch counted as the rows they stand for at the default trusted batch size
        (``rows`` itself there), for the weight of the real step's trusted term, B_t / (B_noisy + B_t).

        Why: that weight is the trusted term's share of the union mean; counting the rows a smaller
        ``trusted_batch_size`` reads would shrink it with the batch (MLC's clean half from a third of L_s to
        a ninth at 32 of 128), which is a different loss, not a cheaper estimate of the same one, and cost
        MLC 5-6 points on Fashion-MNIST (benchmarks/README.md, issue 13).
        """
        return rows * self.ctx.local_batch_size / self.local_trusted_rows

    def meta_update_at(self, step: int) -> bool:
        """A meta update on steps 0, k, 2k, ... of the stage (k = ``meta_every``)."""
        return step % self.params.meta_every == 0

    @property
    def plain_steps_read_trusted(self) -> bool:
        """Whether the plain steps keep the real step's trusted term, and so read a trusted batch."""
        return self.params.plain_trusted_term and self.trains_on_trusted

    def takes_trusted_at(self, stage: Stage, step: int) -> bool:
        """A trusted batch for every meta update, and for the plain steps that keep the trusted term."""
        return self.meta_update_at(step) or self.plain_steps_read_trusted

    def train_step_at(self, stage: Stage, step: int, batch: Batch, trusted: Batch | None) -> dict[str, float]:
        if trusted is not None and not self.meta_update_at(step):
            return self.plain_step(batch, trusted)
        return self.train_step(batch, trusted)

    def train_step(self, batch: Batch, trusted: Batch | None) -> dict[str, float]:
        if trusted is not None:
            return self.meta_update_step(batch, trusted)
        if self.params.meta_every == 1:  # a caller that lost the trusted batch must not skip the update
            raise ValueError(f"{self.name} updates its meta network every step: it needs a trusted batch")
        return self.plain_step(batch, None)

    @abstractmethod
    def meta_update_step(self, batch: Batch, trusted: Batch) -> dict[str, float]:
        """Update the meta network on ``trusted`` and take the real step; returns scalars to log."""

    @abstractmethod
    def plain_step(self, batch: Batch, trusted: Batch | None) -> dict[str, float]:
        """A step between meta updates, with the meta network as it is (``step_through_outputs``); with
        ``trusted`` (``plain_steps_read_trusted``) it keeps the real step's trusted term."""

    @staticmethod
    def meta_step(
        optimizer: torch.optim.Optimizer, params: Sequence[Tensor], grads: Sequence[Tensor]
    ) -> None:
        """Step the meta optimizer with gradients that are already averaged over ranks.

        The grads are assigned rather than accumulated, and cleared afterwards, so nothing a step leaves in
        ``.grad`` can leak into the next one.
        """
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def lookahead_optimizer(main: MainModel, rule: Rule, lr: float | None = None) -> torch.optim.SGD:
    """The optimizer whose update rule the one-step look-ahead follows.

    ``"optimizer"``: the real SGD (momentum, weight decay, current scheduled lr, its momentum buffers).
    ``"sgd-plain"``: w - lr·g with ``lr`` or else the current lr, as MW-Net's and MetaLabelNet's reference
    codes step their fast weights; a state-less plain SGD over the same parameters expresses that (it holds
    no state, so building one per step costs nothing).

    Why the methods go through ``output_hypergrad`` and not ``lookahead_hypergrad``: under data
    parallelism the latter looks ahead on each rank's own batch and averages the ranks' hypergradients,
    which is not the hypergradient of the global batch (the fast weights differ per rank and the cross terms
    are lost), so a 2-worker run would not reproduce a 1-worker run on the concatenated batch.
    ``output_hypergrad`` all-reduces the training gradient before the step, so every rank takes the global
    step and gets the global hypergradient.
    """
    if rule == "optimizer":
        if lr is not None:
            raise ValueError("lr is for the sgd-plain look-ahead; the optimizer rule uses the current lr")
        return main.optimizer
    return torch.optim.SGD(main.net.parameters(), lr=main.lr if lr is None else lr)


@dataclass(frozen=True)
class TrustedTerm:
    """The trusted batch's cross-entropy at the current weights, mixed into a real step.

    The step is then on (1 - ``weight``)·ℓ + ``weight``·L_trusted, the mean over the union of the noisy and
    the trusted samples when ``weight`` = B_trusted / (B_noisy + B_trusted), as MLC's clean half joins its
    loss. ``loss`` and ``grads`` (by trainable parameter name) are rank means.
    """

    loss: Tensor
    grads: dict[str, Tensor]
    weight: float


def real_step_through_outputs(
    main: MainModel,
    hyper: OutputHypergradient | ExampleAlignment,
    loss: OutputLoss,
    trusted: TrustedTerm | None = None,
) -> Tensor:
    """The real step on ``loss(logits, features)`` of the meta step's training forward; returns its value.

    For methods whose meta model changed after the forward (MW-Net's weights, MetaLabelNet's soft labels):
    the new ∂loss/∂logits goes back through the forward's kept graph (``output_hypergrad(keep_graph=True)``),
    so the step costs a backward, not another forward, and the running statistics moved once. With
    ``trusted`` the step also trains on the trusted batch (``TrustedTerm``).
    """
    value, grad_logits = logit_gradient(loss, hyper.logits, hyper.features, create_graph=False)
    return _apply_with_trusted(main, value, output_grads(main.net, hyper.logits, grad_logits), trusted)


def _apply_with_trusted(
    main: MainModel, value: Tensor, grads: list[Tensor | None], trusted: TrustedTerm | None
) -> Tensor:
    """Step the main model on the noisy loss's gradients, mixed with ``trusted``'s where given; returns the
    step's loss."""
    if trusted is not None:
        keep = 1.0 - trusted.weight
        value = keep * value + trusted.weight * trusted.loss
        names = [n for n, _ in unwrap_model(main.net).named_parameters()]
        grads = [
            _mix(g, trusted.grads.get(n), keep, trusted.weight) for n, g in zip(names, grads, strict=True)
        ]
    main.apply_grads(grads)
    return value


def _mix(noisy: Tensor | None, gold: Tensor | None, keep: float, weight: float) -> Tensor | None:
    """keep·noisy + weight·gold, either of them possibly absent (a parameter one loss does not reach)."""
    if noisy is None and gold is None:
        return None
    if noisy is None:
        return weight * gold
    return keep * noisy if gold is None else keep * noisy + weight * gold


def step_through_outputs(
    main: MainModel,
    x: Tensor,
    loss: OutputLoss,
    trusted: Callable[[], TrustedTerm] | None = None,
) -> tuple[Tensor, Tensor]:
    """A plain step on ``loss(logits, features)`` of a fresh training forward; returns its value and logits.

    The step between meta updates: no look-ahead, the meta model only evaluated. One forward (it moves
    BatchNorm's running statistics once, as a meta step's training forward does) and one backward, whose
    gradients ``output_grads`` averages over the ranks by hand, as the meta steps' real steps: the main
    model of MW-Net and MLC is not DDP-wrapped. ``trusted`` computes the real step's trusted term, called
    after the noisy forward as the meta steps order their forwards, so the running statistics move in
    the same order. The logits come back detached, for the method's logged scalars.
    """
    logits, features = main.net(x)
    value, grad_logits = logit_gradient(loss, logits, features, create_graph=False)
    grads = output_grads(main.net, logits, grad_logits)
    value = _apply_with_trusted(main, value, grads, None if trusted is None else trusted())
    return value, logits.detach()


def given_label_loss(labels: Tensor) -> OutputLoss:
    """Plain cross-entropy on the given labels: the real step's loss while ``on_given_labels``."""

    def loss(logits: Tensor, _features: Tensor) -> Tensor:
        return F.cross_entropy(logits, labels)

    return loss


@contextmanager
def evaluating(*nets: nn.Module) -> Iterator[None]:
    """Eval mode and no autograd for the duration (per-sample export); restores each net's mode after."""
    modes = [net.training for net in nets]
    for net in nets:
        net.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for net, mode in zip(nets, modes, strict=True):
            net.train(mode)


def corrected_label_columns(batch: Batch, soft: Tensor) -> dict[str, np.ndarray]:
    """One batch of ``corrected_labels``: argmax and max of the soft label, its probability of the given
    label, and all of it if C is small."""
    soft = soft.detach().float().cpu()
    confidence, corrected = soft.max(dim=1)
    given = batch.y.cpu()
    columns = {
        "sample_id": batch.sample_id.cpu().numpy(),
        "given_label": given.numpy(),
        "corrected_label": corrected.numpy(),
        "corrected_confidence": confidence.numpy(),
        "given_label_probability": soft.gather(1, given[:, None]).squeeze(1).numpy(),
    }
    if soft.shape[1] <= SOFT_LABEL_MAX_CLASSES:
        columns["soft_label"] = soft.numpy()
    return columns


def corrected_labels_from_predictions(label_issues: pa.Table, pred_probs: np.ndarray) -> pa.Table:
    """``corrected_labels`` from the model-prediction path's label issues, for a run whose collapse guard
    ended it falling back: the meta network's labels were judged worse than the given ones, so the run's
    corrections are confident learning's instead (the best-validation model's prediction where it flags the
    given label, the given label elsewhere: ``label_issues``' ``corrected_label``, filled by
    ``build_label_issues(..., correct=True)``).

    ``pred_probs`` are that model's softmax rows in ``label_issues``' order (by sample_id). The columns are
    those of ``corrected_label_columns``, with the model's softmax as the soft label and, unlike the
    method's own table, ``corrected_confidence`` the soft label's probability of the corrected label (an
    unflagged sample keeps its given label where the model's argmax may differ); the schema's metadata says
    where the labels came from (``CORRECTION_SOURCE_KEY``).
    """
    given = label_issues.column("given_label").to_numpy()
    corrected = label_issues.column("corrected_label").to_numpy()
    probs = np.asarray(pred_probs, dtype=np.float32)
    rows = np.arange(len(given))
    columns: dict[str, Any] = {
        "sample_id": label_issues.column("sample_id"),
        "given_label": given,
        "corrected_label": corrected,
        "corrected_confidence": probs[rows, corrected],
        "given_label_probability": probs[rows, given],
    }
    if probs.shape[1] <= SOFT_LABEL_MAX_CLASSES:
        columns["soft_label"] = pa.array(list(probs), pa.list_(pa.float32()))
    return pa.table(columns).replace_schema_metadata({CORRECTION_SOURCE_KEY: FROM_MODEL.encode()})


def correction_source(table: pa.Table) -> str:
    """Where a ``corrected_labels`` table's labels came from: ``FROM_METHOD`` or ``FROM_MODEL``."""
    raw = (table.schema.metadata or {}).get(CORRECTION_SOURCE_KEY)
    return raw.decode() if raw is not None else FROM_METHOD


def summarize_corrected_labels(table: pa.Table, labels: pa.Table) -> dict[str, Any]:
    """``label_correction`` for metrics.json from a ``corrected_labels`` table.

    ``source`` says whose labels they are (``correction_source``). ``fraction_changed`` counts every
    exported sample; accuracies and the detector scores of "corrected != given" for "given != true" count
    only samples whose true label is known (all of them under synthetic noise, the human-checked subset on
    Clothing1M), and are left out when there are none.
    """
    given = table.column("given_label").to_numpy()
    corrected = table.column("corrected_label").to_numpy()
    changed = corrected != given
    out: dict[str, Any] = {
        "samples": len(given),
        "source": correction_source(table),
        "fraction_changed": ratio(int(changed.sum()), len(given)),
    }
    true = true_labels_of(table.column("sample_id").to_numpy(), labels)
    known = true >= 0
    out["samples_with_true_label"] = int(known.sum())
    if known.any():
        given, corrected, true, changed = given[known], corrected[known], true[known], changed[known]
        out["corrected_label_accuracy"] = float(np.mean(corrected == true))
        out["given_label_accuracy"] = float(np.mean(given == true))
        out.update(detector_scores(changed, given != true))
    return {"label_correction": out}


class CorrectedLabelExport:
    """Mixin for methods that export ``corrected_labels.parquet`` and summarise it (MLC, MetaLabelNet,
    MLNT, MixNN).

    Their label issues come from the same corrected labels: ``corrected_label`` = argmax of the meta
    network's soft label, ``is_label_issue`` = corrected != given, ``label_score`` = the soft label's
    probability of the given label; ``predicted_label`` is the argmax of ``eval_model()``. A run that ends
    with the collapse guard falling back flags from the best-validation model's predictions instead (the
    model-prediction path): its corrector's labels were judged worse than the given ones, so they are not
    exported as the run's corrections either (``corrected_labels_from_predictions``).
    """

    export_name = "corrected_labels"
    label_issue_rule = (
        "corrected label != given label (argmax of the meta network's soft label); "
        "label_score = the soft label's probability of the given label"
    )

    @classmethod
    def summarize_export(cls, table: pa.Table, labels: pa.Table) -> dict[str, Any]:
        return summarize_corrected_labels(table, labels)

    @property
    def export_rejected(self) -> bool:
        # The corrector ended collapsed.
        return isinstance(self, TrustedMetaMethod) and self.guard.falling_back

    @classmethod
    def export_from_predictions(cls, label_issues: pa.Table, pred_probs: np.ndarray) -> pa.Table:
        return corrected_labels_from_predictions(label_issues, pred_probs)

    def label_issue_columns(self, batch: Batch) -> dict[str, np.ndarray] | None:
        if self.export_rejected:
            return None
        own = self.per_sample_outputs(batch)  # type: ignore[attr-defined]  # the method's corrected labels
        model = self.eval_model()  # type: ignore[attr-defined]  # the classifier the run reports
        with evaluating(model):
            predicted = model(batch.x)[0].argmax(dim=1).cpu().numpy()
        return {
            "sample_id": own["sample_id"],
            "given_label": own["given_label"],
            "predicted_label": predicted,
            "label_score": own["given_label_probability"],
            "is_label_issue": own["corrected_label"] != own["given_label"],
            "corrected_label": own["corrected_label"],
        }
