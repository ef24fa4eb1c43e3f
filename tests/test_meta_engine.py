"""The bilevel engine against a slow, obvious implementation and against finite differences (float64).

The slow reference deep-copies the model, replaces its weights by non-leaf tensors computed with plain
arithmetic (the MW-Net ``MetaModule`` way) and differentiates with ordinary autograd; it shares no code
with ``raynoisy.meta`` beyond the loss definitions below.
"""

from __future__ import annotations

import copy
import io
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from raynoisy.meta import (
    BNPolicy,
    MLCHypergradAccumulator,
    functional_forward,
    identity_hessian_discount,
    lookahead,
    lookahead_hypergrad,
    mlc_hypergrad,
    update_rules,
)
from raynoisy.meta.output_hypergrad import (
    OutputHypergradient,
    OutputLoss,
    example_alignment,
    logit_gradient,
    output_grads,
    output_hypergrad,
)

CLASSES = 3
BATCH = 6
Forward = Callable[[Tensor], tuple[Tensor, Tensor]]


class MLP(nn.Module):
    feature_dim = 5

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, self.feature_dim), nn.Tanh())
        self.head = nn.Linear(self.feature_dim, CLASSES)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.body(x)
        return self.head(h), h

    @staticmethod
    def inputs(n: int) -> Tensor:
        return torch.randn(n, 4, dtype=torch.float64)


class ConvBN(nn.Module):
    """Smooth activations so that central differences see no kinks."""

    feature_dim = 3

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, self.feature_dim, 3, padding=1)
        self.bn = nn.BatchNorm2d(self.feature_dim)
        self.head = nn.Linear(self.feature_dim, CLASSES)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = F.silu(self.bn(self.conv(x))).mean(dim=(2, 3))
        return self.head(h), h

    @staticmethod
    def inputs(n: int) -> Tensor:
        return torch.randn(n, 2, 4, 4, dtype=torch.float64)


