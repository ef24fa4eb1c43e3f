"""MLNT without Ray: synthetic label sets, the hypergradient, 2 ranks = 1 process, rounds, resume, export.

The method is built and driven with ``raynoisy.train.harness`` on synthetic 1x8x8 batches (four classes, a
fixed random prototype each plus Gaussian noise, given labels partly flipped). Most tests use a
BatchNorm-free MLP registered here (fast, and its result does not depend on how a batch is split across
ranks); the 2-rank bit-identity check also runs the real ``small-cnn`` (with BatchNorm).
"""

from __future__ import annotations

import io
import itertools
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from gloo_ranks import gloo_rank
from tiny_models import tiny_mlp
from torch import Tensor, nn
from torch.func import functional_call

from raynoisy.config import load_config
from raynoisy.data.batch import Batch
from raynoisy.errors import ConfigError
from raynoisy.meta import assert_replicas_identical
from raynoisy.meta.sync import state_tensors
from raynoisy.methods.base import Method, Stage
from raynoisy.methods.mlnt import FILTER_COLUMN, consistency_schedule, synthetic_labels
from raynoisy.train.harness import build_method, method_context, walk_stages
from raynoisy.train.preflight import resolve_config

CLASSES = 4
SIDE = 8
BATCH = 32
NUM_TRAIN = 256
MLP = tiny_mlp(16)  # BatchNorm-free backbone (tests/tiny_models.py)


_PROTOTYPES = torch.randn(CLASSES, 1, SIDE, SIDE, generator=torch.Generator().manual_seed(0))


def toy_batch(n: int, *, noise: float, seed: int, first_id: int = 0) -> Batch:
    """n samples with ids first_id..; a ``noise`` share of the given labels is pair-flipped (c -> c+1)."""
    g = torch.Generator().manual_seed(seed)
    true = torch.randint(0, CLASSES, (n,), generator=g)
    x = _PROTOTYPES[true] + torch.randn(n, 1, SIDE, SIDE, generator=g)
    flipped = torch.rand(n, generator=g) < noise
    given = torch.where(flipped, (true + 1) % CLASSES, true)
    return Batch(x=x, y=given, sample_id=torch.arange(first_id, first_id + n), true_y=true)


def rows(batch: Batch, index: Tensor | slice) -> Batch:
    return Batch(batch.x[index], batch.y[index], batch.sample_id[index], batch.true_y[index])


def build(
    tmp_path: Path,
    params: dict[str, Any] | None = None,
    *,
    model: str = MLP,
    seed: int = 0,
    rank: int = 0,
    world: int = 1,
    epochs: int = 2,
    flags: dict[str, Any] | None = None,
    train: Batch | None = None,
    steps_per_epoch: int = 4,
) -> Method:
    """MLNT as every worker builds it: the digits preset checked whole, ``params`` as --set overrides.

    ``train``: the training split; ``ctx.iter_split("train")`` replays this rank's share of it.
    """
    cfg = resolve_config(
        "digits",
        "mlnt",
        flags={
            "run.output": str(tmp_path),
            "run.seed": seed,
            "model.name": model,
            "optim.batch_size": BATCH,  # global; each of ``world`` ranks gets BATCH // world
            "optim.epochs": epochs,
            "scaling.workers": world,
            **(flags or {}),
        },
        overrides=[f"method.params.{key}={value}" for key, value in (params or {}).items()],
    )
    share = NUM_TRAIN // world
    splits = {"train": [rows(train, slice(rank * share, (rank + 1) * share))]} if train is not None else {}
    ctx = method_context(
        cfg,
        num_classes=CLASSES,
        in_channels=1,
        image_size=SIDE,
        steps_per_epoch=steps_per_epoch,
        num_train=NUM_TRAIN,
        num_trusted=0,
        splits=splits,
        rank=rank,
        world_size=world,
    )
    return build_method(ctx)


