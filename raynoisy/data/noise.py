"""Synthetic label noise: the literature's protocols, each under its own name, seeded and vectorised.

Papers that all say "40% symmetric noise" corrupt different fractions of their labels: the GLC/MW-Net/MLC
``unif`` protocol may redraw the true class (actual rate p(1-1/K)), MetaLabelNet's ``symmetric`` moves
exactly r of every class. Comparing methods across papers is only honest if each protocol keeps its own
name and the realised rate is measured and reported next to the nominal one, so this module never
aliases one protocol to another and ships ``empirical_transition``/``actual_noise_rate`` for the report.

Every protocol is described by a row-stochastic transition matrix ``T`` with ``T[i, j] = P(given=j |
true=i)``. Sampling draws all randomness from the caller's ``numpy.random.Generator`` so the same seed
gives bit-identical labels wherever it runs; loops run over classes, never over samples, because
WebVision-sized catalogs have millions of rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from raynoisy.data.catalog import UNKNOWN_LABEL
from raynoisy.errors import ConfigError

NOISE_TYPES = ("none", "uniform", "symmetric", "flip", "pair", "matrix")

# Tolerance on row sums of user-supplied matrices: a CSV written with d decimals is off by up to K·0.5·10^-d
# per row (10 classes at 6 decimals: 5e-6); rows within it are renormalised to sum to 1 exactly.
_ROW_SUM_TOL = 1e-4

# Patrini et al.'s CIFAR-10 class-dependent map, as DivideMix/MixNN/MetaLabelNet code it:
# truck->automobile, bird->airplane, deer->horse, cat->dog, dog->cat; other classes stay clean.
_CIFAR10_PAIRS = {9: 1, 2: 0, 4: 7, 3: 5, 5: 3}
# DivideMix's CIFAR-100 asymmetric noise cycles within groups of consecutive indices, not super-classes.
_CIFAR100_GROUP = 5

_MATRIX_FIX = "provide a KxK row-stochastic matrix (row = true class, column = given class) as .npy or .csv"


@dataclass(frozen=True)
class NoiseSpec:
    """Which noise protocol to inject and at which nominal rate.

    Validation lives in ``__post_init__`` so a spec built directly (not via ``parse``) cannot carry an
    unknown protocol or a rate outside [0, 1] into a Ray job.

    Attributes:
        type: one of ``NOISE_TYPES``.
        rate: nominal noise rate; ignored by ``none`` and ``matrix`` (the matrix file defines it).
        matrix_path: the transition-matrix file, required by and only allowed with ``matrix``.
    """

    type: str
    rate: float = 0.0
    matrix_path: str | None = None

    def __post_init__(self) -> None:
        if self.type not in NOISE_TYPES:
            raise ConfigError(
                "noise.type",
                f"unknown noise type {self.type!r}",
                f"use one of {', '.join(NOISE_TYPES[:-1])} or matrix:PATH",
            )
        if not _is_unit_rate(self.rate):
            raise ConfigError("noise.rate", f"rate {self.rate!r} is outside [0, 1]", "use a rate in [0, 1]")
        if self.type == "matrix" and not self.matrix_path:
            raise ConfigError("noise.type", "matrix noise needs a matrix file", "write matrix:PATH")
        if self.type != "matrix" and self.matrix_path is not None:
            raise ConfigError(
                "noise.type",
                f"a matrix file is only used by matrix noise, not {self.type!r}",
                "drop the path or use matrix:PATH",
            )

    @classmethod
    def parse(cls, text: str, rate: float) -> NoiseSpec:
        """Parse the CLI/config form ``none|uniform|symmetric|flip|pair|matrix:PATH``.

        Only the first colon separates the type from the path, so Windows paths (``matrix:C:\\T.npy``)
        survive.
        """
        kind, sep, path = text.strip().partition(":")
        kind = kind.strip().lower()
        if kind == "matrix":
            return cls(type="matrix", rate=rate, matrix_path=path.strip() or None)
        if sep:
            raise ConfigError(
                "noise.type", f"unknown noise type {text!r}", "only matrix takes a path (matrix:PATH)"
            )
        return cls(type=kind, rate=rate)


def transition_matrix(
    spec: NoiseSpec,
    num_classes: int,
    *,
    dataset: str | None = None,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """The protocol's defined ``num_classes x num_classes`` transition matrix ``T[true, given]``.

    ``flip`` draws its class map from ``rng`` (and is the only protocol that consumes it), so the
    realised matrix of an ``apply_noise`` call is ``transition_matrix`` called with a generator in the
    same state. ``dataset`` selects the published ``pair`` maps for CIFAR-10/100.
    """
    k, r = num_classes, float(spec.rate)
    eye = np.eye(k)
    if spec.type == "none":
        return eye
    if spec.type == "uniform":
        return r / k * np.ones((k, k)) + (1.0 - r) * eye
    if spec.type == "matrix":
        return _load_matrix(spec.matrix_path or "", k)
    _require_other_class(spec, k)
    if spec.type == "symmetric":
        return (1.0 - r) * eye + r / (k - 1) * (np.ones((k, k)) - eye)
    if spec.type == "flip":
        if rng is None:
            raise ValueError("flip noise draws its class map from rng; pass a numpy Generator")
        # A uniform draw over the k-1 other classes: shift draws at or above i past i itself.
        draw = rng.integers(0, k - 1, size=k)
        targets = draw + (draw >= np.arange(k))
        return _pairs_matrix(k, r, np.arange(k), targets)
    sources, targets = _pair_map(k, dataset)
    return _pairs_matrix(k, r, sources, targets)


def apply_noise(
    true_labels: np.ndarray,
    num_classes: int,
    spec: NoiseSpec,
    rng: np.random.Generator,
    *,
    dataset: str | None = None,
) -> np.ndarray:
    """Return noisy given labels for ``true_labels``; deterministic given the state of ``rng``.

    ``symmetric`` moves exactly round(r * n_c) samples of each class c and spreads them over the other
    classes as evenly as counts allow (MetaLabelNet's exact protocol). Every other protocol draws each
    sample's label independently from its row of ``transition_matrix``, which that function builds from
    the same ``rng`` first.
    """
    true = np.asarray(true_labels, dtype=np.int64)
    if true.size and (true.min() < 0 or true.max() >= num_classes):
        raise ValueError(f"true labels must lie in [0, {num_classes}) to inject noise; unknown labels are -1")
    if spec.type == "none":
        return true.copy()
    if spec.type == "symmetric":
        _require_other_class(spec, num_classes)
        return _symmetric_exact(true, num_classes, float(spec.rate), rng)
    return _sample_rows(true, transition_matrix(spec, num_classes, dataset=dataset, rng=rng), rng)


def empirical_transition(true: np.ndarray, given: np.ndarray, num_classes: int) -> np.ndarray:
    """Row-normalised counts of (true, given) pairs; rows of classes with no samples stay all zero.

    Pairs where either label is unknown (-1) carry no information about the corruption and are skipped.
    """
    true = np.asarray(true, dtype=np.int64)
    given = np.asarray(given, dtype=np.int64)
    known = (true >= 0) & (true < num_classes) & (given >= 0) & (given < num_classes)
    counts = np.bincount(
        true[known] * num_classes + given[known], minlength=num_classes * num_classes
    ).reshape(num_classes, num_classes)
    totals = counts.sum(axis=1, keepdims=True)
    return np.divide(counts, totals, out=np.zeros((num_classes, num_classes)), where=totals > 0)


def actual_noise_rate(true: np.ndarray, given: np.ndarray) -> float:
    """Fraction of samples with a known true label whose given label differs; NaN when none is known."""
    true = np.asarray(true, dtype=np.int64)
    given = np.asarray(given, dtype=np.int64)
    known = true != UNKNOWN_LABEL
    if not known.any():
        return float("nan")
    return float(np.mean(given[known] != true[known]))


@dataclass
class NoiseReport:
    """What was asked for next to what happened, for the run manifest and the sweep tables.

    Attributes:
        type: the protocol name (``NOISE_TYPES``).
        rate: the nominal rate.
        actual_rate: ``actual_noise_rate`` of the realised labels (NaN if no true label is known).
        transition: the protocol's defined matrix, or None where there is none (natural noise).
        empirical: ``empirical_transition`` of the realised labels.
    """

    type: str
    rate: float
    actual_rate: float
    transition: np.ndarray | None
    empirical: np.ndarray

    @classmethod
    def from_labels(
        cls,
        spec: NoiseSpec,
        true: np.ndarray,
        given: np.ndarray,
        num_classes: int,
        transition: np.ndarray | None = None,
    ) -> NoiseReport:
        """Measure realised labels against ``spec``, so callers cannot pair a rate with the wrong labels."""
        return cls(
            type=spec.type,
            rate=float(spec.rate),
            actual_rate=actual_noise_rate(true, given),
            transition=transition,
            empirical=empirical_transition(true, given, num_classes),
        )

    def to_dict(self) -> dict:
        """Plain lists and floats; NaN becomes None because strict JSON has no NaN."""
        return {
            "type": self.type,
            "rate": self.rate,
            "actual_rate": None if math.isnan(self.actual_rate) else self.actual_rate,
            "transition": None if self.transition is None else np.asarray(self.transition).tolist(),
            "empirical": np.asarray(self.empirical).tolist(),
        }


def _is_unit_rate(rate: object) -> bool:
    """True for a finite real number in [0, 1]; numpy scalars count, strings and bools do not."""
    if isinstance(rate, bool) or not isinstance(rate, int | float | np.integer | np.floating):
        return False
    return math.isfinite(rate) and 0.0 <= rate <= 1.0


def _require_other_class(spec: NoiseSpec, k: int) -> None:
    """Protocols that always move a label somewhere else are undefined with a single class."""
    if k < 2:
        raise ConfigError(
            "noise.type", f"{spec.type} noise moves labels to another class but there is only {k}", "use none"
        )


def _pairs_matrix(k: int, rate: float, sources: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Identity, except that row ``sources[m]`` sends ``rate`` of its mass to ``targets[m]``."""
    t = np.eye(k)
    t[sources, sources] = 1.0 - rate
    t[sources, targets] += rate
    return t


def _pair_map(k: int, dataset: str | None) -> tuple[np.ndarray, np.ndarray]:
    """Source and target classes of the ``pair`` protocol for this data set."""
    name = (dataset or "").lower().replace("-", "").replace("_", "")
    expected = {"cifar10": 10, "cifar100": 100}.get(name)
    if expected is not None and k != expected:
        raise ConfigError(
            "noise.type",
            f"the {name} pair map needs {expected} classes, the data has {k}",
            f"keep all {expected} {name} classes when using pair noise",
        )
    classes = np.arange(k)
    if name == "cifar10":
        sources = np.array(sorted(_CIFAR10_PAIRS))
        return sources, np.array([_CIFAR10_PAIRS[s] for s in sources])
    if name == "cifar100":
        base = classes - classes % _CIFAR100_GROUP
        return classes, base + (classes + 1) % _CIFAR100_GROUP
    return classes, (classes + 1) % k


def _load_matrix(path: str, k: int) -> np.ndarray:
    """Load and check a user transition matrix; every failure names the file and what is wrong with it."""

    def bad(problem: str) -> ConfigError:
        return ConfigError("noise.type", f"matrix file {path}: {problem}", _MATRIX_FIX)

    suffix = Path(path).suffix.lower()
    if suffix not in (".npy", ".csv"):
        raise bad(f"unsupported extension {suffix or '(none)'!r}")
    try:
        if suffix == ".npy":
            raw = np.load(path, allow_pickle=False)
        else:
            raw = np.loadtxt(path, delimiter=",", ndmin=2)
        t = np.asarray(raw, dtype=np.float64)
    except (OSError, ValueError, TypeError) as exc:
        raise bad(f"cannot be read ({exc})") from exc
    if t.ndim != 2 or t.shape[0] != t.shape[1]:
        raise bad(f"has shape {'x'.join(map(str, t.shape))}, not a square matrix")
    if t.shape[0] != k:
        raise bad(f"is {t.shape[0]}x{t.shape[1]} but the data set has {k} classes")
    if not np.isfinite(t).all():
        raise bad("contains NaN or infinite entries")
    if (t < 0).any():
        row, col = np.argwhere(t < 0)[0]
        raise bad(f"has a negative entry {t[row, col]:g} at row {row}, column {col}")
    sums = t.sum(axis=1)
    off = np.flatnonzero(np.abs(sums - 1.0) > _ROW_SUM_TOL)
    if off.size:
        raise bad(f"row {off[0]} sums to {sums[off[0]]:.9g}, not 1")
    return t / sums[:, None]


def _sample_rows(true: np.ndarray, t: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Draw ``given[n] ~ t[true[n]]`` by inverse CDF: one uniform per sample, one search per class."""
    u = rng.random(true.size)
    cum = np.cumsum(t, axis=1)
    # Dividing by the row total makes the last edge exactly 1.0, so u in [0, 1) can never land past the
    # last class with non-zero mass, however the row sum was rounded.
    cum /= cum[:, -1:]
    given = np.empty_like(true)
    order = np.argsort(true, kind="stable")
    bounds = np.searchsorted(true[order], np.arange(t.shape[0] + 1))
    for c in range(t.shape[0]):
        rows = order[bounds[c] : bounds[c + 1]]
        # side="right" skips zero-mass classes, whose edge equals the previous one.
        given[rows] = np.searchsorted(cum[c], u[rows], side="right")
    return given


def _symmetric_exact(true: np.ndarray, k: int, rate: float, rng: np.random.Generator) -> np.ndarray:
    """Move exactly round(rate * n_c) samples of each class c, spread evenly over the k-1 other classes.

    Samples are ranked within their class by a random key; the first ``moved[c]`` ranks move, and rank
    modulo k-1 (rotated by a random per-class offset, so no target class is favoured by the remainder)
    picks the target, so each (c, j) count is within one of moved[c] / (k-1).
    """
    n = true.size
    counts = np.bincount(true, minlength=k)
    moved = np.floor(rate * counts + 0.5).astype(np.int64)
    keys = rng.random(n)
    shift = rng.integers(0, k - 1, size=k)
    order = np.lexsort((keys, true))
    sorted_true = true[order]
    rank = np.arange(n) - np.searchsorted(sorted_true, sorted_true, side="left")
    chosen = rank < moved[sorted_true]
    offset = (rank[chosen] + shift[sorted_true[chosen]]) % (k - 1)
    source = sorted_true[chosen]
    given = true.copy()
    given[order[chosen]] = offset + (offset >= source)
    return given
