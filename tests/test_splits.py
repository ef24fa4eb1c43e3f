"""Splits: one split per sample, exact per-class counts, seeded streams, no meta/train leak."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from raynoisy.data.catalog import (
    ORIGIN_TEST,
    ORIGIN_TRAIN,
    ORIGIN_TRUSTED,
    ORIGIN_VAL,
    UNKNOWN_LABEL,
    Catalog,
)
from raynoisy.data.splits import (
    SPLITS,
    TEST,
    TRAIN,
    TRUSTED,
    UNUSED,
    VAL,
    SplitSpec,
    assign_splits,
    split_counts,
)
from raynoisy.errors import ConfigError

CLASSES = ["tee", "shirt", "knit", "dress"]
K = len(CLASSES)


def make_catalog(
    n_train: int = 2000,
    *,
    n_test: int = 0,
    n_val: int = 0,
    n_trusted: int = 0,
    trusted_label_every: int = 0,
    class_weights: tuple[float, ...] = (0.4, 0.3, 0.2, 0.1),
    seed: int = 0,
) -> Catalog:
    """A synthetic catalog: origins laid out in blocks, imbalanced classes, ~30% noisy given labels.

    ``trusted_label_every`` > 0 gives every that-many-th train sample a trusted annotator label (the
    bring-your-own layout); train samples then have unknown true labels, as in Clothing1M's noisy pool.
    """
    rng = np.random.default_rng(seed)
    sizes = {ORIGIN_TRAIN: n_train, ORIGIN_TEST: n_test, ORIGIN_VAL: n_val, ORIGIN_TRUSTED: n_trusted}
    origin = np.concatenate([np.full(size, name, dtype=object) for name, size in sizes.items()])
    n = origin.size
    true = rng.choice(K, size=n, p=class_weights)
    noisy = rng.random(n) < 0.3
    label = np.where(noisy, rng.integers(0, K, size=n), true)
    trusted_label = None
    if trusted_label_every:
        trusted_label = np.full(n, UNKNOWN_LABEL)
        annotated = (np.arange(n) % trusted_label_every == 0) & (origin == ORIGIN_TRAIN)
        trusted_label[annotated] = true[annotated]
        true = np.where(origin == ORIGIN_TRAIN, UNKNOWN_LABEL, true)
    return Catalog(
        name="synthetic",
        modality="image",
        class_names=list(CLASSES),
        label=label,
        true_label=true,
        origin=origin,
        read_payload=lambda i: b"",
        trusted_label=trusted_label,
    )


def per_class(splits: np.ndarray, name: str, classes: np.ndarray) -> np.ndarray:
    return np.bincount(classes[splits == name], minlength=K)


def members(splits: np.ndarray, name: str) -> set[int]:
    return set(np.flatnonzero(splits == name).tolist())


# --- coverage and disjointness over every origin layout --------------------------------------------------

LAYOUTS = list(itertools.product([0, 300], [0, 200], [0, 400], [0, 5]))


@pytest.mark.parametrize(("n_test", "n_val", "n_trusted", "tl_every"), LAYOUTS)
def test_every_sample_gets_exactly_one_split(n_test: int, n_val: int, n_trusted: int, tl_every: int) -> None:
    catalog = make_catalog(n_test=n_test, n_val=n_val, n_trusted=n_trusted, trusted_label_every=tl_every)
    spec = SplitSpec(clean_per_class=20, val_per_class=10 if not tl_every else None, test_fraction=0.1)
    splits = assign_splits(catalog, spec, seed=3)

    assert splits.shape == (catalog.num_samples,) and splits.dtype == object
    assert set(np.unique(splits.astype(str)).tolist()) <= set(SPLITS)
    groups = [members(splits, name) for name in SPLITS]
    assert sum(len(g) for g in groups) == catalog.num_samples
    assert set().union(*groups) == set(range(catalog.num_samples))
    assert split_counts(splits) == {name: len(g) for name, g in zip(SPLITS, groups, strict=True)}

    origin = catalog.origin
    # Shipped splits are used as shipped; nothing else ever leaves the training pool's origin.
    if n_test:
        assert np.array_equal(splits == TEST, origin == ORIGIN_TEST)
    else:
        assert (origin[splits == TEST] == ORIGIN_TRAIN).all() and (splits == TEST).any()
    if n_val:
        assert np.array_equal(splits == VAL, origin == ORIGIN_VAL)
    if n_trusted:
        assert (origin[splits == TRUSTED] == ORIGIN_TRUSTED).all()
    else:
        assert (origin[splits == TRUSTED] == ORIGIN_TRAIN).all()
    assert (origin[splits == TRAIN] == ORIGIN_TRAIN).all()
    assert (splits[origin == ORIGIN_TRUSTED] != TRAIN).all()
    # The clean set has exactly clean_per_class per class, counted by the label that makes it clean.
    clean_class = catalog.trusted_label if (tl_every and not n_trusted) else catalog.true_label
    assert per_class(splits, TRUSTED, clean_class).tolist() == [20] * K


def test_no_size_and_no_shipped_sets_gives_only_test_and_train() -> None:
    splits = assign_splits(make_catalog(), SplitSpec(), seed=0)
    counts = split_counts(splits)
    assert counts[TRUSTED] == counts[VAL] == counts[UNUSED] == 0
    assert counts[TEST] + counts[TRAIN] == 2000


def test_shipped_trusted_set_is_used_whole_unless_sized() -> None:
    catalog = make_catalog(n_trusted=400, n_test=100)
    whole = assign_splits(catalog, SplitSpec(), seed=0)
    assert np.array_equal(whole == TRUSTED, catalog.origin == ORIGIN_TRUSTED)

    sized = assign_splits(catalog, SplitSpec(clean_per_class=15), seed=0)
    assert per_class(sized, TRUSTED, catalog.true_label).tolist() == [15] * K
    assert (sized[catalog.origin == ORIGIN_TRUSTED] != TRAIN).all()  # the rest is unused, not trained on
    assert split_counts(sized)[UNUSED] == 400 - 15 * K


def test_zero_clean_per_class_is_no_trusted_set_and_moves_nothing_else() -> None:
    catalog = make_catalog()
    zero = assign_splits(catalog, SplitSpec(clean_per_class=0, val_per_class=20), seed=0)
    assert split_counts(zero)[TRUSTED] == 0
    # The same split as asking for no trusted set at all, so the shards are the same too.
    assert np.array_equal(zero, assign_splits(catalog, SplitSpec(val_per_class=20), seed=0))
    # Against a run with a trusted set: the same val and test rows; its trusted rows are trained on here.
    some = assign_splits(catalog, SplitSpec(clean_per_class=15, val_per_class=20), seed=0)
    for name in (VAL, TEST, UNUSED):
        assert members(zero, name) == members(some, name)
    assert members(zero, TRAIN) == members(some, TRAIN) | members(some, TRUSTED)


def test_zero_clean_per_class_leaves_a_shipped_trusted_set_unused() -> None:
    """Clothing1M's clean_train with --clean-per-class 0: not used, and not merged into training either."""
    catalog = make_catalog(n_trusted=400, n_test=100)
    zero = assign_splits(catalog, SplitSpec(clean_per_class=0), seed=0)
    shipped = catalog.origin == ORIGIN_TRUSTED
    assert split_counts(zero)[TRUSTED] == 0 and (zero[shipped] == UNUSED).all()
    sized = assign_splits(catalog, SplitSpec(clean_per_class=15), seed=0)
    assert members(zero, TRAIN) == members(sized, TRAIN) and members(zero, TEST) == members(sized, TEST)


