"""scikit-learn's 8x8 handwritten digits: a data set that ships with sklearn, so it needs no root.

It exists so every pipeline (noise, split, shards, training) can be exercised offline in seconds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits

from raynoisy.data.catalog import ORIGIN_TRAIN, Catalog
from raynoisy.data.images import PngPayloads, check_options
from raynoisy.data.sources import register_source

_MAX_INTENSITY = 16  # load_digits counts set pixels in 4x4 blocks: values 0..16


@register_source("digits", needs_root=False, transform="small", image_size=8, channels=1)
def load(root: Path | None, options: dict) -> Catalog:
    """All 1,797 digits, origin ``train``: there is no official test split; the split module carves one."""
    check_options("digits", options)
    bunch = load_digits()
    pixels = np.rint(bunch.images * (255 / _MAX_INTENSITY)).astype(np.uint8)
    labels = bunch.target.astype(np.int64)
    return Catalog(
        name="digits",
        modality="image",
        class_names=[str(name) for name in bunch.target_names],
        label=labels,
        true_label=labels.copy(),
        origin=np.full(len(labels), ORIGIN_TRAIN, dtype=object),
        read_payload=PngPayloads(pixels),
        description={"source": "sklearn.datasets.load_digits"},
    )
