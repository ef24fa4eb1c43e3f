"""Cost of one training step of each method, as a ratio to one plain cross-entropy step.

What a meta method costs is the question users ask before they pick one, and the issues set the bars: the
trusted-set meta methods' steps at most 2.5x a CE step (``mwnet``, ``mlc``) and 2.8x (``metalabelnet``)
(the performance issue's; the meta issue's were 3.0x); MLNT's (M = 10
synthetic label sets) at most 4.0x first order and 8.0x second order; MixNN's per-epoch refresh at most 15%
of its epoch. Absolute times
on a shared machine mean little (DESIGN.md, principle 7), so every number that matters is a ratio to the
``ce`` step measured in the same run, in the same process, on the same device, with the same model and
the same batch.

How each method is built and driven, so that the step timed is the step training runs:

- the config is the data set's preset, checked whole as the driver checks it (``resolve_config``:
  ``fashion-mnist`` for ``small-cnn`` at 28x28x1, ``cifar10`` for ``resnet32`` at 32x32x3), with the model's
  batch size for every method (a preset with another batch size, e.g. MetaLabelNet's CIFAR-10 128, is
  overridden and said so: same batch for all);
- the method is built and driven with ``raynoisy.train.harness``, as the training loop builds and drives it
  on one rank: the ``MethodContext`` from the data set's nominal split sizes (GLC's trusted batch is
  proportional to them), its trusted-set pass over the synthetic trusted pool; the seed is reset before each
  method is built, so every method starts from the same main-model weights;
- amortised meta updates: a row ``METHOD@kK`` (``--meta-every K`` adds one per trusted-set meta method) is
  the method under ``meta_every = K``, and its "step" is a whole cycle of K real steps, driven as the loop
  drives them (a trusted batch only where ``takes_trusted_at`` asks for one: the meta update on the cycle's
  first step, K - 1 plain steps after it), timed together and divided by K: the amortised cost per step,
  (one meta step + (K - 1) plain steps) / K, against CE's step in the same rounds. A second table splits
  each cycle into its meta step and the median of its plain steps. Its peak is the cycle's highest, the
  meta step's; its target, from K = 5 on, the issue's 1.5x;
- a smaller trusted batch: a row ``METHOD@tN`` (``--trusted-batch N`` adds one per trusted-set meta method)
  is the method with ``trusted_batch_size = N`` (its gold forward and backward, MLC's clean half too, on N
  samples instead of a batch), judged against the method's own target; ``METHOD@kKtN`` combines both;
  a ``VARIANTS`` row of a trusted-set meta method takes the same suffixes (``mlc-supervised@k5t32``);
- rows that are a method under given params (``VARIANTS``): ``mlnt-first-order`` and ``mlnt-second-order``
  with ``start_iter = mid_iter = 0`` (the meta step from the round's first step, at full consistency weight;
  the defaults run 500 plain CE steps first) and M = 10, and their ``-vmap`` twins (``vmap = true``: the M
  look-aheads batched, for accelerators; not in the default rows, slower on CPU; no floor, since a batched
  forward is not priced by M separate ones); ``mixnn`` with ``mixup_epochs = 0``, so that its
  first ``mix`` epoch is a global-neighbour epoch (the preset's warm-up epochs stay CE); ``mwnet-example``,
  MW-Net with ``weighting = example`` (2F + 2B + J, no look-ahead; not in the default rows);
  ``mwnet-trusted`` (``train_on_trusted``: + the trusted F + B at w) and ``mlc-supervised``
  (``corrector_supervision = 1``: + the clean half's no-grad forward), issue 12's deviations, not in the
  default rows either;
- mixed precision: a row ``ROW+bf16`` (``--bf16`` adds one per row) is ROW under
  ``scaling.precision = bf16-mixed``, its step under bfloat16 autocast as the loop runs it. Its ratios, peak
  ratio, pass floor (passes timed under autocast too) and target are against ``ce+bf16``, CE in the same
  precision, and a further table sets each beside its fp32 twin: the speed-up and the peaks;
- the stage hooks are run, without steps, up to the first step of the first stage whose models the method
  may select (``Stage.selectable``; ``harness.start_stage``): GLC's ``corrected`` stage (its corruption
  matrix estimated from a trusted pass) and MetaLabelNet's ``meta`` stage (its frozen encoder copied).
  Earlier stages run a CE step, so the method's own step is the one that tells what it costs; the table says
  which stage and epochs that is and what share of training;
- ``train_step(batch, trusted)`` with one fixed synthetic batch and a trusted batch of the method's
  ``trusted_batch_size(stage)`` (a stage that trains on the trusted set, such as ``ce-clean``'s, gets the
  synthetic batch as its trusted batch and None as ``trusted``, as the loop passes them); no data is read,
  so ``data.root`` is any existing folder.

Timing runs with the torch thread count the trainer gives one worker on this machine (``--threads``; about
half the CPUs, the rest decode data). Warm-up steps come first (lazy optimizer state, allocator and kernel
caches), then ``--repeats`` rounds in which every method takes one timed step, in an order rotated each
round, so that load from other processes and any drift hit all methods alike. Reported: the median step
and its inter-quartile range, the ratio of the medians to CE's, and the inter-quartile range of the
per-round ratios (method step / CE step of the same round), which shows whether a target is met
by a margin or by noise. On CPU the ratio of medians is also given by process CPU time
(``time.process_time``), which load from other processes does not stretch: a cross-check on a shared
machine; the target is judged on wall time, the issue's measure.

Memory: the peak a step allocates above what is allocated when it starts, which is the same measure on both
devices and does not count the other methods that share the process. On CUDA it is
``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``. On CPU there is no allocator
high-water mark, and RSS is useless (glibc keeps freed pages, other methods' tensors share the heap), so
steps run under ``torch.profiler.profile(profile_memory=True)`` and the peak is the maximum of the running
sum of the allocation events (+size on allocate, -size on free) in time order, minus its level when the step
starts: the exact high-water mark of torch's CPU allocator during the step. The memory a method holds
between steps (networks, optimizer state, meta-nets, frozen copies: every tensor in its ``state_dict``) is
shown next to it.

MixNN also pays once per epoch, before its steps: the whole-split pass (eval forward over every training
sample), the losses and the GMM, the kNN index (add + build + search of all samples) and the store writes of
the neighbours and their features that the steps mix (its "batch composition": global mode mixes at the
feature level, so composing a batch is reading the store). That refresh runs on a synthetic training split of
``--mixnn-train`` samples (default: the data set's nominal size), timed by the method's own per-part clock
(``MixNN.on_epoch_end``), with the index in this process on the CPUs a run gives the index actor (its
``index_cpus``, at least 1 thread; no object-store transfer, which a Ray run adds). Its share of the epoch is
refresh / (refresh + steps per epoch x the median step), steps per epoch = ``--mixnn-train`` // batch.
The ``mixnn-gpu-index`` row (``--device cuda`` only) gives the index a share of the GPU (``index_gpus``),
where it searches exactly with torch (or GPU FAISS); the other rows' index is on the CPU, as a run's actor
without a GPU share is. The ``mixnn-steps`` row is MixNN with ``refresh_from = steps``: its steps record each
sample's loss and features from their own un-mixed forward (in its step time), and its refresh reads them
instead of making the pass (its first refresh, after the warm-up, still makes one; the timed ones follow
neighbour epochs).

    python benchmarks/meta_step.py                      # both models, all registered methods
    python benchmarks/meta_step.py --small              # CI size, seconds
    python benchmarks/meta_step.py --models small-cnn --methods ce mwnet mlc metalabelnet --meta-every 2 5 10
    python benchmarks/meta_step.py --models small-cnn --methods ce mwnet mlc mlc@k5t32 --trusted-batch 32
    python benchmarks/meta_step.py --models resnet32 --methods ce mlc --device cuda
    python benchmarks/meta_step.py --models resnet32 --methods ce mwnet mlc metalabelnet --bf16 --device cuda
"""

