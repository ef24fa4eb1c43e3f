"""Registry of data sources: each turns a data root (or nothing) into a ``Catalog``.

A source module registers itself with ``@register_source``; ``load_catalog`` imports the modules
lazily so that asking for one source never imports another's dependencies.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from raynoisy.data.catalog import Catalog
from raynoisy.errors import ConfigError

# How images of a source are decoded and augmented (see raynoisy.data.transforms).
TransformFamily = Literal["small", "cifar", "imagenet", "text"]


@dataclass(frozen=True)
class SourceSpec:
    """What the rest of the system needs to know about a source before loading it."""

    name: str
    load: Callable[[Path | None, dict], Catalog]
    needs_root: bool
    transform: TransformFamily
    image_size: int | None  # side of the square network input; None for text
    channels: int  # 1 for grayscale, 3 for RGB, 0 for text


SOURCES: dict[str, SourceSpec] = {}

# Module that registers each source name, so that lookups import only what they need.
_SOURCE_MODULES = {
    "digits": "digits",
    "fashion-mnist": "fashion_mnist",
    "cifar10": "cifar",
    "cifar100": "cifar",
    "clothing1m": "clothing1m",
    "webvision-mini": "webvision",
    "webvision": "webvision",
    "image-list": "image_list",
    "text-table": "text_table",
}


def register_source(
    name: str, *, needs_root: bool, transform: TransformFamily, image_size: int | None, channels: int
) -> Callable[[Callable[[Path | None, dict], Catalog]], Callable[[Path | None, dict], Catalog]]:
    """Decorator: register ``load(root, options) -> Catalog`` under ``name``."""

    def wrap(load: Callable[[Path | None, dict], Catalog]) -> Callable[[Path | None, dict], Catalog]:
        SOURCES[name] = SourceSpec(name, load, needs_root, transform, image_size, channels)
        return load

    return wrap


def source_names() -> list[str]:
    return sorted(_SOURCE_MODULES)


def get_source(name: str) -> SourceSpec:
    """Look up a source, importing its module on first use."""
    if name not in _SOURCE_MODULES:
        raise ConfigError("data.dataset", f"unknown dataset {name!r}", f"use one of {source_names()}")
    if name not in SOURCES:
        importlib.import_module(f"raynoisy.data.sources.{_SOURCE_MODULES[name]}")
    return SOURCES[name]


def load_catalog(name: str, root: str | Path | None, options: dict | None = None) -> Catalog:
    """Load the catalog of source ``name`` from ``root`` with source-specific ``options``."""
    spec = get_source(name)
    path = Path(root).expanduser() if root is not None else None
    if spec.needs_root and path is None:
        raise ConfigError("data.root", f"dataset {name!r} needs a data root", "pass --data-root PATH")
    if path is not None and not path.exists():
        raise ConfigError("data.root", f"{path} does not exist", "pass --data-root pointing at the data set")
    return spec.load(path, dict(options or {}))
