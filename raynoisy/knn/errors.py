"""Errors of the kNN index service; each survives pickling across Ray's process boundary.

Two kinds, on purpose:

- ``NonFiniteFeaturesError`` is a ``RaynoisyError``: deterministic (the same features fail again), so the
  trainer stops the run with it, as with a diverged loss, instead of retrying the worker group.
- ``IndexNotReadyError`` is not: it says the index does not hold what the caller asked for (a version not
  fully added, or no version built yet, as after Ray restarted the actor) and the caller recovers by adding
  the epoch's features again and building. It is a ``RuntimeError`` so that the trainer's handling of
  ``RaynoisyError`` does not turn a recoverable restart into a failed run.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from raynoisy.errors import RaynoisyError

SHOWN_IDS = 10  # sample ids named in a message; the count says how many there are in all


def format_ids(sample_ids: Any) -> str:
    """``"3 sample_ids: 4, 17, 99"`` with at most ``SHOWN_IDS`` of them named."""
    ids = np.asarray(sample_ids, dtype=np.int64).ravel()
    shown = ", ".join(str(int(i)) for i in ids[:SHOWN_IDS])
    more = f", ... ({len(ids) - SHOWN_IDS} more)" if len(ids) > SHOWN_IDS else ""
    return f"{len(ids)} sample_id{'s' if len(ids) != 1 else ''}: {shown}{more}"


class NonFiniteFeaturesError(RaynoisyError):
    """Features with NaN or infinite values were handed to the index; the message names their sample_ids."""

    def __init__(self, version: int, sample_ids: Any) -> None:
        self.version = int(version)
        self.sample_ids = np.asarray(sample_ids, dtype=np.int64).ravel()
        super().__init__(
            f"knn index version {self.version}: non-finite features (NaN or inf) for "
            f"{format_ids(self.sample_ids)}; the model's features diverged or the batch is corrupt — check "
            "the loss and the learning rate",
            self.version,
            self.sample_ids,
        )


class IndexNotReadyError(RuntimeError):
    """The index does not hold the version asked for: add the epoch's features (again) and build.

    ``built_version`` is the version the index holds now (-1: none, e.g. Ray restarted the actor);
    ``missing`` how many training samples were not added for ``version`` (0 when that is not the problem).
    """

    def __init__(self, message: str, version: int, built_version: int, missing: int = 0) -> None:
        self.version, self.built_version, self.missing = int(version), int(built_version), int(missing)
        super().__init__(message)
        self._init_args = (message, self.version, self.built_version, self.missing)

    def __reduce__(self) -> tuple[type, tuple[Any, ...]]:
        return type(self), self._init_args