class WeightNet(nn.Module):
    """MW-Net style: per-sample loss -> weight in (0, 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(1, 4), nn.Tanh(), nn.Linear(4, 1), nn.Sigmoid())

    def forward(self, losses: Tensor) -> Tensor:
        return self.net(losses.unsqueeze(1)).squeeze(1)


class LabelCorrector(nn.Module):
    """MLC style: (detached features, noisy label) -> soft label."""

    def __init__(self, feature_dim: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(CLASSES, 2)
        self.net = nn.Sequential(nn.Linear(feature_dim + 2, 4), nn.Tanh(), nn.Linear(4, CLASSES))

    def forward(self, features: Tensor, labels: Tensor) -> Tensor:
        return F.softmax(self.net(torch.cat([features, self.embed(labels)], dim=1)), dim=1)


def train_loss(
    meta: nn.Module, forward: Forward, x: Tensor, y: Tensor, pin: Callable[[Tensor], Tensor] = lambda t: t
) -> Tensor:
    """The meta-net's input is detached, as in the references; ``pin`` lets finite differences hold it."""
    logits, features = forward(x)
    if isinstance(meta, WeightNet):
        losses = F.cross_entropy(logits, y, reduction="none")
        return (meta(pin(losses.detach())) * losses).mean()
    soft = meta(pin(features.detach()), y)
    return -(soft * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def gold_loss(forward: Forward, x: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(forward(x)[0], y)


@dataclass
class Problem:
    model: nn.Module
    optimizer: torch.optim.SGD
    meta: nn.Module
    batches: list[tuple[Tensor, Tensor]]
    gold: tuple[Tensor, Tensor]
    pinned: dict[int, Tensor] | None = None

    def inner(self, params: dict[str, Tensor], step: int) -> Tensor:
        return train_loss(
            self.meta,
            lambda x: functional_forward(self.model, params, x),
            *self.batches[step],
            pin=lambda t: self._pin(step, t),
        )

    def _pin(self, step: int, meta_input: Tensor) -> Tensor:
        """While ``pinned`` is a dict, the first value seen per step is replayed afterwards."""
        return meta_input if self.pinned is None else self.pinned.setdefault(step, meta_input)

    def outer(self, params: dict[str, Tensor]) -> Tensor:
        return gold_loss(lambda x: functional_forward(self.model, params, x), *self.gold)


def make_problem(model_cls: type, meta_kind: str, *, nesterov: bool, warm: bool = True) -> Problem:
    """Two param groups (one with dampening when nesterov is off), a frozen parameter in the MLP, and
    momentum buffers from one real step for every parameter except the head bias (``warm``)."""
    torch.manual_seed(0)
    model = model_cls().double().train()
    if model_cls is MLP:
        model.body[0].bias.requires_grad_(False)
    meta = (WeightNet() if meta_kind == "weight" else LabelCorrector(model_cls.feature_dim)).double()
    head = list(model.head.parameters())
    rest = [p for name, p in model.named_parameters() if not name.startswith("head.")]
    optimizer = torch.optim.SGD(
        [
            {"params": rest},
            {"params": head, "lr": 0.05, "weight_decay": 1e-3, "dampening": 0 if nesterov else 0.1},
        ],
        lr=0.1,
        momentum=0.9,
        weight_decay=5e-4,
        nesterov=nesterov,
    )
    if warm:
        for name, p in model.named_parameters():
            p.grad = torch.randn_like(p) if p.requires_grad and name != "head.bias" else None
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    batches = [(model_cls.inputs(BATCH), torch.randint(0, CLASSES, (BATCH,))) for _ in range(3)]
    gold = (model_cls.inputs(BATCH), torch.randint(0, CLASSES, (BATCH,)))
    return Problem(model, optimizer, meta, batches, gold)


def _set_weight(module: nn.Module, dotted: str, value: Tensor) -> None:
    *path, leaf = dotted.split(".")
    for part in path:
        module = getattr(module, part)
    module._parameters.pop(leaf, None)
    setattr(module, leaf, value)


def slow_hypergrad(
    problem: Problem, steps: int, *, second_order: bool = True, wrt_model: bool = False
) -> list[Tensor]:
    """The obvious version: a model copy whose weights are overwritten step by step, ordinary autograd."""
    model = copy.deepcopy(problem.model)
    original = dict(problem.model.named_parameters())
    names_of = {id(p): n for n, p in original.items()}
    groups = {
        names_of[id(p)]: g for g in problem.optimizer.param_groups for p in g["params"] if p.requires_grad
    }
    buffers = {
        n: problem.optimizer.state[original[n]]["momentum_buffer"].clone()
        for n in groups
        if "momentum_buffer" in problem.optimizer.state.get(original[n], {})
    }
    weights = {n: p for n, p in model.named_parameters() if n in groups}
    initial = list(weights.values())
    for step in range(steps):
        loss = train_loss(problem.meta, model, *problem.batches[step])
        grads = torch.autograd.grad(loss, list(weights.values()), create_graph=second_order)
        for (name, w), g in zip(list(weights.items()), grads, strict=True):
            group = groups[name]
            d = g + group["weight_decay"] * w
            if name in buffers:
                buffers[name] = group["momentum"] * buffers[name] + (1 - group["dampening"]) * d
            else:
                buffers[name] = d
            d = d + group["momentum"] * buffers[name] if group["nesterov"] else buffers[name]
            weights[name] = w - group["lr"] * d
            _set_weight(model, name, weights[name])
    loss = gold_loss(model, *problem.gold)
    return list(torch.autograd.grad(loss, initial if wrt_model else list(problem.meta.parameters())))


def finite_differences(problem: Problem, steps: int, eps: float = 1e-5) -> list[Tensor]:
    """Central differences of the outer loss with the meta-net's detached inputs held at their nominal
    values: from the second inner step on they depend on α, but autograd (and the references) treat
    them as constants, so that is the function whose gradient the engine computes."""

    def value() -> float:
        fast = lookahead(problem.model, problem.optimizer, problem.inner, steps=steps, create_graph=False)
        return problem.outer(fast).item()

    problem.pinned = {}
    value()
    grads = []
    for p in problem.meta.parameters():
        grad, flat, original = torch.zeros_like(p), p.data.view(-1), p.detach().clone().view(-1)
        for i in range(p.numel()):
            flat[i] = original[i] + eps
            plus = value()
            flat[i] = original[i] - eps
            minus = value()
            flat[i] = original[i]
            grad.view(-1)[i] = (plus - minus) / (2 * eps)
        grads.append(grad)
    problem.pinned = None
    return grads


def rel_err(actual: list[Tensor], expected: list[Tensor]) -> float:
    a = torch.cat([t.reshape(-1) for t in actual])
    b = torch.cat([t.reshape(-1) for t in expected])
    return ((a - b).norm() / b.norm()).item()


def snapshot(problem: Problem) -> dict[str, Any]:
    return {
        "model": copy.deepcopy(problem.model.state_dict()),
        "optimizer": copy.deepcopy(problem.optimizer.state_dict()),
        "meta": copy.deepcopy(problem.meta.state_dict()),
    }


def assert_bit_identical(a: Any, b: Any) -> None:
    if isinstance(a, Tensor):
        assert isinstance(b, Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys()
        for key in a:
            assert_bit_identical(a[key], b[key])
    elif isinstance(a, list | tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_bit_identical(x, y)
    else:
        assert a == b


# --- the virtual step is torch.optim.SGD's step -------------------------------------------------------

SGD_SETTINGS = [
    {"momentum": 0.0},
    {"momentum": 0.0, "weight_decay": 5e-4},
    {"momentum": 0.9, "weight_decay": 5e-4},
    {"momentum": 0.9, "weight_decay": 5e-4, "dampening": 0.3},
    {"momentum": 0.9, "weight_decay": 5e-4, "nesterov": True},
    {"momentum": 0.9, "nesterov": True, "maximize": True},
    {"momentum": 0.9, "weight_decay": 5e-4, "dampening": 0.3, "maximize": True},
]


@pytest.mark.parametrize("with_buffer", [False, True])
@pytest.mark.parametrize("settings", SGD_SETTINGS)
def test_virtual_step_is_torch_sgd_step(settings: dict, with_buffer: bool) -> None:
    problem = make_problem(MLP, "weight", nesterov=False, warm=False)
    model = problem.model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, **settings)

    def real_step(step: int) -> None:
        problem.inner(dict(model.named_parameters()), step).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    if with_buffer:
        real_step(1)
    fast = lookahead(model, optimizer, problem.inner, create_graph=False)
    real_step(0)
    for name, p in model.named_parameters():
        assert torch.equal(fast[name], p), name


def test_k_virtual_steps_are_k_real_steps() -> None:
    problem = make_problem(ConvBN, "label", nesterov=True)
    fast = lookahead(problem.model, problem.optimizer, problem.inner, steps=3, create_graph=False)
    for step in range(3):
        problem.inner(dict(problem.model.named_parameters()), step).backward()
        problem.optimizer.step()
        problem.optimizer.zero_grad(set_to_none=True)
    for name, p in problem.model.named_parameters():
        torch.testing.assert_close(fast[name], p, rtol=0, atol=1e-12)


def test_sgd_plain_rule_and_lr_override() -> None:
    """MetaLabelNet's θ' = θ - 1·g and MW-Net's momentum-free step at the scheduled lr."""
    problem = make_problem(MLP, "weight", nesterov=True)
    params = {n: p for n, p in problem.model.named_parameters() if p.requires_grad}
    grads = dict(
        zip(params, torch.autograd.grad(problem.inner(params, 0), list(params.values())), strict=True)
    )
    for optimizer, lr, body_lr, head_lr in [(None, 1.0, 1.0, 1.0), (problem.optimizer, None, 0.1, 0.05)]:
        fast = lookahead(problem.model, optimizer, problem.inner, rule="sgd-plain", lr=lr, create_graph=False)
        for name, p in params.items():
            step_lr = head_lr if name.startswith("head.") else body_lr
            torch.testing.assert_close(fast[name], p - step_lr * grads[name], rtol=0, atol=1e-15)
    assert fast["body.0.bias"] is problem.model.body[0].bias


def test_update_rules_refuse_what_they_cannot_reproduce() -> None:
    model = MLP().double()
    with pytest.raises(ValueError, match="sgd-plain"):
        update_rules(model, None)
    with pytest.raises(TypeError, match="Adam"):
        update_rules(model, torch.optim.Adam(model.parameters()))
    with pytest.raises(ValueError, match="rule"):
        update_rules(model, torch.optim.SGD(model.parameters(), lr=0.1), rule="adam")


# --- hypergradients ---------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("meta_kind", ["weight", "label"])
@pytest.mark.parametrize("model_cls", [MLP, ConvBN])
def test_hypergrad_matches_slow_reference_and_finite_differences(
    model_cls: type, meta_kind: str, nesterov: bool, steps: int
) -> None:
    problem = make_problem(model_cls, meta_kind, nesterov=nesterov)
    before = snapshot(problem)
    result = lookahead_hypergrad(
        problem.model,
        problem.optimizer,
        problem.inner,
        problem.outer,
        list(problem.meta.parameters()),
        steps=steps,
    )
    assert_bit_identical(snapshot(problem), before)
    assert all(p.grad is None for p in [*problem.model.parameters(), *problem.meta.parameters()])

    assert rel_err(result.meta_grads, slow_hypergrad(problem, steps)) < 1e-6
    assert rel_err(result.meta_grads, finite_differences(problem, steps)) < 1e-6
    fast = lookahead(problem.model, problem.optimizer, problem.inner, steps=steps, create_graph=False)
    assert result.outer_loss.item() == pytest.approx(problem.outer(fast).item(), rel=1e-12)


@pytest.mark.parametrize("model_cls", [MLP, ConvBN])
def test_first_order_treats_inner_gradients_as_constants(model_cls: type) -> None:
    """Meta parameters = the model's own weights (MLNT): first order keeps only w - lr·(g + wd·w ...)."""
    problem = make_problem(model_cls, "label", nesterov=True)
    weights = [p for p in problem.model.parameters() if p.requires_grad]
    first = lookahead_hypergrad(
        problem.model, problem.optimizer, problem.inner, problem.outer, weights, steps=3, create_graph=False
    )
    second = lookahead_hypergrad(
        problem.model, problem.optimizer, problem.inner, problem.outer, weights, steps=3
    )
    assert rel_err(first.meta_grads, slow_hypergrad(problem, 3, second_order=False, wrt_model=True)) < 1e-10
    assert rel_err(second.meta_grads, slow_hypergrad(problem, 3, wrt_model=True)) < 1e-10
    assert rel_err(first.meta_grads, second.meta_grads) > 1e-6

    meta_only = lookahead_hypergrad(
        problem.model,
        problem.optimizer,
        problem.inner,
        problem.outer,
        list(problem.meta.parameters()),
        create_graph=False,
    )
    assert all(torch.count_nonzero(g) == 0 for g in meta_only.meta_grads)


def _independent_coefficient(group: dict, has_buffer: bool) -> float:
    """dw'/dg_s = -c·I from the SGD equations: fresh buffer = d; else m·buf + (1 - τ)·d."""
    carried = 1 - group["dampening"] if has_buffer else 1.0
    return group["lr"] * (1 + group["momentum"] * carried if group["nesterov"] else carried)


@pytest.mark.parametrize("warm", [False, True])
@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("model_cls", [MLP, ConvBN])
def test_mlc_proxy_is_the_exact_one_step_hypergradient(model_cls: type, nesterov: bool, warm: bool) -> None:
    problem = make_problem(model_cls, "label", nesterov=nesterov, warm=warm)
    meta_params = list(problem.meta.parameters())
    before = snapshot(problem)
    result = mlc_hypergrad(
        problem.model,
        problem.optimizer,
        lambda p: problem.inner(p, 0),
        problem.outer,
        meta_params,
        with_discount=True,
    )
    assert_bit_identical(snapshot(problem), before)
    assert all(p.grad is None for p in [*problem.model.parameters(), *meta_params])

    exact = lookahead_hypergrad(problem.model, problem.optimizer, problem.inner, problem.outer, meta_params)
    assert rel_err(result.meta_grads, exact.meta_grads) < 1e-6
    assert result.gold_loss_after.item() == pytest.approx(exact.outer_loss.item(), rel=1e-12)

    params = dict(problem.model.named_parameters())
    names = [n for n, p in params.items() if p.requires_grad]
    weights = [params[n] for n in names]
    train = problem.inner(params, 0)
    assert result.train_loss.item() == pytest.approx(train.item(), rel=1e-12)
    for name, g in zip(names, torch.autograd.grad(train, weights), strict=True):
        torch.testing.assert_close(result.train_grads[name], g, rtol=0, atol=1e-14)

    gw = torch.autograd.grad(problem.outer(params), weights)
    fast = lookahead(problem.model, problem.optimizer, problem.inner, create_graph=False)
    gw_after = torch.autograd.grad(problem.outer(fast), [fast[n] for n in names])
    state = problem.optimizer.state
    group_of = {id(p): g for g in problem.optimizer.param_groups for p in g["params"]}
    coefficients = [
        _independent_coefficient(group_of[id(params[n])], "momentum_buffer" in state.get(params[n], {}))
        for n in names
    ]
    num = sum(
        (1 - c) * torch.dot(a.reshape(-1), b.reshape(-1))
        for a, b, c in zip(gw_after, gw, coefficients, strict=True)
    )
    den = sum(torch.dot(b.reshape(-1), b.reshape(-1)) for b in gw)
    assert result.discount is not None and result.gold_grads is not None
    assert result.discount.item() == pytest.approx((num / den).item(), rel=1e-10)
    assert rel_err(list(result.gold_grads.values()), list(gw)) < 1e-12


def test_mlc_without_discount_skips_the_gold_gradient_at_w() -> None:
    problem = make_problem(MLP, "label", nesterov=False)
    result = mlc_hypergrad(
        problem.model,
        problem.optimizer,
        lambda p: problem.inner(p, 0),
        problem.outer,
        list(problem.meta.parameters()),
    )
    assert result.gold_grads is None and result.discount is None


def test_discount_is_zero_for_a_zero_gold_gradient() -> None:
    zero = [torch.zeros(3, dtype=torch.float64)]
    assert identity_hessian_discount(zero, [torch.ones(3, dtype=torch.float64)], [0.1]).item() == 0.0


# --- BatchNorm policy -------------------------------------------------------------------------------


def test_default_bn_policy_leaves_buffers_bit_identical() -> None:
    problem = make_problem(ConvBN, "weight", nesterov=False)
    buffers = {n: b.clone() for n, b in problem.model.named_buffers()}
    result = lookahead_hypergrad(
        problem.model,
        problem.optimizer,
        problem.inner,
        problem.outer,
        list(problem.meta.parameters()),
        steps=3,
    )
    fast = lookahead(problem.model, problem.optimizer, problem.inner)
    functional_forward(problem.model, fast, problem.gold[0])
    assert result.meta_grads[0].abs().sum() > 0
    assert_bit_identical(dict(problem.model.named_buffers()), buffers)


def test_update_bn_policy_updates_the_real_buffers() -> None:
    problem = make_problem(ConvBN, "weight", nesterov=False)
    running_mean = problem.model.bn.running_mean.clone()
    tracked = int(problem.model.bn.num_batches_tracked)
    fast = dict(problem.model.named_parameters())
    functional_forward(problem.model, fast, problem.gold[0], bn=BNPolicy.UPDATE)
    functional_forward(problem.model, fast, problem.gold[0], bn="update")
    assert int(problem.model.bn.num_batches_tracked) == tracked + 2
    assert not torch.equal(problem.model.bn.running_mean, running_mean)


# --- MLC K-step accumulation -------------------------------------------------------------------------


def _grads(*values: float) -> list[Tensor]:
    return [torch.tensor([v, 2 * v], dtype=torch.float64) for v in values]


def test_accumulator_reproduces_the_reference_recurrence() -> None:
    """Hand-unrolled mlc.py: grad_t = p_t + γ_t·dw_prev; dw_prev = grad_t; step when (t+1) % K == 0."""
    acc = MLCHypergradAccumulator(every=3)
    p = [_grads(1.0, -1.0), _grads(0.5, 2.0), _grads(-3.0, 0.25), _grads(4.0, 1.0)]
    g2, g3 = 0.7, -0.2

    assert not acc.needs_discount
    first = acc.accumulate(p[0])
    assert not first.step_now
    assert_bit_identical(first.grads, p[0])

    assert acc.needs_discount
    second = acc.accumulate(p[1], g2)
    assert not second.step_now
    expected2 = [p[1][i] + g2 * p[0][i] for i in range(2)]
    assert_bit_identical(second.grads, expected2)

    third = acc.accumulate(p[2], torch.tensor(g3, dtype=torch.float64))
    assert third.step_now
    assert_bit_identical(third.grads, [p[2][i] + g3 * expected2[i] for i in range(2)])

    assert not acc.needs_discount
    fourth = acc.accumulate(p[3])
    assert not fourth.step_now
    assert_bit_identical(fourth.grads, p[3])


def test_accumulator_with_k1_steps_every_time_and_demands_the_discount_mid_window() -> None:
    acc = MLCHypergradAccumulator(every=1)
    for values in (_grads(1.0), _grads(2.0)):
        out = acc.accumulate(values)
        assert out.step_now and not acc.needs_discount
        assert_bit_identical(out.grads, values)
    acc = MLCHypergradAccumulator(every=2)
    acc.accumulate(_grads(1.0))
    with pytest.raises(ValueError, match="discount"):
        acc.accumulate(_grads(1.0))


def test_accumulator_state_dict_round_trip() -> None:
    acc = MLCHypergradAccumulator(every=3)
    acc.accumulate(_grads(1.0, 2.0), 0.5)
    buffer = io.BytesIO()
    torch.save(acc.state_dict(), buffer)
    buffer.seek(0)
    resumed = MLCHypergradAccumulator(every=3)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert resumed.needs_discount
    for step in (_grads(0.5, 0.5), _grads(-1.0, 3.0)):
        assert_bit_identical(resumed.accumulate(step, 0.3), acc.accumulate(step, 0.3))
    with pytest.raises(ValueError, match="K=3"):
        MLCHypergradAccumulator(every=5).load_state_dict(acc.state_dict())


# --- output-space hypergradient (forward-mode JVP) ---------------------------------------------------


def _output_loss(problem: Problem, x: Tensor, y: Tensor) -> OutputLoss:
    """ℓ(logits, features) of batch (x, y): ``train_loss`` with the forward's outputs handed in."""
    return lambda logits, features: train_loss(problem.meta, lambda _: (logits, features), x, y)


def _output_hypergrad(problem: Problem, **options: Any) -> OutputHypergradient:
    """``output_hypergrad`` on the problem's first batch, its gold loss and its meta net."""
    x, y = problem.batches[0]
    meta_params = list(problem.meta.parameters())
    return output_hypergrad(
        problem.model,
        problem.optimizer,
        x,
        _output_loss(problem, x, y),
        problem.outer,
        meta_params,
        **options,
    )


def _clean_half(problem: Problem) -> Callable[[dict[str, Tensor]], Tensor]:
    """r(w): an α-free cross-entropy on another batch, as MLC's clean half."""
    x, y = problem.batches[1]
    return lambda params: F.cross_entropy(functional_forward(problem.model, params, x)[0], y)


@pytest.mark.parametrize("with_rest", [False, True])
@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("meta_kind", ["weight", "label"])
@pytest.mark.parametrize("model_cls", [MLP, ConvBN])
def test_output_hypergrad_is_the_exact_one_step_hypergradient(
    model_cls: type, meta_kind: str, nesterov: bool, with_rest: bool
) -> None:
    problem = make_problem(model_cls, meta_kind, nesterov=nesterov)
    meta_params = list(problem.meta.parameters())
    rest = _clean_half(problem) if with_rest else None

    def inner(params: dict[str, Tensor], step: int) -> Tensor:
        loss = problem.inner(params, 0)
        return loss if rest is None else loss + rest(params)

    exact = lookahead_hypergrad(problem.model, problem.optimizer, inner, problem.outer, meta_params)
    proxy = mlc_hypergrad(
        problem.model,
        problem.optimizer,
        lambda p: inner(p, 0),
        problem.outer,
        meta_params,
        with_discount=True,
    )
    optimizer_state = copy.deepcopy(problem.optimizer.state_dict())
    result = _output_hypergrad(problem, rest_loss=rest, with_discount=True)
    assert_bit_identical(problem.optimizer.state_dict(), optimizer_state)
    assert all(p.grad is None for p in [*problem.model.parameters(), *meta_params])
    assert rel_err(result.meta_grads, exact.meta_grads) < 1e-10
    assert result.gold_loss_after.item() == pytest.approx(exact.outer_loss.item(), rel=1e-12)
    assert result.train_loss.item() == pytest.approx(proxy.train_loss.item(), rel=1e-12)
    assert result.train_grads.keys() == proxy.train_grads.keys()
    for name, g in proxy.train_grads.items():
        torch.testing.assert_close(result.train_grads[name], g, rtol=1e-12, atol=1e-14)
    assert result.discount is not None and proxy.discount is not None
    assert result.discount.item() == pytest.approx(proxy.discount.item(), rel=1e-10)


def test_output_hypergrad_matches_finite_differences_with_batchnorm() -> None:
    problem = make_problem(ConvBN, "label", nesterov=True)
    result = _output_hypergrad(problem)
    assert rel_err(result.meta_grads, finite_differences(problem, steps=1)) < 1e-6


def test_output_hypergrad_updates_batchnorm_statistics_once() -> None:
    """The training forward is the step's real forward: running statistics move as after one forward."""
    problem = make_problem(ConvBN, "weight", nesterov=False)
    expected = copy.deepcopy(problem.model)
    expected(problem.batches[0][0])
    _output_hypergrad(problem)
    assert_bit_identical(dict(problem.model.named_buffers()), dict(expected.named_buffers()))


@pytest.mark.parametrize("model_cls", [MLP, ConvBN])
def test_output_grads_reuse_the_training_forward(model_cls: type) -> None:
    """The real step after a meta update: J_zᵀ ∂ℓ'/∂z through the kept graph = ∇ of a fresh forward's ℓ'.

    The MLP has a frozen parameter: it gets None, in its place in ``parameters()`` order.
    """
    problem = make_problem(model_cls, "weight", nesterov=False)
    x, y = problem.batches[0]
    result = _output_hypergrad(problem, keep_graph=True)
    with torch.no_grad():
        for p in problem.meta.parameters():
            p.add_(0.1)
    value, grad_logits = logit_gradient(
        _output_loss(problem, x, y), result.logits, result.features, create_graph=False
    )
    grads = output_grads(problem.model, result.logits, grad_logits)
    params = dict(problem.model.named_parameters())
    fresh = problem.inner(params, 0)
    assert value.item() == pytest.approx(fresh.item(), rel=1e-12)
    assert any(g is None for g in grads) == (model_cls is MLP)
    for (name, p), g in zip(params.items(), grads, strict=True):
        if not p.requires_grad:
            assert g is None, name
            continue
        torch.testing.assert_close(
            g, torch.autograd.grad(fresh, p, retain_graph=True)[0], rtol=1e-12, atol=1e-14
        )


@pytest.mark.parametrize("meta_kind", ["weight", "label"])
def test_meta_gradient_is_the_mean_over_equal_parts_of_the_trusted_batch(meta_kind: str) -> None:
    """Why a smaller trusted batch (``method.params.trusted_batch_size``) is unbiased: the hypergradient is
    linear in the trusted loss's gradient, so the full batch's meta-gradient is the mean of its equal parts'.
    (Exact for a network without batch statistics; with BatchNorm in train mode each part normalises by its
    own statistics.)"""
    problem = make_problem(MLP, meta_kind, nesterov=False)
    x, y = problem.batches[0]
    gold_x, gold_y = problem.gold
    meta_params = list(problem.meta.parameters())

    def with_gold(rows: slice) -> list[Tensor]:
        def gold(params: dict[str, Tensor]) -> Tensor:
            return gold_loss(
                lambda inputs: functional_forward(problem.model, params, inputs), gold_x[rows], gold_y[rows]
            )

        result = output_hypergrad(
            problem.model, problem.optimizer, x, _output_loss(problem, x, y), gold, meta_params
        )
        return result.meta_grads

    quarter = BATCH // 4
    parts = [with_gold(slice(i * quarter, (i + 1) * quarter)) for i in range(4)]
    mean = [torch.stack(grads).mean(dim=0) for grads in zip(*parts, strict=True)]
    assert rel_err(mean, with_gold(slice(0, 4 * quarter))) < 1e-12
    assert rel_err(parts[0], parts[1]) > 1e-3  # each part alone is a different (noisier) estimate


@pytest.mark.parametrize("model_cls", [MLP, ConvBN])
def test_example_alignment_is_each_samples_gradient_against_the_gold_gradient(model_cls: type) -> None:
    """Against the obvious computation: each sample's own loss differentiated through the batch's forward
    (BatchNorm's batch statistics included) on a model copy, dotted with the gold gradient; and against
    finite differences of L_gold after a step on one sample's weighted loss."""
    problem = make_problem(model_cls, "weight", nesterov=False)
    x, y = problem.batches[0]
    reference = copy.deepcopy(problem.model)
    weights = [p for p in reference.parameters() if p.requires_grad]
    gold = torch.autograd.grad(F.cross_entropy(reference(problem.gold[0])[0], problem.gold[1]), weights)
    losses = F.cross_entropy(reference(x)[0], y, reduction="none")

    def dot_gold(loss: Tensor) -> Tensor:
        grads = torch.autograd.grad(loss, weights, retain_graph=True)
        return sum((g * h).sum() for g, h in zip(grads, gold, strict=True))

    expected = torch.stack([dot_gold(losses[i]) for i in range(len(y))])

    result = example_alignment(problem.model, x, y, problem.outer)
    torch.testing.assert_close(result.alignment, expected, rtol=1e-10, atol=1e-12)
    gold_loss_at_w = problem.outer(dict(problem.model.named_parameters())).item()
    assert result.gold_loss.item() == pytest.approx(gold_loss_at_w)
    assert all(p.grad is None for p in problem.model.parameters())

    # d L_gold(w - α ε_i ∇ℓ_i) / dε_i at 0 = -α · alignment_i
    alpha, eps, i = 0.1, 1e-6, 2
    grad_i = torch.autograd.grad(losses[i], weights, retain_graph=True)

    def gold_after(e: float) -> float:
        stepped = copy.deepcopy(reference)
        with torch.no_grad():
            for p, g in zip([p for p in stepped.parameters() if p.requires_grad], grad_i, strict=True):
                p -= alpha * e * g
        return F.cross_entropy(stepped(problem.gold[0])[0], problem.gold[1]).item()

    slope = (gold_after(eps) - gold_after(-eps)) / (2 * eps)
    assert slope == pytest.approx(-alpha * result.alignment[i].item(), rel=1e-6)
