"""The trusted-set meta methods (mwnet, mlc, metalabelnet) without Ray: learning, resume, 2 ranks, export.

Methods are built and driven through their stages with ``raynoisy.train.harness`` (the Ray Train loop's
hooks in its order) and fed synthetic 1x8x8 batches: four classes,
each a fixed random prototype plus Gaussian noise, so a linear model separates them; the given labels are
corrupted, the trusted ones are not. Most tests use a BatchNorm-free MLP registered here (fast, and its
result does not depend on how a batch is split across ranks); the 2-rank bit-identity check also runs the
real ``small-cnn`` (with BatchNorm).
"""

from __future__ import annotations

import copy
import io
import itertools
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from gloo_ranks import gloo_rank
from tiny_models import tiny_mlp
from torch import Tensor, nn

from raynoisy.config import Config, load_config
from raynoisy.data.batch import Batch
from raynoisy.errors import ConfigError
from raynoisy.meta import (
    all_reduce_mean_,
    assert_replicas_identical,
    functional_forward,
    lookahead_hypergrad,
    output_hypergrad,
)
from raynoisy.meta.sync import state_tensors
from raynoisy.methods import get_method_class
from raynoisy.methods.base import Method, MethodContext, Stage
from raynoisy.methods.meta_common import FROM_METHOD, corrected_label_columns, lookahead_optimizer
from raynoisy.models.meta_nets import LabelCorrectionNet
from raynoisy.train.harness import build_method, method_context, start_stage, walk_stages
from raynoisy.train.precision import autocast
from raynoisy.train.preflight import resolve_config

CLASSES = 4
SIDE = 8
BATCH = 32
METHODS = ("mwnet", "mlc", "metalabelnet")
MLP = tiny_mlp(32)  # BatchNorm-free backbone (tests/tiny_models.py)


_PROTOTYPES = torch.randn(CLASSES, 1, SIDE, SIDE, generator=torch.Generator().manual_seed(0))


def toy_batch(n: int, *, noise: float, seed: int, first_id: int = 0, uniform: bool = False) -> Batch:
    """n samples; a ``noise`` share of given labels is wrong: c -> c+1, or ``uniform`` over the others."""
    g = torch.Generator().manual_seed(seed)
    true = torch.randint(0, CLASSES, (n,), generator=g)
    x = _PROTOTYPES[true] + torch.randn(n, 1, SIDE, SIDE, generator=g)
    shift = torch.randint(1, CLASSES, (n,), generator=g) if uniform else torch.ones(n, dtype=torch.long)
    flipped = torch.rand(n, generator=g) < noise
    given = torch.where(flipped, (true + shift) % CLASSES, true)
    return Batch(x=x, y=given, sample_id=torch.arange(first_id, first_id + n), true_y=true)


def rows(batch: Batch, index: Tensor | slice) -> Batch:
    return Batch(batch.x[index], batch.y[index], batch.sample_id[index], batch.true_y[index])


def build(
    tmp_path: Path,
    name: str,
    *,
    params: dict[str, Any] | None = None,
    model: str = MLP,
    seed: int = 0,
    rank: int = 0,
    world: int = 1,
    epochs: int | None = None,
    precision: str = "fp32",
) -> Method:
    """A method as every worker builds it: the digits preset checked whole (``resolve_config``) with
    ``params`` as ``--set method.params.KEY=VALUE``, seeded with ``seed``, at this rank's place."""
    flags: dict[str, Any] = {
        "run.output": str(tmp_path),
        "run.seed": seed,
        "model.name": model,
        "optim.batch_size": BATCH,  # global; each of ``world`` ranks gets BATCH // world
        "optim.epochs": epochs,  # None: the preset's 30
        "scaling.precision": precision,
    }
    sets = [f"method.params.{key}={value}" for key, value in (params or {}).items()]
    cfg = resolve_config("digits", name, flags=flags, overrides=sets)
    return build_method(context(cfg, rank=rank, world=world))


def context(cfg: Config, *, rank: int = 0, world: int = 1, **fields: Any) -> MethodContext:
    """The context of every method here: the toy data's shape, 20 steps per epoch, no split passes unless
    ``fields`` (``method_context``'s keywords) say otherwise."""
    defaults: dict[str, Any] = {"steps_per_epoch": 20, "num_train": 1024, "num_trusted": 128}
    return method_context(
        cfg,
        num_classes=CLASSES,
        in_channels=1,
        image_size=SIDE,
        rank=rank,
        world_size=world,
        **(defaults | fields),
    )


def start(method: Method) -> Method:
    """Bring the method to its first step (metalabelnet tests skip the warm-up, warmup_epochs=0, unless
    they test it: then the first stage is the meta stage)."""
    start_stage(method, method.stages(method.ctx.cfg)[0].name)
    return method


def train(method: Method, noisy: Batch, trusted: Batch, steps: int, first: int = 0) -> dict[str, float]:
    stats: dict[str, float] = {}
    for step in range(first, first + steps):
        stats = method.train_step(
            rows(noisy, torch.arange(step * BATCH, (step + 1) * BATCH) % len(noisy)),
            rows(trusted, torch.arange(step * BATCH, (step + 1) * BATCH) % len(trusted)),
        )
    return stats


def walk(
    method: Method,
    noisy: Batch,
    trusted: Batch | None,
    steps: dict[str, int],
    *,
    rank: int = 0,
    world: int = 1,
) -> list[dict[str, float | str]]:
    """``walk_stages`` with ``steps[stage]`` steps per epoch: noisy step k on this rank's rows of the k-th
    global batch of ``noisy``, trusted batch k (counted on its own) on its rows of the k-th of ``trusted``."""
    noisy_step, trusted_step = itertools.count(), itertools.count()

    def batches(stage: Stage, epoch: int) -> list[Batch]:
        picks = [_rank_rows(next(noisy_step), rank, world)[0] for _ in range(steps[stage.name])]
        return [rows(noisy, pick % len(noisy)) for pick in picks]

    def trusted_batch(size: int) -> Batch:
        assert trusted is not None and size == BATCH // world, size
        return rows(trusted, _rank_rows(next(trusted_step), rank, world)[1] % len(trusted))

    return walk_stages(method, batches, trusted_batch)


def clean_loss(method: Method, batch: Batch) -> float:
    net = method.eval_model()
    with torch.no_grad():
        return float(F.cross_entropy(net(batch.x)[0], batch.true_y))


def meta_net(method: Method) -> nn.Module:
    return {"mwnet": "weight_net", "mlc": "corrector", "metalabelnet": "soft_label_net"}[method.name]


def params_of(module: nn.Module) -> list[Tensor]:
    return [p.detach().clone() for p in module.parameters()]