def walk(method: Method, data: Batch, steps: int, *, rank: int = 0, world: int = 1) -> list[dict]:
    """``walk_stages`` with ``steps`` steps per epoch; step k on this rank's rows of global batch k."""
    counter = itertools.count()
    share = BATCH // world

    def batches(stage: Stage, epoch: int) -> list[Batch]:
        picks = [next(counter) * BATCH + rank * share + torch.arange(share) for _ in range(steps)]
        return [rows(data, pick % len(data)) for pick in picks]

    return walk_stages(method, batches)


def params_of(module: nn.Module) -> list[Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def state_bytes(method: Method) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save(method.state_dict(), buffer)
    buffer.seek(0)
    return buffer


# ---- synthetic label sets ------------------------------------------------------------------------------


def _nearest(features: Tensor, k: int, pool: Tensor) -> dict[int, set[int]]:
    """Brute force: for each pooled sample, its k nearest other pooled samples."""
    out = {}
    for i in pool.tolist():
        others = [j for j in pool.tolist() if j != i]
        d = torch.tensor([float(((features[i] - features[j]) ** 2).sum()) for j in others])
        out[i] = {others[j] for j in d.argsort()[:k].tolist()}
    return out


@pytest.mark.parametrize(("size", "ratio", "k"), [(30, 0.45, 4), (32, 0.5, 10), (9, 1.0, 8)])
def test_synthetic_label_sets_change_round_rho_b_labels_to_neighbour_labels(
    size: int, ratio: float, k: int
) -> None:
    g = torch.Generator().manual_seed(size)
    features = torch.randn(size, 5, generator=g)
    labels = torch.arange(size) * 7  # all distinct: every perturbed position changes, and names its source
    sets = 6
    state = g.get_state()
    out, perturbed = synthetic_labels(features, labels, sets=sets, ratio=ratio, neighbors=k, generator=g)
    assert out.shape == perturbed.shape == (sets, size)
    nearest = _nearest(features, k, torch.arange(size))
    for m in range(sets):
        changed = out[m] != labels
        assert int(changed.sum()) == round(ratio * size)
        assert torch.equal(changed, perturbed[m])
        for i in changed.nonzero().flatten().tolist():
            assert int(out[m, i]) // 7 in nearest[i], (m, i)
    assert len({tuple(o.tolist()) for o in out}) > 1, "the sets are drawn independently"
    g.set_state(state)
    again = synthetic_labels(features, labels, sets=sets, ratio=ratio, neighbors=k, generator=g)
    assert torch.equal(again[0], out), "the same generator state draws the same sets (every rank does)"

    # Filtered samples are neither perturbed nor anybody's neighbour.
    keep = torch.rand(size, generator=g) > 0.3
    kept = keep.nonzero().flatten()
    out, perturbed = synthetic_labels(
        features, labels, sets=sets, ratio=ratio, neighbors=k, generator=g, keep=keep
    )
    nearest = _nearest(features, min(k, len(kept) - 1), kept)
    for m in range(sets):
        changed = out[m] != labels
        assert int(changed.sum()) == round(ratio * len(kept)) and not changed[~keep].any()
        for i in changed.nonzero().flatten().tolist():
            assert int(out[m, i]) // 7 in nearest[i]


def test_consistency_weight_ramps_like_the_reference(tmp_path: Path) -> None:
    p = build(tmp_path, {"start_iter": 10, "mid_iter": 30}).params
    assert consistency_schedule(9, p) is None
    assert consistency_schedule(10, p) == pytest.approx((np.exp(-5.0), 0.99))
    assert consistency_schedule(20, p) == pytest.approx((np.exp(-5.0 * 0.25), 0.99))
    assert consistency_schedule(30, p) == (1.0, 0.999)


# ---- the hypergradient --------------------------------------------------------------------------------

STEP_FLAGS = {"optim.lr": 1.0, "optim.momentum": 0.0, "optim.weight_decay": 0.0, "optim.schedule": "constant"}


def _one_meta_step(tmp_path: Path, batch: Batch, **params: Any) -> tuple[Method, list[Tensor], Tensor]:
    """One full-weight meta step in float64 with plain SGD at lr 1: returns the method, θ - θ', and the
    generator state the step drew its synthetic sets from."""
    base = {"start_iter": 0, "mid_iter": 0, "synthetic_sets": 3, "neighbors": 3, "inner_lr": 0.5}
    method = build(tmp_path, base | params, flags=STEP_FLAGS)
    method.main.net.double()
    method.teacher.double()
    before = params_of(method.main.net)
    drawn_from = method.generator.get_state()
    method.train_step(Batch(batch.x.double(), batch.y, batch.sample_id, batch.true_y), None)
    after = params_of(method.main.net)
    return method, [b - a for b, a in zip(before, after, strict=True)], drawn_from


def test_zero_consistency_weight_skips_the_look_aheads_and_matches_the_meta_step(tmp_path: Path) -> None:
    # consistency_weight 0: the shortcut (teacher EMA + CE step) against the full meta step at weight 0.
    data = toy_batch(BATCH, noise=0.3, seed=4)
    params = {"consistency_weight": 0, "start_iter": 0, "mid_iter": 0, "second_order": "false"}
    short, full = build(tmp_path, params), build(tmp_path, params)

    def no_look_ahead(*args: Any) -> Tensor:
        raise AssertionError("a look-ahead at consistency weight 0")

    short._fast_logits = no_look_ahead
    for _ in range(3):
        logged = short.train_step(data, None)
        keep = full._keep(data)
        full.round_step += 1
        expected = full._meta_step(data, keep, 0.0, full.params.ema_decay)
        assert logged["consistency_weight"] == 0.0 and logged["loss"] == pytest.approx(expected["loss"])
        for a, b in zip(params_of(short.main.net), params_of(full.main.net), strict=True):
            assert torch.allclose(a, b, atol=1e-6)
        for a, b in zip(params_of(short.teacher), params_of(full.teacher), strict=True):
            assert torch.allclose(a, b, atol=1e-6)
    assert not torch.equal(params_of(short.teacher)[0], params_of(short.main.net)[0]), "the teacher lags"


def test_second_order_hypergradient_matches_finite_differences(tmp_path: Path) -> None:
    """θ - θ' = ∇CE + dΦ/dθ, Φ(θ) = 1/(M·B·C) Σ_m KL(p_tch ‖ f(x; θ - α∇CE_m(θ))), checked along random
    directions against central differences of Φ (float64); first order must miss them, vmap = loop."""
    batch = toy_batch(12, noise=0.3, seed=5)
    x = batch.x.double()
    method, update, drawn_from = _one_meta_step(tmp_path, batch)
    net = method.main.net
    names = [n for n, _ in net.named_parameters()]
    theta = [t.detach() + u for t, u in zip(net.parameters(), update, strict=True)]  # the weights before
    p = method.params

    def forward(weights: list[Tensor]) -> tuple[Tensor, Tensor]:
        return functional_call(net, dict(zip(names, weights, strict=True)), (x,))

    logits, features = forward(theta)
    target = F.softmax(logits, dim=1)  # the teacher is a copy of the student at the first meta step
    g = torch.Generator()
    g.set_state(drawn_from)
    fake, _ = synthetic_labels(
        features, batch.y, sets=p.synthetic_sets, ratio=p.perturb_ratio, neighbors=p.neighbors, generator=g
    )

    def phi(weights: list[Tensor]) -> Tensor:
        total = torch.zeros((), dtype=torch.float64)
        for labels in fake:
            w = [t.detach().requires_grad_() for t in weights]
            grads = torch.autograd.grad(F.cross_entropy(forward(w)[0], labels), w)
            fast = [t.detach() - p.inner_lr * gi for t, gi in zip(weights, grads, strict=True)]
            log_q = F.log_softmax(forward(fast)[0], dim=1)
            total = total + F.kl_div(log_q, target, reduction="sum") / target.numel()  # nn.KLDivLoss()
        return total / p.synthetic_sets

    w = [t.detach().requires_grad_() for t in theta]
    ce_grad = torch.autograd.grad(F.cross_entropy(forward(w)[0], batch.y), w)
    meta = [u - c for u, c in zip(update, ce_grad, strict=True)]
    first_order_update = _one_meta_step(tmp_path, batch, second_order=False)[1]
    first_order = [u - c for u, c in zip(first_order_update, ce_grad, strict=True)]
    directions = torch.Generator().manual_seed(1)
    eps = 1e-5
    for _ in range(3):
        d = [torch.randn(t.shape, generator=directions, dtype=torch.float64) for t in theta]
        plus = phi([t + eps * di for t, di in zip(theta, d, strict=True)])
        minus = phi([t - eps * di for t, di in zip(theta, d, strict=True)])
        numeric = float((plus - minus) / (2 * eps))
        exact = float(sum((m * di).sum() for m, di in zip(meta, d, strict=True)))
        approx = float(sum((m * di).sum() for m, di in zip(first_order, d, strict=True)))
        assert exact == pytest.approx(numeric, rel=1e-6, abs=1e-10)
        assert abs(approx - numeric) > 1e-3 * abs(numeric), "first order must differ from the exact gradient"

    for second_order in (True, False):
        loop = _one_meta_step(tmp_path, batch, second_order=second_order)[1]
        batched = _one_meta_step(tmp_path, batch, second_order=second_order, vmap=True)[1]
        for a, b in zip(loop, batched, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


# ---- two ranks -----------------------------------------------------------------------------------------

WORLD = 2
DISTRIBUTED_PARAMS = {"start_iter": 2, "mid_iter": 4, "rounds": 2, "filter_disagreeing": True}
DISTRIBUTED_STEPS = 3  # per epoch: round 0 = 2 plain + 1 ramp step, round 1 = ... after the filter pass


def _distributed_data() -> Batch:
    return toy_batch(NUM_TRAIN, noise=0.4, seed=1)


def _run(
    tmp_path: Path, model: str, params: dict[str, Any], rank: int, world: int, epochs: int = 2
) -> Method:
    data = _distributed_data()
    method = build(tmp_path, params, model=model, rank=rank, world=world, epochs=epochs, train=data)
    walk(method, data, DISTRIBUTED_STEPS, rank=rank, world=world)
    return method


def _rank_main(rank: int, init_file: str, tmp_path: Path) -> None:
    with gloo_rank(rank, WORLD, init_file):
        differently_seeded = build(tmp_path, model="small-cnn", seed=rank, rank=rank, world=WORLD)
        assert_replicas_identical(differently_seeded.state_dict()["main"]["net"])
        for model, params in (
            (MLP, DISTRIBUTED_PARAMS),
            (MLP, DISTRIBUTED_PARAMS | {"second_order": False, "vmap": True}),
            ("small-cnn", {"start_iter": 1, "mid_iter": 2}),
        ):
            method = _run(tmp_path, model, params, rank, WORLD, epochs=2 if model == MLP else 1)
            method.average_running_stats()  # as on_evaluated does after every evaluation
            assert_replicas_identical(state_tensors(method.state_dict()))
            if model == MLP:
                tag = "so" if method.params.second_order else "fo"
                torch.save(state_tensors(method.state_dict()), tmp_path / f"{tag}-rank{rank}.pt")
                torch.save(method.ctx.sample_store.tensors(), tmp_path / f"{tag}-store-rank{rank}.pt")


def test_two_ranks_are_identical_and_match_one_process(tmp_path: Path) -> None:
    """Two rounds (the second with the mentor's filter) on 2 gloo ranks: student, teacher, mentor, optimizer,
    generator and per-sample store bit-identical across ranks (small-cnn too, after the running statistics
    are averaged), and for the MLP equal to one process on the concatenated batches, first and second order.
    """
    # The 1-process runs first: the forked ranks then find everything imported.
    singles = {
        tag: _run(tmp_path, MLP, params, 0, 1)
        for tag, params in (
            ("so", DISTRIBUTED_PARAMS),
            ("fo", DISTRIBUTED_PARAMS | {"second_order": False, "vmap": True}),
        )
    }
    mp.start_processes(
        _rank_main,
        args=(str(tmp_path / "rendezvous"), tmp_path),
        nprocs=WORLD,
        join=True,
        start_method="fork",  # spawn would re-import torch in each child: seconds on a 2-core machine
    )
    for tag, method in singles.items():
        assert method.round == 1 and method.mentor is not None and method.teacher_ready
        single = state_tensors(method.state_dict())
        ranks = [torch.load(tmp_path / f"{tag}-rank{r}.pt") for r in range(WORLD)]
        assert ranks[0].keys() == ranks[1].keys() == single.keys()
        for key, value in single.items():
            assert torch.equal(ranks[0][key], ranks[1][key]), f"{tag} {key}"
            torch.testing.assert_close(ranks[0][key], value, rtol=1e-4, atol=1e-6, msg=f"{tag} {key}")
        flags = method.ctx.sample_store.tensors()
        assert 0 < int(flags[f"{FILTER_COLUMN}.data"].sum()) < NUM_TRAIN
        for r in range(WORLD):
            store = torch.load(tmp_path / f"{tag}-store-rank{r}.pt")
            assert all(torch.equal(store[k], flags[k]) for k in flags), f"{tag} store of rank {r}"


# ---- rounds --------------------------------------------------------------------------------------------


def test_rounds_are_stages_and_a_round_starts_from_the_best_model(tmp_path: Path) -> None:
    method = build(tmp_path, {"rounds": 3, "start_iter": 1, "mid_iter": 2}, epochs=2)
    assert method.stages(method.ctx.cfg) == [
        Stage("round0", 2),
        Stage("round1", 2, init_from_best=True),
        Stage("round2", 2, init_from_best=True),
    ]
    default = build(tmp_path)
    assert default.stages(default.ctx.cfg) == [Stage("round0", 2)]
    data = toy_batch(3 * BATCH, noise=0.3, seed=2)
    round0, round1, _ = method.stages(method.ctx.cfg)
    assert method.on_stage_start(round0, None) == {}
    for step in range(3):
        method.train_step(rows(data, slice(step * BATCH, (step + 1) * BATCH)), None)
    assert method.teacher_ready and method.eval_model() is method.teacher and method.main.optimizer.state
    best = build(tmp_path, seed=7).main.net.state_dict()  # any model the loop selected
    assert method.on_stage_start(round1, best) == {}
    for net in (method.main.net, method.teacher, method.mentor):
        assert net is not None
        for key, value in net.state_dict().items():
            assert torch.equal(value, best[key]), key
    assert method.mentor is not None and not method.mentor.training
    assert not any(p.requires_grad for p in method.mentor.parameters())
    assert not method.main.optimizer.state, "fresh optimizer state"
    assert method.current_lr() == method.ctx.cfg.optim.lr, "the schedule restarts"
    assert (method.round, method.round_step, method.teacher_ready) == (1, 0, False)
    assert method.eval_model() is method.main.net
    # A resumed run may call the hook again: nothing is rebuilt.
    mentor = method.mentor
    assert method.on_stage_start(round1, build(tmp_path, seed=8).main.net.state_dict()) == {}
    assert method.mentor is mentor and torch.equal(method.main.net.fc.weight, best["fc.weight"])
    # The round's first step is a warm-up CE step; the second re-creates the teacher from the student.
    method.train_step(rows(data, slice(0, BATCH)), None)
    assert not method.teacher_ready
    method.train_step(rows(data, slice(BATCH, 2 * BATCH)), None)
    assert method.teacher_ready


def test_filtered_samples_do_not_move_the_step(tmp_path: Path) -> None:
    """The mentor marks the samples it disagrees with; changing their labels changes nothing."""
    data = toy_batch(NUM_TRAIN, noise=0.4, seed=3)
    method = build(
        tmp_path, {"rounds": 2, "filter_disagreeing": True, "start_iter": 0, "mid_iter": 0}, train=data
    )
    logs = walk(method, data, 4)
    assert [log["stage"] for log in logs] == ["round0", "round0", "round1", "round1"]
    mentor = method.mentor
    assert mentor is not None
    with torch.no_grad():
        disagrees = mentor(data.x)[0].argmax(dim=1) != data.y
    flags = method.ctx.sample_store.gather(FILTER_COLUMN, data.sample_id).flatten().bool()
    assert torch.equal(flags, disagrees) and 0 < int(disagrees.sum()) < NUM_TRAIN
    assert logs[2]["filtered_fraction"] == pytest.approx(float(disagrees.float().mean()))

    batch = rows(data, slice(0, BATCH))
    assert 0 < int(flags[:BATCH].sum()) < BATCH
    relabelled = Batch(batch.x, torch.where(flags[:BATCH], (batch.y + 2) % CLASSES, batch.y), batch.sample_id,
                       batch.true_y)  # fmt: skip
    saved = state_bytes(method)
    results = []
    for b in (batch, relabelled):
        method.load_state_dict(torch.load(saved, weights_only=False))
        saved.seek(0)
        method.train_step(b, None)
        results.append(state_tensors(method.state_dict()))
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])
    out = method.per_sample_outputs(batch)
    assert out["filtered"].tolist() == flags[:BATCH].tolist()


