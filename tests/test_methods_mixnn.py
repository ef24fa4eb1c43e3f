"""MixNN without Ray: GMM clean probabilities, mixing weights, the EMA update, a whole run, state, config.

Driven with ``raynoisy.train.harness`` on synthetic 1x8x8 batches (four well-separated classes, 40% of the
given labels flipped to another class) and a BatchNorm-free MLP backbone registered here. ``global`` mode
gets a plain ``KnnIndex`` in ``ctx.services`` (the method calls services through an adapter that takes a
local object or a Ray actor handle).
"""

from __future__ import annotations

import copy
import io
import itertools
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tiny_models import tiny_mlp
from torch import Tensor

from raynoisy.data.batch import Batch
from raynoisy.errors import ConfigError
from raynoisy.knn import KnnIndex
from raynoisy.methods.base import Method, Stage, call_service
from raynoisy.methods.mixnn import (
    CLEAN,
    FEATURES,
    LOSS,
    NEIGHBOURS,
    SERVICE,
    SOFT,
    MixNNIndex,
    clean_probability,
    ema_update,
    mixing_weights,
)
from raynoisy.train.harness import build_method, method_context, walk_stages
from raynoisy.train.preflight import resolve_config

CLASSES = 4
SIDE = 8
BATCH = 32
NUM_TRAIN = 256
MLP = tiny_mlp(16)  # BatchNorm-free backbone (tests/tiny_models.py)


_PROTOTYPES = 2.0 * torch.randn(CLASSES, 1, SIDE, SIDE, generator=torch.Generator().manual_seed(0))


def toy_data(n: int = NUM_TRAIN, *, noise: float = 0.4, seed: int = 1) -> Batch:
    """Separable classes; exactly ``noise`` of the given labels flipped to a random other class."""
    g = torch.Generator().manual_seed(seed)
    true = torch.randint(0, CLASSES, (n,), generator=g)
    x = _PROTOTYPES[true] + torch.randn(n, 1, SIDE, SIDE, generator=g)
    flipped = torch.randperm(n, generator=g)[: int(noise * n)]
    given = true.clone()
    given[flipped] = (true[flipped] + torch.randint(1, CLASSES, (len(flipped),), generator=g)) % CLASSES
    return Batch(x=x, y=given, sample_id=torch.arange(n), true_y=true)


def rows(batch: Batch, index: Tensor | slice) -> Batch:
    return Batch(batch.x[index], batch.y[index], batch.sample_id[index], batch.true_y[index])


def build(
    tmp_path: Path,
    data: Batch,
    params: dict[str, Any] | None = None,
    *,
    epochs: int = 12,
    index: bool = True,
    model: str = MLP,
) -> Method:
    params = {"warmup_epochs": 2, "mixup_epochs": 4, "ema_every": 1, **(params or {})}
    cfg = resolve_config(
        "digits",
        "mixnn",
        flags={
            "run.output": str(tmp_path),
            "model.name": model,
            "optim.batch_size": BATCH,
            "optim.epochs": epochs,
            "optim.lr": 0.05,
            "split.clean_per_class": 0,  # no trusted set: MixNN needs none
        },
        overrides=[f"method.params.{key}={value}" for key, value in params.items()],
    )
    ctx = method_context(
        cfg,
        num_classes=CLASSES,
        in_channels=1,
        image_size=SIDE,
        steps_per_epoch=NUM_TRAIN // BATCH,
        num_train=NUM_TRAIN,
        num_trusted=0,
        splits={"train": [rows(data, slice(i, i + 64)) for i in range(0, NUM_TRAIN, 64)]},
    )
    method = build_method(ctx)  # looks its services up when it refreshes
    if index and cfg.method.params.get("neighbors", "global") == "global":
        dim = int(method.main.net.feature_dim)
        ctx.services[SERVICE] = KnnIndex(NUM_TRAIN, dim=dim, metric="l2", num_threads=1, verbose=False)
    return method


def walk(method: Method, data: Batch) -> list[dict]:
    order = torch.Generator().manual_seed(5)

    def batches(stage: Stage, epoch: int) -> list[Batch]:
        perm = torch.randperm(NUM_TRAIN, generator=order)
        return [rows(data, perm[i : i + BATCH]) for i in range(0, NUM_TRAIN, BATCH)]

    return walk_stages(method, batches)