# ---- learning ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", METHODS)
def test_learns_from_heavily_noisy_labels(tmp_path: Path, name: str) -> None:
    """45% pair-flipped labels: the trusted-data loss falls, and each step moves the main and the meta net."""
    method = start(build(tmp_path, name, params={"warmup_epochs": 0} if name == "metalabelnet" else None))
    noisy, trusted = toy_batch(1024, noise=0.45, seed=1), toy_batch(128, noise=0.0, seed=2, first_id=5000)
    held_out = toy_batch(256, noise=0.0, seed=3)
    before = clean_loss(method, held_out)
    main_before = params_of(method.eval_model())
    meta_before = params_of(getattr(method, meta_net(method)))
    train(method, noisy, trusted, 1)
    for module, old in ((method.eval_model(), main_before), (getattr(method, meta_net(method)), meta_before)):
        assert any(not torch.equal(p, q) for p, q in zip(module.parameters(), old, strict=True))
    stats = train(method, noisy, trusted, 39, first=1)
    assert all(np.isfinite(v) for v in stats.values())
    assert clean_loss(method, held_out) < 0.5 * before


def test_mwnet_down_weights_mislabelled_samples(tmp_path: Path) -> None:
    """Uniform 50% noise makes wrong labels the high-loss ones; the learnt weight net must weigh them less."""
    method = start(build(tmp_path, "mwnet"))
    noisy = toy_batch(1024, noise=0.5, seed=1, uniform=True)
    train(method, noisy, toy_batch(128, noise=0.0, seed=2, first_id=5000), 100)
    weights = method.per_sample_outputs(noisy)["weight"]
    wrong = (noisy.y != noisy.true_y).numpy()
    assert weights[wrong].mean() < weights[~wrong].mean() - 0.2


def test_mwnet_example_weights_are_the_positive_gradient_alignment(tmp_path: Path) -> None:
    """weighting example: each sample's weight is the positive part of its loss gradient dotted with the
    trusted batch's, normalised to mean 1 (computed here on a copy, per sample, with plain autograd), and the
    real step is the optimizer's step on the mean weighted loss."""
    method = start(build(tmp_path, "mwnet", params={"weighting": "example"}))
    noisy, trusted = toy_batch(BATCH, noise=0.45, seed=1), toy_batch(BATCH, noise=0.0, seed=2, first_id=5000)
    train(method, toy_batch(256, noise=0.45, seed=4), toy_batch(64, noise=0.0, seed=5), 3)  # leave the start
    expected = copy.deepcopy(method)
    net = expected.main.net
    weights = [p for p in net.parameters() if p.requires_grad]
    gold = torch.autograd.grad(F.cross_entropy(net(trusted.x)[0], trusted.y), weights)
    losses = F.cross_entropy(net(noisy.x)[0], noisy.y, reduction="none")
    alignment = torch.stack(
        [
            sum(
                (g * h).sum()
                for g, h in zip(torch.autograd.grad(loss, weights, retain_graph=True), gold, strict=True)
            )
            for loss in losses
        ]
    )
    positive = alignment.clamp(min=0).detach()
    want = positive * len(positive) / positive.sum()
    assert 0 < int((want == 0).sum()) < BATCH  # some samples, not all, get no weight
    expected.main.step((want * losses).mean())

    stats = method.train_step(noisy, trusted)
    assert stats["mean_weight"] == pytest.approx(1.0)
    assert stats["zero_weight_share"] == pytest.approx(float((want == 0).float().mean()))
    for got, exp in zip(method.main.net.parameters(), net.parameters(), strict=True):
        torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("weighting", ["net", "example"])
def test_mwnet_train_on_trusted_steps_on_the_union_of_both_batches(tmp_path: Path, weighting: str) -> None:
    """train_on_trusted: the real step is the optimizer's step on the mean over the union of the noisy and
    the trusted batch, (B·mean(w·ℓ) + B_t·CE_trusted) / (B + B_t), with the weights the step would use
    without it (computed here with plain autograd on a copy; the weight net's update is unchanged)."""
    params = {"weighting": weighting, "train_on_trusted": True}
    method = start(build(tmp_path, "mwnet", params=params))
    noisy, trusted = (
        toy_batch(BATCH, noise=0.45, seed=1),
        toy_batch(BATCH // 2, noise=0.0, seed=2, first_id=9000),
    )
    train(method, toy_batch(256, noise=0.45, seed=4), toy_batch(64, noise=0.0, seed=5), 3)  # leave the start
    expected = copy.deepcopy(method)
    without = copy.deepcopy(method)
    without.params.train_on_trusted = False
    without.train_step(noisy, trusted)  # the same weight-net update, the paper's real step

    stats = method.train_step(noisy, trusted)
    net = expected.main.net
    losses = F.cross_entropy(net(noisy.x)[0], noisy.y, reduction="none")
    if weighting == "net":
        for got, want in zip(method.weight_net.parameters(), without.weight_net.parameters(), strict=True):
            torch.testing.assert_close(got, want)
        with torch.no_grad():
            weights = method.weight_net(losses.detach())
    else:
        grads = [p for p in net.parameters() if p.requires_grad]
        gold = torch.autograd.grad(F.cross_entropy(net(trusted.x)[0], trusted.y), grads)
        alignment = torch.stack(
            [
                sum(
                    (g * h).sum()
                    for g, h in zip(torch.autograd.grad(ell, grads, retain_graph=True), gold, strict=True)
                )
                for ell in losses
            ]
        ).clamp(min=0)
        weights = alignment * len(alignment) / alignment.sum()
    trusted_loss = F.cross_entropy(net(trusted.x)[0], trusted.y)
    union = (len(noisy) * (weights * losses).mean() + len(trusted) * trusted_loss) / (
        len(noisy) + len(trusted)
    )
    assert stats["loss"] == pytest.approx(float(union.detach()), rel=1e-5)
    expected.main.step(union)
    for got, exp in zip(method.main.net.parameters(), net.parameters(), strict=True):
        torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-6)
    # the trusted batch moved the step: it is not the paper's
    paper = zip(method.main.net.parameters(), without.main.net.parameters(), strict=True)
    assert any(not torch.allclose(p, q) for p, q in paper)


def test_mwnet_example_weights_learn_and_separate_pair_flipped_labels(tmp_path: Path) -> None:
    """45% of labels moved to the next class: the trusted loss falls, the weight net is left alone, and the
    exported weights (against the whole trusted set's gradient after the epoch) are lower on the wrong
    labels; the guard reads the main model alone."""
    noisy, trusted = toy_batch(1024, noise=0.45, seed=1), toy_batch(128, noise=0.0, seed=2, first_id=5000)
    method = build(tmp_path, "mwnet", params={"weighting": "example"})
    method.ctx.iter_split = lambda split: iter([trusted]) if split == "trusted" else iter([noisy])
    start(method)
    held_out = toy_batch(256, noise=0.0, seed=3)
    before, weight_net = clean_loss(method, held_out), params_of(method.weight_net)
    train(method, noisy, trusted, 40)
    assert clean_loss(method, held_out) < 0.5 * before
    assert all(torch.equal(p, q) for p, q in zip(method.weight_net.parameters(), weight_net, strict=True))
    reading = method.on_epoch_end(0)  # the main model alone: no weight net to read
    assert set(reading) == {"guard_model_skill", "guard_fallback", "guard_rolled_back"}
    assert reading["guard_model_skill"] > 0.5 and reading["guard_fallback"] == 0.0
    weights = method.per_sample_outputs(noisy)["weight"]
    wrong = (noisy.y != noisy.true_y).numpy()
    assert weights[wrong].mean() < weights[~wrong].mean() - 0.2
    assert ((weights >= 0) & (weights <= 1)).all()
    issues = method.label_issue_columns(noisy)
    assert issues is not None
    np.testing.assert_array_equal(issues["is_label_issue"], weights < 0.5)
    assert method.eval_model().training  # the export put the model back in train mode