def test_walking_two_rounds_lowers_the_loss(tmp_path: Path) -> None:
    """2 rounds x 3 epochs x 8 steps, 30% flipped labels: the training loss falls within each round, and
    the evaluated model (the teacher) and the student end far better on clean held-out data."""
    data = toy_batch(NUM_TRAIN, noise=0.3, seed=4)
    held_out = toy_batch(256, noise=0.0, seed=6, first_id=10_000)
    params = {"rounds": 2, "start_iter": 4, "mid_iter": 12, "ema_decay_warmup": 0.9, "ema_decay": 0.95}
    method = build(tmp_path, params, epochs=3, steps_per_epoch=8)  # a teacher that can keep up in 48 steps

    def clean_loss(net: nn.Module) -> float:
        with torch.no_grad():
            return float(F.cross_entropy(net(held_out.x)[0], held_out.true_y))

    before = clean_loss(method.eval_model())
    logs = walk(method, data, 8)
    assert [log["stage"] for log in logs] == ["round0"] * 3 + ["round1"] * 3
    losses = [float(log["loss"]) for log in logs]
    assert all(np.isfinite(losses))
    assert losses[2] < losses[0] and losses[5] < losses[3] < losses[0]
    assert method.eval_model() is method.teacher
    assert clean_loss(method.teacher) < 0.5 * before and clean_loss(method.main.net) < 0.5 * before


