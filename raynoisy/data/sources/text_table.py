"""Text classification tables (CSV, TSV, Parquet), and the table reading that ``image-list`` shares.

A table is read whole into str columns: the text data sets this serves (SST-2, AG News, ...) are a few
hundred MB at most, and holding columns lets labels be checked and coded with file and line in errors.
TSV is read without quote handling (the "linear TSV" convention of GLUE-style files), so a review that
starts with a quotation mark keeps it; CSV follows RFC 4180 quoting.

Label columns may hold class indices or class names. The label space is shared by every file of a
source, so ``1`` in the test file means what it means in the train file. Rows whose label is trusted
(a flag column, or a trusted annotator's label column) become the trusted set; val/test rows are
scored against their labels, so those labels are their true labels. A ``true_label_column`` holds
evaluation-only true labels (``Catalog.eval_label``): label quality is measured against them, nothing
trains on them. A row with an empty text is skipped and counted; a row with a field missing is an error.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from raynoisy.data.catalog import (
    ORIGIN_TEST,
    ORIGIN_TRAIN,
    ORIGIN_TRUSTED,
    ORIGIN_VAL,
    UNKNOWN_LABEL,
    Catalog,
)
from raynoisy.data.images import check_options
from raynoisy.data.sources import register_source
from raynoisy.errors import ConfigError, DataFormatError

TABLE_FORMATS = ("csv", "tsv", "parquet")
_SUFFIX_FORMATS = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".parquet": "parquet", ".pq": "parquet"}
_TRUE = {"1", "true", "yes"}
_FALSE = {"0", "false", "no", ""}
_OPTIONS = (
    "format",
    "header",
    "text_column",
    "label_column",
    "trusted_label_column",
    "trusted_column",
    "true_label_column",
    "train",
    "val",
    "test",
    "class_names",
)
_SPLIT_FILES = ((ORIGIN_TRAIN, "train"), (ORIGIN_VAL, "val"), (ORIGIN_TEST, "test"))


@dataclass
class Table:
    """A table as str columns; ``lines[i]`` is the line row ``i`` starts on (its row number in Parquet)."""

    path: Path
    header: list[str] | None
    columns: list[list[str]]
    lines: list[int]
    numbered_by_row: bool = False

    def __len__(self) -> int:
        return len(self.lines)

    def column(self, option: str, spec: str | int) -> list[str]:
        """The column an option names: by header name, or by 0-based index (the only way without a header)."""
        if isinstance(spec, str) and self.header is not None:
            if spec not in self.header:
                raise ConfigError(
                    f"data.options.{option}",
                    f"{self.path} has no column {spec!r}",
                    f"use one of {self.header}",
                )
            return self.columns[self.header.index(spec)]
        if isinstance(spec, str) and not spec.isdigit():
            raise ConfigError(
                f"data.options.{option}",
                f"{self.path} has no header to find {spec!r} in",
                "give a 0-based column index",
            )
        if (
            isinstance(spec, bool)
            or not isinstance(spec, int | str)
            or not 0 <= int(spec) < len(self.columns)
        ):
            raise ConfigError(
                f"data.options.{option}",
                f"{spec!r} is not a column of {self.path}",
                f"give 0..{len(self.columns) - 1}",
            )
        return self.columns[int(spec)]

    def error(self, row: int, problem: str) -> DataFormatError:
        if self.numbered_by_row:
            return DataFormatError(str(self.path), f"row {self.lines[row]}: {problem}")
        return DataFormatError(str(self.path), problem, self.lines[row])


def table_format(path: Path, option: str | None) -> str:
    """The format the ``format`` option names, else the one the file's suffix implies."""
    if option is not None:
        if option not in TABLE_FORMATS:
            raise ConfigError(
                "data.options.format", f"unknown format {option!r}", f"use one of {TABLE_FORMATS}"
            )
        return option
    if path.suffix.lower() in _SUFFIX_FORMATS:
        return _SUFFIX_FORMATS[path.suffix.lower()]
    raise ConfigError(
        "data.options.format", f"cannot tell the format of {path.name}", f"set it to one of {TABLE_FORMATS}"
    )


def read_table(path: Path, fmt: str, header: bool) -> Table:
    """Read a whole table; every row must have as many fields as the header (or the first row)."""
    if not path.is_file():
        raise DataFormatError(str(path), "file not found")
    if fmt == "parquet":
        return _read_parquet(path)
    rows: list[list[str]] = []
    lines: list[int] = []
    with path.open(newline="", encoding="utf-8") as stream:
        dialect = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if fmt == "tsv" else {}
        reader = csv.reader(stream, **dialect)
        try:
            names = next(reader, None) if header else None
            start = reader.line_num
            for row in reader:
                if row:  # blank lines (a trailing newline, say) carry no row
                    rows.append(row)
                    lines.append(start + 1)
                start = reader.line_num
        except (csv.Error, UnicodeDecodeError) as err:
            raise DataFormatError(str(path), f"not valid {fmt.upper()}: {err}", reader.line_num) from err
    if header and names is None:
        raise DataFormatError(str(path), "empty file: expected a header row")
    width = len(names) if names is not None else len(rows[0]) if rows else 0
    ragged = next((i for i, row in enumerate(rows) if len(row) != width), None)
    if ragged is not None:
        raise DataFormatError(str(path), f"{len(rows[ragged])} fields, expected {width}", lines[ragged])
    columns = [list(column) for column in zip(*rows, strict=True)] if rows else [[] for _ in range(width)]
    return Table(path, names, columns, lines)


