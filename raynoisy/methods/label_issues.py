"""``label_issues.parquet``: one row per training sample, in cleanlab Datalab's column convention, for every
method; and the ``label_issues`` block of metrics.json that scores it.

Columns (``SCHEMA``): ``sample_id``; ``given_label`` (the label training saw); ``predicted_label`` (the
method's classifier's argmax); ``label_score`` in [0, 1], lower = more likely wrong; ``is_label_issue``
(bool); ``corrected_label`` (the method's own estimate of the true class, null where it has none; for a
meta method whose collapse guard ended the run falling back, confident learning's correction instead: the
predicted label where flagged, the given label elsewhere, as its ``corrected_labels.parquet``). The
schema's metadata names the rule that flagged the samples (``DETECTOR_KEY``).

Where the columns come from: ``Method.label_issue_columns(batch)`` on the workers, over the whole training
split at the end of the run (``raynoisy.train.export``), then ``build_label_issues`` on rank 0 over all of it.
A method gives either

- its own columns (``OWN_COLUMNS``: ``label_score``, ``is_label_issue``, ``predicted_label``, optionally
  ``corrected_label``): MLC / MetaLabelNet from their corrected labels, MW-Net from its weights; or
- nothing (the default, ``None``): the **model-prediction path**. The export then takes the softmax of the
  run's best-validation model over the training split (``prediction_columns``), and ``build_label_issues``
  hands it to cleanlab's confident learning, ``cleanlab.filter.find_label_issues`` (``prune_by_noise_rate``)
  for ``is_label_issue`` and ``cleanlab.rank.get_label_quality_scores`` (self-confidence, the probability of
  the given label) for ``label_score``: CE, CE-clean, GLC, and any method added later that fills nothing.

Which predictions, and why (cleanlab wants out-of-sample predicted probabilities): the best-validation
model's predictions on the training set, i.e. the model from the epoch before memorisation as the clean
validation split measures it. They are in-sample for CE (it trained on those labels), so recall is
understated when the model had begun to fit the wrong labels; they are out-of-sample for CE-clean (trained
on the trusted set only), and GLC's forward-corrected model predicts the clean class, so memorising a wrong
label does not lower its loss. Cross-fitting (K models, each predicting the fold it did not train on) is the
textbook answer and would remove the caveat, but costs K full trainings per run; it is left to sweeps that
can afford it. The best-validation model costs one inference pass over the training split.

Memory: the prediction path gathers an N x K float32 matrix on rank 0 (56 MB for Clothing1M's 1M x 14;
9.6 GB for WebVision's 2.4M x 1000, where a method should fill its own columns instead).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.nn.functional as F
from torch import nn

from raynoisy.data.batch import Batch

SCHEMA = pa.schema(
    [
        ("sample_id", pa.int64()),
        ("given_label", pa.int64()),
        ("predicted_label", pa.int64()),
        ("label_score", pa.float64()),
        ("is_label_issue", pa.bool_()),
        ("corrected_label", pa.int64()),
    ]
)
COLUMNS = tuple(SCHEMA.names)
# What a method's ``label_issue_columns`` must return besides sample_id and given_label (corrected_label is
# optional), and what the prediction path returns instead.
OWN_COLUMNS = ("label_score", "is_label_issue", "predicted_label")
PRED_PROBS = "pred_probs"
DETECTOR_KEY = b"raynoisy.label_issues.detector"
CONFIDENT_LEARNING = (
    "cleanlab.filter.find_label_issues (confident learning, prune_by_noise_rate) on the best-validation "
    "model's softmax over the training split; label_score = its probability of the given label"
)
# A score a little outside [0, 1] is float rounding (a softmax in float32); more is a method's bug.
_SCORE_SLACK = 1e-4


def prediction_columns(model: nn.Module, batch: Batch) -> dict[str, np.ndarray]:
    """The model-prediction path for one batch: ``sample_id``, ``given_label``, ``pred_probs`` (softmax)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            probs = F.softmax(model(batch.x)[0].float(), dim=1)
    finally:
        model.train(was_training)
    return {
        "sample_id": batch.sample_id.cpu().numpy(),
        "given_label": batch.y.cpu().numpy(),
        PRED_PROBS: probs.cpu().numpy(),
    }