# ---- pieces ------------------------------------------------------------------------------------------


def test_gmm_separates_a_planted_clean_and_noisy_loss_mixture() -> None:
    rng = np.random.default_rng(0)
    clean = rng.normal(0.3, 0.1, 700).clip(0)
    noisy = rng.normal(2.5, 0.4, 300)
    losses = np.concatenate([clean, noisy])
    p = clean_probability(losses, seed=0)
    assert p.shape == (1000,) and p.dtype == np.float32
    assert p[:700].mean() > 0.95 and p[700:].mean() < 0.05
    assert np.mean((p > 0.5) == (np.arange(1000) < 700)) > 0.98
    assert np.array_equal(p, clean_probability(losses, seed=0)), "fixed random_state: same p"
    # Min-max normalisation: the probability does not depend on the losses' scale or offset.
    assert np.allclose(p, clean_probability(3.0 * losses + 7.0, seed=0), atol=1e-4)


def test_mixing_weight_is_p_i_over_p_i_plus_p_j() -> None:
    p_i = torch.tensor([0.9, 0.1, 0.5, 0.0])
    p_j = torch.tensor([0.1, 0.9, 0.5, 0.0])
    w = mixing_weights(p_i, p_j)
    assert w.shape == (4, 2)
    assert torch.allclose(w[:, 0], torch.tensor([0.9, 0.1, 0.5, 0.5]), atol=1e-6)
    assert torch.allclose(w.sum(dim=1), torch.ones(4))
    # k neighbours: p_j / Σ p over the sample and its neighbours
    w3 = mixing_weights(torch.tensor([0.2]), torch.tensor([[0.3, 0.5]]))
    assert torch.allclose(w3, torch.tensor([[0.2, 0.3, 0.5]]), atol=1e-6)


def test_ema_update_formula() -> None:
    soft = torch.tensor([[1.0, 0.0, 0.0], [0.2, 0.5, 0.3]])
    probs = torch.tensor([[0.0, 1.0, 0.0], [0.1, 0.1, 0.8]])
    expected = torch.tensor([[0.9, 0.1, 0.0], [0.19, 0.46, 0.35]])
    assert torch.allclose(ema_update(soft, probs, 0.9), expected, atol=1e-6)


def test_service_adapter_takes_a_local_object_or_an_actor_like_handle(monkeypatch) -> None:
    local = MixNNIndex(metric="l2", num_threads=1, verbose=False)
    assert call_service(local, "version") == -1 and not call_service(local, "configured")
    with pytest.raises(RuntimeError, match="not configured"):  # IndexNotReadyError is a RuntimeError
        call_service(local, "build", 0)
    call_service(local, "configure", np.arange(10), 2)
    call_service(local, "add", 0, np.arange(10), np.arange(20, dtype=np.float32).reshape(10, 2))
    call_service(local, "build", 0)
    ids, _ = call_service(local, "search_ids", np.array([3]), 1, exclude_self=True, version=0)
    assert int(ids[0, 0]) in (2, 4)

    import ray

    class Method:
        def __init__(self, fn):
            self.remote = fn

    class Handle:  # what an actor handle looks like to the adapter: methods with .remote, ray.get on refs
        version = Method(lambda: "ref-7")

    monkeypatch.setattr(ray, "get", lambda ref: {"ref-7": 7}[ref])
    assert call_service(Handle(), "version") == 7


# ---- the method ----------------------------------------------------------------------------------------


def test_check_config_rejects_bad_values_before_ray(tmp_path: Path) -> None:
    data = toy_data()
    for params, field in [
        ({"neighbors": "everywhere"}, "neighbors"),
        ({"warmup_epochs": 12}, "warmup_epochs"),
        ({"k": 0}, "k"),
        ({"neighbors": "batch", "k": BATCH}, "k"),
        ({"metric": "dot"}, "metric"),
        ({"ema_momentum": 1.0}, "ema_momentum"),
        ({"refresh_from": "both"}, "refresh_from"),
        ({"index_gpus": -0.1}, "index_gpus"),
    ]:
        with pytest.raises(ConfigError, match=field):
            build(tmp_path, data, params)
    with pytest.raises(ConfigError, match=r"method\.params\.k"):
        build(tmp_path, data, {"k": NUM_TRAIN})  # k against the real split size, in the worker