from __future__ import annotations

import argparse
import copy
import gc
import math
import os
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import update_bn

from raynoisy.config import load_config
from raynoisy.data.batch import Batch
from raynoisy.data.sources import get_source
from raynoisy.data.transforms import UNAUGMENTED_FAMILIES
from raynoisy.meta.output_hypergrad import jvp
from raynoisy.methods import get_method_class
from raynoisy.methods.base import Method, Stage
from raynoisy.methods.meta_common import TrustedMetaMethod
from raynoisy.train.harness import build_method, method_context, start_stage
from raynoisy.train.precision import autocast
from raynoisy.train.preflight import resolve_config

# Kineto prints start/stop lines for every profiled step; level 6 silences them (set before the profiler's
# first use, which is when kineto reads it), unless the user asked for a level.
os.environ.setdefault("KINETO_LOG_LEVEL", "6")

# The passes over the network that each method's step needs by its algorithm, in units of one pass over the
# noisy batch (a half-size batch counts 0.5): F a training forward, B a backward, J a forward-mode pass
# (J_z v), E a no-grad eval-mode forward. Priced with this process's own measured passes they give the
# step's floor: what it would cost with no other work at all (optimizer updates, meta nets, element-wise
# arithmetic). A floor above the target means no implementation of the same algorithm reaches it.
PASSES: dict[str, dict[str, float]] = {
    "ce": {"F": 1, "B": 1},
    # noisy F + B (look-ahead gradient), gold F + B at w', J, real-step B with the updated weights
    "mwnet": {"F": 2, "B": 3, "J": 1},
    # noisy F + B, clean half F + B, gold half F + B at w', J; the real step reuses the look-ahead gradient
    "mlc": {"F": 2, "B": 2, "J": 1},
    # frozen encoder E, then as MW-Net: noisy F + B, gold F + B at w', J, real-step B with the updated SLP
    "metalabelnet": {"E": 1, "F": 2, "B": 3, "J": 1},
}
# The part of ``PASSES`` over the trusted batch (as large as the noisy one by default; a row ``METHOD@tN``
# scales it by N / batch): MW-Net's and MetaLabelNet's gold F + B at w', MLC's clean-half and gold-half F + B.
TRUSTED_PASSES: dict[str, dict[str, float]] = {
    "mwnet": {"F": 1, "B": 1},
    "mlc": {"F": 1, "B": 1},
    "metalabelnet": {"F": 1, "B": 1},
}
# The plain steps between meta updates (``meta_every`` > 1): a training forward and a backward, MetaLabelNet's
# also its frozen encoder's forward, MLC's also its clean half's F + B (``plain_trusted_term``).
PLAIN_PASSES: dict[str, dict[str, float]] = {
    "mwnet": {"F": 1, "B": 1},
    "mlc": {"F": 1.5, "B": 1.5},
    "metalabelnet": {"E": 1, "F": 1, "B": 1},
}
# The part of ``PLAIN_PASSES`` over the trusted batch, scaled as ``TRUSTED_PASSES``: MLC's clean half.
PLAIN_TRUSTED_PASSES: dict[str, dict[str, float]] = {"mlc": {"F": 0.5, "B": 0.5}}
MLNT_SETS = 10
# MW-Net's example weighting: the gold F + B at w (no look-ahead), the training F, J, the real-step B.
PASSES["mwnet-example"] = {"F": 2, "B": 2, "J": 1}
# ``train_on_trusted``: MW-Net's passes plus the trusted batch's F + B at w, for the real step; its plain
# steps keep that term (``plain_trusted_term``).
PASSES["mwnet-trusted"] = {"F": 3, "B": 4, "J": 1}
TRUSTED_PASSES["mwnet-trusted"] = {"F": 2, "B": 2}
PLAIN_PASSES["mwnet-trusted"] = {"F": 2, "B": 2}
PLAIN_TRUSTED_PASSES["mwnet-trusted"] = {"F": 1, "B": 1}
# ``corrector_supervision``: MLC's passes plus the clean half's no-grad forward for the corrector's features,
# in the meta update only (its plain steps are MLC's).
PASSES["mlc-supervised"] = {"F": 2, "B": 2, "J": 1, "E": 0.5}
TRUSTED_PASSES["mlc-supervised"] = {"F": 1, "B": 1, "E": 0.5}
PLAIN_PASSES["mlc-supervised"] = PLAIN_PASSES["mlc"]
PLAIN_TRUSTED_PASSES["mlc-supervised"] = PLAIN_TRUSTED_PASSES["mlc"]
# MLNT first order, per synthetic set m: the inner gradient (a backward from the logits), the look-ahead
# forward and the KL's backward to the fast weights; plus the student forward, the given labels' inner
# gradient and the teacher's no-grad forward (train mode, priced as E). Second order adds a double backward
# through the M inner gradients, which has no price among these passes: no floor.
PASSES["mlnt-first-order"] = {"F": 1 + MLNT_SETS, "B": 1 + 2 * MLNT_SETS, "E": 1}
BASELINE = "ce"
# A row under scaling.precision=bf16-mixed (--bf16 adds one per row): its ratios are to ce+bf16.
BF16_SUFFIX = "+bf16"
# Rows that are a method under given params: row name -> (method, method.params).
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "mlnt-first-order": (
        "mlnt",
        {"start_iter": 0, "mid_iter": 0, "synthetic_sets": MLNT_SETS, "second_order": False},
    ),
    "mlnt-second-order": (
        "mlnt",
        {"start_iter": 0, "mid_iter": 0, "synthetic_sets": MLNT_SETS, "second_order": True},
    ),
    "mlnt-first-order-vmap": (
        "mlnt",
        {"start_iter": 0, "mid_iter": 0, "synthetic_sets": MLNT_SETS, "second_order": False, "vmap": True},
    ),
    "mlnt-second-order-vmap": (
        "mlnt",
        {"start_iter": 0, "mid_iter": 0, "synthetic_sets": MLNT_SETS, "second_order": True, "vmap": True},
    ),
    "mixnn": ("mixnn", {"mixup_epochs": 0, "neighbors": "global"}),
    "mixnn-steps": ("mixnn", {"mixup_epochs": 0, "neighbors": "global", "refresh_from": "steps"}),
    "mixnn-gpu-index": ("mixnn", {"mixup_epochs": 0, "neighbors": "global", "index_gpus": 0.1}),
    "metalabelnet-uncached": ("metalabelnet", {"cache_features": False}),
    "mwnet-example": ("mwnet", {"weighting": "example"}),
    "mwnet-trusted": ("mwnet", {"train_on_trusted": True}),
    "mlc-supervised": ("mlc", {"corrector_supervision": 1.0}),
}