def confident_corrections(given: np.ndarray, predicted: np.ndarray, flagged: np.ndarray) -> np.ndarray:
    """The labels confident learning's flags imply: the predicted label where a sample is flagged, the given
    label elsewhere."""
    return np.where(np.asarray(flagged, dtype=bool), predicted, given)


def build_label_issues(
    columns: Mapping[str, np.ndarray], detector: str | None = None, *, correct: bool = False
) -> pa.Table:
    """``label_issues.parquet`` from a method's per-sample columns over the whole training split.

    ``columns`` holds ``sample_id`` and ``given_label`` and either ``pred_probs`` (N x K: confident learning,
    see the module docstring) or ``OWN_COLUMNS`` (+ optional ``corrected_label``). ``detector`` describes the
    method's own rule (ignored on the prediction path, whose rule is ``CONFIDENT_LEARNING``). ``correct``: on
    the prediction path, also fill ``corrected_label`` with ``confident_corrections`` (for a meta method whose
    own corrections were rejected; left null otherwise). Rows are sorted by ``sample_id``. Raises
    ``ValueError`` naming the column when the contract is broken.
    """
    ids = _column(columns, "sample_id", np.int64)
    given = _column(columns, "given_label", np.int64)
    n = len(ids)
    if PRED_PROBS in columns:
        probs = np.asarray(columns[PRED_PROBS], dtype=np.float32).reshape(n, -1)
        predicted, score, issue = _confident_learning(given, probs)
        corrected = confident_corrections(given, predicted, issue) if correct else None
        detector = CONFIDENT_LEARNING
    else:
        missing = [c for c in OWN_COLUMNS if c not in columns]
        if missing:
            raise ValueError(
                f"label-issue columns {missing} are missing: a method returns {list(OWN_COLUMNS)} "
                f"(+ corrected_label) or None for the model-prediction path; got {sorted(columns)}"
            )
        predicted = _column(columns, "predicted_label", np.int64)
        score = _column(columns, "label_score", np.float64)
        issue = _column(columns, "is_label_issue", np.bool_)
        corrected = _column(columns, "corrected_label", np.int64) if "corrected_label" in columns else None
        if not detector:
            raise ValueError("a method that fills its own label-issue columns must describe its rule")
    for name, values in (("given_label", given), ("predicted_label", predicted), ("label_score", score)):
        if len(values) != n:
            raise ValueError(f"label-issue column {name} has {len(values)} rows, sample_id has {n}")
    in_range = np.isfinite(score).all() and score.min() >= -_SCORE_SLACK and score.max() <= 1 + _SCORE_SLACK
    if n and not in_range:
        raise ValueError(f"label_score must lie in [0, 1], got [{score.min()}, {score.max()}]")
    no_correction = pa.nulls(n, pa.int64())
    table = pa.table(
        {
            "sample_id": pa.array(ids, pa.int64()),
            "given_label": pa.array(given, pa.int64()),
            "predicted_label": pa.array(predicted, pa.int64()),
            "label_score": pa.array(np.clip(score, 0.0, 1.0), pa.float64()),
            "is_label_issue": pa.array(issue, pa.bool_()),
            "corrected_label": no_correction if corrected is None else pa.array(corrected, pa.int64()),
        },
        schema=SCHEMA.with_metadata({DETECTOR_KEY: detector.encode()}),
    )
    return table.sort_by("sample_id")


def _column(columns: Mapping[str, np.ndarray], name: str, dtype: type) -> np.ndarray:
    if name not in columns:
        raise ValueError(f"label-issue column {name} is missing; got {sorted(columns)}")
    return np.asarray(columns[name]).reshape(-1).astype(dtype, copy=False)