def test_stages_and_services(tmp_path: Path) -> None:
    method = build(tmp_path, toy_data())
    stages = method.stages(method.ctx.cfg)
    assert [(s.name, s.epochs, s.selectable) for s in stages] == [("warmup", 2, False), ("mix", 10, True)]
    (spec,) = method.services(method.ctx.cfg)
    assert (
        spec.name == SERVICE and spec.actor_class is MixNNIndex and spec.num_cpus == 0.5
    )  # what a 2-CPU laptop can spare beside 2 workers and Ray Data
    assert spec.num_gpus == 0
    on_gpu = build(tmp_path, toy_data(), {"index_gpus": 0.25})
    (spec,) = on_gpu.services(on_gpu.ctx.cfg)
    assert spec.num_gpus == 0.25  # the actor's share of a GPU: Ray makes it visible there
    batch_mode = build(tmp_path, toy_data(), {"neighbors": "batch"})
    assert batch_mode.services(batch_mode.ctx.cfg) == []


def test_soft_labels_follow_the_ema_of_the_unmixed_predictions(tmp_path: Path) -> None:
    data = toy_data()
    method = build(tmp_path, data, {"warmup_epochs": 1, "mixup_epochs": 1})
    method.on_epoch_start(0)
    method.train_step(rows(data, slice(0, BATCH)), None)  # a CE warm-up step
    method.on_epoch_start(1)  # refresh: one-hot soft labels, GMM, neighbours
    store = method.ctx.sample_store
    batch = rows(data, slice(32, 32 + BATCH))
    before = store.gather(SOFT, batch.sample_id)
    assert torch.allclose(before, F.one_hot(batch.y, CLASSES).float())
    net = copy.deepcopy(method.main.net)
    with torch.no_grad():
        probs = F.softmax(net(batch.x)[0], dim=1)
    method.train_step(batch, None)
    expected = 0.9 * before + 0.1 * probs
    assert torch.allclose(store.gather(SOFT, batch.sample_id), expected, atol=2e-3)  # fp16 storage
    untouched = rows(data, slice(100, 110))
    assert torch.equal(store.gather(SOFT, untouched.sample_id), F.one_hot(untouched.y, CLASSES).float())
    # global neighbours are other training samples, and p is a probability
    nbrs = store.gather(NEIGHBOURS, batch.sample_id)
    assert nbrs.shape == (BATCH, 1) and bool((nbrs.squeeze(1) != batch.sample_id).all())
    p = store.gather(CLEAN, store.sample_ids)
    assert bool(((p >= 0) & (p <= 1)).all())


def test_no_ema_outside_the_schedule(tmp_path: Path) -> None:
    data = toy_data()
    method = build(tmp_path, data, {"warmup_epochs": 1, "mixup_epochs": 1, "ema_every": 2})
    method.on_epoch_start(1)  # epoch 1: neighbour phase, 1 % 2 != 0
    batch = rows(data, slice(0, BATCH))
    method.train_step(batch, None)
    assert torch.equal(method.ctx.sample_store.gather(SOFT, batch.sample_id), F.one_hot(batch.y, 4).float())


@pytest.mark.parametrize(("mode", "source"), [("global", "pass"), ("batch", "pass"), ("global", "steps")])
def test_a_run_corrects_labels_with_40_percent_flipped(tmp_path: Path, mode: str, source: str) -> None:
    data = toy_data()
    method = build(tmp_path, data, {"neighbors": mode, "refresh_from": source})
    logs = walk(method, data)
    assert [log["stage"] for log in logs] == ["warmup"] * 2 + ["mix"] * 10
    assert all(np.isfinite(log["loss"]) for log in logs)
    table = {
        key: np.concatenate(
            [method.per_sample_outputs(rows(data, slice(i, i + 64)))[key] for i in range(0, 256, 64)]
        )
        for key in ("corrected_label", "given_label", "clean_probability", "sample_id")
    }
    true = data.true_y.numpy()
    given_acc = float(np.mean(table["given_label"] == true))
    corrected_acc = float(np.mean(table["corrected_label"] == true))
    assert given_acc == pytest.approx(0.6, abs=0.01)
    assert corrected_acc > given_acc + 0.1, (given_acc, corrected_acc)  # seeds 1-3: +0.10 to +0.28
    noisy = table["given_label"] != true
    assert table["clean_probability"][~noisy].mean() > table["clean_probability"][noisy].mean() + 0.3
    columns = method.label_issue_columns(rows(data, slice(0, 64)))
    assert set(columns) >= {"sample_id", "label_score", "is_label_issue", "corrected_label"}