def split_precision(row: str) -> tuple[str, str]:
    """A row without its precision suffix, and its ``scaling.precision``: ``ROW+bf16`` is ROW under
    ``bf16-mixed``, any other row fp32."""
    base = row.removesuffix(BF16_SUFFIX)
    return base, "bf16-mixed" if base != row else "fp32"


def variant(row: str) -> tuple[str, dict[str, Any], int]:
    """A row's method, its ``method.params`` and its ``meta_every``: ``METHOD@kK`` (meta_every K),
    ``METHOD@tN`` (trusted_batch_size N), ``METHOD@kKtN`` (both), else a ``VARIANTS`` row or a method; any of
    them with the ``+bf16`` suffix (``split_precision``)."""
    row = split_precision(row)[0]
    base, suffixed, suffix = row.partition("@")
    method, params = VARIANTS.get(base, (base, {}))
    if not suffixed:
        return method, params, 1
    match = re.fullmatch(r"(?:k(\d+))?(?:t(\d+))?", suffix)
    if method not in AMORTISED or not suffix or match is None or 0 in {int(n) for n in match.groups() if n}:
        raise ValueError(
            f"{row!r}: rows are METHOD@kK (meta_every), METHOD@tN (trusted batch) or METHOD@kKtN, "
            f"K, N >= 1, METHOD one of {AMORTISED} or a VARIANTS row of one"
        )
    k = int(match[1] or 1)
    params = params | ({"meta_every": k} if match[1] else {})
    return method, params | ({"trusted_batch_size": int(match[2])} if match[2] else {}), k


def target_of(row: str) -> float | None:
    """The ratio to CE a row must stay under: its method's step target, or the amortised bar from K = 5."""
    method, _, k = variant(row)
    if k == 1:
        return TARGETS.get(method if method in AMORTISED else row)
    return AMORTISED_TARGET if k >= AMORTISED_TARGET_FROM else None


DEFAULT_METHODS = (
    "ce",
    "glc",
    "mwnet",
    "mlc",
    "metalabelnet",
    "mlnt-first-order",
    "mlnt-second-order",
    "mixnn",
    "mixnn-steps",
)
# Step targets (ratio to CE's step), by row: the look-ahead methods of the meta and MLNT issues.
TARGETS = {
    "mwnet": 2.5,
    "mlc": 2.5,
    "metalabelnet": 2.8,
    "mlnt-first-order": 4.0,
    "mlnt-second-order": 8.0,
    "mlnt-first-order-vmap": 4.0,
    "mlnt-second-order-vmap": 8.0,
}
# Amortised meta updates (``METHOD@kK`` rows): the bar for meta_every = 5, kept for every larger K.
AMORTISED = ("mwnet", "mlc", "metalabelnet")
AMORTISED_TARGET = 1.5
AMORTISED_TARGET_FROM = 5
REFRESH_TARGET = 0.15  # MixNN's refresh, as a share of its epoch
MIB = 2**20
PROGRESS_EVERY = 5  # rounds between progress lines: a full CPU run takes many minutes
MEASURED_STEP = "meta_step: measured step"  # profiler label of the step whose peak is taken


@dataclass(frozen=True)
class ModelSpec:
    """A backbone at the input size and batch the issue names, and the preset it trains under.

    ``num_train``/``num_trusted`` are the data set's sizes after the preset's split (training images minus
    the trusted and validation images per class); they only shape the context (GLC's trusted share, the
    schedule's steps per epoch), since no data is read.
    """

    name: str
    dataset: str
    batch_size: int
    num_classes: int
    num_train: int
    num_trusted: int


MODELS = {
    # Fashion-MNIST: 60,000 training images, 100 trusted + 100 validation per class.
    "small-cnn": ModelSpec("small-cnn", "fashion-mnist", 128, 10, num_train=58_000, num_trusted=1_000),
    # CIFAR-10: 50,000 training images, 100 trusted + 50 validation per class.
    "resnet32": ModelSpec("resnet32", "cifar10", 100, 10, num_train=48_500, num_trusted=1_000),
}

# Full size follows the issue; --small is for CI: a tiny batch and few steps, only to prove the code runs.
FULL = {"repeats": 20, "warmup": 3}
SMALL = {"repeats": 3, "warmup": 1, "batch_size": 8, "mixnn_train": 512}


@dataclass
class MethodRun:
    """One method built for one model, and what was measured on it."""

    name: str
    method: Method
    trusted: Batch | None
    precision: str  # scaling.precision: the step runs under its autocast, as the loop runs it
    stage: Stage  # the stage whose step is timed
    timed_from_epoch: int  # its first epoch
    total_epochs: int
    single_stage: bool  # the method trains in one stage
    # Which steps of one timed "step" get the trusted batch: [True] for one step; an amortised row's cycle
    # of K steps as the method's ``takes_trusted_at`` decides them (the meta update first).
    cycle: list[bool] = field(default_factory=lambda: [True])
    times: list[float] = field(default_factory=list)  # wall seconds, one per round, in round order
    cpu_times: list[float] = field(default_factory=list)  # CPU seconds of the process, same steps
    peak_bytes: int = 0  # above what was allocated when the step started
    held_bytes: int = 0  # tensors in the method's state_dict
    finite: bool = True  # every logged scalar of every step was finite
    refreshes: list[dict[str, float]] = field(default_factory=list)  # MixNN: one refresh log per timed epoch
    # Amortised rows: each cycle's steps, wall seconds in cycle order, one list per round.
    cycle_times: list[list[float]] = field(default_factory=list)

    def step(self, batch: Batch, trusted: Batch | None, index: int = 0) -> dict[str, float]:
        """The loop's step ``index`` of the timed stage (``train_step_at``) in the run's precision; the
        stage's first step, a meta update, unless told otherwise."""
        with autocast(self.precision, self.method.ctx.device):
            return self.method.train_step_at(self.stage, index, batch, trusted)

    @property
    def phase(self) -> str:
        """Which stage and epochs run the step that was timed, and their share of training."""
        if self.single_stage:
            return "every epoch"
        share = (self.total_epochs - self.timed_from_epoch) / self.total_epochs
        epochs = f"epochs {self.timed_from_epoch}-{self.total_epochs - 1} of {self.total_epochs}"
        return f"{self.stage.name}: {epochs} ({share:.0%})"


@dataclass
class Row:
    """One line of the table: a method's step on one model, relative to CE's step on that model."""

    model: str
    method: str
    phase: str
    median_ms: float
    q1_ms: float
    q3_ms: float
    ratio: float  # median step / median CE step
    ratio_q1: float  # inter-quartile range of the per-round ratios
    ratio_q3: float
    cpu_ratio: float | None  # median process-CPU step / CE's; CPU device only
    peak_mib: float
    peak_ratio: float
    held_mib: float
    finite: bool
    floor_ratio: float | None = None  # the PASSES floor / CE's floor; None for methods without a count
    meta_every: int = 1
    meta_step_ms: float | None = None  # amortised rows: the median meta step of the cycles
    plain_step_ms: float | None = None  # amortised rows: the median plain step of the cycles
    plain_ratio: float | None = None  # that plain step / CE's median step

    @property
    def target(self) -> float | None:
        return target_of(self.method)

    @property
    def has_target(self) -> bool:
        return self.target is not None

    @property
    def meets_target(self) -> bool:
        return self.target is None or self.ratio <= self.target