@pytest.mark.parametrize("supervision", [0.0, 1.0])
def test_mlc_corrected_labels_beat_the_given_ones(tmp_path: Path, supervision: float) -> None:
    method = start(build(tmp_path, "mlc", params={"corrector_supervision": supervision}))
    noisy = toy_batch(1024, noise=0.45, seed=1)
    train(method, noisy, toy_batch(128, noise=0.0, seed=2, first_id=5000), 60)
    table = pa.table({k: list(v) if v.ndim > 1 else v for k, v in method.per_sample_outputs(noisy).items()})
    labels = pa.table({"sample_id": noisy.sample_id.numpy(), "true_label": noisy.true_y.numpy()})
    summary = method.summarize_export(table, labels)["label_correction"]
    assert summary["given_label_accuracy"] == pytest.approx(float((noisy.y == noisy.true_y).float().mean()))
    assert summary["corrected_label_accuracy"] > summary["given_label_accuracy"] + 0.2
    assert summary["recall"] > 0.5 and summary["precision"] > 0.5


def test_mlc_corrector_supervision_draws_each_label_with_its_share_of_the_row(tmp_path: Path) -> None:
    """The simulated noisy labels: label k drawn with its share of the row, and 2 ranks' rows
    (each drawing for the global half and keeping its own) are the 1-process draws of the concatenation."""
    params = {"corrector_supervision": 1.0}
    probs = torch.tensor([[1.0, 6.0, 0.0, 3.0]]).repeat(20_000, 1)  # counts: any scale
    counts = torch.bincount(start(build(tmp_path, "mlc", params=params))._draw(probs), minlength=CLASSES)
    torch.testing.assert_close(counts / len(probs), probs[0] / 10, atol=0.015, rtol=0)
    rows_ = torch.softmax(torch.randn(10, CLASSES, generator=torch.Generator().manual_seed(3)), dim=1)
    single = build(tmp_path, "mlc", params=params)._draw(rows_)
    ranks = [
        build(tmp_path, "mlc", params=params, rank=r, world=2)._draw(rows_[r * 5 : (r + 1) * 5])
        for r in (0, 1)
    ]
    torch.testing.assert_close(torch.cat(ranks), single)


def test_mlc_corrector_supervision_is_the_gradient_of_the_simulated_noise_loss(tmp_path: Path) -> None:
    """The transitions are the decayed counts of (prediction, given label) over the global noisy batches
    (counted here with numpy), and the supervision gradient is ∇(-log g(h, ỹ)[y]) on the clean half with ỹ
    the inverse-CDF draw of T[y] (recomputed with numpy; a class never predicted keeps its label)."""
    method = start(build(tmp_path, "mlc", params={"corrector_supervision": 1.0}))
    decay = 1 - 1 / method.ctx.steps_per_epoch  # meta_every 1: a meta step per step
    pairs = [
        (torch.randint(0, 3, (50,)), torch.randint(0, CLASSES, (50,))) for _ in range(3)
    ]  # never class 3
    want_counts = np.zeros((CLASSES, CLASSES))
    for predicted, given in pairs:
        method._count_transitions(predicted, given)
        want_counts *= decay
        np.add.at(want_counts, (predicted.numpy(), given.numpy()), 1)
    np.testing.assert_allclose(method.transitions.numpy(), want_counts, rtol=1e-6)

    clean = toy_batch(16, noise=0.0, seed=7)
    state = method.generator.get_state()
    got = method._supervision_grads(clean.x, clean.y, list(method.corrector.parameters()))
    uniforms = torch.rand(16, generator=torch.Generator().set_state(state)).numpy()
    drawn = []
    for label, u in zip(clean.y.tolist(), uniforms, strict=True):
        cdf = np.cumsum(want_counts[label])
        drawn.append(label if cdf[-1] == 0 else int(np.searchsorted(cdf, u * cdf[-1], side="left")))
    assert 3 in clean.y.tolist() and all(
        d == 3 for d, y in zip(drawn, clean.y.tolist(), strict=True) if y == 3
    )
    with torch.no_grad():
        features = method.main.net(clean.x)[1]
    loss = F.nll_loss(torch.log(method.corrector(features, torch.tensor(drawn))), clean.y)
    want = torch.autograd.grad(loss, list(method.corrector.parameters()))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)


def test_label_correction_skip_mixes_in_the_given_label() -> None:
    torch.manual_seed(0)
    net = LabelCorrectionNet(CLASSES, 5, cls_dim=3, hidden=7, skip=True)
    features, labels = torch.randn(6, 5), torch.tensor([0, 1, 2, 3, 0, 1])
    torch.testing.assert_close(net(features, labels).sum(dim=1), torch.ones(6))
    with torch.no_grad():
        net.net[-1].bias[CLASSES] = 30.0  # alpha -> 1: keep the given label
    torch.testing.assert_close(net(features, labels), F.one_hot(labels, CLASSES).float(), atol=1e-6, rtol=0)


# ---- the engine adapter -------------------------------------------------------------------------------


