"""The text classification sets of Zhang, Zhao & LeCun (2015) in their release format.

Each is a folder with ``train.csv`` and ``test.csv`` (no header, RFC 4180 quoting, a 1-based class index
first, then the text fields) and, for some, ``classes.txt`` (one class name per line, in index order):

| source | fields after the label | classes |
|---|---|---|
| ``ag-news`` (ag_news_csv) | title, description | 4 (classes.txt) |
| ``yelp-5`` (yelp_review_full_csv) | review | 5 |
| ``amazon-5`` (amazon_review_full_csv) | title, review | 5 |
| ``yahoo-answers`` (yahoo_answers_csv) | question title, question content, best answer | 10 (classes.txt) |

A sample's text is its non-empty fields joined by a blank line (the MLC paper's setting reads title and body
together). These releases carry no trusted set and are clean enough to serve as true labels, so their
benchmarks inject synthetic noise into ``train`` and draw a trusted set with ``--clean-per-class``; the
validation set comes from ``train`` (``split.val_per_class``), ``test.csv`` is the test set. The release
escapes line breaks inside a field as a literal ``\\n``, which is turned back into one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from raynoisy.data.catalog import ORIGIN_TEST, ORIGIN_TRAIN, Catalog
from raynoisy.data.images import check_options
from raynoisy.data.sources import register_source
from raynoisy.data.sources.text_table import LabelColumns, Table, TextPart, read_table, text_catalog
from raynoisy.errors import DataFormatError

_FILES = ((ORIGIN_TRAIN, "train.csv"), (ORIGIN_TEST, "test.csv"))


def load_release(name: str, root: Path, *, text_fields: int, num_classes: int) -> Catalog:
    """Read one release folder: every row has 1 + ``text_fields`` fields and a label in 1..num_classes."""
    class_names = _class_names(root, num_classes)
    parts = []
    for origin, file_name in _FILES:
        table = read_table(root / file_name, "csv", header=False)
        if table.columns and len(table.columns) != 1 + text_fields:
            raise table.error(0, f"{len(table.columns)} fields, expected {1 + text_fields} (label, text)")
        parts.append(TextPart(origin, table, _texts(table, text_fields), _labels(table, num_classes)))
    return text_catalog(name, class_names, parts, labels_are_true=True)


def _texts(table: Table, text_fields: int) -> list[str]:
    fields = table.columns[1 : 1 + text_fields]
    return [
        "\n\n".join(value.strip().replace("\\n", "\n") for value in row if value.strip())
        for row in zip(*fields, strict=True)
    ]


def _labels(table: Table, num_classes: int) -> LabelColumns:
    label = np.empty(len(table), dtype=np.int64)
    for row, cell in enumerate(table.columns[0] if table.columns else []):
        text = cell.strip()
        if not text.isdigit():
            raise table.error(row, f"label {text!r} is not a class index")
        if int(text) == 0:
            raise table.error(row, f"label 0 in a file whose labels are 1-based (1..{num_classes})")
        if int(text) > num_classes:
            raise table.error(row, f"label {text} is not one of the classes 1..{num_classes}")
        label[row] = int(text) - 1
    return LabelColumns(label, np.zeros(len(table), dtype=bool), None)


def _class_names(root: Path, num_classes: int) -> list[str]:
    path = root / "classes.txt"
    if not path.is_file():
        return [str(i) for i in range(1, num_classes + 1)]
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(names) != num_classes:
        raise DataFormatError(str(path), f"{len(names)} class names, expected {num_classes}")
    return names


def _register(name: str, text_fields: int, num_classes: int) -> None:
    @register_source(name, needs_root=True, transform="text", image_size=None, channels=0)
    def load(root: Path | None, options: dict) -> Catalog:
        check_options(name, options, ())
        assert root is not None
        if not root.is_dir():
            raise DataFormatError(str(root), "expected the release folder (train.csv, test.csv)")
        return load_release(name, root, text_fields=text_fields, num_classes=num_classes)


_register("ag-news", 2, 4)
_register("yelp-5", 1, 5)
_register("amazon-5", 2, 5)
_register("yahoo-answers", 3, 10)