@dataclass
class RefreshRow:
    """MixNN's once-per-epoch refresh on one model, against the epoch's steps (medians over timed epochs)."""

    model: str
    method: str  # the row: mixnn (the refresh's whole-split pass) or mixnn-steps (refresh_from = steps)
    samples: int  # the synthetic training split
    steps_per_epoch: int
    step_ms: float  # the median neighbour step (the steps table's row of the same name)
    parts_s: dict[str, float]  # pass, gmm, index, compose: median seconds
    refresh_s: float
    index_threads: int

    @property
    def steps_s(self) -> float:
        return self.steps_per_epoch * self.step_ms / 1e3

    @property
    def share(self) -> float:
        return self.refresh_s / (self.refresh_s + self.steps_s)

    @property
    def meets_target(self) -> bool:
        return self.share <= REFRESH_TARGET


@dataclass
class Report:
    """What ``main`` measured; the test reads it, users read the printed table."""

    device: str
    threads: int
    rows: list[Row]
    skipped: dict[str, str]  # method -> why it was not measured
    notes: list[str]
    refresh_rows: list[RefreshRow] = field(default_factory=list)

    def missed_targets(self) -> list[Row | RefreshRow]:
        return [r for r in [*self.rows, *self.refresh_rows] if not r.meets_target]


def trainer_threads() -> int:
    """The torch threads one training worker gets here: the driver's default ``cpus_per_worker``.

    ``raynoisy.train.driver`` leaves about half of the node's CPUs to the Ray Data decode tasks (a quarter
    CPU granularity, at most 8) and the worker calls ``torch.set_num_threads`` with that. Timing with
    torch's own default (every core) would measure a configuration training never runs, and on a shared
    machine OpenMP threads that wait for a descheduled sibling make each step many times slower.
    """
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, int(min(8.0, math.floor(4 * cpus / 2) / 4)))


def quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    """(Q1, median, Q3); with fewer than two values all three are the value itself."""
    if len(values) < 2:
        return values[0], values[0], values[0]
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, median, q3


def synthetic_batch(
    n: int, spec: ModelSpec, channels: int, size: int, device: torch.device, seed: int
) -> Batch:
    """Normalised-image-like noise and uniform labels: the step's cost does not depend on the pixels."""
    gen = torch.Generator().manual_seed(seed)
    return Batch(
        x=torch.randn(n, channels, size, size, generator=gen).to(device),
        y=torch.randint(spec.num_classes, (n,), generator=gen).to(device),
        sample_id=torch.arange(n).to(device),
        true_y=torch.full((n,), -1, dtype=torch.long).to(device),
    )


def first_batch_of(batch: Batch, n: int) -> Batch:
    """The first ``n`` samples (views): every method's trusted batch starts with the same samples."""
    return Batch(batch.x[:n], batch.y[:n], batch.sample_id[:n], batch.true_y[:n])


