"""Fashion-MNIST from its four idx files (gzipped as distributed, or already unpacked).

The idx files are small enough (55 MB of pixels) to hold in memory; payloads are PNG-encoded per sample
when shards are written. Every header field is checked because a truncated download otherwise turns
into a reshape error far from the file at fault.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from raynoisy.data.catalog import ORIGIN_TEST, ORIGIN_TRAIN, Catalog
from raynoisy.data.images import PngPayloads, check_options
from raynoisy.data.sources import register_source
from raynoisy.errors import DataFormatError

CLASS_NAMES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]

# idx magic: two zero bytes, 0x08 (unsigned byte data), then the number of dimensions.
_UBYTE = 0x08
_SPLITS = ((ORIGIN_TRAIN, "train"), (ORIGIN_TEST, "t10k"))


@register_source("fashion-mnist", needs_root=True, transform="small", image_size=28, channels=1)
def load(root: Path | None, options: dict) -> Catalog:
    """60,000 ``train`` rows, then 10,000 ``test`` rows, in file order; labels are clean."""
    check_options("fashion-mnist", options)
    assert root is not None
    images, labels, origins = [], [], []
    for origin, prefix in _SPLITS:
        image_path = _find(root, f"{prefix}-images-idx3-ubyte")
        label_path = _find(root, f"{prefix}-labels-idx1-ubyte")
        split_images = read_idx(image_path, ndim=3)
        split_labels = read_idx(label_path, ndim=1)
        if len(split_labels) != len(split_images):
            raise DataFormatError(
                str(label_path), f"{len(split_labels)} labels for {len(split_images)} images in {image_path}"
            )
        if split_labels.size and split_labels.max() >= len(CLASS_NAMES):
            raise DataFormatError(str(label_path), f"label {split_labels.max()} is not a class index 0-9")
        images.append(split_images)
        labels.append(split_labels.astype(np.int64))
        origins.append(np.full(len(split_labels), origin, dtype=object))
    label = np.concatenate(labels)
    return Catalog(
        name="fashion-mnist",
        modality="image",
        class_names=list(CLASS_NAMES),
        label=label,
        true_label=label.copy(),
        origin=np.concatenate(origins),
        read_payload=PngPayloads(np.concatenate(images)),
        description={"root": str(root)},
    )


def _find(root: Path, name: str) -> Path:
    """The unpacked file if present, else the ``.gz`` one as distributed."""
    for candidate in (root / name, root / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise DataFormatError(str(root / f"{name}.gz"), "file not found (also looked for the unpacked file)")


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """Read an unsigned-byte idx file of ``ndim`` dimensions, checking magic number and size."""
    try:
        raw = path.read_bytes()
        if path.suffix == ".gz":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as err:
        raise DataFormatError(str(path), f"cannot read: {err}") from err
    header_size = 4 + 4 * ndim
    if len(raw) < header_size:
        raise DataFormatError(str(path), f"only {len(raw)} bytes, shorter than the idx header")
    magic = int.from_bytes(raw[:4], "big")
    expected = (_UBYTE << 8) | ndim
    if magic != expected:
        raise DataFormatError(str(path), f"bad magic number {magic:#010x}, expected {expected:#010x}")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    size = int(np.prod(shape))
    if len(raw) - header_size != size:
        raise DataFormatError(
            str(path), f"header says {shape} = {size} bytes of data, file has {len(raw) - header_size}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header_size).reshape(shape)
