"""The catalog: what a source knows about its samples before any payload is read.

Every source turns its files into one ``Catalog``. Splitting, noise injection and sharding work on
catalogs only, so they are identical for every source and never touch image bytes. Payloads (encoded
image bytes or text) are read lazily, one sample at a time, when shards are written.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

Modality = Literal["image", "text"]

# Values of ``Catalog.origin``: the split a sample belongs to in the data set's own release.
ORIGIN_TRAIN = "train"  # the (possibly noisy) training pool
ORIGIN_TRUSTED = "trusted"  # a trusted/clean training set shipped with the data (Clothing1M clean_train)
ORIGIN_VAL = "val"
ORIGIN_TEST = "test"
ORIGINS = (ORIGIN_TRAIN, ORIGIN_TRUSTED, ORIGIN_VAL, ORIGIN_TEST)

UNKNOWN_LABEL = -1


class MissingPayloadError(Exception):
    """A sample's payload cannot be read (missing or unreadable file); sharding skips and counts it."""


@dataclass
class Catalog:
    """One row per sample, as parallel numpy arrays indexed by ``sample_id``.

    Attributes:
        name: source name, e.g. ``"clothing1m"``.
        modality: ``"image"`` (payload = encoded image bytes) or ``"text"`` (payload = UTF-8 text).
        class_names: class ``i`` is ``class_names[i]``.
        label: int64 label the source gives (web/noisy label where the data is noisy by nature).
        true_label: int64 human/clean label, ``UNKNOWN_LABEL`` (-1) where unknown.
        origin: str array, one of ``ORIGINS`` per sample.
        read_payload: ``read_payload(sample_id) -> bytes | str``; raises ``MissingPayloadError``.
        trusted_label: optional int64 label from a trusted annotator (-1 where absent); a sample with one
            is eligible for the trusted set even if its origin is ``train`` (bring-your-own sources).
        description: free-form facts for the manifest (paths, counts of dropped duplicates, ...).
        group: optional str per sample naming the evaluation set it belongs to (WebVision scores its test
            rows on "webvision-val" and "ilsvrc12-val" separately); ``None`` means one group.
        eval_label: optional int64 evaluation-only true label (-1 where absent), as real noisy sets come
            with one (CIFAR-10N's clean labels, a hand-checked copy of a distantly supervised corpus). It is
            never used to split, to inject noise, to pick a trusted set or a model, or to train: it only
            fills ``labels.parquet``'s ``true_label`` where ``true_label`` is unknown, which is what the
            label-correction and label-issue tables are measured against.
    """

    name: str
    modality: Modality
    class_names: list[str]
    label: np.ndarray
    true_label: np.ndarray
    origin: np.ndarray
    read_payload: Callable[[int], bytes | str]
    trusted_label: np.ndarray | None = None
    description: dict = field(default_factory=dict)
    group: np.ndarray | None = None
    eval_label: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.label)
        self.label = np.asarray(self.label, dtype=np.int64)
        self.true_label = np.asarray(self.true_label, dtype=np.int64)
        self.origin = np.asarray(self.origin, dtype=object)
        if self.trusted_label is not None:
            self.trusted_label = np.asarray(self.trusted_label, dtype=np.int64)
        if self.group is not None:
            self.group = np.asarray(self.group, dtype=object)
        if self.eval_label is not None:
            self.eval_label = np.asarray(self.eval_label, dtype=np.int64)
        arrays = {"true_label": self.true_label, "origin": self.origin}
        if self.trusted_label is not None:
            arrays["trusted_label"] = self.trusted_label
        if self.group is not None:
            arrays["group"] = self.group
        if self.eval_label is not None:
            arrays["eval_label"] = self.eval_label
        for key, arr in arrays.items():
            if len(arr) != n:
                raise ValueError(f"catalog {self.name}: {key} has {len(arr)} rows, label has {n}")
        bad = set(self.origin.tolist()) - set(ORIGINS)  # a set, not np.unique: no sort of 1M strings
        if bad:
            raise ValueError(f"catalog {self.name}: unknown origin values {sorted(bad)}")

    @property
    def num_samples(self) -> int:
        return len(self.label)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def sample_id(self) -> np.ndarray:
        """Dense, stable int64 ids ``0..N-1``: the row order the source defines."""
        return np.arange(self.num_samples, dtype=np.int64)
