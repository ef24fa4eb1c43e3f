"""CE, clean-only CE and GLC driven directly, without Ray: the method contract and GLC's two phases."""

import io

import torch

from raynoisy.config import load_config
from raynoisy.methods import Batch, MethodContext, get_method_class


def _context(tmp_path, method: str, trusted_batches=None, **overrides) -> MethodContext:
    sets = [f"{k}={v}" for k, v in overrides.items()]
    cfg = load_config(
        "digits", method, flags={"run.output": str(tmp_path), "optim.epochs": 2}, overrides=sets
    )
    return MethodContext(
        cfg=cfg,
        num_classes=3,
        in_channels=1,
        image_size=8,
        device=torch.device("cpu"),
        rank=0,
        world_size=1,
        steps_per_epoch=20,
        num_train=1280,
        num_trusted=60,
        iter_trusted_pass=(lambda: iter(trusted_batches)) if trusted_batches is not None else None,
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


def test_ce_learns_and_round_trips(tmp_path):
    method = get_method_class("ce")(_context(tmp_path, "ce"))
    losses = [method.train_step(_batch(64, i), None)["loss"] for i in range(20)]
    assert losses[-1] < losses[0] / 2
    clone = get_method_class("ce")(_context(tmp_path, "ce"))
    # Through bytes, as a checkpoint would: a live state dict shares momentum buffers with the optimizer.
    clone.load_state_dict(_through_bytes(method.state_dict()))
    batch = _batch(64, 99)
    method.train_step(batch, None)
    clone.train_step(batch, None)
    for a, b in zip(method.eval_model().parameters(), clone.eval_model().parameters(), strict=True):
        assert torch.equal(a, b)


def test_ce_clean_reads_the_trusted_stream():
    cls = get_method_class("ce-clean")
    assert cls.needs_trusted and cls.epoch_source == "trusted"


def test_glc_estimates_the_flip_matrix_and_restarts(tmp_path):
    trusted = [_batch(60, 1000 + i) for i in range(3)]
    ctx = _context(tmp_path, "glc", trusted_batches=trusted)
    glc = get_method_class("glc")(ctx)
    assert glc.total_epochs() == 4 and not glc.selectable(1) and glc.selectable(2)
    assert 1 <= glc.trusted_batch_size() < ctx.local_batch_size  # in proportion to 60 trusted vs 1,280 noisy
    initial = {k: v.clone() for k, v in glc.eval_model().state_dict().items()}
    for i in range(60):  # phase 1 on labels flipped c -> c+1 for 40% of samples
        glc.train_step(_batch(64, i, flip=0.4), None)
    stats = glc.on_epoch_end(1)
    c = glc.corruption
    assert c is not None and torch.allclose(c.sum(1), torch.ones(3), atol=1e-5)
    # The phase-1 model predicts the noisy label distribution: ~0.6 on the diagonal, ~0.4 on c -> c+1.
    for k in range(3):
        assert 0.4 < c[k, k] < 0.85 and 0.15 < c[k, (k + 1) % 3] < 0.55
    assert 0.15 < stats["glc_estimated_flip_rate"] < 0.55
    for key, value in glc.eval_model().state_dict().items():
        assert torch.equal(value, initial[key]), key  # phase 2 starts from the initial weights
    assert glc.current_lr() == ctx.cfg.optim.lr  # with a fresh schedule
    out = glc.train_step(_batch(64, 500, flip=0.4), _batch(4, 501))
    assert "gold_loss" in out
    resumed = get_method_class("glc")(ctx)
    resumed.load_state_dict(_through_bytes(glc.state_dict()))
    assert torch.equal(resumed.corruption, glc.corruption)
