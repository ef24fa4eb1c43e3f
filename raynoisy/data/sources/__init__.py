"""Registry of data sources: each turns a data root (or nothing) into a ``Catalog``.

A source module registers itself with ``@register_source``, the only registration: every module of this
package is imported on the first lookup (they import nothing heavier than numpy and scikit-learn).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from raynoisy.config import EMBEDDED_DATASETS, Config, user_path
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


def register_source(
    name: str, *, needs_root: bool, transform: TransformFamily, image_size: int | None, channels: int
) -> Callable[[Callable[[Path | None, dict], Catalog]], Callable[[Path | None, dict], Catalog]]:
    """Decorator: register ``load(root, options) -> Catalog`` under ``name``."""

    def wrap(load: Callable[[Path | None, dict], Catalog]) -> Callable[[Path | None, dict], Catalog]:
        SOURCES[name] = SourceSpec(name, load, needs_root, transform, image_size, channels)
        return load

    return wrap


def _import_all() -> None:
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")


def source_names() -> list[str]:
    _import_all()
    return sorted(SOURCES)


def get_source(name: str) -> SourceSpec:
    """Look up a source by name."""
    if name not in SOURCES:
        _import_all()
    if name not in SOURCES:
        raise ConfigError("data.dataset", f"unknown dataset {name!r}", f"use one of {source_names()}")
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


def check_config(cfg: Config) -> None:
    """The data part of a run's config, before Ray starts: source, data root and noise protocol."""
    from raynoisy.data.noise import NoiseSpec

    source = get_source(cfg.data.dataset)
    root = cfg.data.root
    if root is not None and "://" not in root and not user_path(root, "data.root").exists():
        raise ConfigError("data.root", f"{root} does not exist", "pass --data-root pointing at the data set")
    if source.needs_root and root is None and cfg.data.dataset not in EMBEDDED_DATASETS:
        raise ConfigError(
            "data.root", f"dataset {cfg.data.dataset!r} needs a data root", "pass --data-root PATH"
        )
    noise = NoiseSpec.parse(cfg.noise.type, cfg.noise.rate)
    if noise.type == "matrix" and not (
        noise.matrix_path and user_path(noise.matrix_path, "noise.type").is_file()
    ):
        raise ConfigError(
            "noise.type",
            f"matrix file {noise.matrix_path} does not exist or is not a file",
            "pass --noise matrix:PATH with a row-stochastic KxK .npy or .csv",
        )


def resolve_root(cfg: Config, log: Callable[[str], None] = print) -> str | None:
    """The data root a run reads: ``data.root``, or the embedded miniature copy (built once) if it has one."""
    if cfg.data.root is not None:
        return str(Path(cfg.data.root).expanduser().resolve())
    if get_source(cfg.data.dataset).needs_root:
        from raynoisy.data.embedded import embedded_root

        return str(embedded_root(cfg.data.dataset, log=log))
    return None
