"""Embedded data sets: generated miniature copies in the official layout, used when no data root is given.

They let ``python jobs/clothing1m.py`` and ``python jobs/text.py`` run end to end on a laptop with nothing
downloaded, through exactly the code path the real data set takes.
"""

from __future__ import annotations

import os
from pathlib import Path

from raynoisy.data.miniature import build_miniature_clothing1m
from raynoisy.data.miniature_text import build_miniature_ag_news


def cache_home() -> Path:
    return Path(os.environ.get("RAYNOISY_HOME", "~/.cache/raynoisy")).expanduser()


def embedded_root(dataset: str, log=print) -> Path:
    """Build (once) and return the root of the embedded copy of ``dataset``."""
    if dataset == "clothing1m":
        root = cache_home() / "embedded" / "clothing1m-mini"
        log(f"[data] no --data-root: using the embedded miniature Clothing1M at {root}")
        return build_miniature_clothing1m(root)
    if dataset == "ag-news":
        root = cache_home() / "embedded" / "ag-news-mini"
        log(f"[data] no --data-root: using the embedded miniature AG News at {root}")
        return build_miniature_ag_news(root)
    raise ValueError(f"no embedded copy of {dataset}")