def _confident_learning(given: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """predicted_label, label_score (self-confidence) and is_label_issue from cleanlab."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    if len(given) == 0:
        return given.copy(), np.zeros(0), np.zeros(0, dtype=bool)
    probs = probs / probs.sum(axis=1, keepdims=True)  # float32 softmax rows sum to 1 only up to rounding
    with warnings.catch_warnings():
        # Per-class "too few examples" warnings: expected on small or unbalanced training splits.
        warnings.simplefilter("ignore", UserWarning)
        # n_jobs=1: this runs inside a Ray worker, where forking a process pool is not welcome.
        issue = find_label_issues(given, probs, filter_by="prune_by_noise_rate", n_jobs=1)
    score = get_label_quality_scores(given, probs, method="self_confidence")
    return probs.argmax(axis=1).astype(np.int64), np.asarray(score, dtype=np.float64), np.asarray(issue)


def detector_of(table: pa.Table) -> str | None:
    """The rule that flagged ``table``'s samples, from its schema metadata."""
    raw = (table.schema.metadata or {}).get(DETECTOR_KEY)
    return raw.decode() if raw is not None else None


# --- scoring against true labels ---------------------------------------------------------------------------


def true_labels_of(sample_ids: np.ndarray, labels: pa.Table) -> np.ndarray:
    """True label of each id from labels.parquet (true_label is nullable); -1 if unknown or absent."""
    true = pc.fill_null(labels.column("true_label"), -1).to_numpy()
    lookup = pd.Series(true, index=labels.column("sample_id").to_numpy())
    return lookup.reindex(sample_ids, fill_value=-1).to_numpy().astype(np.int64)


def ratio(numerator: int, denominator: int) -> float | None:
    """A rate, or None (JSON null) when it is undefined, rather than a NaN that strict JSON rejects."""
    return numerator / denominator if denominator else None


def detector_scores(flagged: np.ndarray, mislabelled: np.ndarray) -> dict[str, float | None]:
    """Precision and recall of ``flagged`` as a detector of ``mislabelled`` (boolean, known samples only)."""
    flagged, mislabelled = np.asarray(flagged, dtype=bool), np.asarray(mislabelled, dtype=bool)
    hits = int(np.count_nonzero(flagged & mislabelled))
    return {
        "precision": ratio(hits, int(np.count_nonzero(flagged))),
        "recall": ratio(hits, int(np.count_nonzero(mislabelled))),
    }


def f1_score(flagged: np.ndarray, mislabelled: np.ndarray) -> float | None:
    """F1 = 2TP / (2TP + FP + FN): 0 when none of the mislabelled samples is found, None only when there is
    nothing to find and nothing was flagged."""
    flagged, mislabelled = np.asarray(flagged, dtype=bool), np.asarray(mislabelled, dtype=bool)
    hits = int(np.count_nonzero(flagged & mislabelled))
    return ratio(2 * hits, int(np.count_nonzero(flagged)) + int(np.count_nonzero(mislabelled)))


def summarize_label_issues(table: pa.Table, labels: pa.Table) -> dict[str, Any]:
    """The ``label_issues`` block of metrics.json from ``label_issues.parquet`` and ``labels.parquet``.

    ``estimated_noise_rate`` is the fraction of training samples flagged. Where true labels are known
    (synthetic noise: all of them; Clothing1M: the human-checked subset), ``true_noise_rate`` and the
    precision / recall / F1 of ``is_label_issue`` against "given != true" over those samples; null when no
    true label is known.
    """
    ids = table.column("sample_id").to_numpy()
    given = table.column("given_label").to_numpy()
    flagged = table.column("is_label_issue").to_numpy(zero_copy_only=False).astype(bool)
    true = true_labels_of(ids, labels)
    known = true >= 0
    mislabelled = given[known] != true[known]
    out: dict[str, Any] = {
        "detector": detector_of(table),
        "samples": len(ids),
        "flagged": int(flagged.sum()),
        "estimated_noise_rate": ratio(int(flagged.sum()), len(ids)),
        "samples_with_true_label": int(known.sum()),
        "true_noise_rate": ratio(int(mislabelled.sum()), int(known.sum())),
        "precision": None,
        "recall": None,
        "f1": None,
    }
    if known.any():
        out.update(detector_scores(flagged[known], mislabelled))
        out["f1"] = f1_score(flagged[known], mislabelled)
    return out
