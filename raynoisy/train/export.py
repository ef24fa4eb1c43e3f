"""The end of a run on the workers: the run's per-sample tables and the run's summary.

The per-sample tables are computed over every training sample (each rank its share, eval transform) and
all-gathered to rank 0, which writes them into the final checkpoint beside ``summary.json``:
``label_issues`` for every method (``raynoisy.methods.label_issues``) and the method's own export
(``Method.export_name``: corrected labels, sample weights) if it has one.

The model-prediction path of the label issues runs the run's best-validation model, which the loop's
selection holds on every rank (identical, as every rank selects on the same all-reduced accuracies). Without
one (no selectable evaluation yet, the harness) ``eval_model()`` as it stands predicts.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
from torch import nn

from raynoisy.methods.base import Method
from raynoisy.methods.label_issues import PRED_PROBS, build_label_issues, prediction_columns
from raynoisy.train.run_files import SUMMARY_FILE, LoopState
from raynoisy.train.streams import Streams

LABEL_ISSUES = "label_issues"
Columns = dict[str, np.ndarray]


def per_sample_table(
    method: Method,
    streams: Streams,
    rank: int,
    world_size: int,
    best_model_state: dict[str, torch.Tensor] | None = None,
) -> dict[str, pa.Table] | None:
    """The run's per-sample tables over the whole training split by file stem, on rank 0 (None elsewhere).

    Label issues come from the method's own columns, or — where ``label_issue_columns`` returns None: a
    method without a view of its own, or a meta method whose collapse guard ended the run falling back —
    from the best-validation model's predictions (confident learning), and the table says which. In the
    second case a method whose ``export_rejected`` rebuilds its export from those predictions
    (``export_from_predictions``: MLC's and MetaLabelNet's corrected labels) instead of running its own
    pass, and label_issues.parquet then carries the same corrections.
    """
    predictor: nn.Module | None = None
    rule = method.label_issue_rule
    rebuild = method.export_rejected
    own: dict[str, list[np.ndarray]] = {}
    issues: dict[str, list[np.ndarray]] = {}
    for batch in streams.method_pass("train"):
        if method.export_name is not None and not rebuild:
            _append(own, method.per_sample_outputs(batch))
        columns = method.label_issue_columns(batch)
        if columns is None:
            predictor = predictor or best_predictor(method, best_model_state)
            rule = None
            columns = prediction_columns(predictor, batch)
        _append(issues, columns)
    merged = _gather([_concat(own), _concat(issues)], rank, world_size)
    if merged is None:
        return None
    own_all, issues_all = merged
    tables = {LABEL_ISSUES: build_label_issues(issues_all, rule, correct=rebuild)}
    if method.export_name is not None and own_all:
        tables[method.export_name] = pa.table(
            {k: list(v) if v.ndim > 1 else v for k, v in own_all.items()}
        ).sort_by("sample_id")
    if rebuild:  # the method's own corrections were judged unusable: the model's instead
        assert method.export_name is not None and PRED_PROBS in issues_all, (
            "a rejected export flags by the model"
        )
        probs = issues_all[PRED_PROBS][np.argsort(issues_all["sample_id"], kind="stable")]
        tables[method.export_name] = method.export_from_predictions(tables[LABEL_ISSUES], probs)
    return tables


def _append(columns: dict[str, list[np.ndarray]], batch_columns: dict[str, Any]) -> None:
    for key, value in batch_columns.items():
        columns.setdefault(key, []).append(np.asarray(value))


def _concat(columns: dict[str, list[np.ndarray]]) -> Columns:
    return {k: np.concatenate(v) for k, v in columns.items()}


def _gather(parts: list[Columns], rank: int, world_size: int) -> list[Columns] | None:
    """Every rank's ``parts`` concatenated in rank order, on rank 0; None on the other ranks."""
    gathered: list[Any] = [parts]
    if world_size > 1:
        gathered = [None] * world_size
        dist.all_gather_object(gathered, parts)
    if rank != 0:
        return None
    merged = []
    for i in range(len(parts)):
        filled = [ranks_parts[i] for ranks_parts in gathered if ranks_parts[i]]
        merged.append({k: np.concatenate([p[k] for p in filled]) for k in filled[0]} if filled else {})
    return merged


def best_predictor(method: Method, best_model_state: dict[str, torch.Tensor] | None) -> nn.Module:
    """A copy of ``eval_model()`` with the best-validation weights; ``eval_model()`` without them."""
    if best_model_state is None:
        return method.eval_model()
    model = copy.deepcopy(method.eval_model())
    model.load_state_dict(best_model_state)
    return model


def summary(state: LoopState) -> dict[str, Any]:
    """What the driver needs from the workers for metrics.json."""
    last = state.history[-1] if state.history else {}
    return {
        "epochs": state.epoch,
        "best_epoch": state.best_epoch,
        "best_val_accuracy": state.best_val_accuracy,
        "test_accuracy": state.best_test_accuracy,
        "test_metrics": state.best_test_metrics,
        "final_test_metrics": {k: v for k, v in last.items() if k.startswith("test_")},
        "final_test_accuracy": last.get("test_accuracy", float("nan")),
        "final_val_accuracy": last.get("val_accuracy", float("nan")),
        "train_seconds": state.train_seconds,
        "train_samples_per_second": state.train_samples / max(1e-9, state.train_seconds),
        "history": state.history,
    }


def final_files(method: Method, summary_values: dict[str, Any], tables: dict[str, pa.Table] | None):
    """A writer of the final checkpoint's extra files (called on rank 0 with the checkpoint folder).

    ``summary.json`` also carries the method's ``final_metrics()`` under ``method_metrics``.
    """

    def write(folder: Path) -> None:
        values = summary_values | {"method_metrics": method.final_metrics()}
        (folder / SUMMARY_FILE).write_text(json.dumps(values, indent=1, default=float))
        for name, table in (tables or {}).items():
            pq.write_table(table, folder / f"{name}.parquet")

    return write
