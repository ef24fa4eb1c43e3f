"""The label plan of a run: which split every sample is in and which label training sees.

Computed once, in the driver, from the catalog, the split and noise config and the seed, before any
worker starts: the same inputs give a bit-identical plan whatever the number of workers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from raynoisy.config import Config
from raynoisy.data.catalog import UNKNOWN_LABEL, Catalog
from raynoisy.data.noise import NoiseReport, NoiseSpec, apply_noise
from raynoisy.data.noise import transition_matrix as defined_transition
from raynoisy.data.splits import TRAIN, TRUSTED, UNUSED, SplitSpec, assign_splits, split_counts
from raynoisy.errors import ConfigError

# Streams derived from the run seed; each purpose gets its own so that changing one leaves the others.
_NOISE_STREAM = 1


@dataclass
class LabelPlan:
    """Per-sample split, label seen in training (``given``) and true label (-1 unknown)."""

    split: np.ndarray
    given: np.ndarray
    true: np.ndarray
    noise: NoiseReport

    def counts(self) -> dict[str, int]:
        return split_counts(self.split)

    def used(self) -> np.ndarray:
        """Sample ids that are in some split (not ``unused``)."""
        return np.flatnonzero(self.split != UNUSED).astype(np.int64)

    def table(self, sample_ids: np.ndarray | None = None) -> pa.Table:
        """labels.parquet: sample_id, split, given_label, true_label (null where unknown)."""
        ids = self.used() if sample_ids is None else np.asarray(sample_ids, dtype=np.int64)
        true = self.true[ids]
        return pa.table(
            {
                "sample_id": pa.array(ids, pa.int64()),
                "split": pa.array(self.split[ids].astype(str), pa.string()),
                "given_label": pa.array(self.given[ids], pa.int64()),
                "true_label": pa.array(true, pa.int64(), mask=true == UNKNOWN_LABEL),
            }
        )


def spec_from_config(cfg: Config) -> SplitSpec:
    s = cfg.split
    return SplitSpec(
        clean_per_class=s.clean_per_class,
        clean_fraction=s.clean_fraction,
        val_per_class=s.val_per_class,
        test_fraction=s.test_fraction,
        train_subset=s.train_subset,
    )


def plan_labels(catalog: Catalog, cfg: Config, *, needs_trusted: bool = False) -> LabelPlan:
    """Split the catalog and inject the configured synthetic noise into the training split."""
    split = assign_splits(catalog, spec_from_config(cfg), cfg.run.seed)
    spec = NoiseSpec.parse(cfg.noise.type, cfg.noise.rate)
    true = catalog.true_label.copy()
    if catalog.trusted_label is not None:
        has_trusted = catalog.trusted_label != UNKNOWN_LABEL
        true[has_trusted] = catalog.trusted_label[has_trusted]
    # Outside the training split, training sees the best label there is.
    given = np.where(true != UNKNOWN_LABEL, true, catalog.label)
    train = split == TRAIN
    k = catalog.num_classes
    defined = None
    if spec.type == "none":
        given[train] = catalog.label[train]
    else:
        if np.any(true[train] == UNKNOWN_LABEL):
            raise ConfigError(
                "noise.type",
                f"{catalog.name} has training samples without true labels, so synthetic noise "
                "cannot be injected",
                "use --noise none (the data's own labels)",
            )
        # Both calls start from the same stream: the defined T is then the one apply_noise sampled from
        # (for ``flip``, whose class map is itself random).
        defined = defined_transition(
            spec, k, dataset=catalog.name, rng=np.random.default_rng([cfg.run.seed, _NOISE_STREAM])
        )
        given[train] = apply_noise(
            true[train], k, spec, np.random.default_rng([cfg.run.seed, _NOISE_STREAM]), dataset=catalog.name
        )
    if needs_trusted and not np.any(split == TRUSTED):
        raise ConfigError(
            "split.clean_per_class",
            f"method {cfg.method.name!r} needs a trusted set and this split has none",
            "pass --clean-per-class N (or --set split.clean_fraction=F)",
        )
    known = train & (true != UNKNOWN_LABEL)
    report = NoiseReport.from_labels(spec, true[known], given[known], k, transition=defined)
    if catalog.eval_label is not None:  # measured against only: filled in after every use of ``true`` above
        unknown = true == UNKNOWN_LABEL
        true[unknown] = catalog.eval_label[unknown]
    return LabelPlan(split=split, given=given, true=true, noise=report)
