"""Loading the scripts in ``benchmarks/`` for their tests: a folder of scripts, not a package on sys.path."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(script: str) -> ModuleType:
    """Import ``benchmarks/<script>.py`` by path (a fresh module each call)."""
    spec = importlib.util.spec_from_file_location(f"raynoisy_benchmark_{script}", BENCHMARKS / f"{script}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is created
    spec.loader.exec_module(module)
    return module