# ---- checkpoints ---------------------------------------------------------------------------------------


def test_state_dict_round_trip_continues_bit_for_bit(tmp_path: Path) -> None:
    data = toy_batch(NUM_TRAIN, noise=0.4, seed=1)
    params = {"rounds": 2, "filter_disagreeing": True, "start_iter": 1, "mid_iter": 3}
    original = build(tmp_path, params, epochs=1, train=data)
    stages = original.stages(original.ctx.cfg)
    walk(original, data, 3)  # round 0, then round 1 (mentor, filter) 3 steps in: mid-ramp
    resumed = build(
        tmp_path, params, seed=123, epochs=1, train=data
    )  # a different init: the load does it all
    resumed.load_state_dict(torch.load(state_bytes(original), weights_only=False))
    store, copy = original.ctx.sample_store, resumed.ctx.sample_store  # the loop checkpoints the store itself
    copy.scatter(FILTER_COLUMN, store.sample_ids, store.gather(FILTER_COLUMN, store.sample_ids))
    assert resumed.on_stage_start(stages[-1], None) == {}
    resumed.on_epoch_start(1)
    for method in (original, resumed):
        for step in range(3, 6):
            method.train_step(rows(data, slice(step * BATCH, (step + 1) * BATCH)), None)
    a, b = state_tensors(original.state_dict()), state_tensors(resumed.state_dict())
    assert a.keys() == b.keys() and len(a) > 0
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ---- BatchNorm, export, config -------------------------------------------------------------------------


