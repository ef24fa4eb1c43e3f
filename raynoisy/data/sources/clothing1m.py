"""Clothing1M in its official layout: label key-value files, four key lists, images under ``images/``.

A key (``images/0/00/123.jpg``) is a path relative to the root. Some keys appear in several lists;
each becomes one row, in the highest-priority list (test > val > clean train > noisy train), so the
clean and evaluation sets can never leak into the noisy training pool. Images are not touched at load
time (a million ``stat`` calls take minutes on network storage): ``read_payload`` reports a missing one.
"""

from __future__ import annotations

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
from raynoisy.data.images import FilePayloads, check_options
from raynoisy.data.sources import register_source
from raynoisy.errors import DataFormatError

CATEGORY_FILE = "category_names_eng.txt"
NOISY_KV = "noisy_label_kv.txt"
CLEAN_KV = "clean_label_kv.txt"

# (list file, origin, label file giving the row's label), highest priority first.
LISTS = (
    ("clean_test_key_list.txt", ORIGIN_TEST, CLEAN_KV),
    ("clean_val_key_list.txt", ORIGIN_VAL, CLEAN_KV),
    ("clean_train_key_list.txt", ORIGIN_TRUSTED, CLEAN_KV),
    ("noisy_train_key_list.txt", ORIGIN_TRAIN, NOISY_KV),
)


@register_source("clothing1m", needs_root=True, transform="imagenet", image_size=224, channels=3)
def load(root: Path | None, options: dict) -> Catalog:
    """Rows in list order: noisy train, clean train (``trusted``), clean val, clean test.

    ``label`` is the noisy label for noisy-train rows and the clean label otherwise; ``true_label`` is
    the clean label wherever ``clean_label_kv.txt`` has one (including noisy-train keys), else -1.
    """
    check_options("clothing1m", options)
    assert root is not None
    class_names = _read_lines(root / CATEGORY_FILE)
    label_files = {name: read_label_kv(root / name, len(class_names)) for name in (NOISY_KV, CLEAN_KV)}
    clean = label_files[CLEAN_KV]

    taken: set[str] = set()
    kept: dict[str, list[str]] = {}
    dropped: dict[str, int] = {}
    for list_name, _, label_name in LISTS:
        keys = _read_key_list(root / list_name, label_files[label_name], label_name)
        kept[list_name] = [key for key in dict.fromkeys(keys) if key not in taken]
        dropped[list_name] = len(keys) - len(kept[list_name])
        taken.update(kept[list_name])

    paths: list[str] = []
    labels: list[int] = []
    true_labels: list[int] = []
    origins: list[np.ndarray] = []
    for list_name, origin, label_name in reversed(LISTS):
        keys = kept[list_name]
        given = label_files[label_name]
        paths.extend(keys)
        labels.extend(given[key] for key in keys)
        true_labels.extend(clean.get(key, UNKNOWN_LABEL) for key in keys)
        origins.append(np.full(len(keys), origin, dtype=object))
    true_label = np.asarray(true_labels, dtype=np.int64)
    origin = np.concatenate(origins)
    return Catalog(
        name="clothing1m",
        modality="image",
        class_names=class_names,
        label=np.asarray(labels, dtype=np.int64),
        true_label=true_label,
        origin=origin,
        read_payload=FilePayloads(root, paths),
        description={
            "root": str(root),
            "rows": {name: len(keys) for name, keys in kept.items()},
            "dropped_keys": dropped,
            "noisy_train_with_clean_label": int(np.count_nonzero(true_label[origin == ORIGIN_TRAIN] >= 0)),
        },
    )


def _open_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError as err:
        raise DataFormatError(str(path), "file not found; expected the official Clothing1M layout") from err
    except (OSError, UnicodeDecodeError) as err:
        raise DataFormatError(str(path), f"cannot read: {err}") from err


def _read_lines(path: Path) -> list[str]:
    names = [line.strip() for line in _open_text(path).splitlines() if line.strip()]
    if not names:
        raise DataFormatError(str(path), "no class names")
    return names


def read_label_kv(path: Path, num_classes: int) -> dict[str, int]:
    """Parse ``key label`` lines; a repeated key must repeat its label, or the file contradicts itself."""
    labels: dict[str, int] = {}
    for line_number, line in enumerate(_open_text(path).splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2:
            raise DataFormatError(str(path), f"expected 'key label', found {line.strip()!r}", line_number)
        key, text = fields
        try:
            label = int(text)
        except ValueError:
            raise DataFormatError(str(path), f"label {text!r} is not an integer", line_number) from None
        if not 0 <= label < num_classes:
            raise DataFormatError(str(path), f"label {label} is outside 0..{num_classes - 1}", line_number)
        if labels.setdefault(key, label) != label:
            raise DataFormatError(str(path), f"{key} was labelled {labels[key]} before", line_number)
    return labels


def _read_key_list(path: Path, labels: dict[str, int], label_name: str) -> list[str]:
    """The keys of a list file, in order; every key needs a label in the label file for its list."""
    keys: list[str] = []
    for line_number, line in enumerate(_open_text(path).splitlines(), start=1):
        key = line.strip()
        if not key:
            continue
        if key not in labels:
            raise DataFormatError(str(path), f"{key} has no label in {label_name}", line_number)
        keys.append(key)
    return keys
