"""The collapse guard: readings by hand, and planted collapses that each meta method must catch and survive.

A collapse is planted by setting the meta network's output layer (every label to class 0, or every weight
equal), the guard is read as the loop reads it (``on_epoch_end`` over a trusted split), and the next step
is compared with an independent cross-entropy step on the given labels from a copy of the same state.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from sklearn.dummy import DummyClassifier
from sklearn.metrics import accuracy_score
from test_methods_meta import BATCH, CLASSES, MLP, SIDE, rows, toy_batch

from raynoisy.data.batch import Batch
from raynoisy.errors import ConfigError
from raynoisy.methods.base import Method
from raynoisy.methods.collapse_guard import (
    CollapseGuard,
    GuardParams,
    GuardReading,
    label_reading,
    model_reading,
    weight_reading,
    wrong_labels,
)
from raynoisy.methods.label_issues import CONFIDENT_LEARNING, detector_of
from raynoisy.methods.meta_common import (
    FROM_METHOD,
    FROM_MODEL,
    correction_source,
    summarize_corrected_labels,
)
from raynoisy.train.export import LABEL_ISSUES, final_files, per_sample_table
from raynoisy.train.harness import build_method, method_context, start_stage
from raynoisy.train.preflight import resolve_config

CPU = torch.device("cpu")
TRUSTED = toy_batch(128, noise=0.0, seed=7, first_id=10_000)
NOISY = toy_batch(BATCH, noise=0.4, seed=8)
FIT_STEPS = 20


def build(tmp_path: Path, name: str, schedule: str = "multistep", **params: object) -> Method:
    flags = {"model.name": MLP, "optim.batch_size": BATCH, "optim.epochs": 3, "optim.schedule": schedule}
    cfg = resolve_config(
        "digits",
        name,
        flags={"run.output": str(tmp_path), **flags},
        overrides=[f"method.params.{k}={v}" for k, v in params.items()],
    )
    trusted = [rows(TRUSTED, slice(i, i + BATCH)) for i in range(0, len(TRUSTED), BATCH)]
    ctx = method_context(
        cfg,
        num_classes=CLASSES,
        in_channels=1,
        image_size=SIDE,
        steps_per_epoch=4,
        num_train=1024,
        num_trusted=len(TRUSTED),
        splits={"trusted": trusted},
    )
    method = build_method(ctx)
    fit(method.main.net)
    start_stage(method, method.stages(cfg)[-1].name)  # metalabelnet: the meta stage, encoder frozen
    return method


def fit(net: torch.nn.Module) -> None:
    """A main model that has learned something, as after a real epoch; with an optimizer of its own, so
    that the method's optimizer state and lr schedule stay at their start."""
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    for _ in range(FIT_STEPS):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(net(TRUSTED.x)[0], TRUSTED.y).backward()
        optimizer.step()


def last_layer(module: torch.nn.Module) -> torch.nn.Linear:
    return [m for m in module.modules() if isinstance(m, torch.nn.Linear)][-1]


def plant_one_class(method: Method) -> None:
    """Every corrected label -> class 0 (MLC: α -> 0 too, so the skip connection cannot keep the label)."""
    net = method.corrector if method.name == "mlc" else method.soft_label_net
    layer = last_layer(net)
    with torch.no_grad():
        layer.weight.zero_()
        layer.bias.zero_()
        layer.bias[0] = 50.0
        if method.name == "mlc" and method.params.skip:
            layer.bias[CLASSES] = -50.0  # α = sigmoid(-50)


def plant_equal_weights(method: Method) -> None:
    layer = last_layer(method.weight_net)
    with torch.no_grad():
        layer.weight.zero_()
        layer.bias.zero_()  # v(ℓ) = sigmoid(0) = 0.5 for every loss