# --- exact per-class counts ----------------------------------------------------------------------------


def test_val_and_test_counts_are_exact_per_class() -> None:
    catalog = make_catalog(n_train=3000)
    splits = assign_splits(catalog, SplitSpec(val_per_class=25, test_fraction=0.15), seed=1)
    train_pool = np.bincount(catalog.true_label, minlength=K)
    assert per_class(splits, VAL, catalog.true_label).tolist() == [25] * K
    assert per_class(splits, TEST, catalog.true_label).tolist() == np.floor(0.15 * train_pool + 0.5).tolist()


def test_clean_fraction_is_stratified() -> None:
    catalog = make_catalog(n_train=3000, n_test=200)
    splits = assign_splits(catalog, SplitSpec(clean_fraction=0.05), seed=2)
    pool = np.bincount(catalog.true_label[catalog.origin == ORIGIN_TRAIN], minlength=K)
    assert per_class(splits, TRUSTED, catalog.true_label).tolist() == np.floor(0.05 * pool + 0.5).tolist()


def test_trusted_label_defines_the_eligible_pool() -> None:
    catalog = make_catalog(n_test=100, trusted_label_every=4)
    splits = assign_splits(catalog, SplitSpec(clean_per_class=10), seed=0)
    assert (catalog.trusted_label[splits == TRUSTED] >= 0).all()
    assert per_class(splits, TRUSTED, catalog.trusted_label).tolist() == [10] * K


