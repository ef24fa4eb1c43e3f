"""Catching a meta network, or the main model it steers, that has degenerated, from the trusted set alone,
and falling back.

A meta network can drive training into a collapse the main model never leaves: MetaLabelNet's soft labels
moving every sample to one class (benchmarks/README.md, uniform 0.8), a label corrector that overrides
correct labels, a weight net that weighs every sample the same or favours the wrong labels. Nothing in
the training loss shows it — the main model fits whatever targets it is given — so after every epoch
the guard reads the meta network on the trusted set, whose labels are right by construction:

- label correctors (``mlc``, ``metalabelnet``): the corrected label of each trusted sample (fed its own
  label, which is the given label there). ``kept``: the share whose corrected label is that label — on
  the trusted set the given labels are 100% right, so this is the corrected labels' accuracy against
  given labels that are right; ``class_excess``: how far the most over-represented corrected class exceeds
  its share of the trusted labels (0 when the histograms match, 1 - 1/K when one class takes everything);
- sample weights (``mwnet``): the weight of each trusted sample's loss under its label and under a wrong
  label (another class, fixed per sample by its id). ``separation``: mean weight of the right labels minus
  mean weight of the wrong ones; 0 when the weights are all equal, negative when inverted;
- the main model, for every method: ``model_skill``, its accuracy on the trusted set as a skill score
  over the best constant prediction, (accuracy - p) / (1 - p) with p the share of the most common trusted
  label: 0 for a model that predicts one class for everything or guesses, 1 for one that is always right.
  Why: the meta network can read healthy while the model it steers has learned nothing (SST-2 with a
  2-layer MiniLM, benchmarks/README.md: a model at chance for a whole run, with its corrector keeping 77%
  of the trusted labels); the model's own accuracy on the trusted set shows it. The limit
  (``guard_min_model_skill``, 0.1) is set for a model at chance, not a weak one: on Fashion-MNIST the
  lowest reading measured is 0.15 (MW-Net under uniform 0.8, 80% of the labels wrong, validation accuracy
  0.25 after two epochs), MLC's and MetaLabelNet's 0.40 or more; on a trusted set of 100 samples a model at
  chance reads 0 ± 0.1. Where the method also trains on trusted samples (MLC's clean half, MW-Net's
  ``train_on_trusted``) this is partly a training accuracy: it catches a model that does not even fit
  them, not one that fits them and nothing else. No reading where the trusted labels are all one class.

A reading outside the limits (``GuardParams``) is a collapse: rank 0 logs a warning with the numbers, and
the next epoch's real steps train the main model on the given labels (MetaLabelNet: cross-entropy; MW-Net:
every weight 1; MLC: its loss with the given labels in place of the corrected ones) while the meta network
keeps its meta updates, so it can recover. Each epoch is read again;
the method steers again after the first healthy reading. A main model at chance after an epoch the meta
network steered is also put back where it was when that epoch started (the undo of ``guard_rollback``
below, whatever that says): training it on the given labels from where it collapsed did not bring it back
(SST-2, benchmarks/README.md: an epoch on the given labels left it at or near chance), and a model that
learned nothing in the epoch loses little by the undo.

``guard_rollback`` (off by default): the training of the main model in every collapsed epoch is undone,
whichever reading fired (without it, only a main model at chance is): its network and optimizer state go
back to where they were when that epoch started, which the guard kept, and the next epoch trains from
there on the given labels. Why: by the time the reading comes, the main model has trained a whole epoch on
the collapsed labels, and a model that learns slowly does not come back from that within the epochs left
(SST-2 with a 2-layer MiniLM: one such epoch left the model at chance for the rest of the run). Only
epochs the meta network steered are undone (a fallback epoch trained on the given labels). Why off:
measured on Fashion-MNIST (benchmarks/README.md, "Undoing a collapsed epoch") it leaves MLC's accuracy
where it was with corrected labels a little worse, and costs MetaLabelNet, whose soft labels swing and
recover, 3.5 points. The copy (network and optimizer state; the learning rate stays where the schedule
is) is taken at the start of every steered epoch, one CPU copy per worker (for a ResNet-50 with
momentum, about 200 MB), and in a checkpoint taken inside the epoch it is checkpointed with the guard, so
a resumed run undoes to the same state. The undone epoch's evaluation sees the restored model, so the
best-validation selection may pick it under that epoch's number (for MetaLabelNet, undoing the first meta
epoch restores the warm-up stage's best model, which then becomes selectable in the meta stage).

Every rank computes the same reading (the counts are summed over ranks), so all ranks take the same decision.

What the guard cannot see: the noisy set's true labels. A corrector that keeps the trusted labels but
copies the main model's systematic confusions on the noisy set passes it. Measured against the true labels
(benchmarks/README.md, issue 12): the trusted reading is within ~0.04 of the corrected labels' accuracy on
the noisy set on average, and it errs towards the given labels — a corrector whose first epochs are worse
than the given labels (MLC) may never get to steer, which costs its corrected labels, not its accuracy.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from raynoisy.meta.sync import all_reduce_sum_

logger = logging.getLogger(__name__)


@dataclass
class GuardParams:
    """Limits of a healthy meta network; ``guard=False`` turns the guard off (the papers' algorithms)."""

    guard: bool = True
    guard_min_kept: float = 0.6
    guard_max_class_excess: float = 0.3
    guard_min_separation: float = 0.05
    guard_min_model_skill: float = 0.1
    guard_rollback: bool = False  # undo every collapsed epoch, not only one that left the model at chance


@dataclass
class GuardReading:
    """One epoch's numbers; the fields that do not apply to the method's kind are None."""

    samples: int
    kept: float | None = None
    class_excess: float | None = None
    separation: float | None = None
    model_skill: float | None = None

    def problems(self, limits: GuardParams) -> list[str]:
        out = []
        if self.kept is not None and self.kept < limits.guard_min_kept:
            out.append(
                f"the corrected labels keep {self.kept:.1%} of the trusted labels "
                f"(guard_min_kept {limits.guard_min_kept:.0%})"
            )
        if self.class_excess is not None and self.class_excess > limits.guard_max_class_excess:
            out.append(
                f"one corrected class exceeds its trusted share by {self.class_excess:.1%} "
                f"(guard_max_class_excess {limits.guard_max_class_excess:.0%})"
            )
        if self.separation is not None and self.separation < limits.guard_min_separation:
            out.append(
                f"right labels weigh {self.separation:+.3f} more than wrong ones on average "
                f"(guard_min_separation {limits.guard_min_separation})"
            )
        if self.model_at_chance(limits):
            out.append(
                f"the main model's accuracy on the trusted set has a skill of {self.model_skill:.3f} over "
                f"predicting its most common label (guard_min_model_skill {limits.guard_min_model_skill})"
            )
        return out

    def model_at_chance(self, limits: GuardParams) -> bool:
        return self.model_skill is not None and self.model_skill < limits.guard_min_model_skill

    def scalars(self) -> dict[str, float]:
        named = {
            "kept": self.kept,
            "class_excess": self.class_excess,
            "separation": self.separation,
            "model_skill": self.model_skill,
        }
        return {f"guard_{k}": v for k, v in named.items() if v is not None}


class _ModelCounts:
    """Over this rank's trusted share: the trusted labels per class, and how many the main model gets right.
    The counts live on ``device`` from the start, so that a rank without trusted batches still joins the
    all-reduce with tensors on the device the collective backend expects."""

    def __init__(self, num_classes: int, device: torch.device) -> None:
        self.num_classes = num_classes
        self.counts = torch.zeros(num_classes + 1, dtype=torch.float64, device=device)  # labels, right

    def add(self, logits: Tensor, labels: Tensor) -> None:
        self.counts[:-1] += torch.bincount(labels, minlength=self.num_classes)
        self.counts[-1] += (logits.argmax(dim=1) == labels).sum()

    @property
    def label_hist(self) -> Tensor:
        return self.counts[:-1]

    @property
    def samples(self) -> int:
        return int(self.label_hist.sum())

    def skill(self) -> float | None:
        """``GuardReading.model_skill`` from the counts (summed over ranks by then); None without samples
        of two classes, where a constant prediction is always right."""
        n = self.samples
        constant = float(self.label_hist.max()) / max(n, 1)
        if n == 0 or constant == 1:
            return None
        return (float(self.counts[-1]) / n - constant) / (1 - constant)


def label_reading(
    batches: Iterable[tuple[Tensor, Tensor, Tensor]], num_classes: int, device: torch.device
) -> GuardReading:
    """From (soft labels [B, C], main model's logits [B, C], trusted labels [B]) of this rank's trusted
    share, summed over ranks."""
    kept = torch.zeros(1, dtype=torch.float64, device=device)
    corrected_hist = torch.zeros(num_classes, dtype=torch.float64, device=device)
    model = _ModelCounts(num_classes, device)
    for soft, logits, labels in batches:
        corrected = soft.argmax(dim=1)
        kept += (corrected == labels).sum()
        corrected_hist += torch.bincount(corrected, minlength=num_classes)
        model.add(logits, labels)
    all_reduce_sum_([kept, corrected_hist, model.counts])
    n = model.samples
    if n == 0:
        return GuardReading(samples=0)
    excess = float(((corrected_hist - model.label_hist) / n).max())
    return GuardReading(samples=n, kept=float(kept) / n, class_excess=excess, model_skill=model.skill())


def model_reading(
    batches: Iterable[tuple[Tensor, Tensor]], num_classes: int, device: torch.device
) -> GuardReading:
    """From (main model's logits [B, C], trusted labels [B]) alone: for a method without a meta network to
    read (MW-Net's ``weighting: example``)."""
    model = _ModelCounts(num_classes, device)
    for logits, labels in batches:
        model.add(logits, labels)
    all_reduce_sum_([model.counts])
    return GuardReading(samples=model.samples, model_skill=model.skill())


def wrong_labels(labels: Tensor, sample_ids: Tensor, num_classes: int) -> Tensor:
    """Another class per sample, fixed by its id: the same on every rank and in every epoch."""
    offset = 1 + sample_ids.to(labels.device) % (num_classes - 1)
    return (labels + offset) % num_classes


def weight_reading(
    batches: Iterable[tuple[Tensor, Tensor, Tensor, Tensor]], num_classes: int, device: torch.device
) -> GuardReading:
    """From (weights of the right labels [B], weights of wrong labels [B], main model's logits [B, C],
    trusted labels [B]) of this rank's trusted share, summed over ranks."""
    sums = torch.zeros(2, dtype=torch.float64, device=device)
    model = _ModelCounts(num_classes, device)
    for right, wrong, logits, labels in batches:
        sums[0] += right.double().sum()
        sums[1] += wrong.double().sum()
        model.add(logits, labels)
    all_reduce_sum_([sums, model.counts])
    n = model.samples
    if n == 0:
        return GuardReading(samples=0)
    return GuardReading(samples=n, separation=float(sums[0] - sums[1]) / n, model_skill=model.skill())


@dataclass
class CollapseGuard:
    """Reads, decides and remembers; ``falling_back`` is what the method's next epoch obeys."""

    method: str
    limits: GuardParams
    rank: int
    falling_back: bool = False
    fired_epochs: list[int] = field(default_factory=list)
    rolled_back_epochs: list[int] = field(default_factory=list)
    # The main model's state at the start of the epoch the meta network steers, for an undo.
    saved: dict[str, Any] | None = None

    def start_epoch(self, epoch: int, steered: bool, net: nn.Module, optimizer: Optimizer) -> None:
        """Keep the main model's state at the start of ``epoch`` (0-based) if it may have to be undone."""
        if not (self.limits.guard and steered):
            self.saved = None
        elif self.saved is None or self.saved["epoch"] != epoch:  # else resumed inside it: keep the start's
            self.saved = {
                "epoch": epoch,
                "net": _to_cpu(net.state_dict()),
                "optimizer_state": _to_cpu(optimizer.state_dict()["state"]),  # momentum; not the lr
            }

    def nothing_read(self) -> None:
        """The epoch ended without a reading (warm-up, no reading in this setting): nothing to undo."""
        self.saved = None

    def update(
        self, epoch: int, reading: GuardReading, net: nn.Module, optimizer: Optimizer
    ) -> dict[str, float]:
        """Decide for the epoch after ``epoch`` (0-based), undoing ``epoch`` where it collapsed and
        ``start_epoch`` kept its start; returns the reading's scalars to log."""
        saved, self.saved = self.saved, None
        if reading.samples == 0:  # nothing to read (no trusted data on any rank): keep the last decision
            return {}
        problems = reading.problems(self.limits)
        undoable = saved is not None and saved["epoch"] == epoch
        undo = undoable and (
            reading.model_at_chance(self.limits) or (bool(problems) and self.limits.guard_rollback)
        )
        if undo:  # the lr stays where the schedule is: param_groups are the current ones
            net.load_state_dict(saved["net"])
            optimizer.load_state_dict({**optimizer.state_dict(), "state": saved["optimizer_state"]})
            self.rolled_back_epochs.append(epoch + 1)
        if problems:
            self.fired_epochs.append(epoch + 1)
            undone = f"Its training of the main model is undone (back to the start of epoch {epoch + 1}). "
            self._warn(
                f"[guard] {self.method} epoch {epoch + 1}: collapse — {'; '.join(problems)}. "
                f"{undone if undo else ''}Epoch {epoch + 2} trains the main model on the given labels; "
                "the meta network keeps learning."
            )
        elif self.falling_back:
            self._warn(f"[guard] {self.method} epoch {epoch + 1}: healthy again ({self._numbers(reading)}).")
        self.falling_back = bool(problems)
        scalars = reading.scalars() | {"guard_fallback": float(self.falling_back)}
        return scalars | {"guard_rolled_back": float(undo)}

    def _warn(self, text: str) -> None:
        if self.rank == 0:
            logger.warning(text)

    @staticmethod
    def _numbers(reading: GuardReading) -> str:
        return ", ".join(f"{k.removeprefix('guard_')} {v:.3f}" for k, v in reading.scalars().items())

    def summary(self) -> dict[str, Any]:
        return {
            "collapse_guard": {
                "enabled": self.limits.guard,
                "fired_epochs": list(self.fired_epochs),
                "rolled_back_epochs": list(self.rolled_back_epochs),
            }
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "falling_back": self.falling_back,
            "fired_epochs": list(self.fired_epochs),
            "rolled_back_epochs": list(self.rolled_back_epochs),
            "saved": self.saved,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.falling_back = bool(state["falling_back"])
        self.fired_epochs = list(state["fired_epochs"])
        self.rolled_back_epochs = list(state.get("rolled_back_epochs", []))  # absent before guard_rollback
        saved = state.get("saved")
        self.saved = None if saved is None else _to_cpu(saved)  # checkpoints load onto the run's device


def _to_cpu(value: Any) -> Any:
    """A state dict's tensors on the CPU (nested dicts and lists kept)."""
    if isinstance(value, Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_to_cpu(v) for v in value)
    return value