def same_params(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.allclose(p, q, atol=1e-6) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def step_matches_cross_entropy(method: Method) -> bool:
    """Whether ``train_step`` moves the main model as one CE step on the given labels from the same state.

    MLC's loss also holds the trusted batch's second half (its clean half, CE on the trusted labels), with
    weights B_s and B_c over B_s + B_c: the mean CE over the noisy batch and the clean half together.
    """
    reference = copy.deepcopy(method.main)
    trusted = rows(TRUSTED, slice(0, BATCH))
    method.train_step(NOISY, trusted)
    clean = rows(trusted, slice(BATCH // 2, BATCH)) if method.name == "mlc" else rows(NOISY, slice(0, 0))
    reference.cross_entropy_step(torch.cat([NOISY.x, clean.x]), torch.cat([NOISY.y, clean.y]))
    return same_params(method.main.net, reference.net)


# ---- readings by hand ----------------------------------------------------------------------------------


def test_label_reading_by_hand() -> None:
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    corrected = torch.tensor([0, 0, 0, 1, 0, 2, 3, 0])  # 5 kept; class 0 has 5 of 8 against 2 of 8
    predicted = torch.tensor([1, 1, 1, 1, 1, 2, 3, 3])  # 5 right against 2 for a constant prediction
    soft = torch.nn.functional.one_hot(corrected, CLASSES).float()
    logits = torch.nn.functional.one_hot(predicted, CLASSES).float()
    # two batches, as a rank's trusted pass gives them
    batches = [(soft[:3], logits[:3], labels[:3]), (soft[3:], logits[3:], labels[3:])]
    reading = label_reading(batches, CLASSES, CPU)
    assert reading.samples == 8
    assert reading.kept == pytest.approx(5 / 8)
    assert reading.class_excess == pytest.approx((5 - 2) / 8)
    assert reading.model_skill == pytest.approx((5 / 8 - 2 / 8) / (1 - 2 / 8))
    assert reading.separation is None


def test_weight_reading_by_hand() -> None:
    right, wrong = torch.tensor([0.9, 0.8, 0.7]), torch.tensor([0.1, 0.2, 0.9])
    labels, predicted = torch.tensor([0, 1, 2]), torch.tensor([0, 1, 1])
    logits = torch.nn.functional.one_hot(predicted, CLASSES).float()
    batches = [(right[:1], wrong[:1], logits[:1], labels[:1]), (right[1:], wrong[1:], logits[1:], labels[1:])]
    reading = weight_reading(batches, CLASSES, CPU)
    assert reading.samples == 3
    assert reading.separation == pytest.approx((2.4 - 1.2) / 3)
    assert reading.model_skill == pytest.approx((2 / 3 - 1 / 3) / (1 - 1 / 3))


@pytest.mark.parametrize(("seed", "signal"), [(0, 0.0), (1, 1.0), (2, 3.0)])
def test_model_skill_against_sklearn(seed: int, signal: float) -> None:
    """Skill = (accuracy - the most-frequent-label dummy's accuracy) / (1 - that), both from sklearn, on
    imbalanced labels; from a model at chance (signal 0) to a good one."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.multinomial(torch.tensor([0.4, 0.3, 0.2, 0.1]), 300, replacement=True, generator=generator)
    logits = torch.randn(300, CLASSES, generator=generator) + signal * torch.nn.functional.one_hot(
        labels, CLASSES
    )
    accuracy = accuracy_score(labels.numpy(), logits.argmax(1).numpy())
    dummy = DummyClassifier(strategy="most_frequent").fit(np.zeros((300, 1)), labels.numpy())
    constant = dummy.score(np.zeros((300, 1)), labels.numpy())
    soft = torch.nn.functional.one_hot(labels, CLASSES).float()
    reading = label_reading(
        [(soft[:100], logits[:100], labels[:100]), (soft[100:], logits[100:], labels[100:])], CLASSES, CPU
    )
    assert reading.model_skill == pytest.approx((accuracy - constant) / (1 - constant))
    assert model_reading([(logits, labels)], CLASSES, CPU).model_skill == pytest.approx(reading.model_skill)


def test_no_model_reading_from_one_class_of_trusted_labels() -> None:
    """A constant prediction is always right there: no skill to read, and nothing fires on it."""
    labels = torch.zeros(6, dtype=torch.long)
    logits = torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 3, 0, 1]), CLASSES).float()
    reading = model_reading([(logits, labels)], CLASSES, CPU)
    assert reading.samples == 6 and reading.model_skill is None
    assert not reading.problems(GuardParams())


def test_wrong_labels_are_another_class_fixed_by_the_sample() -> None:
    labels = torch.arange(100) % CLASSES
    ids = torch.arange(1000, 1100)
    wrong = wrong_labels(labels, ids, CLASSES)
    assert bool((wrong != labels).all())
    assert bool(((wrong >= 0) & (wrong < CLASSES)).all())
    assert torch.equal(wrong, wrong_labels(labels, ids, CLASSES))
    assert len(set((wrong - labels).remainder(CLASSES).tolist())) == CLASSES - 1  # every other class is used


def test_empty_reading_keeps_the_last_decision() -> None:
    guard = CollapseGuard("mlc", GuardParams(), rank=0, falling_back=True)
    net = torch.nn.Linear(2, 2)
    assert guard.update(0, label_reading([], CLASSES, CPU), net, torch.optim.SGD(net.parameters())) == {}
    assert guard.falling_back


@pytest.mark.parametrize(
    ("reading", "fires"),
    [
        (GuardReading(samples=10, kept=0.59, class_excess=0.0), True),
        (GuardReading(samples=10, kept=0.61, class_excess=0.29), False),
        (GuardReading(samples=10, kept=0.9, class_excess=0.31), True),
        (GuardReading(samples=10, separation=0.04), True),
        (GuardReading(samples=10, separation=-0.5), True),
        (GuardReading(samples=10, separation=0.06), False),
        (GuardReading(samples=10, kept=0.9, class_excess=0.0, model_skill=0.09), True),
        (GuardReading(samples=10, separation=0.5, model_skill=-0.2), True),
        (GuardReading(samples=10, separation=0.5, model_skill=0.11), False),
    ],
)
def test_limits(reading: GuardReading, fires: bool) -> None:
    assert bool(reading.problems(GuardParams())) == fires


# ---- planted collapses -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "params"), [("mlc", {}), ("mlc", {"skip": "true"}), ("metalabelnet", {})])
def test_label_collapse_is_caught_and_trains_on_the_given_labels(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, name: str, params: dict[str, str]
) -> None:
    if name == "metalabelnet":
        params = params | {"warmup_epochs": "0"}
    method = build(tmp_path, name, **params)
    assert not step_matches_cross_entropy(method)  # steering: the step is not plain CE
    plant_one_class(method)
    with caplog.at_level(logging.WARNING, logger="raynoisy.methods.collapse_guard"):
        scalars = method.on_epoch_end(0)
    share_of_class_0 = float((TRUSTED.y == 0).float().mean())
    assert scalars["guard_kept"] == pytest.approx(share_of_class_0)
    assert scalars["guard_class_excess"] == pytest.approx(1 - share_of_class_0)
    assert scalars["guard_fallback"] == 1.0
    assert f"[guard] {name} epoch 1: collapse" in caplog.text
    assert "Epoch 2 trains the main model on the given labels" in caplog.text
    assert step_matches_cross_entropy(method)
    assert method.final_metrics()["collapse_guard"]["fired_epochs"] == [1]


def test_equal_weights_are_caught_and_train_with_weight_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    method = build(tmp_path, "mwnet")
    assert not step_matches_cross_entropy(method)
    plant_equal_weights(method)
    with caplog.at_level(logging.WARNING, logger="raynoisy.methods.collapse_guard"):
        scalars = method.on_epoch_end(0)
    assert scalars["guard_separation"] == pytest.approx(0.0, abs=1e-6)
    assert scalars["guard_fallback"] == 1.0
    assert "[guard] mwnet epoch 1: collapse" in caplog.text
    assert step_matches_cross_entropy(method)


def test_a_corrector_that_keeps_the_labels_is_healthy_and_ends_the_fallback(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    method = build(tmp_path, "mlc", skip="true")
    plant_one_class(method)
    method.on_epoch_end(0)
    with torch.no_grad():
        last_layer(method.corrector).bias[CLASSES] = 50.0  # α = 1: the corrected label is the given one
    with caplog.at_level(logging.WARNING, logger="raynoisy.methods.collapse_guard"):
        scalars = method.on_epoch_end(1)
    assert scalars["guard_kept"] == pytest.approx(1.0)
    assert scalars["guard_class_excess"] == pytest.approx(0.0)
    assert scalars["guard_fallback"] == 0.0
    assert "[guard] mlc epoch 2: healthy again" in caplog.text
    assert not method.on_given_labels


def plant_one_class_model(method: Method) -> None:
    """The main model predicts class 0 for everything; its features, which MLC's corrector reads, stay."""
    layer = last_layer(method.main.net)
    with torch.no_grad():
        layer.weight.zero_()
        layer.bias.zero_()
        layer.bias[0] = 50.0


ONE_CLASS_CASES = {
    "mlc": ("mlc", {"skip": "true"}),
    "metalabelnet": ("metalabelnet", {"warmup_epochs": "0"}),
    "mwnet": ("mwnet", {}),
    "mwnet-example": ("mwnet", {"weighting": "example"}),  # the model is all there is to read
}


@pytest.mark.parametrize("case", ONE_CLASS_CASES)
def test_a_main_model_at_chance_is_caught_and_undone(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, case: str
) -> None:
    """Without guard_rollback: a model that predicts one class after a steered epoch goes back to the
    epoch's start, and the next epoch trains on the given labels."""
    name, params = ONE_CLASS_CASES[case]
    method = build(tmp_path, name, **params)
    if name == "mlc":  # α = 1: the corrected label is the given one, the corrector reads healthy
        with torch.no_grad():
            last_layer(method.corrector).bias[CLASSES] = 50.0
    before = method.guard_reading()
    assert before.model_skill > 0.5  # the fitted model is well above chance
    method.on_epoch_start(1)  # steered: the guard has not fired
    start = main_state(method)
    plant_one_class_model(method)
    with caplog.at_level(logging.WARNING, logger="raynoisy.methods.collapse_guard"):
        scalars = method.on_epoch_end(1)
    shares = torch.bincount(TRUSTED.y, minlength=CLASSES).double() / len(TRUSTED.y)
    expected = float((shares[0] - shares.max()) / (1 - shares.max()))  # class 0 for everything
    assert scalars["guard_model_skill"] == pytest.approx(expected)
    assert scalars["guard_fallback"] == 1.0 and scalars["guard_rolled_back"] == 1.0
    assert same_state(main_state(method), start)
    assert "the main model's accuracy on the trusted set has a skill of" in caplog.text
    if name == "mlc":  # only the model's reading fired
        assert not before.problems(method.params) and scalars["guard_kept"] == pytest.approx(1.0)
    assert step_matches_cross_entropy(method)


# ---- undoing a collapsed epoch (guard_rollback) ----------------------------------------------------------


def main_state(method: Method) -> dict[str, torch.Tensor]:
    """The main network's tensors and the optimizer's momentum buffers, copied."""
    state = {f"net.{k}": v.clone() for k, v in method.main.net.state_dict().items()}
    for i, buffers in method.main.optimizer.state_dict()["state"].items():
        state |= {f"opt.{i}.{k}": v.clone() for k, v in buffers.items() if isinstance(v, torch.Tensor)}
    return state


def same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def steer(method: Method, steps: int = 2) -> None:
    for _ in range(steps):
        method.train_step(NOISY, rows(TRUSTED, slice(0, BATCH)))


@pytest.mark.parametrize("name", ["mlc", "metalabelnet"])
def test_a_collapsed_epoch_is_undone_and_the_fallback_epoch_is_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, name: str
) -> None:
    params = {"warmup_epochs": "0"} if name == "metalabelnet" else {}
    # In its first epoch, as the loop has it; a cosine schedule, so that the lr moves within an epoch.
    method = build(tmp_path, name, schedule="cosine", guard_rollback="true", **params)
    steer(method)  # epoch 1's steps (its end is not read here: epoch 2 steers)
    method.on_epoch_start(1)  # with momentum buffers from epoch 1, so their restore is checked too
    start, lr_at_start = main_state(method), method.main.lr
    steer(method)
    assert not same_state(main_state(method), start)
    lr_scheduled = method.main.lr
    assert lr_scheduled != lr_at_start
    plant_one_class(method)
    with caplog.at_level(logging.WARNING, logger="raynoisy.methods.collapse_guard"):
        scalars = method.on_epoch_end(1)
    assert scalars["guard_rolled_back"] == 1.0 and scalars["guard_fallback"] == 1.0
    assert same_state(main_state(method), start)  # bit for bit, network, BatchNorm buffers and momentum
    assert method.main.lr == lr_scheduled  # the schedule goes on: the lr is not undone
    assert "Its training of the main model is undone (back to the start of epoch 2)" in caplog.text
    # The next epoch trains on the given labels: collapsed again at its end, it is not undone.
    method.on_epoch_start(2)
    steer(method)
    after_fallback = main_state(method)
    assert method.on_epoch_end(2)["guard_rolled_back"] == 0.0
    assert same_state(main_state(method), after_fallback)
    summary = method.final_metrics()["collapse_guard"]
    assert summary["fired_epochs"] == [2, 3] and summary["rolled_back_epochs"] == [2]


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("mlc", {}),
        ("mwnet", {}),
        ("metalabelnet", {"warmup_epochs": "0"}),
        ("mlc", {"guard_rollback": "false"}),
    ],
)
def test_without_rollback_a_collapsed_epoch_is_kept(tmp_path: Path, name: str, params: dict) -> None:
    """The default, and the setting off."""
    method = build(tmp_path, name, **params)
    method.on_epoch_start(0)
    steer(method)
    trained = main_state(method)
    (plant_equal_weights if name == "mwnet" else plant_one_class)(method)
    scalars = method.on_epoch_end(0)
    assert scalars["guard_fallback"] == 1.0 and scalars["guard_rolled_back"] == 0.0
    assert same_state(main_state(method), trained)


