"""Helpers every source module shares: lazy payload readers and the check of source options.

Catalogs hold payload readers, not payloads: a million-image source must load in seconds, and
encoding happens one sample at a time when shards are written. The readers are small picklable
classes (not closures) so a catalog can be shipped to Ray workers as it is.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from raynoisy.data.catalog import MissingPayloadError
from raynoisy.errors import ConfigError


def check_options(source: str, options: dict, allowed: Iterable[str] = ()) -> None:
    """Reject option keys a source does not know, so a typo fails before Ray starts, not silently."""
    allowed = sorted(allowed)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        fix = f"use only {', '.join(allowed)}" if allowed else "remove data.options"
        raise ConfigError(f"data.options.{unknown[0]}", f"unknown option for dataset {source!r}", fix)


def png_bytes(pixels: np.ndarray) -> bytes:
    """Encode an HxW (grayscale) or HxWx3 (RGB) uint8 array as PNG: lossless, so pixels round-trip."""
    if pixels.dtype != np.uint8 or pixels.ndim not in (2, 3):
        raise ValueError(f"expected an HxW or HxWx3 uint8 array, got {pixels.dtype} {pixels.shape}")
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def read_file_bytes(path: Path) -> bytes:
    """Read a payload file; a missing or unreadable file is a per-sample problem the sharder counts."""
    try:
        return path.read_bytes()
    except OSError as err:
        raise MissingPayloadError(f"{path}: {err.strerror or err}") from err


@dataclass(frozen=True)
class PngPayloads:
    """``read_payload`` for sources whose pixels sit in memory (idx, pickle batches): PNG on demand."""

    pixels: np.ndarray  # N x H x W or N x H x W x 3, uint8

    def __call__(self, sample_id: int) -> bytes:
        return png_bytes(self.pixels[sample_id])


@dataclass(frozen=True)
class FilePayloads:
    """``read_payload`` for sources whose samples are image files: the file's bytes, never decoded here."""

    root: Path
    paths: Sequence[str]  # per sample, relative to ``root`` (an absolute path overrides it)

    def __call__(self, sample_id: int) -> bytes:
        return read_file_bytes(self.root / self.paths[sample_id])