def test_refresh_from_steps_reads_what_the_neighbour_steps_recorded_and_makes_no_pass(tmp_path: Path) -> None:
    data = toy_data()
    method = build(tmp_path, data, {"warmup_epochs": 1, "mixup_epochs": 1, "refresh_from": "steps"}, epochs=4)
    store = method.ctx.sample_store
    method.on_epoch_start(0)
    method.train_step(rows(data, slice(0, BATCH)), None)  # a CE warm-up step
    method.on_epoch_start(1)  # follows a warm-up epoch: a pass
    assert "refresh_from_steps" not in method.on_epoch_end(1)

    # Each neighbour step records its un-mixed forward: the loss against the step's corrected label
    # (given labels here: EMA has not moved them yet) and the features, from the weights before the step.
    order = torch.randperm(NUM_TRAIN, generator=torch.Generator().manual_seed(3))
    for start in range(0, NUM_TRAIN - BATCH, BATCH):  # the last batch dropped, as drop_last does
        batch = rows(data, order[start : start + BATCH])
        corrected = store.gather(SOFT, batch.sample_id).argmax(dim=1)
        with torch.no_grad():
            logits, features = copy.deepcopy(method.main.net)(batch.x)
        method.train_step(batch, None)
        expected = F.cross_entropy(logits, corrected, reduction="none")
        assert torch.allclose(store.gather(LOSS, batch.sample_id).reshape(-1), expected, atol=1e-5)
        assert torch.allclose(store.gather(FEATURES, batch.sample_id).float(), features, atol=1e-2)

    def no_pass(split: str):
        raise AssertionError("refresh_from=steps made a whole-split pass after a neighbour epoch")

    method.ctx.iter_split = no_pass
    method.on_epoch_start(2)
    log = method.on_epoch_end(2)
    assert log["refresh_from_steps"] == 1.0
    assert log["refresh_recorded_fraction"] == pytest.approx((NUM_TRAIN - BATCH) / NUM_TRAIN)
    # The GMM read the recorded losses, and the neighbours are the exact nearest in the recorded features.
    ids = store.sample_ids
    losses = store.gather(LOSS, ids).reshape(-1).numpy()
    expected_p = clean_probability(losses, seed=method.ctx.cfg.run.seed)
    assert np.array_equal(store.gather(CLEAN, ids).reshape(-1).numpy(), expected_p)
    feats = store.gather(FEATURES, ids).float()
    distances = torch.cdist(feats, feats)
    distances.fill_diagonal_(float("inf"))
    nearest = distances.argmin(dim=1)
    found = store.gather(NEIGHBOURS, ids).reshape(-1)
    tied = distances[torch.arange(NUM_TRAIN), found] <= distances[torch.arange(NUM_TRAIN), nearest] + 1e-4
    assert bool(tied.all())


def test_state_round_trip(tmp_path: Path) -> None:
    data = toy_data()
    method = build(tmp_path, data, {"warmup_epochs": 1, "mixup_epochs": 2}, epochs=4)
    walk_stages(method, lambda stage, epoch: [rows(data, slice(i, i + BATCH)) for i in range(0, 96, BATCH)])
    buffer = io.BytesIO()
    torch.save(method.state_dict(), buffer)
    store_dir = tmp_path / "store"
    method.ctx.sample_store.save(store_dir, 0, 1)
    buffer.seek(0)

    other = build(tmp_path, data, {"warmup_epochs": 1, "mixup_epochs": 2}, epochs=4)
    other.load_state_dict(torch.load(buffer, weights_only=False))
    other.ctx.sample_store.load(store_dir)
    assert other.ctx.sample_store.digest() == method.ctx.sample_store.digest()
    for a, b in itertools.zip_longest(
        method.main.net.state_dict().values(), other.main.net.state_dict().values()
    ):
        assert torch.equal(a, b)
    assert other.soft_ready and other.neighbours_ready
    # The same next mixup step (λ, permutation, weights) on both.
    method.epoch = other.epoch = 2 - 1  # a mixup-phase epoch (mix stage, before mixup_epochs)
    batch = rows(data, slice(0, BATCH))
    assert method.train_step(batch, None) == other.train_step(batch, None)