def test_an_old_checkpoint_without_the_rollback_fields_loads(tmp_path: Path) -> None:
    method = build(tmp_path, "mlc")
    state = copy.deepcopy(method.state_dict())
    del state["guard"]["rolled_back_epochs"], state["guard"]["saved"]
    build(tmp_path, "mlc").load_state_dict(state)


def test_a_run_resumed_inside_an_epoch_undoes_to_the_epochs_start(tmp_path: Path) -> None:
    """The copy taken at the epoch's start is checkpointed with the guard: a run resumed mid-epoch undoes
    to the same state as the run that was not interrupted, not to where it resumed."""
    method = build(tmp_path, "mlc", guard_rollback="true")
    method.on_epoch_start(0)
    start = main_state(method)
    steer(method)
    resumed = build(tmp_path, "mlc", guard_rollback="true")
    resumed.load_state_dict(copy.deepcopy(method.state_dict()))
    resumed.on_epoch_start(0)  # as the loop does on resume
    steer(resumed)
    plant_one_class(resumed)
    assert resumed.on_epoch_end(0)["guard_rolled_back"] == 1.0
    assert same_state(main_state(resumed), start)


def test_the_decision_survives_a_resume(tmp_path: Path) -> None:
    method = build(tmp_path, "mwnet")
    plant_equal_weights(method)
    method.on_epoch_end(0)
    resumed = build(tmp_path, "mwnet")
    resumed.load_state_dict(copy.deepcopy(method.state_dict()))
    assert resumed.on_given_labels
    assert resumed.final_metrics()["collapse_guard"]["fired_epochs"] == [1]


