"""Deciding, once and for every sample, which split it belongs to.

The reference MLC code builds its meta (clean) set and its noisy training set from two dataset objects
that shuffle with different seeds, so most of the "clean" images are also trained on with noisy labels.
Here a single function writes exactly one split name per sample into one array, so the splits are
disjoint by construction, and every random choice comes from a seeded stream of its own: asking for a
validation set does not move the test set, changing the clean-set size does not move the validation set.

Selections use "random key per sample, smallest keys per class win" rather than ``Generator.choice``:
a sample's key depends only on (seed, purpose, sample_id), never on which other samples are eligible,
so shrinking an earlier carve-out changes a later one only where the two compete for the same sample.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from raynoisy.data.catalog import ORIGIN_TEST, ORIGIN_TRAIN, ORIGIN_TRUSTED, ORIGIN_VAL, Catalog
from raynoisy.errors import ConfigError

TRUSTED = "trusted"
VAL = "val"
TEST = "test"
TRAIN = "train"
UNUSED = "unused"
SPLITS = (TRAIN, TRUSTED, VAL, TEST, UNUSED)

# One random stream per purpose, derived from the seed. The numbers are part of the on-disk contract:
# renumbering them would silently change every split drawn from an existing seed.
_STREAM_TEST = 0
_STREAM_VAL = 1
_STREAM_TRUSTED = 2
_STREAM_SUBSET = 3


@dataclass(frozen=True)
class SplitSpec:
    """How large the carved-out splits are; validated on construction so bad values fail before Ray starts.

    Attributes:
        clean_per_class: trusted samples per class (subsample of a shipped trusted set, or drawn from
            the training pool when the data set ships none). 0 means no trusted set: none is drawn, so
            train, val and test are the samples they are without one, and a shipped trusted set (Clothing1M's
            ``clean_train``) is left unused rather than merged into training, which would change the
            benchmark's training set and put clean labels into the "noisy" split.
        clean_fraction: alternatively, a stratified fraction in (0, 1) of the eligible trusted pool.
        val_per_class: validation samples per class, drawn from the training pool when the data set
            ships no validation set (ignored when it does: a shipped val set is the benchmark's own).
        test_fraction: stratified fraction in (0, 1) of the training pool held out as test when the data
            set ships no test set.
        train_subset: keep a class-balanced subset of this many training rows; the rest become unused.
    """

    clean_per_class: int | None = None
    clean_fraction: float | None = None
    val_per_class: int | None = None
    test_fraction: float = 0.2
    train_subset: int | None = None

    def __post_init__(self) -> None:
        for field, flag, value, least in (
            ("split.clean_per_class", "--clean-per-class", self.clean_per_class, 0),
            ("split.val_per_class", "--val-per-class", self.val_per_class, 1),
            ("split.train_subset", "--train-subset", self.train_subset, 1),
        ):
            if value is not None and (
                _is_bool(value) or not isinstance(value, int | np.integer) or value < least
            ):
                kind = "a non-negative" if least == 0 else "a positive"
                raise ConfigError(field, f"{value!r} is not {kind} integer", f"set {flag} to {least} or more")
        for field, flag, value in (
            ("split.clean_fraction", "--clean-fraction", self.clean_fraction),
            ("split.test_fraction", "--test-fraction", self.test_fraction),
        ):
            if value is not None and not _is_open_unit(value):
                raise ConfigError(
                    field, f"{value!r} is outside (0, 1)", f"set {flag} strictly between 0 and 1"
                )
        if self.clean_per_class is not None and self.clean_fraction is not None:
            raise ConfigError(
                "split.clean_fraction",
                "set together with split.clean_per_class",
                "give only one of --clean-per-class and --clean-fraction",
            )


def assign_splits(catalog: Catalog, spec: SplitSpec, seed: int) -> np.ndarray:
    """Return one split name (``SPLITS``) per sample, in ``sample_id`` order, as an object array.

    Carve-outs happen in a fixed order, each from what the previous ones left of the training pool
    (origin ``train``): test (origin ``test``, else a stratified ``test_fraction`` by true label), val
    (origin ``val``, else ``val_per_class`` by true label), trusted (origin ``trusted``, optionally
    subsampled, else ``clean_per_class``/``clean_fraction`` of the pool samples with a trusted annotator
    label, or with a known true label when the catalog has no trusted labels), then train (optionally a
    class-balanced ``train_subset`` by the given label). Everything not chosen is ``unused``.

    The output depends only on (catalog, spec, seed), so the driver computes it once and every worker
    reads the same assignment from the shards.
    """
    n, k = catalog.num_samples, catalog.num_classes
    origin = catalog.origin
    true = catalog.true_label
    splits = np.full(n, UNUSED, dtype=object)
    pool = origin == ORIGIN_TRAIN

    shipped_test = origin == ORIGIN_TEST
    if shipped_test.any():
        splits[shipped_test] = TEST
    else:
        # Unknown true labels (-1) form a stratum of their own, so they are held out in proportion too.
        strata = true + 1
        quota = _fraction_quota(np.bincount(strata[pool], minlength=k + 1), spec.test_fraction)
        test = _take_per_class(pool, strata, quota, _keys(seed, _STREAM_TEST, n))
        splits[test] = TEST
        pool &= ~test

    shipped_val = origin == ORIGIN_VAL
    if shipped_val.any():
        splits[shipped_val] = VAL
    elif spec.val_per_class is not None:
        eligible = pool & (true >= 0)
        counts = np.bincount(true[eligible], minlength=k)
        _require_per_class(counts, spec.val_per_class, catalog, "split.val_per_class", "--val-per-class")
        val = _take_per_class(eligible, true, np.full(k, spec.val_per_class), _keys(seed, _STREAM_VAL, n))
        splits[val] = VAL
        pool &= ~val

    shipped_trusted = origin == ORIGIN_TRUSTED
    if shipped_trusted.any():
        # A shipped trusted set's own label is trusted by definition; prefer the true label where known.
        clean_class = np.where(true >= 0, true, catalog.label)
        splits[_draw_trusted(catalog, spec, seed, shipped_trusted, clean_class)] = TRUSTED
    elif spec.clean_per_class is not None or spec.clean_fraction is not None:
        clean_class = catalog.trusted_label if catalog.trusted_label is not None else true
        trusted = _draw_trusted(catalog, spec, seed, pool, clean_class)
        splits[trusted] = TRUSTED
        pool &= ~trusted

    if spec.train_subset is not None:
        pool = _balanced_subset(catalog, pool, spec.train_subset, seed)
    splits[pool] = TRAIN
    return splits


def split_counts(splits: np.ndarray) -> dict[str, int]:
    """Rows per split, every name in ``SPLITS`` present (zero included) so manifests have one shape."""
    names, counts = np.unique(np.asarray(splits, dtype=str), return_counts=True)
    found = dict(zip(names.tolist(), counts.tolist(), strict=True))
    return {name: int(found.get(name, 0)) for name in SPLITS}


def _is_bool(value: object) -> bool:
    """bool is an int subclass; ``True`` must not pass as a count of 1 or a fraction."""
    return isinstance(value, bool | np.bool_)


def _is_open_unit(value: object) -> bool:
    """True for a real number strictly between 0 and 1 (NaN and bools excluded)."""
    if _is_bool(value) or not isinstance(value, int | float | np.integer | np.floating):
        return False
    return 0.0 < value < 1.0


def _keys(seed: int, purpose: int, n: int) -> np.ndarray:
    """Uniform keys for ``n`` samples from the seed's stream for ``purpose``.

    ``SeedSequence(seed, spawn_key=(purpose,))`` is the ``purpose``-th child of ``SeedSequence(seed)``:
    independent of the other purposes and the same on every machine.
    """
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(purpose,))).random(n)


def _fraction_quota(counts: np.ndarray, fraction: float) -> np.ndarray:
    """round(fraction * count) per class, halves rounded up (not to even) so the rule is easy to state."""
    return np.floor(fraction * counts + 0.5).astype(np.int64)


def _take_per_class(
    eligible: np.ndarray, classes: np.ndarray, quota: np.ndarray, keys: np.ndarray
) -> np.ndarray:
    """Mask of the ``quota[c]`` eligible samples of each class c with the smallest keys.

    ``classes`` must lie in ``[0, len(quota))`` wherever ``eligible`` is set.
    """
    idx = np.flatnonzero(eligible)
    cls = classes[idx]
    order = np.lexsort((keys[idx], cls))
    idx, cls = idx[order], cls[order]
    rank = np.arange(idx.size) - np.searchsorted(cls, cls, side="left")
    taken = np.zeros(eligible.shape, dtype=bool)
    taken[idx[rank < quota[cls]]] = True
    return taken


def _require_per_class(counts: np.ndarray, requested: int, catalog: Catalog, field: str, flag: str) -> None:
    """Fail with the binding class and the largest value that would work, instead of a short split."""
    if (counts >= requested).all():
        return
    worst = int(np.argmin(counts))
    have = int(counts[worst])
    raise ConfigError(
        field,
        f"class '{catalog.class_names[worst]}' has only {have} eligible samples, {requested} requested",
        f"lower {flag} to at most {have}",
    )


def _draw_trusted(
    catalog: Catalog, spec: SplitSpec, seed: int, candidates: np.ndarray, clean_class: np.ndarray
) -> np.ndarray:
    """The trusted mask: ``clean_per_class`` or ``clean_fraction`` of the candidates whose clean class is
    known, stratified by it; all of ``candidates`` when neither is given (a shipped set is used whole).
    """
    if spec.clean_per_class is None and spec.clean_fraction is None:
        return candidates
    k = catalog.num_classes
    eligible = candidates & (clean_class >= 0)
    counts = np.bincount(clean_class[eligible], minlength=k)
    if spec.clean_per_class is not None:
        _require_per_class(
            counts, spec.clean_per_class, catalog, "split.clean_per_class", "--clean-per-class"
        )
        quota = np.full(k, spec.clean_per_class)
    else:
        quota = _fraction_quota(counts, spec.clean_fraction)
    return _take_per_class(eligible, clean_class, quota, _keys(seed, _STREAM_TRUSTED, catalog.num_samples))


def _balanced_subset(catalog: Catalog, pool: np.ndarray, size: int, seed: int) -> np.ndarray:
    """A seeded subset of ``size`` pool rows, as class-balanced by the given label as class sizes allow.

    Water-filling: every class gets min(its size, L) for the largest level L that fits, and the few rows
    left over go one each to randomly chosen classes that still have samples, so the result has exactly
    ``size`` rows and per-class counts differ by at most one among classes that are not exhausted.
    """
    k, n = catalog.num_classes, catalog.num_samples
    label = catalog.label
    eligible = pool & (label >= 0) & (label < k)
    counts = np.bincount(label[eligible], minlength=k)
    available = int(counts.sum())
    if size > available:
        raise ConfigError(
            "split.train_subset",
            f"{size} rows requested but the training pool has only {available}",
            f"lower --train-subset to at most {available}",
        )
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_STREAM_SUBSET,)))
    keys = rng.random(n)
    class_priority = rng.random(k)
    lo, hi = 0, int(counts.max(initial=0))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if np.minimum(counts, mid).sum() <= size:
            lo = mid
        else:
            hi = mid - 1
    quota = np.minimum(counts, lo)
    open_classes = np.flatnonzero(counts > lo)
    extra = open_classes[np.argsort(class_priority[open_classes], kind="stable")][: size - int(quota.sum())]
    quota[extra] += 1
    return _take_per_class(eligible, label, quota, keys)
