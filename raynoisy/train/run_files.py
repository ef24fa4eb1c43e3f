"""The contract between the driver and the workers: what a run is told, and which file holds what.

A checkpoint directory holds ``state.pt`` (method state, loop state, RNG; rank 0), ``best_model.pt`` (the
best-validation model so far), ``stage_best_model.pt`` (the current stage's best, which the next stage may
start from), one ``sample_store-<rank>-of-<world>`` file per rank (each rank's block of the per-sample
store), and at the end of the run ``summary.json`` and the method's per-sample export. The driver turns
the last checkpoint into the run's outputs; ``write_metrics`` is the one place that writes metrics.json.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from raynoisy.data.pipeline import InputSpec

STATE_FILE = "state.pt"
BEST_MODEL_FILE = "best_model.pt"
STAGE_BEST_MODEL_FILE = "stage_best_model.pt"
SUMMARY_FILE = "summary.json"
METRICS_FILE = "metrics.json"


@dataclass
class RunInfo:
    """Facts about the prepared data that every worker needs; computed once by the driver."""

    num_classes: int
    input: InputSpec
    files: dict[str, list[str]]
    counts: dict[str, int]
    steps_per_epoch: int
    output: str
    fault_marker: str
    actual_noise_rate: float
    train_ids: Any  # ObjectRef of the sorted int64 sample ids of the training split
    # Evaluation sets inside the test split (``Catalog.group``): name -> sorted sample ids; empty for one set.
    test_sets: dict[str, Any] = field(default_factory=dict)


@dataclass
class LoopState:
    """Where the loop is and what it has seen; saved in every checkpoint, restored on resume."""

    stage: int = 0  # index into the method's stages
    epoch: int = 0  # epochs finished, over all stages
    epoch_in_stage: int = 0
    step: int = 0  # steps finished in the current epoch (a step checkpoint's position)
    history: list[dict] = field(default_factory=list)
    stage_scalars: dict[str, float] = field(default_factory=dict)  # logged with the stage's first epoch
    best_epoch: int = -1
    best_val_accuracy: float = float("nan")
    best_test_accuracy: float = float("nan")
    best_test_metrics: dict[str, float] = field(default_factory=dict)  # every test_* of the best epoch
    stage_best_val_accuracy: float = float("nan")
    train_seconds: float = 0.0
    train_samples: int = 0

    def global_step(self, steps_per_epoch: int) -> int:
        return self.epoch * steps_per_epoch + self.step


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def write_metrics(output: Path, metrics: dict[str, Any]) -> None:
    """``metrics.json``: strict JSON (NaN and infinities become null), the run's facts in one file."""
    (output / METRICS_FILE).write_text(json.dumps(_strict(metrics), indent=1))


def _strict(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _strict(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_strict(v) for v in value]
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value