def test_guard_off_reads_nothing(tmp_path: Path) -> None:
    method = build(tmp_path, "mwnet", guard="false")
    plant_equal_weights(method)
    assert method.on_epoch_end(0) == {}
    assert not method.on_given_labels


def test_bad_limits_fail_before_training(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="guard_min_kept"):
        build(tmp_path, "mlc", guard_min_kept=1.5)


def test_no_trusted_split_reads_nothing(tmp_path: Path) -> None:
    method = build(tmp_path, "mlc")
    method.ctx.iter_split = lambda split: iter(())
    plant_one_class(method)
    assert method.on_epoch_end(0) == {}


@pytest.mark.parametrize("name", ["mlc", "mwnet"])
def test_warmup_epochs_train_on_the_given_labels_then_steer(tmp_path: Path, name: str) -> None:
    method = build(tmp_path, name, warmup_epochs=2, guard="false")
    for epoch in (0, 1):
        method.on_epoch_start(epoch)
        assert step_matches_cross_entropy(method)
    method.on_epoch_start(2)
    assert not step_matches_cross_entropy(method)


def test_the_guard_decides_from_the_last_warmup_epoch_on(tmp_path: Path) -> None:
    method = build(tmp_path, "mlc", warmup_epochs=2)
    plant_one_class(method)
    assert method.on_epoch_end(0) == {}  # epoch 2 warms up anyway: nothing to decide
    assert method.on_epoch_end(1)["guard_fallback"] == 1.0  # decides epoch 3's steps