# --- the MLC leak, determinism and stream independence ------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_meta_set_never_leaks_into_training(seed: int) -> None:
    catalog = make_catalog()
    spec = SplitSpec(clean_per_class=50, val_per_class=20, train_subset=600)
    # MLC builds the meta and the noisy training set in two separate passes; ours are one assignment,
    # and a second pass (another process, the same seed) reproduces it exactly.
    first, second = assign_splits(catalog, spec, seed), assign_splits(catalog, spec, seed)
    assert np.array_equal(first, second)
    assert members(first, TRUSTED) and members(first, TRAIN)
    assert not members(first, TRUSTED) & members(second, TRAIN)
    assert not members(first, VAL) & (members(first, TRAIN) | members(first, TRUSTED))


def test_different_seeds_draw_different_splits() -> None:
    catalog = make_catalog()
    spec = SplitSpec(clean_per_class=50)
    assert not np.array_equal(assign_splits(catalog, spec, 0), assign_splits(catalog, spec, 1))


def test_adding_val_or_resizing_clean_does_not_move_test() -> None:
    catalog = make_catalog()
    base = assign_splits(catalog, SplitSpec(clean_per_class=30), seed=4)
    with_val = assign_splits(catalog, SplitSpec(clean_per_class=30, val_per_class=20), seed=4)
    bigger_clean = assign_splits(catalog, SplitSpec(clean_per_class=60, val_per_class=20), seed=4)
    assert members(base, TEST) == members(with_val, TEST) == members(bigger_clean, TEST)
    assert members(with_val, VAL) == members(bigger_clean, VAL)
    # Keys are per sample, so a larger clean set extends the smaller one rather than redrawing it.
    assert members(with_val, TRUSTED) < members(bigger_clean, TRUSTED)
    # Adding val changes the clean set only where val took a sample the clean draw wanted: the streams
    # are independent, so most of the clean set survives and what it lost went to val.
    lost = members(base, TRUSTED) - members(with_val, TRUSTED)
    assert lost <= members(with_val, VAL)
    assert len(lost) < 0.2 * len(members(base, TRUSTED))


# --- train_subset --------------------------------------------------------------------------------------


def test_train_subset_is_class_balanced_and_seeded() -> None:
    catalog = make_catalog(n_train=4000, n_test=100)
    spec = SplitSpec(train_subset=1001)
    splits = assign_splits(catalog, spec, seed=5)
    counts = per_class(splits, TRAIN, catalog.label)
    assert counts.sum() == 1001 and counts.max() - counts.min() <= 1
    assert split_counts(splits)[UNUSED] == 4000 - 1001
    assert np.array_equal(splits, assign_splits(catalog, spec, seed=5))
    assert members(splits, TRAIN) != members(assign_splits(catalog, spec, seed=6), TRAIN)


