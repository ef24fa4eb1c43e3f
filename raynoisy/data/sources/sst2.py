"""SST-2 (binary Stanford Sentiment Treebank) as the GLC reference code ships it.

A folder with ``senti.binary.train``, ``senti.binary.dev`` and ``senti.binary.test``: one sentence per line,
``text<TAB>label`` with 0 = negative, 1 = positive, no header (67,349 / 872 / 1,821 rows). The labels are
the treebank's, clean enough to serve as true labels: benchmarks inject synthetic noise into ``train`` and
draw the trusted set from it with ``--clean-per-class``; ``dev`` is the validation set, ``test`` the test.
"""

from __future__ import annotations

from pathlib import Path

from raynoisy.data.catalog import ORIGIN_TEST, ORIGIN_TRAIN, ORIGIN_VAL, Catalog
from raynoisy.data.images import check_options
from raynoisy.data.sources import register_source
from raynoisy.data.sources.text_table import (
    LabelSpace,
    TextPart,
    read_label_columns,
    read_table,
    text_catalog,
)
from raynoisy.errors import DataFormatError

CLASS_NAMES = ["negative", "positive"]
_FILES = ((ORIGIN_TRAIN, "train"), (ORIGIN_VAL, "dev"), (ORIGIN_TEST, "test"))


@register_source("sst2", needs_root=True, transform="text", image_size=None, channels=0)
def load(root: Path | None, options: dict) -> Catalog:
    check_options("sst2", options, ())
    assert root is not None
    if not root.is_dir():
        raise DataFormatError(str(root), "expected the folder with senti.binary.train/dev/test")
    space = LabelSpace(CLASS_NAMES)
    parts = []
    for origin, suffix in _FILES:
        table = read_table(root / f"senti.binary.{suffix}", "tsv", header=False)
        if table.columns and len(table.columns) != 2:
            raise table.error(0, f"{len(table.columns)} fields, expected 2 (text, label)")
        parts.append(TextPart(origin, table, table.columns[0], read_label_columns(table, {}, 1, space)))
    return text_catalog("sst2", CLASS_NAMES, parts, labels_are_true=True)
