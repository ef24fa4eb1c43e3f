"""The baselines (ce, ce-clean, ce-all, glc) driven directly, without Ray: the method contract, GLC's stages.

Methods are built and driven with ``raynoisy.train.harness``, the hooks in the Ray Train loop's order.
"""

import copy
import io

import pytest
import torch
import torch.nn.functional as F

from raynoisy.data.batch import Batch
from raynoisy.methods import get_method_class
from raynoisy.methods.base import Method, MethodContext, Stage
from raynoisy.train.harness import build_method, method_context, start_stage, walk_stages
from raynoisy.train.preflight import resolve_config

STEPS = 20  # steps per epoch of every context here


def _context(tmp_path, method: str, trusted_batches=None, **overrides) -> MethodContext:
    sets = [f"{k}={v}" for k, v in overrides.items()]
    cfg = resolve_config(
        "digits", method, flags={"run.output": str(tmp_path), "optim.epochs": 2}, overrides=sets
    )
    return method_context(
        cfg,
        num_classes=3,
        in_channels=1,
        image_size=8,
        steps_per_epoch=STEPS,
        num_train=1280,
        num_trusted=60,
        splits=None if trusted_batches is None else {"trusted": trusted_batches},
    )


def _batch(n: int, seed: int, flip: float = 0.0) -> Batch:
    """Three classes, each a bright 4x4 quadrant; a fraction ``flip`` of labels moved to the next class."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    x = 0.3 * torch.randn(n, 1, 8, 8, generator=g)
    for c in range(3):
        x[y == c, :, (c // 2) * 4 : (c // 2) * 4 + 4, (c % 2) * 4 : (c % 2) * 4 + 4] += 2.0
    given = torch.where(torch.rand(n, generator=g) < flip, (y + 1) % 3, y)
    return Batch(x=x, y=given, sample_id=torch.arange(n), true_y=y)


def _through_bytes(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def _record_steps(method: Method) -> list[tuple[int, int | None]]:
    """Wrap ``train_step`` to record each step's (batch size, trusted batch size or None)."""
    steps: list[tuple[int, int | None]] = []
    step = method.train_step

    def recording(batch: Batch, trusted: Batch | None) -> dict[str, float]:
        steps.append((len(batch), None if trusted is None else len(trusted)))
        return step(batch, trusted)

    method.train_step = recording  # type: ignore[method-assign]
    return steps


def test_ce_learns_and_round_trips(tmp_path):
    ctx = _context(tmp_path, "ce")
    method = build_method(ctx)
    (stage,) = method.stages(ctx.cfg)
    assert stage == Stage("train", 2) and method.trusted_batch_size(stage) == 0
    losses = [method.train_step(_batch(64, i), None)["loss"] for i in range(20)]
    assert losses[-1] < losses[0] / 2
    clone = build_method(_context(tmp_path, "ce"))
    # Through bytes, as a checkpoint would: a live state dict shares momentum buffers with the optimizer.
    clone.load_state_dict(_through_bytes(method.state_dict()))
    batch = _batch(64, 99)
    method.train_step(batch, None)
    clone.train_step(batch, None)
    for a, b in zip(method.eval_model().parameters(), clone.eval_model().parameters(), strict=True):
        assert torch.equal(a, b)


def test_ce_walks_a_run_without_a_trusted_set(tmp_path):
    """``--clean-per-class 0``: no trusted split (num_trusted 0, no trusted batches); CE asks for none."""
    cfg = resolve_config(
        "digits", "ce", flags={"run.output": str(tmp_path), "optim.epochs": 2, "split.clean_per_class": 0}
    )
    ctx = method_context(
        cfg, num_classes=3, in_channels=1, image_size=8, steps_per_epoch=4, num_train=256, num_trusted=0
    )
    method = build_method(ctx)
    steps = _record_steps(method)
    logs = walk_stages(method, lambda stage, epoch: [_batch(64, 4 * epoch + i) for i in range(4)])
    assert steps == [(64, None)] * 8 and [log["stage"] for log in logs] == ["train", "train"]
    assert logs[-1]["loss"] < logs[0]["loss"]


def test_ce_clean_reads_the_trusted_stream(tmp_path):
    """One stage on the trusted stream: every step a full trusted batch as ``batch``, None as ``trusted``,
    as many steps per epoch as a noisy epoch has."""
    cls = get_method_class("ce-clean")
    assert cls.needs_trusted
    ctx = _context(tmp_path, "ce-clean")
    method = build_method(ctx)
    (stage,) = method.stages(ctx.cfg)
    assert stage == Stage("train", 2, trains_on="trusted", selectable=True)
    assert method.trusted_batch_size(stage) == ctx.local_batch_size
    steps = _record_steps(method)

    def no_noisy_batches(stage: Stage, epoch: int) -> list[Batch]:
        raise AssertionError("ce-clean must not read the noisy stream")

    logs = walk_stages(method, no_noisy_batches, trusted=lambda n: _batch(n, seed=len(steps)))
    assert steps == [(ctx.local_batch_size, None)] * (2 * STEPS)
    assert [log["stage"] for log in logs] == ["train", "train"]
    assert logs[-1]["loss"] < logs[0]["loss"]