def _read_parquet(path: Path) -> Table:
    import pyarrow.parquet as pq

    try:
        data = pq.read_table(path)
    except (OSError, ValueError) as err:  # pyarrow's ArrowIOError / ArrowInvalid
        raise DataFormatError(str(path), f"not a readable Parquet file: {err}") from err
    columns = [
        ["" if value is None else str(value) for value in column.to_pylist()] for column in data.columns
    ]
    return Table(
        path, list(data.column_names), columns, list(range(1, data.num_rows + 1)), numbered_by_row=True
    )


def parse_flag(value: str) -> bool:
    """A 0/1 (or true/false, yes/no) cell; an empty cell is false."""
    text = value.strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"{value!r} is not a 0/1 flag")


class LabelSpace:
    """Class names and how a label cell maps to a class index: by name, else as the index itself."""

    def __init__(self, class_names: list[str]) -> None:
        self.class_names = class_names
        self._index = {name: i for i, name in enumerate(class_names)}

    @classmethod
    def infer(cls, values: Iterable[str], class_names: list[str] | None = None) -> LabelSpace:
        """Given names win; else all-integer labels are indices 0..max, and other labels are names, sorted."""
        if class_names is not None:
            return cls(list(class_names))
        present = {value.strip() for value in values} - {""}
        if all(value.isdigit() for value in present):
            return cls([str(i) for i in range(max((int(v) for v in present), default=-1) + 1)])
        return cls(sorted(present))

    def code(self, value: str) -> int:
        text = value.strip()
        if text in self._index:
            return self._index[text]
        if text.isdigit() and int(text) < len(self.class_names):
            return int(text)
        raise ValueError(f"label {text!r} is not one of the {len(self.class_names)} classes")