class RestartingIndex(MixNNIndex):
    """The ``knn-index`` service, which loses its index after the next build when told to: what Ray
    restarting the actor between a rank's build and its search leaves (``__init__`` again: unconfigured)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.lose_after_build = False

    def build(self, version: int) -> Any:
        summary = super().build(version)
        if self.lose_after_build:
            self.lose_after_build = False
            self._index = None
        return summary


def test_a_restarted_index_is_configured_again_and_rebuilt_without_losing_the_epoch(tmp_path: Path) -> None:
    data = toy_data()
    params = {"warmup_epochs": 0, "mixup_epochs": 0}
    kwargs = {"metric": "l2", "num_threads": 1, "verbose": False}
    reference = build(tmp_path, data, params, epochs=3, index=False)
    reference.ctx.services[SERVICE] = MixNNIndex(**kwargs)
    method = build(tmp_path, data, params, epochs=3, index=False)
    index = method.ctx.services[SERVICE] = RestartingIndex(**kwargs)

    # Lost between build and search: the search fails, every rank re-adds the epoch and it is rebuilt.
    index.lose_after_build = True
    method.on_epoch_start(0)
    reference.on_epoch_start(0)
    knn = {key: value for key, value in method.on_epoch_end(0).items() if key.startswith("knn_")}
    assert knn == {"knn_index_version": 0.0, "knn_index_attempts": 2.0, "knn_index_configured": 1.0}
    ids = method.ctx.sample_store.sample_ids
    neighbours = method.ctx.sample_store.gather(NEIGHBOURS, ids)
    assert torch.equal(neighbours, reference.ctx.sample_store.gather(NEIGHBOURS, ids))
    batch = rows(data, slice(0, BATCH))
    assert np.isfinite(method.train_step(batch, None)["loss"])

    # Lost during the epoch's steps (the Ray test's ray.kill): the next refresh configures it again.
    index._index = None
    method.on_epoch_start(1)
    log = method.on_epoch_end(1)
    assert (log["knn_index_version"], log["knn_index_attempts"], log["knn_index_configured"]) == (1, 1, 1)
    assert call_service(index, "version") == 1
    method.on_epoch_start(2)  # nothing lost: no configuring
    log = method.on_epoch_end(2)
    assert (log["knn_index_version"], log["knn_index_attempts"], log["knn_index_configured"]) == (2, 1, 0)
    assert log["refresh_seconds"] >= log["refresh_pass_seconds"] + log["refresh_index_seconds"]


def test_a_refresh_before_any_step_sets_batchnorm_statistics_from_the_split(tmp_path: Path) -> None:
    """warmup_epochs 0: the first refresh comes before any step. BatchNorm's running statistics are set from
    the split first (the first layer's running mean is the mean of its inputs over the split, taken here
    with a hook in one training-mode forward of the whole split), so the neighbour features the refresh
    stores are on the scale of the training-mode forward they are mixed into; with the initial statistics
    they would not be. (The small CNN: BatchNorm; the refresh's split is four equal batches.)"""
    data = toy_data()
    method = build(tmp_path, data, {"warmup_epochs": 0, "mixup_epochs": 0}, epochs=3, model="small-cnn")
    reference = copy.deepcopy(method.main.net)
    first = next(m for m in reference.modules() if isinstance(m, torch.nn.BatchNorm2d))
    inputs: list[Tensor] = []
    handle = first.register_forward_hook(lambda _m, args, _out: inputs.append(args[0]))
    with torch.no_grad():
        training_scale = reference(data.x)[1].norm(dim=1).mean()
        handle.remove()
        untrained_scale = reference.eval()(data.x)[1].norm(dim=1).mean()
    split_mean = inputs[0].mean(dim=(0, 2, 3))

    method.on_epoch_start(0)
    bn = next(m for m in method.main.net.modules() if isinstance(m, torch.nn.BatchNorm2d))
    torch.testing.assert_close(bn.running_mean, split_mean, rtol=1e-4, atol=1e-5)
    store = method.ctx.sample_store
    stored_scale = store.gather(FEATURES, store.sample_ids).float().norm(dim=1).mean()
    assert 0.8 < float(stored_scale / training_scale) < 1.25, (stored_scale, training_scale, untrained_scale)
    assert not 0.8 < float(untrained_scale / training_scale) < 1.25  # what the statistics fix