def test_glc_estimates_the_flip_matrix_and_restarts(tmp_path):
    trusted = [_batch(60, 1000 + i) for i in range(3)]
    ctx = _context(tmp_path, "glc", trusted_batches=trusted)
    glc = build_method(ctx)
    stages = glc.stages(ctx.cfg)
    assert [(s.name, s.epochs, s.trains_on, s.selectable, s.init_from_best) for s in stages] == [
        ("noisy", 2, "train", False, False),  # phase 1 models are never the reported model
        ("corrected", 2, "train", True, False),
    ]
    noisy, corrected = stages
    assert glc.trusted_batch_size(noisy) == 0  # phase 1 reads no trusted batches
    # phase 2: in proportion to 60 trusted vs 1,280 noisy
    assert 1 <= glc.trusted_batch_size(corrected) < ctx.local_batch_size
    initial = {k: v.clone() for k, v in glc.eval_model().state_dict().items()}
    assert start_stage(glc, "noisy") == noisy and glc.corruption is None
    for i in range(60):  # phase 1 on labels flipped c -> c+1 for 40% of samples
        glc.train_step(_batch(64, i, flip=0.4), None)
    assert glc.on_epoch_end(1) == {} and glc.corruption is None  # the switch is the stage's, not an epoch's
    phase1 = {k: v.clone() for k, v in glc.eval_model().state_dict().items()}
    stats = glc.on_stage_start(corrected, phase1)
    c = glc.corruption
    assert c is not None and torch.allclose(c.sum(1), torch.ones(3), atol=1e-5)
    # The phase-1 model predicts the noisy label distribution: ~0.6 on the diagonal, ~0.4 on c -> c+1.
    for k in range(3):
        assert 0.4 < c[k, k] < 0.85 and 0.15 < c[k, (k + 1) % 3] < 0.55
    assert stats.keys() == {"glc_estimated_flip_rate"}
    assert stats["glc_estimated_flip_rate"] == pytest.approx(1 - float(torch.diagonal(c).mean()))
    assert 0.15 < stats["glc_estimated_flip_rate"] < 0.55
    for key, value in glc.eval_model().state_dict().items():
        assert torch.equal(value, initial[key]), key  # phase 2 starts from the initial weights
    assert glc.current_lr() == ctx.cfg.optim.lr  # with a fresh schedule
    assert not glc.main.optimizer.state  # and fresh optimizer state (no phase-1 momentum)
    out = glc.train_step(_batch(64, 500, flip=0.4), _batch(4, 501))
    assert "gold_loss" in out
    resumed = build_method(ctx)
    resumed.load_state_dict(_through_bytes(glc.state_dict()))
    assert torch.equal(resumed.corruption, glc.corruption)
    # Resumed at the start of phase 2, the stage hook must neither estimate again nor reset the weights.
    weights = {k: v.clone() for k, v in resumed.eval_model().state_dict().items()}
    assert resumed.on_stage_start(corrected, phase1) == {}
    assert torch.equal(resumed.corruption, glc.corruption)
    for key, value in resumed.eval_model().state_dict().items():
        assert torch.equal(value, weights[key]), key


def test_glc_walks_its_stages_like_the_loop(tmp_path):
    """Through the harness: phase 1 steps without trusted batches, C estimated once at the phase change and
    logged with phase 2's first epoch, phase 2 steps with trusted batches of the method's size."""
    trusted = [_batch(60, 1000 + i) for i in range(3)]
    ctx = _context(tmp_path, "glc", trusted_batches=trusted)
    glc = build_method(ctx)
    corrected = glc.stages(ctx.cfg)[1]
    steps = _record_steps(glc)
    logs = walk_stages(
        glc,
        lambda stage, epoch: [_batch(64, 100 * epoch + i, flip=0.4) for i in range(STEPS)],
        trusted=lambda n: _batch(n, seed=10_000 + len(steps)),
    )
    size = glc.trusted_batch_size(corrected)
    assert steps == [(64, None)] * (2 * STEPS) + [(64, size)] * (2 * STEPS)
    assert [log["stage"] for log in logs] == ["noisy", "noisy", "corrected", "corrected"]
    assert ["glc_estimated_flip_rate" in log for log in logs] == [False, False, True, False]
    assert 0.15 < logs[2]["glc_estimated_flip_rate"] < 0.55
    assert glc.corruption is not None


def test_ce_all_takes_one_cross_entropy_step_on_the_noisy_and_trusted_batches(tmp_path):
    """ce-all: a trusted share in proportion to the set sizes beside every noisy batch, and its step is the
    cross-entropy step of an independent copy of the model on the two batches concatenated."""
    cls = get_method_class("ce-all")
    assert cls.needs_trusted
    ctx = _context(tmp_path, "ce-all")
    method = build_method(ctx)
    (stage,) = method.stages(ctx.cfg)
    expected_share = round(ctx.local_batch_size * 60 / (1280 + 60))
    assert method.trusted_batch_size(stage) == expected_share == ctx.proportional_trusted_batch >= 1
    noisy, trusted = _batch(ctx.local_batch_size, seed=1, flip=0.4), _batch(expected_share, seed=2)
    reference = copy.deepcopy(method.main.net)
    optimizer = torch.optim.SGD(
        reference.parameters(),
        lr=ctx.cfg.optim.lr,
        momentum=ctx.cfg.optim.momentum,
        weight_decay=ctx.cfg.optim.weight_decay,
    )
    loss = F.cross_entropy(reference(torch.cat([noisy.x, trusted.x]))[0], torch.cat([noisy.y, trusted.y]))
    loss.backward()
    optimizer.step()
    logged = method.train_step(noisy, trusted)
    assert logged["loss"] == pytest.approx(float(loss.detach()), rel=1e-6)
    for mine, theirs in zip(method.main.net.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)
