"""Registry of noisy-label methods. Adding a method = one module here with a ``@register_method`` class.

Every module of this package is imported on the first lookup, so the decorator is the only registration.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from typing import Any

from raynoisy.config import Config
from raynoisy.errors import ConfigError
from raynoisy.methods.base import Method, MethodContext

METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: register a Method subclass under its ``name``."""
    if METHODS.get(cls.name, cls) is not cls:
        raise ValueError(f"method {cls.name!r} is already registered by {METHODS[cls.name].__qualname__}")
    METHODS[cls.name] = cls
    return cls


def _import_all() -> None:
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")


def method_names() -> list[str]:
    _import_all()
    return sorted(METHODS)


def get_method_class(name: str, module: str | None = None) -> type[Method]:
    """The method registered as ``name``; ``module`` (``method.module``) is imported first if given."""
    if module is not None:
        try:
            importlib.import_module(module)
        except (ImportError, ValueError, TypeError) as exc:  # ValueError: "", TypeError: ".relative"
            raise ConfigError(
                "method.module", f"cannot import {module!r} ({exc})", "pass an importable module"
            ) from None
    if name not in METHODS:
        _import_all()
    if name not in METHODS:
        raise ConfigError("method.name", f"unknown method {name!r}", f"use one of {method_names()}")
    return METHODS[name]


def complete_params(method: dict[str, Any]) -> dict[str, Any]:
    """A config's ``method`` section (as ``Config.to_dict()`` gives it) with ``params`` completed by the
    method's defaults, validated (ConfigError where they do not parse). A run's config.json records this, so
    that a run trained before a default changed is told apart from one this code would train."""
    method_cls = get_method_class(method["name"], method.get("module"))
    params = method_cls.parse_params(method.get("params") or {})
    return {**method, "params": dataclasses.asdict(params)}


def check_config(cfg: Config) -> None:
    """The method part of a run's config, before Ray starts: a known method, its params, its constraints."""
    method_cls = get_method_class(cfg.method.name, cfg.method.module)
    method_cls.parse_params(cfg.method.params)
    method_cls.check_config(cfg)
    if cfg.split.clean_per_class == 0 and _uses_trusted(method_cls, cfg):
        without = [name for name in method_names() if not METHODS[name].needs_trusted]
        raise ConfigError(
            "split.clean_per_class",
            f"method {cfg.method.name!r} trains on a trusted set and --clean-per-class 0 leaves none",
            f"pass --clean-per-class 1 or more, or use a method without one ({', '.join(without)})",
        )


def _uses_trusted(method_cls: type[Method], cfg: Config) -> bool:
    """Whether ``method_cls`` reads the trusted set under ``cfg``: it says so (``needs_trusted``), or one of
    its stages trains on the trusted stream. Without this check such a run would only fail in the driver,
    after the catalog is read, or with an empty trusted stream inside a Ray worker."""
    return method_cls.needs_trusted or any(stage.trains_on == "trusted" for stage in method_cls.stages(cfg))


__all__ = [
    "METHODS",
    "Method",
    "MethodContext",
    "check_config",
    "get_method_class",
    "method_names",
    "register_method",
]
