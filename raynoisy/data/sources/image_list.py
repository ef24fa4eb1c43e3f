"""Bring-your-own images: a CSV/TSV list of image paths and labels, optionally flagged as trusted.

This is how a user with a noisy data set and a small trusted subset plugs in without writing a source:
one row per image; a ``trusted`` flag column or a ``trusted_label`` column (a second, trusted annotator)
marks the rows the clean-set methods may learn from; a ``true_label_column`` holds evaluation-only true
labels (a hand-checked copy: label quality is measured against it, nothing trains on it). The list is a
table like ``text-table`` reads, whose payload column holds paths instead of text, so both share one
reader and one label coding.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from raynoisy.data.catalog import ORIGIN_TEST, ORIGIN_TRAIN, ORIGIN_VAL, Catalog
from raynoisy.data.images import FilePayloads, check_options
from raynoisy.data.sources import register_source
from raynoisy.data.sources.text_table import (
    LabelSpace,
    Table,
    label_cells,
    read_label_columns,
    read_table,
    table_format,
)
from raynoisy.errors import ConfigError

_OPTIONS = (
    "path_column",
    "label_column",
    "trusted_column",
    "trusted_label_column",
    "true_label_column",
    "split_column",
)
_LIST_NAMES = ("labels.csv", "labels.tsv")
_SPLITS = (ORIGIN_TRAIN, ORIGIN_VAL, ORIGIN_TEST)


@register_source("image-list", needs_root=True, transform="imagenet", image_size=224, channels=3)
def load(root: Path | None, options: dict) -> Catalog:
    """Rows in list order; image paths are relative to the list's folder; a header row is required."""
    check_options("image-list", options, _OPTIONS)
    assert root is not None
    list_path = _list_file(root)
    table = read_table(list_path, table_format(list_path, None), header=True)
    space = LabelSpace.infer(label_cells(table, options, "label"))
    labels = read_label_columns(table, options, "label", space)
    paths = table.column("path_column", options.get("path_column", "path"))
    for row, path in enumerate(paths):
        if not path.strip():
            raise table.error(row, "empty image path")
    split = _split_column(table, options.get("split_column"))
    origin, true_label = labels.origin_and_truth(split)
    return Catalog(
        name="image-list",
        modality="image",
        class_names=space.class_names,
        label=labels.label,
        true_label=true_label,
        origin=origin,
        read_payload=FilePayloads(list_path.parent, [path.strip() for path in paths]),
        trusted_label=labels.trusted_label,
        eval_label=labels.eval_label,
        description={"list": str(list_path), "rows": len(table)},
    )


def _list_file(root: Path) -> Path:
    if root.is_file():
        return root
    found = [root / name for name in _LIST_NAMES if (root / name).is_file()]
    if len(found) != 1:
        problem = f"has both {' and '.join(_LIST_NAMES)}" if found else f"has no {' or '.join(_LIST_NAMES)}"
        raise ConfigError("data.root", f"{root} {problem}", "point data.root at the list file")
    return found[0]


def _split_column(table: Table, column: str | None) -> np.ndarray:
    """Each row's origin from the split column (train/val/test); every row is ``train`` without one."""
    if column is None:
        return np.full(len(table), ORIGIN_TRAIN, dtype=object)
    values = [value.strip().lower() for value in table.column("split_column", column)]
    for row, value in enumerate(values):
        if value not in _SPLITS:
            raise table.error(row, f"split {value!r} is not one of {', '.join(_SPLITS)}")
    return np.asarray(values, dtype=object)