def _shuffled(batch: Batch, seed: int) -> Batch:
    """``batch`` in a random row order with distinct, unordered sample ids, as a multi-rank pass gathers."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(batch), generator=g)
    ids = 1000 + torch.randperm(len(batch), generator=g)
    return Batch(batch.x[order], batch.y[order], ids, batch.true_y[order])


PASS = _shuffled(NOISY, seed=3)


class _TrainPass:
    """The one part of ``Streams`` the export reads: an un-augmented pass over the training split, in two
    batches whose sample ids are out of order (the export sorts by sample_id)."""

    def method_pass(self, split: str):
        assert split == "train"
        half = len(PASS) // 2
        return iter(
            [rows(PASS, slice(0, half)).without_truth(), rows(PASS, slice(half, None)).without_truth()]
        )


@pytest.mark.parametrize(("name", "plant"), [("mlc", plant_one_class), ("mwnet", plant_equal_weights)])
def test_a_run_that_ends_falling_back_flags_label_issues_from_the_model(
    tmp_path: Path, name: str, plant: object
) -> None:
    method = build(tmp_path, name)
    steering = per_sample_table(method, _TrainPass(), rank=0, world_size=1)
    assert detector_of(steering[LABEL_ISSUES]) == method.label_issue_rule  # the method's own view
    if name == "mlc":
        assert correction_source(steering["corrected_labels"]) == FROM_METHOD
    plant(method)  # type: ignore[operator]
    method.on_epoch_end(0)
    tables = per_sample_table(method, _TrainPass(), rank=0, world_size=1)
    table = tables[LABEL_ISSUES]
    assert detector_of(table) == CONFIDENT_LEARNING  # not the collapsed meta network's
    assert table.num_rows == len(NOISY)
    if name == "mwnet":  # its export is weights, not labels: the weights stay, no corrections
        assert table.column("corrected_label").null_count == table.num_rows
        assert tables["sample_weights"].num_rows == len(NOISY)
        return
    # The corrections are confident learning's too, in both files: the model's prediction where flagged.
    net = method.eval_model().eval()
    with torch.no_grad():
        probs = torch.softmax(net(PASS.x)[0], dim=1).numpy()
    order = np.argsort(PASS.sample_id.numpy())
    given, probs, true = PASS.y.numpy()[order], probs[order], PASS.true_y.numpy()[order]
    flagged = table.column("is_label_issue").to_numpy(zero_copy_only=False)
    assert 0 < flagged.sum() < len(flagged)
    expected = np.where(flagged, probs.argmax(axis=1), given)
    np.testing.assert_array_equal(table.column("corrected_label").to_numpy(), expected)
    rows_ = np.arange(len(given))
    # Through the files a run writes, and read back as the driver reads them.
    final_files(method, {}, tables)(tmp_path)
    labels = pq.read_table(tmp_path / "corrected_labels.parquet")
    assert correction_source(labels) == FROM_MODEL
    np.testing.assert_array_equal(labels.column("sample_id").to_numpy(), PASS.sample_id.numpy()[order])
    np.testing.assert_array_equal(labels.column("corrected_label").to_numpy(), expected)
    for column, values in (
        ("given_label_probability", probs[rows_, given]),
        ("corrected_confidence", probs[rows_, expected]),
    ):
        np.testing.assert_allclose(labels.column(column).to_numpy(), values, rtol=1e-6)
    np.testing.assert_allclose(np.stack(labels.column("soft_label").to_pylist()), probs, rtol=1e-6)
    truth = pa.table({"sample_id": PASS.sample_id.numpy(), "true_label": PASS.true_y.numpy()})
    summary = summarize_corrected_labels(labels, truth)["label_correction"]
    assert summary["source"] == FROM_MODEL
    assert summary["corrected_label_accuracy"] == pytest.approx(np.mean(expected == true))
