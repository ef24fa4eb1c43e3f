"""Registry of noisy-label methods. Adding a method = one module here + an entry in ``_METHOD_MODULES``."""

from __future__ import annotations

import importlib

from raynoisy.errors import ConfigError
from raynoisy.methods.base import Batch, Method, MethodContext

_METHOD_MODULES = {
    "ce": "ce",
    "ce-clean": "ce",
    "glc": "glc",
    "mwnet": "mwnet",
    "mlc": "mlc",
    "metalabelnet": "metalabelnet",
}

METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: register a Method subclass under its ``name``."""
    METHODS[cls.name] = cls
    return cls


def method_names() -> list[str]:
    return sorted(_METHOD_MODULES)


def get_method_class(name: str) -> type[Method]:
    if name not in _METHOD_MODULES:
        raise ConfigError("method.name", f"unknown method {name!r}", f"use one of {method_names()}")
    if name not in METHODS:
        importlib.import_module(f"raynoisy.methods.{_METHOD_MODULES[name]}")
    return METHODS[name]


__all__ = [
    "METHODS",
    "Batch",
    "Method",
    "MethodContext",
    "get_method_class",
    "method_names",
    "register_method",
]
