"""CIFAR-10 and CIFAR-100 from the python-pickle batches of the official release.

The pickles were written by Python 2, so keys (and CIFAR-10's class names) are bytes; they are
normalised to str here. CIFAR-100 uses its 100 fine labels: that is what every noisy-label paper
reports on, and the asymmetric-noise protocols are defined on fine-label indices.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from raynoisy.data.catalog import ORIGIN_TEST, ORIGIN_TRAIN, Catalog
from raynoisy.data.images import PngPayloads, check_options
from raynoisy.data.sources import register_source
from raynoisy.errors import DataFormatError

_SIDE = 32
_ROW_BYTES = 3 * _SIDE * _SIDE  # one image: 1024 red, then 1024 green, then 1024 blue bytes


@dataclass(frozen=True)
class _Layout:
    """Where one CIFAR variant keeps its batches, labels and class names."""

    folder: str
    train: tuple[str, ...]
    test: str
    meta: str
    label_key: str
    names_key: str


_LAYOUTS = {
    "cifar10": _Layout(
        folder="cifar-10-batches-py",
        train=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test="test_batch",
        meta="batches.meta",
        label_key="labels",
        names_key="label_names",
    ),
    "cifar100": _Layout(
        folder="cifar-100-python",
        train=("train",),
        test="test",
        meta="meta",
        label_key="fine_labels",
        names_key="fine_label_names",
    ),
}


@register_source("cifar10", needs_root=True, transform="cifar", image_size=_SIDE, channels=3)
def load_cifar10(root: Path | None, options: dict) -> Catalog:
    """50,000 ``train`` rows (batches 1-5 in order), then 10,000 ``test`` rows."""
    return _load("cifar10", root, options)


@register_source("cifar100", needs_root=True, transform="cifar", image_size=_SIDE, channels=3)
def load_cifar100(root: Path | None, options: dict) -> Catalog:
    """50,000 ``train`` rows, then 10,000 ``test`` rows, with the 100 fine labels."""
    return _load("cifar100", root, options)


def _load(name: str, root: Path | None, options: dict) -> Catalog:
    check_options(name, options)
    assert root is not None
    layout = _LAYOUTS[name]
    folder = root / layout.folder if (root / layout.folder).is_dir() else root
    class_names = _class_names(folder / layout.meta, layout.names_key)
    pixels, labels, origins = [], [], []
    for origin, files in ((ORIGIN_TRAIN, layout.train), (ORIGIN_TEST, (layout.test,))):
        for file in files:
            batch_pixels, batch_labels = _read_batch(folder / file, layout.label_key, len(class_names))
            pixels.append(batch_pixels)
            labels.append(batch_labels)
            origins.append(np.full(len(batch_labels), origin, dtype=object))
    label = np.concatenate(labels)
    return Catalog(
        name=name,
        modality="image",
        class_names=class_names,
        label=label,
        true_label=label.copy(),
        origin=np.concatenate(origins),
        read_payload=PngPayloads(np.concatenate(pixels)),
        description={"root": str(folder)},
    )


def _unpickle(path: Path) -> dict:
    """Load one batch with str keys; ``encoding="bytes"`` is what the Python 2 pickles need."""
    try:
        with path.open("rb") as stream:
            content = pickle.load(stream, encoding="bytes")
    except FileNotFoundError as err:
        raise DataFormatError(str(path), "file not found; expected the python batches") from err
    except (OSError, EOFError, pickle.UnpicklingError, ValueError) as err:
        raise DataFormatError(str(path), f"not a readable pickle batch: {err}") from err
    if not isinstance(content, dict):
        raise DataFormatError(str(path), f"expected a pickled dict, found {type(content).__name__}")
    return {key.decode() if isinstance(key, bytes) else key: value for key, value in content.items()}


def _class_names(path: Path, key: str) -> list[str]:
    meta = _unpickle(path)
    if key not in meta:
        raise DataFormatError(str(path), f"no {key!r} entry")
    return [name.decode() if isinstance(name, bytes) else str(name) for name in meta[key]]


def _read_batch(path: Path, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixels as N x 32 x 32 x 3 uint8 (the batches store them channel-planar) and int64 labels."""
    batch = _unpickle(path)
    for key in ("data", label_key):
        if key not in batch:
            raise DataFormatError(str(path), f"no {key!r} entry")
    data = np.asarray(batch["data"])
    labels = np.asarray(batch[label_key], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _ROW_BYTES:
        raise DataFormatError(str(path), f"data is {data.dtype} {data.shape}, not uint8 N x {_ROW_BYTES}")
    if len(labels) != len(data):
        raise DataFormatError(str(path), f"{len(labels)} labels for {len(data)} images")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataFormatError(str(path), f"labels outside 0..{num_classes - 1}")
    return data.reshape(-1, 3, _SIDE, _SIDE).transpose(0, 2, 3, 1), labels
