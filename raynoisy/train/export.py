"""The end of a run on the workers: the method's per-sample table and the run's summary.

The per-sample table is computed over every training sample (each rank its share, eval transform) and
all-gathered to rank 0, which writes it into the final checkpoint beside ``summary.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch.distributed as dist

from raynoisy.methods.base import Method
from raynoisy.train.run_files import SUMMARY_FILE, LoopState
from raynoisy.train.streams import Streams


def per_sample_table(method: Method, streams: Streams, rank: int, world_size: int) -> pa.Table | None:
    """The method's per-sample table over the whole training split, on rank 0 (None elsewhere)."""
    if method.export_name is None:
        return None
    columns: dict[str, list] = {}
    for batch in streams.split_pass("train"):
        for key, value in method.per_sample_outputs(batch).items():
            columns.setdefault(key, []).append(np.asarray(value))
    parts = [{k: np.concatenate(v) for k, v in columns.items()}]
    if world_size > 1:
        gathered: list[Any] = [None] * world_size
        dist.all_gather_object(gathered, parts[0])
        parts = gathered
    filled = [p for p in parts if p]
    if rank != 0 or not filled:
        return None
    merged = {k: np.concatenate([p[k] for p in filled]) for k in filled[0]}
    return pa.table({k: list(v) if v.ndim > 1 else v for k, v in merged.items()}).sort_by("sample_id")


def summary(state: LoopState) -> dict[str, Any]:
    """What the driver needs from the workers for metrics.json."""
    last = state.history[-1] if state.history else {}
    return {
        "epochs": state.epoch,
        "best_epoch": state.best_epoch,
        "best_val_accuracy": state.best_val_accuracy,
        "test_accuracy": state.best_test_accuracy,
        "final_test_accuracy": last.get("test_accuracy", float("nan")),
        "final_val_accuracy": last.get("val_accuracy", float("nan")),
        "train_seconds": state.train_seconds,
        "train_samples_per_second": state.train_samples / max(1e-9, state.train_seconds),
        "history": state.history,
    }


def final_files(method: Method, summary_values: dict[str, Any], table: pa.Table | None):
    """A writer of the final checkpoint's extra files (called on rank 0 with the checkpoint folder)."""

    def write(folder: Path) -> None:
        (folder / SUMMARY_FILE).write_text(json.dumps(summary_values, indent=1, default=float))
        if table is not None:
            pq.write_table(table, folder / f"{method.export_name}.parquet")

    return write