def test_running_statistics_move_once_per_forward_and_the_export_is_the_teachers(tmp_path: Path) -> None:
    method = build(tmp_path, {"start_iter": 1}, model="small-cnn")
    data = toy_batch(2 * BATCH, noise=0.3, seed=7)
    student = [m for m in method.main.net.modules() if isinstance(m, nn.BatchNorm2d)]
    teacher = [m for m in method.teacher.modules() if isinstance(m, nn.BatchNorm2d)]
    assert method.eval_model() is method.main.net
    method.train_step(rows(data, slice(0, BATCH)), None)  # warm-up CE step
    method.train_step(rows(data, slice(BATCH, 2 * BATCH)), None)  # meta step
    assert [int(m.num_batches_tracked) for m in student] == [2] * len(student)
    # The teacher is the student's copy at its first meta step (1 forward), then its own forward.
    assert [int(m.num_batches_tracked) for m in teacher] == [2] * len(teacher)
    assert method.eval_model() is method.teacher
    batch = rows(data, slice(0, 6))
    out = method.per_sample_outputs(batch)
    with torch.no_grad():
        method.teacher.eval()
        expected = F.softmax(method.teacher(batch.x)[0], dim=1)
        method.teacher.train()
    assert out["corrected_label"].tolist() == expected.argmax(1).tolist()
    np.testing.assert_allclose(out["soft_label"], expected.numpy(), rtol=1e-5)
    assert out["sample_id"].tolist() == list(range(6)) and "filtered" not in out
    assert method.teacher.training and method.main.net.training


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("synthetic_sets=0", "synthetic_sets"),
        ("perturb_ratio=1.5", "perturb_ratio"),
        ("neighbors=0", "neighbors"),
        ("neighbors=64", "neighbors"),  # the digits preset's global batch is 64
        ("inner_lr=0", "inner_lr"),
        ("mid_iter=10", "mid_iter"),  # below start_iter (the preset's 40)
        ("ema_decay=1.5", "ema_decay"),
        ("rounds=0", "rounds"),
        ("filter_disagreeing=true", "filter_disagreeing"),  # with one round
        ("vmap=maybe", "vmap"),
    ],
)
def test_bad_params_fail_before_training(tmp_path: Path, override: str, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        resolve_config(
            "digits", "mlnt", flags={"run.output": str(tmp_path)}, overrides=[f"method.params.{override}"]
        )
    assert info.value.field == f"method.params.{field}"
    if field != "vmap":  # a config that passed only the schema check is refused by the method itself
        cfg = load_config(
            "digits", "mlnt", flags={"run.output": str(tmp_path)}, overrides=[f"method.params.{override}"]
        )
        with pytest.raises(ConfigError) as info:
            build_method(method_context(cfg, num_classes=4, in_channels=1, image_size=SIDE, steps_per_epoch=4,
                                        num_train=NUM_TRAIN, num_trusted=0))  # fmt: skip
        assert info.value.field == f"method.params.{field}"
