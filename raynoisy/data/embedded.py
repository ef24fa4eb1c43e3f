"""Embedded data sets: generated miniature copies in the official layout, used when no data root is given.

They let ``python jobs/clothing1m.py`` run end to end on a laptop with nothing downloaded, through exactly
the code path the real data set takes.
"""

from __future__ import annotations

import os
from pathlib import Path

from raynoisy.data.miniature import build_miniature_clothing1m


def cache_home() -> Path:
    return Path(os.environ.get("RAYNOISY_HOME", "~/.cache/raynoisy")).expanduser()


def embedded_root(dataset: str, log=print) -> Path:
    """Build (once) and return the root of the embedded copy of ``dataset``."""
    if dataset != "clothing1m":
        raise ValueError(f"no embedded copy of {dataset}")
    root = cache_home() / "embedded" / "clothing1m-mini"
    log(f"[data] no --data-root: using the embedded miniature Clothing1M at {root}")
    return build_miniature_clothing1m(root)