def test_train_subset_water_fills_around_small_classes() -> None:
    catalog = make_catalog(n_train=2000, n_test=100, class_weights=(0.6, 0.3, 0.07, 0.03))
    pool = np.bincount(catalog.label[catalog.origin == ORIGIN_TRAIN], minlength=K)
    size = int(pool[2] + pool[3] + 2 * (pool[2] + 40))
    counts = per_class(assign_splits(catalog, SplitSpec(train_subset=size), seed=0), TRAIN, catalog.label)
    assert counts.sum() == size
    assert counts[3] == pool[3]  # the smallest class is taken whole
    assert counts[0] == counts[1] and abs(int(counts[0]) - int(pool[2] + 40)) <= 1


def test_train_subset_larger_than_pool_fails() -> None:
    catalog = make_catalog(n_train=500)
    # The pool is what the per-class rounded 20% test carve-out leaves.
    pool = split_counts(assign_splits(catalog, SplitSpec(), seed=0))[TRAIN]
    assert 390 < pool < 410
    with pytest.raises(ConfigError) as err:
        assign_splits(catalog, SplitSpec(train_subset=pool + 1), seed=0)
    assert err.value.field == "split.train_subset"
    assert f"lower --train-subset to at most {pool}" in str(err.value)
    assert split_counts(assign_splits(catalog, SplitSpec(train_subset=pool), seed=0))[TRAIN] == pool


# --- errors --------------------------------------------------------------------------------------------


def test_clean_per_class_error_names_class_and_maximum() -> None:
    catalog = make_catalog(n_train=400, n_test=50, class_weights=(0.4, 0.3, 0.25, 0.05))
    smallest = int(np.bincount(catalog.true_label[catalog.origin == ORIGIN_TRAIN], minlength=K)[3])
    with pytest.raises(ConfigError) as err:
        assign_splits(catalog, SplitSpec(clean_per_class=50), seed=0)
    assert str(err.value) == (
        f"split.clean_per_class: class 'dress' has only {smallest} eligible samples, 50 requested; "
        f"lower --clean-per-class to at most {smallest}"
    )
    ok = assign_splits(catalog, SplitSpec(clean_per_class=smallest), seed=0)
    assert per_class(ok, TRUSTED, catalog.true_label).tolist() == [smallest] * K


def test_val_per_class_error_counts_after_test_carve_out() -> None:
    catalog = make_catalog(n_train=400, class_weights=(0.4, 0.3, 0.25, 0.05))
    with pytest.raises(ConfigError) as err:
        assign_splits(catalog, SplitSpec(val_per_class=100), seed=0)
    assert err.value.field == "split.val_per_class"
    assert "class 'dress'" in str(err.value) and "lower --val-per-class to at most" in str(err.value)


def test_val_per_class_needs_known_true_labels() -> None:
    catalog = make_catalog(trusted_label_every=5)  # train pool true labels unknown
    with pytest.raises(ConfigError, match="has only 0 eligible samples"):
        assign_splits(catalog, SplitSpec(val_per_class=1), seed=0)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"test_fraction": 0.0}, "split.test_fraction"),
        ({"test_fraction": 1.0}, "split.test_fraction"),
        ({"clean_fraction": 1.2}, "split.clean_fraction"),
        ({"clean_fraction": float("nan")}, "split.clean_fraction"),
        ({"clean_per_class": -1}, "split.clean_per_class"),
        ({"clean_per_class": True}, "split.clean_per_class"),
        ({"val_per_class": 0}, "split.val_per_class"),
        ({"val_per_class": True}, "split.val_per_class"),
        ({"train_subset": -3}, "split.train_subset"),
        ({"clean_per_class": 5, "clean_fraction": 0.1}, "split.clean_fraction"),
    ],
)
def test_invalid_spec_fails_on_construction(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError) as err:
        SplitSpec(**kwargs)
    assert err.value.field == field