@pytest.mark.parametrize(("rule", "lr"), [("sgd-plain", None), ("sgd-plain", 1.0), ("optimizer", None)])
def test_lookahead_optimizer_steps_by_the_chosen_rule(tmp_path: Path, rule: str, lr: float | None) -> None:
    """The methods' look-ahead (output_hypergrad on lookahead_optimizer) = lookahead_hypergrad(rule, lr)."""
    method = build(tmp_path, "mwnet")
    net, weigh = method.main.net.double(), method.weight_net.double()
    noisy, gold = toy_batch(16, noise=0.4, seed=1), toy_batch(16, noise=0.0, seed=2)
    method.main.step(F.cross_entropy(net(noisy.x.double())[0], noisy.y))  # momentum buffers for "optimizer"

    def weighted(logits: Tensor, _features: Tensor) -> Tensor:
        losses = F.cross_entropy(logits, noisy.y, reduction="none")
        return (weigh(losses.detach()) * losses).mean()

    def inner(params: dict[str, Tensor], step: int = 0) -> Tensor:
        return weighted(functional_forward(net, params, noisy.x.double())[0], noisy.x)

    def outer(params: dict[str, Tensor]) -> Tensor:
        return F.cross_entropy(functional_forward(net, params, gold.x.double())[0], gold.y)

    meta = list(weigh.parameters())
    optimizer = lookahead_optimizer(method.main, rule, lr)
    fast = output_hypergrad(net, optimizer, noisy.x.double(), weighted, outer, meta).meta_grads
    slow = lookahead_hypergrad(net, method.main.optimizer, inner, outer, meta, rule=rule, lr=lr).meta_grads
    for a, b in zip(fast, slow, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    assert any(float(g.abs().max()) > 0 for g in fast)


def _first_meta_gradient(tmp_path: Path, name: str, precision: str) -> Tensor:
    """The meta-gradient of ``name``'s first meta step on the small-cnn under ``precision``, flattened."""
    noisy, trusted = toy_batch(BATCH, noise=0.4, seed=1), toy_batch(BATCH, noise=0.0, seed=2, first_id=5000)
    params = {"warmup_epochs": 0} if name == "metalabelnet" else None
    method = start(build(tmp_path, name, model="small-cnn", params=params, precision=precision))
    captured: list[Tensor] = []
    step = method.meta_step

    def capture(optimizer: torch.optim.Optimizer, meta: list[Tensor], grads: list[Tensor]) -> None:
        captured.append(torch.cat([g.detach().flatten() for g in grads]))
        step(optimizer, meta, grads)

    method.meta_step = capture  # type: ignore[method-assign]
    with autocast(precision, torch.device("cpu")):
        method.train_step(noisy, trusted)
    [grad] = captured
    return grad


@pytest.mark.parametrize("name", METHODS)
def test_bf16_mixed_meta_gradients_are_the_float32_ones_to_bfloat16_rounding(
    tmp_path: Path, name: str
) -> None:
    """``scaling.precision=bf16-mixed`` runs the meta step, forward-mode pass included, under bfloat16
    autocast: its meta-gradient differs from the float32 one by rounding only. bfloat16 keeps 8 significant
    bits (a relative step of 2**-8 = 0.0039) and the step chains dozens of rounded products: measured here,
    relative errors of 0.009 (mlc, metalabelnet) and 0.018 (mwnet). A pass that autocast broke (a tangent in
    the wrong dtype, a dropped term) is off by order 1, so the bound is 0.1. Exactly 0 would mean that
    autocast never ran."""
    grads = {p: _first_meta_gradient(tmp_path, name, p) for p in ("fp32", "bf16-mixed")}
    assert grads["bf16-mixed"].dtype == torch.float32
    error = float((grads["bf16-mixed"] - grads["fp32"]).norm() / grads["fp32"].norm())
    assert 0 < error < 0.1, error


# ---- resume ------------------------------------------------------------------------------------------


def _short(name: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
    """build() arguments for a schedule that walking every stage ends where a test stops: metalabelnet a
    1-epoch warm-up and a 1-epoch meta stage, the others one epoch; plus ``params``."""
    if name == "metalabelnet":
        return {"epochs": 2, "params": {"warmup_epochs": 1, **(params or {})}}
    return {"epochs": 1, "params": params}


@pytest.mark.parametrize("name", METHODS)
def test_state_dict_round_trip_continues_bit_for_bit(tmp_path: Path, name: str) -> None:
    noisy, trusted = toy_batch(512, noise=0.4, seed=1), toy_batch(128, noise=0.0, seed=2, first_id=5000)
    params = {"gradient_steps": 3, "skip": True} if name == "mlc" else None
    original = build(tmp_path, name, **_short(name, params))
    stages = original.stages(original.ctx.cfg)
    # metalabelnet: 3 warm-up steps, then 4 in the meta stage; the others 7 steps (mlc with K=3: mid-window)
    steps = {"warmup": 3, "meta": 4} if name == "metalabelnet" else {"train": 7}
    assert [s.name for s in stages] == list(steps)
    walk(original, noisy, trusted, steps)
    buffer = io.BytesIO()
    torch.save(original.state_dict(), buffer)
    buffer.seek(0)
    # A different init: the load must do it all.
    resumed = build(tmp_path, name, seed=123, **_short(name, params))
    resumed.load_state_dict(torch.load(buffer, weights_only=False))
    # The hooks the loop may call on resume (the stage's start on a stage boundary, the epoch's start) must
    # not rebuild anything: no new encoder, no fresh soft-label net, no reset optimizer.
    assert resumed.on_stage_start(stages[-1], None) == {}
    for method in (original, resumed):  # the next epoch's start, as the loop calls it in both runs
        method.on_epoch_start(sum(s.epochs for s in stages))
        train(method, noisy, trusted, 3, first=7)
    a, b = state_tensors(original.state_dict()), state_tensors(resumed.state_dict())
    assert a.keys() == b.keys() and len(a) > 0
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ---- two ranks ---------------------------------------------------------------------------------------

WORLD = 2
HALF = BATCH // WORLD
AMORTISED = {"meta_every": 2}
EXAMPLE = {"weighting": "example"}  # mwnet only
# mwnet only: plain steps that read a trusted batch (plain_trusted_term) and synchronise its term too
TRUSTED_EVERY2 = {"train_on_trusted": True, **AMORTISED}
DEVIATIONS = {  # each method's deviations from its paper that change what the ranks exchange
    "mwnet": {"weighting": "example", "train_on_trusted": True},
    "mlc": {"corrector_supervision": 1.0},
}


def _global_batches() -> tuple[Batch, Batch]:
    return toy_batch(5 * BATCH, noise=0.4, seed=1), toy_batch(5 * BATCH, noise=0.0, seed=2, first_id=5000)


def _rank_rows(step: int, rank: int, world: int) -> tuple[Tensor, Tensor]:
    """Rows of the global noisy and trusted batch of ``step`` that ``rank`` of ``world`` sees.

    Noisy: the rank's contiguous share. Trusted: the rank's share of each half, so that MLC's per-rank
    split (first half gold, second half clean) is the 1-process split of the concatenated batch.
    """
    base = step * BATCH
    share = BATCH // world
    noisy = torch.arange(base + rank * share, base + (rank + 1) * share)
    half = share // 2
    gold = torch.arange(base + rank * half, base + (rank + 1) * half)
    clean = gold + BATCH // 2
    return noisy, torch.cat([gold, clean])


def _run_distributed(
    tmp_path: Path,
    name: str,
    model: str,
    rank: int,
    world: int,
    params: dict[str, Any] | None = None,
    precision: str = "fp32",
) -> Method:
    """5 steps of ``name`` on this rank's part of fixed global batches (metalabelnet: 2 warm-up + 3), under
    ``scaling.precision`` (``walk_stages`` runs each step in it)."""
    method = build(
        tmp_path, name, model=model, rank=rank, world=world, precision=precision, **_short(name, params)
    )
    noisy, trusted = _global_batches()
    walk(
        method,
        noisy,
        trusted,
        {"warmup": 2, "meta": 3} if name == "metalabelnet" else {"train": 5},
        rank=rank,
        world=world,
    )
    return method


def _rank_main(rank: int, init_file: str, tmp_path: Path) -> None:
    with gloo_rank(rank, WORLD, init_file):
        for name in METHODS:
            # Built from different seeds, the main model still starts as rank 0's: broadcast by hand for
            # the methods that synchronise their own gradients (mwnet, mlc), by DDP for metalabelnet.
            differently_seeded = build(tmp_path, name, model="small-cnn", seed=rank, rank=rank, world=WORLD)
            assert_replicas_identical(differently_seeded.eval_model().state_dict())
            for model in (MLP, "small-cnn"):
                method = _run_distributed(tmp_path, name, model, rank, WORLD)
                # As the worker after each epoch: BatchNorm running statistics are per rank until averaged.
                all_reduce_mean_([b for b in method.eval_model().buffers() if b.is_floating_point()])
                assert_replicas_identical(state_tensors(method.state_dict()))
                if model == MLP:
                    torch.save(state_tensors(method.state_dict()), tmp_path / f"{name}-rank{rank}.pt")
            # Under bfloat16 autocast the replicas stay bit-identical: each rank rounds the same way, and the
            # gradients they exchange are float32.
            mixed = _run_distributed(tmp_path, name, "small-cnn", rank, WORLD, precision="bf16-mixed")
            all_reduce_mean_([b for b in mixed.eval_model().buffers() if b.is_floating_point()])
            assert_replicas_identical(state_tensors(mixed.state_dict()))
            # meta_every=2: plain steps between the meta updates synchronise their gradients too.
            amortised = _run_distributed(tmp_path, name, MLP, rank, WORLD, AMORTISED)
            assert_replicas_identical(state_tensors(amortised.state_dict()))
            torch.save(state_tensors(amortised.state_dict()), tmp_path / f"{name}-every2-rank{rank}.pt")
        # MW-Net's example weights: each rank weighs its own samples, normalised over the global batch.
        example = _run_distributed(tmp_path, "mwnet", MLP, rank, WORLD, EXAMPLE)
        assert_replicas_identical(state_tensors(example.state_dict()))
        torch.save(state_tensors(example.state_dict()), tmp_path / f"mwnet-example-rank{rank}.pt")
        trusted_every2 = _run_distributed(tmp_path, "mwnet", MLP, rank, WORLD, TRUSTED_EVERY2)
        assert_replicas_identical(state_tensors(trusted_every2.state_dict()))
        torch.save(
            state_tensors(trusted_every2.state_dict()), tmp_path / f"mwnet-trusted-every2-rank{rank}.pt"
        )
        for name, params in DEVIATIONS.items():
            deviated = _run_distributed(tmp_path, name, MLP, rank, WORLD, params)
            assert_replicas_identical(state_tensors(deviated.state_dict()))
            torch.save(state_tensors(deviated.state_dict()), tmp_path / f"{name}-deviations-rank{rank}.pt")


def test_two_ranks_are_identical_and_match_one_process(tmp_path: Path) -> None:
    """Bit-identical replicas (main net, meta net, optimizers, accumulators, encoder) after 5 steps on 2 gloo
    ranks, for the MLP and the BatchNorm small-cnn; for the MLP also equal, to float tolerance, to one
    process on the concatenated batches, with a meta update every step and every second step
    (``meta_every=2``: plain steps between), for MW-Net's example weighting (each rank weighs its own
    samples, normalised over the global batch), for MW-Net's trusted term every step with ``meta_every=2``
    (plain steps that read a trusted batch) and for the deviations in ``DEVIATIONS`` (MW-Net's trusted
    term, MLC's corrector supervision with its draws and transition counts). The small-cnn is left out of
    that comparison on purpose: BatchNorm normalises with the statistics of each rank's half, which
    legitimately differ from the full batch's. The small-cnn also runs under ``bf16-mixed`` (bfloat16
    autocast): its replicas too must stay bit-identical.
    """
    # fork, not spawn: a spawned child re-imports torch, which costs seconds per rank on a 2-core machine
    mp.start_processes(
        _rank_main,
        args=(str(tmp_path / "rendezvous"), tmp_path),
        nprocs=WORLD,
        join=True,
        start_method="fork",
    )
    runs = [*itertools.product(METHODS, [("", None), ("-every2", AMORTISED)])]
    runs.append(("mwnet", ("-example", EXAMPLE)))
    runs.append(("mwnet", ("-trusted-every2", TRUSTED_EVERY2)))
    runs += [(name, ("-deviations", params)) for name, params in DEVIATIONS.items()]
    for name, (tag, params) in runs:
        single = state_tensors(_run_distributed(tmp_path, name, MLP, 0, 1, params).state_dict())
        ranks = [torch.load(tmp_path / f"{name}{tag}-rank{r}.pt") for r in range(WORLD)]
        assert ranks[0].keys() == ranks[1].keys() == single.keys()
        for key, value in single.items():
            assert torch.equal(ranks[0][key], ranks[1][key]), f"{name}{tag} {key}"
            torch.testing.assert_close(ranks[0][key], value, rtol=1e-4, atol=1e-6, msg=f"{name}{tag} {key}")


# ---- amortised meta updates (meta_every) -------------------------------------------------------------


@pytest.mark.parametrize("name", METHODS)
def test_meta_every_one_is_the_step_without_it(tmp_path: Path, name: str) -> None:
    """meta_every=1 (the default) changes nothing: bit-identical state after the same steps."""
    noisy, trusted = _global_batches()
    steps = {"warmup": 2, "meta": 3} if name == "metalabelnet" else {"train": 5}
    states = []
    for params in (None, {"meta_every": 1}):
        method = build(tmp_path, name, **_short(name, params))
        walk(method, noisy, trusted, steps)
        states.append(state_tensors(method.state_dict()))
    absent, one = states
    assert absent.keys() == one.keys() and len(absent) > 0
    for key in absent:
        assert torch.equal(absent[key], one[key]), key


def _record_steps(method: Method) -> list[tuple[bool, bool, bool]]:
    """Wrap ``method.train_step_at`` (the loop's step): per step, (got a trusted batch, the meta net moved,
    the main net moved)."""
    record: list[tuple[bool, bool, bool]] = []
    step = method.train_step_at

    def recorded(stage: Stage, index: int, batch: Batch, trusted: Batch | None) -> dict[str, float]:
        meta, main = getattr(method, meta_net(method)), method.eval_model()
        meta_before, main_before = params_of(meta), params_of(main)
        stats = step(stage, index, batch, trusted)
        moved = [
            any(not torch.equal(p, q) for p, q in zip(module.parameters(), old, strict=True))
            for module, old in ((meta, meta_before), (main, main_before))
        ]
        record.append((trusted is not None, *moved))
        return stats

    method.train_step_at = recorded  # type: ignore[method-assign]
    return record


@pytest.mark.parametrize("name", METHODS)
def test_meta_every_updates_the_meta_net_on_every_kth_step_of_the_stage(tmp_path: Path, name: str) -> None:
    """k=3 over 6 steps: meta updates on steps 0 and 3 of the stage only, the main net moving every step.
    Trusted batches on those steps only, except MLC's, whose plain steps keep its clean half (every step,
    unless ``plain_trusted_term`` is off). MetaLabelNet counts from its meta stage's first step: its 2
    warm-up steps come first."""
    noisy, trusted = _global_batches()
    variants = [{"meta_every": 3}]
    if name == "mlc":
        variants.append({"meta_every": 3, "plain_trusted_term": False})
    for params in variants:
        method = build(tmp_path, name, **_short(name, params))
        record = _record_steps(method)
        steps = {"warmup": 2, "meta": 6} if name == "metalabelnet" else {"train": 6}
        walk(method, noisy, trusted, steps)
        plain_reads = name == "mlc" and params.get("plain_trusted_term", True)
        warmup = [(False, False, True)] * steps.get("warmup", 0)
        meta_steps = [(True, True, True), (plain_reads, False, True), (plain_reads, False, True)] * 2
        assert record == warmup + meta_steps, params


@pytest.mark.parametrize("name", METHODS)
def test_plain_steps_take_no_trusted_batch_only_with_meta_every(tmp_path: Path, name: str) -> None:
    """Without a trusted batch a step is a plain one; with meta_every=1 that is a caller's error."""
    no_warmup = {"warmup_epochs": 0} if name == "metalabelnet" else {}
    method = start(build(tmp_path, name, params=no_warmup))
    with pytest.raises(ValueError, match="needs a trusted batch"):
        method.train_step(toy_batch(BATCH, noise=0.4, seed=1), None)
    amortised = start(build(tmp_path, name, params={**no_warmup, "meta_every": 4}))
    stats = amortised.train_step(toy_batch(BATCH, noise=0.4, seed=1), None)
    assert "meta_loss" not in stats and all(np.isfinite(v) for v in stats.values())


def test_meta_every_phase_is_the_step_in_the_stage(tmp_path: Path) -> None:
    """The loop asks with epoch in stage x steps per epoch + step in epoch; 20 steps per epoch here. A
    method whose real step trains on trusted samples (MLC; MW-Net with ``train_on_trusted``) reads a
    trusted batch on its plain steps too, unless ``plain_trusted_term`` is off."""
    every3 = list(range(0, 45, 3))

    def reads(name: str, **params: Any) -> list[int]:
        method = build(tmp_path, name, params=params)
        stage = method.stages(method.ctx.cfg)[0]
        return [s for s in range(45) if method.takes_trusted_at(stage, s)]

    assert reads("mwnet", meta_every=3) == every3
    assert reads("mwnet", meta_every=3, train_on_trusted=True) == list(range(45))
    assert reads("mwnet", meta_every=3, train_on_trusted=True, plain_trusted_term=False) == every3
    assert reads("mlc") == reads("mlc", meta_every=3) == list(range(45))
    assert reads("mlc", meta_every=3, plain_trusted_term=False) == every3


@pytest.mark.parametrize(
    ("name", "params"), [("mlc", {}), ("mlc", {"skip": True}), ("mwnet", {"train_on_trusted": True})]
)
def test_plain_step_with_trusted_batch_is_the_real_step_without_the_meta_update(
    tmp_path: Path, name: str, params: dict[str, Any]
) -> None:
    """A plain step that keeps the trusted term (``plain_trusted_term``) takes the main model where the meta
    step's real step takes it, when the meta network is the same. MLC's real step uses the gradient of
    L_s taken before its corrector moves, so the two agree from identical copies; MW-Net's real step uses
    the updated weight net, so its plain step is checked against the step by hand: SGD on
    (1 - t)·mean(v(ℓ_i)·ℓ_i) + t·CE(trusted), t = |trusted| / (|noisy| + |trusted|). The small CNN has
    BatchNorm: its running statistics must move as the meta step moves them too (MLC's clean half moves
    them, MW-Net's trusted forward uses copies)."""
    noisy, trusted = toy_batch(BATCH, noise=0.4, seed=1), toy_batch(BATCH, noise=0.0, seed=2, first_id=5000)
    plain = start(build(tmp_path, name, model="small-cnn", params={"meta_every": 2, **params}))
    stage = plain.stages(plain.ctx.cfg)[0]
    reference = copy.deepcopy(plain)
    before = params_of(plain.eval_model())
    plain.train_step_at(stage, 1, noisy, trusted)  # step 1 of k = 2: plain
    if name == "mlc":
        reference.train_step_at(stage, 0, noisy, trusted)  # step 0: the meta update
    else:
        net, weight_net = reference.main.net, reference.weight_net
        logits = net(noisy.x)[0]
        losses = F.cross_entropy(logits, noisy.y, reduction="none")
        with torch.no_grad():
            weights = weight_net(losses.detach())
        share = len(trusted) / (len(noisy) + len(trusted))
        buffers = copy.deepcopy(net.state_dict())  # the trusted forward leaves the running statistics
        gold = F.cross_entropy(net(trusted.x)[0], trusted.y)
        loss = (1 - share) * (weights * losses).mean() + share * gold
        grads = list(torch.autograd.grad(loss, list(net.parameters())))
        with torch.no_grad():
            for key, buffer in net.named_buffers():
                buffer.copy_(buffers[key])
        reference.main.apply_grads(grads)
    assert any(not torch.equal(a, b) for a, b in zip(plain.eval_model().parameters(), before, strict=True))
    for (key, a), b in zip(
        plain.eval_model().state_dict().items(), reference.eval_model().state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize(("name", "params"), [("mlc", {}), ("mwnet", {"train_on_trusted": True})])
def test_a_smaller_trusted_batch_keeps_the_trusted_term_an_unbiased_estimate(
    tmp_path: Path, name: str, params: dict[str, Any]
) -> None:
    """With ``trusted_batch_size`` = B/4, the four plain steps on four trusted batches whose trusted-term rows
    partition a full-size batch's move the main model, on average, exactly as the full-size plain step
    does: the first SGD step is linear in the gradient, so this holds only if the term keeps its default
    weight (B_t counted at full size). Weighted by the rows read, MLC's clean half would count a ninth of
    L_s instead of a third, and the mean step would miss by that difference."""
    quarter = BATCH // 4
    noisy, full = toy_batch(BATCH, noise=0.4, seed=1), toy_batch(BATCH, noise=0.0, seed=2, first_id=5000)
    reference = start(build(tmp_path, name, params={"meta_every": 2, **params}))
    small = start(build(tmp_path, name, params={"meta_every": 2, "trusted_batch_size": quarter, **params}))
    stage = reference.stages(reference.ctx.cfg)[0]
    assert reference.trusted_batch_size(stage) == BATCH and small.trusted_batch_size(stage) == quarter
    before = params_of(reference.eval_model())
    for a, b in zip(before, small.eval_model().parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # same seed, same start

    if name == "mlc":  # the term reads the second half: gold rows first, then the clean rows they stand for
        gold, clean = torch.arange(BATCH // 2), torch.arange(BATCH // 2, BATCH)
        parts = [torch.cat([gold[i::4][: quarter // 2], clean[i::4]]) for i in range(4)]
    else:  # MW-Net's term reads the whole trusted batch
        parts = [torch.arange(BATCH)[i::4] for i in range(4)]
    moved = []
    for part in parts:
        step = copy.deepcopy(small)
        step.train_step_at(stage, 1, noisy, rows(full, part))  # step 1 of k = 2: plain
        moved.append([a - b for a, b in zip(params_of(step.eval_model()), before, strict=True)])
    reference.train_step_at(stage, 1, noisy, full)
    expected = [a - b for a, b in zip(params_of(reference.eval_model()), before, strict=True)]
    for got, want in zip(zip(*moved, strict=True), expected, strict=True):
        torch.testing.assert_close(torch.stack(got).mean(0), want, rtol=1e-4, atol=1e-7)


# ---- export ------------------------------------------------------------------------------------------


def _labels(true: list[int | None]) -> pa.Table:
    """labels.parquet for samples 0.. with these true labels, plus a trusted sample the export lacks."""
    n = len(true)
    return pa.table(
        {
            "sample_id": pa.array([*range(n), 99], pa.int64()),
            "split": ["train"] * n + ["trusted"],
            "given_label": pa.array([0] * (n + 1), pa.int64()),
            "true_label": pa.array([*true, 3], pa.int64()),
        }
    )


def test_corrected_label_summary_by_hand() -> None:
    # id:         0  1  2  3  4  5  6
    # given:      0  1  2  0  1  2  0
    # corrected:  0  2  2  1  1  0  1     changed: 1, 3, 5, 6 -> 4/7
    # true:       0  2  1  1  0  2  ?     mislabelled (known): 1, 2, 3, 4; flagged (known): 1, 3, 5
    table = pa.table(
        {
            "sample_id": [6, 0, 1, 2, 3, 4, 5],  # order must not matter
            "given_label": [0, 0, 1, 2, 0, 1, 2],
            "corrected_label": [1, 0, 2, 2, 1, 1, 0],
        }
    )
    summary = get_method_class("mlc").summarize_export(table, _labels([0, 2, 1, 1, 0, 2, None]))
    assert summary == {
        "label_correction": {
            "samples": 7,
            "source": FROM_METHOD,  # no source in the table's metadata: the method's own labels
            "fraction_changed": pytest.approx(4 / 7),
            "samples_with_true_label": 6,
            "corrected_label_accuracy": pytest.approx(3 / 6),  # ids 0, 1, 3
            "given_label_accuracy": pytest.approx(2 / 6),  # ids 0, 5
            "precision": pytest.approx(2 / 3),  # flagged 1, 3, 5; right about 1, 3
            "recall": pytest.approx(2 / 4),  # of 1, 2, 3, 4 found 1, 3
        }
    }
    assert get_method_class("metalabelnet").summarize_export(table, _labels([None] * 7)) == {
        "label_correction": {
            "samples": 7,
            "source": FROM_METHOD,
            "fraction_changed": pytest.approx(4 / 7),
            "samples_with_true_label": 0,
        }
    }


def test_sample_weight_summary_by_hand() -> None:
    # weight < 0.5 flags ids 1, 2, 4; mislabelled: 1, 3; id 4's true label is unknown.
    table = pa.table(
        {
            "sample_id": [0, 1, 2, 3, 4],
            "given_label": [0, 1, 2, 0, 1],
            "loss": [0.1, 2.0, 1.0, 0.5, 3.0],
            "weight": [0.9, 0.2, 0.4, 0.7, 0.1],
        }
    )
    summarize = get_method_class("mwnet").summarize_export
    labels = _labels([0, 2, 2, 1, None])
    assert summarize(table, labels)["sample_weights"] == {
        "samples": 5,
        "mean_weight": pytest.approx(0.46),
        "fraction_below_half": pytest.approx(3 / 5),
        "samples_with_true_label": 4,
        "mean_weight_clean": pytest.approx((0.9 + 0.4) / 2),
        "mean_weight_mislabelled": pytest.approx((0.2 + 0.7) / 2),
        "precision": pytest.approx(1 / 2),  # known flagged 1, 2; right about 1
        "recall": pytest.approx(1 / 2),  # of 1, 3 found 1
    }
    nothing_flagged = summarize(table.set_column(3, "weight", pa.array([0.9] * 5)), labels)["sample_weights"]
    assert nothing_flagged["precision"] is None and nothing_flagged["recall"] == 0.0


def test_export_columns(tmp_path: Path) -> None:
    batch = toy_batch(6, noise=0.5, seed=1, first_id=40)
    soft = torch.tensor([[0.1, 0.7, 0.1, 0.1]] * 6)
    columns = corrected_label_columns(batch, soft)
    assert columns["corrected_label"].tolist() == [1] * 6
    np.testing.assert_allclose(columns["corrected_confidence"], 0.7)
    assert columns["sample_id"].tolist() == list(range(40, 46)) and columns["soft_label"].shape == (6, 4)
    assert "soft_label" not in corrected_label_columns(batch, torch.full((6, 21), 1 / 21))
    for name in METHODS:
        method = start(build(tmp_path, name, params={"warmup_epochs": 0} if name == "metalabelnet" else None))
        out = method.per_sample_outputs(batch)
        assert (
            out["sample_id"].tolist() == list(range(40, 46))
            and out["given_label"].tolist() == batch.y.tolist()
        )
        assert method.eval_model().training  # the export put the model back in train mode


# ---- config ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "override", "field"),
    [
        ("mwnet", "method.params.lookahead_rule=adam", "method.params.lookahead_rule"),
        ("mwnet", "method.params.first_order=true", "method.params.first_order"),
        ("mlc", "method.params.gradient_steps=0", "method.params.gradient_steps"),
        ("metalabelnet", "method.params.meta_lr=0", "method.params.meta_lr"),
        ("metalabelnet", "method.params.slp_init=zeros", "method.params.slp_init"),
        ("mwnet", "method.params.meta_every=0", "method.params.meta_every"),
        ("mlc", "method.params.meta_every=-1", "method.params.meta_every"),
        ("metalabelnet", "method.params.meta_every=0", "method.params.meta_every"),
        ("mwnet", "method.params.weighting=loss", "method.params.weighting"),
        ("mwnet", "method.params.weighting=example,method.params.meta_every=2", "method.params.meta_every"),
    ],
)
def test_bad_params_fail_before_training(tmp_path: Path, name: str, override: str, field: str) -> None:
    overrides = override.split(",")
    with pytest.raises(ConfigError) as info:
        resolve_config("digits", name, flags={"run.output": str(tmp_path)}, overrides=overrides)
    assert info.value.field == field
    # A config that passed only the schema check is refused by the method itself, with the same field.
    cfg = load_config("digits", name, flags={"run.output": str(tmp_path)}, overrides=overrides)
    with pytest.raises(ConfigError) as info:
        build_method(context(cfg))
    assert info.value.field == field


def test_metalabelnet_warmup_must_leave_a_stage_two(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="warmup_epochs"):
        build(tmp_path, "metalabelnet", params={"warmup_epochs": 30})  # the digits preset has 30 epochs
    schema_only = load_config(
        "digits",
        "metalabelnet",
        flags={"run.output": str(tmp_path)},
        overrides=["method.params.warmup_epochs=30"],
    )
    with pytest.raises(ConfigError, match="warmup_epochs"):
        build_method(context(schema_only))
    default = build(tmp_path, "metalabelnet")
    assert default.warmup_epochs == 11  # round(30 * 44 / 120)
    warmup, meta = default.stages(default.ctx.cfg)
    assert (warmup.name, warmup.epochs, warmup.trains_on, warmup.selectable) == ("warmup", 11, "train", False)
    assert (meta.name, meta.epochs, meta.trains_on, meta.selectable) == ("meta", 19, "train", True)
    assert not warmup.init_from_best and not meta.init_from_best
    assert default.trusted_batch_size(warmup) == 0 and default.trusted_batch_size(meta) == BATCH
    assert start_stage(default, "warmup") == warmup and default.encoder is None
    entered = build(tmp_path, "metalabelnet")
    assert start_stage(entered, "meta") == meta and entered.encoder is not None  # frozen at the stage start
    no_warmup = build(tmp_path, "metalabelnet", params={"warmup_epochs": 0})
    assert no_warmup.stages(no_warmup.ctx.cfg) == [Stage("meta", 30)]


def test_metalabelnet_soft_labels_start_at_the_warmup_predictions(tmp_path: Path) -> None:
    """slp_init=encoder: the first stage-2 soft labels are the warm-up model's softmax; random's are not."""
    noisy = toy_batch(3 * BATCH, noise=0.3, seed=3)
    starts = {}
    for init in ("encoder", "random"):
        method = build(tmp_path, "metalabelnet", **_short("metalabelnet", {"slp_init": init}))
        walk(method, noisy, None, {"warmup": 3, "meta": 0})  # 3 warm-up steps, then the meta stage's start
        assert method.encoder is not None
        with torch.no_grad():
            logits, features = method.encoder(noisy.x)
            starts[init] = (method.soft_label_net(features), torch.softmax(logits, dim=1))
    soft, warmup = starts["encoder"]
    torch.testing.assert_close(soft, warmup)
    soft, warmup = starts["random"]
    assert (soft - warmup).abs().max() > 0.05


def test_lookahead_optimizer_refuses_an_lr_it_would_ignore(tmp_path: Path) -> None:
    method = build(tmp_path, "mwnet")
    assert lookahead_optimizer(method.main, "optimizer") is method.main.optimizer
    assert lookahead_optimizer(method.main, "sgd-plain", 0.5).param_groups[0]["lr"] == 0.5
    with pytest.raises(ValueError, match="sgd-plain"):
        lookahead_optimizer(method.main, "optimizer", 0.5)


def test_hand_synchronised_main_model_has_no_ddp_and_refuses_a_plain_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    method = build(tmp_path, "mwnet", world=2)  # no process group: building is local
    assert method.main.model is method.main.net, "mwnet's gradients never pass DDP's hooks"
    x, y = torch.randn(4, 1, SIDE, SIDE), torch.zeros(4, dtype=torch.long)
    monkeypatch.setattr("raynoisy.methods.supervised.world_size", lambda: 2)
    with pytest.raises(RuntimeError, match="apply_grads"):
        method.main.cross_entropy_step(x, y)


@pytest.mark.parametrize(("name", "forwards"), [("mwnet", 1), ("mlc", 2), ("metalabelnet", 1)])
def test_a_step_moves_batchnorm_statistics_once_per_training_forward(
    tmp_path: Path, name: str, forwards: int
) -> None:
    """Look-ahead, gold and forward-mode passes see buffer copies; MLC's noisy and clean forwards count."""
    method = start(
        build(
            tmp_path, name, model="small-cnn", params={"warmup_epochs": 0} if name == "metalabelnet" else None
        )
    )
    tracked = [m for m in method.main.net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert tracked
    before = [int(m.num_batches_tracked) for m in tracked]
    train(method, toy_batch(BATCH * 2, noise=0.3, seed=4), toy_batch(BATCH * 2, noise=0.0, seed=5), 2)
    assert [int(m.num_batches_tracked) - b for m, b in zip(tracked, before, strict=True)] == [
        2 * forwards
    ] * len(tracked)


# ---- MetaLabelNet's cached encoder features ------------------------------------------------------------


def _metalabelnet_with_split(tmp_path: Path, noisy: Batch, seen: int | None = None, **params: Any) -> Method:
    """MetaLabelNet at its meta stage on the training set ``noisy``, of which the split pass that its stage
    start reads holds the first ``seen`` samples (all by default)."""
    flags = {
        "run.output": str(tmp_path),
        "model.name": "small-cnn",
        "optim.batch_size": BATCH,
        "optim.epochs": 2,
    }
    sets = [f"method.params.{k}={v}" for k, v in {"warmup_epochs": 1, **params}.items()]
    cfg = resolve_config("digits", "metalabelnet", flags=flags, overrides=sets)
    seen = seen or len(noisy)
    split = [rows(noisy, slice(lo, min(lo + 50, seen))) for lo in range(0, seen, 50)]
    method = build_method(
        context(cfg, num_train=len(noisy), splits={"train": split}, train_ids=noisy.sample_id.numpy())
    )
    start_stage(method, "meta")
    return method


def test_metalabelnet_reads_cached_encoder_features_instead_of_running_the_encoder(tmp_path: Path) -> None:
    noisy, trusted = toy_batch(128, noise=0.4, seed=1), toy_batch(BATCH, noise=0.0, seed=2, first_id=5000)
    cached = _metalabelnet_with_split(tmp_path, noisy)
    uncached = _metalabelnet_with_split(tmp_path, noisy, cache_features=False)
    assert cached.store is not None and uncached.store is None
    batch = rows(noisy, torch.arange(40, 40 + BATCH))  # another composition than the split pass's batches
    torch.testing.assert_close(
        cached._training_features(batch), uncached._features(batch.x), rtol=0, atol=1e-5
    )
    encoder_runs = {}
    for name, method in (("cached", cached), ("uncached", uncached)):
        runs: list[int] = []
        handle = method.encoder.register_forward_hook(lambda *_, runs=runs: runs.append(1))
        method.train_step(batch, trusted)
        handle.remove()
        encoder_runs[name] = len(runs)
    assert encoder_runs == {"cached": 0, "uncached": 1}
    # Both take the same steps (float tolerance: the batched encoder's sums in another order).
    for a, b in zip(cached.eval_model().parameters(), uncached.eval_model().parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_metalabelnet_runs_the_encoder_for_unseen_samples_and_where_training_augments(tmp_path: Path) -> None:
    noisy = toy_batch(128, noise=0.4, seed=1)
    method = _metalabelnet_with_split(tmp_path, noisy, seen=64)  # the split pass sees half
    unseen = rows(noisy, slice(60, 60 + 8))
    torch.testing.assert_close(method._training_features(unseen), method._features(unseen.x))
    cifar = resolve_config(
        "cifar10", "metalabelnet", flags={"run.output": str(tmp_path), "data.root": str(tmp_path)}
    )
    assert build_method(context(cifar)).store is None  # random crops and flips: features change every epoch
