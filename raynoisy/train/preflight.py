"""Everything about a run that can be checked before Ray starts, in one call.

The schema (``raynoisy.config.validate``) and each registry's own part (data source and noise, backbone and
its pretrained weights, method and its params) are checked here, plus the output folder: a bad value is one
``ConfigError`` naming the field and the fix, raised in the driver's process, never inside a Ray worker.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from raynoisy import methods, models
from raynoisy.config import Config, load_config, user_path, validate
from raynoisy.data.sources import check_config as check_data
from raynoisy.data.sources import get_source
from raynoisy.errors import ConfigError

__all__ = ["check", "resolve_config"]


def check(cfg: Config) -> None:
    """Raise a ConfigError for the first thing in ``cfg`` that would fail the run."""
    validate(cfg)
    check_data(cfg)
    source = get_source(cfg.data.dataset)
    size = cfg.data.max_tokens if source.transform == "text" else cfg.data.image_size or source.image_size
    models.check_config(cfg, size or 0, "text" if source.transform == "text" else "image")
    methods.check_config(cfg)
    _check_output_writable(user_path(cfg.run.output, "run.output"))  # type: ignore[arg-type]


def _check_output_writable(output: Path) -> None:
    """The output folder exists and is writable, or can be created: checked without creating anything, so
    that validating a config meant for a cluster leaves no folders behind here."""
    try:
        if "\0" in str(output):
            raise ValueError("a NUL character in the path")
        existing = next(p for p in (output, *output.parents) if p.exists())
        problem = None
        if not existing.is_dir():
            problem = f"{str(existing)!r} is a file, not a folder"
        elif not os.access(existing, os.W_OK | os.X_OK):
            problem = f"{str(existing)!r} is not writable"
    except (OSError, ValueError) as exc:
        problem = str(getattr(exc, "strerror", None) or exc)
    if problem is not None:
        raise ConfigError(
            "run.output",
            f"cannot write to {str(output)!r} ({problem})",
            "pass --output DIR in a folder you can write",
        )


def resolve_config(
    dataset: str,
    method: str,
    *,
    config_file: str | None = None,
    flags: dict[str, Any] | None = None,
    overrides: list[str] | None = None,
) -> Config:
    """Load a run's config (preset, file, flags, ``--set``) and check all of it: the public way to get one."""
    cfg = load_config(dataset, method, config_file=config_file, flags=flags, overrides=overrides)
    check(cfg)
    return cfg
