"""label_issues.parquet for every method, without Ray: one table, one schema, one row per training sample.

Every registered method is built and trained a few steps through ``raynoisy.train.harness`` on tiny 8x8
data, then its per-sample hooks run through the same end-of-run export the Ray Train loop calls
(``raynoisy.train.export.per_sample_table``), over a training split replayed in batches. The detector
scores are checked against a planted truth counted independently of the code under test.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import torch

from raynoisy.config import Config
from raynoisy.data.batch import Batch
from raynoisy.methods import get_method_class, method_names
from raynoisy.methods.base import MethodContext
from raynoisy.methods.label_issues import (
    CONFIDENT_LEARNING,
    PRED_PROBS,
    SCHEMA,
    build_label_issues,
    detector_of,
    summarize_label_issues,
)
from raynoisy.train.export import LABEL_ISSUES, per_sample_table
from raynoisy.train.harness import build_method, method_context, walk_stages
from raynoisy.train.preflight import resolve_config

CLASSES = 3
BATCH = 32
STEPS = 4  # per epoch
TRAIN = BATCH * STEPS


def _batch(n: int, seed: int, flip: float = 0.3, first_id: int = 0) -> Batch:
    """Three classes, each a bright 4x4 quadrant; a fraction ``flip`` of labels moved to the next class."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    x = 0.3 * torch.randn(n, 1, 8, 8, generator=g)
    for c in range(CLASSES):
        x[y == c, :, (c // 2) * 4 : (c // 2) * 4 + 4, (c % 2) * 4 : (c % 2) * 4 + 4] += 2.0
    given = torch.where(torch.rand(n, generator=g) < flip, (y + 1) % CLASSES, y)
    return Batch(x=x, y=given, sample_id=torch.arange(first_id, first_id + n), true_y=y)


def _context(cfg: Config, num_trusted: int, **extra: Any) -> MethodContext:
    """A Ray-free method context on this file's 8x8 one-channel data, TRAIN samples, STEPS steps per epoch."""
    return method_context(
        cfg,
        num_classes=CLASSES,
        in_channels=1,
        image_size=8,
        steps_per_epoch=STEPS,
        num_train=TRAIN,
        num_trusted=num_trusted,
        **extra,
    )


def _split(batch: Batch, size: int) -> list[Batch]:
    return [
        Batch(
            batch.x[i : i + size],
            batch.y[i : i + size],
            batch.sample_id[i : i + size],
            batch.true_y[i : i + size],
        )
        for i in range(0, len(batch), size)
    ]


class ReplayedSplits:
    """The one part of ``Streams`` the export uses: an un-augmented pass over a split, as methods get it."""

    def __init__(self, train: list[Batch]) -> None:
        self.train = train

    def method_pass(self, split: str):
        assert split == "train"
        return (batch.without_truth() for batch in self.train)


@pytest.mark.parametrize("name", method_names())
def test_every_method_writes_one_label_issue_row_per_training_sample(tmp_path, name):
    method_cls = get_method_class(name)
    # Methods with a warm-up stage (MetaLabelNet, MixNN) get one epoch of it and one of the rest.
    params = {f.name for f in dataclasses.fields(method_cls.Params)}
    overrides = ["method.params.warmup_epochs=1"] if "warmup_epochs" in params else []
    # The method's own rule is the subject here; a run the collapse guard ends in fallback takes the
    # model-prediction path instead (tests/test_collapse_guard.py), as these two-epoch toy runs may.
    overrides += ["method.params.guard=false"] if "guard" in params else []
    cfg = resolve_config(
        "digits",
        name,
        flags={"run.output": str(tmp_path), "optim.epochs": 2, "optim.batch_size": BATCH},
        overrides=overrides,
    )
    # Ids with gaps and out of order, as shards hand them out.
    noisy = _batch(TRAIN, seed=1, first_id=1000)
    noisy.sample_id = torch.randperm(TRAIN, generator=torch.Generator().manual_seed(0)) * 7 + 3
    trusted = _batch(60, seed=2, flip=0.0, first_id=10_000)
    ctx = _context(
        cfg,
        num_trusted=len(trusted),
        splits={"trusted": _split(trusted, BATCH), "train": _split(noisy, 50)},
        train_ids=noisy.sample_id.numpy(),
    )
    method = build_method(ctx)
    g = torch.Generator().manual_seed(5)

    def trusted_batch(size: int) -> Batch:
        idx = torch.randint(0, len(trusted), (size,), generator=g)
        return Batch(trusted.x[idx], trusted.y[idx], trusted.sample_id[idx], trusted.true_y[idx])

    walk_stages(method, lambda stage, epoch: _split(noisy, BATCH), trusted_batch)

    tables = per_sample_table(method, ReplayedSplits(_split(noisy, 50)), rank=0, world_size=1)
    table = tables[LABEL_ISSUES]
    assert table.schema.remove_metadata() == SCHEMA
    assert table.num_rows == TRAIN
    assert table.column("sample_id").to_pylist() == sorted(noisy.sample_id.tolist())
    order = np.argsort(noisy.sample_id.numpy())
    np.testing.assert_array_equal(table.column("given_label").to_numpy(), noisy.y.numpy()[order])
    scores = table.column("label_score").to_numpy()
    assert ((scores >= 0) & (scores <= 1)).all()
    predicted = table.column("predicted_label").to_numpy()
    assert ((predicted >= 0) & (predicted < CLASSES)).all()
    corrected = table.column("corrected_label")
    rule = detector_of(table)
    if method_cls.label_issue_rule is None:
        assert rule == CONFIDENT_LEARNING and corrected.null_count == TRAIN
    else:
        assert rule == method_cls.label_issue_rule
    if corrected.null_count == 0:  # a method with corrected labels flags exactly the changed ones
        flagged = table.column("is_label_issue").to_numpy()
        np.testing.assert_array_equal(flagged, corrected.to_numpy() != table.column("given_label").to_numpy())
    if method_cls.export_name is not None:
        assert tables[method_cls.export_name].num_rows == TRAIN
    else:
        assert set(tables) == {LABEL_ISSUES}


def _planted(n: int = 2000, k: int = 5, seed: int = 0):
    """True labels, given labels (25% flipped), an unknown true label on every 10th sample."""
    rng = np.random.default_rng(seed)
    true = rng.integers(0, k, n)
    wrong = rng.random(n) < 0.25
    given = np.where(wrong, (true + rng.integers(1, k, n)) % k, true)
    labels_true = np.where(np.arange(n) % 10 == 0, -1, true)
    labels = pa.table(
        {
            "sample_id": pa.array(np.arange(n) * 2, pa.int64()),
            "true_label": pa.array(labels_true, pa.int64(), mask=labels_true < 0),
        }
    )
    return rng, true, given, labels


def test_precision_recall_f1_against_a_planted_truth():
    rng, true, given, labels = _planted()
    n = len(true)
    ids = np.arange(n) * 2
    # A detector that finds two thirds of the wrong labels and also flags 100 clean ones.
    wrong_idx = np.flatnonzero(given != true)
    clean_idx = np.flatnonzero(given == true)
    flagged = np.zeros(n, dtype=bool)
    flagged[wrong_idx[: 2 * len(wrong_idx) // 3]] = True
    flagged[rng.choice(clean_idx, 100, replace=False)] = True
    table = build_label_issues(
        {
            "sample_id": ids[::-1],  # any order in, sorted out
            "given_label": given[::-1],
            "predicted_label": given[::-1],
            "label_score": np.where(flagged, 0.1, 0.9)[::-1],
            "is_label_issue": flagged[::-1],
        },
        detector="planted",
    )
    # Counted independently, over the samples whose true label is known.
    known = {i for i in range(n) if i % 10 != 0}
    mislabelled = {i for i in known if given[i] != true[i]}
    hit = {i for i in known if flagged[i]}
    tp = len(hit & mislabelled)
    precision, recall = tp / len(hit), tp / len(mislabelled)
    block = summarize_label_issues(table, labels)
    assert block["detector"] == "planted"
    assert block["samples"] == n and block["flagged"] == int(flagged.sum())
    assert block["estimated_noise_rate"] == pytest.approx(flagged.mean())
    assert block["samples_with_true_label"] == len(known)
    assert block["true_noise_rate"] == pytest.approx(len(mislabelled) / len(known))
    assert block["precision"] == pytest.approx(precision)
    assert block["recall"] == pytest.approx(recall)
    assert block["f1"] == pytest.approx(2 * precision * recall / (precision + recall))


def test_without_true_labels_the_scores_are_null():
    _, _, given, _ = _planted()
    n = len(given)
    table = build_label_issues(
        {
            "sample_id": np.arange(n) * 2,
            "given_label": given,
            "predicted_label": given,
            "label_score": np.full(n, 0.3),
            "is_label_issue": np.arange(n) % 4 == 0,
        },
        detector="every fourth",
    )
    unknown = pa.table({"sample_id": pa.array(np.arange(n) * 2), "true_label": pa.nulls(n, pa.int64())})
    block = summarize_label_issues(table, unknown)
    assert block["estimated_noise_rate"] == pytest.approx(0.25)
    assert block["samples_with_true_label"] == 0
    assert block["true_noise_rate"] is None
    assert (block["precision"], block["recall"], block["f1"]) == (None, None, None)


def test_confident_learning_finds_planted_label_errors():
    rng, true, given, labels = _planted(n=3000, k=4, seed=1)
    n, k = len(true), 4
    # A model that knows the true class, with some spread: out-of-sample predictions of a decent classifier.
    logits = rng.normal(0, 1.0, (n, k))
    logits[np.arange(n), true] += 3.0
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    table = build_label_issues({"sample_id": np.arange(n) * 2, "given_label": given, PRED_PROBS: probs})
    assert detector_of(table) == CONFIDENT_LEARNING
    np.testing.assert_allclose(table.column("label_score").to_numpy(), probs[np.arange(n), given], rtol=1e-5)
    np.testing.assert_array_equal(table.column("predicted_label").to_numpy(), probs.argmax(axis=1))
    assert table.column("corrected_label").null_count == n
    block = summarize_label_issues(table, labels)
    assert block["precision"] > 0.85 and block["recall"] > 0.8
    assert block["estimated_noise_rate"] == pytest.approx(block["true_noise_rate"], abs=0.05)


@pytest.mark.parametrize(
    ("columns", "message"),
    [
        ({"sample_id": [1], "given_label": [0], "label_score": [0.5]}, "missing"),
        (
            {"sample_id": [1], "given_label": [0], "predicted_label": [0], "label_score": [1.5],
             "is_label_issue": [False]},
            r"\[0, 1\]",
        ),
        ({"given_label": [0], PRED_PROBS: [[1.0, 0.0]]}, "sample_id"),
    ],
)  # fmt: skip
def test_broken_columns_are_refused(columns, message):
    with pytest.raises(ValueError, match=message):
        build_label_issues({k: np.asarray(v) for k, v in columns.items()}, detector="rule")


def test_mwnet_flags_weights_below_half(tmp_path):
    cfg = resolve_config("digits", "mwnet", flags={"run.output": str(tmp_path), "optim.batch_size": BATCH})
    ctx = _context(cfg, num_trusted=60)
    method = build_method(ctx)
    batch = _batch(64, seed=3)
    columns = method.label_issue_columns(batch)
    weights = method.per_sample_outputs(batch)["weight"]
    np.testing.assert_allclose(columns["label_score"], weights)
    np.testing.assert_array_equal(columns["is_label_issue"], weights < 0.5)


def test_the_prediction_path_uses_the_best_validation_weights(tmp_path):
    cfg = resolve_config("digits", "ce", flags={"run.output": str(tmp_path), "optim.batch_size": BATCH})
    ctx = _context(cfg, num_trusted=0)
    method = build_method(ctx)
    torch.manual_seed(123)
    best = ctx.build_backbone().eval()  # other weights than the method's own model
    final = {k: v.clone() for k, v in method.eval_model().state_dict().items()}
    batch = _batch(TRAIN, seed=4)
    splits = ReplayedSplits(_split(batch, 50))
    table = per_sample_table(method, splits, rank=0, world_size=1, best_model_state=best.state_dict())
    table = table[LABEL_ISSUES]
    with torch.no_grad():
        expected = torch.softmax(best(batch.x)[0], dim=1)[torch.arange(TRAIN), batch.y].numpy()
    np.testing.assert_allclose(table.column("label_score").to_numpy(), expected, rtol=1e-4, atol=1e-6)
    for key, value in method.eval_model().state_dict().items():  # the run's own model is left as it was
        assert torch.equal(value, final[key])