@dataclass(frozen=True)
class LabelColumns:
    """A table's label columns, coded: ``trusted`` is the flag column, ``trusted_label`` and ``eval_label``
    (the evaluation-only true label, ``Catalog.eval_label``) -1 where absent."""

    label: np.ndarray
    trusted: np.ndarray
    trusted_label: np.ndarray | None
    eval_label: np.ndarray | None = None

    def take(self, rows: np.ndarray) -> LabelColumns:
        pick = lambda column: None if column is None else column[rows]  # noqa: E731
        return LabelColumns(
            self.label[rows], self.trusted[rows], pick(self.trusted_label), pick(self.eval_label)
        )

    def origin_and_truth(self, split: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Origin (val/test from ``split``, else trusted by flag, else train) and the true label per row."""
        origin = np.where((split == ORIGIN_TRAIN) & self.trusted, ORIGIN_TRUSTED, split).astype(object)
        truth = np.where(self.trusted | (split != ORIGIN_TRAIN), self.label, UNKNOWN_LABEL)
        if self.trusted_label is not None:
            truth = np.where(self.trusted_label >= 0, self.trusted_label, truth)
        return origin, truth.astype(np.int64)


_EXTRA_LABEL_OPTIONS = ("trusted_label_column", "true_label_column")


def label_cells(table: Table, options: dict, default_label: str | int) -> list[str]:
    """Every label-like cell of a table (label, trusted label, true label): what the label space is
    inferred from."""
    cells = list(table.column("label_column", options.get("label_column", default_label)))
    for option in _EXTRA_LABEL_OPTIONS:
        if options.get(option) is not None:
            cells += table.column(option, options[option])
    return cells


def read_label_columns(
    table: Table, options: dict, default_label: str | int, space: LabelSpace
) -> LabelColumns:
    """Code the label, trusted-label, true-label and trusted-flag columns the options name; errors give file
    and line. An empty trusted-label or true-label cell means "none for this row"."""
    labels = table.column("label_column", options.get("label_column", default_label))
    label = np.empty(len(table), dtype=np.int64)
    trusted = np.zeros(len(table), dtype=bool)
    extra = {
        option: (table.column(option, options[option]), np.full(len(table), UNKNOWN_LABEL, dtype=np.int64))
        for option in _EXTRA_LABEL_OPTIONS
        if options.get(option) is not None
    }
    flags = (
        table.column("trusted_column", options["trusted_column"]) if options.get("trusted_column") else None
    )
    for row in range(len(table)):
        try:
            if not labels[row].strip():
                raise ValueError("empty label")
            label[row] = space.code(labels[row])
            for cells, coded in extra.values():
                if cells[row].strip():
                    coded[row] = space.code(cells[row])
            if flags is not None:
                trusted[row] = parse_flag(flags[row])
        except ValueError as err:
            raise table.error(row, str(err)) from None
    coded = {option: column for option, (_, column) in extra.items()}
    return LabelColumns(label, trusted, coded.get("trusted_label_column"), coded.get("true_label_column"))


@dataclass(frozen=True)
class TextPart:
    """One file of a text source: its rows' origin, texts and coded labels."""

    origin: str
    table: Table
    texts: list[str]
    labels: LabelColumns


def text_catalog(
    name: str, class_names: list[str], parts: list[TextPart], *, labels_are_true: bool = False
) -> Catalog:
    """The catalog of a text source's files, in file order. A row whose text is empty (after stripping) has
    nothing to learn from: it is skipped, and counted per file in the description.

    ``labels_are_true``: the release's labels are its true labels (SST-2, AG News: benchmarks inject noise
    into them); otherwise a training row's label is its given, possibly noisy, label.
    """
    texts: list[str] = []
    kept: list[tuple[LabelColumns, np.ndarray]] = []
    skipped: dict[str, int] = {}
    for part in parts:
        keep = np.flatnonzero([bool(text.strip()) for text in part.texts])
        if len(keep) < len(part.texts):
            skipped[str(part.table.path)] = len(part.texts) - len(keep)
        texts.extend(part.texts[i] for i in keep)
        labels = part.labels.take(keep)
        kept.append((labels, np.full(len(keep), part.origin, dtype=object)))
    columns = [labels.origin_and_truth(split) for labels, split in kept]
    if labels_are_true:
        columns = [(origin, labels.label) for (origin, _), (labels, _) in zip(columns, kept, strict=True)]

    def joined(attribute: str) -> np.ndarray | None:
        values = [getattr(labels, attribute) for labels, _ in kept]
        return None if values[0] is None else np.concatenate(values)

    return Catalog(
        name=name,
        modality="text",
        class_names=class_names,
        label=np.concatenate([labels.label for labels, _ in kept]),
        true_label=np.concatenate([truth for _, truth in columns]),
        origin=np.concatenate([origin for origin, _ in columns]),
        read_payload=TextPayloads(texts),
        trusted_label=joined("trusted_label"),
        eval_label=joined("eval_label"),
        description={
            "files": {str(part.table.path): len(part.table) for part in parts},
            "empty_texts_skipped": skipped,
        },
    )


@dataclass(frozen=True)
class TextPayloads:
    """``read_payload`` for text: the text itself (tokenisation happens in the pipeline)."""

    texts: list[str]

    def __call__(self, sample_id: int) -> str:
        return self.texts[sample_id]


@register_source("text-table", needs_root=True, transform="text", image_size=None, channels=0)
def load(root: Path | None, options: dict) -> Catalog:
    """One table file (all rows ``train``/``trusted``), or a folder with ``train``/``val``/``test`` files."""
    check_options("text-table", options, _OPTIONS)
    assert root is not None
    header = _flag_option(options, "header", default=True)
    files = _split_files(root, options)
    tables = [
        (origin, read_table(path, table_format(path, options.get("format")), header))
        for origin, path in files
    ]
    default_text, default_label = ("text", "label") if header else (0, 1)
    space = LabelSpace.infer(
        (cell for _, table in tables for cell in label_cells(table, options, default_label)),
        _class_names_option(options),
    )
    parts = [
        TextPart(
            origin,
            table,
            table.column("text_column", options.get("text_column", default_text)),
            read_label_columns(table, options, default_label, space),
        )
        for origin, table in tables
    ]
    return text_catalog("text-table", space.class_names, parts)


def _split_files(root: Path, options: dict) -> list[tuple[str, Path]]:
    """(origin, file) pairs: the root file itself, or the ``train``/``val``/``test`` files in a folder."""
    named = [(origin, key) for origin, key in _SPLIT_FILES if options.get(key)]
    if root.is_file():
        if named:
            raise ConfigError(
                f"data.options.{named[0][1]}", "only applies when data.root is a folder", "drop it"
            )
        return [(ORIGIN_TRAIN, root)]
    if not named:
        raise ConfigError(
            "data.options.train",
            f"data.root {root} is a folder",
            "name its files with data.options.train/val/test",
        )
    return [(origin, root / str(options[key])) for origin, key in named]


def _flag_option(options: dict, key: str, *, default: bool) -> bool:
    value = options.get(key, default)
    if isinstance(value, bool):
        return value
    try:
        return parse_flag(str(value))
    except ValueError:
        raise ConfigError(f"data.options.{key}", f"{value!r} is not a boolean", "use true or false") from None


def _class_names_option(options: dict) -> list[str] | None:
    names = options.get("class_names")
    if names is None:
        return None
    if not isinstance(names, list | tuple) or not names or not all(isinstance(name, str) for name in names):
        raise ConfigError(
            "data.options.class_names", f"{names!r} is not a list of names", "give a list of strings"
        )
    return list(names)