def registered_methods(names: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """The methods that can be built now, CE first (it is the denominator), and why the others cannot.

    Methods are being added while this benchmark runs in CI, so a name that is not registered, or whose
    module does not import yet, is skipped with its reason rather than failing the whole table.
    """
    ordered = [BASELINE, *(n for n in dict.fromkeys(names) if n != BASELINE)]
    ok, skipped = [], {}
    for name in ordered:
        try:
            get_method_class(variant(name)[0])
        except Exception as exc:  # unknown name, or a module still being written
            skipped[name] = f"{type(exc).__name__}: {exc}"
            continue
        ok.append(name)
    if BASELINE not in ok:
        raise RuntimeError(f"the baseline {BASELINE!r} cannot be built: {skipped[BASELINE]}")
    return ok, skipped


def split_of(row: str, mixnn_split: Sequence[Batch], batch: Batch) -> Sequence[Batch]:
    """The training split a row's method is built with: MixNN's refresh split; MetaLabelNet's the timed batch,
    whose encoder features its stage start caches (where it caches); none for the others."""
    method = variant(row)[0]
    return mixnn_split if method == "mixnn" else [batch] if method == "metalabelnet" else ()


def build_run(
    name: str,
    spec: ModelSpec,
    batch_size: int,
    device: torch.device,
    root: str,
    trusted_pool: Batch,
    notes: list[str],
    train_split: Sequence[Batch] = (),
) -> MethodRun:
    """Build ``name`` as the training loop does for one rank and bring it to the stage that is timed.

    ``train_split``: the batches of ``ctx.iter_split("train")`` (``split_of``); when given, its samples
    are the training split (the per-sample store's ids) instead of the data set's nominal size.
    """
    method_name, params, meta_every = variant(name)
    precision = split_precision(name)[1]
    params = dict(params)
    if method_name == "mlnt" and batch_size <= 10:
        params["neighbors"] = batch_size - 1  # the in-batch neighbours must fit the batch
        notes.append(f"{spec.name}/{name}: {batch_size - 1} in-batch neighbours (10 need a batch of 11+)")
    overrides = [f"method.params.{key}={value}" for key, value in params.items()]
    flags = {"data.root": root, "run.output": root, "scaling.precision": precision}
    cfg = resolve_config(
        spec.dataset, method_name, flags=flags | {"optim.batch_size": batch_size}, overrides=overrides
    )
    preset_batch = load_config(spec.dataset, method_name, flags=flags).optim.batch_size
    if preset_batch != batch_size and batch_size == spec.batch_size:
        notes.append(
            f"{spec.name}/{name}: the {spec.dataset} preset trains with batch {preset_batch}; "
            f"timed at {batch_size} like every other method"
        )
    source = get_source(spec.dataset)
    num_train = sum(len(b) for b in train_split) or spec.num_train
    ctx = method_context(
        cfg,
        num_classes=spec.num_classes,
        in_channels=source.channels,
        image_size=source.image_size,
        steps_per_epoch=num_train // batch_size,
        num_train=num_train,
        num_trusted=spec.num_trusted,
        splits={"trusted": [trusted_pool], "train": train_split},
        device=device,
    )
    for service in get_method_class(method_name).services(cfg):
        # The FAISS threads the index actor of a run gets (its CPUs, at least one), not this machine's all.
        threads = max(1, math.floor(service.num_cpus))
        ctx.services[service.name] = service.actor_class(**service.kwargs, num_threads=threads)
    method = build_method(ctx)  # seeded as the worker seeds it: same initial weights for every method
    stages = method.stages(cfg)
    timed = next((s for s in stages if s.selectable), stages[0])
    if train_split and stages.index(timed) > 0:
        # The stages before the timed one train the network, which leaves BatchNorm running statistics that
        # fit its training-mode features. From initialisation they do not (ResNet-32's eval-mode features
        # come out hundreds of times its training-mode ones), and MixNN, which mixes the neighbour features
        # its refresh reads in eval mode into a training-mode forward, diverged within a few steps here. One
        # training-mode pass over the split sets the statistics as those epochs would.
        update_bn([b.x for b in train_split], method.main.net)
    start_stage(method, timed.name)
    size = method.trusted_batch_size(timed)
    if size > len(trusted_pool):
        raise ValueError(f"{name} wants a trusted batch of {size}, more than the pool of {len(trusted_pool)}")
    # A stage on the trusted stream takes its trusted batches as ``batch`` (the synthetic batch stands in)
    # and None as ``trusted``.
    trusted = first_batch_of(trusted_pool, size) if size > 0 and timed.trains_on == "train" else None
    first = sum(s.epochs for s in stages[: stages.index(timed)])
    total = sum(s.epochs for s in stages)
    cycle = [method.takes_trusted_at(timed, step) for step in range(meta_every)]
    if meta_every > 1:
        if not isinstance(method, TrustedMetaMethod):
            raise TypeError(f"{name}: meta_every is a parameter of the trusted-set meta methods only")
        updates = [method.meta_update_at(step) for step in range(meta_every)]
        if updates != [True] + [False] * (meta_every - 1):
            raise RuntimeError(
                f"{name}: expected one meta update per cycle of {meta_every} steps, got {updates}"
            )
    return MethodRun(
        name, method, trusted, precision, timed, first, total, single_stage=len(stages) == 1, cycle=cycle
    )


def synthetic_split(
    n: int, spec: ModelSpec, channels: int, size: int, device: torch.device, chunk: int
) -> list[Batch]:
    """``n`` samples (ids 0..n-1) in batches of ``chunk``, as a rank's whole-split pass reads them."""
    out = []
    for start in range(0, n, chunk):
        batch = synthetic_batch(min(chunk, n - start), spec, channels, size, device, seed=1000 + start)
        batch.sample_id += start
        out.append(batch)
    return out


def time_refreshes(run: MethodRun, epochs: int) -> None:
    """Run MixNN's refresh for ``epochs`` more neighbour epochs (each a new index version); keep its logs."""
    first = run.timed_from_epoch + 1  # start_stage refreshed the timed stage's first epoch already
    for epoch in range(first, first + epochs):
        run.method.on_epoch_start(epoch)
        run.refreshes.append(run.method.on_epoch_end(epoch))


def synchronize(device: torch.device) -> None:
    """Wait for queued CUDA kernels, so that a step's time is its own and not the next one's."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_step(run: MethodRun, batch: Batch, device: torch.device) -> tuple[float, float]:
    """Wall and process-CPU seconds of one ``train_step``, with the device drained before and after; for an
    amortised row, of its whole cycle divided by its length (each step's own time kept in ``cycle_times``).
    """
    steps, cpu_seconds = [], 0.0
    for index, takes_trusted in enumerate(run.cycle):
        synchronize(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        logged = run.step(batch, run.trusted if takes_trusted else None, index)
        synchronize(device)
        steps.append(time.perf_counter() - start)
        cpu_seconds += time.process_time() - cpu_start
        run.finite = run.finite and all(math.isfinite(v) for v in logged.values())
    if len(run.cycle) > 1:
        run.cycle_times.append(steps)
    return sum(steps) / len(steps), cpu_seconds / len(steps)


def pass_times(
    net: nn.Module, batch: Batch, repeats: int, device: torch.device, precision: str = "fp32"
) -> dict[str, float]:
    """Median seconds of each pass in ``PASSES`` on ``batch`` under ``precision``, timed interleaved like the
    steps.

    F: ``net(x)`` in train mode with a graph; B: the cross-entropy backward from it to the parameters (F+B
    timed, F subtracted); J: the engine's forward-mode pass along a random direction of every parameter,
    with the same buffer policy as the methods; E: ``net(x)`` in eval mode under no_grad.
    """
    params = dict(net.named_parameters())
    tangents = {name: torch.randn_like(p) for name, p in params.items()}

    def forward() -> None:
        net(batch.x)

    def forward_backward() -> None:
        loss = F.cross_entropy(net(batch.x)[0], batch.y)
        torch.autograd.grad(loss, list(params.values()))

    def forward_mode() -> None:
        jvp(net, params, tangents, batch.x)

    @torch.no_grad()
    def eval_forward() -> None:
        net.eval()
        try:
            net(batch.x)
        finally:
            net.train()

    passes = {"F": forward, "FB": forward_backward, "J": forward_mode, "E": eval_forward}
    times: dict[str, list[float]] = {name: [] for name in passes}
    for round_ in range(repeats + 1):  # the first round warms up
        for name, run in passes.items():
            synchronize(device)
            start = time.perf_counter()
            with autocast(precision, device):
                run()
            synchronize(device)
            if round_:
                times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(values) for name, values in times.items()}
    return {"F": median["F"], "B": max(0.0, median["FB"] - median["F"]), "J": median["J"], "E": median["E"]}


def pass_counts(row: str, batch_size: int, unaugmented: bool) -> dict[str, float] | None:
    """The passes one step of ``row`` makes by its algorithm (``PASSES``), None without a count. A row with a
    trusted batch of N takes N / ``batch_size`` of its ``TRUSTED_PASSES`` and ``PLAIN_TRUSTED_PASSES``; an
    amortised row's step is the mean over its cycle, (its meta step + (K - 1) ``PLAIN_PASSES``) / K.
    MetaLabelNet reads its encoder's features from its cache instead of an E pass where training does not
    augment (``unaugmented``) and ``cache_features`` is on."""
    row = split_precision(row)[0]
    method, params, k = variant(row)
    # The counts of the method, or of the VARIANTS row the suffixes apply to where it has its own; a row
    # without plain-step counts (no meta_every: CE, MLNT, a variant counted for its one-step row) as counted.
    base = row.partition("@")[0]
    counted = base if base in PASSES else method
    if method not in AMORTISED or counted not in PLAIN_PASSES:
        return dict(PASSES[row]) if row in PASSES else None
    meta, plain = dict(PASSES[counted]), dict(PLAIN_PASSES[counted])
    if params.get("trusted_batch_size"):
        unread = 1 - params["trusted_batch_size"] / batch_size
        for kind, n in TRUSTED_PASSES[counted].items():
            meta[kind] = meta.get(kind, 0) - unread * n
        for kind, n in PLAIN_TRUSTED_PASSES.get(counted, {}).items():
            plain[kind] = plain.get(kind, 0) - unread * n
    if method == "metalabelnet" and unaugmented and params.get("cache_features", True):
        meta["E"] = plain["E"] = 0
    kinds = meta.keys() | plain.keys()
    return {kind: (meta.get(kind, 0) + (k - 1) * plain.get(kind, 0)) / k for kind in kinds}


def floor_seconds(row: str, passes: dict[str, float], batch_size: int, unaugmented: bool) -> float | None:
    """The step's floor: its ``pass_counts`` priced at the measured pass times; None without a count."""
    counts = pass_counts(row, batch_size, unaugmented)
    return None if counts is None else sum(n * passes[kind] for kind, n in counts.items())


def _walk(nodes: Sequence[Any]) -> Iterator[Any]:
    for node in nodes:
        yield node
        yield from _walk(node.children)


def cpu_step_peak(run: MethodRun, batch: Batch) -> int:
    """Peak bytes one CPU step allocates above its start, from the profiler's allocation events.

    Two steps run under the profiler and the second is measured: blocks allocated before profiling began
    (the previous step's gradients, say) have no known size when they are freed, so the first step's level
    is off by a constant, which cancels in the second step's peak minus its starting level. The events come
    from ``experimental_event_tree``, the profiler's raw stream (every allocation and free with its size and
    time); the public ``key_averages`` folds sizes into operators and loses the order, hence the peak.
    """
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile, record_function

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run.step(batch, run.trusted)
        with record_function(MEASURED_STEP):
            run.step(batch, run.trusted)
    nodes = list(_walk(prof.profiler.kineto_results.experimental_event_tree()))
    marker = next(n for n in nodes if n.tag == _EventType.TorchOp and n.name == MEASURED_STEP)
    allocations = sorted(
        (n for n in nodes if n.tag == _EventType.Allocation and n.extra_fields.device.type == "cpu"),
        key=lambda n: n.start_time_ns,
    )
    level, start_level, peak = 0, None, 0
    for node in allocations:
        if node.start_time_ns > marker.end_time_ns:
            break
        if start_level is None and node.start_time_ns >= marker.start_time_ns:
            start_level = peak = level
        level += node.extra_fields.alloc_size
        if start_level is not None:
            peak = max(peak, level)
    return 0 if start_level is None else peak - start_level


def cuda_step_peak(run: MethodRun, batch: Batch, device: torch.device) -> int:
    """Peak bytes one CUDA step allocates above its start, from the caching allocator's high-water mark."""
    synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    run.step(batch, run.trusted)
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def held_bytes(state: Any, seen: set[tuple[str, int]] | None = None) -> int:
    """Bytes of the distinct tensor storages in a (nested) state dict: what the method keeps between steps."""
    seen = set() if seen is None else seen
    if isinstance(state, torch.Tensor):
        storage = state.untyped_storage()
        key = (str(state.device), storage.data_ptr())
        if key in seen:
            return 0
        seen.add(key)
        return storage.nbytes()
    if isinstance(state, dict):
        return sum(held_bytes(v, seen) for v in state.values())
    if isinstance(state, list | tuple):
        return sum(held_bytes(v, seen) for v in state)
    return 0


def measure_model(
    spec: ModelSpec,
    names: Sequence[str],
    args: argparse.Namespace,
    device: torch.device,
    root: str,
    notes: list[str],
) -> tuple[list[Row], list[RefreshRow]]:
    """Build every method for ``spec``, time them round-robin, measure their peaks; one row per method, and
    MixNN's refresh against its epoch."""
    batch_size = args.batch_size or spec.batch_size
    source = get_source(spec.dataset)
    batch = synthetic_batch(batch_size, spec, source.channels, source.image_size, device, seed=0)
    trusted_pool = synthetic_batch(4 * batch_size, spec, source.channels, source.image_size, device, seed=1)
    mixnn_train = args.mixnn_train or spec.num_train
    train_split = (
        synthetic_split(mixnn_train, spec, source.channels, source.image_size, device, max(256, batch_size))
        if any(variant(n)[0] == "mixnn" for n in names)
        else []
    )
    runs = [
        build_run(n, spec, batch_size, device, root, trusted_pool, notes, split_of(n, train_split, batch))
        for n in names
    ]
    for _ in range(args.warmup):
        for run in runs:
            timed_step(run, batch, device)
    for round_ in range(args.repeats):
        gc.collect()  # outside the timed steps, so a collection does not land in one method's step
        shift = round_ % len(runs)
        for run in runs[shift:] + runs[:shift]:
            seconds, cpu_seconds = timed_step(run, batch, device)
            run.times.append(seconds)
            run.cpu_times.append(cpu_seconds)
        if (round_ + 1) % PROGRESS_EVERY == 0 and round_ + 1 < args.repeats:
            ce_ms = 1e3 * statistics.median(runs[0].times)
            print(
                f"[meta_step] {spec.name}: {round_ + 1}/{args.repeats} rounds, CE step {ce_ms:.0f} ms",
                flush=True,
            )
    for run in runs:
        if variant(run.name)[0] == "mixnn":
            time_refreshes(run, args.refreshes)
    for run in runs:
        gc.collect()
        if device.type == "cuda":
            run.peak_bytes = cuda_step_peak(run, batch, device)
        else:
            run.peak_bytes = cpu_step_peak(run, batch)
        run.held_bytes = held_bytes(run.method.state_dict())
    # Every precision's rows are judged against CE in that precision: its step, its peak, its passes.
    bases = {run.precision: run for run in runs if variant(run.name)[0] == BASELINE}
    net = runs[0].method.eval_model()
    passes = {p: pass_times(copy.deepcopy(net), batch, args.repeats, device, p) for p in bases}
    unaugmented = source.transform in UNAUGMENTED_FAMILIES
    for precision, measured in passes.items():
        suffix = "" if precision == "fp32" else f" under {precision}"
        print(
            f"[meta_step] {spec.name} passes{suffix} (median ms): "
            + ", ".join(f"{kind} {1e3 * seconds:.1f}" for kind, seconds in measured.items()),
            flush=True,
        )

    base_floors = {
        p: floor_seconds(BASELINE, measured, batch_size, unaugmented) for p, measured in passes.items()
    }
    rows = []
    for run in runs:
        base = bases[run.precision]
        base_median = statistics.median(base.times)
        base_floor = base_floors[run.precision]
        assert base_floor is not None
        floor = floor_seconds(run.name, passes[run.precision], batch_size, unaugmented)
        q1, median, q3 = quartiles(run.times)
        per_round = [t / b for t, b in zip(run.times, base.times, strict=True)]
        r1, _, r3 = quartiles(per_round)
        meta_ms = plain_ms = None
        if run.cycle_times:
            meta_ms = 1e3 * statistics.median(steps[0] for steps in run.cycle_times)
            plain_ms = 1e3 * statistics.median(t for steps in run.cycle_times for t in steps[1:])
        rows.append(
            Row(
                model=spec.name,
                method=run.name,
                phase=run.phase,
                median_ms=1e3 * median,
                q1_ms=1e3 * q1,
                q3_ms=1e3 * q3,
                ratio=median / base_median,
                ratio_q1=r1,
                ratio_q3=r3,
                cpu_ratio=statistics.median(run.cpu_times) / statistics.median(base.cpu_times)
                if device.type == "cpu"
                else None,
                peak_mib=run.peak_bytes / MIB,
                peak_ratio=run.peak_bytes / base.peak_bytes if base.peak_bytes else math.nan,
                held_mib=run.held_bytes / MIB,
                finite=run.finite,
                floor_ratio=None if floor is None else floor / base_floor,
                meta_every=len(run.cycle),
                meta_step_ms=meta_ms,
                plain_step_ms=plain_ms,
                plain_ratio=None if plain_ms is None else plain_ms / (1e3 * base_median),
            )
        )
    refresh = [refresh_row(spec, run, 1e3 * statistics.median(run.times)) for run in runs if run.refreshes]
    return rows, refresh


def refresh_row(spec: ModelSpec, run: MethodRun, step_ms: float) -> RefreshRow:
    """MixNN's refresh on ``spec`` from the logs ``time_refreshes`` kept: medians over the timed epochs."""
    parts = {
        part: statistics.median(log[f"refresh_{part}_seconds"] for log in run.refreshes)
        for part in ("pass", "gmm", "index", "compose")
    }
    ctx = run.method.ctx
    service = get_method_class("mixnn").services(ctx.cfg)[0]
    return RefreshRow(
        model=spec.name,
        method=run.name,
        samples=ctx.num_train,
        steps_per_epoch=ctx.num_train // ctx.local_batch_size,
        step_ms=step_ms,
        parts_s=parts,
        refresh_s=statistics.median(log["refresh_seconds"] for log in run.refreshes),
        index_threads=max(1, math.floor(service.num_cpus)),
    )


def format_refresh_table(rows: Sequence[RefreshRow]) -> str:
    header = (
        "| model | method | train samples | steps/epoch | step ms | steps s | pass s | GMM s | index s "
        f"| compose s | refresh s | refresh share of epoch | target <= {REFRESH_TARGET:.0%} |"
    )
    lines = [header, "|" + "|".join("---" for _ in range(header.count("|") - 1)) + "|"]
    for r in rows:
        p = r.parts_s
        lines.append(
            f"| {r.model} | {r.method} | {r.samples} | {r.steps_per_epoch} | {r.step_ms:.1f} "
            f"| {r.steps_s:.2f} | {p['pass']:.2f} | {p['gmm']:.3f} | {p['index']:.2f} | {p['compose']:.3f} "
            f"| {r.refresh_s:.2f} | {r.share:.1%} | {'yes' if r.meets_target else '**no**'} |"
        )
    return "\n".join(lines)


def format_table(report: Report) -> str:
    header = (
        "| model | method | step timed | step ms (median) | IQR ms | ratio vs CE (IQR) | CPU-time ratio "
        "| pass floor vs CE | step peak MiB | peak ratio vs CE | held MiB | target vs CE |"
    )
    lines = [header, "|" + "|".join("---" for _ in range(header.count("|") - 1)) + "|"]
    for r in report.rows:
        target = f"<= {r.target:.1f}x: {'yes' if r.meets_target else '**no**'}" if r.has_target else "-"
        method = r.method if r.finite else f"{r.method} (non-finite loss)"
        cpu_ratio = "-" if r.cpu_ratio is None else f"{r.cpu_ratio:.2f}x"
        floor = "-" if r.floor_ratio is None else f"{r.floor_ratio:.2f}x"
        lines.append(
            f"| {r.model} | {method} | {r.phase} | {r.median_ms:.1f} | {r.q1_ms:.1f}-{r.q3_ms:.1f} "
            f"| {r.ratio:.2f}x ({r.ratio_q1:.2f}-{r.ratio_q3:.2f}) | {cpu_ratio} | {floor} "
            f"| {r.peak_mib:.1f} | {r.peak_ratio:.2f}x | {r.held_mib:.2f} | {target} |"
        )
    return "\n".join(lines)


def format_amortised_table(rows: Sequence[Row]) -> str:
    """The amortised rows' cycles split into their meta step and plain steps (medians over the rounds)."""
    header = (
        "| model | row | K | meta step ms | plain step ms | plain step vs CE | amortised ms "
        "| amortised vs CE | target vs CE |"
    )
    lines = [header, "|" + "|".join("---" for _ in range(header.count("|") - 1)) + "|"]
    for r in rows:
        assert r.meta_step_ms is not None and r.plain_step_ms is not None and r.plain_ratio is not None
        target = f"<= {r.target:.1f}x: {'yes' if r.meets_target else '**no**'}" if r.has_target else "-"
        lines.append(
            f"| {r.model} | {r.method} | {r.meta_every} | {r.meta_step_ms:.1f} | {r.plain_step_ms:.1f} "
            f"| {r.plain_ratio:.2f}x | {r.median_ms:.1f} | {r.ratio:.2f}x | {target} |"
        )
    return "\n".join(lines)


def format_precision_table(rows: Sequence[Row]) -> str:
    """Each ``+bf16`` row beside its fp32 twin: what bf16-mixed saves in time and memory."""
    by_name = {(r.model, r.method): r for r in rows}
    header = (
        "| model | row | fp32 step ms | bf16-mixed step ms | speed-up | fp32 peak MiB | bf16-mixed peak MiB "
        "| ratio vs CE, fp32 | ratio vs CE, bf16-mixed |"
    )
    lines = [header, "|" + "|".join("---" for _ in range(header.count("|") - 1)) + "|"]
    for mixed in rows:
        base, precision = split_precision(mixed.method)
        single = by_name.get((mixed.model, base))
        if precision == "fp32" or single is None:
            continue
        lines.append(
            f"| {mixed.model} | {base} | {single.median_ms:.1f} | {mixed.median_ms:.1f} "
            f"| {single.median_ms / mixed.median_ms:.2f}x | {single.peak_mib:.1f} | {mixed.peak_mib:.1f} "
            f"| {single.ratio:.2f}x | {mixed.ratio:.2f}x |"
        )
    return "\n".join(lines)


def with_bf16_rows(names: Sequence[str], every: bool) -> list[str]:
    """``names``, then a ``ROW+bf16`` twin of every row if ``every``; ``ce+bf16`` (the bf16 rows' baseline)
    goes before the first bf16 row."""
    out = list(names) + ([f"{name}{BF16_SUFFIX}" for name in names] if every else [])
    mixed = [index for index, name in enumerate(out) if split_precision(name)[1] != "fp32"]
    if mixed:
        out.insert(mixed[0], BASELINE + BF16_SUFFIX)
    return list(dict.fromkeys(out))


def with_amortised_rows(names: Sequence[str], ks: Sequence[int], trusted: Sequence[int] = ()) -> list[str]:
    """``names`` with ``METHOD@kK`` after each trusted-set meta method among them, for every K in ``ks``,
    and ``METHOD@tN`` for every N in ``trusted``."""
    out: list[str] = []
    for name in names:
        out.append(name)
        if name in AMORTISED:
            out.extend(f"{name}@k{k}" for k in ks)
            out.extend(f"{name}@t{n}" for n in trusted)
    return list(dict.fromkeys(out))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="default: cuda if available",
    )
    parser.add_argument("--repeats", type=int, help=f"timed steps per method (default {FULL['repeats']})")
    parser.add_argument(
        "--warmup", type=int, help=f"untimed steps per method first (default {FULL['warmup']})"
    )
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    parser.add_argument(
        "--methods",
        nargs="+",
        default=list(DEFAULT_METHODS),
        help=f"default {' '.join(DEFAULT_METHODS)}; ce is always measured; unregistered ones are skipped",
    )
    parser.add_argument("--batch-size", type=int, help="override every model's batch (default: the issue's)")
    parser.add_argument(
        "--meta-every",
        type=int,
        nargs="+",
        default=[],
        metavar="K",
        help=f"also time {', '.join(AMORTISED)} with meta_every = K, amortised per step (rows METHOD@kK; "
        "such rows may also be named in --methods)",
    )
    parser.add_argument(
        "--trusted-batch",
        type=int,
        nargs="+",
        default=[],
        metavar="N",
        help=f"also time {', '.join(AMORTISED)} with method.params.trusted_batch_size = N (rows METHOD@tN; "
        "METHOD@kKtN rows combine both and may be named in --methods)",
    )
    parser.add_argument(
        "--bf16",
        action="store_true",
        help="also time every row under scaling.precision=bf16-mixed (rows ROW+bf16, judged against ce+bf16; "
        "ROW+bf16 rows may also be named in --methods)",
    )
    parser.add_argument(
        "--mixnn-train",
        type=int,
        help="samples of MixNN's synthetic training split (default: the data set's nominal training size)",
    )
    parser.add_argument(
        "--refreshes", type=int, default=2, help="MixNN refreshes timed per model (default %(default)s)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=trainer_threads(),
        help="torch intra-op threads (default %(default)s: what the trainer gives one worker here)",
    )
    parser.add_argument(
        "--small",
        action="store_true",
        help=f"CI size: batch {SMALL['batch_size']}, {SMALL['warmup']} warm-up and {SMALL['repeats']} timed "
        "steps per method",
    )
    args = parser.parse_args(argv)
    sizes = SMALL if args.small else FULL
    for key, value in sizes.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.refreshes < 1 or (args.mixnn_train is not None and args.mixnn_train < 2):
        parser.error("--refreshes must be >= 1, --mixnn-train >= 2")
    if any(k < 2 for k in args.meta_every):
        parser.error("--meta-every K needs K >= 2 (K = 1 is the method's own row)")
    if any(n < 2 for n in args.trusted_batch):
        parser.error("--trusted-batch N needs N >= 2: MLC splits its trusted batch in halves")
    args.methods = with_amortised_rows(args.methods, args.meta_every, args.trusted_batch)
    args.methods = with_bf16_rows(args.methods, args.bf16)
    for name in args.methods:
        try:
            variant(name)
        except ValueError as error:
            parser.error(str(error))
    if args.repeats < 1 or args.warmup < 0 or args.threads < 1:
        parser.error("--repeats and --threads must be >= 1, --warmup >= 0")
    if args.batch_size is not None and args.batch_size < 2:
        parser.error("--batch-size must be >= 2: MLC splits its trusted batch in halves")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device")
    on_gpu = [name for name in args.methods if variant(name)[1].get("index_gpus")]
    if on_gpu and args.device != "cuda":
        parser.error(f"{', '.join(on_gpu)}: the index's GPU share needs --device cuda")
    return args


def main(argv: Sequence[str] | None = None) -> Report:
    """Run the benchmark, print its table, and return what was measured.

    The torch thread count is process-wide, so it is restored afterwards: a test that calls ``main`` must not
    change how the rest of its session runs.
    """
    args = parse_args(argv)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return run(args)
    finally:
        torch.set_num_threads(previous_threads)


def run(args: argparse.Namespace) -> Report:
    """Measure every model with every registered method and print the table."""
    device = torch.device(args.device)
    names, skipped = registered_methods(args.methods)
    for name, why in skipped.items():
        print(f"[meta_step] skipping {name}: not registered yet ({why})", flush=True)
    threads = torch.get_num_threads()
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"[meta_step] {where}, {threads} torch threads; torch {torch.__version__}; "
        f"methods {', '.join(names)}; {args.warmup} warm-up + {args.repeats} timed steps each, "
        "round-robin, medians",
        flush=True,
    )
    rows: list[Row] = []
    refresh_rows: list[RefreshRow] = []
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="raynoisy-meta-step-") as root:
        for model in args.models:
            spec = MODELS[model]
            batch = args.batch_size or spec.batch_size
            print(f"[meta_step] {model}: batch {batch}, preset {spec.dataset} ...", flush=True)
            model_rows, model_refresh = measure_model(spec, names, args, device, root, notes)
            rows.extend(model_rows)
            refresh_rows.extend(model_refresh)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    report = Report(str(device), threads, rows, skipped, notes, refresh_rows)
    print(format_table(report), flush=True)
    memory = (
        "torch.cuda.max_memory_allocated" if device.type == "cuda" else "torch.profiler allocation events"
    )
    print(
        f"step peak = memory a step allocates above what is allocated at its start ({memory}); held = "
        "tensors in the method's state_dict; step timed = the first stage the method may select its model "
        "from (GLC corrected, MetaLabelNet meta; earlier stages run a CE step); CPU-time ratio = the same "
        "ratio of medians by process CPU time, which other processes' load does not stretch (a "
        "cross-check: the target is judged on wall time); pass floor = the passes the method's algorithm "
        "needs (F forward, B backward, J forward-mode, E no-grad eval forward; PASSES in meta_step.py) "
        "priced at the measured pass times, relative to CE's F + B: the step's cost if nothing else took "
        "time",
        flush=True,
    )
    if any(split_precision(r.method)[1] != "fp32" for r in rows):
        print(format_precision_table(rows), flush=True)
        print(
            "bf16-mixed = train_step under torch.autocast(bfloat16), as scaling.precision=bf16-mixed runs it "
            "(parameters, gradients and optimizer state float32); a ROW+bf16 row's ratios, peak ratio, floor "
            "and target are against ce+bf16; speed-up = fp32 step / bf16-mixed step",
            flush=True,
        )
    amortised = [r for r in rows if r.meta_every > 1]
    if amortised:
        print(format_amortised_table(amortised), flush=True)
        print(
            "amortised = one cycle of K real steps (a meta update, then K - 1 plain steps with the meta "
            "network as it is; trusted batches only where the method's takes_trusted_at asks) timed together "
            "/ K, i.e. (meta step + (K - 1) plain steps) / K, against CE's step of the same rounds; meta and "
            "plain step = medians of the cycles' own steps",
            flush=True,
        )
    if refresh_rows:
        print(format_refresh_table(refresh_rows), flush=True)
        threads = ", ".join(f"{r.model} {r.index_threads}" for r in refresh_rows)
        print(
            "mixnn refresh = once per epoch before its steps: pass (eval forward over the split; "
            "mixnn-steps: reading the features its previous epoch's steps recorded, no forward), GMM "
            "(losses, their store scatter, the GMM fit), index (add + build + search of every sample, in "
            f"this process on the index actor's FAISS threads: {threads}), compose (the store writes of "
            "neighbour ids and features the steps mix); steps s = steps/epoch x the row's median step; "
            "share = refresh / (refresh + steps s); medians over --refreshes epochs",
            flush=True,
        )
    for note in notes:
        print(f"note: {note}", flush=True)
    for row in report.missed_targets():
        if isinstance(row, RefreshRow):
            share = f"{row.share:.1%} of its epoch > {REFRESH_TARGET:.0%}"
            print(f"TARGET MISSED: {row.model}/{row.method} refresh is {share}", flush=True)
        else:
            print(
                f"TARGET MISSED: {row.model}/{row.method} step is {row.ratio:.2f}x CE > {row.target}x",
                flush=True,
            )
    return report


if __name__ == "__main__":
    sys.exit(1 if main().missed_targets() else 0)
